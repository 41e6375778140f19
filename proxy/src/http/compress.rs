//! Response compression, for routes with `compress = true`: gzip, br or zstd as the client's
//! `Accept-Encoding` prefers (q-values; tower-http's `Compression` chooses and encodes, deflate left out),
//! for text types of at least `COMPRESS_MIN_SIZE` bytes. Never for what BREACH or a cache would get wrong
//! ([`eligible`]): a response with `Set-Cookie` or `Cache-Control: no-transform`, one already encoded (the
//! app's own gzip, a static route's precompressed sibling), a range (`Content-Range`), a status other than
//! 200, 403 and 404 (nginx's rule: no 206, no 304), an answer to HEAD, or server-sent events (an encoder's
//! window held per open stream, to save a few bytes per event). A compressible response gets
//! `Vary: Accept-Encoding` whatever this client accepts; a compressed one a weak `ETag` (RFC 9110 §8.8.1:
//! the bytes differ). Streaming stays streaming: the encoder flushes whenever the body it reads has
//! nothing ready (async-compression's bufread encoders), so no chunk the app sent is held back.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::task::{Context, Poll};

use http::header::{self, HeaderValue};
use http::{Extensions, HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use portcullis_config::defaults::COMPRESS_MIN_SIZE;
use tower_http::compression::Compression;
use tower_service::Service;

use crate::body::{Body, Compressed};

/// What the request said that compression needs once its response is known.
#[derive(Debug)]
pub struct Asked {
    head: bool,
    /// The client's `Accept-Encoding` fields (none: it takes the response as it is).
    accept: HeaderMap,
}

impl Asked {
    pub fn of<B>(req: &Request<B>) -> Asked {
        let mut accept = HeaderMap::new();
        for v in req.headers().get_all(header::ACCEPT_ENCODING) {
            accept.append(header::ACCEPT_ENCODING, v.clone());
        }
        Asked {
            head: req.method() == Method::HEAD,
            accept,
        }
    }
}

/// `res`, compressed if it may be and the client accepts an encoding we have.
pub async fn apply(asked: Asked, mut res: Response<Body>) -> Response<Body> {
    if asked.head || !eligible(&res) {
        return res;
    }
    vary(res.headers_mut());
    if asked.accept.is_empty() {
        return res;
    }
    let status = res.status();
    let mut req = Request::new(());
    *req.headers_mut() = asked.accept;
    let mut svc = Compression::new(Answer(Some(res)))
        .no_deflate()
        .compress_when(decided);
    let Ok(res) = svc.call(req).await;
    let (mut parts, body) = res.into_parts();
    // tower-http answers 406 when the client refuses every coding, identity included; a proxy passes the
    // app's answer on as it is instead (RFC 9110 §12.5.3 lets a server ignore the field).
    parts.status = status;
    if parts.headers.contains_key(header::CONTENT_ENCODING) {
        weaken_etag(&mut parts.headers);
    }
    Response::from_parts(parts, Body::Compressed(Compressed(Box::pin(body))))
}

/// Whether `res` may be compressed at all (the client's `Accept-Encoding` aside).
pub fn eligible(res: &Response<Body>) -> bool {
    let h = res.headers();
    matches!(
        res.status(),
        StatusCode::OK | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND
    ) && !h.contains_key(header::CONTENT_ENCODING)
        && !h.contains_key(header::CONTENT_RANGE)
        && !h.contains_key(header::SET_COOKIE)
        && !no_transform(h)
        && h.get(header::CONTENT_TYPE).is_some_and(compressible)
        && length(res).is_none_or(|n| n >= COMPRESS_MIN_SIZE)
}

/// The media types worth compressing: text (not `text/event-stream`), JSON, JavaScript, XML and their
/// `+json`/`+xml` kin, SVG, WebAssembly, uncompressed fonts, icons. Images, audio, video, archives and
/// `woff`/`woff2` fonts are compressed already.
pub fn compressible(content_type: &HeaderValue) -> bool {
    let essence = content_type
        .as_bytes()
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    let Some(slash) = essence.iter().position(|&b| b == b'/') else {
        return false;
    };
    let (kind, sub) = (&essence[..slash], &essence[slash + 1..]);
    let is = |s: &[u8], name: &str| s.eq_ignore_ascii_case(name.as_bytes());
    let ends = |name: &str| sub.len() > name.len() && is(&sub[sub.len() - name.len()..], name);
    if is(kind, "text") {
        !is(sub, "event-stream")
    } else if is(kind, "application") {
        [
            "json",
            "javascript",
            "x-javascript",
            "ecmascript",
            "xml",
            "wasm",
            "vnd.ms-fontobject",
            "x-font-ttf",
        ]
        .iter()
        .any(|n| is(sub, n))
            || ends("+json")
            || ends("+xml")
    } else if is(kind, "image") {
        ["svg+xml", "x-icon", "vnd.microsoft.icon", "bmp"]
            .iter()
            .any(|n| is(sub, n))
    } else if is(kind, "font") {
        is(sub, "ttf") || is(sub, "otf")
    } else {
        false
    }
}

/// `Cache-Control: no-transform` in any of the response's fields (RFC 9111 §5.2.2.6).
fn no_transform(h: &HeaderMap) -> bool {
    h.get_all(header::CACHE_CONTROL).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|d| d.trim_ascii().eq_ignore_ascii_case(b"no-transform"))
    })
}

/// The body's length when known (a streamed body without `Content-Length` has none).
fn length(res: &Response<Body>) -> Option<u64> {
    res.body().size_hint().exact().or_else(|| {
        res.headers()
            .get(header::CONTENT_LENGTH)?
            .to_str()
            .ok()?
            .parse()
            .ok()
    })
}

/// Adds `Accept-Encoding` to `Vary` unless it is there (or `Vary: *` says everything).
fn vary(h: &mut HeaderMap) {
    let named = h.get_all(header::VARY).iter().any(|v| {
        v.as_bytes().split(|&b| b == b',').any(|f| {
            let f = f.trim_ascii();
            f == b"*" || f.eq_ignore_ascii_case(b"accept-encoding")
        })
    });
    if !named {
        h.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
}

/// A strong `ETag` becomes weak (as nginx's gzip does): the compressed bytes are not the app's.
fn weaken_etag(h: &mut HeaderMap) {
    if let Some(tag) = h.get(header::ETAG)
        && tag.as_bytes().first() == Some(&b'"')
    {
        let mut weak = Vec::with_capacity(tag.len() + 2);
        weak.extend_from_slice(b"W/");
        weak.extend_from_slice(tag.as_bytes());
        match HeaderValue::from_bytes(&weak) {
            Ok(v) => {
                h.insert(header::ETAG, v);
            }
            Err(_) => {
                h.remove(header::ETAG);
            }
        }
    }
}

/// The predicate tower-http asks: [`eligible`] has decided already.
fn decided(_: StatusCode, _: Version, _: &HeaderMap, _: &Extensions) -> bool {
    true
}

/// The response, as the "inner service" tower-http's `Compression` wraps: called once.
struct Answer(Option<Response<Body>>);

impl Service<Request<()>> for Answer {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Ready<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<()>) -> Self::Future {
        // `apply` calls it once; a second call would get an empty 500 rather than a panic.
        ready(Ok(self.0.take().unwrap_or_else(|| {
            let mut res = Response::new(Body::Empty);
            *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            res
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(ct: &str, body: &'static [u8], extra: &[(&str, &str)]) -> Response<Body> {
        let mut r = Response::new(Body::full(body));
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
        for (k, v) in extra {
            r.headers_mut().append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        r
    }

    const BIG: &[u8] = &[b'a'; 2048];

    #[test]
    fn text_types_are_compressible_and_encoded_media_are_not() {
        for ct in [
            "text/html; charset=utf-8",
            "TEXT/CSS",
            "application/json",
            "application/ld+json",
            "application/javascript",
            "application/xml",
            "application/atom+xml",
            "image/svg+xml",
            "application/wasm",
        ] {
            assert!(compressible(&HeaderValue::from_static(ct)), "{ct}");
        }
        for ct in [
            "image/png",
            "image/jpeg",
            "font/woff2",
            "application/zip",
            "application/octet-stream",
            "text/event-stream",
            "video/mp4",
            "json",
            "application/+json",
        ] {
            assert!(!compressible(&HeaderValue::from_static(ct)), "{ct}");
        }
    }

    #[test]
    fn what_breach_or_a_cache_would_get_wrong_is_never_eligible() {
        assert!(eligible(&res("text/html", BIG, &[])));
        assert!(!eligible(&res("text/html", BIG, &[("set-cookie", "s=1")])));
        assert!(!eligible(&res(
            "text/html",
            BIG,
            &[("cache-control", "public, No-Transform")]
        )));
        assert!(!eligible(&res(
            "text/html",
            BIG,
            &[("content-encoding", "gzip")]
        )));
        assert!(!eligible(&res(
            "text/html",
            BIG,
            &[("content-range", "bytes 0-9/2048")]
        )));
        assert!(!eligible(&res("text/html", &[b'a'; 1023], &[])));
        assert!(!eligible(&res("image/png", BIG, &[])));
        let mut partial = res("text/html", BIG, &[]);
        *partial.status_mut() = StatusCode::PARTIAL_CONTENT;
        assert!(!eligible(&partial));
        let mut not_modified = res("text/html", BIG, &[]);
        *not_modified.status_mut() = StatusCode::NOT_MODIFIED;
        assert!(!eligible(&not_modified));
    }

    #[test]
    fn vary_and_etag_are_set_once() {
        let mut h = HeaderMap::new();
        h.insert(
            header::VARY,
            HeaderValue::from_static("Cookie, Accept-Encoding"),
        );
        vary(&mut h);
        assert_eq!(h.get_all(header::VARY).iter().count(), 1);
        let mut h = HeaderMap::new();
        vary(&mut h);
        assert_eq!(h[header::VARY], "accept-encoding");
        h.insert(header::ETAG, HeaderValue::from_static("\"abc\""));
        weaken_etag(&mut h);
        assert_eq!(h[header::ETAG], "W/\"abc\"");
        weaken_etag(&mut h);
        assert_eq!(h[header::ETAG], "W/\"abc\"");
    }

    #[tokio::test]
    async fn a_client_that_refuses_every_coding_gets_the_apps_answer_not_406() {
        let mut req = Request::new(());
        req.headers_mut().insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity;q=0"),
        );
        let out = apply(Asked::of(&req), res("text/html", BIG, &[])).await;
        assert_eq!(out.status(), StatusCode::OK);
        assert!(!out.headers().contains_key(header::CONTENT_ENCODING));
    }
}
