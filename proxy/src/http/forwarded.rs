//! Forwarding headers: what the upstream learns about the client. Client-sent `X-Forwarded-*`, `X-Real-IP`
//! and `Forwarded` (RFC 7239) are removed unless the peer is a configured trusted proxy; then the client is the
//! right-most address in `X-Forwarded-For` that is not itself trusted.

use std::net::IpAddr;

use http::HeaderMap;
use http::header::{FORWARDED, HeaderName, HeaderValue};
use portcullis_config::Cidr;

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const HTTPS: HeaderValue = HeaderValue::from_static("https");

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

fn is_trusted(ip: IpAddr, trusted: &[Cidr]) -> bool {
    trusted.iter().any(|c| c.contains(ip))
}

/// Rewrites the forwarding headers of a request going upstream. `host` is the Host the client asked for.
pub fn set(
    headers: &mut HeaderMap,
    peer: IpAddr,
    client: IpAddr,
    host: Option<&HeaderValue>,
    trusted: &[Cidr],
) {
    let peer_trusted = !trusted.is_empty() && is_trusted(peer, trusted);
    let peer_text = peer.to_string();
    if peer_trusted {
        // Keep the chain and append the peer, as every proxy in the chain does.
        let chain: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let xff = if chain.is_empty() {
            peer_text
        } else {
            format!("{}, {peer_text}", chain.join(", "))
        };
        set_text(headers, X_FORWARDED_FOR, &xff);
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO, HTTPS);
        }
        if !headers.contains_key(&X_FORWARDED_HOST) {
            set_host(headers, host);
        }
    } else {
        headers.remove(FORWARDED);
        headers.insert(X_FORWARDED_PROTO, HTTPS);
        set_host(headers, host);
        // Untrusted peer: the client is the peer, so both headers carry one value (formatted once).
        if let Ok(v) = HeaderValue::from_str(&peer_text) {
            headers.insert(X_FORWARDED_FOR, v.clone());
            if client == peer {
                headers.insert(X_REAL_IP, v);
                return;
            }
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

    #[test]
    fn untrusted_peers_cannot_spoof() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        h.insert(X_REAL_IP, HeaderValue::from_static("6.6.6.6"));
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        h.insert(FORWARDED, HeaderValue::from_static("for=6.6.6.6"));
        let peer: IpAddr = "192.0.2.1".parse().unwrap();
        let client = client_addr(&h, peer, &[]);
        assert_eq!(client, peer);
        set(
            &mut h,
            peer,
            client,
            Some(&HeaderValue::from_static("example.com")),
            &[],
        );
        assert_eq!(h[&X_FORWARDED_FOR], "192.0.2.1");
        assert_eq!(h[&X_REAL_IP], "192.0.2.1");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert_eq!(h[&X_FORWARDED_HOST], "example.com");
        assert!(!h.contains_key(FORWARDED));
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
        set(&mut h, peer, client, None, &trusted);
        assert_eq!(
            h[&X_FORWARDED_FOR],
            "6.6.6.6, 203.0.113.9, 10.1.1.1, 10.0.0.2"
        );
        assert_eq!(h[&X_REAL_IP], "203.0.113.9");
    }
}
