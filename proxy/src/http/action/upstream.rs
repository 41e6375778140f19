//! The upstream action: the request rewritten for the app (forwarding headers, no hop-by-hop fields,
//! HTTP/1.1), sent through `upstream::forward`, and the response rewritten for the client (no hop-by-hop
//! fields, no version banners). A typed failure becomes our own page (502, 504, 413, 408) with no
//! upstream detail. WebSocket upgrades (the only upgrade forwarded) become a byte tunnel once both sides agree.

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use portcullis_config::Route;

use crate::body::{self, Body};
use crate::http::ctx::Ctx;
use crate::http::filters::{Admitted, closing, timed_out, too_large};
use crate::http::guard::UpgradeGate;
use crate::http::request_id::X_REQUEST_ID;
use crate::http::{client_cert, forwarded, hop, pages, tunnel};
use crate::pace::Rule;
use crate::telemetry::{Access, refused};
use crate::upstream::{self, Answer, Failure};

pub async fn run(
    ctx: &Ctx<'_>,
    route: &Route,
    group: usize,
    requested: Option<HeaderValue>,
    admitted: Admitted,
    mut req: Request<Incoming>,
    access: Option<&mut Access>,
) -> Response<Body> {
    let group = ctx.snap.upstreams.group(group);
    if let Some(a) = access {
        a.upstream = Some(group.name.clone());
    }
    let h1 = req.version() != Version::HTTP_2;

    // WebSocket over HTTP/1.1: keep the client's half of the upgrade before the request moves. No other
    // protocol is forwarded as an upgrade: `h2c` is never valid over TLS (RFC 9113 §3.1), and an upstream that
    // switched to it (or to anything else) would open a tunnel past every per-request rule. Such a request
    // goes upstream as a plain request, its `Upgrade` dropped with the other hop-by-hop fields.
    // The same rule the guard waits on (`UpgradeGate::asks`), so the two never disagree on what an upgrade is.
    let upgrade = if UpgradeGate::asks(&req) {
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
        ctx.peer,
        &ctx.lease.peer,
        ctx.client,
        requested.as_ref(),
        &ctx.lease.port,
        &ctx.snap.config.trusted_proxies,
    );
    client_cert::set(
        &mut parts.headers,
        admitted.client_auth,
        admitted.client_cert.as_ref().map(|(c, v)| (&**c, v)),
    );
    parts.headers.insert(X_REQUEST_ID, ctx.request_id.clone());
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
    parts.version = Version::HTTP_11;
    // A declared length was checked by the filters (and hyper holds the client to it); anything else is
    // counted. HTTP/2 bodies are also held to `client_body` here (the guard does it for HTTP/1.1).
    let body = if let Some(whole) = admitted.buffered {
        Body::full(whole)
    } else if !h1 {
        let left = if admitted.declared.is_some() {
            u64::MAX
        } else {
            route.max_body
        };
        Body::watched(body, left, Rule::of(&ctx.snap.config))
    } else if admitted.declared.is_some() {
        Body::Stream(body)
    } else {
        Body::Limited {
            inner: body,
            left: route.max_body,
        }
    };

    // Request buffering: the app sees the request once its whole body is here (never for an upgrade, whose
    // bytes after the head belong to the tunnel). It goes with its exact length, however it came.
    let body = if route.buffer_requests && upgrade.is_none() && !body.is_end_stream() {
        match body::collect(&ctx.shared.buffers, body, route.max_body).await {
            Ok(whole) => {
                parts.headers.remove(header::TRANSFER_ENCODING);
                parts
                    .headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(whole.len));
                whole.body
            }
            Err(refused) => return refused_body(ctx, h1, refused),
        }
    } else {
        body
    };

    let upstream_req = Request::from_parts(parts, body);
    // The response's body is buffered (unless it streams) before the server is judged: one that breaks off
    // before the client got anything is a failure an idempotent request may retry elsewhere.
    let finish = upstream::Finish {
        buffers: &ctx.shared.buffers,
        buffer: route.buffer_responses,
    };
    let mut res = match upstream::forward(group, ctx.client, upstream_req, finish).await {
        Ok(Answer::Fed(mut res)) => {
            hop::strip(res.headers_mut());
            crate::http::headers::strip_banners(res.headers_mut());
            return res;
        }
        Ok(Answer::Switched(res)) => res,
        Err(Failure::Timeout) => {
            tracing::warn!(upstream = %group.name, "upstream timed out");
            return pages::status(StatusCode::GATEWAY_TIMEOUT);
        }
        Err(Failure::BodyTooLarge) => return too_large(h1),
        Err(Failure::BodyTimeout(cut)) => {
            // The guard logs HTTP/1.1's (it cut the body off).
            if !h1 {
                refused!(ctx.shared.refusals, BodyTimeout => info!(target: "access", client = %ctx.client, reason = cut.reason(), "request body timed out"));
            }
            return timed_out(h1);
        }
        Err(
            e
            @ (Failure::Connect(_) | Failure::Reset(_) | Failure::NoServer | Failure::BrokeOff(_)),
        ) => {
            tracing::warn!(upstream = %group.name, error = %e, "upstream failed");
            return pages::status(StatusCode::BAD_GATEWAY);
        }
    };

    // 101 Switching Protocols: the app took the upgrade.
    let Some((_, client_side)) = upgrade else {
        // The app switched protocols without being asked: nothing sane to forward.
        return pages::status(StatusCode::BAD_GATEWAY);
    };
    let upstream_side = hyper::upgrade::on(&mut res);
    let (mut parts, _) = res.into_parts();
    let proto = parts.headers.get(header::UPGRADE).cloned();
    let open = ctx.shared.metrics.tunnel_opened();
    let tunnel = tunnel::run(
        client_side,
        upstream_side,
        ctx.snap.config.timeouts.tunnel_idle,
        ctx.lease.clone(),
    );
    tokio::spawn(async move {
        tunnel.await;
        drop(open);
    });
    hop::strip(&mut parts.headers);
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(p) = proto {
        parts.headers.insert(header::UPGRADE, p);
    }
    crate::http::headers::strip_banners(&mut parts.headers);
    Response::from_parts(parts, Body::Empty)
}

/// The answer to a request whose body was not buffered whole; it never reached the app. On HTTP/1.1 the
/// connection closes after it: what is left of the body is still on the wire.
fn refused_body(ctx: &Ctx<'_>, h1: bool, why: body::Refused) -> Response<Body> {
    let status = match why {
        body::Refused::TooLarge => return too_large(h1),
        body::Refused::TimedOut(cut) => {
            // The guard logged HTTP/1.1's own cut-off; HTTP/2 bodies are judged by `Body::Watched`.
            if !h1 {
                refused!(ctx.shared.refusals, BodyTimeout => info!(target: "access", client = %ctx.client, reason = cut.reason(), "request body timed out"));
            }
            StatusCode::REQUEST_TIMEOUT
        }
        // Nobody is left to read an answer; the access log still shows one.
        body::Refused::Gone => StatusCode::BAD_REQUEST,
        body::Refused::Full => {
            let (memory, disk) = ctx.shared.buffers.used();
            tracing::warn!(
                memory,
                disk,
                "request refused (503): the temporary files of buffered bodies reached [buffers] disk"
            );
            StatusCode::SERVICE_UNAVAILABLE
        }
        body::Refused::Io(e) => {
            tracing::warn!(error = %e, dir = %ctx.snap.config.process.temp_dir.display(), "request refused (503): cannot write a buffered body to [process] temp_dir");
            StatusCode::SERVICE_UNAVAILABLE
        }
    };
    closing(status, h1)
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
