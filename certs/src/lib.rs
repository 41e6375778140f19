//! Portcullis certificates: the one TLS crypto provider (aws-lc-rs, explicit suites and groups), PEM loading
//! with the key checked against the leaf, self-signed bootstrap (rcgen), and [`Sites`], the
//! `ResolvesServerCert` that picks a site by SNI, each site's certificate a [`SiteCert`] (an `ArcSwap`) that
//! hot reloads swap without touching a listener, and that a new `Sites` (a config reload) can share.
//! No sockets and no HTTP here.

#![forbid(unsafe_code)]

pub mod acme;
pub mod client_auth;
pub mod inspect;
pub mod ocsp;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::{CryptoProvider, aws_lc_rs};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Why a certificate could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read (the operator's: path or permissions).
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The certificate file holds no PEM certificate (the operator's).
    #[error("{}: no PEM certificate in it", path.display())]
    NoCertificate { path: PathBuf },
    /// The key file holds no usable private key (the operator's).
    #[error("{}: no PKCS#8, SEC1 or PKCS#1 private key in it ({why})", path.display())]
    NoKey { path: PathBuf, why: String },
    /// The key is not the leaf certificate's key, or is of a type we cannot sign with (the operator's).
    #[error("{}: the private key does not fit the certificate in {}: {why}", key.display(), cert.display())]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        why: String,
    },
    /// rcgen could not make a self-signed certificate for these names (ours, or a bad name).
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    /// The chain does not parse as X.509 (the operator's).
    #[error("{}: {why}", path.display())]
    Unparsable { path: PathBuf, why: String },
    /// The leaf has expired (the operator's, or a renewal that did not happen).
    #[error("{}: the certificate expired on {}", path.display(), inspect::format_time(*not_after))]
    Expired {
        path: PathBuf,
        not_after: std::time::SystemTime,
    },
    /// The leaf does not name every host the site serves (the operator's).
    #[error("{}: the certificate does not cover {}", path.display(), missing.join(", "))]
    NamesNotCovered { path: PathBuf, missing: Vec<String> },
}

/// A certificate ready to serve, and what it says.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    pub info: inspect::Info,
}

/// Loads a pair and checks everything a swap needs: it parses, the key fits the leaf, it has not expired,
/// and it covers `site_names` (when any are given).
pub fn load_checked(cert: &Path, key: &Path, site_names: &[String]) -> Result<Loaded, Error> {
    let ck = load_files(cert, key)?;
    let info = inspect::Info::read(&ck.cert).map_err(|why| Error::Unparsable {
        path: cert.to_owned(),
        why,
    })?;
    if info.expired(std::time::SystemTime::now()) {
        return Err(Error::Expired {
            path: cert.to_owned(),
            not_after: info.not_after,
        });
    }
    let missing = info.uncovered(site_names);
    if !missing.is_empty() {
        return Err(Error::NamesNotCovered {
            path: cert.to_owned(),
            missing: missing.into_iter().map(str::to_owned).collect(),
        });
    }
    Ok(Loaded { key: ck, info })
}

/// A self-signed pair for `names`, with its facts.
pub fn self_signed_loaded(names: &[String]) -> Result<Loaded, Error> {
    let key = self_signed(names)?;
    let info = inspect::Info::read(&key.cert).map_err(Error::Generate)?;
    Ok(Loaded { key, info })
}

/// One site's certificate, swapped in place (one pointer) by file reloads, ACME renewals and OCSP staples.
/// A config reload that keeps a site hands the same `SiteCert` to the next [`Sites`], so that every set
/// still serving the site sees each swap, and the tasks that swap it need not know which set is in force.
#[derive(Debug)]
pub struct SiteCert(ArcSwap<CertifiedKey>);

impl SiteCert {
    pub fn new(key: Arc<CertifiedKey>) -> Arc<SiteCert> {
        Arc::new(SiteCert(ArcSwap::new(key)))
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.0.load_full()
    }

    pub fn swap(&self, key: Arc<CertifiedKey>) {
        self.0.store(key);
    }

    /// Swaps in `next` only while `expected` is still served (the same `Arc`, compare-and-swap): a task that
    /// read the certificate, worked on it and built a successor from it (an OCSP staple) never puts back a
    /// certificate that a reload or an ACME renewal replaced meanwhile. False when it was replaced (then
    /// nothing changed).
    pub fn replace(&self, expected: &Arc<CertifiedKey>, next: Arc<CertifiedKey>) -> bool {
        let previous = self.0.compare_and_swap(expected, next);
        Arc::ptr_eq(&previous, expected)
    }
}

/// The certificates of every site, chosen by SNI: exact names first, then `*.suffix`, then the default
/// site (or no certificate at all, so a TLS alert, when `strict`). Each site's certificate swaps on its own.
/// Immutable otherwise: a config reload that changes the sites builds another one.
#[derive(Debug)]
pub struct Sites {
    certs: Vec<Arc<SiteCert>>,
    exact: std::collections::HashMap<String, usize>,
    wildcard: std::collections::HashMap<String, usize>,
    default: usize,
    strict: bool,
}

impl Sites {
    /// `sites`: each site's names and certificate, in config order; `default` indexes it.
    pub fn new(sites: Vec<(Vec<String>, Arc<SiteCert>)>, default: usize, strict: bool) -> Sites {
        let mut exact = std::collections::HashMap::new();
        let mut wildcard = std::collections::HashMap::new();
        let mut certs = Vec::with_capacity(sites.len());
        for (i, (names, cert)) in sites.into_iter().enumerate() {
            for n in names {
                match n.strip_prefix("*.") {
                    Some(suffix) => wildcard.entry(suffix.to_ascii_lowercase()).or_insert(i),
                    None => exact.entry(n.to_ascii_lowercase()).or_insert(i),
                };
            }
            certs.push(cert);
        }
        Sites {
            certs,
            exact,
            wildcard,
            default,
            strict,
        }
    }

    /// The site that serves `name` (a host name, any case, port already removed).
    pub fn site_for(&self, name: &str) -> Option<usize> {
        let name = name.trim_end_matches('.');
        // Keys are lower-case; a host that already is needs no copy (the common case, per request).
        let lower: std::borrow::Cow<'_, str> = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            name.to_ascii_lowercase().into()
        } else {
            name.into()
        };
        if let Some(i) = self.exact.get(lower.as_ref()) {
            return Some(*i);
        }
        let (_, suffix) = lower.split_once('.')?;
        self.wildcard.get(suffix).copied()
    }

    /// The site a handshake with this SNI is served as (`None`: refuse, under `strict_sni`).
    pub fn site_for_sni(&self, sni: Option<&str>) -> Option<usize> {
        match sni {
            None => Some(self.default),
            Some(n) => self.site_for(n).or(if self.strict {
                None
            } else {
                Some(self.default)
            }),
        }
    }

    /// Site `site`'s certificate, to swap or to hand to a task that keeps it fresh.
    pub fn cert(&self, site: usize) -> Option<&Arc<SiteCert>> {
        self.certs.get(site)
    }

    pub fn swap(&self, site: usize, key: Arc<CertifiedKey>) {
        if let Some(c) = self.certs.get(site) {
            c.swap(key);
        }
    }

    /// [`SiteCert::replace`] on site `site` (false too when there is no such site).
    pub fn replace(
        &self,
        site: usize,
        expected: &Arc<CertifiedKey>,
        next: Arc<CertifiedKey>,
    ) -> bool {
        self.certs
            .get(site)
            .is_some_and(|c| c.replace(expected, next))
    }

    pub fn current(&self, site: usize) -> Option<Arc<CertifiedKey>> {
        self.certs.get(site).map(|c| c.current())
    }

    pub fn len(&self) -> usize {
        self.certs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }
}

impl ResolvesServerCert for Sites {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let site = self.site_for_sni(hello.server_name())?;
        self.current(site)
    }
}

/// The only crypto provider Portcullis uses: aws-lc-rs with Mozilla "intermediate" choices made explicit.
/// TLS 1.2 suites are ECDHE + AEAD only; groups are X25519MLKEM768 (post-quantum hybrid), X25519, P-256, P-384.
pub fn provider() -> Arc<CryptoProvider> {
    use aws_lc_rs::cipher_suite as cs;
    use aws_lc_rs::kx_group as kx;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ],
        kx_groups: vec![kx::X25519MLKEM768, kx::X25519, kx::SECP256R1, kx::SECP384R1],
        ..aws_lc_rs::default_provider()
    })
}

/// Reads a PEM certificate chain, leaf first.
pub fn read_chain(cert: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let cert_pem = std::fs::read(cert).map_err(|source| Error::Read {
        path: cert.to_owned(),
        source,
    })?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|_| Error::NoCertificate {
            path: cert.to_owned(),
        })?;
    if chain.is_empty() {
        return Err(Error::NoCertificate {
            path: cert.to_owned(),
        });
    }
    Ok(chain)
}

/// Reads a PEM chain (leaf first) and its private key, and checks that the key belongs to the leaf.
pub fn load_files(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, Error> {
    let chain = read_chain(cert)?;
    let key_pem = std::fs::read(key).map_err(|source| Error::Read {
        path: key.to_owned(),
        source,
    })?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| Error::NoKey {
        path: key.to_owned(),
        why: e.to_string(),
    })?;
    let ck =
        CertifiedKey::from_der(chain, key_der, &provider()).map_err(|e| Error::KeyMismatch {
            cert: cert.to_owned(),
            key: key.to_owned(),
            why: e.to_string(),
        })?;
    Ok(Arc::new(ck))
}

/// A self-signed ECDSA P-256 certificate for `names` (or `localhost` when none), made in memory.
pub fn self_signed(names: &[String]) -> Result<Arc<CertifiedKey>, Error> {
    let names = if names.is_empty() {
        vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ]
    } else {
        names.to_vec()
    };
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(names).map_err(|e| Error::Generate(e.to_string()))?;
    let key_der = PrivateKeyDer::try_from(signing_key.serialize_der())
        .map_err(|e| Error::Generate(e.to_owned()))?;
    let ck = CertifiedKey::from_der(vec![cert.der().clone()], key_der, &provider())
        .map_err(|e| Error::Generate(e.to_string()))?;
    Ok(Arc::new(ck))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sites_by_sni() {
        let a = self_signed(&["a.test".into()]).unwrap();
        let b = self_signed(&["b.test".into()]).unwrap();
        let sites = Sites::new(
            vec![
                (vec!["a.test".into()], SiteCert::new(a.clone())),
                (
                    vec!["b.test".into(), "*.b.test".into()],
                    SiteCert::new(b.clone()),
                ),
            ],
            0,
            false,
        );
        assert_eq!(sites.site_for("B.test"), Some(1));
        assert_eq!(sites.site_for("x.b.test"), Some(1));
        assert_eq!(sites.site_for_sni(Some("other.test")), Some(0));
        assert_eq!(sites.site_for_sni(None), Some(0));
        let strict = Sites::new(vec![(vec!["a.test".into()], SiteCert::new(a))], 0, true);
        assert_eq!(strict.site_for_sni(Some("other.test")), None);
        sites.swap(1, sites.current(0).unwrap());
        assert!(Arc::ptr_eq(
            &sites.current(1).unwrap(),
            &sites.current(0).unwrap()
        ));
    }

    /// Issue 10 item 6: a task that read the certificate and built a successor from it (OCSP stapling)
    /// must not put the old leaf back over a reload that landed in between.
    #[test]
    fn replace_never_undoes_a_swap_made_since_the_read() {
        let old = self_signed(&["a.test".into()]).unwrap();
        let new = self_signed(&["a.test".into()]).unwrap();
        let sites = Sites::new(
            vec![(vec!["a.test".into()], SiteCert::new(old.clone()))],
            0,
            false,
        );
        let read = sites.current(0).unwrap();
        let mut stapled = (*read).clone();
        stapled.ocsp = Some(vec![1, 2, 3]);
        let stapled = Arc::new(stapled);
        // The reload lands after the read, before the stapler swaps.
        sites.swap(0, new.clone());
        assert!(!sites.replace(0, &read, stapled.clone()));
        assert!(Arc::ptr_eq(&sites.current(0).unwrap(), &new));
        // Unchanged since the read: the successor goes in.
        let read = sites.current(0).unwrap();
        assert!(sites.replace(0, &read, stapled.clone()));
        assert!(Arc::ptr_eq(&sites.current(0).unwrap(), &stapled));
        assert!(!sites.replace(7, &read, stapled));
    }

    #[test]
    fn self_signed_is_valid_and_swappable() {
        let a = self_signed(&["example.test".into()]).unwrap();
        let b = self_signed(&[]).unwrap();
        let store = Sites::new(
            vec![(vec!["example.test".into()], SiteCert::new(a.clone()))],
            0,
            false,
        );
        assert!(Arc::ptr_eq(&store.current(0).unwrap(), &a));
        store.swap(0, b.clone());
        assert!(Arc::ptr_eq(&store.current(0).unwrap(), &b));
    }

    #[test]
    fn a_key_that_does_not_fit_is_refused() {
        let dir = std::env::temp_dir().join(format!("portcullis-certs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let one = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
        let two = rcgen::generate_simple_self_signed(vec!["b.test".into()]).unwrap();
        std::fs::write(dir.join("cert.pem"), one.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), one.signing_key.serialize_pem()).unwrap();
        std::fs::write(dir.join("other.pem"), two.signing_key.serialize_pem()).unwrap();
        std::fs::write(dir.join("empty.pem"), "").unwrap();
        assert!(load_files(&dir.join("cert.pem"), &dir.join("key.pem")).is_ok());
        assert!(matches!(
            load_files(&dir.join("cert.pem"), &dir.join("other.pem")),
            Err(Error::KeyMismatch { .. })
        ));
        assert!(matches!(
            load_files(&dir.join("empty.pem"), &dir.join("key.pem")),
            Err(Error::NoCertificate { .. })
        ));
        assert!(matches!(
            load_files(&dir.join("cert.pem"), &dir.join("empty.pem")),
            Err(Error::NoKey { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
