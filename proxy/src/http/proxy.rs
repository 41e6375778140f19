//! The request path on HTTPS: host check -> route -> upstream request (forwarding headers, no hop-by-hop
//! fields, HTTP/1.1) -> response (no hop-by-hop fields, no version banners) -> security headers and access
//! log on every response, ours or the app's. WebSocket upgrades (the only upgrade forwarded) become a byte tunnel once both sides agree.

use std::convert::Infallible;
use std::net::IpAddr;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;

use crate::body::Body;
use crate::http::server::Lease;
use crate::http::{forwarded, h2, hop, host, pages, redirect, tunnel};
use crate::state::State;
use crate::telemetry::{Access, Logged, refused};
use crate::upstream;

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Https,
    /// Plain HTTP: redirects only.
    Http,
}

/// Serves one request: the response always carries the security headers, and is logged when done.
/// `sni` is the site the TLS handshake named (None without SNI, or when it named no site); `lease` is
/// what the request's connection lends it (its port, and what an upgrade's tunnel keeps).
pub async fn serve(
    state: &State,
    listener: Listener,
    sni: Option<usize>,
    peer: IpAddr,
    lease: &Lease,
    req: Request<Incoming>,
) -> Result<Response<Logged>, Infallible> {
    let start = Instant::now();
    // HTTP/2 is held to the limits the guard holds HTTP/1.1 heads to; refused alike (no access line).
    if let Some(res) = h2::refusal(state, peer, &req) {
        return Ok(res.map(|b| Logged::new(b, None)));
    }
    let client = forwarded::client_addr(req.headers(), peer, &state.config.trusted_proxies);
    let mut access = state.config.log.access.then(|| {
        Box::new(Access {
            start,
            client,
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            status: StatusCode::OK,
            upstream: None,
            bytes: 0,
        })
    });
    let mut res = match listener {
        Listener::Https => proxy(state, sni, peer, client, lease, req, access.as_deref_mut()).await,
        Listener::Http => redirect::handle(state, &req),
    };
    state
        .headers
        .apply(res.headers_mut(), listener == Listener::Https);
    if let Some(a) = access.as_deref_mut() {
        a.status = res.status();
    }
    Ok(res.map(|b| Logged::new(b, access)))
}

async fn proxy(
    state: &State,
    sni: Option<usize>,
    peer: IpAddr,
    client: IpAddr,
    lease: &Lease,
    mut req: Request<Incoming>,
    access: Option<&mut Access>,
) -> Response<Body> {
    let requested = host::requested(&req);
    let Some(site) = site_for(state, sni, requested.as_ref()) else {
        return pages::status(StatusCode::MISDIRECTED_REQUEST);
    };
    let Some(route) = state.config.sites[site].route(req.uri().path()) else {
        return pages::status(StatusCode::NOT_FOUND);
    };
    let group = route.upstream;
    let h1 = req.version() != Version::HTTP_2;
    let max_body = route.max_body;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_body) {
        return too_large(h1);
    }
    // Rate limits: only requests a limit counts take a lock; a per_account limit reads the (small) body.
    let mut buffered = None;
    if state.rate_limits.applies(req.method(), req.uri().path()) {
        let body_timeout = state.config.timeouts.client_body;
        match state
            .rate_limits
            .check(client, &mut req, max_body, body_timeout)
            .await
        {
            Ok(body) => buffered = body,
            Err(refused) => return pages::rate_limited(refused),
        }
    }
    if let Some(a) = access {
        a.upstream = Some(state.upstreams.group(group).name.clone());
    }

    // WebSocket over HTTP/1.1: keep the client's half of the upgrade before the request moves. No other
    // protocol is forwarded as an upgrade: `h2c` is never valid over TLS (RFC 9113 §3.1), and an upstream that
    // switched to it (or to anything else) would open a tunnel past every per-request rule. Such a request
    // goes upstream as a plain request, its `Upgrade` dropped with the other hop-by-hop fields.
    let upgrade = if req.version() == Version::HTTP_11 && wants_upgrade(&req) {
        req.headers()
            .get(header::UPGRADE)
            .filter(|proto| proto.as_bytes().eq_ignore_ascii_case(b"websocket"))
            .cloned()
            .map(|proto| (proto, hyper::upgrade::on(&mut req)))
    } else {
        None
    };

    let (mut parts, body) = req.into_parts();
    hop::strip(&mut parts.headers);
    // We answer `Expect: 100-continue` ourselves (hyper sends 100 when the body is first read).
    parts.headers.remove(header::EXPECT);
    if !h1 {
        join_cookies(&mut parts.headers);
    }
    forwarded::set(
        &mut parts.headers,
        peer,
        client,
        requested.as_ref(),
        &lease.port,
        &state.config.trusted_proxies,
    );
    match &requested {
        Some(h) => {
            parts.headers.insert(header::HOST, h.clone());
        }
        None => {
            parts.headers.remove(header::HOST);
        }
    }
    if let Some((proto, _)) = &upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, proto.clone());
    }
    let pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut uri = Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(state.upstreams.pick(group).clone());
    uri = uri.path_and_query(pq);
    parts.uri = match uri.build() {
        Ok(u) => u,
        Err(_) => return pages::status(StatusCode::BAD_REQUEST),
    };
    parts.version = Version::HTTP_11;
    // A declared length was checked above (and hyper holds the client to it); anything else is counted.
    // HTTP/2 bodies are also held to `client_body` here (the guard does it for HTTP/1.1).
    let body = if let Some(whole) = buffered {
        Body::full(whole)
    } else if !h1 {
        let left = if declared.is_some() {
            u64::MAX
        } else {
            max_body
        };
        Body::watched(body, left, state.config.timeouts.client_body)
    } else if declared.is_some() {
        Body::Stream(body)
    } else {
        Body::Limited {
            inner: body,
            left: max_body,
        }
    };
    let upstream_req = Request::from_parts(parts, body);

    let res = match state.upstreams.send(upstream_req).await {
        Ok(res) => res,
        Err(upstream::Error::Timeout) => {
            tracing::warn!(upstream = %state.upstreams.group(group).name, "upstream timed out");
            return pages::status(StatusCode::GATEWAY_TIMEOUT);
        }
        Err(upstream::Error::BodyTooLarge) => {
            return too_large(h1);
        }
        Err(upstream::Error::BodyTimeout) => {
            refused!(state.refusals, BodyTimeout => info!(target: "access", client = %client, "request body timed out"));
            return pages::status(StatusCode::REQUEST_TIMEOUT);
        }
        Err(e @ upstream::Error::Unavailable(_)) => {
            tracing::warn!(upstream = %state.upstreams.group(group).name, error = %e, "upstream failed");
            return pages::status(StatusCode::BAD_GATEWAY);
        }
    };

    let mut res = res;
    if res.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some((_, client_side)) = upgrade else {
            // The app switched protocols without being asked: nothing sane to forward.
            return pages::status(StatusCode::BAD_GATEWAY);
        };
        let upstream_side = hyper::upgrade::on(&mut res);
        let (mut parts, _) = res.into_parts();
        let proto = parts.headers.get(header::UPGRADE).cloned();
        tokio::spawn(tunnel::run(
            client_side,
            upstream_side,
            state.config.timeouts.tunnel_idle,
            lease.clone(),
        ));
        hop::strip(&mut parts.headers);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(p) = proto {
            parts.headers.insert(header::UPGRADE, p);
        }
        crate::http::headers::strip_banners(&mut parts.headers);
        return Response::from_parts(parts, Body::Empty);
    }
    let (mut parts, body) = res.into_parts();
    hop::strip(&mut parts.headers);
    crate::http::headers::strip_banners(&mut parts.headers);
    Response::from_parts(parts, Body::Stream(body))
}

/// The site a request is for: the one its Host names, which must be the one its SNI named (else 421,
/// RFC 9110 §15.5.20); a Host no site names goes to a default site without names (a catch-all), if any.
fn site_for(state: &State, sni: Option<usize>, requested: Option<&HeaderValue>) -> Option<usize> {
    match requested
        .and_then(host::name)
        .and_then(|h| state.sites.site_for(h))
    {
        Some(by_host) => (sni.is_none() || sni == Some(by_host)).then_some(by_host),
        None => {
            let catch_all = state
                .config
                .sites
                .first()
                .is_some_and(|s| s.names.is_empty());
            (catch_all && sni.is_none_or(|s| s == 0)).then_some(0)
        }
    }
}

/// 413; on HTTP/1.1 the connection closes after it, since the unread body is still on the wire.
fn too_large(h1: bool) -> Response<Body> {
    let mut res = pages::status(StatusCode::PAYLOAD_TOO_LARGE);
    if h1 {
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    res
}

fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// HTTP/2 may split `cookie` into several fields; HTTP/1.1 wants one, joined by "; " (RFC 9113 §8.2.3).
fn join_cookies(headers: &mut http::HeaderMap) {
    let mut cookies = headers.get_all(header::COOKIE).iter();
    if cookies.next().is_none() || cookies.next().is_none() {
        return;
    }
    let joined = headers
        .get_all(header::COOKIE)
        .iter()
        .map(|v| v.as_bytes())
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}
