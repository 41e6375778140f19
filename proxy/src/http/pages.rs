//! What Portcullis answers with itself: the small HTML pages (redirects, 4xx, 502, 504), a rate limit's
//! refusal rendered from its decision (`429` with `Retry-After`), and the ACME HTTP-01 answer. They name no
//! internal address and carry no upstream error text; the security headers are added by the caller like on
//! any response.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::body::Body;
use crate::ratelimit::Refused;

/// The page of `$code $reason` with a sentence, as one `&'static str` (built at compile time).
macro_rules! page {
    ($code:literal, $reason:literal, $hint:literal) => {
        concat!(
            "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>",
            $code,
            " ",
            $reason,
            "</title></head>\n<body><h1>",
            $code,
            " ",
            $reason,
            "</h1><p>",
            $hint,
            "</p></body></html>\n"
        )
    };
}

/// The pages we answer with most, ready: serving one copies no byte and formats nothing.
fn ready(code: StatusCode) -> Option<&'static str> {
    Some(match code.as_u16() {
        400 => page!("400", "Bad Request", "The request could not be understood."),
        404 => page!("404", "Not Found", "There is nothing here."),
        405 => page!("405", "Method Not Allowed", ""),
        413 => page!(
            "413",
            "Payload Too Large",
            "The request body is larger than this server accepts."
        ),
        421 => page!(
            "421",
            "Misdirected Request",
            "This server does not serve that host name on this connection."
        ),
        429 => page!(
            "429",
            "Too Many Requests",
            "Too many requests. Please wait a moment before trying again."
        ),
        500 => page!("500", "Internal Server Error", ""),
        502 => page!(
            "502",
            "Bad Gateway",
            "The application is not answering. Please try again in a moment."
        ),
        503 => page!("503", "Service Unavailable", ""),
        504 => page!(
            "504",
            "Gateway Timeout",
            "The application took too long to answer. Please try again in a moment."
        ),
        _ => return None,
    })
}

/// A status page: `<h1>502 Bad Gateway</h1>` and a sentence, nothing else.
pub fn status(code: StatusCode) -> Response<Body> {
    let body = match ready(code) {
        Some(page) => Body::full(page),
        None => {
            let reason = code.canonical_reason().unwrap_or("Error");
            Body::full(format!(
                "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{} {reason}</title></head>\n<body><h1>{} {reason}</h1><p></p></body></html>\n",
                code.as_u16(),
                code.as_u16()
            ))
        }
    };
    let mut res = Response::new(body);
    *res.status_mut() = code;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res.extensions_mut().insert(Ours);
    res
}

/// Marks a status page as ours (an app's 502 is the app's answer; ours may become the maintenance page).
#[derive(Debug, Clone, Copy)]
struct Ours;

/// Whether `res` is one of our status pages, not a response from the app.
pub fn is_ours<B>(res: &Response<B>) -> bool {
    res.extensions().get::<Ours>().is_some()
}

/// What a rate limit refused: `429` with `Retry-After`, or the status an unreadable body earned.
pub fn rate_limited(refused: Refused) -> Response<Body> {
    match refused {
        Refused::Limited { retry_after } => too_many_requests(retry_after),
        Refused::Body(code) => status(code),
    }
}

/// The answer to an ACME HTTP-01 validation (RFC 8555 §8.3): the key authorization as `text/plain`, never
/// cached.
pub fn acme_http01(key_authorization: String) -> Response<Body> {
    let mut res = Response::new(Body::full(key_authorization));
    *res.status_mut() = StatusCode::OK;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// A `301` to `location`, with a one-line page for clients that do not follow it.
pub fn redirect(location: HeaderValue) -> Response<Body> {
    let mut res = Response::new(Body::full(
        "<!doctype html>\n<html><body><h1>301 Moved Permanently</h1></body></html>\n",
    ));
    *res.status_mut() = StatusCode::MOVED_PERMANENTLY;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    res.headers_mut().insert(header::LOCATION, location);
    res
}

/// A `429` (RFC 6585 §4) with `Retry-After` in whole seconds (RFC 9110 §10.2.3): when a retry will pass.
fn too_many_requests(retry_after_secs: u64) -> Response<Body> {
    let mut res = status(StatusCode::TOO_MANY_REQUESTS);
    res.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ready pages say what the formatted ones would: the canonical reason of their code.
    #[test]
    fn ready_pages_name_their_code_and_reason() {
        for n in 100..600u16 {
            let Ok(code) = StatusCode::from_u16(n) else {
                continue;
            };
            if let Some(page) = ready(code) {
                let reason = code.canonical_reason().unwrap();
                assert!(
                    page.contains(&format!("<title>{n} {reason}</title>")),
                    "{page}"
                );
                assert!(page.contains(&format!("<h1>{n} {reason}</h1>")), "{page}");
            }
        }
    }
}
