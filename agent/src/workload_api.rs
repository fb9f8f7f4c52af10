//! The SPIFFE Workload API on a Unix socket that every local process may
//! connect to (as SPIRE's): gRPC (tonic), the caller identified by the
//! kernel (SO_PEERCRED pid -> its cgroup -> the binding the kernel
//! enforces), so a workload is issued credentials for exactly the
//! identity its connects are judged by.

mod authority;
mod caller;
pub mod proto;
mod service;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint, Server};

use crate::identity_view::IdentityView;
use crate::svid::Credentials;
use proto::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use proto::spiffe_workload_api_server::SpiffeWorkloadApiServer;

pub use service::{HEADER, MAX_AUDIENCE_BYTES, MAX_AUDIENCES};

/// The largest request message accepted (a JWT-SVID to validate is the
/// largest a client sends).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Concurrent streams on one connection.
const MAX_STREAMS_PER_CONNECTION: u32 = 32;

/// Errors serving or calling the Workload API.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadApiError {
    #[error("Workload API socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("Workload API: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Binds the socket, world-connectable (0666), replacing a stale one.
/// Call before anything is put in the kernel.
pub fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener, WorkloadApiError> {
    let io = |source| WorkloadApiError::Io {
        path: path.to_owned(),
        source,
    };
    let listener = crate::files::bind_unix_socket(path, 0o666).map_err(io)?;
    Ok(listener)
}

/// Serves the Workload API on `listener` for as long as the runtime runs.
pub fn spawn(
    listener: std::os::unix::net::UnixListener,
    creds: Arc<Credentials>,
    view: watch::Receiver<IdentityView>,
    cgroup_root: PathBuf,
) -> Result<(), WorkloadApiError> {
    let path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_owned))
        .unwrap_or_default();
    let listener =
        tokio::net::UnixListener::from_std(listener).map_err(|source| WorkloadApiError::Io {
            path: path.clone(),
            source,
        })?;
    let root = Arc::new(cgroup_root);
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener)
        .map(move |r| r.map(|stream| caller::Connection::new(stream, &root)));
    let service = SpiffeWorkloadApiServer::new(service::WorkloadApi { creds, view })
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    tracing::info!(socket = %path.display(), "serving the SPIFFE Workload API");
    tokio::spawn(async move {
        let served = Server::builder()
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .add_service(service)
            .serve_with_incoming(incoming)
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the Workload API server stopped");
        }
    });
    Ok(())
}

/// A client on the Workload API socket at `path`.
pub async fn connect(path: &Path) -> Result<SpiffeWorkloadApiClient<Channel>, WorkloadApiError> {
    let path = path.to_owned();
    // The URI is not used: every connection goes to the socket.
    let channel = Endpoint::from_static("http://workload.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await?;
    Ok(SpiffeWorkloadApiClient::new(channel))
}

/// A request with the security header set.
pub fn request<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert(HEADER, tonic::metadata::MetadataValue::from_static("true"));
    r
}
