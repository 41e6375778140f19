//! Route actions: what a route does with a request the filters let through. One file per action:
//! `upstream` forwards to the route's upstream group, with `maintenance` in front of it (the flag file, or
//! no server up); `static_files` serves a folder or a file, and does not go through the maintenance check:
//! static routes keep working during maintenance. Redirects join them here as the config grows them.

pub mod maintenance;
mod static_files;
mod upstream;

use std::time::Instant;

use http::header::HeaderValue;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use portcullis_config::{Action, Route};

use crate::body::Body;
use crate::http::ctx::Ctx;
use crate::http::filters::Admitted;
use crate::http::pages;
use crate::telemetry::Access;

/// Runs `route`'s action. `requested` is the Host (or `:authority`) the client asked for.
pub async fn run(
    ctx: &Ctx<'_>,
    route: &Route,
    requested: Option<HeaderValue>,
    admitted: Admitted,
    req: Request<Incoming>,
    access: Option<&mut Access>,
) -> Response<Body> {
    match &route.action {
        // No upstream to name in the access line, and no maintenance: the files are there either way.
        Action::Static(st) => static_files::run(route, st, req).await,
        &Action::Upstream(group) => {
            // Maintenance, for everyone outside `allow` (the real client, after trusted proxies): while the
            // flag file exists the request never reaches the app (nor is its body read).
            let maintenance = &ctx.snap.maintenance;
            let allowed = maintenance.allows(ctx.client);
            if !allowed && maintenance.flagged(Instant::now()) {
                if let Some(a) = access {
                    a.upstream = Some(ctx.snap.upstreams.group(group).name.clone());
                }
                return maintenance.response();
            }
            // No server up: one request a second tries the one that failed longest ago; the rest get the
            // page at once.
            let g = ctx.snap.upstreams.group(group);
            let now = Instant::now();
            if !allowed && !g.any_up(now) && !g.may_probe(now) {
                if let Some(a) = access {
                    a.upstream = Some(g.name.clone());
                }
                return maintenance.response();
            }
            let res = upstream::run(ctx, route, group, requested, admitted, req, access).await;
            // No server is up (known down, or it just failed): `forward` tried the one that failed longest
            // ago anyway; it failed too, so the page says so rather than a 502.
            if !allowed
                && res.status() == StatusCode::BAD_GATEWAY
                && pages::is_ours(&res)
                && !ctx.snap.upstreams.group(group).any_up(Instant::now())
            {
                return maintenance.response();
            }
            res
        }
    }
}
