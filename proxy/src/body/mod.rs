//! The one response/request body type the proxy hands to hyper: a streamed body from the other side, a
//! buffered one, a small page of our own, or nothing. An enum, not a `BoxBody`, so no allocation per request
//! for the common case. Buffering, so that slow clients never hold the app's workers (gunicorn's sync workers
//! serve one request each), lives here too: a body is held in memory up to `[buffers] memory_per_request`,
//! beyond it in an unlinked temporary file in `[process] temp_dir` (`spool.rs`), within budgets every body
//! shares (`buffers.rs`). `request.rs` reads a client's whole body before the app sees the request;
//! `response.rs` reads the app's response as fast as the app writes it and feeds the client at its pace.

mod buffers;
mod request;
mod response;
mod spool;

pub use buffers::{Buffers, prepare};
pub use request::{Refused, collect};
pub use response::{feed, streaming};
pub use spool::Reader;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug)]
pub enum Body {
    Empty,
    /// A page of ours, sent in one frame.
    Full(Option<Bytes>),
    /// Streamed from the client or the upstream, frame by frame: never buffered whole.
    Stream(Incoming),
    /// A client's request body that may carry at most `left` more bytes (then [`TooLarge`]).
    Limited {
        inner: Incoming,
        left: u64,
    },
    /// A body buffered in memory and a temporary file (`spool.rs`), read at the receiver's pace.
    Spooled(Reader),
    /// An HTTP/2 request body (the guard watches HTTP/1.1 ones): as `Limited`, and ended with [`Stalled`]
    /// when no frame comes for `idle` while one is awaited. The timer exists only once a frame was awaited.
    Watched {
        inner: Incoming,
        left: u64,
        idle: Duration,
        timer: Option<Pin<Box<Sleep>>>,
    },
}

/// A request body went past its route's limit (the client's fault: 413).
#[derive(Debug, thiserror::Error)]
#[error("request body larger than the limit")]
pub struct TooLarge;

/// A request body made no progress for `client_body` (the client's fault: 408).
#[derive(Debug, thiserror::Error)]
#[error("request body timed out")]
pub struct Stalled;

impl Body {
    pub fn full(b: impl Into<Bytes>) -> Body {
        Body::Full(Some(b.into()))
    }

    /// A body to send again in place of this one, if it can be replayed: nothing, one buffer, or a spool
    /// written whole (which this body then reads without letting go of its pieces); a stream only once it is
    /// known to be empty. Call it before this body is read.
    pub fn replay(&mut self) -> Option<Body> {
        match self {
            Body::Empty => Some(Body::Empty),
            Body::Full(b) => Some(Body::Full(b.clone())),
            Body::Spooled(r) => r.replay().map(Body::Spooled),
            Body::Stream(s) | Body::Limited { inner: s, .. } | Body::Watched { inner: s, .. } => {
                http_body::Body::is_end_stream(s).then_some(Body::Empty)
            }
        }
    }

    /// An HTTP/2 request body: at most `left` bytes, no more than `idle` between frames.
    pub fn watched(inner: Incoming, left: u64, idle: Duration) -> Body {
        Body::Watched {
            inner,
            left,
            idle,
            timer: None,
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(s) => Pin::new(s).poll_frame(cx).map_err(Into::into),
            Body::Spooled(r) => r.poll_data(cx).map(|d| d.map(|d| d.map(Frame::data))),
            Body::Limited { inner, left } => limited(Pin::new(inner).poll_frame(cx), left),
            Body::Watched {
                inner,
                left,
                idle,
                timer,
            } => match limited(Pin::new(inner).poll_frame(cx), left) {
                Poll::Pending => {
                    let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(*idle)));
                    match timer.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(Stalled)))),
                        Poll::Pending => Poll::Pending,
                    }
                }
                ready => {
                    if let Some(t) = timer {
                        t.as_mut().reset(Instant::now() + *idle);
                    }
                    ready
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(b) => b.is_none(),
            Body::Spooled(r) => r.is_end_stream(),
            Body::Stream(s) | Body::Limited { inner: s, .. } | Body::Watched { inner: s, .. } => {
                s.is_end_stream()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Spooled(r) => r
                .left()
                .map_or_else(SizeHint::default, SizeHint::with_exact),
            Body::Stream(s) | Body::Limited { inner: s, .. } | Body::Watched { inner: s, .. } => {
                s.size_hint()
            }
        }
    }
}

/// A frame from a client's body, counted against what it may still carry.
fn limited(
    poll: Poll<Option<Result<Frame<Bytes>, hyper::Error>>>,
    left: &mut u64,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    match poll {
        Poll::Ready(Some(Ok(frame))) => {
            if let Some(d) = frame.data_ref() {
                if d.len() as u64 > *left {
                    return Poll::Ready(Some(Err(Box::new(TooLarge))));
                }
                *left -= d.len() as u64;
            }
            Poll::Ready(Some(Ok(frame)))
        }
        other => other.map_err(Into::into),
    }
}
