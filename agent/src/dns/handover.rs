//! A planned restart hands the resolver's sockets to the next agent: the
//! agent executes its binary again in the same process, and the sockets
//! stay open across `exec` (their descriptors named on the new command
//! line). They never close, so the kernel's socket hash keeps them, and
//! a query sent meanwhile waits in the socket until the new agent reads
//! it: no lookup fails.

use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::str::FromStr;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};

/// One namespace's sockets, as handed over.
#[derive(Debug)]
pub struct Handed {
    /// The namespace's inode (`/proc/PID/ns/net`).
    pub inode: u64,
    pub udp: OwnedFd,
    pub tcp: OwnedFd,
}

/// Every namespace's sockets.
#[derive(Debug, Default)]
pub struct Handover(pub Vec<Handed>);

/// A `--dns-listeners` value that cannot be taken.
#[derive(Debug, thiserror::Error)]
#[error("--dns-listeners {spec:?}: {why}")]
pub struct HandoverError {
    spec: String,
    why: String,
}

impl FromStr for Handover {
    type Err = HandoverError;

    /// `INODE:UDP_FD:TCP_FD,...`. Each descriptor must be an open socket
    /// of this process; it is owned (and closed with) what is returned.
    fn from_str(spec: &str) -> Result<Self, HandoverError> {
        let bad = |why: String| HandoverError {
            spec: spec.to_owned(),
            why,
        };
        let mut out = Vec::new();
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let fields: Vec<&str> = part.split(':').collect();
            let [inode, udp, tcp] = fields[..] else {
                return Err(bad(format!("{part:?} is not INODE:UDP_FD:TCP_FD")));
            };
            let number = |s: &str| s.parse::<u64>().map_err(|e| bad(format!("{s:?}: {e}")));
            let inode = number(inode)?;
            let fd = |s: &str| -> Result<OwnedFd, HandoverError> {
                let fd = RawFd::try_from(number(s)?).map_err(|e| bad(e.to_string()))?;
                if fd <= 2 || !is_socket(fd) {
                    return Err(bad(format!("descriptor {fd} is not an open socket")));
                }
                // SAFETY: an open descriptor of this process, named on its
                // command line by the agent that executed it, and owned by
                // nothing else here.
                Ok(unsafe { OwnedFd::from_raw_fd(fd) })
            };
            out.push(Handed {
                inode,
                udp: fd(udp)?,
                tcp: fd(tcp)?,
            });
        }
        Ok(Self(out))
    }
}

fn is_socket(fd: RawFd) -> bool {
    // SAFETY: fstat of a descriptor number into a zeroed buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    unsafe { libc::fstat(fd, &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFSOCK }
}

impl fmt::Display for Handover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|h| format!("{}:{}:{}", h.inode, h.udp.as_raw_fd(), h.tcp.as_raw_fd()))
            .collect();
        f.write_str(&parts.join(","))
    }
}

impl Handover {
    /// Lets every descriptor survive `exec`.
    pub fn keep_across_exec(&self) -> nix::Result<()> {
        for h in &self.0 {
            for fd in [&h.udp, &h.tcp] {
                fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))?;
            }
        }
        Ok(())
    }
}
