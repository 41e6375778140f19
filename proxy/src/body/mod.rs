//! The one response/request body type the proxy hands to hyper: a streamed body from the other side, a
//! buffered one, a small page of our own, a static file, a compressed one, or nothing. An enum, not a `BoxBody`, so no allocation per request
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
pub use response::{BrokeOff, feed, streaming};
pub use spool::Reader;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::time::{Instant, Sleep};

use crate::pace::{Cut, Pace, Rule};

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
    /// A static route's file, read from disk chunk by chunk by tower-http's `ServeDir` (boxed there: only
    /// static responses pay for it).
    Static(File),
    /// A response compressed for the client (`http/compress.rs`, routes with `compress = true`).
    Compressed(Compressed),
    /// An HTTP/2 request body (the guard watches HTTP/1.1 ones): as `Limited`, and ended with [`Stalled`]
    /// when its waits break `rule` (`pace.rs`: no frame for `client_body`, or under `min_body_rate` once
    /// the grace is spent). Only time spent waiting for a frame counts. One timer, which exists only once a
    /// frame was awaited and is re-armed only when it fires (the deadline never moves earlier).
    Watched {
        inner: Incoming,
        left: u64,
        rule: Rule,
        pace: Pace,
        timer: Option<Pin<Box<Sleep>>>,
    },
}

/// A static file's body (tower-http's, which has no `Debug`).
pub struct File(pub tower_http::services::fs::ServeFileSystemResponseBody);

impl std::fmt::Debug for File {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("File")
    }
}

/// A response compressed on its way out (tower-http's encoder around the body it had; boxed: only
/// compressed responses pay for it).
pub struct Compressed(pub Pin<Box<tower_http::compression::CompressionBody<Body>>>);

impl std::fmt::Debug for Compressed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Compressed")
    }
}

/// A request body went past its route's limit (the client's fault: 413).
#[derive(Debug, thiserror::Error)]
#[error("request body larger than the limit")]
pub struct TooLarge;

/// A request body kept the proxy waiting too long (the client's fault: 408): idle for `client_body`, or
/// under `min_body_rate`. `Body::Watched` ends with it; the HTTP/1.1 guard returns it inside an
/// `io::Error` (find it with [`Stalled::find`]).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("request body timed out ({})", .0.reason())]
pub struct Stalled(pub Cut);

impl Stalled {
    /// The `Stalled` in an error's chain, also inside an `io::Error` (whose `source` skips what it wraps).
    pub fn find<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Stalled> {
        let mut cur = Some(e);
        while let Some(err) = cur {
            if let Some(s) = err.downcast_ref::<Stalled>() {
                return Some(s);
            }
            if let Some(s) = err
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<Stalled>())
            {
                return Some(s);
            }
            cur = err.source();
        }
        None
    }
}

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
            Body::Static(_) | Body::Compressed(_) => None,
            Body::Stream(s) | Body::Limited { inner: s, .. } | Body::Watched { inner: s, .. } => {
                http_body::Body::is_end_stream(s).then_some(Body::Empty)
            }
        }
    }

    /// An HTTP/2 request body: at most `left` bytes, held to `rule` while its frames are awaited.
    pub fn watched(inner: Incoming, left: u64, rule: Rule) -> Body {
        Body::Watched {
            inner,
            left,
            rule,
            pace: Pace::default(),
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
            Body::Static(f) => Pin::new(&mut f.0).poll_frame(cx).map_err(Into::into),
            Body::Compressed(c) => c.0.as_mut().poll_frame(cx),
            Body::Limited { inner, left } => limited(Pin::new(inner).poll_frame(cx), left),
            Body::Watched {
                inner,
                left,
                rule,
                pace,
                timer,
            } => match limited(Pin::new(inner).poll_frame(cx), left) {
                Poll::Pending => {
                    pace.wait(Instant::now);
                    let timer = timer.get_or_insert_with(|| {
                        let at = pace.deadline(rule).map_or_else(Instant::now, |(at, _)| at);
                        Box::pin(tokio::time::sleep_until(at))
                    });
                    // Armed for this wait's deadline or an earlier one: when it fires, look again.
                    while timer.as_mut().poll(cx).is_ready() {
                        match pace.check(rule, Instant::now()) {
                            Ok(at) => timer.as_mut().reset(at),
                            Err(cut) => return Poll::Ready(Some(Err(Box::new(Stalled(cut))))),
                        }
                    }
                    Poll::Pending
                }
                Poll::Ready(Some(Ok(frame))) => {
                    pace.arrived(frame.data_ref().map_or(0, Bytes::len), Instant::now);
                    Poll::Ready(Some(Ok(frame)))
                }
                done => done,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(b) => b.is_none(),
            Body::Spooled(r) => r.is_end_stream(),
            Body::Static(f) => f.0.is_end_stream(),
            Body::Compressed(c) => c.0.is_end_stream(),
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
            Body::Static(f) => f.0.size_hint(),
            Body::Compressed(c) => c.0.size_hint(),
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
