//! One request through the broker: checked against its connection (the
//! host it names must be the TLS server name, or pick a credential that
//! allows plain HTTP) and its credential's rules; the workload's copies of
//! the credential's header removed and the credential added; sent to the
//! host over a pooled connection; the response streamed back unbuffered
//! (an upgrade spliced both ways); and recorded when its body ends.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;

use super::broker::Broker;
use super::record::{BrokerRecord, Outcome};
use super::rules::{request_host, same_host};
use super::upstream::{UpBody, one_line};
use super::view::{Credential, CredentialSource};
use super::{HTTP_PORT, TLS_PORT};
use crate::identity::SpiffeId;

/// A response body sent to the workload.
pub(super) type DownBody = BoxBody<Bytes, hyper::Error>;

/// What a request's connection says of it.
pub(super) struct Conn {
    /// The slot the kernel redirected the connection for.
    pub(super) slot: u32,
    /// The TLS server name; none on the plain HTTP listener.
    pub(super) sni: Option<String>,
}

/// The record of a request, filled as it goes.
struct Pending {
    broker: Arc<Broker>,
    record: BrokerRecord,
    start: Instant,
}

impl Pending {
    /// A response with `status` and `reason` (one line of plain text), and
    /// the record of it sent now.
    fn answer(mut self, status: StatusCode, outcome: Outcome) -> Response<DownBody> {
        let reason = match &outcome {
            Outcome::Refused(r) | Outcome::Failed(r) => r.clone(),
            Outcome::Forwarded | Outcome::Passthrough => String::new(),
        };
        tracing::debug!(status = status.as_u16(), %reason, "egress request not forwarded");
        self.record.status = Some(status.as_u16());
        self.record.outcome = outcome;
        self.record.duration = self.start.elapsed();
        self.broker.records.send(self.record);
        let mut response = Response::new(
            Full::new(Bytes::from(format!("idgate: {reason}\n")))
                .map_err(|never| match never {})
                .boxed(),
        );
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }
}

/// Serves one request of a connection.
pub(super) async fn handle(
    broker: Arc<Broker>,
    conn: Arc<Conn>,
    request: Request<Incoming>,
) -> Result<Response<DownBody>, Infallible> {
    let pending = Pending {
        record: BrokerRecord {
            slot: Some(conn.slot),
            identity: None,
            host: None,
            sni: conn.sni.clone(),
            method: Some(request.method().to_string()),
            path: Some(request.uri().path().to_owned()),
            status: None,
            bytes_up: 0,
            bytes_down: 0,
            duration: Default::default(),
            credential: None,
            outcome: Outcome::Forwarded,
            at: SystemTime::now(),
        },
        broker,
        start: Instant::now(),
    };
    Ok(forward(pending, &conn, request).await)
}

async fn forward(
    mut pending: Pending,
    conn: &Conn,
    mut request: Request<Incoming>,
) -> Response<DownBody> {
    let refuse =
        |pending: Pending, status, reason: String| pending.answer(status, Outcome::Refused(reason));
    let broker = pending.broker.clone();
    let Some((id, credentials)) = broker.directory.identity(conn.slot) else {
        let reason = "no identity is bound to this workload".to_owned();
        return refuse(pending, StatusCode::FORBIDDEN, reason);
    };
    pending.record.identity = Some(id.clone());
    if request.method() == Method::CONNECT {
        let reason = "CONNECT is not allowed through the credential broker".to_owned();
        return refuse(pending, StatusCode::METHOD_NOT_ALLOWED, reason);
    }
    let default_port = if conn.sni.is_some() {
        TLS_PORT
    } else {
        HTTP_PORT
    };
    let host = match request_host(request.uri(), request.headers(), default_port) {
        Ok(host) => host,
        Err(reason) => return refuse(pending, StatusCode::BAD_REQUEST, reason),
    };
    pending.record.host = Some(host.clone());
    let credential = match &conn.sni {
        Some(sni) => {
            if !same_host(&host, sni) {
                let reason = format!("host {host} is not the TLS server name {sni}");
                return refuse(pending, StatusCode::MISDIRECTED_REQUEST, reason);
            }
            credentials.iter().find(|c| same_host(&c.host, &host))
        }
        None => credentials
            .iter()
            .find(|c| c.http && same_host(&c.host, &host)),
    };
    let Some(credential) = credential else {
        let over = if conn.sni.is_some() {
            ""
        } else {
            " over plain HTTP"
        };
        let reason = format!("{id} has no credential for {host}{over}");
        return refuse(pending, StatusCode::FORBIDDEN, reason);
    };
    pending.record.credential = Some(credential.name.clone());
    if let Err(reason) = credential.allows(request.method(), request.uri().path()) {
        return refuse(pending, StatusCode::FORBIDDEN, reason);
    }
    let value = match credential_value(&broker, &id, credential).await {
        Ok(v) => v,
        Err((status, reason)) => return pending.answer(status, Outcome::Failed(reason)),
    };

    let upgrade = request.version() == Version::HTTP_11 && wants_upgrade(request.headers());
    let workload_side = upgrade.then(|| hyper::upgrade::on(&mut request));
    let up_count = Arc::new(AtomicU64::new(0));
    let (mut parts, body) = request.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    parts.headers.remove(header::HOST);
    remove_all(&mut parts.headers, credential.source.header());
    parts
        .headers
        .insert(credential.source.header().clone(), value);
    let (scheme, port) = match conn.sni {
        Some(_) => ("https", broker.upstream_ports.tls),
        None => ("http", broker.upstream_ports.http),
    };
    let port = if port == default_port {
        String::new()
    } else {
        format!(":{port}")
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = match format!("{scheme}://{}{port}{path}", credential.host).parse() {
        Ok(uri) => uri,
        Err(e) => {
            let reason = format!("the request's path does not make a URI: {e}");
            return refuse(pending, StatusCode::BAD_REQUEST, reason);
        }
    };
    parts.version = Version::HTTP_11;
    let body: UpBody = Counted {
        inner: body,
        count: up_count.clone(),
        finish: None,
    }
    .boxed();
    let sending = broker
        .upstreams
        .send(Request::from_parts(parts, body), upgrade);
    let mut response = match tokio::time::timeout(broker.upstream_timeout, sending).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => {
            let reason = format!("upstream {}: {}", credential.host, one_line(&e));
            return pending.answer(StatusCode::BAD_GATEWAY, Outcome::Failed(reason));
        }
        Err(_) => {
            let reason = format!(
                "upstream {} did not answer within {}",
                credential.host,
                humantime::format_duration(broker.upstream_timeout)
            );
            return pending.answer(StatusCode::GATEWAY_TIMEOUT, Outcome::Failed(reason));
        }
    };
    pending.record.status = Some(response.status().as_u16());
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    if let (true, Some(workload_side)) = (switching, workload_side) {
        let upstream_side = hyper::upgrade::on(&mut response);
        tokio::spawn(splice(workload_side, upstream_side, pending));
        let (parts, _) = response.into_parts();
        return Response::from_parts(
            parts,
            http_body_util::Empty::new().map_err(|n| match n {}).boxed(),
        );
    }
    strip_hop_by_hop(response.headers_mut(), false);
    let down = Arc::new(AtomicU64::new(0));
    let finish = Finish {
        pending: Some(pending),
        up: up_count,
        down: down.clone(),
    };
    response.map(|body| {
        Counted {
            inner: body,
            count: down,
            finish: Some(finish),
        }
        .boxed()
    })
}

/// The credential's header value: the secret with its prefix, or a bearer
/// JWT-SVID. Errors are a status and a reason that holds no secret.
async fn credential_value(
    broker: &Broker,
    id: &SpiffeId,
    credential: &Credential,
) -> Result<HeaderValue, (StatusCode, String)> {
    match &credential.source {
        CredentialSource::Header {
            secret_file,
            prefix,
            ..
        } => broker
            .secrets
            .get(secret_file)
            .and_then(|s| s.header_value(prefix, secret_file))
            .map_err(|e| {
                tracing::error!(credential = %credential.name, error = %e, "credential not usable");
                let reason = format!("credential {} cannot be used now: {e}", credential.name);
                (StatusCode::INTERNAL_SERVER_ERROR, reason)
            }),
        CredentialSource::JwtSvid { audience } => {
            let fetching = broker.directory.jwt_svid(id, audience);
            let failed = |why: String| {
                let reason = format!(
                    "credential {}: no JWT-SVID for {id}: {why}",
                    credential.name
                );
                (StatusCode::BAD_GATEWAY, reason)
            };
            let jwt = match tokio::time::timeout(broker.upstream_timeout, fetching).await {
                Ok(Ok(jwt)) => jwt,
                Ok(Err(e)) => return Err(failed(one_line(&*e))),
                Err(_) => return Err(failed("timed out".into())),
            };
            let mut value = HeaderValue::try_from(format!("Bearer {jwt}"))
                .map_err(|_| failed("not a header value".into()))?;
            value.set_sensitive(true);
            Ok(value)
        }
        CredentialSource::OAuth(client) => broker
            .tokens
            .bearer(broker, id, client)
            .await
            .map_err(|e| (e.status(), format!("credential {}: {e}", credential.name))),
    }
}

/// Whether an HTTP/1.1 request asks to upgrade the connection
/// (`Connection: upgrade` and an `Upgrade` header).
fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes the hop-by-hop headers (RFC 9110 section 7.6.1) and those
/// `Connection` names; `Connection: upgrade` and `Upgrade` stay when
/// `upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<header::HeaderName> = connection_tokens(headers)
        .filter(|t| !(upgrade && t.eq_ignore_ascii_case("upgrade")))
        .filter_map(|t| header::HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named {
        remove_all(headers, &name);
    }
    for name in [
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ] {
        remove_all(headers, &name);
    }
    for name in ["keep-alive", "proxy-connection"] {
        headers.remove(name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        remove_all(headers, &header::CONNECTION);
        remove_all(headers, &header::UPGRADE);
    }
}

fn remove_all(headers: &mut HeaderMap, name: &header::HeaderName) {
    while headers.remove(name).is_some() {}
}

/// Splices an upgraded connection both ways, and records it when it ends.
async fn splice(
    workload: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    mut pending: Pending,
) {
    let (up, down) = match tokio::try_join!(workload, upstream) {
        Ok((w, u)) => {
            let (mut w, mut u) = (TokioIo::new(w), TokioIo::new(u));
            tokio::io::copy_bidirectional(&mut w, &mut u)
                .await
                .unwrap_or((0, 0))
        }
        Err(e) => {
            tracing::debug!(error = %e, "egress upgrade failed");
            (0, 0)
        }
    };
    pending.record.bytes_up = up;
    pending.record.bytes_down = down;
    pending.record.duration = pending.start.elapsed();
    pending.broker.records.send(pending.record);
}

/// Sends a forwarded request's record when its response body is done (or
/// dropped), with the bytes counted both ways.
struct Finish {
    pending: Option<Pending>,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
}

impl Drop for Finish {
    fn drop(&mut self) {
        if let Some(mut p) = self.pending.take() {
            p.record.bytes_up = self.up.load(Ordering::Relaxed);
            p.record.bytes_down = self.down.load(Ordering::Relaxed);
            p.record.duration = p.start.elapsed();
            p.broker.records.send(p.record);
        }
    }
}

/// A body passed through frame by frame, counting its data bytes.
struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
    /// Dropped with the body: the record goes out then.
    finish: Option<Finish>,
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
            }
            Poll::Ready(None) => {
                // The end: record now, not when the connection lets go.
                self.finish.take();
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
