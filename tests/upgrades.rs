//! Upgrades: only a `101` turns a connection into a tunnel. Any other answer to a request that asked to
//! upgrade (the app's 200, our 404, 421 or 429) leaves the next request on that connection checked as
//! strictly as the first. Only WebSocket is forwarded as an upgrade: `h2c` (never valid over TLS) and
//! anything else go upstream as plain requests, without `Upgrade` or `HTTP2-Settings`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use portcullis_tests::Setup;
use portcullis_tests::client::{read_response, read_until};
use tokio::io::AsyncWriteExt;

const WS_HEADERS: &str = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
const SMUGGLE: &[u8] = b"POST /smuggled HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /behind HTTP/1.1\r\nHost: localhost\r\n\r\n";

/// Sends an upgrade request for `path` that is answered `want`, then a CL+TE request on the same
/// connection: it must be refused by the guard (400) and the upstream must see nothing of it.
/// `together` sends both in one write (pipelined), else the second after the first answer.
async fn upgrade_answered_then_smuggle(
    s: &Setup,
    path: &str,
    host: &str,
    want: u16,
    together: bool,
) {
    let mut tls = s.client.tls(s.https(), &[b"http/1.1"]).await;
    let mut first = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{WS_HEADERS}\r\n").into_bytes();
    if together {
        first.extend_from_slice(SMUGGLE);
    }
    tls.write_all(&first).await.unwrap();
    tls.flush().await.unwrap();
    let (status, head, _) = read_response(&mut tls).await;
    assert_eq!(status, want, "{head}");
    if !together {
        tls.write_all(SMUGGLE).await.unwrap();
        tls.flush().await.unwrap();
    }
    let (status, head, _) = read_response(&mut tls).await;
    assert_eq!(
        status, 400,
        "after a {want} to an upgrade request, a CL+TE request was not refused: {head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("x-content-type-options: nosniff"),
        "{head}"
    );
    let targets: Vec<String> = s
        .upstream
        .requests()
        .into_iter()
        .map(|r| r.target)
        .collect();
    assert!(
        !targets.iter().any(|t| t == "/smuggled" || t == "/behind"),
        "the upstream got {targets:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_upgrade_answered_200_by_the_app_the_next_request_is_still_checked() {
    let s = Setup::new("", "").await;
    upgrade_answered_then_smuggle(&s, "/plain", "localhost", 200, false).await;
    upgrade_answered_then_smuggle(&s, "/plain", "localhost", 200, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_upgrade_answered_404_the_next_request_is_still_checked() {
    let s = Setup::with("", "", &[("path = \"/\"", "path = \"/app/\"")]).await;
    upgrade_answered_then_smuggle(&s, "/nowhere", "localhost", 404, false).await;
    upgrade_answered_then_smuggle(&s, "/nowhere", "localhost", 404, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_upgrade_answered_421_the_next_request_is_still_checked() {
    let s = Setup::new("names = [\"app.test\"]", "").await;
    upgrade_answered_then_smuggle(&s, "/ws", "other.test", 421, false).await;
    upgrade_answered_then_smuggle(&s, "/ws", "other.test", 421, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_upgrade_answered_429_the_next_request_is_still_checked() {
    let s = Setup::new(
        "",
        "[[rate_limit]]\nname = \"ws\"\npaths = [\"/ws\"]\nmethods = [\"GET\"]\nrate = \"1/minute\"\nburst = 1\n",
    )
    .await;
    // The one request the limit allows.
    let _ = s.client.get(s.https(), "/ws").await;
    upgrade_answered_then_smuggle(&s, "/ws", "localhost", 429, false).await;
    upgrade_answered_then_smuggle(&s, "/ws", "localhost", 429, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_101_still_opens_the_tunnel_with_bytes_sent_right_behind_the_request() {
    let s = Setup::new("", "").await;
    let mut tls = s.client.tls(s.https(), &[b"http/1.1"]).await;
    // Not HTTP: once switched, these bytes belong to the app's protocol and pass untouched.
    let mut bytes = format!("GET /ws HTTP/1.1\r\nHost: localhost\r\n{WS_HEADERS}\r\n").into_bytes();
    bytes.extend_from_slice(b"\x81\x05early\r\nnot a head\n");
    tls.write_all(&bytes).await.unwrap();
    tls.flush().await.unwrap();
    let text = read_until(&mut tls, "not a head\n").await;
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(text.contains("early\r\nnot a head\n"), "{text:?}");
    tls.write_all(b"later").await.unwrap();
    tls.flush().await.unwrap();
    let echoed = read_until(&mut tls, "later").await;
    assert!(echoed.contains("later"), "{echoed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrade_is_forwarded_as_a_plain_request_without_its_settings() {
    let s = Setup::new("", "").await;
    for (path, extra) in [
        (
            "/h2c",
            "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
        ),
        // HTTP2-Settings not named in Connection is dropped all the same.
        (
            "/h2c-unnamed",
            "Connection: upgrade\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
        ),
        ("/other", "Connection: upgrade\r\nUpgrade: foo/2\r\n"),
    ] {
        let mut tls = s.client.tls(s.https(), &[b"http/1.1"]).await;
        tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n").as_bytes())
            .await
            .unwrap();
        tls.flush().await.unwrap();
        let (status, head, _) = read_response(&mut tls).await;
        assert_eq!(status, 200, "{path}: {head}");
        let r = s.upstream.last();
        assert_eq!(r.target, path);
        assert!(
            r.headers.get("upgrade").is_none(),
            "{path}: {:?}",
            r.headers
        );
        assert!(
            r.headers.get("http2-settings").is_none(),
            "{path}: {:?}",
            r.headers
        );
        assert!(
            r.headers.get("connection").is_none_or(|v| !v
                .to_str()
                .unwrap()
                .to_ascii_lowercase()
                .contains("upgrade")),
            "{path}: {:?}",
            r.headers
        );
        // The connection is still plain HTTP/1.1, checked as ever.
        tls.write_all(SMUGGLE).await.unwrap();
        tls.flush().await.unwrap();
        let (status, _, _) = read_response(&mut tls).await;
        assert_eq!(status, 400, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_switches_to_a_protocol_nobody_asked_for_gets_no_tunnel() {
    let s = Setup::new("", "").await;
    // The test app's /ws answers 101 to anything; the h2c upgrade was not forwarded, so it is a 502.
    let mut tls = s.client.tls(s.https(), &[b"http/1.1"]).await;
    tls.write_all(
        b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
    )
    .await
    .unwrap();
    tls.flush().await.unwrap();
    let (status, head, _) = read_response(&mut tls).await;
    assert_eq!(status, 502, "{head}");
    assert!(s.upstream.last().headers.get("upgrade").is_none());
}
