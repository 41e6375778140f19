//! `X-Request-Id` through the real binary: ours (32 hex digits) when the request brings none, reaching the
//! app (the recording upstream), the client (the response) and the access line alike, over HTTP/1.1 and
//! HTTP/2; a trusted proxy's sane id kept, a bad one (too long, a tab, bytes past ASCII) replaced; any
//! other client's replaced.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use portcullis_tests::Setup;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TRUSTED: &str = "trusted_proxies = [\"127.0.0.1/32\"]";

async fn send(s: &Setup, h2: bool, path: &str, id: Option<&[u8]>) -> Response<Bytes> {
    let mut b = Request::get(path);
    if let Some(id) = id {
        b = b.header("x-request-id", http::HeaderValue::from_bytes(id).unwrap());
    }
    let req = b.body(Full::default()).unwrap();
    if h2 {
        s.client.send_h2(s.https(), req).await
    } else {
        s.client.send(s.https(), req).await
    }
}

fn id_of(res: &Response<Bytes>) -> String {
    res.headers()["x-request-id"].to_str().unwrap().to_owned()
}

/// The access line of `path` (one request each).
fn access_line(s: &Setup, path: &str) -> String {
    let needle = format!("path={path} ");
    s.proxy
        .wait_for_log(|l| l.contains(&needle), Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no access line for {path}: {}", s.proxy.output()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_id_reaches_the_app_the_access_line_and_the_client() {
    let s = Setup::new("", "").await;
    let mut seen = Vec::new();
    for h2 in [false, true] {
        let path = format!("/generated-h2-{h2}");
        let res = send(&s, h2, &path, None).await;
        assert_eq!(res.status(), 200);
        let id = id_of(&res);
        assert_eq!(id.len(), 32, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        let app = s.upstream.last();
        assert_eq!(app.target, path);
        assert_eq!(app.headers["x-request-id"], id.as_str());
        assert_eq!(app.headers.get_all("x-request-id").iter().count(), 1);
        let line = access_line(&s, &path);
        assert!(line.contains(&format!("request_id=\"{id}\"")), "{line}");
        seen.push(id);
    }
    assert_ne!(seen[0], seen[1]);
    // Our own answers carry one too: the plain-HTTP redirect.
    let mut tcp = tokio::net::TcpStream::connect(s.proxy.http_addr())
        .await
        .unwrap();
    tcp.write_all(b"GET /plain HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 301"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("\r\nx-request-id: "),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxys_valid_id_is_kept_and_a_bad_one_replaced() {
    let s = Setup::new(TRUSTED, "").await;
    let uuid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
    for h2 in [false, true] {
        let path = format!("/kept-h2-{h2}");
        let res = send(&s, h2, &path, Some(uuid.as_bytes())).await;
        assert_eq!(id_of(&res), uuid);
        assert_eq!(s.upstream.last().headers["x-request-id"], uuid);
        let line = access_line(&s, &path);
        assert!(line.contains(&format!("request_id=\"{uuid}\"")), "{line}");

        let long = "a".repeat(129);
        for (what, bad) in [
            ("too long", long.as_bytes()),
            ("a tab", &b"abc\tdef"[..]),
            ("past ASCII", &b"abc\xffdef"[..]),
            ("a quote", &b"abc\"def"[..]),
        ] {
            let res = send(&s, h2, "/replaced", Some(bad)).await;
            let id = id_of(&res);
            assert_eq!(id.len(), 32, "{what}: {id}");
            assert_eq!(
                s.upstream.last().headers["x-request-id"],
                id.as_str(),
                "{what}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_own_id_is_replaced_unless_it_comes_through_a_trusted_proxy() {
    let s = Setup::new("", "").await;
    for h2 in [false, true] {
        let res = send(&s, h2, "/untrusted", Some(b"chosen-by-the-client")).await;
        let id = id_of(&res);
        assert_ne!(id, "chosen-by-the-client");
        assert_eq!(id.len(), 32);
        assert_eq!(s.upstream.last().headers["x-request-id"], id.as_str());
    }
}
