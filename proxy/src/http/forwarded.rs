//! Forwarding headers: what the upstream learns about the client. Client-sent `X-Forwarded-*`, `X-Real-IP`,
//! `Forwarded` (RFC 7239) and the other headers in which proxies name the client, its port, path prefix or
//! scheme ([`CLAIMS`]) are removed or replaced unless the peer is a configured trusted proxy; then the
//! client is the right-most address in `X-Forwarded-For` that is not itself trusted.

use std::net::IpAddr;

use http::HeaderMap;
use http::header::{FORWARDED, HeaderName, HeaderValue};
use portcullis_config::Cidr;

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
pub const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const HTTPS: HeaderValue = HeaderValue::from_static("https");

/// Headers in which a proxy tells the app who the client is or how the request reached it, and which
/// frameworks believe when configured to (Werkzeug's `ProxyFix` reads `X-Forwarded-Port`/`-Prefix`;
/// django-ipware, Spring, Laravel and others the client-IP family; gunicorn and Rack the scheme family).
/// From an untrusted peer each is the client's own claim: removed. The ones we set ourselves
/// (`X-Forwarded-For`, `-Proto`, `-Host`, `-Port`, `X-Real-IP`) are replaced instead.
pub const CLAIMS: [HeaderName; 13] = [
    FORWARDED,
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-client-ip"),
    HeaderName::from_static("true-client-ip"),
    HeaderName::from_static("cf-connecting-ip"),
    HeaderName::from_static("x-cluster-client-ip"),
    HeaderName::from_static("fastly-client-ip"),
    HeaderName::from_static("x-original-forwarded-for"),
    // Scheme: gunicorn's `secure_scheme_headers`, Rack's `X-Forwarded-Scheme`/`-Ssl`, IIS's.
    HeaderName::from_static("x-forwarded-ssl"),
    HeaderName::from_static("x-forwarded-protocol"),
    HeaderName::from_static("x-forwarded-scheme"),
    HeaderName::from_static("x-url-scheme"),
    HeaderName::from_static("front-end-https"),
];

/// The client's address as far as we can trust it: the peer, or, from a trusted peer, the right-most
/// untrusted hop of its `X-Forwarded-For`.
pub fn client_addr(headers: &HeaderMap, peer: IpAddr, trusted: &[Cidr]) -> IpAddr {
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let mut client = peer;
    let hops = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.rsplit(','))
        .map(str::trim);
    for hop in hops {
        match hop.parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !is_trusted(ip, trusted) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    client
}

/// Whether `ip` is one of `trusted_proxies`.
pub fn is_trusted(ip: IpAddr, trusted: &[Cidr]) -> bool {
    trusted.iter().any(|c| c.contains(ip))
}

/// Rewrites the forwarding headers of a request going upstream. `peer_text` is `peer` as a header value
/// (the connection's, made once), `host` the Host the client asked for, `port` the port of the listener it
/// connected to.
pub fn set(
    headers: &mut HeaderMap,
    peer: IpAddr,
    peer_text: &HeaderValue,
    client: IpAddr,
    host: Option<&HeaderValue>,
    port: &HeaderValue,
    trusted: &[Cidr],
) {
    let peer_trusted = !trusted.is_empty() && is_trusted(peer, trusted);
    if peer_trusted {
        // Keep the chain and append the peer, as every proxy in the chain does.
        let chain: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if chain.is_empty() {
            headers.insert(X_FORWARDED_FOR, peer_text.clone());
        } else {
            let xff = format!("{}, {peer}", chain.join(", "));
            set_text(headers, X_FORWARDED_FOR, &xff);
        }
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO, HTTPS);
        }
        if !headers.contains_key(&X_FORWARDED_HOST) {
            set_host(headers, host);
        }
        if !headers.contains_key(&X_FORWARDED_PORT) {
            headers.insert(X_FORWARDED_PORT, port.clone());
        }
    } else {
        for name in CLAIMS {
            headers.remove(name);
        }
        headers.insert(X_FORWARDED_PROTO, HTTPS);
        headers.insert(X_FORWARDED_PORT, port.clone());
        set_host(headers, host);
        // Untrusted peer: the client is the peer, so both headers carry the connection's one value.
        headers.insert(X_FORWARDED_FOR, peer_text.clone());
        if client == peer {
            headers.insert(X_REAL_IP, peer_text.clone());
            return;
        }
    }
    set_text(headers, X_REAL_IP, &client.to_string());
}

fn set_host(headers: &mut HeaderMap, host: Option<&HeaderValue>) {
    match host {
        Some(h) => {
            headers.insert(X_FORWARDED_HOST, h.clone());
        }
        None => {
            headers.remove(X_FORWARDED_HOST);
        }
    }
}

fn set_text(headers: &mut HeaderMap, name: HeaderName, text: &str) {
    // IP addresses and comma lists of them are always valid header values.
    if let Ok(v) = HeaderValue::from_str(text) {
        headers.insert(name, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PORT: HeaderValue = HeaderValue::from_static("8443");

    /// Every header a client could use to claim an address, port, prefix or scheme, with spoofed values
    /// (twice each, as a client may repeat a field).
    fn text(ip: IpAddr) -> HeaderValue {
        HeaderValue::from_str(&ip.to_string()).unwrap()
    }

    fn spoofed() -> HeaderMap {
        let mut h = HeaderMap::new();
        for name in CLAIMS.into_iter().chain([
            X_FORWARDED_FOR,
            X_REAL_IP,
            X_FORWARDED_PROTO,
            X_FORWARDED_PORT,
        ]) {
            h.append(&name, HeaderValue::from_static("6.6.6.6"));
            h.append(name, HeaderValue::from_static("http"));
        }
        h
    }

    #[test]
    fn untrusted_peers_cannot_spoof() {
        let mut h = spoofed();
        let peer: IpAddr = "192.0.2.1".parse().unwrap();
        let client = client_addr(&h, peer, &[]);
        assert_eq!(client, peer);
        set(
            &mut h,
            peer,
            &text(peer),
            client,
            Some(&HeaderValue::from_static("example.com")),
            &PORT,
            &[],
        );
        assert_eq!(h[&X_FORWARDED_FOR], "192.0.2.1");
        assert_eq!(h[&X_REAL_IP], "192.0.2.1");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert_eq!(h[&X_FORWARDED_HOST], "example.com");
        assert_eq!(h[&X_FORWARDED_PORT], "8443");
        for name in CLAIMS {
            assert!(!h.contains_key(&name), "{name} reached the app");
        }
        // One value each for what we set (a repeated client field must not survive next to ours).
        assert_eq!(h.len(), 5, "{h:?}");
    }

    #[test]
    fn a_trusted_proxy_keeps_its_claims_and_its_port() {
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_PORT, HeaderValue::from_static("443"));
        h.insert(CLAIMS[3].clone(), HeaderValue::from_static("203.0.113.9"));
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        set(&mut h, peer, &text(peer), peer, None, &PORT, &trusted);
        assert_eq!(h[&X_FORWARDED_PORT], "443");
        assert_eq!(h["true-client-ip"], "203.0.113.9");
        // Without one, the port is ours.
        let mut h = HeaderMap::new();
        set(&mut h, peer, &text(peer), peer, None, &PORT, &trusted);
        assert_eq!(h[&X_FORWARDED_PORT], "8443");
    }

    #[test]
    fn trusted_peers_pass_the_chain_and_the_client_is_the_rightmost_untrusted() {
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = HeaderMap::new();
        h.insert(
            X_FORWARDED_FOR,
            HeaderValue::from_static("6.6.6.6, 203.0.113.9, 10.1.1.1"),
        );
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        let client = client_addr(&h, peer, &trusted);
        assert_eq!(client, "203.0.113.9".parse::<IpAddr>().unwrap());
        set(&mut h, peer, &text(peer), client, None, &PORT, &trusted);
        assert_eq!(
            h[&X_FORWARDED_FOR],
            "6.6.6.6, 203.0.113.9, 10.1.1.1, 10.0.0.2"
        );
        assert_eq!(h[&X_REAL_IP], "203.0.113.9");
    }
}
