//! The challenge responses the listeners serve while an order (or a self-check) is pending: HTTP-01 key
//! authorizations by token (RFC 8555 section 8.3), and TLS-ALPN-01 certificates by name, each wrapped in a
//! server config whose only ALPN protocol is `acme-tls/1` (RFC 8737). Entries live as long as the
//! [`Pending`] that installed them. With `[cluster]`, a [`Share`] (the proxy's Redis) makes them visible to
//! every node: [`Pending::publish`] writes what was added before the CA is told to validate, a node asked
//! for an answer it does not hold looks it up there ([`Challenges::http01_shared`],
//! [`Challenges::tls_alpn01_shared`]), and the guard's drop withdraws them.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};

use rustls::ServerConfig;
use rustls::pki_types::PrivateKeyDer;
use rustls::sign::{CertifiedKey, SingleCertAndKey};

use super::Error;

/// The ALPN protocol a TLS-ALPN-01 validation offers, and the only one its handshake may negotiate.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// A TLS-ALPN-01 certificate as installed: its DER, and its key's SubjectPublicKeyInfo (a client cannot
/// take the key from the certificate with webpki, which refuses its critical acmeIdentifier extension).
#[derive(Debug, Clone)]
pub struct ChallengeCert {
    pub der: Vec<u8>,
    pub spki: Vec<u8>,
}

/// A boxed future, as [`Share`]'s methods return (no `async fn` in a `dyn` trait).
pub type ShareFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One answer as another node needs it to answer the CA.
#[derive(Clone)]
pub enum Answer {
    /// `GET /.well-known/acme-challenge/<token>` answers `key_authorization`.
    Http01 {
        token: String,
        key_authorization: String,
    },
    /// An `acme-tls/1` handshake for `name` shows `cert_der`, signed with `key_der` (PKCS#8).
    TlsAlpn01 {
        name: String,
        cert_der: Vec<u8>,
        key_der: Vec<u8>,
    },
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::Http01 { token, .. } => write!(f, "Http01({token})"),
            Answer::TlsAlpn01 { name, .. } => write!(f, "TlsAlpn01({name})"),
        }
    }
}

/// Where the answers of this node's orders are published for the other nodes, and theirs looked up. Every
/// call is bounded by the implementation (the cluster's round-trip timeout) and fails soft.
pub trait Share: Send + Sync + std::fmt::Debug {
    /// Makes `answers` visible to every node; false when they could not be written.
    fn publish<'a>(&'a self, answers: &'a [Answer]) -> ShareFuture<'a, bool>;
    /// Removes them again (in the background: called from a guard's drop).
    fn withdraw(&self, answers: Vec<Answer>);
    /// Another node's key authorization for `token`.
    fn http01<'a>(&'a self, token: &'a str) -> ShareFuture<'a, Option<String>>;
    /// Another node's TLS-ALPN-01 certificate and key (PKCS#8) for `name`.
    fn tls_alpn01<'a>(&'a self, name: &'a str) -> ShareFuture<'a, Option<(Vec<u8>, Vec<u8>)>>;
}

/// Challenge responses, shared by the ACME task (which installs them) and the listeners (which serve them).
#[derive(Debug, Default)]
pub struct Challenges {
    http: Mutex<HashMap<String, String>>,
    tls: Mutex<HashMap<String, Arc<ServerConfig>>>,
    /// `[cluster]`: the other nodes' answers, and where ours go (set once, at start).
    share: OnceLock<Arc<dyn Share>>,
}

impl Challenges {
    /// From now on, answers are published through `share` and looked up there when not held here.
    pub fn share_with(&self, share: Arc<dyn Share>) {
        let _ = self.share.set(share);
    }

    /// [`Challenges::http01`], else another node's answer (only with [`Challenges::share_with`]).
    pub async fn http01_shared(&self, token: &str) -> Option<String> {
        if let Some(a) = self.http01(token) {
            return Some(a);
        }
        // Tokens are base64url (RFC 8555 section 8.1): anything else is not worth a round trip.
        if token.is_empty()
            || token.len() > 128
            || !token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return None;
        }
        self.share.get()?.http01(token).await
    }

    /// [`Challenges::tls_alpn01`], else the config for another node's certificate for `sni`.
    pub async fn tls_alpn01_shared(&self, sni: &str) -> Option<Arc<ServerConfig>> {
        if let Some(c) = self.tls_alpn01(sni) {
            return Some(c);
        }
        let share = self.share.get()?;
        let name = sni.trim_end_matches('.').to_ascii_lowercase();
        let (cert, key) = share.tls_alpn01(&name).await?;
        match challenge_config(cert, key) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(
                    name,
                    "another node's TLS-ALPN-01 certificate is unusable: {e}"
                );
                None
            }
        }
    }

    /// The key authorization to answer `GET /.well-known/acme-challenge/<token>` with.
    pub fn http01(&self, token: &str) -> Option<String> {
        lock(&self.http).get(token).cloned()
    }

    /// The config that answers an `acme-tls/1` handshake for `sni`, when a validation for it is pending.
    pub fn tls_alpn01(&self, sni: &str) -> Option<Arc<ServerConfig>> {
        let tls = lock(&self.tls);
        if tls.is_empty() {
            return None;
        }
        tls.get(&sni.trim_end_matches('.').to_ascii_lowercase())
            .cloned()
    }

    /// Serves `key_authorization` for `token` until the returned guard is dropped.
    pub fn answer_http01(&self, token: &str, key_authorization: &str) -> Pending<'_> {
        let mut p = Pending::new(self);
        p.add_http01(token, key_authorization);
        p
    }

    /// Nothing served yet; add responses with [`Pending::add_http01`] / [`Pending::add_tls_alpn01`].
    pub fn pending(&self) -> Pending<'_> {
        Pending::new(self)
    }
}

/// Responses installed for one order (or probe); removed when it is dropped, whatever the outcome.
pub struct Pending<'a> {
    store: &'a Challenges,
    tokens: Vec<String>,
    names: Vec<String>,
    /// Added since the last [`Pending::publish`], and published (withdrawn on drop).
    unpublished: Vec<Answer>,
    published: Vec<Answer>,
}

impl<'a> Pending<'a> {
    fn new(store: &'a Challenges) -> Pending<'a> {
        Pending {
            store,
            tokens: Vec::new(),
            names: Vec::new(),
            unpublished: Vec::new(),
            published: Vec::new(),
        }
    }

    pub fn add_http01(&mut self, token: &str, key_authorization: &str) {
        lock(&self.store.http).insert(token.to_owned(), key_authorization.to_owned());
        self.tokens.push(token.to_owned());
        if self.store.share.get().is_some() {
            self.unpublished.push(Answer::Http01 {
                token: token.to_owned(),
                key_authorization: key_authorization.to_owned(),
            });
        }
    }

    /// Writes what was added since the last call where every node finds it (nothing without
    /// [`Challenges::share_with`]). Call before the CA is told to validate. False when it could not be
    /// written: then only this node answers, as without `[cluster]`.
    pub async fn publish(&mut self) -> bool {
        let Some(share) = self.store.share.get() else {
            return true;
        };
        if self.unpublished.is_empty() {
            return true;
        }
        let batch = std::mem::take(&mut self.unpublished);
        let ok = share.publish(&batch).await;
        // Withdrawn on drop even when the write failed: it may have landed after the timeout.
        self.published.extend(batch);
        ok
    }

    /// Serves, for `name`, a self-signed certificate carrying `digest` (SHA-256 of the key authorization) in
    /// the critical acmeIdentifier extension (RFC 8737 section 3).
    pub fn add_tls_alpn01(&mut self, name: &str, digest: &[u8]) -> Result<ChallengeCert, Error> {
        let gen_err = |e: rcgen::Error| Error::Generate(format!("a TLS-ALPN-01 certificate: {e}"));
        let key = rcgen::KeyPair::generate().map_err(gen_err)?;
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).map_err(gen_err)?;
        params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
        let cert = params.self_signed(&key).map_err(gen_err)?;
        let installed = ChallengeCert {
            der: cert.der().to_vec(),
            spki: rcgen::PublicKeyData::subject_public_key_info(&key),
        };
        let config = challenge_config(cert.der().to_vec(), key.serialize_der())?;
        let name = name.to_ascii_lowercase();
        lock(&self.store.tls).insert(name.clone(), config);
        if self.store.share.get().is_some() {
            self.unpublished.push(Answer::TlsAlpn01 {
                name: name.clone(),
                cert_der: installed.der.clone(),
                key_der: key.serialize_der(),
            });
        }
        self.names.push(name);
        Ok(installed)
    }
}

/// The server config that shows one TLS-ALPN-01 certificate (`key_der`: its PKCS#8 key) and negotiates
/// `acme-tls/1` only.
fn challenge_config(cert_der: Vec<u8>, key_der: Vec<u8>) -> Result<Arc<ServerConfig>, Error> {
    let key_der = PrivateKeyDer::try_from(key_der).map_err(|e| Error::Generate(e.to_owned()))?;
    // Not `from_der`: it parses the certificate with webpki, which refuses the critical extension that
    // this certificate exists to carry.
    let signer = crate::provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| Error::Generate(format!("a TLS-ALPN-01 key: {e}")))?;
    let ck = CertifiedKey::new(vec![cert_der.into()], signer);
    let mut config = ServerConfig::builder_with_provider(crate::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| Error::Generate(format!("a TLS-ALPN-01 config: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(Arc::new(ck))));
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    Ok(Arc::new(config))
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let mut http = lock(&self.store.http);
        for t in &self.tokens {
            http.remove(t);
        }
        drop(http);
        let mut tls = lock(&self.store.tls);
        for n in &self.names {
            tls.remove(n);
        }
        drop(tls);
        if let Some(share) = self.store.share.get() {
            self.published.append(&mut self.unpublished);
            if !self.published.is_empty() {
                share.withdraw(std::mem::take(&mut self.published));
            }
        }
    }
}

/// A poisoned lock only means a holder panicked between two map operations: the map is still whole.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_live_as_long_as_their_guard() {
        let c = Challenges::default();
        {
            let mut p = c.answer_http01("tok", "tok.thumb");
            let der = p.add_tls_alpn01("a.test", &[7; 32]).unwrap().der;
            assert_eq!(c.http01("tok").as_deref(), Some("tok.thumb"));
            assert!(c.tls_alpn01("A.test.").is_some());
            assert!(c.tls_alpn01("b.test").is_none());
            // The acmeIdentifier extension (1.3.6.1.5.5.7.1.31) carries the digest as an OCTET STRING.
            let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
            let ext = x
                .extensions()
                .iter()
                .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
                .unwrap();
            assert!(ext.critical);
            assert_eq!(ext.value, [&[0x04, 32][..], &[7; 32]].concat());
        }
        assert!(c.http01("tok").is_none());
        assert!(c.tls_alpn01("a.test").is_none());
    }
}
