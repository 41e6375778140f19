//! Issue 2, the core: every behaviour a user sees from the data path, against the real binary over real TLS
//! with a real upstream. Protocol details (TLS versions, suites, resumption) are in `tls.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use portcullis_tests::client::{read_all, read_until};
use portcullis_tests::{Client, Pki, Portcullis, Setup, TempDir, Upstream, config};
use tokio::io::AsyncWriteExt;

const SECURITY: [(&str, &str); 4] = [
    (
        "strict-transport-security",
        "max-age=63072000; includeSubDomains",
    ),
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "strict-origin-when-cross-origin"),
];

fn assert_security_headers(res: &http::Response<Bytes>, https: bool) {
    for (name, value) in SECURITY {
        if name == "strict-transport-security" && !https {
            assert!(
                res.headers().get(name).is_none(),
                "HSTS must never be sent over plain HTTP"
            );
            continue;
        }
        assert_eq!(
            res.headers().get(name).map(|v| v.to_str().unwrap()),
            Some(value),
            "{name} on {res:?}"
        );
    }
    if let Some(server) = res.headers().get("server") {
        assert!(
            !server.to_str().unwrap().chars().any(|c| c.is_ascii_digit()),
            "Server leaks a version: {server:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_to_the_upstream_with_forwarding_headers_and_security_headers() {
    let s = Setup::new("", "").await;
    let res = s
        .client
        .send(
            s.https(),
            Request::get("/hello?a=1&b=2")
                .header("host", "app.test")
                .header("x-forwarded-for", "6.6.6.6")
                .header("x-real-ip", "6.6.6.6")
                .header("x-forwarded-proto", "http")
                .header("x-forwarded-host", "evil.test")
                .header("forwarded", "for=6.6.6.6")
                .header("x-forwarded-port", "1")
                .header("true-client-ip", "6.6.6.6")
                .body(Full::default())
                .unwrap(),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_security_headers(&res, true);
    let r = s.upstream.last();
    assert_eq!(r.target, "/hello?a=1&b=2");
    assert_eq!(r.version, http::Version::HTTP_11);
    assert_eq!(r.headers["host"], "app.test");
    assert_eq!(r.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(r.headers["x-real-ip"], "127.0.0.1");
    assert_eq!(r.headers["x-forwarded-proto"], "https");
    assert_eq!(r.headers["x-forwarded-host"], "app.test");
    assert_eq!(r.headers["x-forwarded-port"], s.https().port().to_string());
    assert!(r.headers.get("forwarded").is_none());
    assert!(r.headers.get("true-client-ip").is_none());
    assert_eq!(r.headers.get_all("x-forwarded-for").iter().count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxies_keep_the_forwarded_chain() {
    let s = Setup::new("trusted_proxies = [\"127.0.0.0/8\"]", "").await;
    let req = Request::get("/")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-port", "443")
        .header("true-client-ip", "203.0.113.7")
        .body(Full::default())
        .unwrap();
    assert_eq!(s.client.send(s.https(), req).await.status(), StatusCode::OK);
    let r = s.upstream.last();
    assert_eq!(r.headers["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(r.headers["x-real-ip"], "203.0.113.7");
    // The port and client the trusted proxy saw are kept.
    assert_eq!(r.headers["x-forwarded-port"], "443");
    assert_eq!(r.headers["true-client-ip"], "203.0.113.7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_reach_an_http1_upstream_with_the_host_and_body() {
    let s = Setup::new("", "").await;
    let req = Request::post("/upload?x=y")
        .header("cookie", "a=1")
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from_static(b"hello over h2")))
        .unwrap();
    let res = s.client.send_h2(s.https(), req).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.version(), http::Version::HTTP_2);
    assert_security_headers(&res, true);
    let r = s.upstream.last();
    assert_eq!(r.version, http::Version::HTTP_11);
    assert_eq!(r.target, "/upload?x=y");
    assert_eq!(r.headers["host"], format!("localhost:{}", s.https().port()));
    assert_eq!(&r.body[..], b"hello over h2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_not_forwarded_either_way() {
    let s = Setup::new("", "").await;
    let req = Request::get("/banner")
        .header("connection", "keep-alive, x-private")
        .header("x-private", "1")
        .header("keep-alive", "timeout=100")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-kept", "yes")
        .body(Full::default())
        .unwrap();
    let res = s.client.send(s.https(), req).await;
    let r = s.upstream.last();
    for h in ["x-private", "keep-alive", "te", "proxy-authorization"] {
        assert!(r.headers.get(h).is_none(), "{h} reached the upstream");
    }
    assert_eq!(r.headers["x-kept"], "yes");
    // The response: hop-by-hop gone, banners gone, the app's own X-Frame-Options kept.
    assert!(res.headers().get("x-hop").is_none());
    assert!(res.headers().get("keep-alive").is_none());
    assert!(res.headers().get("server").is_none());
    assert!(res.headers().get("x-powered-by").is_none());
    assert_eq!(res.headers()["x-frame-options"], "SAMEORIGIN");
    assert_eq!(res.headers()["x-content-type-options"], "nosniff");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_settings_can_be_forced_or_turned_off() {
    let s = Setup::new(
        "",
        "[headers]\nx_frame_options = \"DENY\"\nforce = [\"x_frame_options\"]\nreferrer_policy = false\nstrict_transport_security = \"max-age=31536000; includeSubDomains; preload\"\n",
    )
    .await;
    let res = s.client.get(s.https(), "/banner").await;
    assert_eq!(res.headers()["x-frame-options"], "DENY");
    assert!(res.headers().get("referrer-policy").is_none());
    assert_eq!(
        res.headers()["strict-transport-security"],
        "max-age=31536000; includeSubDomains; preload"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_redirects_to_https_keeping_path_query_and_port() {
    let s = Setup::new("", "").await;
    let mut tcp = tokio::net::TcpStream::connect(s.proxy.http_addr())
        .await
        .unwrap();
    tcp.write_all(b"GET /a/b?c=d&e=f HTTP/1.1\r\nHost: app.test:8080\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    tcp.flush().await.unwrap();
    let text = read_all(&mut tcp).await;
    assert!(text.starts_with("HTTP/1.1 301"), "{text}");
    let lower = text.to_ascii_lowercase();
    assert!(
        lower.contains(&format!(
            "location: https://app.test:{}/a/b?c=d&e=f\r\n",
            s.https().port()
        )),
        "{text}"
    );
    assert!(lower.contains("x-frame-options: deny"));
    assert!(lower.contains("x-content-type-options: nosniff"));
    assert!(
        !lower.contains("strict-transport-security"),
        "HSTS over plain HTTP: {text}"
    );
    assert!(
        s.upstream.requests().is_empty(),
        "plain HTTP reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_restrict_hosts_421_on_https_400_on_http_and_redirects_never_point_elsewhere() {
    let s = Setup::new("names = [\"app.test\", \"*.example.test\"]", "").await;
    let get = |host: &'static str| {
        Request::get("/")
            .header("host", host)
            .body(Full::default())
            .unwrap()
    };
    assert_eq!(
        s.client.send(s.https(), get("app.test")).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        s.client
            .send(s.https(), get("www.example.test"))
            .await
            .status(),
        StatusCode::OK
    );
    let res = s.client.send(s.https(), get("evil.test")).await;
    assert_eq!(res.status(), StatusCode::MISDIRECTED_REQUEST);
    assert_security_headers(&res, true);
    assert_eq!(s.upstream.requests().len(), 2);

    for (host, want) in [("evil.test", "400"), ("APP.test", "301")] {
        let mut tcp = tokio::net::TcpStream::connect(s.proxy.http_addr())
            .await
            .unwrap();
        tcp.write_all(
            format!("GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        tcp.flush().await.unwrap();
        let text = read_all(&mut tcp).await;
        assert!(
            text.starts_with(&format!("HTTP/1.1 {want}")),
            "{host}: {text}"
        );
        assert!(!text.contains("evil.test"), "{text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("x-content-type-options: nosniff")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_listener_can_be_turned_off() {
    let dir = TempDir::new("nohttp");
    let pki = Pki::new(dir.path(), &[]);
    let text = config(&pki, "127.0.0.1:9", "").replace("http = [\"127.0.0.1:0\"]", "http = []");
    let p = Portcullis::run(&dir.write("p.toml", &text), &[]);
    assert!(p.ready, "{}", p.output());
    assert!(p.http.is_none());
    assert!(p.https.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_refused_gives_502_page_without_internals() {
    // A port nothing listens on: bind, learn the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = TempDir::new("502");
    let pki = Pki::new(dir.path(), &[]);
    // Passive health off: the server is never known down, so its failure is our 502, not the maintenance
    // page that a group with no server up shows (tests/maintenance.rs).
    let p = Portcullis::run(
        &dir.write(
            "p.toml",
            &config(&pki, &format!("127.0.0.1:{port}"), "max_fails = 0\n"),
        ),
        &[],
    );
    let client = Client::new(&pki.ca_pem);
    let res = client.get(p.https_addr(), "/").await;
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert_security_headers(&res, true);
    let body = String::from_utf8_lossy(res.body());
    assert!(body.contains("502"), "{body}");
    assert!(
        !body.contains(&port.to_string())
            && !body.contains("127.0.0.1")
            && !body.to_lowercase().contains("refused"),
        "{body}"
    );
    assert_eq!(res.headers()["content-type"], "text/html; charset=utf-8");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_unix_socket_gives_502() {
    let dir = TempDir::new("502uds");
    let pki = Pki::new(dir.path(), &[]);
    let sock = dir.path().join("nothing-here.sock");
    let p = Portcullis::run(
        &dir.write(
            "p.toml",
            // As above: never known down, so a 502 rather than the maintenance page.
            &config(&pki, &format!("unix:{}", sock.display()), "max_fails = 0\n"),
        ),
        &[],
    );
    let res = Client::new(&pki.ca_pem).get(p.https_addr(), "/").await;
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert!(!String::from_utf8_lossy(res.body()).contains("nothing-here"));
    assert_security_headers(&res, true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_gives_504() {
    let s = Setup::new("", "[timeouts]\nupstream_response = \"300ms\"\n").await;
    let res = s.client.get(s.https(), "/slow/3000").await;
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_security_headers(&res, true);
    assert!(String::from_utf8_lossy(res.body()).contains("504"));
    // A fast request still works.
    assert_eq!(
        s.client.get(s.https(), "/slow/10").await.status(),
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_upstream_works_and_keeps_connections_alive() {
    let dir = TempDir::new("uds");
    let pki = Pki::new(dir.path(), &[]);
    let up = Upstream::unix().await;
    let p = Portcullis::run(
        &dir.write("p.toml", &config(&pki, &up.addr_string(), "")),
        &[],
    );
    let client = Client::new(&pki.ca_pem);
    for _ in 0..5 {
        let res = client.get(p.https_addr(), "/").await;
        assert_eq!(res.status(), StatusCode::OK);
    }
    assert_eq!(up.requests().len(), 5);
    // Five client connections, one after another, share one pooled upstream connection.
    assert_eq!(
        up.connections(),
        1,
        "the upstream pool did not keep the connection alive"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_gets_continue_then_the_body_flows() {
    let s = Setup::new("", "").await;
    let mut tls = s.client.tls(s.https(), &[b"http/1.1"]).await;
    tls.write_all(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    let interim = read_until(&mut tls, "\r\n\r\n").await;
    assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim}");
    tls.write_all(b"hello world").await.unwrap();
    tls.flush().await.unwrap();
    let text = read_until(&mut tls, "received 11 bytes").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let r = s.upstream.last();
    assert_eq!(&r.body[..], b"hello world");
    assert!(r.headers.get("expect").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_through() {
    let s = Setup::new("", "").await;
    let mut tls = s.client.tls(s.https(), &[b"http/1.1"]).await;
    tls.write_all(
        b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    tls.flush().await.unwrap();
    let head = read_until(&mut tls, "\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket"), "{head}");
    assert!(lower.contains("connection: upgrade"), "{head}");
    tls.write_all(b"ping through the tunnel").await.unwrap();
    tls.flush().await.unwrap();
    let echoed = read_until(&mut tls, "ping through the tunnel").await;
    assert!(echoed.contains("ping through the tunnel"), "{echoed:?}");
    let r = s.upstream.last();
    assert_eq!(r.headers["upgrade"], "websocket");
    assert_eq!(r.headers["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_exits_0() {
    let mut s = Setup::new("", "").await;
    let client = s.client.clone();
    let addr = s.https();
    let inflight = tokio::spawn(async move { client.get(addr, "/slow/1500").await });
    // Wait until the upstream has the request, so it is truly in flight.
    for _ in 0..500 {
        if !s.upstream.requests().is_empty() || s.upstream.connections() > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    s.proxy.signal("TERM");
    s.proxy
        .wait_for_log(
            |l| l.contains("stopping"),
            std::time::Duration::from_secs(10),
        )
        .unwrap();
    // New connections are refused once stopping (the listener closes right after that log line).
    let mut refused = false;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(refused, "still accepting after SIGTERM");
    let res = inflight.await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(&res.body()[..], b"slow done");
    let status = tokio::task::spawn_blocking(move || s.proxy.wait())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_has_one_line_per_request_in_text_and_json() {
    let s = Setup::new("", "").await;
    s.client.get(s.https(), "/logged/path?q=1").await;
    let line = s
        .proxy
        .wait_for_log(
            |l| l.contains("/logged/path"),
            std::time::Duration::from_secs(5),
        )
        .unwrap();
    for field in [
        "client=127.0.0.1",
        "method=GET",
        "path=/logged/path",
        "status=200",
        "bytes=",
        "duration_ms=",
        "upstream=\"app\"",
    ] {
        assert!(line.contains(field), "{field} missing in {line}");
    }

    let dir = TempDir::new("json");
    let pki = Pki::new(dir.path(), &[]);
    let up = Upstream::tcp().await;
    let p = Portcullis::run(
        &dir.write("p.toml", &config(&pki, &up.addr_string(), "")),
        &["--log-format", "json"],
    );
    Client::new(&pki.ca_pem)
        .get(p.https_addr(), "/json/path")
        .await;
    let line = p
        .wait_for_log(
            |l| l.contains("/json/path"),
            std::time::Duration::from_secs(5),
        )
        .unwrap();
    for field in [
        "\"timestamp\":",
        "\"client\":\"127.0.0.1\"",
        "\"method\":\"GET\"",
        "\"path\":\"/json/path\"",
        "\"status\":200",
        "\"bytes\":",
        "\"duration_ms\":",
        "\"upstream\":\"app\"",
    ] {
        assert!(line.contains(field), "{field} missing in {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed_after_client_idle() {
    let s = Setup::new("", "[timeouts]\nclient_idle = \"1s\"\n").await;
    let mut tls = s.client.tls(s.https(), &[b"http/1.1"]).await;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    let first = read_until(&mut tls, "\r\n\r\n").await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    // Say nothing more: the server closes the connection (read_all returns at EOF; its own 5 s silence
    // limit is longer than client_idle's worst case of 1.5 s, so reaching EOF is what this asserts).
    let mut buf = [0u8; 1024];
    let mut closed = false;
    for _ in 0..20 {
        match tokio::time::timeout(
            std::time::Duration::from_secs(1),
            tokio::io::AsyncReadExt::read(&mut tls, &mut buf),
        )
        .await
        {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            _ => {}
        }
    }
    assert!(closed, "the idle connection was never closed");
}
