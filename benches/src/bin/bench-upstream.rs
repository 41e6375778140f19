//! `bench-upstream PORT [SOCKET]`: the app server both proxies forward to in `benches/run`. Plain HTTP/1.1
//! with keep-alive on 127.0.0.1 (and on the unix socket SOCKET, if given); `/` and `/unix/` answer a ~100-byte
//! body, `/1m` answers 1 MiB (allocated once, each response a cheap clone), `/stats` answers
//! `connections=N requests=N` (counted since start, both listeners: `benches/run` reads it to see how many
//! upstream connections a proxy opened), anything else 404. It does as little as possible so that the proxy
//! is what gets measured. PORT 0 picks a free port; the bound address is printed on stdout as
//! `listening on ADDR` (after SOCKET is bound).

#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, UnixListener};

/// The small response: 100 bytes, about what a health check or a tiny JSON answer is.
const SMALL: &[u8; 100] =
    b"Hello from the Portcullis bench upstream. This body is exactly one hundred bytes long, padded: ....\n";

/// The large response: 1 MiB.
const LARGE_LEN: usize = 1024 * 1024;

/// Listen backlog (capped by the kernel at net.core.somaxconn, 4096 on Debian 12).
const BACKLOG: u32 = 65535;

fn main() -> ExitCode {
    let port = match std::env::args().nth(1).map(|p| p.parse::<u16>()) {
        Some(Ok(p)) => p,
        _ => {
            eprintln!("usage: bench-upstream PORT [SOCKET]   (0 picks a free port)");
            return ExitCode::from(64);
        }
    };
    let socket = std::env::args().nth(2).map(std::path::PathBuf::from);
    // One thread: `benches/run` pins this process to the load generator's core.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench-upstream: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(SocketAddr::from(([127, 0, 0, 1], port)), socket)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-upstream: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(addr: SocketAddr, socket: Option<std::path::PathBuf>) -> std::io::Result<()> {
    // A deep accept queue: under HTTP/2 load a proxy may open hundreds of upstream connections at once, and
    // a full queue drops SYNs (a 1 s retransmit that would show up as the proxy's p99). The kernel caps it
    // at net.core.somaxconn.
    let tcp = TcpSocket::new_v4()?;
    tcp.set_reuseaddr(true)?;
    tcp.bind(addr)?;
    let listener = tcp.listen(BACKLOG)?;
    let bound = listener.local_addr()?;
    let app = App {
        small: Bytes::from_static(SMALL),
        large: Bytes::from(vec![b'x'; LARGE_LEN]),
        stats: Arc::new(Stats::default()),
    };
    if let Some(path) = socket {
        let _ = std::fs::remove_file(&path);
        let unix = UnixListener::bind(&path)?;
        let app = app.clone();
        tokio::spawn(async move {
            loop {
                match unix.accept().await {
                    Ok((stream, _)) => app.serve(stream),
                    Err(e) => backoff(e).await,
                }
            }
        });
    }
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {bound}")?;
        out.flush()?;
    }
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                app.serve(stream);
            }
            Err(e) => backoff(e).await,
        }
    }
}

/// EMFILE and the like: say so, back off, keep serving.
async fn backoff(e: std::io::Error) {
    eprintln!("bench-upstream: accept: {e}");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
}

/// The responses, built once, and the counters.
#[derive(Clone)]
struct App {
    small: Bytes,
    large: Bytes,
    stats: Arc<Stats>,
}

impl App {
    /// Serves one accepted connection (TCP or unix) on its own task.
    fn serve<S>(&self, stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        let app = self.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let body = match req.uri().path() {
                    "/" | "/unix/" => Some(app.small.clone()),
                    "/1m" => Some(app.large.clone()),
                    "/stats" => Some(Bytes::from(app.stats.to_string())),
                    _ => None,
                };
                app.stats.requests.fetch_add(1, Ordering::Relaxed);
                async move { Ok::<_, Infallible>(respond(body)) }
            });
            // Errors here are clients going away mid-response: nothing to do about them.
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Counters since start.
#[derive(Debug, Default)]
struct Stats {
    connections: AtomicU64,
    requests: AtomicU64,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "connections={} requests={}",
            self.connections.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed)
        )
    }
}

fn respond(body: Option<Bytes>) -> Response<Full<Bytes>> {
    let (status, body) = match body {
        Some(b) => (StatusCode::OK, b),
        None => (StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n")),
    };
    let mut res = Response::new(Full::new(body));
    *res.status_mut() = status;
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}
