//! TLS-ALPN-01 (RFC 8737): which handshakes are the CA's (they offer `acme-tls/1` for a name with a pending
//! validation), and the config that answers them with the challenge certificate. The HTTPS accept asks with
//! every ClientHello before it picks a site.

use std::sync::Arc;

use portcullis_certs::acme::{ACME_TLS_ALPN, Challenges};
use rustls::server::ClientHello;

/// The config that answers this handshake, when it offers `acme-tls/1` for a name with a pending validation.
pub fn answer(
    challenges: &Challenges,
    hello: &ClientHello<'_>,
) -> Option<Arc<rustls::ServerConfig>> {
    let offered = hello.alpn()?.any(|p| p == ACME_TLS_ALPN);
    if !offered {
        return None;
    }
    challenges.tls_alpn01(hello.server_name()?)
}
