//! `bench-upstream PORT`: the app server both proxies forward to in `benches/run`. Plain HTTP/1.1 with
//! keep-alive on 127.0.0.1; `/` answers a ~100-byte body, `/1m` answers 1 MiB (allocated once, each response
//! a cheap clone), `/stats` answers `connections=N requests=N` (counted since start: `benches/run` reads it to
//! see how many upstream connections a proxy opened), anything else 404. It does as little as possible so
//! that the proxy is what gets measured. PORT 0 picks a free port; the bound address is printed on stdout as
//! `listening on ADDR`.

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
use tokio::net::TcpSocket;

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
            eprintln!("usage: bench-upstream PORT   (0 picks a free port)");
            return ExitCode::from(64);
        }
    };
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
    match runtime.block_on(serve(SocketAddr::from(([127, 0, 0, 1], port)))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-upstream: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(addr: SocketAddr) -> std::io::Result<()> {
    // A deep accept queue: under HTTP/2 load a proxy may open hundreds of upstream connections at once, and
    // a full queue drops SYNs (a 1 s retransmit that would show up as the proxy's p99). The kernel caps it
    // at net.core.somaxconn.
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(BACKLOG)?;
    let bound = listener.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {bound}")?;
        out.flush()?;
    }
    let small = Bytes::from_static(SMALL);
    let large = Bytes::from(vec![b'x'; LARGE_LEN]);
    let stats = Arc::new(Stats::default());
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and the like: say so, back off, keep serving.
                eprintln!("bench-upstream: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let (small, large, stats) = (small.clone(), large.clone(), stats.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let body = match req.uri().path() {
                    "/" => Some(small.clone()),
                    "/1m" => Some(large.clone()),
                    "/stats" => Some(Bytes::from(stats.to_string())),
                    _ => None,
                };
                stats.requests.fetch_add(1, Ordering::Relaxed);
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
