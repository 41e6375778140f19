//! Request and response buffering (on by default): the app sees a request only once its whole body has
//! arrived, with its exact length, however it came (chunked, HTTP/2 without a length); large bodies go to
//! an unlinked file in `[process] temp_dir`, so memory stays bounded and nothing is left behind; the app's
//! response is read as fast as the app writes it, whatever the client's pace; server-sent events and
//! `X-Accel-Buffering: no` stream; past the disk budget, uploads get 503 with the security headers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis_tests::client::{read_response, read_until};
use portcullis_tests::{Setup, random_bytes, sha256_hex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIG_BODIES: &str = "[limits]\nbody = \"64MiB\"\n";

fn temp_dir(s: &Setup) -> PathBuf {
    s.pki.cert.with_file_name("buffers")
}

/// Files of `dir` that process `pid` holds open (unlinked ones show as "PATH (deleted)").
fn open_files_in(pid: u32, dir: &Path) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    fds.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.starts_with(dir))
        .count()
}

/// Waits (a safety net of 20 s, not an assertion on time) until `cond` holds.
async fn until(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..2000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn expected(body: &[u8]) -> String {
    format!("sha256={} len={}", sha256_hex(body), body.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mib_chunked_upload_reaches_the_app_whole_with_its_length_in_bounded_memory() {
    let s = Setup::new("", BIG_BODIES).await;
    // Warm up (allocator, TLS, the pool) before the baseline.
    assert_eq!(s.client.get(s.https(), "/").await.status(), 200);
    let before = peak_rss_kib(s.proxy.pid());
    let body = random_bytes(50 << 20, 50);
    let mut tls = s.client.tls(s.https(), &[b"http/1.1"]).await;
    tls.write_all(b"POST /sha256 HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    for chunk in body.chunks(256 << 10) {
        tls.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
        tls.write_all(chunk).await.unwrap();
        tls.write_all(b"\r\n").await.unwrap();
    }
    tls.write_all(b"0\r\n\r\n").await.unwrap();
    tls.flush().await.unwrap();
    let (status, head, got) = read_response(&mut tls).await;
    assert_eq!(status, 200, "{head}");
    assert_eq!(String::from_utf8_lossy(&got), expected(&body));
    // The app got it whole, with its length, not chunked.
    let rec = s.upstream.last();
    assert_eq!(
        rec.headers
            .get("content-length")
            .map(|v| v.to_str().unwrap()),
        Some("52428800")
    );
    assert!(rec.headers.get("transfer-encoding").is_none(), "{rec:?}");
    // Held in a temporary file, not in memory: the peak grew by far less than the body.
    let grown = peak_rss_kib(s.proxy.pid()).saturating_sub(before);
    println!("peak RSS grew {grown} KiB for a 50 MiB upload");
    assert!(grown < 24 * 1024, "peak RSS grew {grown} KiB");
    // The file is gone, and the folder is private and empty (the file never had a name).
    until("the temporary file is closed", || {
        open_files_in(s.proxy.pid(), &temp_dir(&s)) == 0
    })
    .await;
    let meta = std::fs::metadata(temp_dir(&s)).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o700
    );
    assert_eq!(std::fs::read_dir(temp_dir(&s)).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_upload_without_a_length_reaches_the_app_with_its_length() {
    let s = Setup::new("", BIG_BODIES).await;
    let body = random_bytes(5 << 20, 52);
    let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = body
        .chunks(100_000)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let tls = s.client.tls(s.https(), &[b"h2"]).await;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::post(format!("https://localhost:{}/sha256", s.https().port()))
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap();
    let res = send.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let got = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&got), expected(&body));
    let rec = s.upstream.last();
    assert_eq!(
        rec.headers
            .get("content-length")
            .map(|v| v.to_str().unwrap()),
        Some("5242880")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_upload_never_reaches_the_app_and_leaves_no_file() {
    let s = Setup::new("", BIG_BODIES).await;
    let mut tls = s.client.tls(s.https(), &[b"http/1.1"]).await;
    tls.write_all(b"POST /sha256 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 8388608\r\n\r\n")
        .await
        .unwrap();
    tls.write_all(&random_bytes(2 << 20, 53)).await.unwrap();
    tls.flush().await.unwrap();
    // Past the memory budget: the proxy holds the first 2 MiB in its temporary file.
    let pid = s.proxy.pid();
    until("a temporary file is open", || {
        open_files_in(pid, &temp_dir(&s)) == 1
    })
    .await;
    drop(tls);
    until("the temporary file is closed", || {
        open_files_in(pid, &temp_dir(&s)) == 0
    })
    .await;
    // The app never heard of it: no connection, no request.
    assert_eq!(s.upstream.connections(), 0);
    assert!(s.upstream.requests().is_empty());
    // And the proxy still serves.
    assert_eq!(s.client.get(s.https(), "/").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_response_is_read_from_the_app_while_the_client_has_not_read_it() {
    let s = Setup::new("", "").await;
    const N: usize = 32 << 20;
    let mut tls = s.client.tls(s.https(), &[b"http/1.1"]).await;
    tls.write_all(format!("GET /bytes/{N} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    tls.flush().await.unwrap();
    let head = read_until(&mut tls, "\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The client reads nothing more; far more than the sockets' buffers hold, the app still finishes
    // (streamed, it would wait for the client), and the proxy holds the rest in a temporary file.
    until("the app finished writing its response", || {
        s.upstream.responses_sent() == 1
    })
    .await;
    assert_eq!(open_files_in(s.proxy.pid(), &temp_dir(&s)), 1);
    // The client then gets every byte.
    let mut got = head.len() - head.find("\r\n\r\n").unwrap() - 4;
    let mut buf = vec![0u8; 1 << 16];
    while got < N {
        let n = tls.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed after {got} bytes");
        assert!(buf[..n].iter().all(|b| *b == b'x'));
        got += n;
    }
    assert_eq!(got, N);
    until("the temporary file is closed", || {
        open_files_in(s.proxy.pid(), &temp_dir(&s)) == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_accel_buffering_no_streams_and_is_removed() {
    let s = Setup::new("", "").await;
    let res = s.client.get(s.https(), "/bytes/3000000?accel=no").await;
    assert_eq!(res.status(), 200);
    assert!(res.headers().get("x-accel-buffering").is_none(), "{res:?}");
    assert_eq!(res.body().len(), 3_000_000);
    assert_eq!(open_files_in(s.proxy.pid(), &temp_dir(&s)), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_arrive_event_by_event() {
    let s = Setup::new("", "").await;
    for alpn in [&b"http/1.1"[..], b"h2"] {
        let tls = s.client.tls(s.https(), &[alpn]).await;
        let uri = format!("https://localhost:{}/sse", s.https().port());
        let mut res = if alpn == b"h2" {
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            send.send_request(Request::get(uri).body(Full::<Bytes>::default()).unwrap())
                .await
                .unwrap()
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(conn);
            send.send_request(
                Request::get("/sse")
                    .header("host", "localhost")
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
            .await
            .unwrap()
        };
        assert_eq!(res.status(), 200, "{res:?}");
        // The first event arrives alone: the second is two seconds behind it.
        let first = res.body_mut().frame().await.unwrap().unwrap();
        assert_eq!(first.data_ref().unwrap().as_ref(), b"data: one\n\n");
        let rest = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(rest.as_ref(), b"data: two\n\n");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_disk_budget_an_upload_gets_503_and_never_reaches_the_app() {
    let s = Setup::new(
        "",
        "[limits]\nbody = \"8MiB\"\n[buffers]\nmemory_per_request = \"64KiB\"\ndisk = \"1MiB\"\n",
    )
    .await;
    let body = random_bytes(2 << 20, 54);
    let req = Request::post("/sha256")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let res = s.client.send_h2(s.https(), req).await;
    assert_eq!(res.status(), 503);
    for h in [
        "strict-transport-security",
        "x-content-type-options",
        "x-frame-options",
        "referrer-policy",
    ] {
        assert!(res.headers().contains_key(h), "{h}: {res:?}");
    }
    let line = s
        .proxy
        .wait_for_log(|l| l.contains("[buffers] disk"), Duration::from_secs(5))
        .expect("no log line says why");
    // Nothing was written past the budget.
    let disk: u64 = line
        .split("disk=")
        .nth(1)
        .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no disk figure: {line}"));
    assert!(disk <= 1 << 20, "{line}");
    assert!(s.upstream.requests().is_empty());
    // The budget is given back: a body that fits goes through.
    let small = random_bytes(512 << 10, 55);
    let req = Request::post("/sha256")
        .body(Full::new(Bytes::from(small.clone())))
        .unwrap();
    let res = s.client.send_h2(s.https(), req).await;
    assert_eq!(res.status(), 200);
    assert_eq!(String::from_utf8_lossy(res.body()), expected(&small));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_temp_dir_that_is_a_symlink_is_refused_at_start() {
    let dir = portcullis_tests::TempDir::new("tmpsymlink");
    let pki = portcullis_tests::Pki::new(dir.path(), &[]);
    let target = dir.path().join("elsewhere");
    std::fs::create_dir(&target).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let text = portcullis_tests::config(&pki, "127.0.0.1:9", "").replace(
        &format!(
            "temp_dir = \"{}\"",
            pki.cert.with_file_name("buffers").display()
        ),
        &format!("temp_dir = \"{}\"", link.display()),
    );
    let path = dir.write("portcullis.toml", &text);
    let proxy = portcullis_tests::Portcullis::run(&path, &[]);
    assert!(!proxy.ready, "started anyway:\n{}", proxy.output());
    let out = proxy.output();
    assert!(out.contains("temp_dir") && out.contains("symlink"), "{out}");
}

/// An app that answers every request with a head promising 1000 bytes, sends 10, and dies (closes): what a
/// worker killed mid-response looks like. Counts the requests it took by method.
struct DyingApp {
    addr: std::net::SocketAddr,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl DyingApp {
    async fn start() -> DyingApp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let head = read_until(&mut conn, "\r\n\r\n").await;
                    let method = head.split(' ').next().unwrap_or_default().to_owned();
                    log.lock().unwrap().push(method);
                    let _ = conn
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
                        .await;
                    let _ = conn.flush().await;
                });
            }
        });
        DyingApp { addr, seen }
    }

    fn took(&self, method: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|m| *m == method)
            .count()
    }
}

/// A buffered response that breaks off (the app died mid-body) has sent the client nothing yet: a GET is
/// answered by another server, whole, as if the first had refused the connection; a POST is never sent
/// twice and gets 502. Both protocols.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_that_breaks_off_while_buffered_sends_a_get_elsewhere_and_never_a_post() {
    let dying = DyingApp::start().await;
    let servers = format!(
        "balance = \"round_robin\"\nmax_fails = 0\nservers = [\"{}\", \"",
        dying.addr
    );
    let s = Setup::with("", "", &[("servers = [\"", &servers)]).await;
    // Three GETs: the retry budget allows three retries a second whatever the traffic (and round robin
    // sends each request to the dying app first, its retry to the other).
    for i in 0..3 {
        let req = Request::get("/bytes/1000")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let res = if i % 2 == 0 {
            s.client.send(s.https(), req).await
        } else {
            s.client.send_h2(s.https(), req).await
        };
        assert_eq!(res.status(), 200, "GET {i}; log:\n{}", s.proxy.output());
        assert_eq!(res.body().len(), 1000, "GET {i}");
    }
    assert!(
        dying.took("GET") >= 1,
        "round robin sent no GET to the dying app"
    );
    let mut refused = 0;
    for i in 0..4 {
        let req = Request::post("/upload")
            .body(Full::new(Bytes::from_static(b"pay once")))
            .unwrap();
        let res = if i % 2 == 0 {
            s.client.send(s.https(), req).await
        } else {
            s.client.send_h2(s.https(), req).await
        };
        match res.status().as_u16() {
            200 => {}
            502 => {
                refused += 1;
                assert!(res.headers().contains_key("strict-transport-security"));
            }
            other => panic!("POST {i}: {other}"),
        }
    }
    // Every POST the dying app took was answered 502, and none of them went to the other server too.
    assert!(refused >= 1, "round robin sent no POST to the dying app");
    assert_eq!(refused, dying.took("POST"));
    let posts_elsewhere = s
        .upstream
        .requests()
        .iter()
        .filter(|r| r.method == "POST")
        .count();
    assert_eq!(posts_elsewhere, 4 - refused);
}
