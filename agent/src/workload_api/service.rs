//! The Workload API's methods, per the SPIFFE Workload API and Workload
//! Endpoint specifications: the `workload.spiffe.io: true` header or
//! InvalidArgument; a caller without identity gets PermissionDenied;
//! streams send the full state at once and again whenever it changes (a
//! renewal before half an SVID's lifetime, a bundle or CA change, a new
//! binding) and end with PermissionDenied when the identity goes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::caller::{Caller, CallerInfo, Unidentified};
use super::proto::spiffe_workload_api_server::SpiffeWorkloadApi;
use super::proto::*;
use crate::identity::SpiffeId;
use crate::identity_view::IdentityView;
use crate::svid::{BundleSet, Credentials, JwtError, Parts, SvidError};

/// The security header every request carries.
pub const HEADER: &str = "workload.spiffe.io";
/// How often a stream looks at its caller's cgroup again (a process may
/// move) besides reacting to every view change.
const RECHECK: Duration = Duration::from_secs(1);
/// Most audiences in one JWT-SVID request, and the longest one.
pub const MAX_AUDIENCES: usize = 16;
pub const MAX_AUDIENCE_BYTES: usize = 512;

/// The service: credentials and the enforced identities.
#[derive(Clone)]
pub struct WorkloadApi {
    pub creds: Arc<Credentials>,
    pub view: watch::Receiver<IdentityView>,
}

type Stream<T> = ReceiverStream<Result<T, Status>>;

fn check_header<T>(request: &Request<T>) -> Result<(), Status> {
    match request.metadata().get(HEADER) {
        Some(v) if v == "true" => Ok(()),
        _ => Err(Status::invalid_argument(format!(
            "the security header `{HEADER}: true` is missing"
        ))),
    }
}

fn caller_of<T>(request: &Request<T>) -> Result<Arc<Caller>, Status> {
    request
        .extensions()
        .get::<CallerInfo>()
        .and_then(|c| c.0.clone())
        .ok_or_else(|| Status::permission_denied("the caller could not be identified"))
}

fn denied(caller: &Caller, why: Unidentified, method: &str) -> Status {
    tracing::info!(pid = caller.pid, uid = caller.uid, method, reason = %why, "Workload API: no identity for the caller");
    Status::permission_denied(format!("no identity issued: {why}"))
}

fn issue_error(e: SvidError) -> Status {
    match e {
        SvidError::NoAuthority(_) => Status::permission_denied(e.to_string()),
        e => {
            tracing::error!(error = %e, "Workload API: issuing failed");
            Status::unavailable(format!("cannot issue now: {e}"))
        }
    }
}

/// The key of a trust domain in the Workload API's bundle maps.
fn td_key(td: &str) -> String {
    format!("spiffe://{td}")
}

impl WorkloadApi {
    /// The caller's identity now, or the error the specification says.
    fn identify(&self, caller: &Caller, method: &str) -> Result<SpiffeId, Status> {
        caller
            .identity(&self.view.borrow())
            .map_err(|why| denied(caller, why, method))
    }

    /// Starts a stream that sends `build`'s message for the caller's
    /// identity now and again whenever it differs, until the caller goes
    /// or loses its identity (then PermissionDenied).
    fn stream<M, F>(&self, caller: Arc<Caller>, method: &'static str, build: F) -> Stream<M>
    where
        M: PartialEq + Clone + Send + 'static,
        F: Fn(&SpiffeId, &BundleSet, SystemTime) -> Result<(M, Option<SystemTime>), Status>
            + Send
            + 'static,
    {
        let (tx, rx) = mpsc::channel(2);
        let mut view = self.view.clone();
        let mut bundles = self.creds.bundles();
        tokio::spawn(async move {
            let mut last: Option<M> = None;
            loop {
                let identity = caller.identity(&view.borrow_and_update());
                let id = match identity {
                    Ok(id) => id,
                    Err(Unidentified::Gone) => return,
                    Err(why) => {
                        let _ = tx.send(Err(denied(&caller, why, method))).await;
                        return;
                    }
                };
                let set = bundles.borrow_and_update().clone();
                let now = SystemTime::now();
                let (message, wake) = match build(&id, &set, now) {
                    Ok(v) => v,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                if last.as_ref() != Some(&message) {
                    if tx.send(Ok(message.clone())).await.is_err() {
                        return;
                    }
                    tracing::debug!(pid = caller.pid, identity = %id, method, "Workload API: update sent");
                    last = Some(message);
                }
                let wait = wake
                    .map(|w| w.duration_since(now).unwrap_or_default())
                    .unwrap_or(RECHECK)
                    .min(RECHECK);
                tokio::select! {
                    r = view.changed() => if r.is_err() { return },
                    r = bundles.changed() => if r.is_err() { return },
                    () = tokio::time::sleep(wait) => {}
                    () = tx.closed() => return,
                }
            }
        });
        ReceiverStream::new(rx)
    }
}

/// The X.509-SVID message of `id`.
fn x509_response(
    creds: &Credentials,
    id: &SpiffeId,
    set: &BundleSet,
    now: SystemTime,
) -> Result<(X509svidResponse, Option<SystemTime>), Status> {
    let svid = creds.x509_svid(id, now).map_err(issue_error)?;
    let td = id.trust_domain();
    let bundle = set
        .local
        .get(td)
        .ok_or_else(|| Status::unavailable(format!("no bundle for {td} yet")))?;
    let federated_bundles = set
        .for_workload(td)
        .filter(|b| b.trust_domain != td)
        .map(|b| (td_key(&b.trust_domain), b.x509_der()))
        .collect();
    let message = X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: id.to_string(),
            x509_svid: svid.chain.concat(),
            x509_svid_key: svid.key.clone(),
            bundle: bundle.x509_der(),
            hint: String::new(),
        }],
        crl: Vec::new(),
        federated_bundles,
    };
    Ok((message, Some(svid.renew_at)))
}

/// The bundles a workload of `id`'s trust domain gets, encoded.
fn bundles_of(
    set: &BundleSet,
    id: &SpiffeId,
    encode: impl Fn(&crate::svid::Bundle) -> Result<Vec<u8>, SvidError>,
) -> Result<HashMap<String, Vec<u8>>, Status> {
    set.for_workload(id.trust_domain())
        .map(|b| Ok((td_key(&b.trust_domain), encode(b).map_err(issue_error)?)))
        .collect()
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = Stream<X509svidResponse>;
    type FetchX509BundlesStream = Stream<X509BundlesResponse>;
    type FetchJWTBundlesStream = Stream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&request)?;
        let caller = caller_of(&request)?;
        let id = self.identify(&caller, "FetchX509SVID")?;
        tracing::info!(pid = caller.pid, identity = %id, "Workload API: FetchX509SVID");
        let creds = self.creds.clone();
        Ok(Response::new(self.stream(
            caller,
            "FetchX509SVID",
            move |id, set, now| x509_response(&creds, id, set, now),
        )))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&request)?;
        let caller = caller_of(&request)?;
        self.identify(&caller, "FetchX509Bundles")?;
        Ok(Response::new(self.stream(
            caller,
            "FetchX509Bundles",
            |id, set, _| {
                let bundles = bundles_of(set, id, |b| Ok(b.x509_der()))?;
                Ok((
                    X509BundlesResponse {
                        crl: Vec::new(),
                        bundles,
                    },
                    None,
                ))
            },
        )))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        check_header(&request)?;
        let caller = caller_of(&request)?;
        let req = request.get_ref();
        if req.audience.is_empty() {
            return Err(Status::invalid_argument(
                "`audience` must name at least one audience",
            ));
        }
        if req.audience.len() > MAX_AUDIENCES {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_AUDIENCES} audiences"
            )));
        }
        if let Some(a) = req
            .audience
            .iter()
            .find(|a| a.is_empty() || a.len() > MAX_AUDIENCE_BYTES)
        {
            return Err(Status::invalid_argument(format!(
                "an audience is 1 to {MAX_AUDIENCE_BYTES} bytes, got {}",
                a.len()
            )));
        }
        let wanted = match req.spiffe_id.as_str() {
            "" => None,
            s => Some(
                s.parse::<SpiffeId>()
                    .map_err(|e| Status::invalid_argument(format!("`spiffe_id`: {e}")))?,
            ),
        };
        let id = self.identify(&caller, "FetchJWTSVID")?;
        if wanted.as_ref().is_some_and(|w| *w != id) {
            return Err(Status::permission_denied(format!(
                "the caller is not entitled to {}",
                req.spiffe_id
            )));
        }
        let (token, _) = self
            .creds
            .jwt_svid(&id, &req.audience, SystemTime::now())
            .map_err(issue_error)?;
        tracing::info!(pid = caller.pid, identity = %id, audience = ?req.audience, "Workload API: JWT-SVID issued");
        Ok(Response::new(JwtsvidResponse {
            svids: vec![Jwtsvid {
                spiffe_id: id.to_string(),
                svid: token,
                hint: String::new(),
            }],
        }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&request)?;
        let caller = caller_of(&request)?;
        self.identify(&caller, "FetchJWTBundles")?;
        Ok(Response::new(self.stream(
            caller,
            "FetchJWTBundles",
            |id, set, _| {
                let bundles = bundles_of(set, id, |b| Ok(b.to_json(Parts::Jwt)?.into_bytes()))?;
                Ok((JwtBundlesResponse { bundles }, None))
            },
        )))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_header(&request)?;
        let caller = caller_of(&request)?;
        let req = request.get_ref();
        if req.audience.is_empty() {
            return Err(Status::invalid_argument("`audience` must be set"));
        }
        if req.svid.is_empty() {
            return Err(Status::invalid_argument("`svid` must be set"));
        }
        self.identify(&caller, "ValidateJWTSVID")?;
        let valid = self
            .creds
            .validate_jwt(&req.svid, &req.audience, SystemTime::now())
            .map_err(|e: JwtError| {
                tracing::info!(pid = caller.pid, error = %e, "Workload API: JWT-SVID refused");
                Status::invalid_argument(format!("invalid JWT-SVID: {e}"))
            })?;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: valid.id.to_string(),
            claims: Some(to_struct(valid.claims)),
        }))
    }
}

/// JSON claims as a protobuf Struct.
fn to_struct(map: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}

fn to_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        J::String(s) => Kind::StringValue(s),
        J::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        J::Object(o) => Kind::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}
