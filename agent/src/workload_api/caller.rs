//! Who is calling: the peer process of a Workload API connection, from
//! the kernel's SO_PEERCRED, held by a pidfd so a recycled pid is never
//! mistaken for it, and its identity: the binding of the cgroup it is in
//! *now*.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::server::Connected;

use super::authority::Rewriting;
use crate::identity::SpiffeId;
use crate::identity_view::IdentityView;

/// The calling process.
#[derive(Debug)]
pub struct Caller {
    pub pid: i32,
    pub uid: u32,
    pidfd: OwnedFd,
    cgroup_root: Arc<PathBuf>,
}

/// Why a caller has no identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unidentified {
    #[error("the caller's cgroup is bound to no identity (or its identity is revoked)")]
    Unbound,
    #[error("the calling process has exited")]
    Gone,
}

impl Caller {
    /// The peer of a freshly accepted connection.
    pub fn of(stream: &UnixStream, cgroup_root: Arc<PathBuf>) -> std::io::Result<Self> {
        let cred = stream.peer_cred()?;
        let pid = cred.pid().filter(|p| *p > 0).ok_or_else(|| {
            std::io::Error::other("the peer's pid is unknown (another pid namespace?)")
        })?;
        let pidfd = peer_pidfd(stream).or_else(|_| pidfd_open(pid))?;
        Ok(Self {
            pid,
            uid: cred.uid(),
            pidfd,
            cgroup_root,
        })
    }

    /// The identity the caller has now, by the cgroup it is in now.
    pub fn identity(&self, view: &IdentityView) -> Result<SpiffeId, Unidentified> {
        let cgroup = self.cgroup_id();
        // Read first, then check the process is still the one we hold:
        // alive means its pid was not reused in between.
        if !self.alive() {
            return Err(Unidentified::Gone);
        }
        cgroup
            .and_then(|id| view.identity_of(id).cloned())
            .ok_or(Unidentified::Unbound)
    }

    fn cgroup_id(&self) -> Option<u64> {
        let text = std::fs::read_to_string(format!("/proc/{}/cgroup", self.pid)).ok()?;
        let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
        cgroup_dir_id(&self.cgroup_root, path)
    }

    fn alive(&self) -> bool {
        // SAFETY: signal 0 through a pidfd we own only checks the process.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                0,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            ) == 0
        }
    }
}

/// The id of the cgroup at `path` (as `/proc/PID/cgroup` writes it) under
/// the cgroup v2 mount.
fn cgroup_dir_id(root: &Path, path: &str) -> Option<u64> {
    if path.ends_with(" (deleted)") {
        return None;
    }
    crate::cgroup::cgroup_id(&root.join(path.trim_start_matches('/'))).ok()
}

/// SO_PEERPIDFD (Linux 6.5): the peer's pidfd from the kernel, taken when
/// it connected, so no pid reuse can come between.
fn peer_pidfd(stream: &UnixStream) -> std::io::Result<OwnedFd> {
    const SO_PEERPIDFD: libc::c_int = 77;
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a getsockopt writing one int into `fd`.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 || fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel gave us this new descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// pidfd_open(2), for kernels without SO_PEERPIDFD.
fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel gave us this new descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// An accepted connection, its `:authority` made acceptable, and its
/// caller (none when the caller could not be told: every call on it is
/// refused).
pub struct Connection {
    stream: Rewriting<UnixStream>,
    caller: Option<Arc<Caller>>,
}

impl Connection {
    pub fn new(stream: UnixStream, cgroup_root: &Arc<PathBuf>) -> Self {
        let caller = match Caller::of(&stream, cgroup_root.clone()) {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => {
                tracing::warn!(error = %e, "Workload API: cannot tell who is calling; refusing its calls");
                None
            }
        };
        Self {
            stream: Rewriting::new(stream),
            caller,
        }
    }
}

/// What the handlers learn of the connection.
#[derive(Debug, Clone)]
pub struct CallerInfo(pub Option<Arc<Caller>>);

impl Connected for Connection {
    type ConnectInfo = CallerInfo;

    fn connect_info(&self) -> CallerInfo {
        CallerInfo(self.caller.clone())
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn identifies_a_live_peer_by_its_cgroup_and_notices_it_is_gone() {
        let Ok(root) = crate::cgroup::cgroup2_root() else {
            crate::testing::cannot_run("this kernel has no cgroup v2 mount");
            return;
        };
        let (a, _b) = UnixStream::pair().unwrap();
        let caller = Caller::of(&a, Arc::new(root)).unwrap();
        assert_eq!(caller.pid as u32, std::process::id());
        let mine = caller.cgroup_id().expect("our own cgroup");
        let id: SpiffeId = "spiffe://example.org/me".parse().unwrap();
        let mut view = IdentityView::default();
        assert_eq!(caller.identity(&view), Err(Unidentified::Unbound));
        Arc::make_mut(&mut view.by_cgroup).insert(mine, id.clone());
        assert_eq!(caller.identity(&view), Ok(id));

        // A child that exits: its pidfd says so.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let fd = pidfd_open(child.id() as i32).unwrap();
        child.wait().unwrap();
        let gone = Caller {
            pid: child.id() as i32,
            uid: 0,
            pidfd: fd,
            cgroup_root: caller.cgroup_root.clone(),
        };
        assert_eq!(gone.identity(&view), Err(Unidentified::Gone));
    }
}
