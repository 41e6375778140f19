//! The maintenance page: shown (503, `Retry-After`, security headers, never cached) when no server of the
//! route's upstream is up, or to everyone outside `[maintenance] allow` while the flag file exists; the
//! app is back as soon as an instance is, or the flag goes. An unreadable page stops `check` and `run`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use portcullis_tests::instances::{Instance, get};
use portcullis_tests::{Client, Pki, Portcullis, TempDir, Upstream, binary, config};

/// The page as the client must get it: 503, `Retry-After: retry_after`, no caching, the security headers.
fn assert_page(res: &Response<Bytes>, retry_after: &str, text: &str) {
    let body = String::from_utf8_lossy(res.body());
    assert_eq!(res.status(), 503, "{body}");
    let h = res.headers();
    assert_eq!(h["retry-after"], retry_after);
    assert_eq!(h["cache-control"], "no-store");
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert_eq!(
        h["strict-transport-security"],
        "max-age=63072000; includeSubDomains"
    );
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert!(h.contains_key("x-frame-options") && h.contains_key("referrer-policy"));
    assert!(body.contains(text), "{body}");
}

/// A port nothing listens on (bound, then let go).
fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// `GET /` with `X-Forwarded-For: xff` over a connection from the loopback address `from`.
async fn get_from(client: &Client, from: IpAddr, addr: SocketAddr, xff: &str) -> u16 {
    let tls = client.tls_from(from, addr, &[b"http/1.1"]).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", "localhost")
        .header("x-forwarded-for", xff)
        .body(Full::<Bytes>::default())
        .unwrap();
    send.send_request(req).await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_server_up_shows_the_maintenance_page_until_an_instance_returns() {
    let dir = TempDir::new("maint-down");
    let pki = Pki::new(dir.path(), &[]);
    let page = dir.write(
        "maintenance.html",
        "<!doctype html><h1>Back soon</h1><p>Our custom maintenance page.</p>\n",
    );
    let socket = dir.path().join("app.sock");
    let tcp = closed_port().to_string();
    let text = config(&pki, &tcp, &format!(
        "[maintenance]\npage = \"{}\"\nretry_after = \"45s\"\n",
        page.display()
    ))
    .replace(
        "servers = [\"",
        &format!("health = {{ path = \"/health\", interval = \"200ms\", rise = 1, fall = 1 }}\nservers = [\"unix:{}\", \"", socket.display()),
    );
    let p = Portcullis::run(&dir.write("p.toml", &text), &[]);
    assert!(p.ready, "{}", p.output());
    let client = Client::new(&pki.ca_pem);
    for server in [format!("unix:{}", socket.display()), tcp] {
        let line = format!("server={server} ");
        p.wait_for_log(
            |l| l.contains("upstream server is down") && l.contains(&line),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|| panic!("{server} not down; log:\n{}", p.output()));
    }

    // Neither server is up: each request tries the one that failed longest ago, then shows the page.
    for _ in 0..3 {
        assert_page(
            &client.get(p.https_addr(), "/").await,
            "45",
            "Our custom maintenance page.",
        );
    }
    let h2 = client
        .send_h2(
            p.https_addr(),
            Request::get("/").body(Full::default()).unwrap(),
        )
        .await;
    assert_page(&h2, "45", "Our custom maintenance page.");

    // An instance comes up on the socket: once it is back (its health check, or the one request a second
    // that tries a server while none is up), the app serves again.
    let _a = Instance::unix("a", &socket);
    let back = format!("server=unix:{} ", socket.display());
    p.wait_for_log(
        |l| l.contains("upstream server is back") && l.contains(&back),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|| panic!("never back; log:\n{}", p.output()));
    let (status, who) = get(&client, p.https_addr(), "/", None).await;
    assert_eq!(status, 200, "{who}");
    assert_eq!(who, "a");
    for _ in 0..5 {
        assert_eq!(
            get(&client, p.https_addr(), "/", None).await,
            (200, "a".to_owned())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flag_file_shows_the_page_to_everyone_outside_allow() {
    let dir = TempDir::new("maint-flag");
    let pki = Pki::new(dir.path(), &[]);
    let upstream = Upstream::tcp().await;
    let flag = dir.path().join("maintenance.flag");
    let text = format!(
        "trusted_proxies = [\"127.0.0.1\"]\n{}",
        config(
            &pki,
            &upstream.addr_string(),
            &format!(
                "[maintenance]\nflag = \"{}\"\nallow = [\"198.51.100.0/24\"]\n",
                flag.display()
            ),
        )
    );
    let p = Portcullis::run(&dir.write("p.toml", &text), &[]);
    assert!(p.ready, "{}", p.output());
    let client = Client::new(&pki.ca_pem);
    let outsider = Some("203.0.113.5");
    let insider = Some("198.51.100.7");
    assert_eq!(get(&client, p.https_addr(), "/", outsider).await.0, 200);

    // The flag appears: within about a second (it is looked at once a second), outsiders get the page.
    std::fs::write(&flag, "").unwrap();
    let mut on = false;
    for _ in 0..100 {
        if get(&client, p.https_addr(), "/", outsider).await.0 == 503 {
            on = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(on, "the flag was not noticed; log:\n{}", p.output());
    let noticed = |what: &str| {
        p.wait_for_log(|l| l.contains(what), Duration::from_secs(10))
            .is_some()
    };
    assert!(noticed("maintenance on: the flag file exists"));
    let seen = upstream.requests().len();
    let req = Request::get("/")
        .header("x-forwarded-for", "203.0.113.5")
        .body(Full::default())
        .unwrap();
    assert_page(
        &client.send(p.https_addr(), req).await,
        "30",
        "Down for maintenance",
    );
    let h2 = client
        .send_h2(
            p.https_addr(),
            Request::post("/form").body(Full::from("a=1")).unwrap(),
        )
        .await;
    assert_page(&h2, "30", "Down for maintenance");
    assert_eq!(upstream.requests().len(), seen, "the app saw a request");

    // `allow` still reaches the app, when a trusted proxy says so; an untrusted peer cannot claim it.
    let (status, body) = get(&client, p.https_addr(), "/", insider).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(upstream.requests().len(), seen + 1);
    let untrusted: IpAddr = "127.0.0.2".parse().unwrap();
    assert_eq!(
        get_from(&client, untrusted, p.https_addr(), "198.51.100.7").await,
        503
    );

    // The flag goes: everyone is back.
    std::fs::remove_file(&flag).unwrap();
    let mut off = false;
    for _ in 0..100 {
        if get(&client, p.https_addr(), "/", outsider).await.0 == 200 {
            off = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        off,
        "the flag's removal was not noticed; log:\n{}",
        p.output()
    );
    assert!(noticed("maintenance off: the flag file is gone"));
}

#[test]
fn an_unreadable_maintenance_page_stops_check_and_run() {
    let dir = TempDir::new("maint-page");
    let pki = Pki::new(dir.path(), &[]);
    let missing = dir.path().join("missing.html");
    let path = dir.write(
        "p.toml",
        &config(
            &pki,
            "127.0.0.1:8000",
            &format!("[maintenance]\npage = \"{}\"\n", missing.display()),
        ),
    );
    let out = Command::new(binary())
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains(&format!("[maintenance] page {}", missing.display())),
        "{err}"
    );
    let mut p = Portcullis::run(&path, &[]);
    assert!(!p.ready);
    assert_eq!(p.wait().code(), Some(64), "{}", p.output());
    assert!(p.output().contains("[maintenance] page"), "{}", p.output());

    // Readable: `check` says which page it will serve.
    std::fs::write(&missing, "<h1>brb</h1>").unwrap();
    let out = Command::new(binary())
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("maintenance: page"));
}
