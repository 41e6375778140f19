//! Issue 10, item 8: HTTP/2 requests are held to the limits HTTP/1.1 heads are (`[limits] uri_bytes`,
//! `headers`, `header_bytes`; `[timeouts] client_header`, `client_body`), over raw frames: the answer the
//! client gets, and what the recording upstream saw (nothing, or a request that ended).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step should fail the test loudly

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use portcullis_tests::Setup;
use portcullis_tests::h2raw::{
    self, CONTINUATION, DATA, END_HEADERS, END_STREAM, HEADERS, RST_STREAM, Seen,
};
use tokio::io::AsyncWriteExt;

/// The server's SETTINGS_MAX_FRAME_SIZE (the RFC 9113 default; Portcullis does not raise it).
const MAX_FRAME: usize = 16384;

fn request_fields<'a>(method: &'a str, path: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        (":method", method),
        (":scheme", "https"),
        (":path", path),
        (":authority", "localhost"),
    ]
}

/// A header block as HEADERS plus as many CONTINUATION frames as the frame size needs.
fn header_frames(stream: u32, block: &[u8], end_stream: bool) -> Vec<u8> {
    let chunks: Vec<&[u8]> = block.chunks(MAX_FRAME).collect();
    let mut out = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let last = if i + 1 == chunks.len() {
            END_HEADERS
        } else {
            0
        };
        if i == 0 {
            let es = if end_stream { END_STREAM } else { 0 };
            out.extend(h2raw::frame(HEADERS, last | es, stream, chunk));
        } else {
            out.extend(h2raw::frame(CONTINUATION, last, stream, chunk));
        }
    }
    out
}

/// Sends the preface and `frames` on a new connection; reads until stream 1 is answered (HEADERS, then its
/// DATA up to END_STREAM), reset, or the connection ends.
async fn exchange(s: &Setup, frames: &[u8]) -> Seen {
    let mut tls = s.client.tls(s.https(), &[b"h2"]).await;
    let mut bytes = h2raw::preface();
    bytes.extend_from_slice(frames);
    let _ = tls.write_all(&bytes).await;
    let _ = tls.flush().await;
    h2raw::read_frames(&mut tls, |got| {
        got.iter()
            .any(|f| f.stream == 1 && (f.kind == RST_STREAM || f.flags & END_STREAM != 0))
    })
    .await
}

/// The status stream 1 was answered with, and its body.
fn answer(seen: &Seen) -> (Option<u16>, String) {
    seen.answer(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_long_path_is_refused_and_never_forwarded() {
    // Defaults: uri_bytes 8 KiB, header_bytes 32 KiB.
    let s = Setup::new("", "").await;

    // Over uri_bytes: 414, our page, as HTTP/1.1 answers it.
    let path = format!("/{}", "p".repeat(9000));
    let seen = exchange(
        &s,
        &header_frames(1, &h2raw::block(&request_fields("GET", &path)), true),
    )
    .await;
    let (status, body) = answer(&seen);
    assert_eq!(status, Some(414), "{seen:?}");
    assert!(body.contains("414 URI Too Long"), "{body}");

    // 100 KB: over the header list h2 decodes at all (SETTINGS_MAX_HEADER_LIST_SIZE), which h2 answers
    // itself with 431 (RFC 9113 §10.5.1) before any request exists.
    let path = format!("/{}", "p".repeat(100 * 1024));
    let seen = exchange(
        &s,
        &header_frames(1, &h2raw::block(&request_fields("GET", &path)), true),
    )
    .await;
    assert_eq!(answer(&seen).0, Some(431), "{seen:?}");

    assert!(
        s.upstream.requests().is_empty(),
        "a refused request reached the upstream: {:?}",
        s.upstream.requests()
    );

    // A well-behaved client sees the security headers on the refusal, and the proxy keeps serving.
    let get = |len: usize| {
        let req = http::Request::get(format!("/{}", "q".repeat(len)));
        s.client
            .send_h2(s.https(), req.body(Full::<Bytes>::default()).unwrap())
    };
    let res = get(9000).await;
    assert_eq!(res.status(), 414);
    assert_eq!(res.headers()["x-content-type-options"], "nosniff");
    assert!(res.headers().contains_key("strict-transport-security"));
    assert!(s.upstream.requests().is_empty());
    let res = get(8000).await;
    assert_eq!(res.status(), 200, "a path under uri_bytes was refused");
    assert_eq!(s.upstream.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_too_many_or_too_large_headers_get_431_and_are_never_forwarded() {
    // Defaults: headers 100, header_bytes 32 KiB.
    let s = Setup::new("", "").await;
    let names: Vec<String> = (0..1000).map(|i| format!("x-h{i}")).collect();
    let with = |n: usize, value: &str| -> Vec<u8> {
        let value = value.to_owned();
        let mut fields: Vec<(&str, &str)> = request_fields("GET", "/many");
        fields.extend(names[..n].iter().map(|n| (n.as_str(), value.as_str())));
        header_frames(1, &h2raw::block(&fields), true)
    };

    // 100 fields and the :authority (the Host line it becomes): 101, one over. Ours: the page.
    let seen = exchange(&s, &with(100, "v")).await;
    let (status, body) = answer(&seen);
    assert_eq!(status, Some(431), "{seen:?}");
    assert!(body.contains("431"), "{body}");
    // 1000 fields: 431 too (from h2 itself: the list is over what it decodes).
    let seen = exchange(&s, &with(1000, "v")).await;
    assert_eq!(answer(&seen).0, Some(431), "{seen:?}");
    // 20 fields of 1700 bytes: few, but 34 KB as an HTTP/1.1 head.
    let seen = exchange(&s, &with(20, &"b".repeat(1700))).await;
    let (status, body) = answer(&seen);
    assert_eq!(status, Some(431), "{seen:?}");
    assert!(body.contains("431"), "{body}");
    assert!(
        s.upstream.requests().is_empty(),
        "a refused request reached the upstream: {:?}",
        s.upstream.requests()
    );

    // Under the size limit: 18 of 1700 bytes (31 KB) pass.
    let seen = exchange(&s, &with(18, &"b".repeat(1700))).await;
    assert_eq!(answer(&seen).0, Some(200), "{seen:?}");
    assert_eq!(s.upstream.requests().len(), 1);

    // At the count limit (a low one: the recording upstream, hyper, takes at most 100 fields itself, and
    // the forwarding headers are added to the client's): 19 fields and the :authority pass, 20 do not.
    let s = Setup::new("", "[limits]\nheaders = 20\n").await;
    let seen = exchange(&s, &with(19, "v")).await;
    assert_eq!(answer(&seen).0, Some(200), "{seen:?}");
    let seen = exchange(&s, &with(20, "v")).await;
    assert_eq!(answer(&seen).0, Some(431), "{seen:?}");
    assert_eq!(s.upstream.requests().len(), 1);
}

/// 10 of 100 declared bytes, then nothing: 408 on the stream.
async fn stall(s: &Setup) {
    let mut frames = header_frames(
        1,
        &h2raw::block(&[
            (":method", "POST"),
            (":scheme", "https"),
            (":path", "/upload"),
            (":authority", "localhost"),
            ("content-length", "100"),
        ]),
        false,
    );
    frames.extend(h2raw::frame(DATA, 0, 1, &[b'x'; 10]));
    let seen = exchange(s, &frames).await;
    let (status, body) = answer(&seen);
    assert_eq!(status, Some(408), "{seen:?}");
    assert!(body.contains("408"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_body_that_stalls_past_client_body_gets_408_and_never_reaches_the_app() {
    let s = Setup::new("", "[timeouts]\nclient_body = \"1s\"\n").await;
    stall(&s).await;
    // Buffered (the default): the app never saw any of it.
    s.proxy
        .wait_for_log(
            |l| l.contains("request body timed out"),
            Duration::from_secs(5),
        )
        .expect("no log line for the timeout");
    assert!(
        s.upstream.requests().is_empty(),
        "{:?}",
        s.upstream.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_body_that_stalls_on_a_streaming_route_gets_408_and_the_upstream_request_ends() {
    let s = Setup::with(
        "",
        "[timeouts]\nclient_body = \"1s\"\n",
        &[(
            "upstream = \"app\"\n",
            "upstream = \"app\"\nbuffer_requests = false\n",
        )],
    )
    .await;
    stall(&s).await;
    // The upstream got the head and the 10 bytes, then the end of the connection: it is not left waiting.
    // (The recording upstream records a request once its body has ended.)
    let mut recorded = None;
    for _ in 0..100 {
        recorded = s
            .upstream
            .requests()
            .into_iter()
            .find(|r| r.target == "/upload");
        if recorded.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recorded = recorded.expect("the upstream request never ended");
    assert_eq!(recorded.body_len, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_body_that_keeps_moving_is_not_cut_off_at_client_body() {
    let s = Setup::new("", "[timeouts]\nclient_body = \"1s\"\n").await;
    let mut tls = s.client.tls(s.https(), &[b"h2"]).await;
    let mut bytes = h2raw::preface();
    bytes.extend(header_frames(
        1,
        &h2raw::block(&[
            (":method", "POST"),
            (":scheme", "https"),
            (":path", "/upload"),
            (":authority", "localhost"),
        ]),
        false,
    ));
    tls.write_all(&bytes).await.unwrap();
    tls.flush().await.unwrap();
    // 20 bytes, one every 100 ms: 2 s in all, twice client_body, but never idle for it.
    for i in 0..20 {
        let flags = if i == 19 { END_STREAM } else { 0 };
        tls.write_all(&h2raw::frame(DATA, flags, 1, b"y"))
            .await
            .unwrap();
        tls.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = h2raw::read_frames(&mut tls, |got| {
        got.iter()
            .any(|f| f.stream == 1 && (f.kind == RST_STREAM || f.flags & END_STREAM != 0))
    })
    .await;
    let (status, body) = answer(&seen);
    assert_eq!(status, Some(200), "{seen:?}");
    assert!(body.contains("received 20 bytes"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_incomplete_header_block_is_cut_off_at_client_header() {
    let s = Setup::new("", "[timeouts]\nclient_header = \"1s\"\n").await;
    let block = h2raw::block(&request_fields("GET", "/never"));

    // HEADERS without END_HEADERS, then nothing: the CONTINUATION never comes.
    let seen = exchange(&s, &h2raw::frame(HEADERS, END_STREAM, 1, &block)).await;
    assert!(
        seen.closed,
        "the connection stayed open with a header block pending: {seen:?}"
    );

    // The same with bytes still moving (so `client_idle` never fires): two CONTINUATION frames, then a
    // third a byte at a time. h2 alone would wait for its last byte as long as it keeps coming.
    let tls = s.client.tls(s.https(), &[b"h2"]).await;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let writer = tokio::spawn(async move {
        let mut bytes = h2raw::preface();
        bytes.extend(h2raw::frame(HEADERS, END_STREAM, 1, &block));
        wr.write_all(&bytes).await?;
        wr.flush().await?;
        let filler = h2raw::block(&[("x-slow", "s")]);
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            wr.write_all(&h2raw::frame(CONTINUATION, 0, 1, &filler))
                .await?;
            wr.flush().await?;
        }
        let last = h2raw::frame(
            CONTINUATION,
            END_HEADERS,
            1,
            &h2raw::block(&[("x-slow", &"s".repeat(4000))]),
        );
        // Bounded: at most 8 s of trickling (80 of its 4 KB).
        for b in last.iter().take(80) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            wr.write_all(&[*b]).await?;
            wr.flush().await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let seen = h2raw::read_frames(&mut rd, |_| false).await;
    writer.abort();
    assert!(
        seen.closed,
        "a header block trickled past client_header kept its connection: {seen:?}"
    );
    assert!(!seen.frames.iter().any(|f| f.kind == HEADERS), "{seen:?}");
    assert!(s.upstream.requests().is_empty());
    assert_eq!(s.client.get(s.https(), "/still-up").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connection_that_never_sends_the_preface_is_closed() {
    let s = Setup::new("", "[timeouts]\nclient_header = \"1s\"\n").await;
    let mut tls = s.client.tls(s.https(), &[b"h2"]).await;
    let seen = h2raw::read_frames(&mut tls, |_| false).await;
    assert!(
        seen.closed,
        "an HTTP/2 connection that sent nothing stayed open: {seen:?}"
    );
}
