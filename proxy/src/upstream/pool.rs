//! One upstream server's keep-alive pool, on hyper's HTTP/1.1 connection API: a bounded LIFO stack of
//! senders (`SendRequest`), each driving a connection task of its own. A checkout takes the most recently
//! used sender that is ready for a request, dropping closed ones on the way; without one, a new connection
//! is opened (`connect.rs`). A sender goes back on the stack as soon as its response head has come: the
//! connection is ready again once the response body has been read, and until then a checkout passes over
//! it. So there is no task, channel or allocation per request beyond hyper's own. Idle connections expire
//! after [`IDLE_TIMEOUT`] (the sweep), and every one is let go when shutdown begins; dropping a sender ends
//! its connection task once the connection is idle (at once) or its response is over.

use std::collections::VecDeque;
use std::io;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hyper::client::conn::http1::{self, SendRequest};
use portcullis_config::ServerAddr;

use super::connect;
use crate::body::Body;

/// Idle connections are closed after this long unused: under nginx's 60 s keep-alive, over gunicorn's 2 s
/// (which closes them first: a closed connection is noticed and dropped, never used).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// At most this many connections kept per server (the oldest is let go beyond it): enough for HTTP/2 fan-in
/// (500 streams in flight must not reopen connections).
pub const MAX_IDLE: usize = 512;

/// hyper's read buffer would grow to ~400 KiB per upstream connection: a large response in flight would then
/// cost that much memory. 64 KiB reads stream just as fast.
const MAX_BUF: usize = 64 * 1024;

pub type Sender = SendRequest<Body>;

/// A server's kept connections, most recently used last.
#[derive(Debug, Default)]
pub struct Pool {
    idle: Mutex<Idle>,
}

#[derive(Debug, Default)]
struct Idle {
    stack: VecDeque<Kept>,
    /// Shutdown has begun: nothing is kept any more.
    closed: bool,
}

#[derive(Debug)]
struct Kept {
    send: Sender,
    /// When it went back on the stack (its last response head).
    since: Instant,
}

impl Pool {
    /// The most recently used connection that is ready for a request, and how long it has been unused.
    /// Closed connections found on the way are dropped, expired ones too; busy ones (a response body still
    /// being read) stay.
    pub fn checkout(&self, now: Instant) -> Option<(Sender, Duration)> {
        let mut idle = self.lock();
        let stack = &mut idle.stack;
        // The bottom is the oldest.
        while stack
            .front()
            .is_some_and(|k| now.saturating_duration_since(k.since) >= IDLE_TIMEOUT)
        {
            stack.pop_front();
        }
        let mut i = stack.len();
        while i > 0 {
            i -= 1;
            if stack[i].send.is_closed() {
                stack.remove(i);
            } else if stack[i].send.is_ready() {
                return stack
                    .remove(i)
                    .map(|k| (k.send, now.saturating_duration_since(k.since)));
            }
        }
        None
    }

    /// Keeps `send` (its response head has just come) for a later request.
    pub fn put(&self, send: Sender, now: Instant) {
        let mut idle = self.lock();
        if idle.closed {
            return;
        }
        if idle.stack.len() >= MAX_IDLE {
            idle.stack.pop_front();
        }
        idle.stack.push_back(Kept { send, since: now });
    }

    /// Lets go of connections that closed or expired (their tasks end).
    pub fn sweep(&self, now: Instant) {
        self.lock().stack.retain(|k| {
            !k.send.is_closed() && now.saturating_duration_since(k.since) < IDLE_TIMEOUT
        });
    }

    /// Shutdown: lets go of every kept connection, and keeps none from now on.
    pub fn close(&self) {
        let mut idle = self.lock();
        idle.closed = true;
        idle.stack.clear();
    }

    /// How many connections are kept now.
    #[cfg(test)]
    pub fn kept(&self) -> usize {
        self.lock().stack.len()
    }

    fn lock(&self) -> MutexGuard<'_, Idle> {
        // Nothing panics while holding it; a poisoned stack is still a valid stack.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A new connection to `server` (within `connect_timeout`), its task spawned: HTTP/1.1 as hyper's legacy
/// client had it (64 KiB reads, upgrades allowed for WebSockets). The request URI goes out as given (origin
/// form) and `Host` as the request has it: hyper adds neither.
pub async fn open(server: &ServerAddr, connect_timeout: Duration) -> io::Result<Sender> {
    let io = connect::connect(server, connect_timeout).await?;
    let (send, conn) = http1::Builder::new()
        .max_buf_size(MAX_BUF)
        .handshake(io)
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(async move {
        // The app closing it, or a broken connection: the request on it (if any) hears why.
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
    });
    Ok(send)
}

#[cfg(test)]
mod tests {
    use super::*;

    use http::Request;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// An upstream that answers `n` requests on each connection with a tiny keep-alive response, then closes it.
    async fn upstream(n: usize) -> (ServerAddr, tokio::task::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = ServerAddr::Tcp(l.local_addr().unwrap());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    for _ in 0..n {
                        let mut got = Vec::new();
                        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(k) => got.extend_from_slice(&buf[..k]),
                            }
                        }
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                    }
                });
            }
        });
        (addr, task)
    }

    fn get() -> Request<Body> {
        Request::get("/").body(Body::Empty).unwrap()
    }

    /// One request on `s`, its body read to the end.
    async fn send(s: &mut Sender) {
        let res = s.try_send_request(get()).await.unwrap();
        res.into_body().collect().await.unwrap();
    }

    #[tokio::test]
    async fn a_connection_goes_back_after_its_head_and_is_reused_once_ready() {
        let (addr, _up) = upstream(100).await;
        let pool = Pool::default();
        let now = Instant::now();
        assert!(pool.checkout(now).is_none());
        let mut s = open(&addr, Duration::from_secs(5)).await.unwrap();
        let res = s.try_send_request(get()).await.unwrap();
        pool.put(s, Instant::now());
        assert_eq!(pool.kept(), 1);
        // It is ready again once hyper has read the response body to its end (a checkout before that passes
        // over it and leaves it there).
        res.into_body().collect().await.unwrap();
        let mut taken = None;
        for _ in 0..100 {
            taken = pool.checkout(Instant::now());
            if taken.is_some() {
                break;
            }
            tokio::task::yield_now().await;
        }
        let (mut s, _) = taken.expect("ready once the body was read");
        assert_eq!(pool.kept(), 0);
        send(&mut s).await;
    }

    #[tokio::test]
    async fn closed_and_expired_connections_are_dropped_not_handed_out() {
        let (addr, _up) = upstream(1).await;
        let pool = Pool::default();
        let mut s = open(&addr, Duration::from_secs(5)).await.unwrap();
        send(&mut s).await;
        // The upstream closes after one response: once hyper has seen it, the sender says so.
        for _ in 0..1000 {
            if s.is_closed() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(s.is_closed());
        pool.put(s, Instant::now());
        assert!(pool.checkout(Instant::now()).is_none());
        assert_eq!(pool.kept(), 0, "the closed one was dropped");

        let (addr, _up) = upstream(100).await;
        let mut s = open(&addr, Duration::from_secs(5)).await.unwrap();
        send(&mut s).await;
        let then = Instant::now();
        pool.put(s, then);
        assert!(pool.checkout(then + IDLE_TIMEOUT).is_none(), "expired");
        assert_eq!(pool.kept(), 0);

        let mut s = open(&addr, Duration::from_secs(5)).await.unwrap();
        send(&mut s).await;
        pool.close();
        pool.put(s, Instant::now());
        assert_eq!(pool.kept(), 0, "nothing is kept after shutdown began");
    }

    #[tokio::test]
    async fn letting_go_of_an_idle_connection_closes_it() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = ServerAddr::Tcp(l.local_addr().unwrap());
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await;
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            // The proxy's side closing shows as the end of the stream.
            while s.read(&mut buf).await.is_ok_and(|n| n > 0) {}
            let _ = closed_tx.send(());
        });
        let pool = Pool::default();
        let mut s = open(&addr, Duration::from_secs(5)).await.unwrap();
        send(&mut s).await;
        pool.put(s, Instant::now());
        // Shutdown (or the sweep, for an expired one) drops the sender: the connection task ends and closes.
        pool.close();
        tokio::time::timeout(Duration::from_secs(5), closed_rx)
            .await
            .expect("the connection closed")
            .unwrap();
    }

    #[tokio::test]
    async fn the_stack_is_bounded() {
        let (addr, _up) = upstream(100).await;
        let pool = Pool::default();
        let now = Instant::now();
        let first = open(&addr, Duration::from_secs(5)).await.unwrap();
        pool.put(first, now);
        for _ in 0..MAX_IDLE {
            pool.put(open(&addr, Duration::from_secs(5)).await.unwrap(), now);
        }
        assert_eq!(pool.kept(), MAX_IDLE);
    }
}
