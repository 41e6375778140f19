//! OCSP stapling, the I/O half: for each site whose leaf names a responder, POST the request over HTTP,
//! have `portcullis_certs::ocsp::check` verify the answer, and swap in the same certificate with the
//! response stapled. Refreshed half way through the response's validity; on failure retried with backoff
//! while the last good response keeps being stapled until it expires. A certificate without a responder is
//! served without a staple, and without a warning. Every swap here is a compare-and-swap against the
//! certificate it was built from: a reload or an ACME renewal that lands meanwhile always wins. The task
//! holds its site's `SiteCert`, not a place in a site set: it goes on across config reloads that keep the
//! site, and ends when one removes it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use portcullis_certs::SiteCert;
use portcullis_certs::ocsp::{self, Checked, Query};
use rustls::sign::CertifiedKey;

use crate::shutdown::{Retired, Shutdown};

/// How often the task looks whether a reload replaced the certificate (which drops the staple).
const LOOK: Duration = Duration::from_secs(1);
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const RETRY_MIN: Duration = Duration::from_secs(30);
const RETRY_MAX: Duration = Duration::from_secs(3600);
/// OCSP responses are small; anything bigger is not one.
const MAX_RESPONSE: usize = 64 * 1024;

/// Keeps the staple of one site's certificate fresh until shutdown, or until a config reload removes the
/// site (`retired`). `site` names it in the log.
pub async fn run(cert: Arc<SiteCert>, site: String, mut shutdown: Shutdown, mut retired: Retired) {
    let site = site.as_str();
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    // The certificate as we last swapped it in (stapled), and the leaf its response is for.
    let mut ours: Option<Arc<CertifiedKey>> = None;
    let mut good: Option<(Vec<u8>, Checked)> = None;
    let mut next = SystemTime::now();
    let mut retry = RETRY_MIN;
    loop {
        let current = cert.current();
        let replaced = !ours.as_ref().is_some_and(|o| Arc::ptr_eq(o, &current));
        let now = SystemTime::now();
        if replaced || now >= next {
            let leaf = current.cert.first().map(|c| c.to_vec()).unwrap_or_default();
            // A reload of the same leaf: put the response we have back at once.
            if let Some((for_leaf, checked)) = &good
                && replaced
                && *for_leaf == leaf
                && checked.valid_at(now)
                && current.ocsp.is_none()
            {
                let stapled = ocsp::staple(&current, checked.der.clone());
                // Refused: replaced again since the read; the next look sees the new one.
                if cert.replace(&current, stapled.clone()) {
                    ours = Some(stapled);
                }
            } else if replaced && current.ocsp.is_some() {
                ours = Some(current.clone());
            }
            if now >= next || good.as_ref().is_none_or(|(l, _)| *l != leaf) {
                match ocsp::query(&current.cert) {
                    Ok(None) => {
                        // No responder (Let's Encrypt since 2025): nothing to staple, nothing to say.
                        ours = Some(current.clone());
                        next = now + Duration::from_secs(86_400);
                    }
                    Ok(Some(q)) => match fetch(&client, &q)
                        .await
                        .and_then(|der| ocsp::check(&q, &der, SystemTime::now()))
                    {
                        Ok(checked) => {
                            match staple_if_current(&cert, &leaf, &checked.der) {
                                Some(stapled) => {
                                    ours = Some(stapled);
                                    tracing::info!(site, responder = %q.url, "OCSP response stapled");
                                }
                                // The next look fetches for the new certificate (or staples this
                                // response back if it is the same leaf).
                                None => tracing::info!(
                                    site,
                                    "certificate replaced during the OCSP fetch; the response is not stapled"
                                ),
                            }
                            next = checked.refresh_at(SystemTime::now());
                            good = Some((leaf, checked));
                            retry = RETRY_MIN;
                        }
                        Err(e) => {
                            tracing::warn!(site, responder = %q.url, "OCSP fetch failed, retrying in {}s: {e}", retry.as_secs());
                            next = SystemTime::now() + retry;
                            retry = (retry * 2).min(RETRY_MAX);
                            // The last good response stays stapled while it is valid; past that, unstaple.
                            let latest = cert.current();
                            if let Some((_, checked)) = &good
                                && !checked.valid_at(SystemTime::now())
                                && latest.ocsp.is_some()
                            {
                                let mut bare = (*latest).clone();
                                bare.ocsp = None;
                                let bare = Arc::new(bare);
                                if cert.replace(&latest, bare.clone()) {
                                    ours = Some(bare);
                                    good = None;
                                }
                            }
                        }
                    },
                    Err(e) => {
                        tracing::warn!(site, "cannot build an OCSP request: {e}");
                        ours = Some(current.clone());
                        next = now + RETRY_MAX;
                    }
                }
            }
        }
        tokio::select! {
            () = shutdown.begun() => return,
            () = retired.wait() => return,
            () = tokio::time::sleep(LOOK) => {}
        }
    }
}

/// Staples `response` onto the site's certificate if it still has the leaf the response is for. The
/// certificate is read once and the stapled copy swapped in only if it is still the one read
/// (`SiteCert::replace`): a reload or renewal between the read and the swap wins. None: not stapled.
fn staple_if_current(cert: &SiteCert, leaf: &[u8], response: &[u8]) -> Option<Arc<CertifiedKey>> {
    let latest = cert.current();
    if latest.cert.first().map(|c| c.as_ref()) != Some(leaf) {
        return None;
    }
    let stapled = ocsp::staple(&latest, response.to_vec());
    cert.replace(&latest, stapled.clone()).then_some(stapled)
}

async fn fetch(client: &Client<HttpConnector, Full<Bytes>>, q: &Query) -> Result<Vec<u8>, String> {
    let req = Request::post(q.url.as_str())
        .header(header::CONTENT_TYPE, "application/ocsp-request")
        .header(header::ACCEPT, "application/ocsp-response")
        .body(Full::new(Bytes::from(q.request.clone())))
        .map_err(|e| format!("bad responder URL {}: {e}", q.url))?;
    let res = tokio::time::timeout(FETCH_TIMEOUT, client.request(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    if !res.status().is_success() {
        return Err(format!("responder answered {}", res.status()));
    }
    let body = tokio::time::timeout(
        FETCH_TIMEOUT,
        Limited::new(res.into_body(), MAX_RESPONSE).collect(),
    )
    .await
    .map_err(|_| "timed out reading the response".to_owned())?
    .map_err(|e| e.to_string())?;
    Ok(body.to_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

    use super::*;

    /// Issue 10 item 6: a response fetched for the old leaf is never stapled onto (or swapped in over) the
    /// certificate a reload put in meanwhile; for the current leaf it is.
    #[test]
    fn a_response_for_a_replaced_leaf_keeps_the_new_certificate() {
        let old = portcullis_certs::self_signed(&["a.test".into()]).unwrap();
        let new = portcullis_certs::self_signed(&["a.test".into()]).unwrap();
        let cert = SiteCert::new(old.clone());
        let old_leaf = old.cert[0].to_vec();
        cert.swap(new.clone());
        assert!(staple_if_current(&cert, &old_leaf, b"response").is_none());
        assert!(Arc::ptr_eq(&cert.current(), &new));

        let stapled = staple_if_current(&cert, &new.cert[0], b"response").unwrap();
        let served = cert.current();
        assert!(Arc::ptr_eq(&served, &stapled));
        assert_eq!(served.cert, new.cert);
        assert_eq!(served.ocsp.as_deref(), Some(&b"response"[..]));
    }
}
