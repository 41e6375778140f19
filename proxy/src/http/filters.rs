//! Request filters: what is decided about a request before its route's action runs. Each either lets it
//! through or answers for it; the request reaches no upstream in that case. Today: the declared body
//! length against the route's `max_body` (413), then the rate limits (429).
//! First of all, a client certificate where the route (`require_client_cert`) or its site's `mode =
//! "required"` asks for one (403).

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use portcullis_config::{ClientAuthMode, Route};

use crate::body::Body;
use crate::http::client_cert::{self, ClientCert};
use crate::http::ctx::Ctx;
use crate::http::pages;

/// What the filters learnt about a request they let through.
pub struct Admitted {
    /// The body's declared length, already within the route's limit.
    pub declared: Option<u64>,
    /// The whole body, when a filter had to read it (a per_account rate limit); it is forwarded as is.
    pub buffered: Option<Bytes>,
    /// The site has `client_auth` (with its `forward_cert`): the app is told about the client certificate.
    pub client_auth: Option<bool>,
    /// The connection's client certificate, when it speaks for this request's site, and its verdict.
    pub client_cert: Option<(Arc<ClientCert>, HeaderValue)>,
}

/// Runs the request filters in order; `Err` is the answer for a request they stop.
pub async fn request(
    ctx: &Ctx<'_>,
    site_index: usize,
    route: &Route,
    req: &mut Request<Incoming>,
) -> Result<Admitted, Response<Body>> {
    let h1 = req.version() != Version::HTTP_2;
    // A client certificate, where the route or the site's mode requires one: 403 without a valid one.
    let site = &ctx.snap.config.sites[site_index];
    let client_cert = ctx
        .lease
        .client_cert
        .as_ref()
        .filter(|c| c.speaks_for(site))
        .and_then(|c| {
            let verifier = ctx.snap.client_auth.verifier(site_index)?;
            Some((c.clone(), c.verdict(&verifier)))
        });
    if let Some(auth) = &site.client_auth {
        let required = route.require_client_cert || auth.mode == ClientAuthMode::Required;
        let valid = client_cert
            .as_ref()
            .is_some_and(|(_, v)| client_cert::is_success(v));
        if required && !valid {
            return Err(pages::status(StatusCode::FORBIDDEN));
        }
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > route.max_body) {
        return Err(too_large(h1));
    }
    // Rate limits: only requests a limit counts take a lock; a per_account limit reads the (small) body.
    let mut buffered = None;
    let limits = &ctx.snap.rate_limits;
    if limits.applies(req.method(), req.uri().path()) {
        let body_timeout = ctx.snap.config.timeouts.client_body;
        buffered = limits
            .check(
                ctx.client,
                client_cert.as_ref().map(|(c, _)| c.rate_key),
                req,
                route.max_body,
                body_timeout,
            )
            .await
            .map_err(pages::rate_limited)?;
    }
    Ok(Admitted {
        declared,
        buffered,
        client_auth: site.client_auth.as_ref().map(|a| a.forward_cert),
        client_cert,
    })
}

/// 413; on HTTP/1.1 the connection closes after it, since the unread body is still on the wire.
pub fn too_large(h1: bool) -> Response<Body> {
    closing(StatusCode::PAYLOAD_TOO_LARGE, h1)
}

/// 408 for a body that kept us waiting too long (`pace.rs`); on HTTP/1.1 the connection closes after it,
/// since the rest of the body may still come.
pub fn timed_out(h1: bool) -> Response<Body> {
    closing(StatusCode::REQUEST_TIMEOUT, h1)
}

/// Our page for `status`, after which an HTTP/1.1 connection closes (`Connection: close`): what is left of
/// a refused body may still be on the wire.
pub fn closing(status: StatusCode, h1: bool) -> Response<Body> {
    let mut res = pages::status(status);
    if h1 {
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    res
}
