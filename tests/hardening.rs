//! Issue 3: the data path is strict and bounded. Raw bytes over TLS for everything a lenient parser would
//! let through, asserting both the answer and that the recording upstream received nothing; limits with
//! their status codes; slow and greedy clients cut off; HTTP/2 checked as it is turned into HTTP/1.1.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step should fail the test loudly

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use portcullis_tests::Setup;
use portcullis_tests::client::{read_all, read_to_close, read_until};
use portcullis_tests::h2raw::{
    self, CONTINUATION, END_HEADERS, END_STREAM, GOAWAY, HEADERS, RST_STREAM,
};
use tokio::io::AsyncWriteExt;

/// Sends `raw` on a fresh TLS connection; returns what came back before the server closed.
async fn send_raw(s: &Setup, raw: &[u8]) -> String {
    s.client.raw(s.https(), raw).await
}

fn status_of(response: &str) -> u16 {
    response
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn assert_refused(response: &str, want: u16, what: &str) {
    assert_eq!(status_of(response), want, "{what}: {response:?}");
    let lower = response.to_ascii_lowercase();
    assert!(lower.contains("connection: close"), "{what}: {response}");
    assert!(
        lower.contains("strict-transport-security: max-age=63072000"),
        "{what}: {response}"
    );
    assert!(
        lower.contains("x-content-type-options: nosniff"),
        "{what}: {response}"
    );
    assert!(
        lower.contains("x-frame-options: deny"),
        "{what}: {response}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_is_refused_and_never_forwarded() {
    let s = Setup::new("", "").await;
    let cases: &[(&str, &str, u16)] = &[
        (
            "CL and TE",
            "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            "TE and CL",
            "POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            "two different CL",
            "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            400,
        ),
        (
            "two equal CL",
            "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            400,
        ),
        (
            "CL list",
            "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello",
            400,
        ),
        (
            "CL sign",
            "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello",
            400,
        ),
        (
            "chunked, identity",
            "POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            "xchunked",
            "POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            "chunked twice",
            "POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            "chunked, chunked",
            "POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            "tab chunked",
            "POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            "spaces chunked",
            "POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:   chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            "Chunked",
            "POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            "gzip, chunked",
            "POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            501,
        ),
        (
            "bad chunk size",
            "POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            400,
        ),
        (
            "chunk size overflow",
            "POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\n",
            400,
        ),
        (
            "TE in HTTP/1.0",
            "POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
    ];
    for (what, raw, want) in cases {
        let res = send_raw(&s, raw.as_bytes()).await;
        assert_refused(&res, *want, what);
    }
    let long_ext = format!(
        "POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;{}\r\nhello\r\n0\r\n\r\n",
        "e".repeat(4000)
    );
    assert_refused(
        &send_raw(&s, long_ext.as_bytes()).await,
        400,
        "chunk extension abuse",
    );
    assert!(
        s.upstream.requests().is_empty(),
        "a refused request reached the upstream: {:?}",
        s.upstream.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_heads_are_refused_and_never_forwarded() {
    let s = Setup::new("", "").await;
    let cases: &[(&str, &[u8], u16)] = &[
        ("bare LF", b"GET / HTTP/1.1\nHost: a\n\n", 400),
        (
            "bare LF in a header line",
            b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n",
            400,
        ),
        ("bare CR", b"GET / HTTP/1.1\r\nHost: a\rX: y\r\n\r\n", 400),
        (
            "obs-fold",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n z\r\n\r\n",
            400,
        ),
        (
            "space before colon",
            b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            400,
        ),
        (
            "NUL in value",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
            400,
        ),
        (
            "empty header name",
            b"GET / HTTP/1.1\r\nHost: a\r\n: v\r\n\r\n",
            400,
        ),
        (
            "invalid header name",
            b"GET / HTTP/1.1\r\nHost: a\r\nX(y): v\r\n\r\n",
            400,
        ),
        ("invalid method", b"G@T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ("empty method", b" / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ("HTTP/0.9", b"GET /\r\n\r\n", 400),
        ("HTTP/2.0 on h1", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        ("HTTP/1.2", b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505),
        ("no Host", b"GET / HTTP/1.1\r\n\r\n", 400),
        (
            "two Hosts",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            400,
        ),
        (
            "absolute-form for another host",
            b"GET http://evil.test/ HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
        ),
        (
            "target not origin-form",
            b"GET index.html HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
        ),
        ("double space", b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (
            "CONNECT",
            b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
            501,
        ),
    ];
    for (what, raw, want) in cases {
        let res = send_raw(&s, raw).await;
        assert_refused(&res, *want, what);
    }
    assert!(
        s.upstream.requests().is_empty(),
        "a refused request reached the upstream: {:?}",
        s.upstream.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_requests_are_reserialised_with_one_framing() {
    let s = Setup::new("", "").await;
    let res = send_raw(
        &s,
        b"POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5;note=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&res), 200, "{res}");
    let r = s.upstream.last();
    assert_eq!(&r.body[..], b"hello world");
    let framings = r.headers.get_all("content-length").iter().count()
        + r.headers.get_all("transfer-encoding").iter().count();
    assert_eq!(framings, 1, "{:?}", r.headers);

    let res = send_raw(
        &s,
        b"GET http://localhost/abs?q=1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&res), 200, "{res}");
    assert_eq!(s.upstream.last().target, "/abs?q=1");
    // Empty lines before a request line are tolerated (RFC 9112 §2.2).
    let res = send_raw(
        &s,
        b"\r\nGET /after-crlf HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&res), 200, "{res}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_limits_answer_414_431_413() {
    let s = Setup::new(
        "",
        "[limits]\nheader_bytes = \"2KiB\"\nheaders = 10\nuri_bytes = \"1KiB\"\nbody = \"1KiB\"\n\n[[route]]\npath = \"/upload\"\nupstream = \"app\"\nmax_body = \"1MiB\"\n",
    )
    .await;
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "u".repeat(1100));
    assert_refused(&send_raw(&s, long_uri.as_bytes()).await, 414, "long URI");
    let big_header = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "b".repeat(2100)
    );
    assert_refused(
        &send_raw(&s, big_header.as_bytes()).await,
        431,
        "large header",
    );
    let many: String = (0..11).map(|i| format!("X-H{i}: v\r\n")).collect();
    assert_refused(
        &send_raw(
            &s,
            format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n").as_bytes(),
        )
        .await,
        431,
        "many headers",
    );
    assert!(s.upstream.requests().is_empty());

    // Declared too large: 413 before a byte of body is read, with the security headers.
    let res = send_raw(
        &s,
        b"POST /form HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&res), 413, "{res}");
    assert!(
        res.to_ascii_lowercase()
            .contains("x-content-type-options: nosniff")
    );
    assert!(s.upstream.requests().is_empty());
    // Undeclared (chunked) and too large: 413 once the limit is crossed.
    let chunk = format!("800\r\n{}\r\n", "c".repeat(0x800));
    let res = send_raw(
        &s,
        format!(
            "POST /form HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(status_of(&res), 413, "{res}");
    // The upload route allows more.
    let body = "u".repeat(100_000);
    let res = send_raw(&s, format!("POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes()).await;
    assert_eq!(status_of(&res), 200, "{res}");
    assert_eq!(s.upstream.last().body_len, 100_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_off_at_the_header_timeout() {
    let s = Setup::new("", "[timeouts]\nclient_header = \"1s\"\n").await;
    let mut tls = s.client.tls(s.https(), &[b"http/1.1"]).await;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    // Trickle a header line every 200 ms; the head never completes. Bounded: at most 5 s of trickling.
    let mut answer = String::new();
    for i in 0..25 {
        if tls
            .write_all(format!("X-Slow-{i}: a\r\n").as_bytes())
            .await
            .is_err()
        {
            break;
        }
        if let Ok(text) =
            tokio::time::timeout(Duration::from_millis(200), read_until(&mut tls, "\r\n\r\n")).await
        {
            answer = text;
            break;
        }
    }
    assert_eq!(status_of(&answer), 408, "{answer:?}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("x-content-type-options: nosniff")
    );
    assert_eq!(
        read_to_close(&mut tls, Duration::from_secs(5))
            .await
            .as_deref(),
        Some(""),
        "the connection stayed open after 408 (None), or more came"
    );
    assert!(s.upstream.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_sends_a_request_is_closed() {
    let s = Setup::new("", "[timeouts]\nclient_header = \"500ms\"\n").await;
    let mut tls = s.client.tls(s.https(), &[b"http/1.1"]).await;
    // Closed within the 5 s safety net (None: still open), with nothing sent.
    assert_eq!(
        read_to_close(&mut tls, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_ip_caps_an_address_only_under_pressure_before_the_handshake() {
    // connections = 6: the per-address cap (2) applies once more than 3 connections are open.
    let s = Setup::new("", "[limits]\nconnections = 6\nconnections_per_ip = 2\n").await;
    let from = |n: u8| IpAddr::from([127, 0, 0, n]);
    let connect = |n: u8| s.client.tls_from(from(n), s.https(), &[b"http/1.1"]);
    // Below that, one address may hold more than its cap (an office behind one NAT address).
    let mut office = Vec::new();
    for i in 0..3 {
        let tls = connect(1).await;
        office.push(tls.unwrap_or_else(|e| panic!("connection {i} from one address: {e}")));
    }
    // Past it, that address is closed before any TLS work (the handshake fails) ...
    assert!(
        connect(1).await.is_err(),
        "an address over its cap was served under pressure"
    );
    // ... while other addresses get up to their cap ...
    let _b = (connect(2).await.unwrap(), connect(2).await.unwrap());
    assert!(
        connect(2).await.is_err(),
        "a second address went over its cap"
    );
    // ... and the total cap holds for everyone.
    let _c = connect(3).await.unwrap();
    assert!(
        connect(4).await.is_err(),
        "a seventh connection with connections = 6"
    );
    // Closing connections gives their places back.
    drop(office);
    assert!(s.client.served_from(from(1), s.https()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connections_from_one_address_are_all_served() {
    // The defaults (connections = 10000, connections_per_ip = 256) used to close connection 257 at accept.
    let s = Setup::new("", "").await;
    let mut open = Vec::new();
    for i in 0..1000 {
        let connect = s
            .client
            .tls_from(IpAddr::from([127, 0, 0, 1]), s.https(), &[b"http/1.1"]);
        let tls = tokio::time::timeout(Duration::from_secs(10), connect)
            .await
            .unwrap_or_else(|_| panic!("connection {i} was not accepted within 10 s"))
            .unwrap_or_else(|e| panic!("connection {i} was refused: {e}"));
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        assert_eq!(get(&mut send).await, 200, "connection {i}");
        open.push(send);
    }
    // All of them at once: each is still open and serves another request.
    for (i, send) in open.iter_mut().enumerate() {
        assert_eq!(get(send).await, 200, "connection {i}, second request");
    }
}

async fn get(send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>) -> u16 {
    send.ready().await.unwrap();
    let req = Request::get("/")
        .header("host", "localhost")
        .body(Full::default())
        .unwrap();
    let res = send.send_request(req).await.unwrap();
    let status = res.status().as_u16();
    res.into_body().collect().await.unwrap();
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_serves_at_most_max_requests() {
    let s = Setup::new("", "[limits]\nmax_requests_per_connection = 3\n").await;
    let mut tls = s.client.tls(s.https(), &[b"http/1.1"]).await;
    let req = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
    tls.write_all(&[&req[..], &req[..], &req[..], &req[..]].concat())
        .await
        .unwrap();
    tls.flush().await.unwrap();
    let all = read_all(&mut tls).await;
    assert_eq!(all.matches("HTTP/1.1 200").count(), 3, "{all}");
    assert!(
        all.to_ascii_lowercase().contains("connection: close"),
        "{all}"
    );
    assert_eq!(s.upstream.requests().len(), 3);
}

/// Sends the preface and `frames`; stops at the first RST_STREAM or GOAWAY.
async fn h2_exchange(s: &Setup, frames: &[u8]) -> Vec<(u8, u8, u32)> {
    let mut tls = s.client.tls(s.https(), &[b"h2"]).await;
    let mut bytes = h2raw::preface();
    bytes.extend_from_slice(frames);
    h2raw::exchange(&mut tls, &bytes, |got| {
        got.iter()
            .any(|(k, _, _)| *k == RST_STREAM || *k == HEADERS)
    })
    .await
}

fn request_block(extra: &[(&str, &str)]) -> Vec<u8> {
    let mut fields = vec![
        (":method", "POST"),
        (":scheme", "https"),
        (":path", "/h2"),
        (":authority", "localhost"),
    ];
    fields.extend_from_slice(extra);
    h2raw::block(&fields)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http2_requests_are_reset_and_never_forwarded() {
    let s = Setup::new("", "").await;
    let cases: &[(&str, Vec<(&str, &str)>)] = &[
        ("transfer-encoding", vec![("transfer-encoding", "chunked")]),
        ("connection", vec![("connection", "keep-alive")]),
        ("upper-case name", vec![("X-Upper", "1")]),
    ];
    for (what, extra) in cases {
        let frames = h2raw::frame(HEADERS, END_HEADERS | END_STREAM, 1, &request_block(extra));
        let got = h2_exchange(&s, &frames).await;
        assert!(
            got.iter()
                .any(|(k, _, code)| *k == RST_STREAM && *code == 1)
                || got.iter().any(|(k, _, _)| *k == GOAWAY),
            "{what}: {got:?}"
        );
        assert!(
            !got.iter().any(|(k, _, _)| *k == HEADERS),
            "{what} was answered: {got:?}"
        );
    }
    // Pseudo-header missing (:path).
    let block = h2raw::block(&[
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", "localhost"),
    ]);
    let got = h2_exchange(
        &s,
        &h2raw::frame(HEADERS, END_HEADERS | END_STREAM, 1, &block),
    )
    .await;
    assert!(
        got.iter().any(|(k, _, _)| *k == RST_STREAM || *k == GOAWAY),
        "{got:?}"
    );
    // content-length that the DATA does not match.
    let mut frames = h2raw::frame(
        HEADERS,
        END_HEADERS,
        1,
        &request_block(&[("content-length", "10")]),
    );
    frames.extend(h2raw::frame(h2raw::DATA, END_STREAM, 1, b"short"));
    let got = h2_exchange(&s, &frames).await;
    assert!(
        got.iter().any(|(k, _, _)| *k == RST_STREAM || *k == GOAWAY),
        "{got:?}"
    );
    // The 5 bytes sent under content-length 10 never reach the app as a body.
    assert!(
        !s.upstream
            .requests()
            .iter()
            .any(|r| r.body.as_ref() == b"short"),
        "a mismatched body reached the upstream: {:?}",
        s.upstream.requests()
    );
    assert!(
        s.upstream
            .requests()
            .iter()
            .all(|r| r.target != "/h2" || r.body_len == 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_gets_goaway_and_the_proxy_keeps_serving() {
    let s = Setup::new("", "").await;
    let mut frames = Vec::new();
    let block = request_block(&[]);
    for i in 0..2000u32 {
        let id = 1 + 2 * i;
        frames.extend(h2raw::frame(HEADERS, END_HEADERS, id, &block));
        frames.extend(h2raw::frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    let got = h2_exchange(&s, &frames).await;
    assert!(
        got.iter().any(|(k, _, _)| *k == GOAWAY),
        "no GOAWAY after 2000 rapid resets: {} frames",
        got.len()
    );
    assert!(
        s.upstream.requests().len() < 2000,
        "every reset stream was forwarded"
    );
    assert_eq!(s.client.get(s.https(), "/still-up").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood_is_cut_off() {
    let s = Setup::new("", "").await;
    let mut frames = h2raw::frame(HEADERS, 0, 1, &request_block(&[]));
    let filler = h2raw::block(&[("x-flood", &"f".repeat(4000))]);
    for _ in 0..2000 {
        frames.extend(h2raw::frame(CONTINUATION, 0, 1, &filler));
    }
    let got = h2_exchange(&s, &frames).await;
    assert!(
        got.iter().any(|(k, _, _)| *k == GOAWAY || *k == RST_STREAM),
        "{got:?}"
    );
    assert!(s.upstream.requests().is_empty());
    assert!(
        s.proxy.peak_rss_kib() < 64 * 1024,
        "CONTINUATION frames were buffered: {} KiB",
        s.proxy.peak_rss_kib()
    );
    assert_eq!(s.client.get(s.https(), "/still-up").await.status(), 200);
}

/// Connects, sends `header` in clear, then speaks TLS over the same stream.
async fn tls_after(
    s: &Setup,
    header: &[u8],
) -> Option<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut tcp = tokio::net::TcpStream::connect(s.https()).await.unwrap();
    tcp.write_all(header).await.unwrap();
    tcp.flush().await.unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(s.client.config(&[b"http/1.1"])))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v1_and_v2_name_the_client_when_the_peer_is_trusted() {
    let s = Setup::with(
        "trusted_proxies = [\"127.0.0.1\"]",
        "",
        &[("[listen]\n", "[listen]\nproxy_protocol = true\n")],
    )
    .await;
    let tls = tls_after(&s, b"PROXY TCP4 203.0.113.5 127.0.0.1 5555 443\r\n")
        .await
        .expect("v1 handshake");
    assert_eq!(
        portcullis_tests::client::get_on(tls, "/v1").await.status(),
        200
    );
    let r = s.upstream.last();
    assert_eq!(r.headers["x-forwarded-for"], "203.0.113.5");
    assert_eq!(r.headers["x-real-ip"], "203.0.113.5");

    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v2.extend_from_slice(&[
        0x21, 0x11, 0, 12, 198, 51, 100, 7, 127, 0, 0, 1, 0x30, 0x39, 1, 187,
    ]);
    let tls = tls_after(&s, &v2).await.expect("v2 handshake");
    assert_eq!(
        portcullis_tests::client::get_on(tls, "/v2").await.status(),
        200
    );
    assert_eq!(s.upstream.last().headers["x-real-ip"], "198.51.100.7");

    // Without a header, or with garbage, the connection is closed before TLS.
    assert!(tls_after(&s, b"").await.is_none());
    assert!(tls_after(&s, b"PROXY TCP4 nonsense\r\n").await.is_none());
    assert_eq!(s.upstream.requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_from_an_untrusted_peer_is_refused() {
    let s = Setup::with(
        "trusted_proxies = [\"10.0.0.0/8\"]",
        "",
        &[("[listen]\n", "[listen]\nproxy_protocol = true\n")],
    )
    .await;
    assert!(
        tls_after(&s, b"PROXY TCP4 203.0.113.5 127.0.0.1 5555 443\r\n")
            .await
            .is_none()
    );
    assert!(s.upstream.requests().is_empty());
}
