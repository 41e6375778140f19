//! Connections: accept loops for the HTTPS and plain-HTTP listeners, admission (total and, under pressure,
//! per-IP connection caps, checked before any TLS work), the TLS handshake (read the ClientHello first, then pick the config),
//! HTTP/1.1 (behind the request guard) or HTTP/2 by ALPN, and the per-connection watch for idleness, request
//! caps and shutdown. What happens to a request is `proxy`'s; what a connection may cost is here, and an
//! upgraded request's tunnel takes the connection's [`Lease`] with it.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{CONNECTION, HeaderValue};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::LazyConfigAcceptor;

use crate::http::guard::{Guard, UpgradeGate};
use crate::http::h2;
use crate::http::proxy::{self, Listener};
use crate::http::proxyproto;
use crate::shutdown::Shutdown;
use crate::state::State;

/// A client gets this long to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connection caps: in total, and per client address while the proxy is under pressure. Taken once per
/// connection (a tunnel keeps its connection's), never per request.
///
/// The per-address cap applies only once more than half of the total cap is in use: below that, one
/// address (an office or a carrier's CGNAT behind one IP) may open as many connections as it needs; past
/// it, an address that already holds `max_per_ip` gets no more, so that the other half stays for everyone
/// else. nginx and HAProxy have no per-address cap by default.
#[derive(Debug)]
pub struct Admission {
    total: AtomicU64,
    max_total: u64,
    /// Past this many open connections the per-address cap applies.
    pressure: u64,
    per_ip: Mutex<HashMap<IpAddr, u64>>,
    max_per_ip: u64,
}

/// A connection's place; given back on drop.
pub struct Ticket {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Admission {
    pub fn new(max_total: u64, max_per_ip: u64) -> Admission {
        Admission {
            total: AtomicU64::new(0),
            max_total,
            pressure: max_total / 2,
            per_ip: Mutex::new(HashMap::new()),
            max_per_ip,
        }
    }

    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Ticket> {
        let ip = ip.to_canonical();
        let total = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        if total > self.max_total {
            self.total.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        // A poisoned lock only means another connection task panicked mid-update: the counts are still usable.
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = per_ip.entry(ip).or_insert(0);
        if total > self.pressure && *n >= self.max_per_ip {
            drop(per_ip);
            self.total.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        *n += 1;
        Some(Ticket {
            admission: self.clone(),
            ip,
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.total.fetch_sub(1, Ordering::Relaxed);
        let mut per_ip = self
            .admission
            .per_ip
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// What a connection lends its requests: the listener's port (sent as `X-Forwarded-Port`), and the
/// connection's place in the caps with a shutdown handle. An upgraded request's tunnel keeps a clone, so
/// that it counts against the caps and the drain waits for it after hyper's connection has ended.
#[derive(Clone)]
pub struct Lease {
    pub port: HeaderValue,
    pub shutdown: Shutdown,
    _ticket: Arc<Ticket>,
}

/// Accepts connections until shutdown begins; each is served on its own task.
pub async fn accept(
    listener: TcpListener,
    kind: Listener,
    state: Arc<State>,
    mut shutdown: Shutdown,
) {
    // The port clients connected to (the listener's; with port 0, the one the kernel picked).
    let port = HeaderValue::from(listener.local_addr().map_or(0, |a| a.port()));
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
        let port = port.clone();
        tokio::spawn(async move {
            let Some((stream, peer, ticket)) = admit(stream, peer, &state).await else {
                return;
            };
            let lease = Lease {
                port,
                shutdown,
                _ticket: Arc::new(ticket),
            };
            match kind {
                Listener::Https => https(stream, peer, state, lease).await,
                Listener::Http => http(stream, peer, state, lease).await,
            }
        });
    }
}

/// Before any TLS work: the PROXY header when configured (only from a trusted proxy; it names the client),
/// then the connection caps for that client.
async fn admit(
    mut stream: TcpStream,
    mut peer: SocketAddr,
    state: &Arc<State>,
) -> Option<(TcpStream, SocketAddr, Ticket)> {
    if state.config.listen.proxy_protocol {
        if !state
            .config
            .trusted_proxies
            .iter()
            .any(|c| c.contains(peer.ip()))
        {
            crate::telemetry::refused!(state.refusals, Connection => info!(target: "access", client = %peer.ip(), "connection refused: PROXY protocol from an untrusted peer"));
            return None;
        }
        match proxyproto::read(&mut stream, peer, state.config.timeouts.client_header).await {
            Ok(source) => peer = source,
            Err(e) => {
                crate::telemetry::refused!(state.refusals, Connection => info!(target: "access", client = %peer.ip(), error = %e, "connection refused: bad PROXY header"));
                return None;
            }
        }
    }
    match state.admission.admit(peer.ip()) {
        Some(ticket) => Some((stream, peer, ticket)),
        None => {
            crate::telemetry::refused!(state.refusals, Connection => info!(target: "access", client = %peer.ip(), "connection refused: connection limit reached"));
            None
        }
    }
}

/// Per-connection bookkeeping shared by the I/O wrapper, the service and `drive`.
struct Conn {
    touched: AtomicBool,
    requests: AtomicU64,
    close: Notify,
    lease: Lease,
    /// HTTP/1.1: tells the guard how a request that asked to upgrade was answered.
    gate: Arc<UpgradeGate>,
}

impl Conn {
    fn new(lease: Lease) -> Arc<Conn> {
        Arc::new(Conn {
            touched: AtomicBool::new(true),
            requests: AtomicU64::new(0),
            close: Notify::new(),
            lease,
            gate: Arc::default(),
        })
    }
}

/// The per-connection service: serves a request, and after `max_requests_per_connection` asks the client
/// to go elsewhere (`Connection: close` on HTTP/1.1, GOAWAY on HTTP/2). A macro rather than a function so
/// that the future type stays concrete (and `Send`) without boxing every request.
macro_rules! service {
    ($state:expr, $conn:expr, $kind:expr, $sni:expr, $ip:expr) => {{
        let state = $state.clone();
        let conn = $conn.clone();
        let (kind, sni, ip) = ($kind, $sni, $ip);
        service_fn(move |req| {
            let state = state.clone();
            let conn = conn.clone();
            async move {
                let asks_upgrade = UpgradeGate::asks(&req);
                let mut res = proxy::serve(&state, kind, sni, ip, &conn.lease, req).await?;
                if asks_upgrade {
                    conn.gate
                        .decide(res.status() == http::StatusCode::SWITCHING_PROTOCOLS);
                }
                let n = conn.requests.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= state.config.limits.max_requests_per_connection {
                    res.headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                    conn.close.notify_one();
                }
                Ok::<_, std::convert::Infallible>(res)
            }
        })
    }};
}

async fn https(stream: TcpStream, peer: SocketAddr, state: Arc<State>, lease: Lease) {
    let _ = stream.set_nodelay(true);
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let start = acceptor.await?;
        // ACME TLS-ALPN-01 (RFC 8737): a validation handshake gets the challenge certificate, then the end.
        if let Some(config) =
            crate::acme::tls_alpn01::answer(&state.challenges, &start.client_hello())
        {
            let mut tls = start.into_stream(config).await?;
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
            return Ok(None);
        }
        // The site this connection's SNI names (requests on it must be for that site).
        let sni = start
            .client_hello()
            .server_name()
            .and_then(|n| state.sites.site_for(n));
        start
            .into_stream(state.tls.clone())
            .await
            .map(|tls| Some((tls, sni)))
    })
    .await;
    let (tls, sni) = match tls {
        Ok(Ok(Some(pair))) => pair,
        Ok(Ok(None)) => return,
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
    let shutdown = lease.shutdown.clone();
    let conn = Conn::new(lease);
    let svc = service!(state, conn, Listener::Https, sni, peer.ip());
    let idle = state.config.timeouts.client_idle;
    let limits = &state.config.limits;
    if h2 {
        let timeout = state.config.timeouts.client_header;
        let watch = h2::Watch::new(tls, timeout, peer.ip(), state.refusals.clone());
        let io = Tracked {
            inner: TokioIo::new(watch),
            conn: conn.clone(),
        };
        let max_list = h2::header_list_size(&state.guard.limits);
        let c = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(u32::try_from(limits.h2_max_streams).unwrap_or(u32::MAX))
            .max_header_list_size(max_list)
            // Rapid reset (CVE-2023-44487): few streams may wait reset before accept, and a client that
            // makes us reset streams over and over is sent GOAWAY.
            .max_pending_accept_reset_streams(Some(20))
            .max_local_error_reset_streams(Some(256))
            .keep_alive_interval(None)
            .serve_connection(io, svc);
        drive(c, |c| c.graceful_shutdown(), conn, idle, shutdown).await;
    } else {
        let guard = Guard::new(
            tls,
            state.guard.clone(),
            state.canned_https.clone(),
            peer.ip(),
            conn.gate.clone(),
        );
        let io = Tracked {
            inner: TokioIo::new(guard),
            conn: conn.clone(),
        };
        let c = http1_builder(&state)
            .serve_connection(io, svc)
            .with_upgrades();
        drive(c, |c| c.graceful_shutdown(), conn, idle, shutdown).await;
    }
}

async fn http(stream: TcpStream, peer: SocketAddr, state: Arc<State>, lease: Lease) {
    let _ = stream.set_nodelay(true);
    let shutdown = lease.shutdown.clone();
    let conn = Conn::new(lease);
    let guard = Guard::new(
        stream,
        state.guard.clone(),
        state.canned_http.clone(),
        peer.ip(),
        conn.gate.clone(),
    );
    let io = Tracked {
        inner: TokioIo::new(guard),
        conn: conn.clone(),
    };
    let svc = service!(state, conn, Listener::Http, None, peer.ip());
    let idle = state.config.timeouts.client_idle;
    let c = http1_builder(&state).serve_connection(io, svc);
    drive(c, |c| c.graceful_shutdown(), conn, idle, shutdown).await;
}

fn http1_builder(state: &State) -> http1::Builder {
    let limits = &state.config.limits;
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        // The guard has already held each head to our limits; hyper's own are a second line, set wider.
        .max_buf_size(
            usize::try_from(limits.header_bytes)
                .unwrap_or(usize::MAX)
                .saturating_mul(2)
                .max(64 * 1024),
        )
        .max_headers(
            usize::try_from(limits.headers)
                .unwrap_or(usize::MAX)
                .saturating_add(8),
        );
    b
}

/// Runs a connection to its end. It is asked to close gracefully (finish what is in flight, then close) when
/// shutdown begins, when it has served its quota of requests, or when no byte has moved either way for
/// `idle` (checked twice per `idle`).
async fn drive<C, G>(c: C, graceful: G, conn: Arc<Conn>, idle: Duration, mut shutdown: Shutdown)
where
    C: Future<Output = Result<(), hyper::Error>>,
    G: Fn(Pin<&mut C>),
{
    tokio::pin!(c);
    let mut tick = tokio::time::interval(idle / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut quiet_ticks = 0u8;
    let mut closing = false;
    loop {
        tokio::select! {
            r = c.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = tick.tick(), if !closing => {
                if conn.touched.swap(false, Ordering::Relaxed) {
                    quiet_ticks = 0;
                } else {
                    quiet_ticks += 1;
                    if quiet_ticks >= 2 {
                        graceful(c.as_mut());
                        closing = true;
                    }
                }
            }
            () = conn.close.notified(), if !closing => {
                graceful(c.as_mut());
                closing = true;
            }
            () = shutdown.begun(), if !closing => {
                graceful(c.as_mut());
                closing = true;
            }
        }
    }
}

/// A connection's I/O that notes whether any byte moved since the idle check last looked.
struct Tracked<T> {
    inner: T,
    conn: Arc<Conn>,
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
            this.conn.touched.store(true, Ordering::Relaxed);
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
            this.conn.touched.store(true, Ordering::Relaxed);
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
            this.conn.touched.store(true, Ordering::Relaxed);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_address_may_exceed_its_cap_until_half_of_the_total_is_in_use() {
        let a = Arc::new(Admission::new(10, 2));
        // Below half of the total cap, an office behind one address is not refused.
        let office: Vec<Ticket> = (0..5).map(|_| a.admit(ip("192.0.2.1")).unwrap()).collect();
        // Past half, an address already at its cap gets no more, and others still get theirs.
        assert!(a.admit(ip("192.0.2.1")).is_none());
        let b1 = a.admit(ip("192.0.2.2")).unwrap();
        let _b2 = a.admit(ip("192.0.2.2")).unwrap();
        assert!(a.admit(ip("192.0.2.2")).is_none());
        // IPv4-mapped IPv6 is the same client.
        assert!(a.admit(ip("::ffff:192.0.2.2")).is_none());
        let _c: Vec<Ticket> = (3..6)
            .map(|n| a.admit(ip(&format!("192.0.2.{n}"))).unwrap())
            .collect();
        // The total cap holds whoever asks.
        assert!(a.admit(ip("192.0.2.9")).is_none());
        drop(b1);
        let _d = a.admit(ip("192.0.2.9")).unwrap();
        drop(office);
        assert_eq!(a.total.load(Ordering::Relaxed), 5);
        assert!(!a.per_ip.lock().unwrap().contains_key(&ip("192.0.2.1")));
    }
}
