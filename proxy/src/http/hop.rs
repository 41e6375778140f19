//! Hop-by-hop header fields (RFC 9110 §7.6.1): they describe one connection and are never forwarded, in
//! either direction. That includes every field that `Connection` names.

use http::HeaderMap;
use http::header::{self, HeaderName};

/// The fixed list; `Proxy-Connection` and `Keep-Alive` are legacy but still seen. `HTTP2-Settings` belongs
/// to an h2c upgrade (RFC 7540 §3.2.1), which is never valid over TLS (RFC 9113 §3.1) and never forwarded.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("http2-settings"),
];
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes hop-by-hop fields, and the fields named in `Connection`, from `headers`.
pub fn strip(headers: &mut HeaderMap) {
    // Names listed in Connection are removed first (the list itself goes with CONNECTION below). The usual
    // ones (`keep-alive`, `close`, `Upgrade`) are skipped before anything is made of them: the list that is
    // collected is then empty, and an empty Vec allocates nothing.
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|n| !removed_anyway(n))
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    for h in &HOP_BY_HOP {
        headers.remove(h);
    }
    headers.remove(PROXY_CONNECTION);
}

/// Whether a name listed in `Connection` goes without being named: a fixed hop-by-hop field, or `close`
/// (a connection option, not a field).
fn removed_anyway(name: &str) -> bool {
    name.is_empty()
        || name.eq_ignore_ascii_case("close")
        || name.eq_ignore_ascii_case(PROXY_CONNECTION.as_str())
        || HOP_BY_HOP
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn strips_fixed_and_connection_named_fields() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}
