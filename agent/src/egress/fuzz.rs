//! Bounded fuzzing of what the broker reads from workloads before any
//! well-kept crate's parser takes over: the ClientHello peek (fed
//! mutations of a real ClientHello and arbitrary bytes), the host a
//! request names, and the path rules. A fixed number of cases each, so
//! the suite stays bounded.

use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method, Uri, header};
use proptest::prelude::*;

use super::hello::read_hello;
use super::rules::request_host;
use super::view::{Credential, CredentialSource};

/// A real ClientHello for `name`, as rustls' client sends it.
fn client_hello(name: &str) -> Vec<u8> {
    let roots = rustls::RootCertStore::empty();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut client =
        rustls::ClientConnection::new(Arc::new(config), name.to_owned().try_into().unwrap())
            .unwrap();
    let mut out = Vec::new();
    client.write_tls(&mut out).unwrap();
    out
}

fn peek(bytes: &[u8]) -> Option<Option<String>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut reader = bytes;
    runtime
        .block_on(read_hello(&mut reader))
        .ok()
        .map(|h| h.sni)
}

fn credential(paths: &[&str]) -> Credential {
    Credential {
        name: "api".into(),
        host: "api.example.com".into(),
        source: CredentialSource::JwtSvid {
            audience: vec!["a".into()],
        },
        methods: vec![Method::GET],
        paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        http: false,
    }
}

#[test]
fn the_peek_reads_the_name_of_a_real_client_hello() {
    let hello = client_hello("api.example.com");
    assert_eq!(peek(&hello), Some(Some("api.example.com".into())));
    // Split anywhere, the same.
    assert_eq!(peek(&hello[..hello.len() - 1]), None);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// Mutated ClientHellos: the peek ends (no panic, no wait for more
    /// than it was given), and a name it reads is one the bytes hold.
    #[test]
    fn mutated_client_hellos(
        changes in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        cut in any::<usize>(),
    ) {
        let mut bytes = client_hello("api.example.com");
        for (at, b) in changes {
            let n = bytes.len();
            bytes[at % n] = b;
        }
        let keep = bytes.len() - cut % bytes.len();
        bytes.truncate(keep.max(1));
        if let Some(Some(name)) = peek(&bytes) {
            prop_assert!(
                bytes.windows(name.len()).any(|w| w.eq_ignore_ascii_case(name.as_bytes())),
                "{name}"
            );
        }
    }

    #[test]
    fn arbitrary_first_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = peek(&bytes);
    }

    /// Whatever the Host header and URI say, the host found is one name,
    /// lowercase, without a port, user information or trailing dot, and
    /// the Host header names it.
    #[test]
    fn request_hosts(host in "[ -~]{0,40}", absolute in any::<bool>()) {
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&host) {
            headers.insert(header::HOST, v);
        }
        let uri: Uri = if absolute {
            format!("https://{host}/x").parse().unwrap_or_else(|_| Uri::from_static("/x"))
        } else {
            Uri::from_static("/x")
        };
        if let Ok(found) = request_host(&uri, &headers, 443) {
            prop_assert_eq!(found.to_ascii_lowercase(), found.clone());
            prop_assert!(!found.contains('@') && !found.ends_with('.'));
            prop_assert!(!found.contains(':') || found.starts_with('['), "{}", found);
            prop_assert!(host.to_ascii_lowercase().contains(&found), "{} in {}", found, host);
        }
    }

    /// A path the rules allow is under a listed prefix on a segment
    /// boundary, and holds nothing a server may read as another path.
    #[test]
    fn paths(path in "/[a-z0-9%./\\\\]{0,30}") {
        let c = credential(&["/v1/models"]);
        if c.allows(&Method::GET, &path).is_ok() {
            prop_assert!(path == "/v1/models" || path.starts_with("/v1/models/"), "{}", path);
            let decoded = path.to_ascii_lowercase().replace("%2e", ".");
            prop_assert!(!decoded.split('/').any(|s| s == ".." || s == "."), "{}", path);
            prop_assert!(!decoded.contains("%2f") && !decoded.contains('\\'), "{}", path);
        }
    }
}
