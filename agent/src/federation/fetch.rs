//! Fetching foreign trust domains' bundles from their bundle endpoints,
//! on their refresh hint, for as long as the agent runs.

use std::sync::Arc;
use std::time::Duration;

use super::FederationError;
use crate::svid::{Bundle, Credentials, ForeignDomain, Profile, tls};

/// The most a bundle may weigh.
const MAX_BUNDLE_BYTES: usize = 1 << 20;
/// The refresh interval when neither the configuration nor the bundle
/// gives one, as the specification recommends.
const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
/// How soon a failed fetch is tried again (at most).
const RETRY: Duration = Duration::from_secs(5);
/// The most one fetch may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Starts one fetch loop per foreign trust domain that has a URL.
pub fn run(creds: &Arc<Credentials>) {
    for f in &creds.config().federates_with {
        if f.url.is_some() {
            tokio::spawn(refresh_loop(f.clone(), creds.clone()));
        }
    }
}

async fn refresh_loop(f: ForeignDomain, creds: Arc<Credentials>) {
    loop {
        let hint = match tokio::time::timeout(TIMEOUT, fetch(&f, &creds)).await {
            Ok(Ok(bundle)) => {
                let hint = bundle.refresh_hint.map(Duration::from_secs);
                accept(&f, &creds, bundle);
                f.refresh.or(hint).unwrap_or(DEFAULT_REFRESH)
            }
            Ok(Err(e)) => {
                tracing::warn!(trust_domain = %f.trust_domain, url = ?f.url, error = %e, "bundle fetch failed; the last bundle stays");
                f.refresh.unwrap_or(DEFAULT_REFRESH).min(RETRY)
            }
            Err(_) => {
                tracing::warn!(trust_domain = %f.trust_domain, url = ?f.url, "bundle fetch timed out; the last bundle stays");
                RETRY
            }
        };
        tokio::time::sleep(hint.max(Duration::from_secs(1))).await;
    }
}

/// Takes a fetched bundle unless it is older (by sequence) than the one
/// held.
fn accept(f: &ForeignDomain, creds: &Credentials, bundle: Bundle) {
    let set = creds.bundle_set();
    let held = set.federated.get(&f.trust_domain);
    if held == Some(&bundle) {
        return;
    }
    if let (Some(old), Some(new)) = (held.and_then(|b| b.sequence), bundle.sequence)
        && new < old
    {
        tracing::warn!(trust_domain = %f.trust_domain, old, new, "fetched bundle is older than the one held; ignored");
        return;
    }
    let (x509, jwt, seq) = (
        bundle.x509_authorities.len(),
        bundle.jwt_authorities.len(),
        bundle.sequence,
    );
    match creds.set_federated(bundle) {
        Ok(()) => tracing::info!(
            trust_domain = %f.trust_domain,
            x509_authorities = x509,
            jwt_authorities = jwt,
            sequence = ?seq,
            "federated bundle updated"
        ),
        Err(e) => {
            tracing::error!(trust_domain = %f.trust_domain, error = %e, "cannot keep the federated bundle")
        }
    }
}

/// One fetch: TLS per the profile, `GET`, and the body read as a SPIFFE
/// bundle of the configured trust domain.
pub(super) async fn fetch(
    f: &ForeignDomain,
    creds: &Arc<Credentials>,
) -> Result<Bundle, FederationError> {
    let uri = f
        .uri()?
        .expect("only a foreign domain with a url is fetched");
    let config = match f.profile {
        Profile::HttpsSpiffe => {
            let id = f
                .endpoint_spiffe_id()?
                .expect("checked: https_spiffe has one");
            let source = creds.clone();
            let bundles: tls::BundleSource = Arc::new(move |td| {
                source
                    .bundle_set()
                    .get(td)
                    .map(|b| b.x509_authorities.clone())
            });
            tls::client_config(tls::SpiffeVerifier::exactly(bundles, vec![id]), None)?
        }
        Profile::HttpsWeb => {
            let roots = match &f.ca {
                Some(path) => crate::tls::roots_file(path)?,
                None => {
                    let mut roots = rustls::RootCertStore::empty();
                    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
                    roots
                }
            };
            rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth()
        }
    };
    let body = crate::tls::get(&uri, config, &[], MAX_BUNDLE_BYTES)
        .await
        .map_err(|source| FederationError::Fetch {
            url: uri.to_string(),
            source,
        })?;
    Ok(Bundle::from_json(&f.trust_domain, &body)?)
}
