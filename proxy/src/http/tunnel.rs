//! Upgraded connections (WebSocket, RFC 6455 §4.1): once the app has answered `101 Switching Protocols`,
//! bytes are copied both ways until both sides are done. A tunnel outlives hyper's connection, so it keeps
//! that connection's [`Lease`]: its place in the connection caps, and a shutdown handle so that the drain
//! waits for it. It is closed after `[timeouts] tunnel_idle` without a byte either way, and at the drain's
//! deadline (as nginx closes upgraded connections at the end of `worker_shutdown_timeout`).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::http::ctx::Lease;

/// Closing a tunnel (TLS close_notify to the client, FIN to the app) may take this long at most.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Runs a tunnel between the client's and the app's halves of an upgrade, to its end.
pub async fn run(client: OnUpgrade, upstream: OnUpgrade, idle: Duration, mut lease: Lease) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    let touched = AtomicBool::new(false);
    let mut client = Active {
        inner: TokioIo::new(client),
        touched: &touched,
    };
    let mut upstream = Active {
        inner: TokioIo::new(upstream),
        touched: &touched,
    };
    let reason = {
        let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
        tokio::pin!(copy);
        // No byte either way for two checks in a row (between `idle` and 1.5 x `idle`): closed.
        let mut tick = tokio::time::interval(idle / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut quiet_ticks = 0u8;
        loop {
            tokio::select! {
                r = &mut copy => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "upgraded connection ended");
                    }
                    return;
                }
                _ = tick.tick() => {
                    if touched.swap(false, Ordering::Relaxed) {
                        quiet_ticks = 0;
                    } else {
                        quiet_ticks += 1;
                        if quiet_ticks >= 2 {
                            break "tunnel_idle passed without traffic";
                        }
                    }
                }
                () = lease.shutdown.deadline() => break "shutdown deadline",
            }
        }
    };
    // Closed by us: say so to both sides rather than just dropping the sockets.
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        let _ = tokio::join!(client.shutdown(), upstream.shutdown());
    })
    .await;
    tracing::debug!(reason, "upgraded connection closed");
}

/// One side of a tunnel that notes whether any byte moved since the idle check last looked.
struct Active<'a, T> {
    inner: T,
    touched: &'a AtomicBool,
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.touched.store(true, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
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
}
