//! Kubernetes facts: which pod and container a cgroup belongs to (from its
//! path), what the kubelet says about that pod, and fetching that from
//! the kubelet.

mod cgroup_path;
mod kubelet;
mod pods;

pub use cgroup_path::{PodCgroup, QosClass, parse_cgroup_path};
pub use kubelet::{Kubelet, KubeletConfig, KubeletError, MAX_POD_LIST_BYTES};
pub use pods::{ContainerFacts, PodFacts, Pods, PodsError};
