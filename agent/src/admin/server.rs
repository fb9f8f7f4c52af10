//! The daemon's side of the control socket.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use tokio::sync::broadcast;

use super::AdminError;
use super::protocol::{EventLine, MAX_REQUEST_BYTES, Reply, Request, parse};
use crate::events::Line;
use crate::grants::Granter;

/// What a handler answers: one reply, or a reply followed by lines.
pub enum Response {
    Reply(Reply),
    /// The reply, then the `recent` lines and, with `live`, every later
    /// one, each that `keep` passes, until the caller goes away.
    Stream {
        reply: Reply,
        recent: Vec<Line>,
        live: Option<broadcast::Receiver<Line>>,
        keep: Box<dyn Fn(&str) -> bool + Send + Sync>,
    },
    /// The reply; once it is written (or could not be), `then` is told.
    Then {
        reply: Reply,
        then: tokio::sync::oneshot::Sender<()>,
    },
}

impl From<Reply> for Response {
    fn from(reply: Reply) -> Self {
        Response::Reply(reply)
    }
}

/// The kernel's credentials of a caller (SO_PEERCRED), and what they
/// allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    pub role: Role,
}

/// What a caller of the control socket may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything.
    Operator,
    /// Grant (and list, extend and revoke its own grants), nothing else;
    /// each grant at most this long (`[[grants.granters]]`).
    Granter { max_duration: Duration },
}

/// Who may use the control socket: root and the configured operators, and
/// the granters for grants only.
#[derive(Debug, Clone, Default)]
pub struct Authoriser {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    pub granters: Vec<Granter>,
}

/// Whether a caller with `uid`, `gid` and supplementary `groups` is one of
/// `uids` or in one of `gids`.
fn member(uids: &[u32], gids: &[u32], (uid, gid, groups): (u32, u32, &[u32])) -> bool {
    uids.contains(&uid) || gids.contains(&gid) || groups.iter().any(|g| gids.contains(g))
}

impl Authoriser {
    /// `groups` are the caller's supplementary groups. A caller that is
    /// several granters gets the longest of their durations.
    fn role(&self, uid: u32, gid: u32, groups: &[u32]) -> Option<Role> {
        let caller = (uid, gid, groups);
        if uid == 0 || member(&self.uids, &self.gids, caller) {
            return Some(Role::Operator);
        }
        self.granters
            .iter()
            .filter(|g| member(&g.uids, &g.gids, caller))
            .map(|g| g.max_duration)
            .max()
            .map(|max_duration| Role::Granter { max_duration })
    }
}

/// The supplementary groups the peer had when it connected
/// (SO_PEERGROUPS, Linux 4.13), so that an operator group works whether
/// it is a member's primary group or not.
fn peer_groups(stream: &UnixStream) -> std::io::Result<Vec<u32>> {
    use std::os::fd::AsRawFd;
    let mut groups = vec![0u32; 64];
    loop {
        let mut len = (groups.len() * size_of::<u32>()) as libc::socklen_t;
        // SAFETY: the buffer is `len` bytes of writable memory that
        // outlives the call, and the kernel writes at most `len` bytes.
        let r = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / size_of::<u32>();
        if r == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let err = std::io::Error::last_os_error();
        // ERANGE: the buffer was too small; `len` says how big it must be.
        if err.raw_os_error() != Some(libc::ERANGE) || n <= groups.len() {
            return Err(err);
        }
        groups.resize(n, 0);
    }
}

/// Binds the socket (mode 0600, or 0660 when operator groups are set) and
/// serves requests until the task is dropped, each connection on a task of
/// its own. A stale socket file from an earlier agent is replaced.
pub async fn serve<H, F>(path: &Path, auth: Authoriser, handler: H) -> Result<(), AdminError>
where
    H: Fn(Peer, Request) -> F + Send + Sync + 'static,
    F: Future<Output = Response> + Send,
{
    let io = |source| AdminError::Io {
        path: path.to_owned(),
        source,
    };
    let mode = if auth.gids.is_empty() { 0o600 } else { 0o660 };
    let listener = crate::files::bind_unix_socket(path, mode)
        .and_then(UnixListener::from_std)
        .map_err(io)?;
    let handler = Arc::new(handler);
    let auth = Arc::new(auth);
    loop {
        let (stream, _) = listener.accept().await.map_err(io)?;
        let (handler, auth) = (handler.clone(), auth.clone());
        tokio::spawn(async move {
            if let Err(e) = connection(stream, &auth, &*handler).await {
                tracing::debug!(error = %e, "control connection ended");
            }
        });
    }
}

async fn connection<H, F>(stream: UnixStream, auth: &Authoriser, handler: &H) -> std::io::Result<()>
where
    H: Fn(Peer, Request) -> F,
    F: Future<Output = Response>,
{
    let cred = stream.peer_cred()?;
    let (uid, gid, pid) = (cred.uid(), cred.gid(), cred.pid());
    let groups = peer_groups(&stream)?;
    let (read, mut write) = stream.into_split();
    let Some(role) = auth.role(uid, gid, &groups) else {
        tracing::warn!(
            uid,
            gid,
            ?groups,
            ?pid,
            "control socket: refused a caller that is not an operator"
        );
        let reply = Reply::error(format!(
            "permission denied: uid {uid} is not an operator of this agent"
        ));
        return send(&mut write, &reply).await;
    };
    let mut reader = BufReader::new(read).take(MAX_REQUEST_BYTES as u64 + 1);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).await?;
        if n == 0 {
            return Ok(());
        }
        if line.len() > MAX_REQUEST_BYTES || !line.ends_with(b"\n") {
            let reply = if line.len() > MAX_REQUEST_BYTES {
                Reply::error(format!("request larger than {MAX_REQUEST_BYTES} bytes"))
            } else {
                Reply::error("request not terminated by a newline")
            };
            tracing::warn!(
                uid,
                ?pid,
                "control socket: {}",
                reply.error.as_deref().unwrap_or("")
            );
            return send(&mut write, &reply).await;
        }
        reader.set_limit(MAX_REQUEST_BYTES as u64 + 1);
        let response = match parse(&line) {
            Ok(request) => {
                tracing::info!(uid, ?pid, ?request, "control request");
                handler(
                    Peer {
                        uid,
                        gid,
                        pid,
                        role,
                    },
                    request,
                )
                .await
            }
            Err(message) => {
                tracing::warn!(uid, ?pid, %message, "control socket: bad request");
                Reply::error(message).into()
            }
        };
        match response {
            Response::Reply(reply) => send(&mut write, &reply).await?,
            Response::Then { reply, then } => {
                let sent = send(&mut write, &reply).await;
                let _ = then.send(());
                return sent;
            }
            Response::Stream {
                reply,
                recent,
                live,
                keep,
            } => return send_stream(&mut write, &reply, recent, live, keep).await,
        }
    }
}

/// Sends the reply and the lines; ends when the caller goes away (a write
/// fails) or, without `live`, after the recent lines.
async fn send_stream(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    reply: &Reply,
    recent: Vec<Line>,
    live: Option<broadcast::Receiver<Line>>,
    keep: Box<dyn Fn(&str) -> bool + Send + Sync>,
) -> std::io::Result<()> {
    send(write, reply).await?;
    for line in recent.iter().filter(|l| keep(l)) {
        write_line(write, line).await?;
    }
    let Some(mut live) = live else {
        return Ok(());
    };
    loop {
        match live.recv().await {
            Ok(line) if keep(&line) => write_line(write, &line).await?,
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                let line = serde_json::to_string(&EventLine::Missed { missed })
                    .map_err(std::io::Error::other)?;
                write_line(write, &line).await?;
            }
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}

async fn write_line(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    line: &str,
) -> std::io::Result<()> {
    write.write_all(line.as_bytes()).await?;
    write.write_all(b"\n").await
}

async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, reply: &Reply) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    write.write_all(&bytes).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operators_come_before_granters_and_a_granter_gets_its_longest_duration() {
        let minutes = |m: u64| Duration::from_secs(60 * m);
        let auth = Authoriser {
            uids: vec![10],
            gids: vec![20],
            granters: vec![
                Granter {
                    uids: vec![10, 30],
                    gids: vec![],
                    max_duration: minutes(5),
                },
                Granter {
                    uids: vec![],
                    gids: vec![40],
                    max_duration: minutes(60),
                },
            ],
        };
        let granter = |m| {
            Some(Role::Granter {
                max_duration: minutes(m),
            })
        };
        assert_eq!(auth.role(0, 0, &[]), Some(Role::Operator));
        assert_eq!(auth.role(10, 99, &[]), Some(Role::Operator));
        assert_eq!(auth.role(99, 99, &[20]), Some(Role::Operator));
        assert_eq!(auth.role(30, 99, &[]), granter(5));
        assert_eq!(auth.role(30, 40, &[]), granter(60));
        assert_eq!(auth.role(31, 99, &[40]), granter(60));
        assert_eq!(auth.role(31, 99, &[41]), None);
    }
}
