//! The rustls server configuration: protocol versions from the config, ALPN `h2` then `http/1.1`, session
//! resumption (stateless tickets with rotating keys, plus a session cache for TLS 1.2 clients without
//! tickets), certificates by SNI from the hot-swappable `portcullis_certs::Sites`. Each snapshot's config
//! holds that snapshot's `Sites`: a handshake picks its certificate from the set of the snapshot its
//! connection took.

use std::sync::Arc;

use portcullis_config::TlsVersion;
use rustls::server::ServerSessionMemoryCache;
use rustls::{ServerConfig, SupportedProtocolVersion};

/// `tickets`: the cluster's ticketer (`[cluster]`), else ticket keys of this process's own.
pub fn server_config(
    certs: Arc<dyn rustls::server::ResolvesServerCert>,
    min: TlsVersion,
    tickets: Option<Arc<dyn rustls::server::ProducesTickets>>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut c = ServerConfig::builder_with_provider(portcullis_certs::provider())
        .with_protocol_versions(versions(min))?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    c.ticketer = match tickets {
        Some(t) => t,
        None => rustls::crypto::aws_lc_rs::Ticketer::new()?,
    };
    c.session_storage = ServerSessionMemoryCache::new(16 * 1024);
    Ok(Arc::new(c))
}

/// A `client_auth` site's config: the same versions, ALPN and certificates, `verifier` asking for client
/// certificates, and no session resumption at all (no ticketer, no session cache, no TLS 1.3 tickets sent):
/// a resumed session skips the verifier, and must never carry a certificate revoked since it was made.
pub fn mtls_config(
    certs: Arc<dyn rustls::server::ResolvesServerCert>,
    min: TlsVersion,
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut c = ServerConfig::builder_with_provider(portcullis_certs::provider())
        .with_protocol_versions(versions(min))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(certs);
    c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    c.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    c.send_tls13_tickets = 0;
    Ok(Arc::new(c))
}

fn versions(min: TlsVersion) -> &'static [&'static SupportedProtocolVersion] {
    static BOTH: [&SupportedProtocolVersion; 2] =
        [&rustls::version::TLS13, &rustls::version::TLS12];
    static TLS13: [&SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
    match min {
        TlsVersion::Tls12 => &BOTH,
        TlsVersion::Tls13 => &TLS13,
    }
}

/// The config for another site set (a config reload changed the sites), with the same versions: it shares
/// `previous`'s session ticket keys and session cache, so resumption goes on working across the reload (a
/// resumed session is bound to its SNI, and the request is held to the new sites like any other).
pub fn with_sites(
    previous: &ServerConfig,
    certs: Arc<dyn rustls::server::ResolvesServerCert>,
    min: TlsVersion,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut c = Arc::unwrap_or_clone(server_config(certs, min, None)?);
    c.ticketer = previous.ticketer.clone();
    c.session_storage = previous.session_storage.clone();
    Ok(Arc::new(c))
}
