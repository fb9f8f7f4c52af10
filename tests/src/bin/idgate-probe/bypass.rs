//! Ways around the cgroup socket hooks that the bypass tests try, each as
//! a real program would do it. Every function returns the kernel's answer.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::sys::socket::{SockaddrLike, SockaddrStorage};

fn check(ret: libc::c_long) -> std::io::Result<libc::c_long> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn socket(family: i32, kind: i32, protocol: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; the descriptor is owned from here on.
    let fd = check(unsafe { libc::socket(family, kind, protocol) }.into())?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn family(addr: &SocketAddr) -> i32 {
    match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    }
}

fn connect(fd: &OwnedFd, addr: &SocketAddr) -> std::io::Result<()> {
    let sa = SockaddrStorage::from(*addr);
    // SAFETY: `sa` is a valid sockaddr of `sa.len()` bytes.
    check(unsafe { libc::connect(fd.as_raw_fd(), sa.as_ptr(), sa.len()) }.into()).map(drop)
}

/// `socket(AF_INET, SOCK_RAW, IPPROTO_ICMP)`.
pub fn raw4() -> std::io::Result<()> {
    socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP).map(drop)
}

/// `socket(AF_PACKET, SOCK_RAW, ETH_P_ALL)`.
pub fn packet() -> std::io::Result<()> {
    socket(
        libc::AF_PACKET,
        libc::SOCK_RAW,
        (libc::ETH_P_ALL as u16).to_be() as i32,
    )
    .map(drop)
}

/// TCP Fast Open from `sendto(MSG_FASTOPEN)`: connects and sends at once.
pub fn tfo_sendto(addr: &SocketAddr) -> std::io::Result<()> {
    let fd = socket(family(addr), libc::SOCK_STREAM, 0)?;
    let sa = SockaddrStorage::from(*addr);
    // SAFETY: valid buffer and sockaddr.
    check(unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            b"idgate".as_ptr().cast(),
            6,
            libc::MSG_FASTOPEN,
            sa.as_ptr(),
            sa.len(),
        )
    } as libc::c_long)
    .map(drop)
}

/// TCP Fast Open with `TCP_FASTOPEN_CONNECT`: `connect` returns at once and
/// the SYN leaves with the first write.
pub fn tfo_connect(addr: &SocketAddr) -> std::io::Result<()> {
    let fd = socket(family(addr), libc::SOCK_STREAM, 0)?;
    let one: libc::c_int = 1;
    // SAFETY: a valid int option.
    check(
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_FASTOPEN_CONNECT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        }
        .into(),
    )?;
    connect(&fd, addr)?;
    // SAFETY: valid buffer.
    check(unsafe { libc::write(fd.as_raw_fd(), b"idgate".as_ptr().cast(), 6) } as libc::c_long)
        .map(drop)
}

/// An MPTCP socket's connect.
pub fn mptcp(addr: &SocketAddr) -> std::io::Result<()> {
    let fd = socket(family(addr), libc::SOCK_STREAM, libc::IPPROTO_MPTCP)?;
    connect(&fd, addr)
}

/// UDP: `connect`, then `send` on the connected socket.
pub fn udp_connect_send(addr: &SocketAddr) -> std::io::Result<()> {
    let fd = socket(family(addr), libc::SOCK_DGRAM, 0)?;
    connect(&fd, addr)?;
    // SAFETY: valid buffer.
    check(unsafe { libc::send(fd.as_raw_fd(), b"idgate".as_ptr().cast(), 6, 0) } as libc::c_long)
        .map(drop)
}

/// `connect` submitted through io_uring (IORING_OP_CONNECT).
pub fn uring_connect(addr: &SocketAddr) -> std::io::Result<()> {
    use io_uring::{IoUring, opcode, types};
    let fd = socket(family(addr), libc::SOCK_STREAM, 0)?;
    let sa = SockaddrStorage::from(*addr);
    let mut ring = IoUring::new(2)?;
    let sqe = opcode::Connect::new(types::Fd(fd.as_raw_fd()), sa.as_ptr(), sa.len()).build();
    // SAFETY: the sockaddr and the socket outlive the submission, which is
    // waited for below.
    unsafe { ring.submission().push(&sqe) }.map_err(std::io::Error::other)?;
    ring.submit_and_wait(1)?;
    let cqe = ring.completion().next().expect("a completion");
    if cqe.result() < 0 {
        Err(std::io::Error::from_raw_os_error(-cqe.result()))
    } else {
        Ok(())
    }
}

/// Takes hold of a pinned bpf link (`BPF_OBJ_GET`) and detaches it
/// (`BPF_LINK_DETACH`): what a workload would need to switch idgate off.
pub fn detach_pinned_link(pin: &str) -> std::io::Result<()> {
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let path = std::ffi::CString::new(pin).expect("no NUL");
    // bpf_attr for BPF_OBJ_GET: pathname (u64), bpf_fd, file_flags.
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64;
    // SAFETY: `attr` is a zeroed bpf_attr with the pathname set.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    })?;
    // SAFETY: the kernel gave us this descriptor.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut attr = [0u64; 16];
    attr[0] = link.as_raw_fd() as u64;
    // SAFETY: a zeroed bpf_attr with link_fd set.
    check(unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    })
    .map(drop)
}

/// A socket made now and used later, or passed to another process: which
/// cgroup judges its connect?
#[derive(Default)]
pub struct Held {
    socket: Option<OwnedFd>,
    listener: Option<std::os::unix::net::UnixListener>,
}

impl Held {
    /// `hold`: makes a TCP socket (of `addr`'s family) and keeps it.
    pub fn make(&mut self, addr: &SocketAddr) -> std::io::Result<()> {
        self.socket = Some(socket(family(addr), libc::SOCK_STREAM, 0)?);
        Ok(())
    }

    /// `connect-held`: connects the kept socket.
    pub fn connect(&mut self, addr: &SocketAddr) -> std::io::Result<()> {
        let fd = self
            .socket
            .take()
            .ok_or_else(|| std::io::Error::other("no socket held"))?;
        connect(&fd, addr)
    }

    /// `listen-fd PATH`: waits at a Unix socket for a passed descriptor.
    pub fn listen(&mut self, path: &str) -> std::io::Result<()> {
        self.listener = Some(std::os::unix::net::UnixListener::bind(path)?);
        Ok(())
    }

    /// `accept-fd`: takes the descriptor passed to the listener.
    pub fn accept(&mut self) -> std::io::Result<()> {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        let listener = self
            .listener
            .take()
            .ok_or_else(|| std::io::Error::other("not listening"))?;
        let (stream, _) = listener.accept()?;
        let mut buf = [0u8; 1];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )?;
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                // SAFETY: the kernel installed this descriptor for us.
                self.socket = Some(unsafe { OwnedFd::from_raw_fd(fds[0]) });
                return Ok(());
            }
        }
        Err(std::io::Error::other("no descriptor came"))
    }

    /// `send-held PATH`: passes the kept socket over SCM_RIGHTS.
    pub fn send(&mut self, path: &str) -> std::io::Result<()> {
        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        let fd = self
            .socket
            .take()
            .ok_or_else(|| std::io::Error::other("no socket held"))?;
        let stream = std::os::unix::net::UnixStream::connect(path)?;
        let fds = [fd.as_raw_fd()];
        let iov = [std::io::IoSlice::new(b"x")];
        sendmsg::<()>(
            stream.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )?;
        Ok(())
    }
}
