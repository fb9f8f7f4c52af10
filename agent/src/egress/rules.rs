//! The checks of a request against the connection and its credential
//! rule: the host it names, its method and its path. Each refusal says
//! why, in words the workload is shown.

use http::{HeaderMap, Method, Uri, header};

use super::view::Credential;

/// Whether two host names are the same name (case and one trailing dot
/// aside).
pub(super) fn same_host(a: &str, b: &str) -> bool {
    a.trim_end_matches('.')
        .eq_ignore_ascii_case(b.trim_end_matches('.'))
}

/// The host a request names, by its URI's authority (HTTP/2's
/// `:authority`, or an HTTP/1 absolute form) and its `Host` header; both
/// must name the same host when both are there, with no port or
/// `default_port`. Lowercase, without a trailing dot.
pub(super) fn request_host(
    uri: &Uri,
    headers: &HeaderMap,
    default_port: u16,
) -> Result<String, String> {
    let mut found: Option<String> = None;
    let host_header = match headers.get_all(header::HOST).iter().collect::<Vec<_>>()[..] {
        [] => None,
        [one] => {
            let text = one
                .to_str()
                .map_err(|_| "the Host header is not text".to_owned())?;
            Some(
                text.parse::<http::uri::Authority>()
                    .map_err(|_| format!("the Host header {text:?} is not a host"))?,
            )
        }
        _ => return Err("more than one Host header".to_owned()),
    };
    for authority in uri.authority().into_iter().chain(host_header.as_ref()) {
        if authority.as_str().contains('@') {
            return Err(format!("{:?} has user information", authority.as_str()));
        }
        if let Some(port) = authority.port_u16()
            && port != default_port
        {
            return Err(format!(
                "{:?} names port {port}, not {default_port}",
                authority.as_str()
            ));
        }
        let host = authority.host().trim_end_matches('.').to_ascii_lowercase();
        match &found {
            Some(f) if *f != host => {
                return Err(format!("the request names two hosts: {f} and {host}"));
            }
            _ => found = Some(host),
        }
    }
    found.ok_or_else(|| "the request names no host (no Host header or :authority)".to_owned())
}

impl Credential {
    /// Whether the credential may be used for `method` on `path`; else
    /// why not.
    pub(super) fn allows(&self, method: &Method, path: &str) -> Result<(), String> {
        if !self.methods.is_empty() && !self.methods.contains(method) {
            return Err(format!(
                "method {method} is not allowed for credential {}",
                self.name
            ));
        }
        if self.paths.is_empty() {
            return Ok(());
        }
        if let Some(why) = ambiguous(path) {
            return Err(format!(
                "path {path} has {why}; credential {} has path rules",
                self.name
            ));
        }
        if self.paths.iter().any(|p| under(path, p)) {
            Ok(())
        } else {
            Err(format!(
                "path {path} is not allowed for credential {}",
                self.name
            ))
        }
    }
}

/// Whether `path` is `prefix` or below it.
fn under(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// What in `path` a server may read as a path other than the one the
/// prefixes were matched against: a `.` or `..` segment (also
/// percent-encoded), an encoded `/` or `\`, or a `\`.
fn ambiguous(path: &str) -> Option<&'static str> {
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || lower.contains('\\') {
        return Some("an encoded or backward slash");
    }
    let dot = lower.split('/').any(|segment| {
        let decoded = segment.replace("%2e", ".");
        decoded == "." || decoded == ".."
    });
    dot.then_some("a dot segment")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::egress::view::CredentialSource;

    fn host(uri: &str, hosts: &[&str], port: u16) -> Result<String, String> {
        let mut headers = HeaderMap::new();
        for h in hosts {
            headers.append(header::HOST, h.parse().unwrap());
        }
        request_host(&uri.parse().unwrap(), &headers, port)
    }

    #[test]
    fn the_host_of_a_request() {
        assert_eq!(
            host("/x", &["API.example.com"], 443).unwrap(),
            "api.example.com"
        );
        assert_eq!(
            host("/x", &["api.example.com.:443"], 443).unwrap(),
            "api.example.com"
        );
        assert_eq!(
            host("https://api.example.com/x", &[], 443).unwrap(),
            "api.example.com"
        );
        assert_eq!(
            host("https://api.example.com/x", &["api.example.com"], 443).unwrap(),
            "api.example.com"
        );
        for (uri, hosts, want) in [
            ("/x", &[][..], "no host"),
            ("/x", &["a.example.com:8443"][..], "port 8443"),
            (
                "/x",
                &["a.example.com", "b.example.com"][..],
                "more than one",
            ),
            (
                "https://a.example.com/x",
                &["b.example.com"][..],
                "two hosts",
            ),
            ("https://u@a.example.com/x", &[][..], "user information"),
        ] {
            let e = host(uri, hosts, 443).unwrap_err();
            assert!(e.contains(want), "{uri} {hosts:?}: {e}");
        }
        assert!(same_host("API.example.com.", "api.example.com"));
        assert!(!same_host("api.example.com", "api.example.co"));
    }

    #[test]
    fn methods_and_paths() {
        let c = Credential {
            name: Arc::from("anthropic"),
            host: Arc::from("api.anthropic.com"),
            source: CredentialSource::JwtSvid { audience: vec![] },
            methods: vec![Method::GET, Method::POST],
            paths: vec!["/v1/messages".into(), "/models/".into()],
            http: false,
        };
        c.allows(&Method::POST, "/v1/messages").unwrap();
        c.allows(&Method::POST, "/v1/messages/batches").unwrap();
        c.allows(&Method::GET, "/models/x").unwrap();
        for (m, p, want) in [
            (
                Method::DELETE,
                "/v1/messages",
                "method DELETE is not allowed for credential anthropic",
            ),
            (
                Method::GET,
                "/v1/messagesx",
                "path /v1/messagesx is not allowed",
            ),
            (Method::GET, "/models", "path /models is not allowed"),
            (Method::GET, "/v1/messages/../../admin", "dot segment"),
            (Method::GET, "/v1/messages/%2E%2e/admin", "dot segment"),
        ] {
            let e = c.allows(&m, p).unwrap_err();
            assert!(e.contains(want), "{m} {p}: {e}");
        }
        let any = Credential {
            methods: vec![],
            paths: vec![],
            ..c
        };
        any.allows(&Method::DELETE, "/anything/../x").unwrap();
    }
}
