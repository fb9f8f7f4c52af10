//! idgate: SPIFFE workload identities bound to cgroups, and egress judged
//! by them in the kernel.

pub mod admin;
pub mod bpf;
pub mod cgroup;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod dns;
pub mod egress;
pub mod events;
pub mod federation;
pub mod files;
pub mod grants;
pub mod hashing;
pub mod identity;
pub mod identity_view;
pub mod line_index;
pub mod metrics;
pub mod oidc;
pub mod parallel;
pub mod policy;
pub mod privileges;
pub mod revocations;
pub mod serve;
pub mod svid;
#[cfg(test)]
mod testing;
pub mod tls;
pub mod workload_api;
pub mod workloads;
