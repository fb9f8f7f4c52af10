//! The pod and container a cgroup belongs to, read from its path as the
//! kubelet and the container runtime lay it out.
//!
//! Two layouts, after the kubelet's cgroup driver:
//!
//! - cgroupfs: `/kubepods[/burstable|/besteffort]/pod<UID>/<CONTAINER>`
//! - systemd: `/kubepods.slice[/kubepods-<qos>.slice]/kubepods[-<qos>]-pod<UID>.slice/<CONTAINER>`,
//!   where `-` in the pod UID is written `_` (systemd slice names use `-`
//!   for nesting), and every slice name repeats its parent's.
//!
//! Guaranteed pods sit directly under the root, the others under their QoS
//! class. The root may also be `/kubelet/kubepods` or
//! `/kubelet.slice/kubelet-kubepods.slice` (a kubelet run with
//! `--cgroup-root=/kubelet`, as kind and some distributions do).
//!
//! `<CONTAINER>` is the 64-hex container id, bare (containerd and Docker
//! with cgroupfs), or as a systemd scope `cri-containerd-<id>.scope`,
//! `crio-<id>.scope`, `docker-<id>.scope` (CRI-O with cgroupfs names it
//! `crio-<id>`).
//!
//! The root must be at the top of the cgroup v2 hierarchy. A workload that
//! may make cgroups of its own (a user's systemd instance, a container with
//! a delegated subtree) could otherwise make one whose path looks like
//! another pod's: `/user.slice/.../kubepods/pod<victim>/...` is not a pod.
//! Cgroups below a container's cgroup are that container's.

/// A pod's quality-of-service class, which picks its place in the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// Where a cgroup sits among the kubelet's pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCgroup {
    /// The pod UID, with dashes (`0d6e9c5a-3f2b-...`).
    pub pod_uid: String,
    pub qos: QosClass,
    /// The 64-hex container id, when the cgroup is (or is inside) a
    /// container's; `None` for the pod's own cgroup and for runtime helpers
    /// in it (e.g. CRI-O's `crio-conmon-<id>.scope`).
    pub container_id: Option<String>,
}

#[derive(Clone, Copy)]
enum Driver {
    Cgroupfs,
    Systemd,
}

/// The places the kubelet puts its pods, from the top of the hierarchy.
const ROOTS: &[(&[&str], Driver)] = &[
    (&["kubepods"], Driver::Cgroupfs),
    (&["kubelet", "kubepods"], Driver::Cgroupfs),
    (&["kubepods.slice"], Driver::Systemd),
    (
        &["kubelet.slice", "kubelet-kubepods.slice"],
        Driver::Systemd,
    ),
];

/// The container runtimes' prefixes for a container's cgroup name.
const CONTAINER_PREFIXES: &[&str] = &["cri-containerd-", "crio-", "docker-"];

/// The pod (and container) of a cgroup path relative to the cgroup v2 root,
/// or `None` when the path is not in the kubelet's pod tree.
pub fn parse_cgroup_path(path: &str) -> Option<PodCgroup> {
    let parts: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
    ROOTS.iter().find_map(|(root, driver)| {
        let rest = parts.strip_prefix(*root)?;
        let (pod_uid, qos, rest) = match driver {
            Driver::Cgroupfs => cgroupfs_pod(rest)?,
            Driver::Systemd => systemd_pod(root.last()?.strip_suffix(".slice")?, rest)?,
        };
        Some(PodCgroup {
            pod_uid,
            qos,
            container_id: rest.first().and_then(|name| container_id(name)),
        })
    })
}

/// `[burstable|besteffort/]pod<UID>`, and what follows it.
fn cgroupfs_pod<'a>(parts: &'a [&'a str]) -> Option<(String, QosClass, &'a [&'a str])> {
    let (qos, parts) = match *parts.first()? {
        "burstable" => (QosClass::Burstable, &parts[1..]),
        "besteffort" => (QosClass::BestEffort, &parts[1..]),
        _ => (QosClass::Guaranteed, parts),
    };
    let (pod, rest) = parts.split_first()?;
    Some((pod_uid(pod.strip_prefix("pod")?)?, qos, rest))
}

/// `[<root>-<qos>.slice/]<parent>-pod<UID>.slice`, and what follows it;
/// `root` is the root slice's name without `.slice`.
fn systemd_pod<'a>(root: &str, parts: &'a [&'a str]) -> Option<(String, QosClass, &'a [&'a str])> {
    let first = parts.first()?;
    let (qos, parent, parts) = [
        (QosClass::Burstable, "burstable"),
        (QosClass::BestEffort, "besteffort"),
    ]
    .into_iter()
    .find_map(|(qos, name)| {
        let parent = format!("{root}-{name}");
        (first.strip_suffix(".slice")? == parent).then_some((qos, parent, &parts[1..]))
    })
    .unwrap_or((QosClass::Guaranteed, root.to_owned(), parts));
    let (pod, rest) = parts.split_first()?;
    let uid = pod
        .strip_suffix(".slice")?
        .strip_prefix(parent.as_str())?
        .strip_prefix("-pod")?;
    Some((pod_uid(&uid.replace('_', "-"))?, qos, rest))
}

/// A pod UID: lowercase hex and dashes (an API UUID, or the hash a static
/// pod gets).
fn pod_uid(uid: &str) -> Option<String> {
    let ok = !uid.is_empty()
        && uid
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f' | b'-'));
    ok.then(|| uid.to_owned())
}

/// The container id in a container cgroup's name, if it is one.
fn container_id(name: &str) -> Option<String> {
    let name = name.strip_suffix(".scope").unwrap_or(name);
    let id = CONTAINER_PREFIXES
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))
        .unwrap_or(name);
    let ok = id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    ok.then(|| id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "8a0c5b7e-4e2f-4a8b-9d51-3c6e2f7a1b09";
    const UID_: &str = "8a0c5b7e_4e2f_4a8b_9d51_3c6e2f7a1b09";
    const ID: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn pod(qos: QosClass, container: bool) -> Option<PodCgroup> {
        Some(PodCgroup {
            pod_uid: UID.into(),
            qos,
            container_id: container.then(|| ID.into()),
        })
    }

    fn parse(path: &str) -> Option<PodCgroup> {
        parse_cgroup_path(path)
    }

    #[test]
    fn systemd_driver_containerd_crio_docker() {
        use QosClass::*;
        let cases = [
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"
                ),
                Burstable,
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{ID}.scope"
                ),
                BestEffort,
            ),
            (
                format!("/kubepods.slice/kubepods-pod{UID_}.slice/docker-{ID}.scope"),
                Guaranteed,
            ),
            (
                format!(
                    "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"
                ),
                BestEffort,
            ),
            (
                format!(
                    "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope"
                ),
                Guaranteed,
            ),
        ];
        for (path, qos) in cases {
            assert_eq!(parse(&path), pod(qos, true), "{path}");
        }
    }

    #[test]
    fn cgroupfs_driver() {
        use QosClass::*;
        let cases = [
            (format!("/kubepods/burstable/pod{UID}/{ID}"), Burstable),
            (format!("/kubepods/besteffort/pod{UID}/{ID}"), BestEffort),
            (format!("/kubepods/pod{UID}/{ID}"), Guaranteed),
            (format!("/kubepods/burstable/pod{UID}/crio-{ID}"), Burstable),
            (format!("/kubelet/kubepods/pod{UID}/{ID}"), Guaranteed),
        ];
        for (path, qos) in cases {
            assert_eq!(parse(&path), pod(qos, true), "{path}");
        }
    }

    #[test]
    fn pod_cgroups_and_runtime_helpers_have_no_container() {
        use QosClass::*;
        let cases = [
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
                ),
                Burstable,
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{ID}.scope"
                ),
                Burstable,
            ),
            (format!("/kubepods/besteffort/pod{UID}"), BestEffort),
            (format!("/kubepods/pod{UID}/not-a-container"), Guaranteed),
        ];
        for (path, qos) in cases {
            assert_eq!(parse(&path), pod(qos, false), "{path}");
        }
    }

    #[test]
    fn cgroups_inside_a_container_are_the_containers() {
        let path = format!(
            "/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope/init.scope"
        );
        assert_eq!(parse(&path), pod(QosClass::Guaranteed, true));
        // Even one the container named to look like another pod.
        let other = "0f0f0f0f-0000-4000-8000-000000000000";
        let path = format!(
            "/kubepods/pod{UID}/{ID}/kubepods/pod{other}/{}",
            "a".repeat(64)
        );
        assert_eq!(parse(&path), pod(QosClass::Guaranteed, true));
    }

    #[test]
    fn static_pod_uids_are_hashes() {
        let uid = "4f6d3a1c2b9e8d7f6a5b4c3d2e1f0a9b";
        let path = format!("/kubepods/burstable/pod{uid}/{ID}");
        assert_eq!(parse(&path).unwrap().pod_uid, uid);
    }

    #[test]
    fn other_paths_are_not_pods() {
        for path in [
            "/".to_owned(),
            "".to_owned(),
            "/system.slice/containerd.service".to_owned(),
            "/system.slice/docker-".to_owned() + ID + ".scope",
            "/user.slice/user-1000.slice/user@1000.service/app.slice".to_owned(),
            "/kubepods".to_owned(),
            "/kubepods.slice".to_owned(),
            "/kubepods.slice/kubepods-burstable.slice".to_owned(),
            "/kubepods/burstable".to_owned(),
            "/kubepods/burstable/pod".to_owned(),
            format!("/kubepods/burstable/pod{}/{ID}", UID.to_uppercase()),
            format!("/kubepods/burstable/{UID}/{ID}"),
            // A slice whose name does not repeat its parent's.
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-pod{UID_}.slice"),
            format!("/kubepods.slice/other-pod{UID_}.slice"),
            // The pod tree somewhere other than the top: forgeable.
            format!(
                "/user.slice/user-1000.slice/user@1000.service/kubepods/burstable/pod{UID}/{ID}"
            ),
            format!(
                "/system.slice/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope"
            ),
            format!("kubepods/pod{UID}/{ID}"),
        ] {
            assert_eq!(parse(&path), None, "{path}");
        }
    }

    #[test]
    fn container_ids_are_64_lowercase_hex() {
        let short = &ID[..63];
        let path = format!("/kubepods/pod{UID}/{short}");
        assert_eq!(parse(&path).unwrap().container_id, None);
        let upper = ID.to_uppercase();
        let path = format!("/kubepods/pod{UID}/{upper}");
        assert_eq!(parse(&path).unwrap().container_id, None);
        let path = format!("/kubepods/pod{UID}/containerd-{ID}.scope");
        assert_eq!(parse(&path).unwrap().container_id, None);
    }
}
