//! Issue 7, rate limiting of authentication endpoints: the burst then 429 with a Retry-After that is right,
//! other paths, methods and clients untouched, per-account limits across many addresses (bodies forwarded
//! intact), the built-in default and its replacement, and memory under a flood of distinct addresses.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis_tests::client::collect;
use portcullis_tests::{Client, Setup};
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpSocket};
use tokio_rustls::TlsConnector;

const SECURITY: [&str; 4] = [
    "strict-transport-security",
    "x-frame-options",
    "x-content-type-options",
    "referrer-policy",
];

const FORM: &str = "application/x-www-form-urlencoded";

/// A login POST (form body), from `xff` when given (the proxy must trust the test's 127.0.0.1 for that).
fn login(path: &str, xff: Option<&str>, content_type: &str, body: &str) -> Request<Full<Bytes>> {
    let mut req = Request::post(path)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    if let Some(x) = xff {
        req.headers_mut()
            .insert("x-forwarded-for", x.parse().unwrap());
    }
    req
}

fn retry_after(res: &Response<Bytes>) -> u64 {
    res.headers()
        .get("retry-after")
        .unwrap_or_else(|| panic!("429 without Retry-After: {res:?}"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// One HTTP/1.1 request over a TLS connection made from the source address `from`.
async fn send_from(
    client: &Client,
    from: Ipv4Addr,
    to: SocketAddr,
    mut req: Request<Full<Bytes>>,
) -> Response<Bytes> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::V4(from), 0)).unwrap();
    let tcp = socket.connect(to).await.unwrap();
    let tls = TlsConnector::from(Arc::new(client.config(&[b"http/1.1"])))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    req.headers_mut()
        .insert("host", "localhost".parse().unwrap());
    collect(send.send_request(req).await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_rapid_login_posts_pass_the_burst_then_get_429_until_retry_after() {
    let s = Setup::new(
        "",
        "[[rate_limit]]\nname = \"login\"\npaths = [\"/login\"]\nmethods = [\"POST\"]\nrate = \"1/second\"\nburst = 5\n",
    )
    .await;
    let started = Instant::now();
    let mut statuses = Vec::new();
    let mut limited = None;
    for i in 0..20 {
        let res = s
            .client
            .send(
                s.https(),
                login("/login", None, FORM, &format!("username=u&password=p{i}")),
            )
            .await;
        statuses.push(res.status());
        if res.status() == StatusCode::TOO_MANY_REQUESTS && limited.is_none() {
            limited = Some(res);
        }
    }
    let elapsed = started.elapsed();
    let passed = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert!(
        statuses[..5].iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::OK || *s == StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    // 1/second refills one request per second of the test's own duration, no more.
    assert!(
        passed <= 5 + elapsed.as_secs() as usize,
        "{passed} passed in {elapsed:?}: {statuses:?}"
    );
    if elapsed < Duration::from_secs(1) {
        assert_eq!(passed, 5, "{statuses:?}");
    }
    let res = limited.expect("no request was limited");
    assert_eq!(retry_after(&res), 1);
    for h in SECURITY {
        assert!(res.headers().contains_key(h), "429 without {h}: {res:?}");
    }
    assert_eq!(res.headers()["content-type"], "text/html; charset=utf-8");
    assert!(String::from_utf8_lossy(res.body()).contains("429 Too Many Requests"));
    assert!(res.body().len() < 512);
    // Limited requests never reached the app.
    let reached = s
        .upstream
        .requests()
        .iter()
        .filter(|r| r.target == "/login")
        .count();
    assert_eq!(reached, passed);
    s.proxy
        .wait_for_log(
            |l| l.contains("rate limited") && l.contains("127.0.0.1") && l.contains("login"),
            Duration::from_secs(5),
        )
        .expect("the rejection was not logged");

    // Other paths and methods from the same client, and other clients, are unaffected.
    assert_eq!(s.client.get(s.https(), "/").await.status(), StatusCode::OK);
    assert_eq!(
        s.client.get(s.https(), "/login").await.status(),
        StatusCode::OK
    );
    let other = send_from(
        &s.client,
        Ipv4Addr::new(127, 0, 0, 2),
        s.https(),
        login("/login", None, FORM, "username=x"),
    )
    .await;
    assert_eq!(other.status(), StatusCode::OK);
    let r = s.upstream.last();
    assert_eq!(r.headers["x-real-ip"], "127.0.0.2");

    // Retry-After is when the next request passes: limited now (any credit that came back while the
    // checks above ran is used up first), through after waiting that long.
    let mut res = s
        .client
        .send(s.https(), login("/login", None, FORM, "username=u"))
        .await;
    for _ in 0..10 {
        if res.status() == StatusCode::TOO_MANY_REQUESTS {
            break;
        }
        res = s
            .client
            .send(s.https(), login("/login", None, FORM, "username=u"))
            .await;
    }
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    tokio::time::sleep(Duration::from_secs(retry_after(&res))).await;
    let res = s
        .client
        .send(s.https(), login("/login", None, FORM, "username=u"))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_account_limits_one_username_across_many_addresses_and_forwards_bodies_intact() {
    let s = Setup::new(
        "trusted_proxies = [\"127.0.0.1\"]",
        "[[rate_limit]]\nname = \"login\"\npaths = [\"/login\"]\nrate = \"1/minute\"\nburst = 5\nper_account = { field = \"username\", burst = 3 }\n",
    )
    .await;
    let mut sent = Vec::new();
    let mut statuses = Vec::new();
    for i in 0..8 {
        let xff = format!("203.0.113.{}", i + 1);
        // The same account in forms and JSON, in any case: one account.
        let (ct, body) = match i % 3 {
            0 => (
                FORM,
                format!("csrfmiddlewaretoken=t{i}&username=Victim&password=guess{i}"),
            ),
            1 => (
                "application/json",
                format!("{{\"username\": \"victim\", \"password\": \"guess{i}\"}}"),
            ),
            _ => (FORM, format!("username=VICTIM&password=guess+%25{i}")),
        };
        let res = s
            .client
            .send(s.https(), login("/login", Some(&xff), ct, &body))
            .await;
        if res.status() == StatusCode::OK {
            sent.push(body);
        }
        statuses.push(res.status());
    }
    assert_eq!(&statuses[..3], [StatusCode::OK; 3], "{statuses:?}");
    assert!(
        statuses[3..]
            .iter()
            .all(|s| *s == StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    // The app received each allowed body byte for byte, and nothing else.
    let received: Vec<Bytes> = s
        .upstream
        .requests()
        .iter()
        .filter(|r| r.target == "/login")
        .map(|r| r.body.clone())
        .collect();
    assert_eq!(
        received,
        sent.iter()
            .map(|b| Bytes::from(b.clone()))
            .collect::<Vec<_>>()
    );
    s.proxy
        .wait_for_log(
            |l| l.contains("rate limited") && l.contains("\"victim\"") && l.contains("203.0.113."),
            Duration::from_secs(5),
        )
        .expect("the account was not logged");

    // Another account from the same addresses still passes.
    let res = s
        .client
        .send(
            s.https(),
            login(
                "/login",
                Some("203.0.113.1"),
                FORM,
                "username=alice&password=x",
            ),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        s.upstream.last().body,
        Bytes::from_static(b"username=alice&password=x")
    );
    // A body too large to hold a login form could hide the account: refused.
    let big = format!("password=x&pad={}&username=victim", "a".repeat(70 * 1024));
    let res = s
        .client
        .send(s.https(), login("/login", Some("203.0.113.9"), FORM, &big))
        .await;
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_builtin_auth_limit_applies_with_no_config_and_is_replaced_by_a_configured_one() {
    let s = Setup::new("", "").await;
    for i in 0..5 {
        let res = s
            .client
            .send(
                s.https(),
                login(
                    "/accounts/login/",
                    None,
                    FORM,
                    &format!("username=a&password={i}"),
                ),
            )
            .await;
        assert_eq!(res.status(), StatusCode::OK, "request {i}");
    }
    let res = s
        .client
        .send(
            s.https(),
            login("/accounts/login/", None, FORM, "username=a"),
        )
        .await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    // 10/minute: one request every 6 s.
    assert!((5..=6).contains(&retry_after(&res)), "{res:?}");
    // One limit, one budget per client, over all its paths.
    let res = s
        .client
        .send(
            s.https(),
            login("/api/token/refresh/", None, "application/json", "{}"),
        )
        .await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        s.client.get(s.https(), "/accounts/login/").await.status(),
        StatusCode::OK
    );
    assert_eq!(
        s.client
            .send(s.https(), login("/upload", None, FORM, "a=b"))
            .await
            .status(),
        StatusCode::OK
    );
    drop(s);

    // A configured limit replaces it.
    let s = Setup::new("", "[[rate_limit]]\nname = \"signin\"\npaths = [\"/signin\"]\nrate = \"1/minute\"\nburst = 2\n").await;
    for _ in 0..8 {
        let res = s
            .client
            .send(
                s.https(),
                login("/accounts/login/", None, FORM, "username=a"),
            )
            .await;
        assert_eq!(res.status(), StatusCode::OK);
    }
    let statuses: Vec<StatusCode> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(
                s.client
                    .send(s.https(), login("/signin", None, FORM, "username=a"))
                    .await
                    .status(),
            );
        }
        v
    };
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    drop(s);

    // An empty list turns rate limiting off.
    let s = Setup::new("rate_limit = []", "").await;
    for _ in 0..8 {
        let res = s
            .client
            .send(
                s.https(),
                login("/accounts/login/", None, FORM, "username=a"),
            )
            .await;
        assert_eq!(res.status(), StatusCode::OK);
    }
}

/// An app that answers 204 to everything and keeps nothing (the recording upstream would keep 200k records).
async fn sink() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let c = c.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                    c.fetch_add(1, Ordering::Relaxed);
                    async {
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(StatusCode::NO_CONTENT)
                                .body(Full::<Bytes>::default())
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, count)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// `n` GETs to /flood, each from a distinct client address (X-Forwarded-For from the trusted test peer)
/// starting at `first`, over a few HTTP/2 connections.
async fn flood(s: &Setup, first: u32, n: u32) {
    const CONNECTIONS: u32 = 4;
    const WORKERS_PER_CONNECTION: u32 = 24;
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..CONNECTIONS {
        let tls = s.client.tls(s.https(), &[b"h2"]).await;
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let uri = format!("https://localhost:{}/flood", s.https().port());
        for w in 0..WORKERS_PER_CONNECTION {
            let mut send = send.clone();
            let uri = uri.clone();
            let worker = c * WORKERS_PER_CONNECTION + w;
            tasks.spawn(async move {
                let mut i = worker;
                while i < n {
                    let ip = Ipv4Addr::from(first + i);
                    let req = Request::post(&uri)
                        .header("x-forwarded-for", ip.to_string())
                        .body(Full::<Bytes>::default())
                        .unwrap();
                    let res = send.send_request(req).await.unwrap();
                    assert_eq!(res.status(), StatusCode::NO_CONTENT);
                    i += CONNECTIONS * WORKERS_PER_CONNECTION;
                }
            });
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
}

async fn flood_setup(max_keys: Option<u64>) -> (Setup, Arc<AtomicU64>) {
    let (sink_addr, count) = sink().await;
    let max_keys = max_keys
        .map(|m| format!("max_keys = {m}\n"))
        .unwrap_or_default();
    let s = Setup::new(
        "trusted_proxies = [\"127.0.0.1\"]",
        &format!(
            "[log]\naccess = false\n\n[limits]\nmax_requests_per_connection = 1000000\n\n[[route]]\npath = \"/flood\"\nupstream = \"sink\"\n\n[upstream.sink]\nservers = [\"{sink_addr}\"]\n\n[[rate_limit]]\nname = \"flood\"\npaths = [\"/flood\"]\nrate = \"1/hour\"\nburst = 5\n{max_keys}"
        ),
    )
    .await;
    (s, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_under_200k_distinct_client_addresses() {
    const MAX_KEYS: u64 = 10_000;
    let (s, count) = flood_setup(Some(MAX_KEYS)).await;
    let base = u32::from(Ipv4Addr::new(11, 0, 0, 0));
    // Warm up (allocator arenas, h2 buffers, the limiter at its cap) before the baseline.
    flood(&s, base, 20_000).await;
    let before = rss_kib(s.proxy.pid());
    flood(&s, base + 20_000, 200_000).await;
    let after = rss_kib(s.proxy.pid());
    assert_eq!(count.load(Ordering::Relaxed), 220_000);
    s.proxy
        .wait_for_log(|l| l.contains("evicted"), Duration::from_secs(5))
        .expect("the key cap never evicted");
    // Without the cap the 200k new keys would take ~10 MiB (~50 bytes each); with it, at most MAX_KEYS live.
    let growth = after.saturating_sub(before);
    println!("RSS {before} KiB -> {after} KiB after 200k distinct clients (max_keys {MAX_KEYS})");
    assert!(
        growth < 3 * 1024,
        "RSS grew {growth} KiB ({before} -> {after})"
    );
    // The limit still works after all that.
    let req = Request::post(format!("https://localhost:{}/flood", s.https().port()))
        .header(
            "x-forwarded-for",
            Ipv4Addr::from(base + 300_000).to_string(),
        )
        .body(Full::<Bytes>::default())
        .unwrap();
    let mut last = StatusCode::OK;
    for _ in 0..6 {
        last = s.client.send_h2(s.https(), req.clone()).await.status();
    }
    assert_eq!(last, StatusCode::TOO_MANY_REQUESTS);
}

/// Not a check: measures what one client key costs in the real binary (run with `--ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_bytes_per_client_key() {
    let (s, _) = flood_setup(Some(10_000_000)).await;
    let base = u32::from(Ipv4Addr::new(11, 0, 0, 0));
    flood(&s, base, 20_000).await;
    let before = rss_kib(s.proxy.pid());
    for step in 1..=4u32 {
        flood(&s, base + 20_000 + (step - 1) * 100_000, 100_000).await;
        let after = rss_kib(s.proxy.pid());
        println!(
            "{} keys: RSS +{} KiB = {} bytes per key",
            20_000 + step * 100_000,
            after - before,
            (after - before) * 1024 / u64::from(step * 100_000)
        );
    }
}
