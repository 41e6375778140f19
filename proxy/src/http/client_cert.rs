//! What the app learns about the client's certificate (mutual TLS): `X-Client-Cert-Verified`
//! (`SUCCESS`, `NONE`, `FAILED:<reason>`), `-Subject`, `-Issuer`, `-Serial`, `-Fingerprint` (SHA-256) and,
//! with `forward_cert = true`, `X-Client-Cert` (the URL-encoded PEM). The values are made once per
//! connection ([`ClientCert::of`]); every request has any client-sent field of these names removed first,
//! on every site, and only a `client_auth` site's requests get ours.

use std::time::SystemTime;

use arc_swap::ArcSwap;
use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use portcullis_certs::client_auth::Identity;
use portcullis_config::{ClientAuth, Site};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use std::sync::Arc;

pub const X_CLIENT_CERT_VERIFIED: HeaderName = HeaderName::from_static("x-client-cert-verified");
pub const X_CLIENT_CERT_SUBJECT: HeaderName = HeaderName::from_static("x-client-cert-subject");
pub const X_CLIENT_CERT_ISSUER: HeaderName = HeaderName::from_static("x-client-cert-issuer");
pub const X_CLIENT_CERT_SERIAL: HeaderName = HeaderName::from_static("x-client-cert-serial");
pub const X_CLIENT_CERT_FINGERPRINT: HeaderName =
    HeaderName::from_static("x-client-cert-fingerprint");
pub const X_CLIENT_CERT: HeaderName = HeaderName::from_static("x-client-cert");

/// Every field we set: a client's own is never believed, whoever the peer is.
pub const NAMES: [HeaderName; 6] = [
    X_CLIENT_CERT_VERIFIED,
    X_CLIENT_CERT_SUBJECT,
    X_CLIENT_CERT_ISSUER,
    X_CLIENT_CERT_SERIAL,
    X_CLIENT_CERT_FINGERPRINT,
    X_CLIENT_CERT,
];

const SUCCESS: HeaderValue = HeaderValue::from_static("SUCCESS");
const NONE: HeaderValue = HeaderValue::from_static("NONE");
const EXPIRED: HeaderValue = HeaderValue::from_static("FAILED:expired");

/// A connection's verified client certificate, as ready header values (their clones share one buffer).
#[derive(Debug)]
pub struct ClientCert {
    /// For the access log.
    pub subject_text: String,
    /// What a `key = "client_cert"` rate limit counts this certificate by.
    pub rate_key: u128,
    subject: HeaderValue,
    issuer: HeaderValue,
    serial: HeaderValue,
    fingerprint: HeaderValue,
    pem: HeaderValue,
    not_after: SystemTime,
    /// The site whose `client_auth` verified it (its names and settings, in the handshake's snapshot).
    verified_by: (Vec<String>, ClientAuth),
    /// The chain the client sent, leaf first: checked again when the site's CA or CRLs change.
    chain: Vec<CertificateDer<'static>>,
    /// The verifier it was last checked against, and what that said (`None`: it passed).
    checked: ArcSwap<Checked>,
}

/// One check of a connection's certificate.
struct Checked {
    verifier: Arc<dyn ClientCertVerifier>,
    failed: Option<HeaderValue>,
}

impl std::fmt::Debug for Checked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checked")
            .field("failed", &self.failed)
            .finish()
    }
}

impl ClientCert {
    /// `verifier` is the one the handshake passed.
    pub fn of(
        id: Identity,
        chain: Vec<CertificateDer<'static>>,
        site: &Site,
        auth: &ClientAuth,
        verifier: Arc<dyn ClientCertVerifier>,
    ) -> ClientCert {
        ClientCert {
            chain,
            checked: ArcSwap::from_pointee(Checked {
                verifier,
                failed: None,
            }),
            verified_by: (site.names.clone(), auth.clone()),
            subject: value(&id.subject),
            issuer: value(&id.issuer),
            serial: value(&id.serial),
            fingerprint: value(&id.fingerprint),
            pem: value(&id.pem_escaped),
            not_after: id.not_after,
            rate_key: id.key,
            subject_text: id.subject,
        }
    }

    /// Whether this certificate speaks for a request to `site`: the site that verified it at the
    /// handshake, with the same `client_auth`. A request may name another site than its handshake (no SNI,
    /// or a config reload since), and a certificate one site's CA accepted means nothing to another's.
    pub fn speaks_for(&self, site: &Site) -> bool {
        site.names == self.verified_by.0 && site.client_auth.as_ref() == Some(&self.verified_by.1)
    }

    /// `X-Client-Cert-Verified` for a request now, against the site's verifier `now_verifier` (the one in
    /// force): `SUCCESS`, or `FAILED:<reason>` when the certificate expired since the handshake or a CA or
    /// CRL change since refuses it. The chain is checked again once per change, not per request.
    pub fn verdict(&self, now_verifier: &Arc<dyn ClientCertVerifier>) -> HeaderValue {
        if SystemTime::now() > self.not_after {
            return EXPIRED;
        }
        let last = self.checked.load();
        let same = std::ptr::eq(
            Arc::as_ptr(&last.verifier).cast::<()>(),
            Arc::as_ptr(now_verifier).cast::<()>(),
        );
        if same {
            return last.failed.clone().unwrap_or(SUCCESS);
        }
        drop(last);
        let failed = match self.chain.split_first() {
            Some((leaf, intermediates)) => now_verifier
                .verify_client_cert(leaf, intermediates, UnixTime::now())
                .err()
                .map(|e| failed(&e)),
            None => Some(HeaderValue::from_static("FAILED:no certificate")),
        };
        self.checked.store(Arc::new(Checked {
            verifier: now_verifier.clone(),
            failed: failed.clone(),
        }));
        failed.unwrap_or(SUCCESS)
    }
}

/// `SUCCESS`, the one verdict that lets a request through where a certificate is required.
pub fn is_success(verdict: &HeaderValue) -> bool {
    verdict == SUCCESS
}

/// `FAILED:<reason>`: rustls's words for the common cases, kept short.
fn failed(e: &rustls::Error) -> HeaderValue {
    use rustls::CertificateError as C;
    let reason = match e {
        rustls::Error::InvalidCertificate(C::Revoked) => "revoked".to_owned(),
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "expired".to_owned()
        }
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => "unknown issuer".to_owned(),
        rustls::Error::InvalidCertificate(C::ExpiredRevocationList) => "CRL expired".to_owned(),
        rustls::Error::InvalidCertificate(C::UnknownRevocationStatus) => {
            "unknown revocation status".to_owned()
        }
        other => other.to_string(),
    };
    let text: String = reason
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    HeaderValue::from_str(&format!("FAILED:{text}"))
        .unwrap_or_else(|_| HeaderValue::from_static("FAILED:certificate refused"))
}

/// Removes the client's fields, then, on a `client_auth` site (`site_auth`: its `forward_cert`), sets ours
/// from the connection's certificate and its verdict for this request.
pub fn set(
    headers: &mut HeaderMap,
    site_auth: Option<bool>,
    cert: Option<(&ClientCert, &HeaderValue)>,
) {
    for n in NAMES {
        headers.remove(n);
    }
    let Some(forward) = site_auth else {
        return;
    };
    let Some((c, verdict)) = cert else {
        headers.insert(X_CLIENT_CERT_VERIFIED, NONE);
        return;
    };
    headers.insert(X_CLIENT_CERT_VERIFIED, verdict.clone());
    headers.insert(X_CLIENT_CERT_SUBJECT, c.subject.clone());
    headers.insert(X_CLIENT_CERT_ISSUER, c.issuer.clone());
    headers.insert(X_CLIENT_CERT_SERIAL, c.serial.clone());
    headers.insert(X_CLIENT_CERT_FINGERPRINT, c.fingerprint.clone());
    if forward {
        headers.insert(X_CLIENT_CERT, c.pem.clone());
    }
}

/// `text` is escaped printable ASCII (`Identity`), always a valid value; made shared once.
fn value(text: &str) -> HeaderValue {
    let v = HeaderValue::from_maybe_shared(bytes::Bytes::from(text.to_owned()))
        .unwrap_or_else(|_| HeaderValue::from_static(""));
    let _shared = v.clone();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_fields_are_removed_everywhere_and_ours_set_on_client_auth_sites() {
        let forged = || {
            let mut h = HeaderMap::new();
            for n in NAMES {
                h.insert(n, HeaderValue::from_static("forged"));
            }
            h
        };
        let mut h = forged();
        set(&mut h, None, None);
        assert!(NAMES.iter().all(|n| !h.contains_key(n)));
        let mut h = forged();
        set(&mut h, Some(true), None);
        assert_eq!(h.get(X_CLIENT_CERT_VERIFIED).unwrap(), "NONE");
        assert_eq!(h.len(), 1);
    }
}
