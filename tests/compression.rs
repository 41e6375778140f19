//! `compress = true` through the real binary: gzip, br and zstd decoded back to the app's bytes (SHA-256),
//! chosen by the client's q-values, over HTTP/1.1 and HTTP/2; never for `Set-Cookie`, `no-transform`, a
//! small body, an image, an app's own encoding, HEAD; off on routes that do not ask; server-sent events
//! and slow streams still arrive as they are sent; on a static route a precompressed sibling wins, a file
//! without one is compressed, a range is not.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis_tests::upstream::text_body;
use portcullis_tests::{Setup, sha256_hex};

/// `/content/` and `/sse` compress, `/files/` is a static folder that compresses; `/` does not.
async fn setup() -> Setup {
    let dir = portcullis_tests::TempDir::new("compress-files");
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("page.html"), text_body(20_000)).unwrap();
    std::fs::write(files.join("app.js"), text_body(20_000)).unwrap();
    std::fs::write(files.join("app.js.gz"), b"PRECOMPRESSED").unwrap();
    let extra = format!(
        "[[route]]\npath = \"/content/\"\nupstream = \"app\"\ncompress = true\n\n\
         [[route]]\npath = \"/sse\"\nupstream = \"app\"\ncompress = true\n\n\
         [[route]]\npath = \"/files/\"\nstatic = \"{}\"\ncompress = true\n",
        files.display()
    );
    let s = Setup::new("", &extra).await;
    // The folder lives as long as the test process; its TempDir would remove it on drop.
    std::mem::forget(dir);
    s
}

fn get(path: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut b = Request::get(path);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::default()).unwrap()
}

fn header<'a>(res: &'a Response<Bytes>, name: &str) -> &'a str {
    res.headers().get(name).map_or("", |v| v.to_str().unwrap())
}

async fn fetch(s: &Setup, path: &str, headers: &[(&str, &str)]) -> Response<Bytes> {
    s.client.send(s.https(), get(path, headers)).await
}

fn decode(coding: &str, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match coding {
        "gzip" => {
            flate2::read::GzDecoder::new(data)
                .read_to_end(&mut out)
                .unwrap();
        }
        "br" => {
            brotli::Decompressor::new(data, 4096)
                .read_to_end(&mut out)
                .unwrap();
        }
        "zstd" => out = zstd::decode_all(data).unwrap(),
        other => panic!("no decoder for {other}"),
    }
    out
}

async fn send(s: &Setup, h2: bool, req: Request<Full<Bytes>>) -> Response<Bytes> {
    if h2 {
        s.client.send_h2(s.https(), req).await
    } else {
        s.client.send(s.https(), req).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_br_and_zstd_each_decode_back_to_the_apps_bytes_over_h1_and_h2() {
    let s = setup().await;
    let want = sha256_hex(&text_body(50_000));
    for h2 in [false, true] {
        for coding in ["gzip", "br", "zstd"] {
            for query in ["", "?chunked"] {
                let res = send(
                    &s,
                    h2,
                    get(
                        &format!("/content/50000{query}"),
                        &[("accept-encoding", coding)],
                    ),
                )
                .await;
                let what = format!("{coding} h2={h2} {query}");
                assert_eq!(res.status(), 200, "{what}");
                assert_eq!(header(&res, "content-encoding"), coding, "{what}");
                assert_eq!(header(&res, "vary"), "accept-encoding", "{what}");
                assert!(
                    res.body().len() < 50_000 / 3,
                    "{what}: {}",
                    res.body().len()
                );
                assert_eq!(sha256_hex(&decode(coding, res.body())), want, "{what}");
                // The security headers are still there.
                assert_eq!(header(&res, "x-content-type-options"), "nosniff");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coding_follows_the_clients_q_values() {
    let s = setup().await;
    for (accept, coding) in [
        ("gzip;q=0.5, br;q=0.9, zstd;q=0.1", "br"),
        ("br;q=0, gzip", "gzip"),
        ("zstd, gzip;q=0.8", "zstd"),
        ("deflate", ""),
        ("identity", ""),
        ("*;q=0", ""),
    ] {
        let res = fetch(&s, "/content/5000", &[("accept-encoding", accept)]).await;
        assert_eq!(res.status(), 200, "{accept}");
        assert_eq!(header(&res, "content-encoding"), coding, "{accept}");
        assert_eq!(header(&res, "vary"), "accept-encoding", "{accept}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookies_no_transform_small_bodies_images_encoded_bodies_and_head_go_as_they_are() {
    let s = setup().await;
    let all = [("accept-encoding", "gzip, br, zstd")];
    for (target, why) in [
        ("/content/5000?cookie", "Set-Cookie (BREACH)"),
        ("/content/5000?cc=public,No-Transform", "no-transform"),
        ("/content/5000?cc=no-transform", "no-transform"),
        ("/content/1000", "under 1 KiB"),
        ("/content/5000?type=image/png", "an image"),
        ("/content/5000?type=application/octet-stream", "binary"),
        ("/content/5000?ce=gzip", "already encoded"),
    ] {
        let res = fetch(&s, target, &all).await;
        assert_eq!(res.status(), 200, "{why}");
        let coding = if why == "already encoded" { "gzip" } else { "" };
        assert_eq!(header(&res, "content-encoding"), coding, "{why}");
        assert_eq!(res.body().as_ref(), text_body(res.body().len()), "{why}");
        assert!(!header(&res, "vary").contains("accept-encoding"), "{why}");
    }
    // The app's body, byte for byte, and its length.
    let res = fetch(&s, "/content/5000?cookie", &all).await;
    assert_eq!(res.body().as_ref(), text_body(5000));
    assert_eq!(header(&res, "content-length"), "5000");
    // HEAD: the app's length, no coding.
    let res = s
        .client
        .send(
            s.https(),
            Request::head("/content/5000")
                .header("accept-encoding", "gzip")
                .body(Full::default())
                .unwrap(),
        )
        .await;
    assert_eq!(header(&res, "content-encoding"), "");
    assert_eq!(header(&res, "content-length"), "5000");
    // A route without `compress` never compresses.
    let res = fetch(&s, "/anything", &all).await;
    assert_eq!(header(&res, "content-encoding"), "");
    assert_eq!(header(&res, "vary"), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apps_etag_becomes_weak_once_compressed() {
    let s = setup().await;
    let res = fetch(&s, "/content/5000?etag=v1", &[("accept-encoding", "gzip")]).await;
    assert_eq!(header(&res, "content-encoding"), "gzip");
    assert_eq!(header(&res, "etag"), "W/\"v1\"");
    let res = s.client.get(s.https(), "/content/5000?etag=v1").await;
    assert_eq!(header(&res, "etag"), "\"v1\"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_still_arrive_event_by_event_on_a_compressing_route() {
    let s = setup().await;
    for alpn in [&b"http/1.1"[..], b"h2"] {
        let tls = s.client.tls(s.https(), &[alpn]).await;
        let uri = if alpn == b"h2" {
            format!("https://localhost:{}/sse", s.https().port())
        } else {
            "/sse".to_owned()
        };
        let req = Request::get(uri)
            .header("host", "localhost")
            .header("accept-encoding", "gzip, br")
            .body(Full::<Bytes>::default())
            .unwrap();
        let mut res = if alpn == b"h2" {
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            send.send_request(req).await.unwrap()
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(conn);
            send.send_request(req).await.unwrap()
        };
        assert_eq!(res.status(), 200);
        assert!(!res.headers().contains_key("content-encoding"));
        // The first event arrives alone: the second is two seconds behind it.
        let first = res.body_mut().frame().await.unwrap().unwrap();
        assert_eq!(first.data_ref().unwrap().as_ref(), b"data: one\n\n");
        let rest = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(rest.as_ref(), b"data: two\n\n");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_stream_is_flushed_as_the_app_sends_it() {
    let s = setup().await;
    // Half the body, then two seconds of nothing, then the rest: the first half must decode before the
    // pause ends, not with the rest. Buffered (through the spool) and streamed (`X-Accel-Buffering: no`).
    for query in ["chunked&pause=2000", "chunked&pause=2000&accel=no"] {
        flushed(&s, query).await;
    }
}

async fn flushed(s: &Setup, query: &str) {
    let tls = s.client.tls(s.https(), &[b"http/1.1"]).await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut res = send
        .send_request(
            Request::get(format!("/content/20000?{query}"))
                .header("host", "localhost")
                .header("accept-encoding", "gzip")
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.headers()["content-encoding"], "gzip");
    let mut decoder = flate2::write::GzDecoder::new(Vec::new());
    let mut half_at = None;
    while let Some(frame) = res.body_mut().frame().await {
        if let Some(d) = frame.unwrap().data_ref() {
            decoder.write_all(d).unwrap();
            decoder.flush().unwrap();
        }
        if half_at.is_none() && decoder.get_ref().len() >= 10_000 {
            half_at = Some(Instant::now());
        }
    }
    let end = Instant::now();
    let body = decoder.finish().unwrap();
    assert_eq!(sha256_hex(&body), sha256_hex(&text_body(20_000)));
    let waited = end - half_at.expect("the first half decoded");
    assert!(
        waited >= Duration::from_secs(1),
        "{query}: the first half came only with the rest ({waited:?} before the end)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_route_compresses_files_without_a_precompressed_sibling() {
    let s = setup().await;
    let want = sha256_hex(&text_body(20_000));
    for h2 in [false, true] {
        let res = send(
            &s,
            h2,
            get("/files/page.html", &[("accept-encoding", "br")]),
        )
        .await;
        assert_eq!(res.status(), 200);
        assert_eq!(header(&res, "content-encoding"), "br");
        assert_eq!(header(&res, "accept-ranges"), "");
        assert!(
            header(&res, "etag").starts_with("W/\""),
            "{:?}",
            res.headers()
        );
        assert_eq!(sha256_hex(&decode("br", res.body())), want);
        // Revalidation with the weak tag still gets 304, uncompressed and empty.
        let etag = header(&res, "etag").to_owned();
        let res = send(
            &s,
            h2,
            get(
                "/files/page.html",
                &[("accept-encoding", "br"), ("if-none-match", &etag)],
            ),
        )
        .await;
        assert_eq!(res.status(), 304);
        assert_eq!(header(&res, "content-encoding"), "");
        // The sibling wins, as it is.
        let res = send(&s, h2, get("/files/app.js", &[("accept-encoding", "gzip")])).await;
        assert_eq!(header(&res, "content-encoding"), "gzip");
        assert_eq!(res.body().as_ref(), b"PRECOMPRESSED");
        // A range is the file's bytes.
        let res = send(
            &s,
            h2,
            get(
                "/files/page.html",
                &[("accept-encoding", "gzip"), ("range", "bytes=0-99")],
            ),
        )
        .await;
        assert_eq!(res.status(), 206);
        assert_eq!(header(&res, "content-encoding"), "");
        assert_eq!(res.body().as_ref(), &text_body(20_000)[..100]);
    }
}
