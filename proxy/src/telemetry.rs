//! Logging: tracing to stderr, text or JSON. The access log is one `access` event per request, written when
//! the response body ends (or is dropped), so it carries the bytes sent and the full duration.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body::{Frame, SizeHint};
use portcullis_config::LogFormat;
use tracing_subscriber::EnvFilter;

use crate::body::Body;

/// Installs the global subscriber. `RUST_LOG` overrides `level` when set.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    // A second init (only possible in tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}

/// What the access log line says about one request.
#[derive(Debug)]
pub struct Access {
    pub start: Instant,
    pub client: IpAddr,
    pub method: Method,
    pub path: String,
    pub status: StatusCode,
    pub upstream: Option<Arc<str>>,
    pub bytes: u64,
}

/// A response body that writes the access line when it is done.
#[derive(Debug)]
pub struct Logged {
    inner: Body,
    access: Option<Box<Access>>,
}

impl Logged {
    pub fn new(inner: Body, access: Option<Box<Access>>) -> Logged {
        Logged { inner, access }
    }
}

impl http_body::Body for Logged {
    type Data = Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_frame(cx);
        if let (Some(a), Poll::Ready(Some(Ok(frame)))) = (this.access.as_mut(), &poll)
            && let Some(d) = frame.data_ref()
        {
            a.bytes += d.len() as u64;
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if let Some(a) = self.access.take() {
            tracing::info!(
                target: "access",
                client = %a.client,
                method = %a.method,
                path = %a.path,
                status = a.status.as_u16(),
                bytes = a.bytes,
                duration_ms = a.start.elapsed().as_secs_f64() * 1000.0,
                upstream = a.upstream.as_deref().unwrap_or("-"),
            );
        }
    }
}
