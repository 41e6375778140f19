//! Client certificates (mutual TLS) per site: each `client_auth` site's rustls `ServerConfig` (its
//! verifier from the CA bundle and CRL folder, the site set's certificates, no session resumption), chosen
//! after the ClientHello by the site its SNI names ([`ClientAuths::tls_for`]); the CA and CRL files
//! watched (a 1 s poll of their identities) and reloaded atomically, the last good trust kept when a file
//! is broken; expired CRLs logged loudly (at load and hourly). A config reload builds a new
//! [`ClientAuths`] with its snapshot (every file read again).
//!
//! No resumption for mTLS sites: rustls does not run the client verifier again on a resumed session, so a
//! session made before a CRL listed its certificate would let a revoked client back in. Their configs have
//! no ticketer and no session cache (and other sites' tickets cannot be opened by them), so every
//! handshake is a full one, checked against the CA and CRLs in force then.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use portcullis_certs::Sites;
use portcullis_certs::client_auth::{Identity, TrustInfo};
use portcullis_certs::inspect::format_time;
use portcullis_config::{ClientAuth, Config, CrlExpired, TlsVersion};
use rustls::ServerConfig;
use rustls::server::danger::ClientCertVerifier;

use crate::shutdown::Shutdown;

const POLL: Duration = Duration::from_secs(1);
const EXPIRED_REMINDER: Duration = Duration::from_secs(3600);

/// The `client_auth` of every site of one snapshot, by site index.
#[derive(Default)]
pub struct ClientAuths {
    sites: Vec<Option<Arc<SiteTrust>>>,
}

/// One site's trust in force: its config (with the verifier), what it was built from, and the files'
/// identities when it was read.
pub struct SiteTrust {
    site: usize,
    pub auth: ClientAuth,
    tls: ArcSwap<InForce>,
    info: ArcSwap<TrustInfo>,
    certs: Arc<Sites>,
    min: TlsVersion,
    /// Identity of the files last loaded, and of the last set refused (not retried until it changes).
    files: Mutex<(Option<Files>, Option<Files>)>,
}

/// A site's config and the verifier in it, swapped together.
pub struct InForce {
    pub tls: Arc<ServerConfig>,
    pub verifier: Arc<dyn ClientCertVerifier>,
}

/// Which bytes the CA file and the CRL folder hold now: each file's path, inode, size and mtime.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Files(Vec<(PathBuf, u64, u64, Option<SystemTime>)>);

impl ClientAuths {
    /// Every `client_auth` site of `config` loaded (blocking reads); an error names the site and file.
    pub fn load(config: &Config, certs: &Arc<Sites>) -> Result<ClientAuths, String> {
        let mut sites = Vec::with_capacity(config.sites.len());
        for (i, site) in config.sites.iter().enumerate() {
            let Some(auth) = &site.client_auth else {
                sites.push(None);
                continue;
            };
            let files = Files::of(auth);
            let trust = portcullis_certs::client_auth::load(auth).map_err(|e| {
                format!(
                    "site {i} ({}): client_auth: {e}",
                    site.names.first().map_or("default", String::as_str)
                )
            })?;
            let tls = crate::tls::mtls_config(
                certs.clone(),
                config.tls.min_version,
                trust.verifier.clone(),
            )
            .map_err(|e| format!("site {i}: client_auth: {e}"))?;
            report(
                i,
                &trust.info,
                "client CA and CRLs loaded",
                auth.crl_expired,
            );
            sites.push(Some(Arc::new(SiteTrust {
                site: i,
                auth: auth.clone(),
                tls: ArcSwap::from_pointee(InForce {
                    tls,
                    verifier: trust.verifier,
                }),
                info: ArcSwap::from_pointee(trust.info),
                certs: certs.clone(),
                min: config.tls.min_version,
                files: Mutex::new((files, None)),
            })));
        }
        Ok(ClientAuths { sites })
    }

    /// The config for a handshake served as `site`, when the site asks for client certificates.
    pub fn tls_for(&self, site: Option<usize>) -> Option<Arc<InForce>> {
        let t = self.site(site?)?;
        Some(t.tls.load_full())
    }

    /// The verifier in force for `site` now (a connection's certificate is checked again against it once
    /// it changed).
    pub fn verifier(&self, site: usize) -> Option<Arc<dyn ClientCertVerifier>> {
        Some(self.site(site)?.tls.load().verifier.clone())
    }

    pub fn site(&self, site: usize) -> Option<&Arc<SiteTrust>> {
        self.sites.get(site)?.as_ref()
    }

    /// Re-reads each site's CA and CRLs whose files changed (all of them when `force`).
    pub fn reload(&self, force: bool) {
        for t in self.sites.iter().flatten() {
            t.reload(force);
        }
    }

    fn remind(&self) {
        let now = SystemTime::now();
        for t in self.sites.iter().flatten() {
            let info = t.info.load();
            for c in info.expired_crls(now) {
                expired(t.site, c, t.auth.crl_expired);
            }
        }
    }
}

impl SiteTrust {
    fn reload(&self, force: bool) {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let now = Files::of(&self.auth);
        if !force && (now.is_none() || now == files.0 || now == files.1) {
            return;
        }
        let built = portcullis_certs::client_auth::load(&self.auth)
            .map_err(|e| e.to_string())
            .and_then(|trust| {
                crate::tls::mtls_config(self.certs.clone(), self.min, trust.verifier.clone())
                    .map(|tls| {
                        (
                            InForce {
                                tls,
                                verifier: trust.verifier,
                            },
                            trust.info,
                        )
                    })
                    .map_err(|e| e.to_string())
            });
        match built {
            Ok((tls, info)) => {
                self.tls.store(Arc::new(tls));
                report(
                    self.site,
                    &info,
                    "client CA and CRLs reloaded",
                    self.auth.crl_expired,
                );
                self.info.store(Arc::new(info));
                *files = (now, None);
            }
            Err(e) => {
                tracing::warn!(
                    site = self.site,
                    "client CA/CRL reload refused, keeping the last good set: {e}"
                );
                files.1 = now;
            }
        }
    }
}

impl Files {
    fn of(auth: &ClientAuth) -> Option<Files> {
        use std::os::unix::fs::MetadataExt;
        let mut out = Vec::new();
        let mut add = |p: PathBuf| -> Option<()> {
            let target = std::fs::canonicalize(&p).ok()?;
            let m = std::fs::metadata(&target).ok()?;
            out.push((target, m.ino(), m.len(), m.modified().ok()));
            Some(())
        };
        add(auth.ca.clone())?;
        if let Some(dir) = &auth.crl {
            add(dir.clone())?;
            let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
                .ok()?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .collect();
            entries.sort();
            for e in entries {
                // A file that went away between the listing and the stat: the next poll sees the rest.
                let _ = add(e);
            }
        }
        Some(Files(out))
    }
}

fn report(site: usize, info: &TrustInfo, what: &str, policy: CrlExpired) {
    tracing::info!(
        site,
        cas = %info.ca_subjects.join("; "),
        crls = info.crls.len(),
        next_update = %info.next_update().map_or_else(|| "none".to_owned(), format_time),
        "{what}"
    );
    for c in info.expired_crls(SystemTime::now()) {
        expired(site, c, policy);
    }
}

fn expired(site: usize, c: &portcullis_certs::client_auth::CrlInfo, policy: CrlExpired) {
    let then = match policy {
        CrlExpired::Warn => "certificates are still checked against it",
        CrlExpired::Refuse => {
            "EVERY client certificate of the site is refused (crl_expired = \"refuse\")"
        }
    };
    tracing::error!(
        site,
        crl = %c.path.display(),
        issuer = %c.issuer,
        next_update = %c.next_update.map_or_else(String::new, format_time),
        "CRL has EXPIRED: publish a new one; {then}"
    );
}

/// Runs until shutdown: the 1 s poll of the CA and CRL files of the snapshot in force (`current` gives
/// its `ClientAuths`), and the hourly reminder of expired CRLs.
pub async fn run(current: impl Fn() -> Arc<ClientAuths>, mut shutdown: Shutdown) {
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut hourly = tokio::time::interval(EXPIRED_REMINDER);
    hourly.tick().await;
    loop {
        tokio::select! {
            () = shutdown.begun() => return,
            _ = poll.tick() => {
                let auths = current();
                let _ = tokio::task::spawn_blocking(move || auths.reload(false)).await;
            }
            _ = hourly.tick() => current().remind(),
        }
    }
}

/// What a connection's client certificate is, read once when its handshake is done.
pub enum Verified {
    /// A client certificate verified at the handshake, and what it says.
    Success(Identity, Vec<rustls::pki_types::CertificateDer<'static>>),
    /// No certificate was sent (a site whose mode is optional).
    None,
}

impl Verified {
    /// After the handshake of a connection to a `client_auth` site: rustls verified every certificate it
    /// accepted, so a certificate here is a verified one.
    pub fn of(conn: &rustls::ServerConnection) -> Verified {
        let chain = conn.peer_certificates().unwrap_or_default();
        match chain.first() {
            Some(leaf) => match Identity::read(leaf) {
                Ok(id) => Verified::Success(id, chain.to_vec()),
                // Verified by webpki yet unreadable by x509-parser: served as no certificate.
                Err(e) => {
                    tracing::warn!("verified client certificate unreadable: {e}");
                    Verified::None
                }
            },
            None => Verified::None,
        }
    }
}
