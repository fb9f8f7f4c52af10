//! The Prometheus endpoint: `GET /metrics` in the OpenMetrics text format,
//! on a loopback address of its own, off unless configured. Each subsystem
//! registers its own metrics (`events::EventMetrics`, the daemon's).

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::CONTENT_TYPE;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use serde::Deserialize;

/// Errors in `[metrics]`, and errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("`metrics.address` must be a loopback address (127.0.0.0/8 or ::1), got {0}")]
    NotLoopback(SocketAddr),
    #[error("metrics address {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// `[metrics]` in the agent configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where `/metrics` is served, e.g. `127.0.0.1:9464`; a loopback
    /// address only. Default: none (no endpoint).
    pub address: Option<SocketAddr>,
}

impl MetricsConfig {
    /// Checks the values serde cannot.
    pub fn check(&self) -> Result<(), MetricsError> {
        match self.address {
            Some(a) if !a.ip().is_loopback() => Err(MetricsError::NotLoopback(a)),
            _ => Ok(()),
        }
    }

    /// Binds the listener, if one is configured. Call before anything is
    /// put in the kernel, so an address in use stops the agent cleanly.
    pub fn bind(&self) -> Result<Option<TcpListener>, MetricsError> {
        let Some(address) = self.address else {
            return Ok(None);
        };
        let err = |source| MetricsError::Listen { address, source };
        let listener = TcpListener::bind(address).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        Ok(Some(listener))
    }
}

/// Serves `registry` on `listener` for as long as the runtime runs.
pub fn serve(listener: TcpListener, registry: Arc<Registry>) -> Result<(), MetricsError> {
    let address = listener
        .local_addr()
        .map_err(|source| MetricsError::Listen {
            address: SocketAddr::from(([127, 0, 0, 1], 0)),
            source,
        })?;
    let listener = tokio::net::TcpListener::from_std(listener)
        .map_err(|source| MetricsError::Listen { address, source })?;
    tracing::info!(%address, "serving metrics");
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, most likely: wait, do not spin.
                    tracing::warn!(error = %e, "metrics listener");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let response = respond(&request, &registry);
                    async move { Ok::<_, Infallible>(response) }
                });
                if let Err(e) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(error = %e, "metrics connection");
                }
            });
        }
    });
    Ok(())
}

fn respond(request: &Request<Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    let response = Response::builder();
    let response = if request.method() == Method::GET && request.uri().path() == "/metrics" {
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, registry)
            .expect("encoding into a String");
        response
            .header(
                CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from(body)))
    } else {
        response
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::from_static(b"only GET /metrics here\n")))
    };
    response.expect("a response from valid parts")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_addresses() {
        let config = |a: &str| MetricsConfig {
            address: Some(a.parse().unwrap()),
        };
        assert!(config("127.0.0.1:9464").check().is_ok());
        assert!(config("[::1]:9464").check().is_ok());
        let e = config("0.0.0.0:9464").check().unwrap_err();
        assert!(matches!(e, MetricsError::NotLoopback(_)), "{e}");
        assert!(MetricsConfig::default().check().is_ok());
        assert!(MetricsConfig::default().bind().unwrap().is_none());
    }

    #[tokio::test]
    async fn serves_the_registry() {
        use prometheus_client::metrics::counter::Counter;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let mut registry = Registry::with_prefix("idgate");
        let counter = Counter::<u64>::default();
        registry.register("things", "Things", counter.clone());
        counter.inc_by(3);
        let listener = MetricsConfig {
            address: Some("127.0.0.1:0".parse().unwrap()),
        }
        .bind()
        .unwrap()
        .unwrap();
        let address = listener.local_addr().unwrap();
        serve(listener, Arc::new(registry)).unwrap();

        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(address).await.unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).await.unwrap();
            text
        };
        let text = get("/metrics").await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("idgate_things_total 3"), "{text}");
        assert!(get("/other").await.starts_with("HTTP/1.1 404"));
    }
}
