//! Request bodies of arbitrary bytes (binary uploads, multipart forms, pretty-printed JSON) reach the app
//! byte for byte whatever the TCP/TLS split, over HTTP/1.1 with Content-Length, HTTP/1.1 chunked and
//! HTTP/2; a request pipelined after a binary body is judged on its own. The regression: the head check
//! scanned body bytes that arrived with the head for bare CR/LF and refused the upload with 400.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use portcullis_tests::client::read_response;
use portcullis_tests::{Setup, random_bytes, sha256_hex};
use tokio::io::AsyncWriteExt;

const BIG_BODIES: &str = "[limits]\nbody = \"64MiB\"\n";

/// A body that starts with what a lenient or a confused head parser trips on, then random bytes.
fn tricky_body(n: usize, seed: u64) -> Vec<u8> {
    let mut body = random_bytes(n, seed);
    let start = b"\n\r\r\n\r\n\rGET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\xff";
    let k = start.len().min(n);
    body[..k].copy_from_slice(&start[..k]);
    body
}

fn expected(body: &[u8]) -> String {
    format!("sha256={} len={}", sha256_hex(body), body.len())
}

/// Writes `bytes` (a whole `/sha256` request) on a new HTTP/1.1 connection in one write: the app must
/// answer 200 with the digest of `body`.
async fn send_expecting(s: &Setup, bytes: &[u8], body: &[u8]) {
    let mut tls = s.client.tls(s.https(), &[b"http/1.1"]).await;
    tls.write_all(bytes).await.unwrap();
    tls.flush().await.unwrap();
    let (status, head, got) = read_response(&mut tls).await;
    let n = body.len();
    assert_eq!(
        status,
        200,
        "{n} bytes: {head}{}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(String::from_utf8_lossy(&got), expected(body), "{n} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_bodies_with_content_length_reach_the_app_byte_for_byte() {
    let s = Setup::new("", BIG_BODIES).await;
    for (i, n) in [0usize, 1024, 64 << 10, 5 << 20, 50 << 20]
        .into_iter()
        .enumerate()
    {
        let body = tricky_body(n, i as u64 + 1);
        // Head and the first body bytes in one write (one TLS record): the split that broke uploads.
        let mut bytes = format!(
            "POST /sha256 HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n\r\n"
        )
        .into_bytes();
        bytes.extend_from_slice(&body);
        send_expecting(&s, &bytes, &body).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_bodies_in_chunks_full_of_crlf_reach_the_app_byte_for_byte() {
    let s = Setup::new("", BIG_BODIES).await;
    for (i, n) in [1usize, 1024, 64 << 10, 5 << 20].into_iter().enumerate() {
        let mut body = tricky_body(n, i as u64 + 10);
        // Chunk data made of CRLF, bare CR and "0\r\n\r\n" look-alikes.
        for (j, b) in body.iter_mut().enumerate().skip(40) {
            if j % 7 < 3 {
                *b = b"\r\n0"[j % 7];
            }
        }
        let mut bytes =
            b"POST /sha256 HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
                .to_vec();
        let mut at = 0;
        let mut size = 1;
        while at < body.len() {
            let take = size.min(body.len() - at);
            bytes.extend_from_slice(format!("{take:x}\r\n").as_bytes());
            bytes.extend_from_slice(&body[at..at + take]);
            bytes.extend_from_slice(b"\r\n");
            at += take;
            size = (size * 3 + 1) % 70_000 + 1;
        }
        bytes.extend_from_slice(b"0\r\n\r\n");
        send_expecting(&s, &bytes, &body).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_bodies_over_http2_reach_the_app_byte_for_byte() {
    let s = Setup::new("", BIG_BODIES).await;
    for (i, n) in [0usize, 1024, 64 << 10, 5 << 20, 50 << 20]
        .into_iter()
        .enumerate()
    {
        let body = tricky_body(n, i as u64 + 20);
        let req = Request::post("/sha256")
            .header("content-type", "application/octet-stream")
            .body(Full::new(Bytes::from(body.clone())))
            .unwrap();
        let res = s.client.send_h2(s.https(), req).await;
        assert_eq!(res.status(), 200, "{n} bytes");
        assert_eq!(
            String::from_utf8_lossy(res.body()),
            expected(&body),
            "{n} bytes"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_pipelined_after_a_binary_post_gets_its_own_answer() {
    let s = Setup::new("", BIG_BODIES).await;
    let body = tricky_body(4096, 99);
    let mut bytes = format!(
        "POST /sha256 HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(&body);
    bytes.extend_from_slice(b"GET /after HTTP/1.1\r\nHost: localhost\r\nX-Second: yes\r\n\r\n");
    let mut tls = s.client.tls(s.https(), &[b"http/1.1"]).await;
    tls.write_all(&bytes).await.unwrap();
    tls.flush().await.unwrap();
    let (status, _, got) = read_response(&mut tls).await;
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8_lossy(&got), expected(&body));
    let (status, _, got) = read_response(&mut tls).await;
    assert_eq!(status, 200);
    assert!(
        String::from_utf8_lossy(&got).contains("x-second: yes"),
        "the pipelined GET was not answered as itself: {}",
        String::from_utf8_lossy(&got)
    );
    let r = s.upstream.last();
    assert_eq!(r.target, "/after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pretty_printed_json_with_unix_newlines_is_forwarded() {
    let s = Setup::new("", "").await;
    let json = b"{\n  \"user\": \"ada\",\n  \"note\": \"line one\\nline two\"\r\n}\n";
    let mut bytes = format!(
        "POST /sha256 HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        json.len()
    )
    .into_bytes();
    bytes.extend_from_slice(json);
    let mut tls = s.client.tls(s.https(), &[b"http/1.1"]).await;
    tls.write_all(&bytes).await.unwrap();
    tls.flush().await.unwrap();
    let (status, _, got) = read_response(&mut tls).await;
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8_lossy(&got), expected(json));
}

/// `Expect: 100-continue` with a chunked body: the client sends nothing before `100 Continue`, so the head
/// must not be held for its first chunk (it was, and the upload stalled until the body timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_upload_with_expect_100_continue_gets_continue_at_once() {
    let s = Setup::new("", BIG_BODIES).await;
    let mut tls = s.client.tls(s.https(), &[b"http/1.1"]).await;
    tls.write_all(
        b"POST /sha256 HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    tls.flush().await.unwrap();
    let interim = portcullis_tests::client::read_until(&mut tls, "\r\n\r\n").await;
    assert!(
        interim.starts_with("HTTP/1.1 100 Continue"),
        "no 100 Continue: {interim:?}"
    );
    let body = tricky_body(3000, 7);
    let mut bytes = format!("{:x}\r\n", body.len()).into_bytes();
    bytes.extend_from_slice(&body);
    bytes.extend_from_slice(b"\r\n0\r\n\r\n");
    tls.write_all(&bytes).await.unwrap();
    tls.flush().await.unwrap();
    let (status, _, got) = read_response(&mut tls).await;
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8_lossy(&got), expected(&body));
    assert!(s.upstream.last().headers.get("expect").is_none());

    // curl's own way (it waits for 100 Continue before a chunked upload over 1 KiB): with its wait made
    // longer than its whole time limit, the upload only succeeds if the proxy answers 100 at once.
    let file = s.dir.path().join("upload.bin");
    std::fs::write(&file, &body).unwrap();
    let out = std::process::Command::new("curl")
        .args([
            "--http1.1",
            "-sS",
            "--max-time",
            "20",
            "--expect100-timeout",
            "60",
        ])
        .args(["-H", "Transfer-Encoding: chunked", "--cacert"])
        .arg(s.pki.ca_path())
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .arg(format!("https://localhost:{}/sha256", s.https().port()))
        .output()
        .expect("curl is needed (Debian package curl)");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        expected(&body),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
