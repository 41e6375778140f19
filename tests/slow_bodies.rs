//! Issue 12, minimum request-body rate (`[limits] min_body_rate`, `min_body_rate_grace`): a body that
//! trickles in below the rate, once the grace of waiting is spent, gets `408` (HTTP/1.1: with the security
//! headers, and the connection closes; HTTP/2: on its stream) and the app is not left holding the request;
//! an honest slow client above the rate gets through byte for byte; `"off"` leaves only `client_body`.
//! Real binary, real TLS, raw bytes paced by the test (the trickle's sleeps are its input).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step should fail the test loudly

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use portcullis_tests::client::read_response;
use portcullis_tests::h2raw::{self, DATA, END_HEADERS, END_STREAM, HEADERS, RST_STREAM, Seen};
use portcullis_tests::{Setup, random_bytes, sha256_hex};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf};

/// 1 KiB/s after 2 s of waiting: a 1 byte per 500 ms trickle is cut off after about 2 s.
const RATE: &str = "[limits]\nmin_body_rate = \"1KiB/s\"\nmin_body_rate_grace = \"2s\"\n";
/// The trickle's pace: 2 B/s, far under 1 KiB/s.
const TRICKLE: Duration = Duration::from_millis(500);
/// A trickle gives up after this many bytes (10 s, five times the grace): without the rate check the test
/// fails then instead of hanging.
const TRICKLE_BYTES: usize = 20;
/// A declared length the trickle never reaches.
const DECLARED: usize = 1000;

/// Writes `head`, then each of `pieces` after `pace`, while `read` reads the answer from the other half of
/// the connection; writing stops once `read` has flagged that an answer began, or has ended, or a write
/// fails (the server may close mid-way: that is part of what is observed). Returns what `read` returned.
async fn paced<S, R, F>(
    tls: S,
    head: &[u8],
    pieces: Vec<Vec<u8>>,
    pace: Duration,
    read: impl FnOnce(ReadHalf<S>, Arc<AtomicBool>) -> F,
) -> R
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Future<Output = R> + Send + 'static,
    R: Send + 'static,
{
    let (rd, mut wr) = tokio::io::split(tls);
    let answered = Arc::new(AtomicBool::new(false));
    let reader = tokio::spawn(read(rd, answered.clone()));
    wr.write_all(head).await.unwrap();
    wr.flush().await.unwrap();
    for piece in &pieces {
        tokio::time::sleep(pace).await;
        if answered.load(Ordering::SeqCst) || reader.is_finished() {
            break;
        }
        if wr.write_all(piece).await.is_err() || wr.flush().await.is_err() {
            break;
        }
    }
    reader.await.unwrap()
}

/// Writes `prefix`, then `TRICKLE_BYTES` of `byte`, one per `TRICKLE`, while reading what comes back until
/// the server closes (a safety limit of 20 s). Returns the answer, or `None` if the connection was still
/// open at the limit.
async fn trickle_h1<S>(tls: S, prefix: &[u8], byte: u8) -> Option<String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let pieces = vec![vec![byte]; TRICKLE_BYTES];
    paced(
        tls,
        prefix,
        pieces,
        TRICKLE,
        |mut rd, answered| async move {
            let mut out = Vec::new();
            let mut buf = [0u8; 16384];
            tokio::time::timeout(Duration::from_secs(20), async {
                loop {
                    match rd.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            out.extend_from_slice(&buf[..n]);
                            answered.store(true, Ordering::SeqCst);
                        }
                    }
                }
            })
            .await
            .ok()?;
            Some(String::from_utf8_lossy(&out).into_owned())
        },
    )
    .await
}

fn status_of(response: &str) -> u16 {
    response
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// `408`, with the security headers and `Connection: close`.
fn assert_408(answer: Option<&str>, what: &str) {
    let answer =
        answer.unwrap_or_else(|| panic!("{what}: the connection was still open after the trickle"));
    assert_eq!(status_of(answer), 408, "{what}: {answer:?}");
    let lower = answer.to_ascii_lowercase();
    for header in [
        "connection: close",
        "strict-transport-security: max-age=63072000",
        "x-content-type-options: nosniff",
        "x-frame-options: deny",
    ] {
        assert!(lower.contains(header), "{what}: no {header}: {answer}");
    }
}

/// The proxy logged the refusal as too slow (not as idle).
fn assert_logged_too_slow(s: &Setup) {
    let line = s.proxy.wait_for_log(
        |l| l.contains("request body timed out") && l.contains("too slow"),
        Duration::from_secs(5),
    );
    assert!(
        line.is_some(),
        "no too-slow line; log:\n{}",
        s.proxy.output()
    );
    assert!(
        !s.proxy.output().contains("idle: no byte"),
        "logged as idle; log:\n{}",
        s.proxy.output()
    );
}

/// What the app saw of a cut-off upload to `target`: nothing (a buffered body never reaches it) or a
/// request whose body ended short (the upstream request was aborted), and never one still waiting.
async fn assert_app_saw_nothing_or_an_abort(s: &Setup, target: &str, sent_at_most: usize) {
    // The abort reaches the app asynchronously; a safety net of 5 s.
    for _ in 0..200 {
        if s.upstream.in_flight() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        s.upstream.in_flight(),
        0,
        "the app is still waiting for the body"
    );
    for r in s.upstream.requests().iter().filter(|r| r.target == target) {
        assert!(
            (r.body_len as usize) < sent_at_most,
            "the app got {} bytes: a whole body?",
            r.body_len
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_content_length_trickle_under_min_body_rate_gets_408_and_the_connection_closes() {
    let s = Setup::new("", RATE).await;
    let tls = s.client.tls(s.https(), &[b"http/1.1"]).await;
    let head =
        format!("POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: {DECLARED}\r\n\r\n");
    let answer = trickle_h1(tls, head.as_bytes(), b'x').await;
    assert_408(answer.as_deref(), "content-length trickle");
    assert_app_saw_nothing_or_an_abort(&s, "/upload", DECLARED).await;
    assert_logged_too_slow(&s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_chunked_trickle_under_min_body_rate_gets_408_and_the_connection_closes() {
    let s = Setup::new("", RATE).await;
    // In a chunk's data: the head has gone to hyper, the service answers.
    let tls = s.client.tls(s.https(), &[b"http/1.1"]).await;
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n{DECLARED:x}\r\n"
    );
    let answer = trickle_h1(tls, head.as_bytes(), b'x').await;
    assert_408(answer.as_deref(), "chunk data trickle");
    assert_app_saw_nothing_or_an_abort(&s, "/upload", DECLARED).await;
    assert_logged_too_slow(&s);

    // In the first chunk-size line (an extension, up to 1 KiB): the guard still holds the head and answers
    // itself; the app never hears of the request.
    let tls = s.client.tls(s.https(), &[b"http/1.1"]).await;
    let head = "POST /held HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n1;e=";
    let answer = trickle_h1(tls, head.as_bytes(), b'a').await;
    assert_408(answer.as_deref(), "chunk-size line trickle");
    assert!(
        s.upstream.requests().iter().all(|r| r.target != "/held"),
        "the held request reached the app"
    );
}

/// Writes `head`, then each of `pieces` after `pace`, and reads the response: (status, head, body).
async fn paced_h1<'a, S>(
    mut tls: S,
    head: String,
    pieces: impl IntoIterator<Item = &'a [u8]>,
    pace: Duration,
) -> (u16, String, Vec<u8>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    for piece in pieces {
        tokio::time::sleep(pace).await;
        tls.write_all(piece).await.unwrap();
        tls.flush().await.unwrap();
    }
    read_response(&mut tls).await
}

/// The HTTP/1.1 response and HTTP/2 stream 1 are both `200` with these bodies.
fn assert_both_200(h1: (u16, String, Vec<u8>), h2: &Seen, h1_body: &str, h2_body: &str) {
    let (status, head, got) = h1;
    let got = String::from_utf8_lossy(&got);
    assert_eq!(status, 200, "HTTP/1.1: {head}{got}");
    assert_eq!(got, h1_body, "HTTP/1.1");
    let (status, body) = h2.answer(1);
    assert_eq!(status, Some(200), "HTTP/2: {h2:?}");
    assert_eq!(body, h2_body, "HTTP/2");
}

/// An HTTP/2 POST to `path` on stream 1: the preface, the head (with `content-length` when given).
fn h2_head(path: &str, length: Option<usize>) -> Vec<u8> {
    let length = length.map(|n| n.to_string());
    let mut fields = vec![
        (":method", "POST"),
        (":scheme", "https"),
        (":path", path),
        (":authority", "localhost"),
    ];
    if let Some(n) = &length {
        fields.push(("content-length", n));
    }
    let mut bytes = h2raw::preface();
    bytes.extend(h2raw::frame(
        HEADERS,
        END_HEADERS,
        1,
        &h2raw::block(&fields),
    ));
    bytes
}

/// Writes `head`, then `pieces` as DATA frames on stream 1, one per `pace` (END_STREAM on the last when
/// `end`), while reading frames until stream 1 is answered whole or reset (or the server closes, or 5 s of
/// silence). Stops sending once stream 1 has an answer.
async fn paced_h2<S>(tls: S, head: Vec<u8>, pieces: Vec<Vec<u8>>, pace: Duration, end: bool) -> Seen
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let last = pieces.len().saturating_sub(1);
    let frames = pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            let flags = if end && i == last { END_STREAM } else { 0 };
            h2raw::frame(DATA, flags, 1, piece)
        })
        .collect();
    paced(tls, &head, frames, pace, |mut rd, answered| async move {
        h2raw::read_frames(&mut rd, |got| {
            if got.iter().any(|f| f.stream == 1 && f.kind == HEADERS) {
                answered.store(true, Ordering::SeqCst);
            }
            got.iter()
                .any(|f| f.stream == 1 && (f.kind == RST_STREAM || f.flags & END_STREAM != 0))
        })
        .await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_trickle_under_min_body_rate_gets_408_on_its_stream() {
    let s = Setup::new("", RATE).await;
    let tls = s.client.tls(s.https(), &[b"h2"]).await;
    let seen = paced_h2(
        tls,
        h2_head("/upload", Some(DECLARED)),
        vec![b"y".to_vec(); TRICKLE_BYTES],
        TRICKLE,
        false,
    )
    .await;
    let (status, body) = seen.answer(1);
    assert_eq!(status, Some(408), "{seen:?}");
    assert!(body.contains("408"), "{body}");
    assert_app_saw_nothing_or_an_abort(&s, "/upload", DECLARED).await;
    assert_logged_too_slow(&s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_slow_uploads_above_min_body_rate_arrive_byte_for_byte() {
    let s = Setup::new("", RATE).await;
    // 8 KiB/s for 4 s (1 KiB per 125 ms), over HTTP/1.1 and HTTP/2 at once: 8 times the minimum rate,
    // and twice the grace long.
    const PIECE: usize = 1024;
    const PIECES: usize = 32;
    const PACE: Duration = Duration::from_millis(125);
    let h1_body = random_bytes(PIECE * PIECES, 1);
    let h2_body = random_bytes(PIECE * PIECES, 2);
    let expected = |b: &[u8]| format!("sha256={} len={}", sha256_hex(b), b.len());

    let h1 = async {
        let tls = s.client.tls(s.https(), &[b"http/1.1"]).await;
        let head = format!(
            "POST /sha256 HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
            h1_body.len()
        );
        paced_h1(tls, head, h1_body.chunks(PIECE), PACE).await
    };
    let h2 = async {
        let tls = s.client.tls(s.https(), &[b"h2"]).await;
        let pieces = h2_body.chunks(PIECE).map(<[u8]>::to_vec).collect();
        paced_h2(tls, h2_head("/sha256", None), pieces, PACE, true).await
    };
    let (h1, h2) = tokio::join!(h1, h2);
    assert_both_200(h1, &h2, &expected(&h1_body), &expected(&h2_body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_body_rate_off_lets_a_trickle_through_while_it_keeps_moving() {
    // The same trickle as above for 4 s, twice the grace; `client_body` (2 s) never fires, since no wait
    // lasts longer than 500 ms.
    let s = Setup::new(
        "",
        "[limits]\nmin_body_rate = \"off\"\nmin_body_rate_grace = \"2s\"\n[timeouts]\nclient_body = \"2s\"\n",
    )
    .await;
    const BYTES: usize = 8;
    let h1 = async {
        let tls = s.client.tls(s.https(), &[b"http/1.1"]).await;
        let head =
            format!("POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: {BYTES}\r\n\r\n");
        paced_h1(tls, head, [&b"x"[..]; BYTES], TRICKLE).await
    };
    let h2 = async {
        let tls = s.client.tls(s.https(), &[b"h2"]).await;
        let pieces = vec![b"y".to_vec(); BYTES];
        paced_h2(tls, h2_head("/upload", Some(BYTES)), pieces, TRICKLE, true).await
    };
    let (h1, h2) = tokio::join!(h1, h2);
    let want = format!("received {BYTES} bytes");
    assert_both_200(h1, &h2, &want, &want);
}
