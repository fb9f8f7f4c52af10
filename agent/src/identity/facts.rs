//! Facts about workloads, read from the kernel: procfs for processes, the
//! cgroup v2 hierarchy for cgroups. Never from anything the workload says
//! or controls (environment, argv, files it can write).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Group, Uid, User};
use procfs::ProcError;
use procfs::process::Process;
use sha2::{Digest, Sha256};

use super::k8s::{PodCgroup, parse_cgroup_path};

/// Errors reading facts.
#[derive(Debug, thiserror::Error)]
pub enum FactsError {
    #[error("process {pid}: {source}")]
    Proc { pid: u32, source: ProcError },
    #[error("process {pid}: cannot hash its executable: {source}")]
    Exe { pid: u32, source: io::Error },
    #[error("process {pid}: no cgroup v2 line (`0::`) in /proc/{pid}/cgroup")]
    NoCgroup2 { pid: u32 },
    #[error("process {pid}: cannot look up the name of {what} {id}: {source}")]
    Name {
        pid: u32,
        what: &'static str,
        id: u32,
        source: nix::Error,
    },
    #[error("cgroup {}: {source}", path.display())]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("{} is not a cgroup under the cgroup v2 root {}", path.display(), root.display())]
    NotUnderRoot { path: PathBuf, root: PathBuf },
    #[error("cgroup {}: the path is not UTF-8", path.display())]
    NotUtf8 { path: PathBuf },
    #[error("cgroup {}: {line:?} in cgroup.procs is not a pid", path.display())]
    BadPid { path: PathBuf, line: String },
}

/// What the kernel says about one process.
///
/// Credentials are the thread group leader's, from `/proc/PID/status`.
/// Names are resolved in the agent's (the host's) user and group
/// databases, not the workload's own `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessFacts {
    pub pid: u32,
    /// Real user id.
    pub uid: u32,
    /// Effective user id.
    pub euid: u32,
    /// Real group id.
    pub gid: u32,
    /// Effective group id.
    pub egid: u32,
    /// The name of the real uid, if the host knows one.
    pub user: Option<String>,
    /// The name of the real gid, if the host knows one.
    pub group: Option<String>,
    /// The executable's path, as the kernel names the file that was
    /// hashed; ends in ` (deleted)` when the file was unlinked or replaced.
    /// `None` when the process has no executable to read (a kernel thread,
    /// or a process whose main thread has exited).
    pub exe: Option<PathBuf>,
    /// SHA-256 of the executable's content; `None` exactly when `exe` is.
    pub exe_sha256: Option<[u8; 32]>,
    /// The process's cgroup v2 path (the `0::` line of `/proc/PID/cgroup`).
    pub cgroup: String,
}

impl ProcessFacts {
    /// Reads the facts of a process. `Ok(None)` when the process is gone or
    /// is a zombie (a dead process that can no longer act).
    ///
    /// All reads go through one open `/proc/PID` directory, so a reused pid
    /// can't mix two processes' facts. The executable is opened through
    /// `/proc/PID/exe`, which reaches the very file the process runs even
    /// if its path now names another one, and its path is read back from
    /// the open file: the path and the hash are of the same file.
    pub fn read(pid: u32) -> Result<Option<ProcessFacts>, FactsError> {
        let proc_err = |source| FactsError::Proc { pid, source };
        let Some(process) = alive(Process::new(pid as i32)).map_err(proc_err)? else {
            return Ok(None);
        };
        // The executable first: if the process exits in between, the
        // status read below says so.
        let exe = match process.open_relative("exe") {
            Ok(file) => Some(hash_file(file).map_err(|source| FactsError::Exe { pid, source })?),
            // No executable: a kernel thread, or a leader that has exited.
            Err(ProcError::NotFound(_)) => None,
            Err(e) if is_gone(&e) => return Ok(None),
            Err(e) => return Err(proc_err(e)),
        };
        let Some(status) = alive(process.status()).map_err(proc_err)? else {
            return Ok(None);
        };
        // A zombie leader whose other threads still run shows `Z` too, but
        // with more than one thread: that one can still act and is kept.
        if status.state.starts_with('Z') && status.threads <= 1 {
            return Ok(None);
        }
        let Some(cgroups) = alive(process.cgroups()).map_err(proc_err)? else {
            return Ok(None);
        };
        let cgroup = cgroups
            .into_iter()
            .find(|c| c.hierarchy == 0 && c.controllers.is_empty())
            .map(|c| c.pathname)
            .ok_or(FactsError::NoCgroup2 { pid })?;
        let name_err = |what, id| {
            move |source| FactsError::Name {
                pid,
                what,
                id,
                source,
            }
        };
        let user = User::from_uid(Uid::from_raw(status.ruid))
            .map_err(name_err("uid", status.ruid))?
            .map(|u| u.name);
        let group = Group::from_gid(Gid::from_raw(status.rgid))
            .map_err(name_err("gid", status.rgid))?
            .map(|g| g.name);
        let (exe, exe_sha256) = exe.unzip();
        Ok(Some(ProcessFacts {
            pid,
            uid: status.ruid,
            euid: status.euid,
            gid: status.rgid,
            egid: status.egid,
            user,
            group,
            exe,
            exe_sha256,
            cgroup,
        }))
    }

    /// The systemd unit the process runs in, from its cgroup path.
    pub fn systemd_unit(&self) -> Option<&str> {
        systemd_unit(&self.cgroup)
    }
}

/// The path the kernel gives an open file, and the SHA-256 of its content.
fn hash_file(mut file: File) -> io::Result<(PathBuf, [u8; 32])> {
    let path = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    let key = FileKey::of(&file)?;
    if let Some(hash) = HASHES.lock().expect("hash cache").get(&key) {
        return Ok((path, *hash));
    }
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher)?;
    let hash: [u8; 32] = hasher.finalize().into();
    let mut cache = HASHES.lock().expect("hash cache");
    if cache.len() >= MAX_CACHED_HASHES {
        cache.clear();
    }
    cache.insert(key, hash);
    Ok((path, hash))
}

/// Executables hashed so far, so that attesting the same program again
/// reads only its metadata.
static HASHES: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<FileKey, [u8; 32]>>> =
    std::sync::LazyLock::new(Default::default);
const MAX_CACHED_HASHES: usize = 4096;

/// Which file, in which version: any write, truncation or replacement of
/// the content changes the inode's change time (ctime), which no user can
/// set back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    ctime: (i64, i64),
}

impl FileKey {
    fn of(file: &File) -> io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata()?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// A procfs result, with `None` when the process no longer exists.
fn alive<T>(result: Result<T, ProcError>) -> Result<Option<T>, ProcError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(e) if is_gone(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether a procfs error means the process no longer exists.
fn is_gone(e: &ProcError) -> bool {
    match e {
        ProcError::NotFound(_) => true,
        ProcError::Io(e, _) => e.raw_os_error() == Some(libc::ESRCH),
        _ => false,
    }
}

/// The systemd unit a cgroup path belongs to: its last component named
/// `*.service` or `*.scope` (a nested cgroup belongs to the unit above it).
pub fn systemd_unit(cgroup_path: &str) -> Option<&str> {
    cgroup_path
        .rsplit('/')
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
}

/// What the kernel says about one cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupFacts {
    /// The path relative to the cgroup v2 root, starting with `/` (the root
    /// itself is `/`): the form `/proc/PID/cgroup` uses.
    pub path: String,
    /// The processes in it (`cgroup.procs`) when it was read.
    pub pids: Vec<u32>,
    /// The Kubernetes pod (and container) it belongs to, from its path.
    pub pod: Option<PodCgroup>,
}

impl CgroupFacts {
    /// Facts for a cgroup path and the processes in it.
    pub fn new(path: String, pids: Vec<u32>) -> CgroupFacts {
        let pod = parse_cgroup_path(&path);
        CgroupFacts { path, pids, pod }
    }

    /// Reads the cgroup at `dir`, a directory under the cgroup v2 mount
    /// `root` (see [`crate::cgroup::cgroup2_root`]).
    pub fn read(root: &Path, dir: &Path) -> Result<CgroupFacts, FactsError> {
        let relative = dir
            .strip_prefix(root)
            .map_err(|_| FactsError::NotUnderRoot {
                path: dir.to_owned(),
                root: root.to_owned(),
            })?;
        let relative = relative.to_str().ok_or_else(|| FactsError::NotUtf8 {
            path: dir.to_owned(),
        })?;
        let procs = dir.join("cgroup.procs");
        let text = std::fs::read_to_string(&procs).map_err(|source| FactsError::Cgroup {
            path: procs.clone(),
            source,
        })?;
        let pids = text
            .lines()
            .map(|line| {
                line.parse().map_err(|_| FactsError::BadPid {
                    path: procs.clone(),
                    line: line.to_owned(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(CgroupFacts::new(format!("/{relative}"), pids))
    }

    /// The systemd unit the cgroup belongs to, from its path.
    pub fn systemd_unit(&self) -> Option<&str> {
        systemd_unit(&self.path)
    }

    /// Reads the facts of every process in the cgroup, leaving out those
    /// that have exited or moved to another cgroup since `pids` was read.
    /// Any other failure fails the whole read, so that a process that could
    /// not be judged never lets the cgroup pass.
    pub fn read_processes(&self) -> Result<Vec<ProcessFacts>, FactsError> {
        let mut facts = Vec::with_capacity(self.pids.len());
        for &pid in &self.pids {
            if let Some(process) = ProcessFacts::read(pid)?
                && process.cgroup == self.path
            {
                facts.push(process);
            }
        }
        Ok(facts)
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;
    use crate::cgroup::cgroup2_root;

    #[test]
    fn a_file_rewritten_in_place_is_hashed_anew_not_from_the_cache() {
        use std::io::Write;
        let path = std::env::temp_dir().join(format!("idgate-hash-{}", std::process::id()));
        std::fs::write(&path, b"first version").unwrap();
        let (_, first) = hash_file(File::open(&path).unwrap()).unwrap();
        assert_eq!(first, sha256_of(&path));
        // Same inode, same size, new content.
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all(b"other version").unwrap();
        drop(f);
        let (_, second) = hash_file(File::open(&path).unwrap()).unwrap();
        assert_eq!(second, sha256_of(&path));
        assert_ne!(first, second);
        std::fs::remove_file(&path).unwrap();
    }

    fn sha256_of(path: &Path) -> [u8; 32] {
        Sha256::digest(std::fs::read(path).unwrap()).into()
    }

    fn own_cgroup() -> String {
        let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("a 0:: line in /proc/self/cgroup")
            .to_owned()
    }

    #[test]
    fn reads_the_test_process() {
        let facts = ProcessFacts::read(std::process::id()).unwrap().unwrap();
        assert_eq!(facts.pid, std::process::id());
        assert_eq!(facts.uid, nix::unistd::getuid().as_raw());
        assert_eq!(facts.euid, nix::unistd::geteuid().as_raw());
        assert_eq!(facts.gid, nix::unistd::getgid().as_raw());
        assert_eq!(facts.egid, nix::unistd::getegid().as_raw());
        let me = User::from_uid(nix::unistd::getuid())
            .unwrap()
            .map(|u| u.name);
        assert_eq!(facts.user, me);
        let exe = std::env::current_exe().unwrap();
        assert_eq!(facts.exe.as_deref(), Some(exe.as_path()));
        assert_eq!(facts.exe_sha256, Some(sha256_of(&exe)));
        assert_eq!(facts.cgroup, own_cgroup());
    }

    /// The `sleep` executable, with every symlink resolved as the kernel
    /// names it.
    fn sleep_path() -> PathBuf {
        let found = std::env::split_paths(&std::env::var_os("PATH").unwrap())
            .map(|dir| dir.join("sleep"))
            .find(|p| p.is_file())
            .expect("sleep in PATH");
        std::fs::canonicalize(found).unwrap()
    }

    #[test]
    fn reads_a_spawned_child() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let facts = ProcessFacts::read(child.id());
        child.kill().unwrap();
        child.wait().unwrap();
        let facts = facts.unwrap().unwrap();
        let sleep = sleep_path();
        assert_eq!(facts.pid, child.id());
        assert_eq!(facts.uid, nix::unistd::getuid().as_raw());
        assert_eq!(facts.exe.as_deref(), Some(sleep.as_path()));
        assert_eq!(facts.exe_sha256, Some(sha256_of(&sleep)));
        assert_eq!(facts.cgroup, own_cgroup());
    }

    #[test]
    fn a_replaced_executable_is_hashed_as_it_runs() {
        let dir = std::env::temp_dir().join(format!("idgate-test-exe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("worker");
        std::fs::copy(sleep_path(), &exe).unwrap();
        // Another test thread forking while the copy was open for writing
        // can make exec fail with ETXTBSY for a moment.
        let mut child = (0..50)
            .find_map(|_| match Command::new(&exe).arg("30").spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    None
                }
                other => Some(other.unwrap()),
            })
            .expect("exec the copy");
        let impostor = dir.join("impostor");
        std::fs::write(&impostor, b"#!/bin/sh\n").unwrap();
        std::fs::rename(&impostor, &exe).unwrap();

        let facts = ProcessFacts::read(child.id());
        child.kill().unwrap();
        child.wait().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let facts = facts.unwrap().unwrap();
        let deleted = format!("{} (deleted)", exe.display());
        assert_eq!(facts.exe.as_deref(), Some(Path::new(&deleted)));
        assert_eq!(facts.exe_sha256, Some(sha256_of(&sleep_path())));
    }

    #[test]
    fn a_reaped_process_is_gone_and_a_zombie_is_left_out() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Not waited for yet: once it has exited it is a zombie.
        while std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap()
            .split_whitespace()
            .nth(2)
            != Some("Z")
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(ProcessFacts::read(pid).unwrap(), None);
        child.wait().unwrap();
        assert_eq!(ProcessFacts::read(pid).unwrap(), None);
    }

    #[test]
    fn systemd_unit_is_the_last_service_or_scope() {
        assert_eq!(systemd_unit("/"), None);
        assert_eq!(systemd_unit("/system.slice"), None);
        assert_eq!(
            systemd_unit("/system.slice/nginx.service"),
            Some("nginx.service")
        );
        assert_eq!(
            systemd_unit("/system.slice/nginx.service/workers"),
            Some("nginx.service")
        );
        assert_eq!(
            systemd_unit("/user.slice/user-1000.slice/user@1000.service/app.slice/app-x.scope"),
            Some("app-x.scope")
        );
    }

    /// A child cgroup of the v2 root holding one `sleep`; both go away on
    /// drop.
    struct Scratch {
        dir: PathBuf,
        child: std::process::Child,
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir(&self.dir);
        }
    }

    #[test]
    fn reads_a_cgroup_and_its_processes() {
        let Ok(root) = cgroup2_root() else {
            crate::testing::cannot_run("this kernel has no cgroup v2 mount");
            return;
        };
        let name = format!("idgate-test-facts-{}", std::process::id());
        let dir = root.join(&name);
        std::fs::create_dir(&dir).unwrap();
        let scratch = Scratch {
            dir,
            child: Command::new("sleep").arg("30").spawn().unwrap(),
        };
        let pid = scratch.child.id();
        std::fs::write(scratch.dir.join("cgroup.procs"), pid.to_string()).unwrap();

        let cgroup = CgroupFacts::read(&root, &scratch.dir).unwrap();
        assert_eq!(cgroup.path, format!("/{name}"));
        assert_eq!(cgroup.pids, [pid]);
        assert_eq!(cgroup.pod, None);
        let processes = cgroup.read_processes().unwrap();
        assert_eq!(processes.len(), 1);
        assert_eq!(processes[0].pid, pid);
        assert_eq!(processes[0].cgroup, cgroup.path);
        assert_eq!(processes[0].exe.as_deref(), Some(sleep_path().as_path()));

        // Moved out since `pids` was read: no longer this cgroup's.
        std::fs::write(root.join("cgroup.procs"), pid.to_string()).unwrap();
        assert_eq!(cgroup.read_processes().unwrap(), []);
        assert!(
            CgroupFacts::read(&root, &scratch.dir)
                .unwrap()
                .pids
                .is_empty()
        );

        let root_facts = CgroupFacts::read(&root, &root).unwrap();
        assert_eq!(root_facts.path, "/");
        let outside = CgroupFacts::read(&root, Path::new("/tmp")).unwrap_err();
        assert!(
            matches!(outside, FactsError::NotUnderRoot { .. }),
            "{outside}"
        );
    }
}
