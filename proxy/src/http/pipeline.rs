//! One request, in phases: site (the Host, held to the SNI) -> route (longest prefix within the site) ->
//! request filters (`filters`: body limit, rate limits) -> the route's action (`action`) -> response filters
//! (the request counted, `metrics::RouteCell`: by route, method and status class, and its latency to the
//! response head; the route's `compress`, then the security headers, on every response, ours or the app's) -> access log (when the body
//! ends). Each request takes the live config snapshot when it starts and keeps it to its end. Plain HTTP
//! goes to `redirect`.

use std::convert::Infallible;
use std::net::IpAddr;
use std::time::Instant;

use http::header::HeaderValue;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::Body;
use crate::http::ctx::{Ctx, Lease};
use crate::http::request_id::X_REQUEST_ID;
use crate::http::{action, compress, filters, forwarded, h2, host, pages, redirect};
use crate::metrics;
use crate::state::Shared;
use crate::telemetry::{Access, Logged};

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Https,
    /// Plain HTTP: redirects only.
    Http,
}

/// Serves one request: the response always carries the security headers, and is logged when done.
/// `sni` is the name the TLS handshake sent (None without SNI).
pub async fn serve(
    shared: &Shared,
    listener: Listener,
    sni: Option<&str>,
    peer: IpAddr,
    lease: &Lease,
    req: Request<Incoming>,
) -> Result<Response<Logged>, Infallible> {
    let start = Instant::now();
    let snap = shared.snapshot();
    let method = metrics::method_index(req.method());
    // HTTP/2 is held to the limits the guard holds HTTP/1.1 heads to; refused alike (no access line).
    if let Some(res) = h2::refusal(shared, &snap, peer, &req) {
        snap.routes
            .unrouted
            .count(method, res.status(), start.elapsed());
        return Ok(res.map(|b| Logged::new(b, None)));
    }
    let client = forwarded::client_addr(req.headers(), peer, &snap.config.trusted_proxies);
    let request_id = shared
        .request_ids
        .pick(req.headers(), peer, &snap.config.trusted_proxies);
    let mut access = snap.config.log.access.then(|| {
        Box::new(Access {
            start,
            client,
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            status: StatusCode::OK,
            upstream: None,
            bytes: 0,
            request_id: request_id.clone(),
            client_cert: lease.client_cert.clone(),
        })
    });
    let ctx = Ctx {
        shared,
        snap: &snap,
        peer,
        client,
        lease,
        request_id: &request_id,
    };
    let (mut res, cell) = match listener {
        Listener::Https => {
            let (res, route) = https(&ctx, sni, req, access.as_deref_mut()).await;
            let cell = route.map_or(&snap.routes.unrouted, |(s, r)| snap.routes.route(s, r));
            (res, cell)
        }
        Listener::Http => (
            redirect::handle(shared, &snap, &req).await,
            &snap.routes.redirect,
        ),
    };
    cell.count(method, res.status(), start.elapsed());
    // Response filters: the client learns the id its request is known by (the app's own is replaced).
    res.headers_mut().insert(X_REQUEST_ID, request_id);
    snap.headers
        .apply(res.headers_mut(), listener == Listener::Https);
    if let Some(a) = access.as_deref_mut() {
        a.status = res.status();
    }
    Ok(res.map(|b| Logged::new(b, access)))
}

/// The response, and the (site, route) indices of the route that took the request, if one did.
async fn https(
    ctx: &Ctx<'_>,
    sni: Option<&str>,
    mut req: Request<Incoming>,
    access: Option<&mut Access>,
) -> (Response<Body>, Option<(usize, usize)>) {
    let requested = host::requested(&req);
    let Some(site) = site_for(ctx, sni, requested.as_ref()) else {
        return (pages::status(StatusCode::MISDIRECTED_REQUEST), None);
    };
    let routes = &ctx.snap.config.sites[site].routes;
    let path = req.uri().path();
    let Some(index) = routes.iter().position(|r| r.matches(path)) else {
        return (pages::status(StatusCode::NOT_FOUND), None);
    };
    let route = &routes[index];
    let taken = Some((site, index));
    let admitted = match filters::request(ctx, site, route, &mut req).await {
        Ok(a) => a,
        Err(refused) => return (refused, taken),
    };
    // Compression is a response filter of the route's: what it needs from the request is taken now.
    let asked = route.compress.then(|| compress::Asked::of(&req));
    let res = action::run(ctx, route, requested, admitted, req, access).await;
    let res = match asked {
        Some(asked) => compress::apply(asked, res).await,
        None => res,
    };
    (res, taken)
}

/// The site a request is for: the one its Host names, which must be the one its SNI names (else 421,
/// RFC 9110 §15.5.20); a Host no site names goes to a default site without names (a catch-all), if any.
/// Both names are looked up in the request's snapshot, so they are judged against one site set even when a
/// reload changed the sites since the connection's handshake. An SNI that names no site constrains nothing.
fn site_for(ctx: &Ctx<'_>, sni: Option<&str>, requested: Option<&HeaderValue>) -> Option<usize> {
    let sites = &ctx.snap.sites;
    let host = requested.and_then(host::name);
    let by_host = host.and_then(|h| sites.site_for(h));
    let by_sni = match sni {
        None => None,
        // The usual case: the Host is the SNI's name, so the same site, without a second lookup.
        Some(n) if host.is_some_and(|h| h.eq_ignore_ascii_case(n)) => by_host,
        Some(n) => sites.site_for(n),
    };
    match by_host {
        Some(by_host) => by_sni.is_none_or(|s| s == by_host).then_some(by_host),
        None => {
            let catch_all = ctx
                .snap
                .config
                .sites
                .first()
                .is_some_and(|s| s.names.is_empty());
            (catch_all && by_sni.is_none_or(|s| s == 0)).then_some(0)
        }
    }
}
