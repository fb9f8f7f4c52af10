//! Workload identity: SPIFFE IDs and, later, attestation.

mod attest;
mod entry;
mod facts;
pub mod k8s;
mod selector;
mod spiffe_id;

pub use attest::{Attestation, Candidate, attest_cgroup};
pub use entry::{Entry, EntryError, EntryErrors, EntryProblem, Origin, parse_entries};
pub use facts::{CgroupFacts, FactsError, ProcessFacts, systemd_unit};
pub use selector::{CgroupGlob, Selector, SelectorError, SelectorProblem, Subject};
pub use spiffe_id::{SpiffeId, SpiffeIdError};
