//! Workload identity: SPIFFE IDs, registration entries and their
//! selectors, the kernel's facts about a workload, and attestation.

mod attest;
mod entry;
mod entry_set;
mod facts;
pub mod k8s;
mod selector;
mod spiffe_id;

pub use attest::{Attestation, Candidate, attest_cgroup};
pub use entry::{
    EntriesError, Entry, EntryError, EntryErrors, EntryProblem, Origin, load_entries, parse_entries,
};
pub use entry_set::EntrySet;
pub use facts::{CgroupFacts, FactsError, ProcessFacts, systemd_unit};
pub use selector::{CgroupGlob, GLOB_CHARS, Selector, SelectorError, SelectorProblem, Subject};
pub use spiffe_id::{SpiffeId, SpiffeIdError};
