//! Publishes the owner's [`IdentityView`] to the Workload API after every
//! change that touches it.

use tokio::sync::watch;

use super::state::State;
use crate::identity_view::IdentityView;

/// Publishes a new view when the state's differs from the last one.
pub struct ViewPublisher {
    tx: watch::Sender<IdentityView>,
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

impl ViewPublisher {
    pub fn new(state: &State) -> (Self, watch::Receiver<IdentityView>) {
        let (tx, rx) = watch::channel(view_of(state));
        let seen = (state.workloads.version(), state.applied.bound.len());
        (Self { tx, seen }, rx)
    }

    /// Call after anything that may have changed bindings or revocations.
    /// Takes a new view only when the bindings (in the table or in the
    /// kernel), the generation or the revocations changed: the owner calls this after every event, and
    /// a view is a copy of every binding.
    pub fn publish(&mut self, state: &State) {
        let now = (state.workloads.version(), state.applied.bound.len());
        let bindings_seen = std::mem::replace(&mut self.seen, now) == now;
        let rest_seen = {
            let current = self.tx.borrow();
            current.generation == state.applied.generation
                && current.revoked == *state.revocations.ids()
        };
        if bindings_seen && rest_seen {
            return;
        }
        let view = view_of(state);
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
