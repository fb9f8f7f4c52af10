//! OAuth 2.0 access tokens for credentials of kind `oauth`. The broker,
//! as an OAuth client, POSTs the identity's JWT-SVID to the rule's token
//! endpoint (as the subject token of an RFC 8693 token exchange, or as
//! the client assertion of a client credentials grant, RFC 7523) over its
//! pooled upstream connections, and keeps each identity's token for a
//! rule until shortly before it expires. Requests that want the same
//! token while it is fetched wait for that one fetch and share its
//! result. Neither the JWT-SVID nor a token ever goes into an error or a
//! log.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use tokio::sync::OnceCell;

use super::broker::Broker;
use super::upstream::{UpBody, one_line};
use crate::identity::SpiffeId;
use crate::policy::{OAuthClient, OAuthGrant};

/// The most of a token endpoint's answer that is read.
const MAX_ANSWER: usize = 64 * 1024;
/// A token is used until a tenth of its life is left...
const MARGIN_SHARE: u32 = 10;
/// ...or 30 seconds, whichever is less.
const MAX_MARGIN: Duration = Duration::from_secs(30);
/// How long a token is used whose answer did not say how long it lives.
const UNSTATED_LIFE: Duration = Duration::from_secs(60);
/// The most characters of an endpoint's `error` and `error_description`
/// that are shown.
const MAX_ERROR_TEXT: usize = 200;

const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Whose token, got how.
type Key = (SpiffeId, Arc<OAuthClient>);
/// One fetch of a token, and then its result; shared by the requests
/// that wait for it.
type Flight = Arc<OnceCell<Result<Token, TokenError>>>;

/// The access tokens of every identity and `oauth` credential, each the
/// result of its latest fetch (or the fetch under way).
#[derive(Default)]
pub(super) struct Tokens {
    flights: Mutex<HashMap<Key, Flight>>,
}

/// An access token as the broker sends it.
#[derive(Clone)]
struct Token {
    /// `Bearer <access token>`, marked sensitive.
    value: HeaderValue,
    /// Fetched again from then on.
    use_until: Instant,
}

/// Why there is no access token: shown to the workload and put in
/// records, so never with the JWT-SVID or a token in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum TokenError {
    #[error("no JWT-SVID for {id}: {why}")]
    NoJwtSvid { id: SpiffeId, why: String },
    #[error("token endpoint {endpoint}: {why}")]
    Unreachable { endpoint: String, why: String },
    #[error("token endpoint {endpoint} answered {status}: {error}")]
    Refused {
        endpoint: String,
        status: u16,
        error: String,
    },
    #[error("token endpoint {endpoint} answered {status} without a usable token: {why}")]
    Unusable {
        endpoint: String,
        status: u16,
        why: String,
    },
    #[error("token endpoint {endpoint} gave no token within {}", humantime::format_duration(*.timeout))]
    TimedOut { endpoint: String, timeout: Duration },
}

impl TokenError {
    /// The status the workload gets: 504 for a timeout, else 502.
    pub(super) fn status(&self) -> StatusCode {
        match self {
            Self::TimedOut { .. } => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

impl Tokens {
    /// The `authorization` value of `id`'s requests under `client`: the
    /// token kept from an earlier fetch while it is fresh, else one
    /// fetched now (or by a request that asked first), all within the
    /// broker's upstream timeout.
    pub(super) async fn bearer(
        &self,
        broker: &Broker,
        id: &SpiffeId,
        client: &Arc<OAuthClient>,
    ) -> Result<HeaderValue, TokenError> {
        let key = (id.clone(), client.clone());
        let getting = async {
            let flight = self.flight(&key);
            let result = flight.get_or_init(|| fetch(broker, id, client)).await;
            if result.is_err() {
                self.forget(&key, &flight);
            }
            result.clone()
        };
        let result = match tokio::time::timeout(broker.upstream_timeout, getting).await {
            Ok(result) => result.map(|t| t.value),
            Err(_) => Err(TokenError::TimedOut {
                endpoint: client.token_endpoint.to_string(),
                timeout: broker.upstream_timeout,
            }),
        };
        if let Err(e) = &result {
            tracing::warn!(identity = %id, error = %e, "no OAuth access token");
        }
        result
    }

    /// The flight of `key`: the one under way or holding a fresh token,
    /// else a new one (and flights with neither go).
    fn flight(&self, key: &Key) -> Flight {
        let now = Instant::now();
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(flight) = flights.get(key)
            && usable(flight, now)
        {
            return flight.clone();
        }
        flights.retain(|_, f| usable(f, now));
        let flight = Flight::default();
        flights.insert(key.clone(), flight.clone());
        flight
    }

    /// Forgets `flight` of `key`, which failed, unless a newer one took
    /// its place: the next request fetches again.
    fn forget(&self, key: &Key, flight: &Flight) {
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        if flights.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            flights.remove(key);
        }
    }
}

/// Whether a flight is under way or holds a token that is still fresh.
fn usable(flight: &Flight, now: Instant) -> bool {
    match flight.get() {
        None => true,
        Some(Ok(token)) => token.use_until > now,
        Some(Err(_)) => false,
    }
}

/// Gets a token for `id` from `client`'s token endpoint.
async fn fetch(broker: &Broker, id: &SpiffeId, client: &OAuthClient) -> Result<Token, TokenError> {
    let endpoint = client.token_endpoint.to_string();
    let jwt = broker
        .directory
        .jwt_svid(id, &client.audience)
        .await
        .map_err(|e| TokenError::NoJwtSvid {
            id: id.clone(),
            why: one_line(&*e),
        })?;
    let body: UpBody = Full::new(Bytes::from(form(client, &jwt)))
        .map_err(|never| match never {})
        .boxed();
    let mut request = Request::new(body);
    *request.method_mut() = Method::POST;
    *request.uri_mut() = client.token_endpoint.clone();
    request.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-www-form-urlencoded"),
    );
    request
        .headers_mut()
        .insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    let unreachable = |why: String| TokenError::Unreachable {
        endpoint: endpoint.clone(),
        why,
    };
    let response = broker
        .upstreams
        .send(request, false)
        .await
        .map_err(|e| unreachable(one_line(&e)))?;
    let status = response.status();
    let answer = Limited::new(response.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                unreachable(format!("its answer is longer than {MAX_ANSWER} bytes"))
            } else {
                unreachable(format!("reading its answer: {}", one_line(&*e)))
            }
        })?
        .to_bytes();
    let (value, expires_in) = read_answer(&endpoint, status, &answer, &jwt)?;
    tracing::debug!(identity = %id, %endpoint, ?expires_in, "OAuth access token fetched");
    Ok(Token {
        value,
        use_until: Instant::now() + kept_for(expires_in),
    })
}

/// The body of the token request for `client`, presenting `jwt`.
fn form(client: &OAuthClient, jwt: &str) -> String {
    let mut form = form_urlencoded::Serializer::new(String::new());
    match client.grant {
        OAuthGrant::TokenExchange => {
            form.append_pair("grant_type", TOKEN_EXCHANGE);
            form.append_pair("subject_token", jwt);
            form.append_pair("subject_token_type", JWT_TOKEN_TYPE);
        }
        OAuthGrant::ClientCredentials => {
            form.append_pair("grant_type", "client_credentials");
            form.append_pair("client_assertion_type", JWT_BEARER_ASSERTION);
            form.append_pair("client_assertion", jwt);
        }
    }
    for (name, value) in [
        ("client_id", &client.client_id),
        ("scope", &client.scope),
        ("resource", &client.resource),
        ("audience", &client.token_audience),
    ] {
        if let Some(v) = value {
            form.append_pair(name, v);
        }
    }
    form.finish()
}

/// The `authorization` value and the lifetime a token endpoint's answer
/// gives, or what is wrong with it. `jwt`, the assertion sent, is kept
/// out of what an error quotes from the answer.
fn read_answer(
    endpoint: &str,
    status: StatusCode,
    answer: &[u8],
    jwt: &str,
) -> Result<(HeaderValue, Option<Duration>), TokenError> {
    let object = serde_json::from_slice::<serde_json::Value>(answer)
        .ok()
        .and_then(|v| match v {
            serde_json::Value::Object(o) => Some(o),
            _ => None,
        });
    if !status.is_success() {
        let text = |key: &str| {
            object
                .as_ref()
                .and_then(|o| o.get(key)?.as_str())
                .map(|s| quotable(s, jwt))
        };
        let error = match (text("error"), text("error_description")) {
            (Some(e), Some(d)) => format!("{e}: {d}"),
            (Some(e), None) => e,
            (None, _) => "its answer names no OAuth error".to_owned(),
        };
        return Err(TokenError::Refused {
            endpoint: endpoint.to_owned(),
            status: status.as_u16(),
            error,
        });
    }
    let unusable = |why: String| TokenError::Unusable {
        endpoint: endpoint.to_owned(),
        status: status.as_u16(),
        why,
    };
    let Some(object) = object else {
        return Err(unusable("its answer is not a JSON object".into()));
    };
    match object.get("token_type").and_then(|t| t.as_str()) {
        Some(t) if t.eq_ignore_ascii_case("bearer") => {}
        Some(t) => {
            let t = quotable(t, jwt);
            return Err(unusable(format!("its token_type is {t:?}, not Bearer")));
        }
        None => return Err(unusable("it has no token_type".into())),
    }
    let Some(token) = object.get("access_token").and_then(|t| t.as_str()) else {
        return Err(unusable("it has no access_token".into()));
    };
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(unusable(
            "its access_token is empty or not printable ASCII".into(),
        ));
    }
    let expires_in = match object.get("expires_in") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(
            seconds(v)
                .ok_or_else(|| unusable("its expires_in is not a number of seconds".into()))?,
        ),
    };
    let mut value = HeaderValue::try_from(format!("Bearer {token}"))
        .map_err(|_| unusable("its access_token is not a header value".into()))?;
    value.set_sensitive(true);
    Ok((value, expires_in))
}

/// A JSON number of seconds (some endpoints send it as a string).
fn seconds(v: &serde_json::Value) -> Option<Duration> {
    let n = match v {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    Duration::try_from_secs_f64(n).ok()
}

/// How long a token that lives `expires_in` is used: its life less a
/// tenth of it, or less 30 seconds when that is less; 60 seconds when
/// the endpoint did not say.
fn kept_for(expires_in: Option<Duration>) -> Duration {
    match expires_in {
        Some(life) => life - (life / MARGIN_SHARE).min(MAX_MARGIN),
        None => UNSTATED_LIFE,
    }
}

/// Text from a token endpoint's answer as it may be shown: `jwt` (were
/// it echoed) and control characters taken out, at most
/// [`MAX_ERROR_TEXT`] characters.
fn quotable(s: &str, jwt: &str) -> String {
    let s = if jwt.is_empty() {
        s.to_owned()
    } else {
        s.replace(jwt, "[the JWT-SVID]")
    };
    let mut out: String = s
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_ERROR_TEXT)
        .collect();
    if s.chars().filter(|c| !c.is_control()).count() > MAX_ERROR_TEXT {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENDPOINT: &str = "https://sts.example.com/token";
    const JWT: &str = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzcGlmZmUifQ.c2lnbmF0dXJl";

    fn client(grant: OAuthGrant) -> OAuthClient {
        OAuthClient {
            token_endpoint: ENDPOINT.parse().unwrap(),
            grant,
            audience: vec!["https://sts.example.com".into()],
            scope: None,
            resource: None,
            token_audience: None,
            client_id: None,
        }
    }

    fn pairs(form: &str) -> Vec<(String, String)> {
        form_urlencoded::parse(form.as_bytes())
            .into_owned()
            .collect()
    }

    fn read(status: u16, answer: &str) -> Result<(HeaderValue, Option<Duration>), TokenError> {
        read_answer(
            ENDPOINT,
            StatusCode::from_u16(status).unwrap(),
            answer.as_bytes(),
            JWT,
        )
    }

    #[test]
    fn the_token_exchange_form_presents_the_jwt_as_subject_token() {
        let form = form(&client(OAuthGrant::TokenExchange), JWT);
        assert_eq!(
            pairs(&form),
            [
                ("grant_type".into(), TOKEN_EXCHANGE.into()),
                ("subject_token".into(), JWT.into()),
                ("subject_token_type".into(), JWT_TOKEN_TYPE.into()),
            ]
        );
        assert!(
            form.starts_with(
                "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&"
            )
        );
    }

    #[test]
    fn the_client_credentials_form_presents_the_jwt_as_client_assertion() {
        let c = OAuthClient {
            scope: Some("read write".into()),
            resource: Some("https://api.example.com/".into()),
            token_audience: Some("api".into()),
            client_id: Some("idgate&co".into()),
            ..client(OAuthGrant::ClientCredentials)
        };
        let form = form(&c, JWT);
        assert_eq!(
            pairs(&form),
            [
                ("grant_type".into(), "client_credentials".into()),
                ("client_assertion_type".into(), JWT_BEARER_ASSERTION.into()),
                ("client_assertion".into(), JWT.into()),
                ("client_id".into(), "idgate&co".into()),
                ("scope".into(), "read write".into()),
                ("resource".into(), "https://api.example.com/".into()),
                ("audience".into(), "api".into()),
            ]
        );
        assert!(form.contains("&scope=read+write&"), "{form}");
        assert!(form.contains("client_id=idgate%26co"), "{form}");
    }

    #[test]
    fn a_bearer_answer_gives_the_header_and_lifetime() {
        let (value, life) = read(
            200,
            r#"{"access_token":"at-1.x_y~z+/=","token_type":"bearer","expires_in":300,"scope":"x"}"#,
        )
        .unwrap();
        assert_eq!(value, "Bearer at-1.x_y~z+/=");
        assert!(value.is_sensitive());
        assert_eq!(life, Some(Duration::from_secs(300)));
        let (_, life) = read(
            200,
            r#"{"access_token":"a","token_type":"Bearer","expires_in":"3599"}"#,
        )
        .unwrap();
        assert_eq!(life, Some(Duration::from_secs(3599)));
        let (_, life) = read(200, r#"{"access_token":"a","token_type":"BEARER"}"#).unwrap();
        assert_eq!(life, None);
    }

    #[test]
    fn unusable_answers_say_why_without_the_token() {
        for (answer, why) in [
            ("not json", "its answer is not a JSON object"),
            ("[1]", "its answer is not a JSON object"),
            (r#"{"access_token":"secret-tok"}"#, "it has no token_type"),
            (
                r#"{"access_token":"secret-tok","token_type":"mac"}"#,
                "its token_type is \"mac\", not Bearer",
            ),
            (r#"{"token_type":"Bearer"}"#, "it has no access_token"),
            (
                r#"{"access_token":"secret tok","token_type":"Bearer"}"#,
                "its access_token is empty or not printable ASCII",
            ),
            (
                r#"{"access_token":"secret-tok","token_type":"Bearer","expires_in":-5}"#,
                "its expires_in is not a number of seconds",
            ),
            (
                r#"{"access_token":"secret-tok","token_type":"Bearer","expires_in":"soon"}"#,
                "its expires_in is not a number of seconds",
            ),
        ] {
            let e = read(200, answer).unwrap_err().to_string();
            assert_eq!(
                e,
                format!("token endpoint {ENDPOINT} answered 200 without a usable token: {why}"),
                "{answer}"
            );
            assert!(!e.contains("secret"), "{e}");
        }
    }

    #[test]
    fn an_error_answer_names_the_status_and_the_oauth_error() {
        let e = read(
            401,
            r#"{"error":"invalid_client","error_description":"bad aud"}"#,
        )
        .unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            e.to_string(),
            format!("token endpoint {ENDPOINT} answered 401: invalid_client: bad aud")
        );
        let e = read(400, r#"{"error":"invalid_grant"}"#).unwrap_err();
        assert!(
            e.to_string().ends_with("answered 400: invalid_grant"),
            "{e}"
        );
        let e = read(503, "<html>down</html>").unwrap_err();
        assert!(
            e.to_string()
                .ends_with("answered 503: its answer names no OAuth error"),
            "{e}"
        );
        // An echoed assertion, control characters and length are cut.
        let long = "x".repeat(500);
        let answer = serde_json::json!({
            "error": "invalid_grant",
            "error_description": format!("bad token {JWT}\n{long}"),
        })
        .to_string();
        let e = read(400, &answer).unwrap_err().to_string();
        assert!(!e.contains(JWT) && !e.contains('\n'), "{e}");
        assert!(e.contains("bad token [the JWT-SVID]xxx"), "{e}");
        assert!(e.ends_with("x..."), "{e}");
        assert!(e.len() < 400, "{e}");
    }

    #[test]
    fn a_token_is_kept_until_shortly_before_it_expires() {
        let s = Duration::from_secs;
        assert_eq!(kept_for(Some(s(300))), s(270));
        assert_eq!(kept_for(Some(s(3600))), s(3570));
        assert_eq!(kept_for(Some(s(10))), s(9));
        assert_eq!(kept_for(Some(s(0))), s(0));
        assert_eq!(kept_for(None), s(60));
    }
}
