//! HTTP-01 (RFC 8555 §8.3): which plain-HTTP requests are the CA's, and their answer (the key authorization
//! of a pending token). The plain-HTTP listener asks before it redirects, and renders the answer itself
//! (`http::pages::acme_http01`).

use portcullis_certs::acme::Challenges;

/// Where the CA asks for a token (RFC 8555 §8.3).
pub const PATH_PREFIX: &str = "/.well-known/acme-challenge/";

/// The key authorization for the token `path` asks for, while that token is pending (here, or with
/// `[cluster]` on another node: then one Redis round trip, bounded by its timeout). `None` for every other
/// path (which the caller redirects as usual).
pub async fn answer(challenges: &Challenges, path: &str) -> Option<String> {
    challenges
        .http01_shared(path.strip_prefix(PATH_PREFIX)?)
        .await
}
