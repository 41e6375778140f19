//! Connections: accept loops for the HTTPS and plain-HTTP listeners, admission (total and, under pressure,
//! per-IP connection caps, checked before any TLS work), the TLS handshake (read the ClientHello first, then pick the config),
//! HTTP/1.1 (behind the request guard) or HTTP/2 by ALPN, and the per-connection watch for idleness, request
//! caps and shutdown. What happens to a request is `proxy`'s; what a connection may cost is here, and an
//! upgraded request's tunnel takes the connection's [`Lease`] with it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{CONNECTION, HeaderValue};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::LazyConfigAcceptor;

use crate::admission::Ticket;
use crate::http::client_cert::ClientCert;
use crate::http::ctx::Lease;
use crate::http::guard::{Guard, UpgradeGate};
use crate::http::h2;
use crate::http::pipeline::{self, Listener};
use crate::http::proxyproto;
use crate::metrics::HandshakeFailure;
use crate::shutdown::Shutdown;
use crate::state::{Shared, Snapshot};

/// A client gets this long to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections until shutdown begins; each is served on its own task.
pub async fn accept(
    listener: TcpListener,
    kind: Listener,
    shared: Arc<Shared>,
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
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let port = port.clone();
        tokio::spawn(async move {
            // The connection keeps the snapshot it started with (TLS config, guard, limits, timeouts).
            let snap = shared.snapshot();
            let Some((stream, peer, ticket)) = admit(stream, peer, &shared, &snap).await else {
                return;
            };
            let lease = Lease::new(port, peer.ip(), shutdown, ticket);
            match kind {
                Listener::Https => https(stream, peer, shared, snap, lease).await,
                Listener::Http => http(stream, peer, shared, snap, lease).await,
            }
        });
    }
}

/// Before any TLS work: the PROXY header when configured (only from a trusted proxy; it names the client),
/// then the connection caps for that client.
async fn admit(
    mut stream: TcpStream,
    mut peer: SocketAddr,
    shared: &Arc<Shared>,
    snap: &Snapshot,
) -> Option<(TcpStream, SocketAddr, Ticket)> {
    if snap.config.listen.proxy_protocol {
        if !snap
            .config
            .trusted_proxies
            .iter()
            .any(|c| c.contains(peer.ip()))
        {
            crate::telemetry::refused!(shared.refusals, Connection => info!(target: "access", client = %peer.ip(), "connection refused: PROXY protocol from an untrusted peer"));
            return None;
        }
        match proxyproto::read(&mut stream, peer, snap.config.timeouts.client_header).await {
            Ok(source) => peer = source,
            Err(e) => {
                crate::telemetry::refused!(shared.refusals, Connection => info!(target: "access", client = %peer.ip(), error = %e, "connection refused: bad PROXY header"));
                return None;
            }
        }
    }
    match shared.admission.admit(peer.ip()) {
        Some(ticket) => Some((stream, peer, ticket)),
        None => {
            crate::telemetry::refused!(shared.refusals, Connection => info!(target: "access", client = %peer.ip(), "connection refused: connection limit reached"));
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
    /// The name the TLS handshake sent (SNI), if any. Each request looks its site up in the request's own
    /// snapshot, where the Host is looked up too: a config reload can add, remove or rename sites between
    /// two requests of one connection, and a site's place in one set means nothing in another.
    sni: Option<Box<str>>,
}

impl Conn {
    fn new(lease: Lease, sni: Option<Box<str>>) -> Arc<Conn> {
        Arc::new(Conn {
            touched: AtomicBool::new(true),
            requests: AtomicU64::new(0),
            close: Notify::new(),
            lease,
            gate: Arc::default(),
            sni,
        })
    }
}

/// The per-connection service: serves a request, and after `max_requests_per_connection` asks the client
/// to go elsewhere (`Connection: close` on HTTP/1.1, GOAWAY on HTTP/2). A macro rather than a function so
/// that the future type stays concrete (and `Send`) without a `dyn`.
macro_rules! service {
    ($shared:expr, $snap:expr, $conn:expr, $kind:expr, $ip:expr) => {{
        let shared = $shared.clone();
        let conn = $conn.clone();
        let max_requests = $snap.config.limits.max_requests_per_connection;
        let (kind, ip) = ($kind, $ip);
        service_fn(move |req| {
            let shared = shared.clone();
            let conn = conn.clone();
            // Boxed per request: hyper keeps room for one service future per connection for as long as the
            // connection lives, and a request's whole state (~6 KiB) would then stay with every idle
            // keep-alive connection; boxed, an idle connection keeps a pointer.
            Box::pin(async move {
                let asks_upgrade = UpgradeGate::asks(&req);
                let mut res =
                    pipeline::serve(&shared, kind, conn.sni.as_deref(), ip, &conn.lease, req)
                        .await?;
                if asks_upgrade {
                    conn.gate
                        .decide(res.status() == http::StatusCode::SWITCHING_PROTOCOLS);
                }
                let n = conn.requests.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= max_requests {
                    res.headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                    conn.close.notify_one();
                }
                Ok::<_, std::convert::Infallible>(res)
            })
        })
    }};
}

async fn https(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    snap: Arc<Snapshot>,
    lease: Lease,
) {
    let _ = stream.set_nodelay(true);
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
    // Boxed: the handshake's state is freed when it is done, not kept in the connection's task for its life.
    let tls = Box::pin(tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let start = acceptor.await?;
        // ACME TLS-ALPN-01 (RFC 8737): a validation handshake gets the challenge certificate, then the end.
        let validation = crate::acme::tls_alpn01::validation(&start.client_hello());
        let answer = match &validation {
            Some(name) => crate::acme::tls_alpn01::answer(&shared.challenges, name).await,
            None => None,
        };
        if let Some(config) = answer {
            let mut tls = start.into_stream(config).await?;
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
            return Ok(None);
        }
        // The name this connection's SNI gives (requests on it must be for its site). The certificate
        // comes from the sites of `snap.tls`, this connection's snapshot.
        let sni = start.client_hello().server_name().map(Box::<str>::from);
        // A `client_auth` site has a config of its own (its verifier, no resumption), picked by the site
        // the SNI names, as the certificate is.
        let site = snap.sites.site_for_sni(sni.as_deref());
        let mtls = snap.client_auth.tls_for(site);
        let config = mtls
            .as_ref()
            .map_or_else(|| snap.tls.clone(), |m| m.tls.clone());
        start
            .into_stream(config)
            .await
            .map(|tls| Some((tls, sni, site, mtls.map(|m| m.verifier.clone()))))
    }))
    .await;
    let served = match tls {
        Ok(Ok(Some(done))) => serve_tls(done, peer, shared, snap, lease),
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            shared.metrics.handshake_failed(HandshakeFailure::of(&e));
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            shared.metrics.handshake_failed(HandshakeFailure::Timeout);
            return;
        }
    };
    served.await;
}

/// A connection's serving future, boxed (what `https` and `http` await for the life of the connection).
type Served = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What a TLS handshake gave: the stream, the SNI name, the site it picked, and that site's client
/// certificate verifier.
type Handshaken = (
    tokio_rustls::server::TlsStream<TcpStream>,
    Option<Box<str>>,
    Option<usize>,
    Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
);

/// After the handshake: the HTTP/2 or HTTP/1.1 connection over it. Not `async`: what it builds is moved
/// into the boxed future it returns, so the connection's task keeps a pointer, not a second copy of each
/// stage's state (an `async fn` keeps room for every local that lives across its await).
fn serve_tls(
    (tls, sni, site, verifier): Handshaken,
    peer: SocketAddr,
    shared: Arc<Shared>,
    snap: Arc<Snapshot>,
    lease: Lease,
) -> Served {
    shared.metrics.handshake_done();
    let mut lease = lease;
    let auth_site = site.and_then(|i| snap.config.sites.get(i));
    if let Some((site, auth)) = auth_site.and_then(|s| Some((s, s.client_auth.as_ref()?)))
        && let Some(verifier) = verifier
        && let crate::client_auth::Verified::Success(id, chain) =
            crate::client_auth::Verified::of(tls.get_ref().1)
    {
        lease.client_cert = Some(Arc::new(ClientCert::of(id, chain, site, auth, verifier)));
    }
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let shutdown = lease.shutdown.clone();
    let conn = Conn::new(lease, sni);
    let svc = service!(shared, snap, conn, Listener::Https, peer.ip());
    let idle = snap.config.timeouts.client_idle;
    let limits = &snap.config.limits;
    if h2 {
        let timeout = snap.config.timeouts.client_header;
        let watch = h2::Watch::new(tls, timeout, peer.ip(), shared.refusals.clone());
        let io = Tracked::new(watch, &conn, &shared);
        let max_list = h2::header_list_size(&snap.guard.limits);
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
        Box::pin(drive(
            Box::pin(c),
            |c| c.graceful_shutdown(),
            conn,
            idle,
            shutdown,
        ))
    } else {
        let guard = Guard::new(
            tls,
            snap.guard.clone(),
            snap.canned_https.clone(),
            peer.ip(),
            conn.gate.clone(),
        );
        let io = Tracked::new(guard, &conn, &shared);
        let c = http1_builder(&snap)
            .serve_connection(io, svc)
            .with_upgrades();
        Box::pin(drive(
            Box::pin(c),
            |c| c.graceful_shutdown(),
            conn,
            idle,
            shutdown,
        ))
    }
}

async fn http(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    snap: Arc<Snapshot>,
    lease: Lease,
) {
    let _ = stream.set_nodelay(true);
    let shutdown = lease.shutdown.clone();
    let conn = Conn::new(lease, None);
    let guard = Guard::new(
        stream,
        snap.guard.clone(),
        snap.canned_http.clone(),
        peer.ip(),
        conn.gate.clone(),
    );
    let io = Tracked::new(guard, &conn, &shared);
    let svc = service!(shared, snap, conn, Listener::Http, peer.ip());
    let idle = snap.config.timeouts.client_idle;
    let c = http1_builder(&snap).serve_connection(io, svc);
    // Boxed, as `serve_tls`'s: the task keeps a pointer while the connection lives.
    let served: Served = Box::pin(drive(
        Box::pin(c),
        |c| c.graceful_shutdown(),
        conn,
        idle,
        shutdown,
    ));
    served.await;
}

fn http1_builder(snap: &Snapshot) -> http1::Builder {
    let limits = &snap.config.limits;
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        // The guard holds each head to `client_header` with one timer per connection; hyper's own would
        // be a second, allocated per request.
        .header_read_timeout(None)
        // One buffer per response: rustls seals it as one record in one write, without gathering slices.
        .writev(false)
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
///
/// `c` comes boxed: pinned in place here, it would be kept twice in this future (as the argument and as
/// the pinned local).
async fn drive<C, G>(
    mut c: Pin<Box<C>>,
    graceful: G,
    conn: Arc<Conn>,
    idle: Duration,
    mut shutdown: Shutdown,
) where
    C: Future<Output = Result<(), hyper::Error>>,
    G: Fn(Pin<&mut C>),
{
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

/// A connection's I/O that notes whether any byte moved since the idle check last looked, and counts the
/// bytes read and written (`/metrics`): one relaxed store and one relaxed add per read or write that moved
/// bytes, on counters cloned once per connection.
struct Tracked<T> {
    inner: T,
    conn: Arc<Conn>,
    received: Counter,
    sent: Counter,
}

impl<T> Tracked<T> {
    fn new(inner: T, conn: &Arc<Conn>, shared: &Shared) -> TokioIo<Tracked<T>> {
        TokioIo::new(Tracked {
            inner,
            conn: conn.clone(),
            received: shared.metrics.bytes_received.clone(),
            sent: shared.metrics.bytes_sent.clone(),
        })
    }

    fn wrote(&self, r: &Poll<io::Result<usize>>) {
        if r.is_ready() {
            self.conn.touched.store(true, Ordering::Relaxed);
        }
        if let Poll::Ready(Ok(n)) = r {
            self.sent.inc_by(*n as u64);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if r.is_ready() {
            this.conn.touched.store(true, Ordering::Relaxed);
            let n = buf.filled().len().saturating_sub(before);
            if n > 0 {
                this.received.inc_by(n as u64);
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.wrote(&r);
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
