//! Continuous load for the "no request fails while X happens" tests: one client opening a new verified TLS
//! connection per request, one reusing a keep-alive connection, until stopped; failures are counted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use crate::Client;
use crate::client::fresh_get;

pub struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    failures: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Starts both clients against `addr` (SNI and Host `localhost`).
    pub async fn start(client: &Client, addr: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(AtomicUsize::new(0));
        let count = |ok: bool, done: &AtomicUsize, failures: &AtomicUsize| {
            if ok { done } else { failures }.fetch_add(1, Ordering::Relaxed);
        };
        let fresh = {
            let (c, stop, done, failures) =
                (client.clone(), stop.clone(), done.clone(), failures.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let r = fresh_get(&c, addr).await;
                    if !matches!(r, Ok((200, _))) {
                        eprintln!("fresh client failure: {r:?}");
                    }
                    count(matches!(r, Ok((200, _))), &done, &failures);
                }
            })
        };
        let tls = client.tls(addr, &[b"http/1.1"]).await;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let keepalive = {
            let (stop, done, failures) = (stop.clone(), done.clone(), failures.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let req = Request::get("/")
                        .header("host", "localhost")
                        .body(Full::<Bytes>::default())
                        .unwrap();
                    let ok = match send.send_request(req).await {
                        Ok(res) => res.status() == 200 && res.into_body().collect().await.is_ok(),
                        Err(e) => {
                            eprintln!("keep-alive client failure: {e}");
                            false
                        }
                    };
                    count(ok, &done, &failures);
                }
            })
        };
        Load {
            stop,
            done,
            failures,
            tasks: vec![fresh, keepalive],
        }
    }

    /// Stops both clients; returns (requests that succeeded, requests that failed).
    pub async fn stop(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        (
            self.done.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }
}
