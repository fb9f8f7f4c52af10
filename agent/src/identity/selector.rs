//! Selectors: one fact a workload must have, written the SPIRE way as
//! `TYPE:KIND:VALUE` (`unix:uid:1001`, `k8s:ns:payments`, ...), and how each
//! is matched against the facts the kernel gives about a cgroup.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use globset::{Glob, GlobBuilder, GlobMatcher};

use super::facts::{CgroupFacts, ProcessFacts};
use super::k8s::{ContainerFacts, PodFacts};

/// One fact an entry requires. All selectors of an entry must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// `unix:uid:N`: the real and the effective user id are both N.
    Uid(u32),
    /// `unix:gid:N`: the real and the effective group id are both N.
    Gid(u32),
    /// `unix:user:NAME`: the real and effective uid are equal and are
    /// NAME's in the host's user database.
    User(String),
    /// `unix:group:NAME`: the real and effective gid are equal and are
    /// NAME's in the host's group database.
    Group(String),
    /// `unix:path:/abs/path`: the process runs this executable.
    Path(PathBuf),
    /// `unix:sha256:HEX`: the SHA-256 of the executable the process runs.
    Sha256([u8; 32]),
    /// `cgroup:path:GLOB`: the cgroup path, relative to the cgroup v2 root,
    /// matches GLOB (`*` stays within one path component, `**` crosses).
    CgroupPath(CgroupGlob),
    /// `systemd:unit:NAME`: the cgroup belongs to this unit (the last
    /// `*.service` or `*.scope` component of its path).
    SystemdUnit(String),
    /// `k8s:ns:NAME`: the pod's namespace.
    K8sNamespace(String),
    /// `k8s:sa:NAME`: the pod's service account.
    K8sServiceAccount(String),
    /// `k8s:pod-name:NAME`
    K8sPodName(String),
    /// `k8s:pod-uid:UID`
    K8sPodUid(String),
    /// `k8s:pod-label:KEY:VALUE`: the pod has label KEY with value VALUE.
    K8sPodLabel { key: String, value: String },
    /// `k8s:container-name:NAME`: the container the cgroup belongs to.
    K8sContainerName(String),
    /// `k8s:container-image:IMAGE`: the container's image, as its status
    /// names it (`image`) or by digest (`imageID`).
    K8sContainerImage(String),
}

/// The characters that make a `cgroup:path` pattern more than the path it
/// spells: wildcards, classes, alternatives and escapes.
pub const GLOB_CHARS: [char; 7] = ['*', '?', '[', ']', '{', '}', '\\'];

/// A `cgroup:path` glob. A pattern without wildcards, classes,
/// alternatives or escapes (every `[[workload]]` table's) is matched as
/// the string it is; only the others are compiled to a matcher, which
/// costs tens of kilobytes each.
#[derive(Clone)]
pub struct CgroupGlob {
    glob: Glob,
    matcher: Option<GlobMatcher>,
}

impl CgroupGlob {
    fn new(glob: Glob) -> Self {
        let literal = !glob.glob().contains(GLOB_CHARS);
        let matcher = (!literal).then(|| glob.compile_matcher());
        Self { glob, matcher }
    }

    /// The pattern as written.
    pub fn pattern(&self) -> &str {
        self.glob.glob()
    }

    /// The parsed glob (for indexing many of them at once).
    pub fn glob(&self) -> &Glob {
        &self.glob
    }

    /// Whether a cgroup path (relative to the v2 root, e.g.
    /// `/system.slice/x.service`) matches.
    pub fn is_match(&self, cgroup_path: &str) -> bool {
        match &self.matcher {
            Some(m) => m.is_match(cgroup_path),
            None => self.pattern() == cgroup_path,
        }
    }
}

/// The pattern alone: a compiled matcher's own form runs to pages.
impl fmt::Debug for CgroupGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CgroupGlob").field(&self.pattern()).finish()
    }
}

impl PartialEq for CgroupGlob {
    fn eq(&self, other: &Self) -> bool {
        self.pattern() == other.pattern()
    }
}

impl Eq for CgroupGlob {}

/// Everything known about one workload when an entry is checked: its
/// cgroup, one of its processes (none when the cgroup is empty), and its
/// pod and container when the cgroup is a Kubernetes one the kubelet knows.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub cgroup: &'a CgroupFacts,
    pub process: Option<&'a ProcessFacts>,
    pub pod: Option<&'a PodFacts>,
    pub container: Option<&'a ContainerFacts>,
}

impl Selector {
    /// Whether the subject has this fact. A fact that is missing (no
    /// process, no pod, no readable executable) never matches.
    pub fn matches(&self, subject: &Subject<'_>) -> bool {
        let process = subject.process;
        let pod = subject.pod;
        let container = subject.container;
        match self {
            Selector::Uid(uid) => process.is_some_and(|p| p.uid == *uid && p.euid == *uid),
            Selector::Gid(gid) => process.is_some_and(|p| p.gid == *gid && p.egid == *gid),
            Selector::User(name) => {
                process.is_some_and(|p| p.uid == p.euid && p.user.as_deref() == Some(name))
            }
            Selector::Group(name) => {
                process.is_some_and(|p| p.gid == p.egid && p.group.as_deref() == Some(name))
            }
            Selector::Path(path) => process.is_some_and(|p| p.exe.as_deref() == Some(path)),
            Selector::Sha256(hash) => process.is_some_and(|p| p.exe_sha256 == Some(*hash)),
            Selector::CgroupPath(glob) => glob.is_match(&subject.cgroup.path),
            Selector::SystemdUnit(unit) => subject.cgroup.systemd_unit() == Some(unit),
            Selector::K8sNamespace(ns) => pod.is_some_and(|p| p.namespace == *ns),
            Selector::K8sServiceAccount(sa) => {
                pod.is_some_and(|p| p.service_account.as_deref() == Some(sa))
            }
            Selector::K8sPodName(name) => pod.is_some_and(|p| p.name == *name),
            Selector::K8sPodUid(uid) => pod.is_some_and(|p| p.uid == *uid),
            Selector::K8sPodLabel { key, value } => {
                pod.is_some_and(|p| p.labels.get(key) == Some(value))
            }
            Selector::K8sContainerName(name) => container.is_some_and(|c| c.name == *name),
            Selector::K8sContainerImage(image) => {
                container.is_some_and(|c| c.image == *image || c.image_id == *image)
            }
        }
    }
}

/// The selector kinds, as written before the value.
const KINDS: &[&str] = &[
    "unix:uid",
    "unix:gid",
    "unix:user",
    "unix:group",
    "unix:path",
    "unix:sha256",
    "cgroup:path",
    "systemd:unit",
    "k8s:ns",
    "k8s:sa",
    "k8s:pod-name",
    "k8s:pod-uid",
    "k8s:pod-label",
    "k8s:container-name",
    "k8s:container-image",
];

/// Why a string is not a selector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("selector {selector:?}: {problem}")]
pub struct SelectorError {
    pub selector: String,
    pub problem: SelectorProblem,
}

/// What is wrong with a selector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorProblem {
    #[error("expected TYPE:KIND:VALUE, e.g. unix:uid:1001")]
    Shape,
    #[error("unknown kind {0:?}; known kinds: {kinds}", kinds = KINDS.join(", "))]
    UnknownKind(String),
    #[error("the value is empty")]
    EmptyValue,
    #[error("{0:?} is not a numeric id (0 to 4294967295)")]
    BadId(String),
    #[error("the executable path must be absolute")]
    RelativePath,
    #[error("a SHA-256 is 64 hex digits, got {0} characters")]
    Sha256Length(usize),
    #[error("a SHA-256 is hex digits (0-9, a-f)")]
    Sha256Hex,
    #[error(
        "a cgroup path glob starts with '/' (paths are relative to the cgroup v2 root, e.g. /system.slice/agent-*.service)"
    )]
    RelativeGlob,
    #[error("bad glob: {0}")]
    Glob(String),
    #[error("expected KEY:VALUE after k8s:pod-label")]
    Label,
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s).map_err(|problem| SelectorError {
            selector: s.to_owned(),
            problem,
        })
    }
}

fn parse(s: &str) -> Result<Selector, SelectorProblem> {
    let (ty, rest) = s.split_once(':').ok_or(SelectorProblem::Shape)?;
    let (kind, value) = rest.split_once(':').ok_or(SelectorProblem::Shape)?;
    if value.is_empty() {
        return Err(SelectorProblem::EmptyValue);
    }
    let text = || value.to_owned();
    Ok(match (ty, kind) {
        ("unix", "uid") => Selector::Uid(parse_id(value)?),
        ("unix", "gid") => Selector::Gid(parse_id(value)?),
        ("unix", "user") => Selector::User(text()),
        ("unix", "group") => Selector::Group(text()),
        ("unix", "path") => {
            let path = Path::new(value);
            if !path.is_absolute() {
                return Err(SelectorProblem::RelativePath);
            }
            Selector::Path(path.to_owned())
        }
        ("unix", "sha256") => Selector::Sha256(parse_sha256(value)?),
        ("cgroup", "path") => Selector::CgroupPath(parse_glob(value)?),
        ("systemd", "unit") => Selector::SystemdUnit(text()),
        ("k8s", "ns") => Selector::K8sNamespace(text()),
        ("k8s", "sa") => Selector::K8sServiceAccount(text()),
        ("k8s", "pod-name") => Selector::K8sPodName(text()),
        ("k8s", "pod-uid") => Selector::K8sPodUid(text()),
        ("k8s", "pod-label") => {
            // Label keys may hold '/' but never ':'; values may be empty.
            let (key, value) = value.split_once(':').ok_or(SelectorProblem::Label)?;
            if key.is_empty() {
                return Err(SelectorProblem::Label);
            }
            Selector::K8sPodLabel {
                key: key.to_owned(),
                value: value.to_owned(),
            }
        }
        ("k8s", "container-name") => Selector::K8sContainerName(text()),
        ("k8s", "container-image") => Selector::K8sContainerImage(text()),
        _ => return Err(SelectorProblem::UnknownKind(format!("{ty}:{kind}"))),
    })
}

fn parse_id(value: &str) -> Result<u32, SelectorProblem> {
    // `u32::from_str` takes a leading '+'; an id is digits only.
    if !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SelectorProblem::BadId(value.to_owned()));
    }
    value
        .parse()
        .map_err(|_| SelectorProblem::BadId(value.to_owned()))
}

fn parse_sha256(value: &str) -> Result<[u8; 32], SelectorProblem> {
    if value.len() != 64 {
        return Err(SelectorProblem::Sha256Length(value.chars().count()));
    }
    let mut hash = [0; 32];
    hex::decode_to_slice(value, &mut hash).map_err(|_| SelectorProblem::Sha256Hex)?;
    Ok(hash)
}

fn parse_glob(value: &str) -> Result<CgroupGlob, SelectorProblem> {
    if !value.starts_with('/') {
        return Err(SelectorProblem::RelativeGlob);
    }
    let glob = GlobBuilder::new(value)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map_err(|e| SelectorProblem::Glob(e.kind().to_string()))?;
    Ok(CgroupGlob::new(glob))
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Uid(uid) => write!(f, "unix:uid:{uid}"),
            Selector::Gid(gid) => write!(f, "unix:gid:{gid}"),
            Selector::User(name) => write!(f, "unix:user:{name}"),
            Selector::Group(name) => write!(f, "unix:group:{name}"),
            Selector::Path(path) => write!(f, "unix:path:{}", path.display()),
            Selector::Sha256(hash) => write!(f, "unix:sha256:{}", hex::encode(hash)),
            Selector::CgroupPath(glob) => write!(f, "cgroup:path:{}", glob.pattern()),
            Selector::SystemdUnit(unit) => write!(f, "systemd:unit:{unit}"),
            Selector::K8sNamespace(ns) => write!(f, "k8s:ns:{ns}"),
            Selector::K8sServiceAccount(sa) => write!(f, "k8s:sa:{sa}"),
            Selector::K8sPodName(name) => write!(f, "k8s:pod-name:{name}"),
            Selector::K8sPodUid(uid) => write!(f, "k8s:pod-uid:{uid}"),
            Selector::K8sPodLabel { key, value } => write!(f, "k8s:pod-label:{key}:{value}"),
            Selector::K8sContainerName(name) => write!(f, "k8s:container-name:{name}"),
            Selector::K8sContainerImage(image) => write!(f, "k8s:container-image:{image}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const EXE_HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    const POD_UID: &str = "0d6e9c5a-3f2b-4c1e-9a7d-5b8e2f1c4a90";
    const CONTAINER_ID: &str = "4c3d9f0b8a7e6d5c4b3a29180f7e6d5c4b3a29180f7e6d5c4b3a29180f7e6d5c";

    fn sel(s: &str) -> Selector {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    fn problem(s: &str) -> SelectorProblem {
        s.parse::<Selector>().unwrap_err().problem
    }

    fn process() -> ProcessFacts {
        ProcessFacts {
            pid: 4242,
            uid: 1001,
            euid: 1001,
            gid: 1002,
            egid: 1002,
            user: Some("agent".into()),
            group: Some("agents".into()),
            exe: Some("/usr/bin/python3.12".into()),
            exe_sha256: Some(hex::decode(EXE_HASH).unwrap().try_into().unwrap()),
            cgroup: "/system.slice/agent-research.service".into(),
        }
    }

    fn host_cgroup() -> CgroupFacts {
        CgroupFacts::new("/system.slice/agent-research.service".into(), vec![4242])
    }

    fn pod_cgroup() -> CgroupFacts {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CONTAINER_ID}.scope",
            POD_UID.replace('-', "_")
        );
        CgroupFacts::new(path, vec![4242])
    }

    fn pod() -> PodFacts {
        PodFacts {
            uid: POD_UID.into(),
            name: "checkout-7d9f8c6b5-x2k4q".into(),
            namespace: "payments".into(),
            service_account: Some("checkout".into()),
            labels: BTreeMap::from([
                ("app.kubernetes.io/name".into(), "checkout".into()),
                ("tier".into(), "".into()),
            ]),
            containers: vec![ContainerFacts {
                name: "server".into(),
                image: "registry.example.com/payments/checkout:1.4.2".into(),
                image_id: "registry.example.com/payments/checkout@sha256:ab12".into(),
                id: Some(CONTAINER_ID.into()),
            }],
        }
    }

    /// Asserts that `yes` matches the subject and `no` does not.
    fn check(subject: &Subject<'_>, yes: &str, no: &str) {
        assert!(sel(yes).matches(subject), "{yes} should match");
        assert!(!sel(no).matches(subject), "{no} should not match");
    }

    #[test]
    fn unix_selectors_match_the_process() {
        let cgroup = host_cgroup();
        let process = process();
        let s = Subject {
            cgroup: &cgroup,
            process: Some(&process),
            pod: None,
            container: None,
        };
        check(&s, "unix:uid:1001", "unix:uid:0");
        check(&s, "unix:gid:1002", "unix:gid:1001");
        check(&s, "unix:user:agent", "unix:user:root");
        check(&s, "unix:group:agents", "unix:group:agent");
        check(
            &s,
            "unix:path:/usr/bin/python3.12",
            "unix:path:/usr/bin/python3",
        );
        check(
            &s,
            &format!("unix:sha256:{EXE_HASH}"),
            &format!("unix:sha256:{}", "0".repeat(64)),
        );
        // Upper-case hex names the same hash.
        assert!(sel(&format!("unix:sha256:{}", EXE_HASH.to_uppercase())).matches(&s));
    }

    #[test]
    fn uid_and_user_need_real_and_effective_to_agree() {
        let cgroup = host_cgroup();
        let setuid = ProcessFacts {
            euid: 0,
            egid: 0,
            ..process()
        };
        let s = Subject {
            cgroup: &cgroup,
            process: Some(&setuid),
            pod: None,
            container: None,
        };
        for no in [
            "unix:uid:1001",
            "unix:uid:0",
            "unix:user:agent",
            "unix:gid:1002",
            "unix:group:agents",
        ] {
            assert!(!sel(no).matches(&s), "{no}");
        }
    }

    #[test]
    fn unix_selectors_never_match_without_a_process_or_executable() {
        let cgroup = host_cgroup();
        let empty = Subject {
            cgroup: &cgroup,
            process: None,
            pod: None,
            container: None,
        };
        let no_exe = ProcessFacts {
            exe: None,
            exe_sha256: None,
            ..process()
        };
        let kernel_thread_like = Subject {
            process: Some(&no_exe),
            ..empty
        };
        for s in [
            "unix:uid:1001",
            "unix:gid:1002",
            "unix:user:agent",
            "unix:group:agents",
            "unix:path:/usr/bin/python3.12",
        ] {
            assert!(!sel(s).matches(&empty), "{s}");
        }
        assert!(!sel("unix:path:/usr/bin/python3.12").matches(&kernel_thread_like));
        assert!(!sel(&format!("unix:sha256:{EXE_HASH}")).matches(&kernel_thread_like));
    }

    #[test]
    fn cgroup_and_systemd_selectors_match_the_cgroup() {
        let cgroup = host_cgroup();
        let s = Subject {
            cgroup: &cgroup,
            process: None,
            pod: None,
            container: None,
        };
        check(
            &s,
            "cgroup:path:/system.slice/agent-*.service",
            "cgroup:path:/system.slice/other-*.service",
        );
        check(&s, "cgroup:path:/**", "cgroup:path:/*");
        check(
            &s,
            "cgroup:path:/system.slice/agent-{research,ops}.service",
            "cgroup:path:/system.slice/agent-?.service",
        );
        check(
            &s,
            "systemd:unit:agent-research.service",
            "systemd:unit:system.slice",
        );
    }

    #[test]
    fn literal_patterns_match_as_their_compiled_glob_would() {
        let paths = [
            "/idgate.slice/web",
            "/idgate.slice/web/",
            "/idgate.slice/web/x",
            "/idgate.slice/web2",
            "/idgate.slice/WEB",
            "/idgate.slice",
            "",
        ];
        for pattern in [
            "/idgate.slice/web",
            "/idgate.slice/we\\b",
            "/idgate.slice/we?",
        ] {
            let ours = parse_glob(pattern).unwrap();
            assert_eq!(ours.matcher.is_none(), pattern == "/idgate.slice/web");
            let compiled = ours.glob().compile_matcher();
            for path in paths {
                assert_eq!(
                    ours.is_match(path),
                    compiled.is_match(path),
                    "{pattern} on {path:?}"
                );
            }
        }
        assert!(
            parse_glob("/idgate.slice/web")
                .unwrap()
                .is_match("/idgate.slice/web")
        );
        assert_eq!(
            format!("{:?}", parse_glob("/a/*").unwrap()),
            "CgroupGlob(\"/a/*\")"
        );
    }

    #[test]
    fn glob_star_stays_within_one_component() {
        let nested = CgroupFacts::new("/system.slice/agent-x.service/worker".into(), vec![]);
        let s = Subject {
            cgroup: &nested,
            process: None,
            pod: None,
            container: None,
        };
        check(
            &s,
            "cgroup:path:/system.slice/agent-*.service/**",
            "cgroup:path:/system.slice/agent-*",
        );
        // The unit of a nested cgroup is the service it sits in.
        check(&s, "systemd:unit:agent-x.service", "systemd:unit:worker");
    }

    #[test]
    fn k8s_selectors_match_the_pod_and_container() {
        let cgroup = pod_cgroup();
        let pod = pod();
        let s = Subject {
            cgroup: &cgroup,
            process: None,
            pod: Some(&pod),
            container: Some(&pod.containers[0]),
        };
        check(&s, "k8s:ns:payments", "k8s:ns:default");
        check(&s, "k8s:sa:checkout", "k8s:sa:default");
        check(
            &s,
            "k8s:pod-name:checkout-7d9f8c6b5-x2k4q",
            "k8s:pod-name:checkout",
        );
        check(
            &s,
            &format!("k8s:pod-uid:{POD_UID}"),
            "k8s:pod-uid:0d6e9c5a-3f2b-4c1e-9a7d-5b8e2f1c4a91",
        );
        check(
            &s,
            "k8s:pod-label:app.kubernetes.io/name:checkout",
            "k8s:pod-label:app.kubernetes.io/name:cart",
        );
        check(&s, "k8s:pod-label:tier:", "k8s:pod-label:missing:");
        check(
            &s,
            "k8s:container-name:server",
            "k8s:container-name:sidecar",
        );
        check(
            &s,
            "k8s:container-image:registry.example.com/payments/checkout:1.4.2",
            "k8s:container-image:registry.example.com/payments/checkout:1.4.1",
        );
        assert!(
            sel("k8s:container-image:registry.example.com/payments/checkout@sha256:ab12")
                .matches(&s)
        );
    }

    #[test]
    fn k8s_selectors_never_match_without_pod_or_container() {
        let cgroup = pod_cgroup();
        let pod = pod();
        let no_pod = Subject {
            cgroup: &cgroup,
            process: None,
            pod: None,
            container: None,
        };
        let no_container = Subject {
            pod: Some(&pod),
            ..no_pod
        };
        assert!(!sel("k8s:ns:payments").matches(&no_pod));
        assert!(!sel("k8s:pod-label:tier:").matches(&no_pod));
        assert!(sel("k8s:ns:payments").matches(&no_container));
        assert!(!sel("k8s:container-name:server").matches(&no_container));
        let no_sa = PodFacts {
            service_account: None,
            ..pod.clone()
        };
        assert!(!sel("k8s:sa:default").matches(&Subject {
            pod: Some(&no_sa),
            ..no_pod
        }));
    }

    #[test]
    fn selectors_print_as_written() {
        for s in [
            "unix:uid:0",
            "unix:gid:4294967295",
            "unix:user:nginx",
            "unix:group:www-data",
            "unix:path:/usr/bin/python3",
            &format!("unix:sha256:{EXE_HASH}"),
            "cgroup:path:/system.slice/agent-*.service",
            "systemd:unit:nginx.service",
            "k8s:ns:kube-system",
            "k8s:sa:default",
            "k8s:pod-name:web-0",
            &format!("k8s:pod-uid:{POD_UID}"),
            "k8s:pod-label:app:web",
            "k8s:container-name:app",
            "k8s:container-image:docker.io/library/nginx:1.25",
        ] {
            assert_eq!(sel(s).to_string(), s);
        }
    }

    #[test]
    fn parse_errors_name_the_selector_and_the_problem() {
        assert_eq!(problem("unix"), SelectorProblem::Shape);
        assert_eq!(problem("unix:uid"), SelectorProblem::Shape);
        assert_eq!(problem("unix:uid:"), SelectorProblem::EmptyValue);
        assert_eq!(
            problem("unix:pid:12"),
            SelectorProblem::UnknownKind("unix:pid".into())
        );
        assert_eq!(
            problem("docker:label:a:b"),
            SelectorProblem::UnknownKind("docker:label".into())
        );
        assert_eq!(
            problem("unix:uid:alice"),
            SelectorProblem::BadId("alice".into())
        );
        assert_eq!(problem("unix:uid:+1"), SelectorProblem::BadId("+1".into()));
        assert_eq!(
            problem("unix:gid:4294967296"),
            SelectorProblem::BadId("4294967296".into())
        );
        assert_eq!(problem("unix:path:python3"), SelectorProblem::RelativePath);
        assert_eq!(
            problem("unix:sha256:abcd"),
            SelectorProblem::Sha256Length(4)
        );
        assert_eq!(
            problem(&format!("unix:sha256:{}", "g".repeat(64))),
            SelectorProblem::Sha256Hex
        );
        assert_eq!(
            problem("cgroup:path:system.slice/*"),
            SelectorProblem::RelativeGlob
        );
        assert!(matches!(
            problem("cgroup:path:/system.slice/[a-.service"),
            SelectorProblem::Glob(_)
        ));
        assert_eq!(problem("k8s:pod-label:app"), SelectorProblem::Label);
        assert_eq!(problem("k8s:pod-label::web"), SelectorProblem::Label);

        let message = "unix:uid:alice"
            .parse::<Selector>()
            .unwrap_err()
            .to_string();
        assert_eq!(
            message,
            "selector \"unix:uid:alice\": \"alice\" is not a numeric id (0 to 4294967295)"
        );
        let message = "unix:pid:1".parse::<Selector>().unwrap_err().to_string();
        assert!(message.contains("unknown kind \"unix:pid\""), "{message}");
        assert!(message.contains("k8s:container-image"), "{message}");
    }
}
