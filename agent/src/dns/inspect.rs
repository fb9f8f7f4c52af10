//! What `status` and `explain` read of the DNS path: the learned table
//! (briefly locked), the view of identities, and the listeners.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::learned::{Learned, LearnedAddress};
use super::resolver::Resolver;
use super::view::DnsView;
use crate::clock::monotonic_ns;
use crate::identity::SpiffeId;

/// A cheap handle on the running DNS path, for reading.
#[derive(Clone)]
pub struct DnsReader {
    pub(super) learned: Arc<Mutex<Learned>>,
    pub(super) view: watch::Receiver<Arc<DnsView>>,
    pub(super) resolver: Arc<Resolver>,
    pub(super) namespaces: Arc<AtomicUsize>,
}

/// The DNS path's figures, for `status`.
pub struct Figures {
    pub learned_addresses: usize,
    pub per_identity_limit: u32,
    pub namespaces: usize,
    pub upstreams: Vec<SocketAddr>,
    /// Per slot with learned addresses: its identity (if a slot holds
    /// one), count and names.
    pub slots: BTreeMap<u32, (Option<SpiffeId>, u32, Vec<String>)>,
}

impl DnsReader {
    /// The running grants by name of `id` that cover `name` (its lookups
    /// are answered, their addresses opened by the grants).
    pub fn grants_covering(&self, id: &SpiffeId, name: &str) -> Vec<u32> {
        let view = self.view.borrow().clone();
        let Some(slot) = view.slot_of(id) else {
            return Vec::new();
        };
        view.grants_for(slot, name, crate::clock::boot_ns())
            .iter()
            .map(|g| g.id)
            .collect()
    }

    /// The identities whose credential rules in the running generation
    /// are not empty.
    pub fn credential_identities(&self) -> BTreeSet<SpiffeId> {
        self.view.borrow().credential_identities()
    }

    /// The figures now. Walks the table: call off the runtime's workers.
    pub fn figures(&self) -> Figures {
        let view = self.view.borrow().clone();
        let learned = self.learned.lock().expect("not poisoned");
        let (counts, per_identity_limit) = learned.counts();
        let mut names = learned.names_by_slot();
        let slots = counts
            .into_iter()
            .map(|(slot, n)| {
                let names = names
                    .remove(&slot)
                    .unwrap_or_default()
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                (slot, (view.identity(slot).cloned(), n, names))
            })
            .collect();
        Figures {
            learned_addresses: learned.entries(),
            per_identity_limit,
            namespaces: self.namespaces.load(Ordering::Relaxed),
            upstreams: self.resolver.upstream.servers().to_vec(),
            slots,
        }
    }

    /// The addresses `id`'s lookups opened (every one, or those of `addr`),
    /// with the seconds each stays open.
    pub fn learned_of(&self, id: &SpiffeId, addr: Option<IpAddr>) -> Vec<(LearnedAddress, u64)> {
        let Some(slot) = self.view.borrow().slot_of(id) else {
            return Vec::new();
        };
        let now = monotonic_ns();
        self.learned
            .lock()
            .expect("not poisoned")
            .of_slot(slot)
            .into_iter()
            .filter(|a| addr.is_none_or(|x| x.to_canonical() == a.addr))
            .map(|a| {
                let left = a.expiry_ns.saturating_sub(now).div_ceil(1_000_000_000);
                (a, left)
            })
            .collect()
    }
}
