//! `X-Request-Id`: one id per request, sent to the app, returned to the client and written in the access
//! line as `request_id`. An id that came with the request is kept only from a trusted proxy (the peer is in
//! `trusted_proxies`: the load balancer in front made it, and the trace goes on through us) and only when it
//! is one field of 1 to [`MAX_LEN`] bytes of `A-Z a-z 0-9 - _ . : + / = @` (UUIDs, nginx's hex, base64,
//! W3C trace ids); any other client's, or a bad one, is replaced by ours, as nginx's `$request_id` always
//! is: an id a client picks could pose as another request's in the log. Ours ([`RequestIds`]) are 32
//! lower-case hex digits (128 bits, as `$request_id`): a per-process counter (one relaxed atomic add, no
//! lock) through two SipHash keys drawn at start, so they are unique within the process without telling
//! anyone how many requests came before.

use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use portcullis_config::Cidr;

use crate::http::forwarded;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest id kept from a trusted proxy.
pub const MAX_LEN: usize = 128;

/// Makes request ids; one per process (in `Shared`).
#[derive(Debug, Default)]
pub struct RequestIds {
    next: AtomicU64,
    keys: (RandomState, RandomState),
}

impl RequestIds {
    /// The request's id: the trusted proxy's if `headers` carry a valid one, else a new one of ours.
    pub fn pick(&self, headers: &HeaderMap, peer: IpAddr, trusted: &[Cidr]) -> HeaderValue {
        if forwarded::is_trusted(peer, trusted) {
            let mut sent = headers.get_all(X_REQUEST_ID).iter();
            if let (Some(id), None) = (sent.next(), sent.next())
                && valid(id.as_bytes())
            {
                return id.clone();
            }
        }
        self.generate()
    }

    /// A new id: 32 hex digits.
    pub fn generate(&self) -> HeaderValue {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let (a, b) = (self.keys.0.hash_one(n), self.keys.1.hash_one(n));
        let mut text = [0u8; 32];
        for (i, byte) in a
            .to_be_bytes()
            .into_iter()
            .chain(b.to_be_bytes())
            .enumerate()
        {
            text[2 * i] = HEX[usize::from(byte >> 4)];
            text[2 * i + 1] = HEX[usize::from(byte & 0xf)];
        }
        // One allocation, which the upstream request, the response and the access line then share (a
        // `Bytes` made from a `Vec` would allocate again when first cloned). Hex digits only: always valid.
        HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(text))
            .unwrap_or(HeaderValue::from_static("-"))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Whether an id from a trusted proxy is kept as it is.
pub fn valid(id: &[u8]) -> bool {
    (1..=MAX_LEN).contains(&id.len())
        && id
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"-_.:+/=@".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ours_are_32_hex_digits_and_differ() {
        let ids = RequestIds::default();
        let seen: std::collections::HashSet<_> = (0..10_000).map(|_| ids.generate()).collect();
        assert_eq!(seen.len(), 10_000);
        for id in seen.iter().take(10) {
            assert_eq!(id.len(), 32);
            assert!(id.as_bytes().iter().all(|b| HEX.contains(b)), "{id:?}");
        }
        // Another process (another pair of keys) starts elsewhere.
        assert_ne!(
            RequestIds::default().generate(),
            RequestIds::default().generate()
        );
    }

    #[test]
    fn a_trusted_proxys_id_is_kept_when_it_is_sane() {
        let ids = RequestIds::default();
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        let proxy: IpAddr = "10.1.2.3".parse().unwrap();
        let stranger: IpAddr = "192.0.2.7".parse().unwrap();
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(X_REQUEST_ID, HeaderValue::from_str(v).unwrap());
            h
        };
        let uuid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
        assert_eq!(ids.pick(&with(uuid), proxy, &trusted), uuid);
        assert_ne!(ids.pick(&with(uuid), stranger, &trusted), uuid);
        assert_ne!(ids.pick(&with(uuid), proxy, &[]), uuid);
        for bad in [
            "",
            "a b",
            "x\ty",
            "<script>",
            "a\"b",
            &"a".repeat(MAX_LEN + 1),
        ] {
            assert_eq!(ids.pick(&with(bad), proxy, &trusted).len(), 32, "{bad:?}");
        }
        assert_eq!(
            ids.pick(&with(&"a".repeat(MAX_LEN)), proxy, &trusted).len(),
            MAX_LEN
        );
        let mut two = with(uuid);
        two.append(X_REQUEST_ID, HeaderValue::from_static("other"));
        assert_ne!(ids.pick(&two, proxy, &trusted), uuid);
        assert_eq!(ids.pick(&HeaderMap::new(), proxy, &trusted).len(), 32);
    }
}
