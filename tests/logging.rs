//! Issue 10, item 9: a client cannot fill the log. A library's complaint about a peer (rustls on an IP
//! address as SNI) is a debug line; our own lines about refused input are capped per kind per second, with
//! a count of what was held back. Read from the real binary's stderr.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step should fail the test loudly

use std::time::{Duration, Instant};

use portcullis_tests::{Portcullis, Setup};
use tokio::io::AsyncReadExt;

/// The cap (`telemetry::REFUSALS_PER_SECOND` in the proxy).
const PER_SECOND: u64 = 10;

/// `openssl s_client` with an IP address as SNI (rustls clients never send one; wrk and h2load do).
async fn handshake_with_ip_sni(s: &Setup) {
    let dir = s.dir.path().to_owned();
    let addr = s.https().to_string();
    tokio::task::spawn_blocking(move || {
        portcullis_tests::openssl(
            &dir,
            &[
                "s_client",
                "-connect",
                &addr,
                "-servername",
                "127.0.0.1",
                "-alpn",
                "http/1.1",
            ],
        )
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ip_address_as_sni_logs_no_warning() {
    let s = Setup::new("", "").await;
    let before = s.proxy.lines().len();
    for _ in 0..3 {
        handshake_with_ip_sni(&s).await;
    }
    // A request after the handshakes: once its access line is read, so is anything logged before it.
    assert_eq!(s.client.get(s.https(), "/after-ip-sni").await.status(), 200);
    s.proxy
        .wait_for_log(|l| l.contains("/after-ip-sni"), Duration::from_secs(10))
        .expect("no access line");
    let lines = s.proxy.lines();
    let warnings: Vec<&String> = lines[before..]
        .iter()
        .filter(|l| l.contains("WARN") || l.contains("Illegal SNI"))
        .collect();
    assert!(
        warnings.is_empty(),
        "a client's IP address as SNI was logged: {warnings:#?}"
    );

    // Still there for whoever asks: RUST_LOG overrides.
    let debug =
        Portcullis::run_with_log(&s.dir.path().join("portcullis.toml"), "info,rustls=debug");
    assert!(debug.ready, "{}", debug.output());
    let s2 = Setup { proxy: debug, ..s };
    handshake_with_ip_sni(&s2).await;
    assert!(
        s2.proxy
            .wait_for_log(|l| l.contains("Illegal SNI"), Duration::from_secs(10))
            .is_some(),
        "RUST_LOG=rustls=debug did not show rustls' message: {}",
        s2.proxy.output()
    );
}

/// Lines of `kind` logged, and the `suppressed=N` counts logged for it.
fn tally(p: &Portcullis, kind: &str) -> (u64, Vec<u64>) {
    let lines = p.lines();
    let logged = lines
        .iter()
        .filter(|l| l.contains(kind) && !l.contains("log lines suppressed"))
        .count() as u64;
    let suppressed = lines
        .iter()
        .filter(|l| l.contains("log lines suppressed") && l.contains(kind))
        .map(|l| {
            let at = l.find("suppressed=").expect("a count") + "suppressed=".len();
            let digits: String = l[at..].chars().take_while(char::is_ascii_digit).collect();
            digits.parse().unwrap()
        })
        .collect();
    (logged, suppressed)
}

/// Waits (safety net: 10 s) until every one of `total` refusals of `kind` is either a line or counted.
async fn wait_for_tally(p: &Portcullis, kind: &str, total: u64) -> (u64, Vec<u64>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (logged, suppressed) = tally(p, kind);
        if logged + suppressed.iter().sum::<u64>() >= total || Instant::now() > deadline {
            return (logged, suppressed);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_bounded(kind: &str, logged: u64, suppressed: &[u64], elapsed: Duration, total: u64) {
    // Each second (partial ones at both ends) lets PER_SECOND through, and the last request one more.
    let seconds = elapsed.as_secs() + 2;
    assert!(
        logged <= PER_SECOND * seconds + 1,
        "{logged} '{kind}' lines for {total} refusals in {elapsed:?}"
    );
    assert!(!suppressed.is_empty(), "no suppressed count was logged");
    assert!(suppressed.len() as u64 <= seconds, "{suppressed:?}");
    assert_eq!(
        logged + suppressed.iter().sum::<u64>(),
        total,
        "lines {logged} + suppressed {suppressed:?} should account for every refusal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_refused_requests_log_a_bounded_number_of_lines() {
    let s = Setup::new("", "").await;
    let bad =
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let (client, addr) = (s.client.clone(), s.https());
        tasks.spawn(async move {
            for _ in (worker..1000).step_by(8) {
                let res = client.raw(addr, bad).await;
                assert!(res.starts_with("HTTP/1.1 400"), "{res}");
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let elapsed = start.elapsed();
    // A later second's first refusal brings the count of what the last one held back.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let res = s.client.raw(s.https(), bad).await;
    assert!(res.starts_with("HTTP/1.1 400"), "{res}");

    let (logged, suppressed) = wait_for_tally(&s.proxy, "request refused", 1001).await;
    assert_bounded("request refused", logged, &suppressed, elapsed, 1001);
    assert!(s.upstream.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_refused_connections_log_a_bounded_number_of_lines() {
    let s = Setup::new("", "[limits]\nconnections = 1\n").await;
    let _held = s.client.tls(s.https(), &[b"http/1.1"]).await;
    let refused = || async {
        let mut tcp = tokio::net::TcpStream::connect(s.https()).await.unwrap();
        // Closed at accept: EOF (or a reset). A safety net, should the connection be admitted after all.
        let mut buf = [0u8; 16];
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await;
    };
    let start = Instant::now();
    for _ in 0..1000 {
        refused().await;
    }
    let elapsed = start.elapsed();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    refused().await;

    let (logged, suppressed) = wait_for_tally(&s.proxy, "connection refused", 1001).await;
    assert_bounded("connection refused", logged, &suppressed, elapsed, 1001);
}
