//! Workload identity: SPIFFE IDs and, later, attestation.

mod spiffe_id;

pub use spiffe_id::{SpiffeId, SpiffeIdError};
