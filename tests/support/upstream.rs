//! A recording upstream that plays the app: a hyper HTTP/1.1 server on TCP or a unix socket that records
//! every request it receives (method, target, headers, body length, which connection) for assertions.
//!
//! Endpoints: `/slow/MS` answers after MS milliseconds; `/bytes/N` streams N bytes (`?accel=no` adds
//! `X-Accel-Buffering: no`; [`Upstream::responses_sent`] counts those finished); `/sse` sends two events 2 s apart; `/status/N` answers N; `/upload` counts the
//! body; `/content/N` answers N bytes of text as asked (type, cookie, cache-control, coding, streamed:
//! see [`content`]); `/sha256` answers `sha256=HEX len=N` for the body it received; `/ws` accepts an upgrade and echoes bytes; `/banner` answers with version banners, hop-by-hop
//! fields and its own X-Frame-Options; anything else answers 200 with the request headers as text.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};

#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub target: String,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body_len: u64,
    /// The body, when under 1 MiB.
    pub body: Bytes,
    /// Which upstream connection carried it (0, 1, ... in accept order).
    pub conn: usize,
}

#[derive(Clone, Default)]
struct Shared {
    records: Arc<Mutex<Vec<Recorded>>>,
    conns: Arc<AtomicUsize>,
    /// `/bytes/N` responses whose last byte the app has handed to its connection.
    sent: Arc<AtomicUsize>,
    /// Requests whose handler has started and not yet finished (a head in, no answer yet).
    in_flight: Arc<AtomicUsize>,
}

/// Counts a request in flight for as long as its handler runs (however it ends).
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(count: &Arc<AtomicUsize>) -> InFlight {
        count.fetch_add(1, Ordering::SeqCst);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct Upstream {
    addr: String,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
    _dir: Option<super::TempDir>,
    pub socket: Option<PathBuf>,
}

impl Upstream {
    pub async fn tcp() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let shared = Shared::default();
        let s = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                serve(TokioIo::new(stream), s.clone());
            }
        });
        Upstream {
            addr: addr.to_string(),
            shared,
            task,
            _dir: None,
            socket: None,
        }
    }

    pub async fn unix() -> Upstream {
        let dir = super::TempDir::new("uds");
        let path = dir.path().join("app.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let shared = Shared::default();
        let s = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                serve(TokioIo::new(stream), s.clone());
            }
        });
        Upstream {
            addr: format!("unix:{}", path.display()),
            shared,
            task,
            _dir: Some(dir),
            socket: Some(path),
        }
    }

    /// As the config's `servers` entry wants it.
    pub fn addr_string(&self) -> String {
        self.addr.clone()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.records.lock().unwrap().clone()
    }

    pub fn last(&self) -> Recorded {
        self.requests()
            .pop()
            .expect("the upstream received no request")
    }

    pub fn connections(&self) -> usize {
        self.shared.conns.load(Ordering::SeqCst)
    }

    /// How many `/bytes/N` responses the app has finished writing (its last frame taken by its connection).
    pub fn responses_sent(&self) -> usize {
        self.shared.sent.load(Ordering::SeqCst)
    }

    /// Requests the app is handling right now (it has their head, and has not answered): one left waiting
    /// for a body that will never come holds a worker of a real app.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn serve<I>(io: I, shared: Shared)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let conn = shared.conns.fetch_add(1, Ordering::SeqCst);
    tokio::spawn(async move {
        let svc = service_fn(move |req| handle(req, shared.clone(), conn));
        let _ = http1::Builder::new()
            .serve_connection(io, svc)
            .with_upgrades()
            .await;
    });
}

type Body = BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(b.into()).boxed()
}

async fn handle(
    mut req: Request<Incoming>,
    shared: Shared,
    conn: usize,
) -> Result<Response<Body>, Infallible> {
    let _in_flight = InFlight::new(&shared.in_flight);
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let mut rec = Recorded {
        method: req.method().to_string(),
        target: req.uri().to_string(),
        version: req.version(),
        headers: req.headers().clone(),
        body_len: 0,
        body: Bytes::new(),
        conn,
    };
    if path == "/ws" {
        let on_upgrade = hyper::upgrade::on(&mut req);
        shared.records.lock().unwrap().push(rec);
        tokio::spawn(async move {
            if let Ok(up) = on_upgrade.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 4096];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let res = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("upgrade", "websocket")
            .header("connection", "Upgrade")
            .body(full(""))
            .unwrap();
        return Ok(res);
    }
    if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(1000))).await;
    }
    // Read the body, keeping it when small.
    let mut body = req.into_body();
    let mut kept = Vec::new();
    let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut complete = true;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            complete = false;
            break;
        };
        if let Some(d) = frame.data_ref() {
            rec.body_len += d.len() as u64;
            if kept.len() < 1 << 20 {
                kept.extend_from_slice(d);
            }
            if path == "/sha256" {
                digest.update(d);
            }
        }
    }
    rec.body = Bytes::from(kept);
    let headers_text: String = rec
        .headers
        .iter()
        .map(|(k, v)| format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())))
        .collect();
    let body_len = rec.body_len;
    shared.records.lock().unwrap().push(rec);

    if let Some(n) = path.strip_prefix("/bytes/") {
        let n: u64 = n.parse().unwrap_or(0);
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let sent = shared.sent.clone();
        // Counted as sent when its last frame is taken (hyper never polls past a declared length).
        let mut left = n;
        let stream = futures_util::StreamExt::map(chunks(n, chunk), move |frame| {
            if let Ok(f) = &frame {
                left -= f.data_ref().map_or(0, |d| d.len() as u64);
                if left == 0 {
                    sent.fetch_add(1, Ordering::SeqCst);
                }
            }
            frame
        });
        let mut res = Response::builder().header("content-length", n.to_string());
        if query.contains("accel=no") {
            res = res.header("x-accel-buffering", "no");
        }
        return Ok(res.body(StreamBody::new(stream).boxed()).unwrap());
    }
    if path == "/sse" {
        // Two events 2 s apart: the first must reach the client while the response is still open.
        let events = futures_util::stream::unfold(0u8, |i| async move {
            match i {
                0 => Some((
                    Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"data: one\n\n"))),
                    1,
                )),
                1 => {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    Some((Ok(Frame::data(Bytes::from_static(b"data: two\n\n"))), 2))
                }
                _ => None,
            }
        });
        let res = Response::builder()
            .header("content-type", "text/event-stream; charset=utf-8")
            .header("cache-control", "no-cache")
            .body(StreamBody::new(events).boxed())
            .unwrap();
        return Ok(res);
    }
    if let Some(n) = path.strip_prefix("/content/") {
        return Ok(content(n.parse().unwrap_or(0), &query));
    }
    if path == "/upload" {
        return Ok(Response::new(full(format!("received {body_len} bytes"))));
    }
    if path == "/sha256" {
        let text = if complete {
            format!(
                "sha256={} len={body_len}",
                super::hex(digest.finish().as_ref())
            )
        } else {
            format!("body broke after {body_len} bytes")
        };
        return Ok(Response::new(full(text)));
    }
    if path == "/banner" {
        let res = Response::builder()
            .header("server", "gunicorn/20.1.0")
            .header("x-powered-by", "Flask/2.2.2")
            .header("x-frame-options", "SAMEORIGIN")
            .header("connection", "x-hop")
            .header("x-hop", "secret")
            .header("keep-alive", "timeout=5")
            .body(full("banner"))
            .unwrap();
        return Ok(res);
    }
    if path.starts_with("/slow/") {
        return Ok(Response::new(full("slow done")));
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let status = code
            .parse()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::OK);
        let res = Response::builder()
            .status(status)
            .body(full(format!("the app said {}", status.as_u16())))
            .unwrap();
        return Ok(res);
    }
    Ok(Response::new(full(headers_text)))
}

/// `/content/N?type=T&cookie&cc=V&ce=V&etag=V&chunked&pause=MS&accel=no`: N bytes of [`text_body`] as type T
/// (default `text/html`), with `Set-Cookie`, `Cache-Control: V`, `Content-Encoding: V`, `ETag: V` when
/// asked; `chunked` streams it in 1 KiB frames with no `Content-Length`, `pause` waits MS ms at half way,
/// `accel=no` asks the proxy not to buffer it.
fn content(n: usize, query: &str) -> Response<Body> {
    let mut res = Response::builder().header("content-type", "text/html; charset=utf-8");
    let mut chunked = false;
    let mut pause = 0;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        res = match k {
            "type" => {
                res.headers_mut().unwrap().remove("content-type");
                res.header("content-type", v)
            }
            "cookie" => res.header("set-cookie", "session=s3cret; Secure; HttpOnly"),
            "cc" => res.header("cache-control", v),
            "ce" => res.header("content-encoding", v),
            "etag" => res.header("etag", format!("\"{v}\"")),
            "chunked" => {
                chunked = true;
                res
            }
            "pause" => {
                pause = v.parse().unwrap_or(0);
                res
            }
            "accel" => res.header("x-accel-buffering", v),
            _ => res,
        };
    }
    let body = Bytes::from(text_body(n));
    if chunked {
        // With `pause=MS`, the second half comes MS milliseconds after the first.
        let frames: Vec<Bytes> = body.chunks(1024).map(Bytes::copy_from_slice).collect();
        let half = frames.len() / 2;
        let stream = futures_util::stream::unfold((frames, 0), move |(frames, i)| async move {
            let frame = frames.get(i)?.clone();
            if i == half && pause > 0 {
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            Some((Ok::<_, Infallible>(Frame::data(frame)), (frames, i + 1)))
        });
        return res.body(StreamBody::new(stream).boxed()).unwrap();
    }
    res.header("content-length", n.to_string())
        .body(full(body))
        .unwrap()
}

/// `n` bytes that compress well and are not all text: numbered lines, each ending in one byte of every
/// value in turn (NUL, CR, LF, 0xFF...), so that a decoder that mangles bytes shows in a digest.
pub fn text_body(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 64);
    let mut i = 0u32;
    while out.len() < n {
        out.extend_from_slice(format!("<p>line {i}: the quick brown fox</p>").as_bytes());
        out.push((i % 256) as u8);
        i += 1;
    }
    out.truncate(n);
    out
}

/// `n` bytes as a stream of `chunk`-sized frames (never held whole): bodies for the large-body tests.
pub fn chunks(
    n: u64,
    chunk: Bytes,
) -> impl futures_core::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + 'static {
    struct S {
        left: u64,
        chunk: Bytes,
    }
    impl futures_core::Stream for S {
        type Item = Result<Frame<Bytes>, Infallible>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            if self.left == 0 {
                return std::task::Poll::Ready(None);
            }
            let take = self.left.min(self.chunk.len() as u64) as usize;
            self.left -= take as u64;
            std::task::Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..take)))))
        }
    }
    S { left: n, chunk }
}
