//! What the app learns about the client's certificate (mutual TLS): `X-Client-Cert-Verified`
//! (`SUCCESS`, `NONE`, `FAILED:<reason>`), `-Subject`, `-Issuer`, `-Serial`, `-Fingerprint` (SHA-256) and,
//! with `forward_cert = true`, `X-Client-Cert` (the URL-encoded PEM). The values are made once per
//! connection ([`ClientCert::of`]); every request has any client-sent field of these names removed first,
//! on every site, and only a `client_auth` site's requests get ours.

use std::time::SystemTime;

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use portcullis_certs::client_auth::Identity;
use portcullis_config::{ClientAuth, Site};

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
const EXPIRED: HeaderValue = HeaderValue::from_static("FAILED:certificate expired");

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
}

impl ClientCert {
    pub fn of(id: Identity, site: &Site, auth: &ClientAuth) -> ClientCert {
        ClientCert {
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

    /// Whether the certificate still holds now (it was verified at the handshake; a long connection may
    /// outlive it).
    pub fn valid(&self, now: SystemTime) -> bool {
        now <= self.not_after
    }
}

/// Removes the client's fields, then, on a `client_auth` site (`site_auth`: its `forward_cert`), sets ours
/// from the connection's certificate.
pub fn set(headers: &mut HeaderMap, site_auth: Option<bool>, cert: Option<&ClientCert>) {
    for n in NAMES {
        headers.remove(n);
    }
    let Some(forward) = site_auth else {
        return;
    };
    let Some(c) = cert else {
        headers.insert(X_CLIENT_CERT_VERIFIED, NONE);
        return;
    };
    let verdict = if c.valid(SystemTime::now()) {
        SUCCESS
    } else {
        EXPIRED
    };
    headers.insert(X_CLIENT_CERT_VERIFIED, verdict);
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
