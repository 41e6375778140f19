//! Which requests a limit counts (method and path, matched against values computed at start, with `%`
//! escapes and `//` seen as the app will see them; exempt networks), the key a client is counted under
//! (IPv4 address, IPv6 prefix), and what a refusal is (its counter, its rate-capped log line, `Retry-After`
//! rounded up to whole seconds). Where the counts are kept is `store`'s.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{Method, StatusCode};
use portcullis_config::{Cidr, PathMatch, RateKey, RateLimit};

use crate::telemetry::{Refusals, refused};

/// Why a request a limit counts is not forwarded; the HTTP layer answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Over a limit: `429` with `Retry-After` in whole seconds (RFC 9110 §10.2.3), when a retry will pass.
    Limited { retry_after: u64 },
    /// The body that names the account could not be read: too large (413), stalled (408) or broken (400).
    Body(StatusCode),
}

/// One `[[rate_limit]]`: what it counts, and the store it counts in.
pub struct Limit<S> {
    pub name: String,
    paths: Vec<PathMatch>,
    methods: Vec<Method>,
    exempt: Vec<Cidr>,
    ipv6_prefix: u8,
    /// `per_account`: the form or JSON field that names the account.
    pub(super) account_field: Option<String>,
    pub(super) store: S,
    rejected: AtomicU64,
    /// What it was built from: a reload keeps the limit (and its counts) when its settings are the same.
    pub(super) settings: RateLimit,
}

impl<S> Limit<S> {
    pub fn new(c: &RateLimit, store: S) -> Limit<S> {
        Limit {
            name: c.name.clone(),
            paths: c.paths.clone(),
            // Checked as upper-case ASCII tokens by the config: always valid methods.
            methods: c
                .methods
                .iter()
                .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                .collect(),
            exempt: c.exempt.clone(),
            ipv6_prefix: c.ipv6_prefix,
            account_field: c.per_account.as_ref().map(|p| p.field.clone()),
            store,
            rejected: AtomicU64::new(0),
            settings: c.clone(),
        }
    }

    pub(super) fn matches(&self, method: &Method, path: &str) -> bool {
        if !self.methods.iter().any(|m| m == method) {
            return false;
        }
        if path.contains('%') || path.contains("//") {
            // What the app will route on: gunicorn decodes escapes, and `/log%69n` is `/login` to Django.
            let path = normalize(path);
            self.paths.iter().any(|p| p.matches(&path))
        } else {
            self.paths.iter().any(|p| p.matches(path))
        }
    }

    pub(super) fn exempts(&self, client: IpAddr) -> bool {
        self.exempt.iter().any(|c| c.contains(client))
    }

    /// The key `client` is counted under: with `key = "client_cert"` its certificate's (`cert_key`, the
    /// first 128 bits of its SHA-256 fingerprint) when it has one, else its address's.
    pub(super) fn client_key(&self, client: IpAddr, cert_key: Option<u128>) -> u128 {
        match (self.settings.key, cert_key) {
            (RateKey::ClientCert, Some(k)) => k,
            _ => client_key(client, self.ipv6_prefix),
        }
    }

    /// Rejections so far (for the metrics).
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Counts the refusal, logs it (within the log's budget) and says when a retry will pass.
    pub(super) fn refuse(
        &self,
        client: IpAddr,
        account: Option<&str>,
        wait: Duration,
        refusals: &Refusals,
    ) -> Refused {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        let retry_after = whole_seconds_up(wait);
        // `?`: the account name is the client's text, quoted and escaped in the log.
        refused!(refusals, RateLimited => warn!(client = %client, limit = %self.name, account = ?account, retry_after, "rate limited"));
        Refused::Limited { retry_after }
    }
}

/// The key a client is counted under: its IPv4 address (as `::ffff:a.b.c.d`), or its IPv6 address cut to
/// `ipv6_prefix` bits. An IPv4-mapped IPv6 peer counts as the IPv4 address it is.
pub fn client_key(ip: IpAddr, ipv6_prefix: u8) -> u128 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => (0xffff_u128 << 32) | u128::from(u32::from(v4)),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            match ipv6_prefix.min(128) {
                0 => 0,
                p => bits & (u128::MAX << (128 - u32::from(p))),
            }
        }
    }
}

/// `Retry-After` is whole seconds (RFC 9110 §10.2.3): rounded up, so a retry at that time passes.
pub(super) fn whole_seconds_up(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// Percent escapes decoded and runs of `/` merged: the path as the app will see it, for matching only.
fn normalize(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let byte = match (
            b[i],
            b.get(i + 1).and_then(|h| hex(*h)),
            b.get(i + 2).and_then(|l| hex(*l)),
        ) {
            (b'%', Some(h), Some(l)) => {
                i += 3;
                h << 4 | l
            }
            (c, _, _) => {
                i += 1;
                c
            }
        };
        if !(byte == b'/' && out.last() == Some(&b'/')) {
            out.push(byte);
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(super) fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(whole_seconds_up(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds_up(Duration::from_millis(1000)), 1);
        assert_eq!(whole_seconds_up(Duration::from_millis(1001)), 2);
        assert_eq!(whole_seconds_up(Duration::ZERO), 1);
    }

    #[test]
    fn ipv6_clients_share_their_prefix_and_ipv4_maps_to_itself() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a, 64), client_key(b, 64));
        assert_ne!(client_key(a, 64), client_key(c, 64));
        assert_ne!(client_key(a, 128), client_key(b, 128));
        assert_eq!(client_key(a, 48), client_key(c, 48));
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(client_key(v4, 64), client_key(mapped, 64));
        assert_ne!(
            client_key(v4, 64),
            client_key("192.0.2.8".parse().unwrap(), 64)
        );
    }
}
