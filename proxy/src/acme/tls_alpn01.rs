//! TLS-ALPN-01 (RFC 8737): which handshakes are the CA's (they offer `acme-tls/1` for a name with a pending
//! validation), and the config that answers them with the challenge certificate. The HTTPS accept asks with
//! every ClientHello before it picks a site.

use std::sync::Arc;

use portcullis_certs::acme::{ACME_TLS_ALPN, Challenges};
use rustls::server::ClientHello;

/// The name this handshake validates: it offers `acme-tls/1` (only the CA's do) and names one.
pub fn validation(hello: &ClientHello<'_>) -> Option<String> {
    let offered = hello.alpn()?.any(|p| p == ACME_TLS_ALPN);
    if !offered {
        return None;
    }
    hello.server_name().map(str::to_owned)
}

/// The config that answers a validation for `name` (from [`validation`]), when one is pending here or,
/// with `[cluster]`, on another node (one Redis round trip, bounded by its timeout).
pub async fn answer(challenges: &Challenges, name: &str) -> Option<Arc<rustls::ServerConfig>> {
    challenges.tls_alpn01_shared(name).await
}
