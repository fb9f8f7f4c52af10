//! Kubernetes facts: which pod and container a cgroup belongs to (from its
//! path) and what the kubelet says about that pod.

mod cgroup_path;
mod pods;

pub use cgroup_path::{PodCgroup, QosClass, parse_cgroup_path};
pub use pods::{ContainerFacts, PodFacts, Pods, PodsError};
