//! Response buffering: the app's response is read as fast as the app writes it, so its worker (and its
//! upstream connection) is free as soon as the response is complete, whatever the client's pace. A body
//! that fits the per-request memory budget by its declared length is read whole before the head goes out
//! (one frame to the client, and a broken one is still a clean 502); a larger or unknown one is pumped into
//! a spool by its own task while the client reads from the spool. Streamed instead, as nginx does: routes
//! with `buffer_responses = false`, `text/event-stream` (server-sent events), and responses whose app says
//! `X-Accel-Buffering: no` (the field itself is removed either way).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::header::{self, HeaderName};
use http::{HeaderMap, Response};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::Body;
use super::buffers::Buffers;
use super::spool;

const X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");

/// The app's response body broke off before the declared length (the app died mid-response).
#[derive(Debug, thiserror::Error)]
#[error("the app's response broke off: {0}")]
pub struct BrokeOff(String);

/// Whether the response streams instead of being buffered: the route says so, the app sent
/// `X-Accel-Buffering: no`, or it is `text/event-stream`. Removes `X-Accel-Buffering` either way.
pub fn streaming(headers: &mut HeaderMap, route_buffers: bool) -> bool {
    let asked = headers
        .remove(X_ACCEL_BUFFERING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"no"));
    !route_buffers
        || asked
        || headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"))
}

/// The response for the client, its body buffered unless `stream` says otherwise.
pub async fn feed(
    buffers: &Arc<Buffers>,
    res: Response<Incoming>,
    stream: bool,
) -> Result<Response<Body>, BrokeOff> {
    let (parts, body) = res.into_parts();
    if stream || body.is_end_stream() {
        return Ok(Response::from_parts(parts, Body::Stream(body)));
    }
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n <= buffers.memory_per_request) {
        let mut whole = Gathered::default();
        let mut body = body;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| BrokeOff(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                whole.add(data);
            }
        }
        return Ok(Response::from_parts(parts, Body::full(whole.bytes())));
    }
    // Unknown length (chunked): what has already arrived is taken without waiting; a small body that is
    // all there is sent as one frame, with no task and no spool.
    let mut body = body;
    let mut early = Gathered::default();
    if declared.is_none() {
        loop {
            match body.frame().now_or_never() {
                Some(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        early.add(data);
                    }
                    if early.len > buffers.memory_per_request {
                        break;
                    }
                }
                Some(Some(Err(e))) => return Err(BrokeOff(e.to_string())),
                Some(None) => return Ok(Response::from_parts(parts, Body::full(early.bytes()))),
                None => break,
            }
        }
    }
    let (mut writer, reader) = spool::new(buffers.clone(), buffers.max_response);
    tokio::spawn(async move {
        if early.len > 0 && writer.push(early.bytes(), true).await.is_err() {
            return;
        }
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                // The writer's drop tells the reader the body broke off.
                return;
            };
            if let Ok(data) = frame.into_data()
                && writer.push(data, true).await.is_err()
            {
                // The client is gone (or the file failed): dropping the body closes the app's connection.
                return;
            }
        }
        writer.finish();
    });
    Ok(Response::from_parts(
        parts,
        Body::Spooled(reader.with_len(declared)),
    ))
}

/// Frames joined into one: usually there is one, kept as it is.
#[derive(Default)]
struct Gathered {
    first: Option<Bytes>,
    more: Option<BytesMut>,
    len: u64,
}

impl Gathered {
    fn add(&mut self, data: Bytes) {
        self.len += data.len() as u64;
        match (&mut self.more, self.first.take()) {
            (Some(m), _) => m.extend_from_slice(&data),
            (None, None) => self.first = Some(data),
            (None, Some(f)) => {
                let mut m = BytesMut::with_capacity(f.len() + data.len());
                m.extend_from_slice(&f);
                m.extend_from_slice(&data);
                self.more = Some(m);
            }
        }
    }

    fn bytes(self) -> Bytes {
        match (self.more, self.first) {
            (Some(m), _) => m.freeze(),
            (None, Some(f)) => f,
            (None, None) => Bytes::new(),
        }
    }
}
