//! Route actions: what a route does with a request the filters let through. One file per action:
//! `upstream` forwards to the route's upstream group; static files, the maintenance page and redirects
//! join it here as the config grows those actions.

mod upstream;

use http::header::HeaderValue;
use http::{Request, Response};
use hyper::body::Incoming;
use portcullis_config::{Action, Route};

use crate::body::Body;
use crate::http::ctx::Ctx;
use crate::http::filters::Admitted;
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
    match route.action {
        Action::Upstream(group) => {
            upstream::run(ctx, route, group, requested, admitted, req, access).await
        }
    }
}
