//! Request buffering: the client's whole body is read (within the route's limit and the body timeouts)
//! before the request goes to the app, so a slow sender costs the app nothing. A body that arrives in one
//! frame stays that frame; a longer one goes into a spool, memory first, then its temporary file.

use std::sync::Arc;

use bytes::Bytes;
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
    let mut first: Option<Bytes> = None;
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
        if let Some((w, _)) = &mut spooled {
            push(w, data).await?;
            continue;
        }
        match first.take() {
            None => first = Some(data),
            Some(earlier) => {
                let (mut w, reader) = spool::new(buffers.clone(), max_body);
                push(&mut w, earlier).await?;
                push(&mut w, data).await?;
                spooled = Some((w, reader));
            }
        }
    }
    let body = match (spooled, first) {
        (Some((w, reader)), _) => {
            w.finish();
            Body::Spooled(reader.with_len(Some(len)))
        }
        (None, Some(one)) => Body::full(one),
        (None, None) => Body::Empty,
    };
    Ok(Collected { body, len })
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
