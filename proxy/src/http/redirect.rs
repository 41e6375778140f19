//! The plain-HTTP listener's one job: `301` to the same path and query on HTTPS. The host comes from the
//! request only when it is one of `names` (or any valid host when no names are set); it never reaches an
//! upstream.

use http::header::HeaderValue;
use http::{Request, Response, StatusCode};

use crate::acme;
use crate::body::Body;
use crate::http::{host, pages};
use crate::state::{Shared, Snapshot};

pub async fn handle<B>(shared: &Shared, snap: &Snapshot, req: &Request<B>) -> Response<Body> {
    // ACME HTTP-01: a pending token is answered here, before any redirect (with `[cluster]`, another
    // node's too).
    if let Some(answer) = acme::http01::answer(&shared.challenges, req.uri().path()).await {
        return pages::acme_http01(answer);
    }
    let names = &snap.redirect_names;
    let requested = host::requested(req);
    let target = match requested.as_ref().and_then(host::name) {
        Some(h) if names.is_empty() || host::allowed(names, h) => h.to_ascii_lowercase(),
        // An HTTP/1.0 request without Host: send it to the first concrete name, if there is one.
        None if requested.is_none() => match names.iter().find(|n| !n.starts_with("*.")) {
            Some(n) => n.clone(),
            None => return pages::status(StatusCode::BAD_REQUEST),
        },
        _ => return pages::status(StatusCode::BAD_REQUEST),
    };
    let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let location = format!("https://{target}{}{pq}", snap.redirect_port);
    match HeaderValue::from_str(&location) {
        Ok(v) => pages::redirect(v),
        Err(_) => pages::status(StatusCode::BAD_REQUEST),
    }
}
