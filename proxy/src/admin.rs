//! The admin listener (`[admin] listen`, TCP on loopback or a unix socket): plain HTTP/1.1 through hyper,
//! answering `GET`/`HEAD` on `/metrics` (Prometheus text format, `scrape.rs`) and `/health` (`200 ok` while
//! serving, `503 draining` once shutdown has begun), `404` for any other path and `405` for any other
//! method, each with the security headers (no HSTS: it is not HTTPS). Bound before the privilege drop with
//! the other listeners; open until the process exits, through the drain, so that a load balancer sees the
//! `503`. It serves few clients (a scraper, `check --live`): at most [`MAX_CONNECTIONS`] at once.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;

use crate::body::Body;
use crate::http::pages;
use crate::state::Shared;
use crate::{listen, scrape};

/// Connections served at once; more wait in the kernel's backlog (or are dropped when it is full).
pub const MAX_CONNECTIONS: usize = 16;
/// A request head must arrive within this; a connection lasts this long at most (a scraper reconnects).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);

/// The admin listener, registered with the runtime.
pub enum Listening {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Listening {
    pub fn register(bound: listen::Admin) -> std::io::Result<Listening> {
        Ok(match bound {
            listen::Admin::Tcp(l) => Listening::Tcp(tokio::net::TcpListener::from_std(l)?),
            listen::Admin::Unix(l) => Listening::Unix(tokio::net::UnixListener::from_std(l)?),
        })
    }

    /// `http://ADDR` or `unix:PATH`, for the log.
    pub fn describe(&self) -> String {
        match self {
            Listening::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "?".into(), |a| format!("http://{a}")),
            Listening::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
                .unwrap_or_else(|| "unix:?".into()),
        }
    }
}

/// Accepts admin connections until the process exits.
pub async fn serve(listener: Listening, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let accepted = match &listener {
            Listening::Tcp(l) => l.accept().await.map(|(s, _)| {
                let _ = s.set_nodelay(true);
                tokio::spawn(connection(s, shared.clone(), slot));
            }),
            Listening::Unix(l) => l.accept().await.map(|(s, _)| {
                tokio::spawn(connection(s, shared.clone(), slot));
            }),
        };
        if let Err(e) = accepted {
            tracing::warn!(error = %e, "admin listener: accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn connection<S>(stream: S, shared: Arc<Shared>, _slot: tokio::sync::OwnedSemaphorePermit)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let res = answer(&shared, &req);
        async move { Ok::<_, std::convert::Infallible>(res) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), svc);
    if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
        tracing::debug!(error = %e, "admin connection ended with an error");
    }
}

/// The answer to one admin request, with the security headers.
fn answer<B>(shared: &Shared, req: &Request<B>) -> Response<Body> {
    let path = req.uri().path();
    let mut res = if !matches!(path, "/metrics" | "/health") {
        pages::status(StatusCode::NOT_FOUND)
    } else if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = pages::status(StatusCode::METHOD_NOT_ALLOWED);
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        r
    } else if path == "/health" {
        if shared.draining.load(Ordering::Relaxed) {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "draining\n".into(),
                "text/plain; charset=utf-8",
            )
        } else {
            text(StatusCode::OK, "ok\n".into(), "text/plain; charset=utf-8")
        }
    } else {
        text(StatusCode::OK, scrape::render(shared), scrape::CONTENT_TYPE)
    };
    shared.snapshot().headers.apply(res.headers_mut(), false);
    res
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Body> {
    let mut res = Response::new(Body::full(body));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}
