//! Issue 10, item 5: upgraded connections (WebSocket tunnels) stay inside the connection caps (total and
//! per client address), are closed after `[timeouts] tunnel_idle` without traffic, and are closed at the
//! end of the drain on SIGTERM. The upstream's `/ws` accepts the upgrade and echoes bytes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;
use std::time::{Duration, Instant};

use portcullis_tests::Setup;
use portcullis_tests::client::read_until;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const UPGRADE: &[u8] = b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

fn loopback(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

/// A TLS connection from `from`, upgraded, with one message echoed through the tunnel.
async fn open_tunnel(s: &Setup, from: IpAddr) -> TlsStream<TcpStream> {
    let mut tls = s
        .client
        .tls_from(from, s.https(), &[b"http/1.1"])
        .await
        .expect("the connection was refused");
    tls.write_all(UPGRADE).await.unwrap();
    tls.flush().await.unwrap();
    let head = read_until(&mut tls, "\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    echo(&mut tls, "first").await;
    tls
}

async fn echo(tls: &mut TlsStream<TcpStream>, text: &str) {
    tls.write_all(text.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let got = read_until(tls, text).await;
    assert!(got.contains(text), "sent {text:?}, got {got:?}");
}

/// Whether the server closes `tls` within `limit` (a safety net), ignoring anything it still sends.
async fn closed_within(tls: &mut TlsStream<TcpStream>, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let end = Instant::now() + limit;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        match tokio::time::timeout(left, tls.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_tunnels_hold_their_connection_slot() {
    let s = Setup::new("", "[limits]\nconnections = 2\n").await;
    let mut a = open_tunnel(&s, loopback(1)).await;
    let mut b = open_tunnel(&s, loopback(2)).await;
    // Two tunnels are two open connections: a third is closed at accept, before the handshake.
    assert!(
        s.client
            .tls_from(loopback(3), s.https(), &[b"http/1.1"])
            .await
            .is_err(),
        "a third connection was admitted with two tunnels open and connections = 2"
    );
    echo(&mut a, "still there").await;
    echo(&mut b, "still there").await;
    // Closing a tunnel gives its place back.
    drop(a);
    assert!(
        s.client.served_from(loopback(3), s.https()).await,
        "a closed tunnel kept its place"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_tunnels_count_against_their_client_address() {
    // The per-address cap applies past half of `connections` (here, past 2 open connections).
    let s = Setup::new("", "[limits]\nconnections = 4\nconnections_per_ip = 1\n").await;
    let _a = open_tunnel(&s, loopback(1)).await;
    let _b = open_tunnel(&s, loopback(1)).await;
    assert!(
        s.client
            .tls_from(loopback(1), s.https(), &[b"http/1.1"])
            .await
            .is_err(),
        "an address holding two tunnels got a third connection under pressure with connections_per_ip = 1"
    );
    // Another address still gets in.
    let _c = open_tunnel(&s, loopback(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_websocket_tunnels_are_closed_after_tunnel_idle() {
    let s = Setup::new("", "[timeouts]\ntunnel_idle = \"1s\"\n").await;
    let mut tls = open_tunnel(&s, loopback(1)).await;
    // Traffic keeps it open past tunnel_idle (a message every 100 ms for 2.5 s, well within 1 s apart).
    for i in 0..25 {
        echo(&mut tls, &format!("message {i};")).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Silence: closed between 1 s and 1.5 s later (10 s is only a safety net).
    assert!(
        closed_within(&mut tls, Duration::from_secs(10)).await,
        "an idle tunnel stayed open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_an_open_tunnel_closes_it_at_the_deadline_and_exits_0() {
    let mut s = Setup::new("", "[timeouts]\nshutdown = \"2s\"\n").await;
    let mut tls = open_tunnel(&s, loopback(1)).await;
    let start = Instant::now();
    s.proxy.signal("TERM");
    s.proxy
        .wait_for_log(|l| l.contains("stopping"), Duration::from_secs(10))
        .unwrap();
    // The drain waits for the tunnel, as for an in-flight request: it still carries bytes.
    echo(&mut tls, "during the drain").await;
    // At the deadline it is closed and the process exits 0 (10 s is only a safety net).
    assert!(
        closed_within(&mut tls, Duration::from_secs(10)).await,
        "the tunnel outlived the shutdown deadline"
    );
    let status = tokio::task::spawn_blocking(move || {
        let status = s.proxy.wait();
        (status, s.proxy.output())
    })
    .await
    .unwrap();
    assert!(
        status.0.success(),
        "exit status {:?}; log:\n{}",
        status.0,
        status.1
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?} to exit with shutdown = 2s",
        start.elapsed()
    );
}
