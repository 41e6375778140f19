//! Issue 14, metrics and the admin listener: `[admin] listen` (loopback unless `public = true`), `/health`
//! for a load balancer, `/metrics` in the Prometheus text format counted exactly after known traffic over
//! HTTP/1.1 and HTTP/2, and `portcullis check --live` reading the running instance from there.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use portcullis_tests::admin::{Metrics, request};
use portcullis_tests::client::read_until;
use portcullis_tests::{Pki, Portcullis, Setup, TempDir, Upstream, binary, config};
use tokio::io::AsyncWriteExt;

const SECURITY: [&str; 3] = [
    "x-frame-options",
    "x-content-type-options",
    "referrer-policy",
];

const ADMIN: &str = "[admin]\nlisten = \"127.0.0.1:0\"\n";

#[tokio::test]
async fn health_answers_ok_and_anything_else_is_404_or_405_with_the_security_headers() {
    let s = Setup::new("", ADMIN).await;
    let admin = s.proxy.admin_addr();
    let res = request(admin, "GET", "/health").await;
    assert_eq!(res.status(), 200);
    assert_eq!(&res.body()[..], b"ok\n");
    for h in SECURITY {
        assert!(res.headers().contains_key(h), "{h} missing: {res:?}");
    }
    assert!(
        !res.headers().contains_key("strict-transport-security"),
        "no HSTS on plain HTTP"
    );
    assert_eq!(request(admin, "HEAD", "/health").await.status(), 200);
    let res = request(admin, "POST", "/metrics").await;
    assert_eq!(res.status(), 405);
    assert_eq!(res.headers()["allow"], "GET, HEAD");
    for h in SECURITY {
        assert!(res.headers().contains_key(h), "{h} missing: {res:?}");
    }
    for path in ["/", "/metrics/", "/healthz", "/../metrics"] {
        let res = request(admin, "GET", path).await;
        assert_eq!(res.status(), 404, "{path}");
        assert!(res.headers().contains_key("x-content-type-options"));
    }
    // The HTTPS listener does not answer for the admin one.
    let res = s.client.get(s.https(), "/health").await;
    assert_eq!(
        s.upstream.last().target,
        "/health",
        "went to the app: {res:?}"
    );
}

#[tokio::test]
async fn health_is_503_while_draining() {
    let dir = TempDir::new("drain");
    let pki = Pki::new(dir.path(), &["localhost"]);
    let up = Upstream::tcp().await;
    // A request held by the app keeps the drain going while /health is asked.
    let text = config(
        &pki,
        &up.addr_string(),
        &format!("[timeouts]\nshutdown = \"20s\"\n{ADMIN}"),
    );
    let path = dir.write("portcullis.toml", &text);
    let mut proxy = Portcullis::run(&path, &[]);
    assert!(proxy.ready, "{}", proxy.output());
    let admin = proxy.admin_addr();
    let https = proxy.https_addr();
    let client = portcullis_tests::Client::new(&pki.ca_pem);
    let slow = tokio::spawn(async move { client.get(https, "/slow/3000").await.status() });
    while up.in_flight() == 0 {
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    proxy.signal("TERM");
    assert!(
        proxy
            .wait_for_log(
                |l| l.contains("stopping: listeners closed"),
                std::time::Duration::from_secs(10)
            )
            .is_some(),
        "{}",
        proxy.output()
    );
    let res = request(admin, "GET", "/health").await;
    assert_eq!(res.status(), 503);
    assert_eq!(&res.body()[..], b"draining\n");
    assert_eq!(slow.await.unwrap(), 200);
    assert!(proxy.wait().success());
}

#[test]
fn check_refuses_an_admin_listener_on_a_public_address_unless_told() {
    let dir = TempDir::new("adminpublic");
    let pki = Pki::new(dir.path(), &["localhost"]);
    let text = config(&pki, "127.0.0.1:9", "[admin]\nlisten = \"0.0.0.0:9180\"\n");
    let path = dir.write("portcullis.toml", &text);
    let (code, _, stderr) = check(&path, false);
    assert_eq!(code, Some(64), "{stderr}");
    let line = text
        .lines()
        .position(|l| l.starts_with("listen = \"0.0.0.0:9180\""))
        .unwrap()
        + 1;
    assert!(
        stderr.contains(&format!("portcullis.toml:{line}:10: admin.listen")),
        "{stderr}"
    );
    let public = dir.write(
        "public.toml",
        &text.replace("[admin]\n", "[admin]\npublic = true\n"),
    );
    let (code, _, stderr) = check(&public, false);
    assert_eq!(code, Some(0), "{stderr}");
}

/// Scrapes until `done` holds (each scrape is a round trip: no sleeps), within a 10 s safety net.
async fn scrape_until(admin: SocketAddr, done: impl Fn(&Metrics) -> bool) -> Metrics {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = Metrics::scrape(admin).await;
        if done(&m) || Instant::now() > deadline {
            return m;
        }
        tokio::task::yield_now().await;
    }
}

fn post(path: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::post(path)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path).body(Full::default()).unwrap()
}

#[tokio::test]
async fn metrics_count_known_traffic_exactly_over_http1_and_http2() {
    // A server nothing listens on (bound, then closed): the dead upstream.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let s = Setup::with(
        "",
        &format!(
            "[upstream.dead]\nservers = [\"{dead_addr}\"]\n\n[[rate_limit]]\nname = \"login\"\npaths = [\"/login\"]\nmethods = [\"POST\"]\nrate = \"1/minute\"\nburst = 1\n\n{ADMIN}"
        ),
        &[(
            "[[route]]\npath = \"/\"",
            "[[route]]\npath = \"/dead/\"\nupstream = \"dead\"\n\n[[route]]\npath = \"/\"",
        )],
    )
    .await;
    let admin = s.proxy.admin_addr();
    let https = s.https();
    let mut body_bytes = 0usize;
    // 7 GETs answered 200 by the app: 4 over HTTP/1.1, 3 over HTTP/2.
    for i in 0..7 {
        let res = if i < 4 {
            s.client.send(https, get("/page")).await
        } else {
            s.client.send_h2(https, get("/page")).await
        };
        assert_eq!(res.status(), 200);
        body_bytes += res.body().len();
    }
    // 3 POSTs the app answers 404: 2 over HTTP/1.1, 1 over HTTP/2.
    for i in 0..3 {
        let req = post("/status/404", "name=value");
        let res = if i < 2 {
            s.client.send(https, req).await
        } else {
            s.client.send_h2(https, req).await
        };
        assert_eq!(res.status(), 404);
        body_bytes += res.body().len();
    }
    // The login limit lets one POST through (the app says 200), then refuses two (429).
    for (i, want) in [200, 429, 429].into_iter().enumerate() {
        let req = post("/login", "username=a");
        let res = if i == 1 {
            s.client.send_h2(https, req).await
        } else {
            s.client.send(https, req).await
        };
        assert_eq!(res.status(), want);
        body_bytes += res.body().len();
    }
    // One to the dead upstream: our 502, which becomes the maintenance page (503) since no server of the
    // group is up.
    let res = s.client.send_h2(https, get("/dead/x")).await;
    assert_eq!(res.status(), 503);
    body_bytes += res.body().len();
    // Not TLS at all on the HTTPS port: a failed handshake, by reason.
    let mut raw = tokio::net::TcpStream::connect(https).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let _ = read_until(&mut raw, "never").await;
    drop(raw);

    let m = scrape_until(admin, |m| {
        m.sum("portcullis_connections_open", &[]) == 0.0
            && m.sum("portcullis_tls_handshake_failures_total", &[]) >= 1.0
    })
    .await;
    let text = format!("{m:#?}");
    let requests = |route: &str, method: &str, class: &str| {
        m.sum(
            "portcullis_requests_total",
            &[("route", route), ("method", method), ("class", class)],
        )
    };
    assert_eq!(requests("/", "GET", "2xx"), 7.0, "{text}");
    assert_eq!(
        requests("/", "POST", "4xx"),
        5.0,
        "3 from the app, 2 rate-limited: {text}"
    );
    assert_eq!(requests("/", "POST", "2xx"), 1.0, "{text}");
    assert_eq!(requests("/dead/", "GET", "5xx"), 1.0, "{text}");
    assert_eq!(
        m.sum("portcullis_requests_total", &[]),
        14.0,
        "nothing else: {text}"
    );
    for (_, site) in m
        .series("portcullis_requests_total")
        .iter()
        .map(|(s, v)| (v, &s.labels["site"]))
    {
        assert_eq!(site, "default", "the nameless default site: {text}");
    }
    assert_eq!(
        m.sum(
            "portcullis_request_duration_seconds_count",
            &[("route", "/")]
        ),
        13.0,
        "{text}"
    );
    assert_eq!(
        m.sum(
            "portcullis_request_duration_seconds_bucket",
            &[("route", "/"), ("le", "+Inf")]
        ),
        13.0,
        "{text}"
    );
    assert_eq!(
        m.sum("portcullis_rate_limited_total", &[("limit", "login")]),
        2.0,
        "{text}"
    );
    assert!(
        m.sum("portcullis_sent_bytes_total", &[]) >= body_bytes as f64,
        "{body_bytes} bytes of bodies alone: {text}"
    );
    assert!(
        m.sum("portcullis_received_bytes_total", &[]) > 0.0,
        "{text}"
    );
    assert_eq!(m.sum("portcullis_connections_open", &[]), 0.0, "{text}");
    assert_eq!(
        m.sum("portcullis_tls_handshakes_total", &[]),
        14.0,
        "{text}"
    );
    assert_eq!(
        m.sum(
            "portcullis_tls_handshake_failures_total",
            &[("reason", "not_tls")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        m.sum("portcullis_tls_handshake_failures_total", &[]),
        1.0,
        "{text}"
    );
    let app = s.upstream.addr_string();
    let dead = dead_addr.to_string();
    assert_eq!(
        m.sum(
            "portcullis_upstream_server_up",
            &[("upstream", "app"), ("server", &app)]
        ),
        1.0,
        "{text}"
    );
    assert!(
        m.sum(
            "portcullis_upstream_server_failures_total",
            &[("server", &dead)]
        ) >= 1.0,
        "{text}"
    );
    assert_eq!(
        m.sum(
            "portcullis_upstream_server_failures_total",
            &[("server", &app)]
        ),
        0.0,
        "{text}"
    );
    assert_eq!(
        m.sum("portcullis_upstream_server_in_flight", &[]),
        0.0,
        "{text}"
    );
    assert_eq!(m.sum("portcullis_buffer_memory_bytes", &[]), 0.0, "{text}");
    assert_eq!(m.sum("portcullis_buffer_disk_bytes", &[]), 0.0, "{text}");
    let expiry = m.sum(
        "portcullis_certificate_expiry_timestamp_seconds",
        &[("name", "default")],
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(expiry > now, "{text}");
    assert_eq!(m.sum("portcullis_config_reloads_total", &[]), 0.0, "{text}");
}

#[tokio::test]
async fn open_tunnels_are_counted_until_they_close() {
    let s = Setup::new("", ADMIN).await;
    let admin = s.proxy.admin_addr();
    let mut tls = s.client.tls(s.https(), &[b"http/1.1"]).await;
    tls.write_all(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .unwrap();
    let head = read_until(&mut tls, "\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let m = scrape_until(admin, |m| m.sum("portcullis_tunnels_open", &[]) == 1.0).await;
    assert_eq!(m.sum("portcullis_tunnels_open", &[]), 1.0, "{m:#?}");
    assert_eq!(m.sum("portcullis_connections_open", &[]), 1.0, "{m:#?}");
    drop(tls);
    let m = scrape_until(admin, |m| m.sum("portcullis_tunnels_open", &[]) == 0.0).await;
    assert_eq!(m.sum("portcullis_tunnels_open", &[]), 0.0, "{m:#?}");
    assert_eq!(m.sum("portcullis_connections_open", &[]), 0.0, "{m:#?}");
}

#[tokio::test]
async fn metrics_survive_a_reload_and_count_it() {
    let s = Setup::new("", ADMIN).await;
    let admin = s.proxy.admin_addr();
    for _ in 0..3 {
        assert_eq!(s.client.get(s.https(), "/").await.status(), 200);
    }
    // A good reload, then a broken one.
    let path = s.dir.path().join("portcullis.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace(
            "[admin]",
            "[headers]\nx_frame_options = \"SAMEORIGIN\"\n\n[admin]",
        ),
    )
    .unwrap();
    s.proxy.signal("HUP");
    assert!(
        s.proxy
            .wait_for_log(|l| l.contains("config reloaded"), Duration::from_secs(10))
            .is_some()
    );
    std::fs::write(&path, format!("{text}\nnonsense = 1\n")).unwrap();
    s.proxy.signal("HUP");
    assert!(
        s.proxy
            .wait_for_log(
                |l| l.contains("config reload failed"),
                Duration::from_secs(10)
            )
            .is_some()
    );
    assert_eq!(s.client.get(s.https(), "/").await.status(), 200);
    let m = scrape_until(admin, |m| {
        m.sum("portcullis_config_reloads_total", &[]) == 2.0
    })
    .await;
    assert_eq!(
        m.sum("portcullis_config_reloads_total", &[("result", "ok")]),
        1.0,
        "{m:#?}"
    );
    assert_eq!(
        m.sum("portcullis_config_reloads_total", &[("result", "failed")]),
        1.0,
        "{m:#?}"
    );
    assert_eq!(
        m.sum(
            "portcullis_requests_total",
            &[("route", "/"), ("method", "GET"), ("class", "2xx")]
        ),
        4.0,
        "counted before and after the reload: {m:#?}"
    );
}

/// `portcullis check [--live] --config FILE`: (exit code, stdout, stderr).
fn check(config: &std::path::Path, live: bool) -> (Option<i32>, String, String) {
    let mut args = vec!["check", "--config", config.to_str().unwrap()];
    if live {
        args.push("--live");
    }
    let out = Command::new(binary()).args(&args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn check_live_reads_the_running_instance_over_a_unix_socket() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let dir = TempDir::new("live");
    let pki = Pki::new(dir.path(), &["localhost"]);
    let up = Upstream::tcp().await;
    let socket = dir.path().join("admin.sock");
    let text = config(
        &pki,
        &up.addr_string(),
        &format!(
            "[upstream.dead]\nservers = [\"{dead_addr}\"]\n\n[admin]\nlisten = \"unix:{}\"\n",
            socket.display()
        ),
    )
    .replacen(
        "[[route]]\npath = \"/\"",
        "[[route]]\npath = \"/dead/\"\nupstream = \"dead\"\n\n[[route]]\npath = \"/\"",
        1,
    );
    let path = dir.write("portcullis.toml", &text);
    let mut proxy = Portcullis::run(&path, &[]);
    assert!(proxy.ready, "{}", proxy.output());
    let client = portcullis_tests::Client::new(&pki.ca_pem);
    assert_eq!(client.get(proxy.https_addr(), "/").await.status(), 200);

    let (code, stdout, stderr) = check(&path, true);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("serving"), "{stdout}");
    let app = format!("upstream app {}: up", up.addr_string());
    assert!(stdout.contains(&app), "{stdout}");
    assert!(
        stdout.contains(&format!("upstream dead {dead_addr}: up")),
        "{stdout}"
    );
    assert!(stdout.contains("certificate default: expires"), "{stdout}");
    assert!(stdout.contains("reloads: 0 ok, 0 failed"), "{stdout}");
    assert!(stdout.contains("requests: 1 served"), "{stdout}");

    // The dead server is tried once and taken out: something is down.
    client.get(proxy.https_addr(), "/dead/").await;
    let (code, stdout, _) = check(&path, true);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!("upstream dead {dead_addr}: DOWN")),
        "{stdout}"
    );
    assert!(stdout.contains(&app), "{stdout}");

    // Plain `check` does not ask the instance.
    let (code, stdout, stderr) = check(&path, false);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stdout.contains("upstream app"), "{stdout}");

    proxy.signal("TERM");
    assert!(proxy.wait().success());
    let (code, _, stderr) = check(&path, true);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot reach the admin listener"),
        "{stderr}"
    );
}

#[test]
fn check_live_needs_an_admin_listener_it_can_name() {
    let dir = TempDir::new("livenone");
    let pki = Pki::new(dir.path(), &["localhost"]);
    let none = dir.write("none.toml", &config(&pki, "127.0.0.1:9", ""));
    let (code, _, stderr) = check(&none, true);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("no [admin] section"), "{stderr}");
    let zero = dir.write("zero.toml", &config(&pki, "127.0.0.1:9", ADMIN));
    let (code, _, stderr) = check(&zero, true);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("port 0"), "{stderr}");
}

#[tokio::test]
async fn a_second_instance_does_not_take_a_live_admin_socket() {
    let dir = TempDir::new("livesock");
    let pki = Pki::new(dir.path(), &["localhost"]);
    let socket = dir.path().join("admin.sock");
    let admin = format!("[admin]\nlisten = \"unix:{}\"\n", socket.display());
    let first = dir.write("first.toml", &config(&pki, "127.0.0.1:9", &admin));
    let proxy = Portcullis::run(&first, &[]);
    assert!(proxy.ready, "{}", proxy.output());
    let mut second = Portcullis::run(&first, &[]);
    assert!(!second.ready);
    assert!(!second.wait().success());
    assert!(
        second
            .output()
            .contains("another process is listening on this socket"),
        "{}",
        second.output()
    );
    let (code, stdout, stderr) = check(&first, true);
    assert_eq!(code, Some(0), "the first still answers: {stdout}{stderr}");
}

#[tokio::test]
async fn check_live_reads_the_running_instance_over_tcp() {
    // A port free now (picked at run time, then named in the config, which `check --live` reads).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let admin = format!("[admin]\nlisten = \"127.0.0.1:{port}\"\n");
    let s = Setup::new("", &admin).await;
    assert_eq!(s.proxy.admin_addr().port(), port);
    let path = s.dir.path().join("portcullis.toml");
    let (code, stdout, stderr) = check(&path, true);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.starts_with(&format!("http://127.0.0.1:{port}: serving")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("upstream app {}: up", s.upstream.addr_string())),
        "{stdout}"
    );
}
