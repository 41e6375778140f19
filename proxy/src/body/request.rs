//! Request buffering: the client's whole body is read (within the route's limit and the body timeouts)
//! before the request goes to the app, so a slow sender costs the app nothing. A body that arrives in one
//! frame stays that frame; a longer one goes into a spool, memory first, then its temporary file.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use super::buffers::Buffers;
use super::spool::{self, PushError};
use super::{Body, BoxError, Stalled, TooLarge};

/// A whole request body, ready to go upstream, and its length.
pub struct Collected {
    pub body: Body,
    pub len: u64,
}

/// Why a body was not collected; nothing reached the app.
#[derive(Debug)]
pub enum Refused {
    /// Past the route's `max_body` (413).
    TooLarge,
    /// Idle past `client_body`, or slower than `min_body_rate` (408), and which.
    TimedOut(crate::pace::Cut),
    /// The client went away or broke the framing: nobody to answer.
    Gone,
    /// The disk budget for temporary files is spent (503).
    Full,
    /// The temporary file could not be made or written (503).
    Io(std::io::Error),
}

/// Reads all of `body` (already held to `max_body` and to the body timeouts by its own type: the guard or
/// `Body::Watched`), which may grow its temporary file to `max_body`.
pub async fn collect(
    buffers: &Arc<Buffers>,
    mut body: Body,
    max_body: u64,
) -> Result<Collected, Refused> {
    // Small frames (HTTP/2's are 16 KiB) are joined into pieces of up to `batch` bytes: fewer, larger writes
    // to the file, and a body of a few frames that fits stays one piece in memory, with no spool at all.
    let batch = usize::try_from(buffers.memory_per_request.min(256 * 1024)).unwrap_or(1 << 16);
    let mut first: Option<Bytes> = None;
    let mut joined = BytesMut::new();
    let mut spooled: Option<(spool::Writer, spool::Reader)> = None;
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| refused(&e))?;
        let Ok(data) = frame.into_data() else {
            // Trailers are not forwarded by a buffered request (gunicorn ignores them).
            continue;
        };
        if data.is_empty() {
            continue;
        }
        len += data.len() as u64;
        if let Some(earlier) = first.take() {
            joined.reserve(batch.max(earlier.len()));
            joined.extend_from_slice(&earlier);
        } else if len == data.len() as u64 {
            first = Some(data);
            continue;
        }
        if joined.is_empty() && data.len() >= batch {
            // Large enough as it is: no copy.
            push(spooled_writer(&mut spooled, buffers, max_body), data).await?;
            continue;
        }
        joined.extend_from_slice(&data);
        if joined.len() >= batch {
            let piece = joined.split().freeze();
            push(spooled_writer(&mut spooled, buffers, max_body), piece).await?;
        }
    }
    let body = match (spooled, first) {
        (Some((mut w, reader)), _) => {
            if !joined.is_empty() {
                push(&mut w, joined.freeze()).await?;
            }
            w.finish();
            Body::Spooled(reader.with_len(Some(len)))
        }
        (None, Some(one)) => Body::full(one),
        (None, None) if joined.is_empty() => Body::Empty,
        (None, None) => Body::full(joined.freeze()),
    };
    Ok(Collected { body, len })
}

/// The spool's writer, made on first need.
fn spooled_writer<'a>(
    spooled: &'a mut Option<(spool::Writer, spool::Reader)>,
    buffers: &Arc<Buffers>,
    max_body: u64,
) -> &'a mut spool::Writer {
    &mut spooled
        .get_or_insert_with(|| spool::new(buffers.clone(), max_body))
        .0
}

async fn push(w: &mut spool::Writer, data: Bytes) -> Result<(), Refused> {
    w.push(data, false).await.map_err(|e| match e {
        PushError::Full => Refused::Full,
        PushError::Gone => Refused::Gone,
        PushError::Io(e) => Refused::Io(e),
    })
}

/// What a body error means: the client's fault (too large, too slow) or the client gone.
fn refused(e: &BoxError) -> Refused {
    if let Some(s) = Stalled::find(e.as_ref()) {
        return Refused::TimedOut(s.0);
    }
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e.as_ref());
    while let Some(err) = cur {
        if err.is::<TooLarge>() {
            return Refused::TooLarge;
        }
        cur = err.source();
    }
    Refused::Gone
}
