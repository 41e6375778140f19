//! Client certificates (mutual TLS): a site's trust loaded from its `client_auth` (the CA bundle, every
//! CRL in the CRL folder, PEM or DER) into a rustls `WebPkiClientVerifier`, with what `check` and the log
//! show about it ([`TrustInfo`]); and what one verified client certificate says ([`Identity`]: subject,
//! issuer, serial, SHA-256 fingerprint, the URL-encoded PEM), read once per connection. No files are
//! watched here and nothing is swapped: the proxy does that (`proxy/src/client_auth.rs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use portcullis_config::{ClientAuth, ClientAuthMode, CrlExpired};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::Error;

/// A site's client-certificate trust, ready for a rustls `ServerConfig`.
#[derive(Debug, Clone)]
pub struct Trust {
    pub verifier: Arc<dyn ClientCertVerifier>,
    pub info: TrustInfo,
}

/// What a site's trust is made of, for `check` and the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustInfo {
    /// Each CA certificate's subject, in the bundle's order.
    pub ca_subjects: Vec<String>,
    /// Each CA certificate's notAfter, in the same order.
    pub ca_not_after: Vec<SystemTime>,
    /// Each CRL, by file name order.
    pub crls: Vec<CrlInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlInfo {
    pub path: PathBuf,
    pub issuer: String,
    pub this_update: SystemTime,
    /// `None`: the CRL names no next update (it never expires).
    pub next_update: Option<SystemTime>,
    pub revoked: usize,
}

impl TrustInfo {
    /// The earliest `nextUpdate` of the CRLs.
    pub fn next_update(&self) -> Option<SystemTime> {
        self.crls.iter().filter_map(|c| c.next_update).min()
    }

    /// The CRLs past their `nextUpdate` at `now`.
    pub fn expired_crls(&self, now: SystemTime) -> impl Iterator<Item = &CrlInfo> {
        self.crls
            .iter()
            .filter(move |c| c.next_update.is_some_and(|n| n < now))
    }
}

/// Loads `auth`'s CA bundle and every CRL in its folder, and builds the verifier: chains to a CA of the
/// bundle (each one a trust anchor; the client may send intermediates), not revoked by any CRL (every CA in
/// the chain must have its CRL in the folder when there is one: unknown status refuses, as OpenSSL's
/// `CRL_CHECK_ALL` does for nginx), `mode` optional lets a client without a certificate through. Any file
/// that does not parse fails the whole load (the caller keeps the last good trust).
pub fn load(auth: &ClientAuth) -> Result<Trust, Error> {
    let bad = |path: &Path, why: String| Error::Unparsable {
        path: path.to_owned(),
        why,
    };
    let cas = crate::read_chain(&auth.ca)?;
    let mut roots = RootCertStore::empty();
    let mut ca_subjects = Vec::with_capacity(cas.len());
    let mut ca_not_after = Vec::with_capacity(cas.len());
    for (i, ca) in cas.into_iter().enumerate() {
        let (_, x) = X509Certificate::from_der(ca.as_ref())
            .map_err(|e| bad(&auth.ca, format!("CA certificate {i}: {e}")))?;
        ca_subjects.push(x.subject().to_string());
        ca_not_after.push(time(x.validity().not_after.timestamp()));
        roots
            .add(ca)
            .map_err(|e| bad(&auth.ca, format!("CA certificate {i}: {e}")))?;
    }
    let (crls, crl_infos) = match &auth.crl {
        Some(dir) => read_crls(dir)?,
        None => (Vec::new(), Vec::new()),
    };
    let mut b = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), crate::provider())
        .with_crls(crls);
    if auth.mode == ClientAuthMode::Optional {
        b = b.allow_unauthenticated();
    }
    if auth.crl_expired == CrlExpired::Refuse {
        b = b.enforce_revocation_expiration();
    }
    let inner = b
        .build()
        .map_err(|e| bad(auth.crl.as_deref().unwrap_or(&auth.ca), e.to_string()))?;
    let info = TrustInfo {
        ca_subjects,
        ca_not_after,
        crls: crl_infos,
    };
    let refuse_from = match auth.crl_expired {
        CrlExpired::Refuse => info.next_update(),
        CrlExpired::Warn => None,
    };
    Ok(Trust {
        verifier: Arc::new(Verifier { inner, refuse_from }),
        info,
    })
}

/// Every regular file in `dir` (sorted by name; names starting with `.` skipped: editors' and rsync's
/// temporary files), each holding PEM CRLs or one DER CRL.
fn read_crls(
    dir: &Path,
) -> Result<(Vec<CertificateRevocationListDer<'static>>, Vec<CrlInfo>), Error> {
    let read_err = |path: &Path, source| Error::Read {
        path: path.to_owned(),
        source,
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| read_err(dir, e))?
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    let mut ders = Vec::new();
    let mut infos = Vec::new();
    for path in paths {
        let bytes = std::fs::read(&path).map_err(|e| read_err(&path, e))?;
        let found: Vec<CertificateRevocationListDer<'static>> =
            if bytes.windows(10).any(|w| w == b"-----BEGIN") {
                CertificateRevocationListDer::pem_slice_iter(&bytes)
                    .collect::<Result<_, _>>()
                    .map_err(|e| Error::Unparsable {
                        path: path.clone(),
                        why: format!("bad PEM CRL: {e}"),
                    })?
            } else {
                vec![CertificateRevocationListDer::from(bytes)]
            };
        if found.is_empty() {
            return Err(Error::Unparsable {
                path,
                why: "no CRL in it".into(),
            });
        }
        for der in found {
            let (_, crl) = CertificateRevocationList::from_der(der.as_ref()).map_err(|e| {
                Error::Unparsable {
                    path: path.clone(),
                    why: format!("not a CRL: {e}"),
                }
            })?;
            infos.push(CrlInfo {
                path: path.clone(),
                issuer: crl.issuer().to_string(),
                this_update: time(crl.last_update().timestamp()),
                next_update: crl.next_update().map(|t| time(t.timestamp())),
                revoked: crl.iter_revoked_certificates().count(),
            });
            ders.push(der);
        }
    }
    Ok((ders, infos))
}

fn time(unix: i64) -> SystemTime {
    match u64::try_from(unix) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => UNIX_EPOCH,
    }
}

/// The webpki verifier, and with `crl_expired = "refuse"` the moment the first CRL expires, from which
/// every client certificate is refused (not only those whose chain that CRL covers).
#[derive(Debug)]
struct Verifier {
    inner: Arc<dyn ClientCertVerifier>,
    refuse_from: Option<SystemTime>,
}

impl ClientCertVerifier for Verifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if let Some(from) = self.refuse_from {
            let now_t = UNIX_EPOCH + Duration::from_secs(now.as_secs());
            if now_t > from {
                return Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::ExpiredRevocationList,
                ));
            }
        }
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// What a verified client certificate says, as the header values the app receives (each already escaped:
/// bytes outside printable ASCII, and `%`, as `%XX`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The subject, RFC 4514 style (`CN=alice, O=Example`).
    pub subject: String,
    pub issuer: String,
    /// Upper-case hex, no separators (nginx's `$ssl_client_serial`).
    pub serial: String,
    /// SHA-256 of the DER certificate, lower-case hex.
    pub fingerprint: String,
    /// The fingerprint's first 128 bits: what a `key = "client_cert"` rate limit counts by.
    pub key: u128,
    pub not_after: SystemTime,
    /// The PEM, URL-encoded (nginx's `$ssl_client_escaped_cert`).
    pub pem_escaped: String,
}

impl Identity {
    /// Reads the leaf of a verified chain.
    pub fn read(leaf: &CertificateDer<'_>) -> Result<Identity, String> {
        let (_, x) = X509Certificate::from_der(leaf.as_ref()).map_err(|e| e.to_string())?;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf.as_ref());
        let pem = pem(leaf.as_ref());
        Ok(Identity {
            subject: escape(&x.subject().to_string()),
            issuer: escape(&x.issuer().to_string()),
            serial: hex(x.raw_serial(), true),
            fingerprint: hex(digest.as_ref(), false),
            key: digest
                .as_ref()
                .get(..16)
                .and_then(|b| <[u8; 16]>::try_from(b).ok())
                .map_or(0, u128::from_be_bytes),
            not_after: time(x.validity().not_after.timestamp()),
            pem_escaped: url_encode(&pem),
        })
    }
}

fn hex(bytes: &[u8], upper: bool) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = if upper {
            write!(s, "{b:02X}")
        } else {
            write!(s, "{b:02x}")
        };
    }
    s
}

/// Printable ASCII stays, the rest (and `%`) becomes `%XX`: always a valid header value, and a name that
/// holds UTF-8 reaches the app intact once decoded.
fn escape(text: &str) -> String {
    let mut s = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            s.push(char::from(b));
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// RFC 3986 percent-encoding of everything but the unreserved characters.
fn url_encode(text: &str) -> String {
    let mut s = String::with_capacity(text.len() * 3 / 2);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            s.push(char::from(b));
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

fn pem(der: &[u8]) -> String {
    let b64 = base64(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                out.push(char::from(T[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trips_and_values_are_escaped() {
        let c = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
        assert_eq!(
            pem(c.cert.der()).replace('\n', ""),
            c.cert.pem().replace(['\r', '\n'], "")
        );
        assert_eq!(escape("CN=J\u{f6}rg%"), "CN=J%C3%B6rg%25");
        assert_eq!(url_encode("a b/+\n"), "a%20b%2F%2B%0A");
        let id = Identity::read(c.cert.der()).unwrap();
        assert_eq!(id.fingerprint.len(), 64);
        assert!(
            id.pem_escaped
                .starts_with("-----BEGIN%20CERTIFICATE-----%0A")
        );
    }
}
