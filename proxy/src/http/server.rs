//! Connections: accept loops for the HTTPS and plain-HTTP listeners, the TLS handshake (read the
//! ClientHello first, then pick the config), HTTP/1.1 or HTTP/2 by ALPN, and the per-connection watch for
//! idleness and shutdown. What happens to a request is `proxy`'s; what a connection may cost is here.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::LazyConfigAcceptor;

use crate::http::proxy::{self, Listener};
use crate::shutdown::Shutdown;
use crate::state::State;

/// A client gets this long to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections until shutdown begins; each is served on its own task.
pub async fn accept(
    listener: TcpListener,
    kind: Listener,
    state: Arc<State>,
    mut shutdown: Shutdown,
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.begun() => break,
        };
        let state = state.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            match kind {
                Listener::Https => https(stream, peer, state, shutdown).await,
                Listener::Http => http(stream, peer, state, shutdown).await,
            }
        });
    }
}

async fn https(stream: TcpStream, peer: SocketAddr, state: Arc<State>, shutdown: Shutdown) {
    let _ = stream.set_nodelay(true);
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let start = acceptor.await?;
        start.into_stream(state.tls.clone()).await
    })
    .await;
    let tls = match tls {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let touched = Arc::new(AtomicBool::new(true));
    let io = Tracked {
        inner: TokioIo::new(tls),
        touched: touched.clone(),
    };
    let idle = state.config.timeouts.client_idle;
    let svc_state = state.clone();
    let svc = service_fn(move |req| {
        let state = svc_state.clone();
        async move { proxy::serve(&state, Listener::Https, peer.ip(), req).await }
    });
    if h2 {
        let conn = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .serve_connection(io, svc);
        drive(conn, |c| c.graceful_shutdown(), touched, idle, shutdown).await;
    } else {
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .serve_connection(io, svc)
            .with_upgrades();
        drive(conn, |c| c.graceful_shutdown(), touched, idle, shutdown).await;
    }
}

async fn http(stream: TcpStream, peer: SocketAddr, state: Arc<State>, shutdown: Shutdown) {
    let _ = stream.set_nodelay(true);
    let touched = Arc::new(AtomicBool::new(true));
    let io = Tracked {
        inner: TokioIo::new(stream),
        touched: touched.clone(),
    };
    let idle = state.config.timeouts.client_idle;
    let svc = service_fn(move |req| {
        let state = state.clone();
        async move { proxy::serve(&state, Listener::Http, peer.ip(), req).await }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(io, svc);
    drive(conn, |c| c.graceful_shutdown(), touched, idle, shutdown).await;
}

/// Runs a connection to its end. It is asked to close gracefully (finish what is in flight, then close) when
/// shutdown begins, or when no byte has moved either way for `idle` (checked twice per `idle`).
async fn drive<C, G>(
    conn: C,
    graceful: G,
    touched: Arc<AtomicBool>,
    idle: Duration,
    mut shutdown: Shutdown,
) where
    C: Future<Output = Result<(), hyper::Error>>,
    G: Fn(Pin<&mut C>),
{
    tokio::pin!(conn);
    let mut tick = tokio::time::interval(idle / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut quiet_ticks = 0u8;
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = tick.tick(), if !closing => {
                if touched.swap(false, Ordering::Relaxed) {
                    quiet_ticks = 0;
                } else {
                    quiet_ticks += 1;
                    if quiet_ticks >= 2 {
                        graceful(conn.as_mut());
                        closing = true;
                    }
                }
            }
            () = shutdown.begun(), if !closing => {
                graceful(conn.as_mut());
                closing = true;
            }
        }
    }
}

/// A connection's I/O that notes whether any byte moved since the idle check last looked.
struct Tracked<T> {
    inner: T,
    touched: Arc<AtomicBool>,
}

impl<T: Read + Unpin> Read for Tracked<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if r.is_ready() {
            this.touched.store(true, Ordering::Relaxed);
        }
        r
    }
}

impl<T: Write + Unpin> Write for Tracked<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if r.is_ready() {
            this.touched.store(true, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if r.is_ready() {
            this.touched.store(true, Ordering::Relaxed);
        }
        r
    }
}
