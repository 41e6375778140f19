//! The HTTP/1.1 request guard: an I/O wrapper between TLS (or TCP) and hyper that holds each request head
//! until `head::check` has accepted it whole, then lets the body through while checking its framing. A
//! refused head never reaches hyper, so never reaches an upstream: the guard answers it itself (400, 408,
//! 414, 431, 501, 505, with the security headers) and closes. After a request that asks to upgrade, nothing
//! more is read until its answer is known ([`UpgradeGate`]): bytes pass untouched only after a `101`;
//! otherwise the next request is checked like any other. A body that keeps the guard waiting too long
//! (`pace.rs`: idle for `client_body`, or under `min_body_rate`) is cut off: with `408` from the service
//! once hyper has its head (the guard's error reaches the upstream request, `upstream::Failure::BodyTimeout`),
//! with the guard's own `408` while the head is still held.

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::head::{self, Chunked, Framing, Limits, Reject, Verdict};
use super::headers::SecurityHeaders;
use crate::body::Stalled;
use crate::pace::{Cut, Pace, Rule};

/// Ready-made responses for refusals, built once at config load.
#[derive(Debug)]
pub struct Canned {
    responses: Vec<(u16, bytes::Bytes)>,
}

impl Canned {
    pub fn new(headers: &SecurityHeaders, https: bool) -> Canned {
        let responses = [400u16, 408, 414, 431, 501, 505]
            .into_iter()
            .map(|code| {
                let status = http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::BAD_REQUEST);
                let reason = status.canonical_reason().unwrap_or("Error");
                let body = format!(
                    "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{code} {reason}</title></head>\n<body><h1>{code} {reason}</h1></body></html>\n"
                );
                let mut extra = http::HeaderMap::new();
                headers.apply(&mut extra, https);
                let mut text = format!(
                    "HTTP/1.1 {code} {reason}\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n",
                    body.len()
                );
                for (name, value) in &extra {
                    text.push_str(name.as_str());
                    text.push_str(": ");
                    text.push_str(value.to_str().unwrap_or(""));
                    text.push_str("\r\n");
                }
                text.push_str("\r\n");
                text.push_str(&body);
                (code, bytes::Bytes::from(text))
            })
            .collect();
        Canned { responses }
    }

    fn get(&self, code: u16) -> bytes::Bytes {
        self.responses
            .iter()
            .find(|(c, _)| *c == code)
            .or(self.responses.first())
            .map(|(_, b)| b.clone())
            .unwrap_or_default()
    }
}

/// What the guard needs from the config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub limits: Limits,
    /// A head must arrive whole within this, from its first byte (or from connection start).
    pub header_timeout: Duration,
    /// How long a body may keep the guard waiting (`client_body`, `min_body_rate` and its grace).
    pub body: Rule,
    /// The log's budget for refusals (shared with `State`).
    pub refusals: Arc<crate::telemetry::Refusals>,
}

/// How the answer to a request that asked to upgrade reaches the guard: the service decides (it knows the
/// status it returns), the guard, which has stopped reading after that request, waits for it.
#[derive(Debug, Default)]
pub struct UpgradeGate {
    /// 0: no answer yet, 1: switched (`101`), 2: not switched.
    decision: AtomicU8,
    waker: Mutex<Option<Waker>>,
}

impl UpgradeGate {
    /// Whether a request asks to upgrade by the guard's own rule (`head::check`): HTTP/1.1, an `Upgrade`
    /// field and an `upgrade` token in `Connection`. Only such a request's answer is to be `decide`d.
    pub fn asks<B>(req: &http::Request<B>) -> bool {
        req.version() == http::Version::HTTP_11
            && req.headers().contains_key(http::header::UPGRADE)
            && req
                .headers()
                .get_all(http::header::CONNECTION)
                .iter()
                .any(|v| head::names_upgrade(v.as_bytes()))
    }

    /// The answer to the request that asked to upgrade: `switched` when it is a `101`.
    pub fn decide(&self, switched: bool) {
        self.decision
            .store(if switched { 1 } else { 2 }, Ordering::Release);
        // A poisoned lock only means a task panicked while storing a waker: the slot is still usable.
        let waker = self.waker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    fn poll(&self, cx: &mut Context<'_>) -> Poll<bool> {
        let take = || match self.decision.swap(0, Ordering::AcqRel) {
            1 => Some(true),
            2 => Some(false),
            _ => None,
        };
        if let Some(d) = take() {
            return Poll::Ready(d);
        }
        *self.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
        // A decision that landed between the first look and storing the waker.
        match take() {
            Some(d) => Poll::Ready(d),
            None => Poll::Pending,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Head,
    Body,
}

enum State {
    Head,
    /// A head is complete; waiting for its first chunk-size line before releasing it.
    Held(head::Head),
    Length(u64),
    Chunked(Chunked),
    /// A request that asked to upgrade went through whole; nothing more is read until it is answered.
    AwaitUpgrade,
    Passthrough,
    Rejecting {
        bytes: bytes::Bytes,
    },
    Closing,
    Closed,
}

pub struct Guard<T> {
    inner: T,
    state: State,
    buf: BytesMut,
    /// Leading bytes of `buf` that are checked and may go to hyper.
    ready: usize,
    scanned: usize,
    settings: Arc<Settings>,
    canned: Arc<Canned>,
    peer: IpAddr,
    timer: Pin<Box<Sleep>>,
    /// What the timer is running for, if anything.
    timer_kind: Option<Kind>,
    /// The body under way: its bytes and the time spent waiting for them (only while the timer is
    /// `Kind::Body`; reset with each head).
    pace: Pace,
    /// The request being delivered asked to upgrade: after its body, wait for its answer.
    pending_upgrade: bool,
    gate: Arc<UpgradeGate>,
}

/// What follows a request whose body has gone through.
fn after_request(pending_upgrade: bool) -> State {
    if pending_upgrade {
        State::AwaitUpgrade
    } else {
        State::Head
    }
}

impl<T> Guard<T> {
    pub fn new(
        inner: T,
        settings: Arc<Settings>,
        canned: Arc<Canned>,
        peer: IpAddr,
        gate: Arc<UpgradeGate>,
    ) -> Guard<T> {
        let deadline = Instant::now() + settings.header_timeout;
        Guard {
            inner,
            state: State::Head,
            buf: BytesMut::new(),
            ready: 0,
            scanned: 0,
            timer: Box::pin(tokio::time::sleep_until(deadline)),
            timer_kind: Some(Kind::Head),
            pace: Pace::default(),
            pending_upgrade: false,
            gate,
            settings,
            canned,
            peer,
        }
    }

    fn reject(&mut self, r: Reject) {
        crate::telemetry::refused!(self.settings.refusals, Request => info!(target: "access", client = %self.peer, status = r.status(), reason = r.reason(), "request refused"));
        self.state = State::Rejecting {
            bytes: self.canned.get(r.status()),
        };
        self.buf.clear();
        self.ready = 0;
    }

    fn arm(&mut self, kind: Kind) {
        let at = match kind {
            Kind::Head => Instant::now() + self.settings.header_timeout,
            // A wait is under way (`poll_timer` opens it first).
            Kind::Body => self
                .pace
                .deadline(&self.settings.body)
                .map_or_else(Instant::now, |(at, _)| at),
        };
        self.timer.as_mut().reset(at);
        self.timer_kind = Some(kind);
    }

    /// Moves the state machine over buffered bytes; sets `ready` when some may be delivered.
    fn advance(&mut self) {
        loop {
            if self.ready > 0 || self.buf.is_empty() {
                return;
            }
            match &mut self.state {
                State::Head => match head::check(&self.buf, self.scanned, &self.settings.limits) {
                    Verdict::Incomplete { scanned } => {
                        self.scanned = scanned;
                        return;
                    }
                    Verdict::Reject(r) => return self.reject(r),
                    Verdict::Complete(h) => {
                        self.scanned = 0;
                        self.timer_kind = None;
                        // A new body's account, with what came in the head's reads.
                        let early = self.buf.len() - h.len;
                        self.pace = Pace::default();
                        self.pace.arrived(
                            match h.framing {
                                Framing::Length(n) => {
                                    usize::try_from(n).map_or(early, |n| n.min(early))
                                }
                                Framing::Chunked => early,
                            },
                            Instant::now,
                        );
                        self.pending_upgrade = h.upgrade;
                        match h.framing {
                            Framing::Length(n) => {
                                self.ready = h.len;
                                self.state = if n == 0 {
                                    after_request(h.upgrade)
                                } else {
                                    State::Length(n)
                                };
                            }
                            // The client waits for `100 Continue` before it sends a chunk: nothing to hold for.
                            Framing::Chunked if h.expect_continue => {
                                self.ready = h.len;
                                self.state = State::Chunked(Chunked::default());
                            }
                            Framing::Chunked => self.state = State::Held(h),
                        }
                    }
                },
                State::Held(h) => {
                    let h = *h;
                    let mut c = Chunked::default();
                    match c.feed(&self.buf[h.len..]) {
                        Err(why) => return self.reject(Reject::Bad(why)),
                        Ok(n) if c.sized() => {
                            self.ready = h.len + n;
                            self.state = if c.done() {
                                after_request(h.upgrade)
                            } else {
                                State::Chunked(c)
                            };
                        }
                        // The first chunk-size line is not complete yet.
                        Ok(_) => return,
                    }
                }
                State::Length(left) => {
                    let take = (*left).min(self.buf.len() as u64);
                    *left -= take;
                    self.ready = take as usize;
                    if *left == 0 {
                        self.state = after_request(self.pending_upgrade);
                    }
                }
                State::Chunked(c) => match c.feed(&self.buf) {
                    Ok(n) => {
                        self.ready = n;
                        if c.done() {
                            self.state = after_request(self.pending_upgrade);
                        }
                    }
                    Err(why) => {
                        // Part of this body already went upstream: all we can do is cut the connection.
                        crate::telemetry::refused!(self.settings.refusals, Body => info!(target: "access", client = %self.peer, reason = why, "request body refused"));
                        self.state = State::Closed;
                        self.buf.clear();
                        return;
                    }
                },
                State::Passthrough => {
                    self.ready = self.buf.len();
                }
                State::AwaitUpgrade | State::Rejecting { .. } | State::Closing | State::Closed => {
                    return;
                }
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Guard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            this.advance();
            if this.ready > 0 {
                let n = this.ready.min(out.remaining());
                out.put_slice(&this.buf[..n]);
                this.buf.advance(n);
                this.ready -= n;
                return Poll::Ready(Ok(()));
            }
            match &mut this.state {
                State::Rejecting { bytes } => {
                    while !bytes.is_empty() {
                        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, bytes))?;
                        if n == 0 {
                            break;
                        }
                        bytes.advance(n);
                    }
                    this.state = State::Closing;
                    continue;
                }
                State::Closing => {
                    let _ = ready!(Pin::new(&mut this.inner).poll_shutdown(cx));
                    this.state = State::Closed;
                    continue;
                }
                State::Closed => return Poll::Ready(Ok(())),
                State::AwaitUpgrade => {
                    let switched = ready!(this.gate.poll(cx));
                    this.pending_upgrade = false;
                    this.state = if switched {
                        State::Passthrough
                    } else {
                        State::Head
                    };
                    continue;
                }
                _ => {}
            }
            // Bodies and tunnels read straight into hyper's buffer; what belongs to the next head is kept.
            let direct = this.buf.is_empty()
                && matches!(
                    this.state,
                    State::Length(_) | State::Chunked(_) | State::Passthrough
                );
            if direct {
                let before = out.filled().len();
                match Pin::new(&mut this.inner).poll_read(cx, out) {
                    Poll::Ready(r) => {
                        r?;
                        let got = out.filled().len() - before;
                        if got == 0 {
                            return Poll::Ready(Ok(()));
                        }
                        let keep = match &mut this.state {
                            State::Length(left) => {
                                let take = (*left).min(got as u64);
                                *left -= take;
                                if *left == 0 {
                                    this.state = after_request(this.pending_upgrade);
                                }
                                take as usize
                            }
                            State::Chunked(c) => match c.feed(&out.filled()[before..]) {
                                Ok(n) => {
                                    if c.done() {
                                        this.state = after_request(this.pending_upgrade);
                                    }
                                    n
                                }
                                Err(why) => {
                                    crate::telemetry::refused!(this.settings.refusals, Body => info!(target: "access", client = %this.peer, reason = why, "request body refused"));
                                    this.state = State::Closed;
                                    out.set_filled(before);
                                    return Poll::Ready(Err(io::Error::new(
                                        io::ErrorKind::InvalidData,
                                        why,
                                    )));
                                }
                            },
                            _ => got,
                        };
                        this.pace.arrived(keep, Instant::now);
                        if keep < got {
                            this.buf.extend_from_slice(&out.filled()[before + keep..]);
                            out.set_filled(before + keep);
                        }
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Pending => return this.poll_timer(cx),
                }
            }
            // Heads (and a held head's first chunk line) are buffered until checked.
            // Small: a head is usually well under 1 KiB, and this buffer is zeroed for every read.
            let mut tmp = [0u8; 2048];
            let mut rb = ReadBuf::new(&mut tmp);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let got = rb.filled();
                    if got.is_empty() {
                        // EOF: a partial head is simply dropped.
                        this.buf.clear();
                        return Poll::Ready(Ok(()));
                    }
                    if matches!(this.state, State::Head) && this.timer_kind != Some(Kind::Head) {
                        this.arm(Kind::Head);
                    }
                    if matches!(
                        this.state,
                        State::Held(_) | State::Length(_) | State::Chunked(_)
                    ) {
                        this.pace.arrived(got.len(), Instant::now);
                    }
                    this.buf.extend_from_slice(got);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return this.poll_timer(cx),
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Guard<T> {
    /// Called when the client has nothing more for now: enforce the head timeout, and hold the body to
    /// `settings.body` (one timer, armed at the body's first wait and re-armed only when it fires: the
    /// deadline never moves earlier, `Pace::deadline`).
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let kind = match self.state {
            State::Head => Kind::Head,
            State::Held(_) | State::Length(_) | State::Chunked(_) => Kind::Body,
            _ => return Poll::Pending,
        };
        if kind == Kind::Body {
            self.pace.wait(Instant::now);
            if self.timer_kind != Some(Kind::Body) {
                self.arm(Kind::Body);
            }
            while self.timer.as_mut().poll(cx).is_ready() {
                match self.pace.check(&self.settings.body, Instant::now()) {
                    Ok(at) => self.timer.as_mut().reset(at),
                    Err(cut) => return self.cut(cut, cx),
                }
            }
            return Poll::Pending;
        }
        if self.timer_kind != Some(Kind::Head) {
            // Idle between requests: `client_idle` governs that, not the head timeout.
            return Poll::Pending;
        }
        if self.timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.timer_kind = None;
        if self.buf.is_empty() && self.scanned == 0 {
            // Nothing at all since the connection (or the last response): just close.
            self.state = State::Closing;
        } else {
            self.reject(Reject::Timeout);
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Ends a body that kept us waiting too long. While its head is held, hyper has not seen the request:
    /// the guard answers `408` itself and closes. Otherwise the error goes to hyper, which ends the body the
    /// upstream is reading, and the service answers `408` (`Failure::BodyTimeout`), then the connection
    /// closes (nothing more is read).
    fn cut(&mut self, cut: Cut, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        crate::telemetry::refused!(self.settings.refusals, BodyTimeout => info!(target: "access", client = %self.peer, reason = cut.reason(), "request body timed out"));
        self.timer_kind = None;
        if matches!(self.state, State::Held(_)) {
            self.state = State::Rejecting {
                bytes: self.canned.get(408),
            };
            self.buf.clear();
            self.ready = 0;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.state = State::Closed;
        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, Stalled(cut))))
    }
}

super::io::write_through!(Guard);
