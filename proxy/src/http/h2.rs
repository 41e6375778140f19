//! HTTP/2 held to the limits the guard holds HTTP/1.1 heads to: `check` measures a request h2 has decoded
//! the way `head.rs` measures an HTTP/1.1 head (`uri_bytes` -> 414, `headers` and `header_bytes` -> 431;
//! `refusal` answers it), and `Watch` bounds how long the connection preface, a header block (HEADERS up
//! to END_HEADERS, RFC 9113 §4.3) or any other frame but DATA may take to arrive (`client_header`). The
//! body's idle limit is `body::Body::Watched`'s. Nothing here parses HPACK: h2 does, within
//! `header_list_size`.

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::header::{COOKIE, HOST};
use http::{Request, Response, StatusCode, Version};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::head::{Limits, Reject};
use super::pages;
use crate::body::Body;
use crate::state::{Shared, Snapshot};
use crate::telemetry::{Refusals, refused};

/// RFC 9113 §6.5.2: SETTINGS_MAX_HEADER_LIST_SIZE counts each field as name + value + 32 octets.
const FIELD_OVERHEAD: usize = 32;
/// "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" (RFC 9113 §3.4).
const PREFACE_LEN: u8 = 24;
const FRAME_HEAD_LEN: usize = 9;
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;

/// The header list size h2 decodes and advertises (SETTINGS_MAX_HEADER_LIST_SIZE): every request that
/// `check` would accept fits, with the 32-octet overhead per field of up to `headers` fields and the
/// pseudo-header fields. What is larger h2 answers itself with a bare 431 (RFC 9113 §10.5.1) and, past
/// four times this, GOAWAY: that is the memory bound; `check` applies the exact limits.
pub fn header_list_size(limits: &Limits) -> u32 {
    let fields = limits.headers.saturating_add(5);
    let size = limits
        .head_bytes
        .saturating_add(fields.saturating_mul(FIELD_OVERHEAD));
    u32::try_from(size).unwrap_or(u32::MAX)
}

/// For an HTTP/2 request over a limit (see [`check`]): the refusal (414 or 431, our page, the security
/// headers), logged like the guard's.
pub fn refusal<B>(
    shared: &Shared,
    snap: &Snapshot,
    peer: IpAddr,
    req: &Request<B>,
) -> Option<Response<Body>> {
    if req.version() != Version::HTTP_2 {
        return None;
    }
    let r = check(req, &snap.guard.limits).err()?;
    refused!(shared.refusals, Request => info!(target: "access", client = %peer, status = r.status(), reason = r.reason(), "request refused"));
    let mut res =
        pages::status(StatusCode::from_u16(r.status()).unwrap_or(StatusCode::BAD_REQUEST));
    snap.headers.apply(res.headers_mut(), true);
    Some(res)
}

/// The HTTP/1.1 limits, applied to what the request would be as an HTTP/1.1 head: the request-target
/// (`:path`) against `uri_bytes`; the fields (cookie crumbs as the one field they are joined into, the
/// `:authority` as the `Host` line it becomes) against `headers`; request line plus header lines against
/// `header_bytes`.
pub fn check<B>(req: &Request<B>, limits: &Limits) -> Result<(), Reject> {
    let target = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if target > limits.uri_bytes {
        return Err(Reject::UriTooLong);
    }
    // "METHOD SP target SP HTTP/1.1 CRLF"
    let mut bytes = req.method().as_str().len() + target + 12;
    let mut fields = 0usize;
    let mut cookies = 0usize;
    for (name, value) in req.headers() {
        if name == COOKIE {
            cookies += 1;
            if cookies > 1 {
                // Joined to the first with "; ".
                bytes += value.len() + 2;
                continue;
            }
        }
        fields += 1;
        // "name: value CRLF"
        bytes += name.as_str().len() + value.len() + 4;
    }
    if !req.headers().contains_key(HOST)
        && let Some(authority) = req.uri().authority()
    {
        fields += 1;
        bytes += authority.as_str().len() + 8;
    }
    if fields > limits.headers || bytes > limits.head_bytes {
        return Err(Reject::HeadTooLarge);
    }
    Ok(())
}

/// An HTTP/2 connection's I/O, read through: it follows frame boundaries (the 9-octet frame headers,
/// RFC 9113 §4.1; nothing is copied) and ends the connection with an error when the preface, a header
/// block or a frame other than DATA is not complete `timeout` after it began. h2 and hyper have no such
/// limit: a HEADERS frame without END_HEADERS whose CONTINUATION never comes (or a frame trickled a byte at
/// a time) would hold the connection, and the header block buffered, for as long as the client likes.
/// DATA frames are the body's, bounded by `client_body` (`Body::Watched`) and `client_idle`.
pub struct Watch<T> {
    inner: T,
    timeout: Duration,
    timer: Pin<Box<Sleep>>,
    /// Preface octets still to come.
    preface: u8,
    /// The frame header being read (they may straddle reads).
    head: [u8; FRAME_HEAD_LEN],
    head_len: usize,
    /// Payload octets of the current frame still to come.
    left: usize,
    /// Whether the current frame is bounded (not DATA), and whether it ends what is bounded (for HEADERS
    /// and CONTINUATION only with END_HEADERS).
    bounded: bool,
    ends: bool,
    /// Something bounded has begun and not ended: the timer runs.
    open: bool,
    peer: IpAddr,
    refusals: Arc<Refusals>,
}

impl<T> Watch<T> {
    /// From connection start, the preface must arrive within `timeout`.
    pub fn new(inner: T, timeout: Duration, peer: IpAddr, refusals: Arc<Refusals>) -> Watch<T> {
        Watch {
            inner,
            timeout,
            timer: Box::pin(tokio::time::sleep(timeout)),
            preface: PREFACE_LEN,
            head: [0; FRAME_HEAD_LEN],
            head_len: 0,
            left: 0,
            bounded: false,
            ends: false,
            open: true,
            peer,
            refusals,
        }
    }

    /// Follows frame boundaries over bytes just read.
    fn scan(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.preface > 0 {
                let take = bytes.len().min(usize::from(self.preface));
                // `take` is at most `self.preface`, a u8.
                self.preface -= u8::try_from(take).unwrap_or(self.preface);
                bytes = &bytes[take..];
                if self.preface == 0 {
                    self.open = false;
                }
                continue;
            }
            if self.left > 0 {
                let take = bytes.len().min(self.left);
                self.left -= take;
                bytes = &bytes[take..];
                if self.left == 0 {
                    self.frame_end();
                }
                continue;
            }
            let take = bytes.len().min(FRAME_HEAD_LEN - self.head_len);
            self.head[self.head_len..self.head_len + take].copy_from_slice(&bytes[..take]);
            self.head_len += take;
            bytes = &bytes[take..];
            if self.head_len < FRAME_HEAD_LEN {
                continue;
            }
            self.head_len = 0;
            let [l0, l1, l2, kind, flags, ..] = self.head;
            self.left = usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2);
            self.bounded = kind != DATA;
            self.ends = match kind {
                HEADERS | CONTINUATION => flags & END_HEADERS != 0,
                _ => true,
            };
            if self.bounded && !self.open {
                self.open = true;
                self.timer.as_mut().reset(Instant::now() + self.timeout);
            }
            if self.left == 0 {
                self.frame_end();
            }
        }
    }

    fn frame_end(&mut self) {
        if self.bounded && self.ends {
            self.open = false;
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watch<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = read {
            this.scan(&buf.filled()[before..]);
        }
        if this.open && this.timer.as_mut().poll(cx).is_ready() {
            // No 408 can be sent mid-frame: the connection is closed.
            refused!(this.refusals, Request => info!(target: "access", client = %this.peer, reason = "HTTP/2 frame or header block timeout", "request refused"));
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "HTTP/2 frame or header block not complete within client_header",
            )));
        }
        ready!(read)?;
        Poll::Ready(Ok(()))
    }
}

super::io::write_through!(Watch);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const LIMITS: Limits = Limits {
        head_bytes: 200,
        headers: 3,
        uri_bytes: 50,
    };

    fn req(path: &str, fields: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::get(format!("https://localhost{path}"));
        for (n, v) in fields {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn requests_are_measured_as_their_http1_head() {
        assert_eq!(
            check(&req(&format!("/{}", "a".repeat(49)), &[]), &LIMITS),
            Ok(())
        );
        assert_eq!(
            check(&req(&format!("/{}", "a".repeat(50)), &[]), &LIMITS),
            Err(Reject::UriTooLong)
        );
        // Two fields and the :authority are three; a third field is one too many.
        assert_eq!(check(&req("/", &[("a", "1"), ("b", "2")]), &LIMITS), Ok(()));
        assert_eq!(
            check(&req("/", &[("a", "1"), ("b", "2"), ("c", "3")]), &LIMITS),
            Err(Reject::HeadTooLarge)
        );
        // Unless the client sent a Host field itself.
        assert_eq!(
            check(
                &req("/", &[("a", "1"), ("b", "2"), ("host", "localhost")]),
                &LIMITS
            ),
            Ok(())
        );
        // Cookie crumbs are one field once joined.
        let crumbs = [
            ("cookie", "a=1"),
            ("cookie", "b=2"),
            ("cookie", "c=3"),
            ("x", "1"),
        ];
        assert_eq!(check(&req("/", &crumbs), &LIMITS), Ok(()));
        // Bytes: "GET / HTTP/1.1\r\n" (16) + "host: localhost\r\n" (17) + "x: ...\r\n".
        let fits = "v".repeat(200 - 16 - 17 - 5);
        assert_eq!(check(&req("/", &[("x", &fits)]), &LIMITS), Ok(()));
        let over = format!("{fits}v");
        assert_eq!(
            check(&req("/", &[("x", &over)]), &LIMITS),
            Err(Reject::HeadTooLarge)
        );
    }

    #[test]
    fn every_request_check_accepts_fits_the_header_list_h2_decodes() {
        let limits = Limits {
            head_bytes: 32 * 1024,
            headers: 100,
            uri_bytes: 8 * 1024,
        };
        // 99 one-byte fields and the :authority, plus the pseudo-header fields, as h2 counts them.
        let h2_size = 99 * (1 + 1 + 32)
            + 4 * 32
            + ":method".len()
            + 3
            + ":scheme".len()
            + 5
            + ":path".len()
            + 1
            + ":authority".len()
            + 9;
        assert!(h2_size <= header_list_size(&limits) as usize);
        // The largest head check accepts, in one field.
        let value = 32 * 1024 - 16 - 17 - 5;
        let h2_size = 1 + value + 32 + 4 * 32 + 40;
        assert!(h2_size <= header_list_size(&limits) as usize);
    }

    fn frame(kind: u8, flags: u8, len: usize) -> Vec<u8> {
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
            0,
            0,
            0,
            1,
        ];
        f.resize(9 + len, 0);
        f
    }

    #[tokio::test]
    async fn the_watch_follows_frames_across_reads() {
        let mut w = Watch::new(
            (),
            Duration::from_secs(1),
            [127, 0, 0, 1].into(),
            Arc::default(),
        );
        assert!(w.open, "the preface is awaited from the start");
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(4, 0, 6));
        // One byte at a time: the preface is open until its last byte (23); the SETTINGS frame from its
        // complete frame header (byte 32) until its last byte.
        for (i, b) in bytes.iter().enumerate() {
            w.scan(&[*b]);
            let open = i < 23 || (32..bytes.len() - 1).contains(&i);
            assert_eq!(w.open, open, "after byte {i}");
        }
        // DATA does not open anything, however long it takes.
        w.scan(&frame(DATA, 0, 100)[..50]);
        assert!(!w.open);
        w.scan(&[0; 59]);
        assert!(!w.open);
        // A header block is open from its HEADERS to the CONTINUATION with END_HEADERS.
        w.scan(&frame(HEADERS, 0, 10));
        assert!(w.open);
        w.scan(&frame(CONTINUATION, 0, 10));
        assert!(w.open);
        let mut last = frame(CONTINUATION, END_HEADERS, 10);
        last.extend(frame(DATA, 1, 0));
        w.scan(&last);
        assert!(!w.open);
        // HEADERS with END_HEADERS, whole in one read.
        w.scan(&frame(HEADERS, END_HEADERS, 30));
        assert!(!w.open);
    }
}
