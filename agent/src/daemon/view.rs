//! Publishes the owner's [`IdentityView`] to the Workload API, and its
//! [`DnsView`] to the DNS path, after every change that touches them.

use std::sync::Arc;

use tokio::sync::watch;

use super::state::State;
use crate::dns::{DnsView, GrantedName};
use crate::identity_view::IdentityView;

/// Publishes a new view when the state's differs from the last one.
pub struct ViewPublisher {
    tx: watch::Sender<IdentityView>,
    dns: watch::Sender<Arc<DnsView>>,
    /// The workload table's version and the kernel's binding count the
    /// last view was taken at.
    seen: (u64, usize),
}

fn view_of(state: &State) -> IdentityView {
    IdentityView::new(
        &state.workloads,
        &state.revocations,
        &state.applied.bound,
        state.applied.generation,
    )
}

fn dns_view_of(state: &State) -> Arc<DnsView> {
    Arc::new(with_grants_of(
        state,
        DnsView::new(
            (state.applied.generation, state.applied.stamp),
            &state.applied.identities,
            state.revocations.ids().clone(),
            state.applied.compiled.clone(),
        ),
    ))
}

/// `view` with the state's running grants by name.
fn with_grants_of(state: &State, view: DnsView) -> DnsView {
    view.with_grants(
        state.grants.version(),
        state
            .grants
            .names(&state.applied.slots)
            .into_iter()
            .map(|g| {
                (
                    g.slot,
                    GrantedName {
                        id: g.id,
                        pattern: g.pattern,
                        expiry_boot_ns: g.expiry_boot_ns,
                    },
                )
            }),
    )
}

impl ViewPublisher {
    pub fn new(
        state: &State,
    ) -> (
        Self,
        watch::Receiver<IdentityView>,
        watch::Receiver<Arc<DnsView>>,
    ) {
        let (tx, rx) = watch::channel(view_of(state));
        let (dns, dns_rx) = watch::channel(dns_view_of(state));
        let seen = (state.workloads.version(), state.applied.bound.len());
        (Self { tx, dns, seen }, rx, dns_rx)
    }

    /// Call after anything that may have changed bindings, revocations
    /// or grants. Takes a new view only when the bindings (in the table or
    /// in the kernel), the generation, the revocations or (for the DNS
    /// path) the grants changed: the owner calls this after every event,
    /// and a view is a copy of every binding. A change of the grants alone
    /// makes a DNS view that shares everything else with the last one.
    pub fn publish(&mut self, state: &State) {
        let grants_stale = self.dns.borrow().grants_version != state.grants.version();
        let now = (state.workloads.version(), state.applied.bound.len());
        let bindings_seen = std::mem::replace(&mut self.seen, now) == now;
        let (generation_seen, revoked_seen) = {
            let current = self.tx.borrow();
            (
                current.generation == state.applied.generation,
                current.revoked == *state.revocations.ids(),
            )
        };
        let dns_stale = {
            let current = self.dns.borrow();
            current.generation != state.applied.generation
                || !current.revoked_are(state.revocations.ids())
        };
        if dns_stale {
            self.dns.send_replace(dns_view_of(state));
        } else if grants_stale {
            // Only the grants changed: the rest of the view is shared.
            let view = with_grants_of(state, DnsView::clone(&self.dns.borrow()));
            self.dns.send_replace(Arc::new(view));
        }
        if bindings_seen && generation_seen && revoked_seen {
            return;
        }
        let view = if bindings_seen && revoked_seen {
            // A new generation alone: the bindings are shared, not copied.
            self.tx.borrow().at_generation(state.applied.generation)
        } else {
            view_of(state)
        };
        self.tx.send_if_modified(|old| {
            if *old == view {
                false
            } else {
                *old = view;
                true
            }
        });
    }
}
