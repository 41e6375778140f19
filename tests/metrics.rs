//! Issue 14, metrics and the admin listener: `[admin] listen` (loopback unless `public = true`), `/health`
//! for a load balancer, `/metrics` in the Prometheus text format counted exactly after known traffic over
//! HTTP/1.1 and HTTP/2, and `portcullis check --live` reading the running instance from there.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use portcullis_tests::admin::request;
use portcullis_tests::{Pki, Portcullis, Setup, TempDir, Upstream, binary, config};

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
    let out = Command::new(binary())
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
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
    let out = Command::new(binary())
        .args(["check", "--config", public.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
