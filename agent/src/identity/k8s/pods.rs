//! The kubelet's pod list (its `/pods` endpoint: a `v1.PodList` as the API
//! serves it), reduced to the facts selectors look at.
//!
//! Only the fields used here are read; everything else in the list is
//! ignored, so the parser follows the API as it grows.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

/// Errors reading a pod list.
#[derive(Debug, thiserror::Error)]
pub enum PodsError {
    #[error("kubelet pod list: {0}")]
    Json(#[from] serde_json::Error),
    #[error("kubelet pod list: two pods have the UID {0}")]
    DuplicateUid(String),
}

/// What the kubelet says about one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    /// `spec.serviceAccountName`; static pods have none.
    pub service_account: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Its containers, init containers and ephemeral containers, from
    /// their statuses.
    pub containers: Vec<ContainerFacts>,
}

/// What the kubelet says about one container of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerFacts {
    pub name: String,
    /// The image as the runtime reports it, e.g. `docker.io/library/nginx:1.25.3`.
    pub image: String,
    /// The image by digest, e.g. `docker.io/library/nginx@sha256:...`.
    pub image_id: String,
    /// The runtime's container id without its `containerd://` (or
    /// `cri-o://`, `docker://`) prefix; `None` until the container exists.
    pub id: Option<String>,
}

impl PodFacts {
    /// The container with this runtime id (as found in a cgroup path).
    pub fn container(&self, id: &str) -> Option<&ContainerFacts> {
        self.containers.iter().find(|c| c.id.as_deref() == Some(id))
    }
}

/// The pods on a node, by UID.
#[derive(Debug, Clone, Default)]
pub struct Pods {
    by_uid: HashMap<String, PodFacts>,
}

impl Pods {
    /// Reads the JSON the kubelet's `/pods` endpoint serves. Two pods with
    /// one UID fail the whole list: which one a cgroup belongs to would be
    /// a guess.
    pub fn from_kubelet_json(json: &[u8]) -> Result<Pods, PodsError> {
        let list: PodList = serde_json::from_slice(json)?;
        let items = list.items.unwrap_or_default();
        let mut by_uid = HashMap::with_capacity(items.len());
        for pod in items {
            let facts = PodFacts::from(pod);
            if let Some(other) = by_uid.insert(facts.uid.clone(), facts) {
                return Err(PodsError::DuplicateUid(other.uid));
            }
        }
        Ok(Pods { by_uid })
    }

    /// The pod with this UID, if the kubelet runs it.
    pub fn get(&self, uid: &str) -> Option<&PodFacts> {
        self.by_uid.get(uid)
    }

    /// How many pods there are.
    pub fn len(&self) -> usize {
        self.by_uid.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_uid.is_empty()
    }
}

#[derive(Deserialize)]
struct PodList {
    /// Go writes an empty list as `null`.
    items: Option<Vec<Pod>>,
}

#[derive(Deserialize)]
struct Pod {
    metadata: ObjectMeta,
    #[serde(default)]
    spec: PodSpec,
    #[serde(default)]
    status: PodStatus,
}

#[derive(Deserialize)]
struct ObjectMeta {
    name: String,
    namespace: String,
    uid: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    service_account_name: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    #[serde(default)]
    container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    init_container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    ephemeral_container_statuses: Vec<ContainerStatus>,
}

#[derive(Deserialize)]
struct ContainerStatus {
    name: String,
    #[serde(default)]
    image: String,
    #[serde(default, rename = "imageID")]
    image_id: String,
    #[serde(rename = "containerID")]
    container_id: Option<String>,
}

impl From<Pod> for PodFacts {
    fn from(pod: Pod) -> PodFacts {
        let status = pod.status;
        let containers = status
            .container_statuses
            .into_iter()
            .chain(status.init_container_statuses)
            .chain(status.ephemeral_container_statuses)
            .map(|c| ContainerFacts {
                name: c.name,
                image: c.image,
                image_id: c.image_id,
                id: c
                    .container_id
                    .as_deref()
                    .and_then(|id| id.split_once("://"))
                    .map(|(_, id)| id)
                    .filter(|id| !id.is_empty())
                    .map(str::to_owned),
            })
            .collect();
        PodFacts {
            uid: pod.metadata.uid,
            name: pod.metadata.name,
            namespace: pod.metadata.namespace,
            service_account: pod.spec.service_account_name.filter(|sa| !sa.is_empty()),
            labels: pod.metadata.labels,
            containers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by hand to match the shape of the kubelet's `/pods` answer
    /// (a `v1.PodList`), not captured from a live kubelet: a Deployment pod
    /// with a sidecar and an init container (containerd), a static pod
    /// (mirror, no service account), a pod with an ephemeral debug
    /// container (CRI-O) and a pod still creating its container.
    const FIXTURE: &[u8] = include_bytes!("testdata/kubelet-pods.json");

    fn pods() -> Pods {
        Pods::from_kubelet_json(FIXTURE).unwrap()
    }

    #[test]
    fn reads_every_pod_of_the_fixture() {
        let pods = pods();
        assert_eq!(pods.len(), 4);
        assert!(!pods.is_empty());
        assert!(Pods::default().is_empty());
    }

    #[test]
    fn reads_a_deployment_pod_with_init_and_sidecar_containers() {
        let pods = pods();
        let pod = pods.get("8a0c5b7e-4e2f-4a8b-9d51-3c6e2f7a1b09").unwrap();
        assert_eq!(pod.name, "checkout-7d9f8c6b5-x2k4q");
        assert_eq!(pod.namespace, "payments");
        assert_eq!(pod.service_account.as_deref(), Some("checkout"));
        assert_eq!(
            pod.labels.get("app.kubernetes.io/name").map(String::as_str),
            Some("checkout")
        );
        assert_eq!(
            pod.labels.get("pod-template-hash").map(String::as_str),
            Some("7d9f8c6b5")
        );
        let names: Vec<_> = pod.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["server", "log-shipper", "migrate"]);
        let server = pod
            .container("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
            .unwrap();
        assert_eq!(server.name, "server");
        assert_eq!(server.image, "registry.example.com/payments/checkout:1.4.2");
        assert_eq!(
            server.image_id,
            "registry.example.com/payments/checkout@sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
        );
        let init = pod
            .container("a1f4c2e9b7d3086f5e2c1b9a8d7f6e5c4b3a2918f7e6d5c4b3a29180f7e6d5c4")
            .unwrap();
        assert_eq!(init.name, "migrate");
        assert_eq!(pod.container("containerd://e3b0"), None);
    }

    #[test]
    fn reads_a_static_pod_without_service_account() {
        let pods = pods();
        let pod = pods.get("4f6d3a1c2b9e8d7f6a5b4c3d2e1f0a9b").unwrap();
        assert_eq!(pod.name, "kube-apiserver-node-1");
        assert_eq!(pod.namespace, "kube-system");
        assert_eq!(pod.service_account, None);
        assert_eq!(pod.containers.len(), 1);
    }

    #[test]
    fn reads_ephemeral_containers_and_crio_ids() {
        let pods = pods();
        let pod = pods.get("c2d9e1f0-7a6b-4c5d-8e9f-0a1b2c3d4e5f").unwrap();
        let debug = pod
            .container("9d8c7b6a5f4e3d2c1b0a99887766554433221100ffeeddccbbaa998877665544")
            .unwrap();
        assert_eq!(debug.name, "debugger-x7k2p");
        assert_eq!(debug.image, "docker.io/library/busybox:1.36");
    }

    #[test]
    fn a_container_not_yet_created_has_no_id() {
        let pods = pods();
        let pod = pods.get("5b6c7d8e-9f0a-4b1c-8d2e-3f4a5b6c7d8e").unwrap();
        assert_eq!(pod.containers.len(), 1);
        assert_eq!(pod.containers[0].id, None);
        assert_eq!(pod.service_account.as_deref(), Some("default"));
    }

    #[test]
    fn rejects_bad_lists() {
        let err = Pods::from_kubelet_json(b"{\"items\": [{\"metadata\": {\"name\": \"x\"}}]}")
            .unwrap_err();
        assert!(matches!(err, PodsError::Json(_)), "{err}");
        let pod = r#"{"metadata": {"name": "a", "namespace": "n", "uid": "u1"}}"#;
        let twice = format!(r#"{{"kind": "PodList", "items": [{pod}, {pod}]}}"#);
        let err = Pods::from_kubelet_json(twice.as_bytes()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "kubelet pod list: two pods have the UID u1"
        );
        let empty = br#"{"kind":"PodList","apiVersion":"v1","metadata":{},"items":null}"#;
        assert!(Pods::from_kubelet_json(empty).unwrap().is_empty());
    }
}
