//! Static routes (`static = "..."`), through the real binary over real TLS: MIME types, `Cache-Control`,
//! Range and conditional requests (tower-http's `ServeDir`), precompressed siblings, index and fallback, a
//! route to one file, GET/HEAD only, and a traversal corpus (HTTP/1.1 request lines as written, and raw
//! HTTP/2 `:path`s, since clients normalise) that never gets a file from outside the folder. Static routes
//! keep working while the maintenance flag is up; a missing folder stops `check`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use portcullis_tests::h2raw::{self, END_HEADERS, END_STREAM, HEADERS};
use portcullis_tests::{Client, Pki, Portcullis, TempDir, Upstream, binary, config};

const SECRET: &str = "TOP-SECRET-d41d8cd9";
const CSS: &str = "body { color: #123456 }\n";
const JS: &str = "console.log('plain');\n";

/// A folder with one file of each type, precompressed siblings, dot-files, symlinks out of it, and a
/// secret beside it (outside); a SPA folder; a favicon.
struct Site {
    dir: TempDir,
    www: PathBuf,
    spa: PathBuf,
}

fn site() -> Site {
    let dir = TempDir::new("static");
    let www = dir.path().join("www");
    let spa = dir.path().join("spa");
    for d in [
        &www.join("fonts"),
        &www.join(".git"),
        &spa.join("sub"),
        &spa.join("assets"),
    ] {
        std::fs::create_dir_all(d).unwrap();
    }
    let w = |p: &Path, name: &str, body: &[u8]| std::fs::write(p.join(name), body).unwrap();
    w(&www, "app.css", CSS.as_bytes());
    w(&www, "app.js", JS.as_bytes());
    // Not real compressed data: what matters is which file is sent, and how it is labelled.
    w(&www, "app.js.br", b"BROTLI-BYTES");
    w(&www, "app.js.gz", b"GZIP-BYTES");
    w(&www, "app.js.zst", b"ZSTD-BYTES");
    w(
        &www,
        "logo.svg",
        b"<svg xmlns=\"http://www.w3.org/2000/svg\"/>",
    );
    w(&www.join("fonts"), "x.woff2", b"wOF2....");
    w(&www, "pixel.png", b"\x89PNG\r\n\x1a\n");
    w(&www, "page.html", b"<!doctype html><p>page</p>");
    w(&www, ".env", SECRET.as_bytes());
    w(&www.join(".git"), "config", SECRET.as_bytes());
    w(dir.path(), "secret", SECRET.as_bytes());
    std::os::unix::fs::symlink(dir.path().join("secret"), www.join("link.txt")).unwrap();
    std::os::unix::fs::symlink(dir.path(), www.join("up")).unwrap();
    w(&spa, "index.html", b"<!doctype html><p>spa shell</p>");
    w(
        &spa.join("sub"),
        "index.html",
        b"<!doctype html><p>sub index</p>",
    );
    w(&spa.join("assets"), "main.js", b"spa();");
    w(dir.path(), "favicon.ico", b"\x00\x00\x01\x00icon");
    Site { dir, www, spa }
}

/// Portcullis with `/` to a recording upstream, `/static/` (cache 365d), `/app/` (index + fallback) and
/// `/favicon.ico` (one file); with `flag`, the maintenance flag file exists from the start.
async fn start(s: &Site, flag: bool) -> (Pki, Upstream, Portcullis, Client) {
    let pki = Pki::new(s.dir.path(), &[]);
    let upstream = Upstream::tcp().await;
    let flag_path = s.dir.path().join("maintenance.flag");
    if flag {
        std::fs::write(&flag_path, "").unwrap();
    }
    let extra = format!(
        "[[route]]\npath = \"/static/\"\nstatic = \"{}\"\ncache = \"365d\"\n\n\
         [[route]]\npath = \"/app/\"\nstatic = \"{}\"\nindex = \"index.html\"\nfallback = \"index.html\"\n\n\
         [[route]]\npath = \"/favicon.ico\"\nstatic = \"{}\"\n\n\
         [maintenance]\nflag = \"{}\"\n",
        s.www.display(),
        s.spa.display(),
        s.dir.path().join("favicon.ico").display(),
        flag_path.display()
    );
    let text = config(&pki, &upstream.addr_string(), &extra);
    let p = Portcullis::run(&s.dir.write("p.toml", &text), &[]);
    assert!(p.ready, "{}", p.output());
    let client = Client::new(&pki.ca_pem);
    (pki, upstream, p, client)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_files_carry_their_mime_type_the_cache_header_and_our_security_headers() {
    let s = site();
    let (_pki, upstream, p, client) = start(&s, false).await;
    let addr = p.https_addr();
    for (path, mime) in [
        ("/static/app.css", "text/css"),
        ("/static/app.js", "text/javascript"),
        ("/static/logo.svg", "image/svg+xml"),
        ("/static/fonts/x.woff2", "font/woff2"),
        ("/static/pixel.png", "image/png"),
        ("/static/page.html", "text/html"),
    ] {
        let res = client.get(addr, path).await;
        assert_eq!(res.status(), 200, "{path}");
        assert_eq!(header(&res, "content-type"), mime, "{path}");
        assert_eq!(
            header(&res, "cache-control"),
            "public, max-age=31536000",
            "{path}"
        );
        assert_eq!(header(&res, "x-content-type-options"), "nosniff", "{path}");
        assert!(
            res.headers().contains_key("strict-transport-security"),
            "{path}"
        );
        assert!(res.headers().contains_key("etag") && res.headers().contains_key("last-modified"));
    }
    let res = client.get(addr, "/static/app.css").await;
    assert_eq!(res.body().as_ref(), CSS.as_bytes());
    // HEAD: the same head, no body.
    let head = client
        .send(
            addr,
            Request::head("/static/app.css")
                .body(Full::default())
                .unwrap(),
        )
        .await;
    assert_eq!(head.status(), 200);
    assert_eq!(header(&head, "content-length"), CSS.len().to_string());
    assert!(head.body().is_empty());
    // The access line names no upstream.
    let line = p
        .wait_for_log(
            |l| l.contains("path=/static/app.css"),
            Duration::from_secs(10),
        )
        .expect("no access line");
    assert!(line.contains("upstream=\"-\""), "{line}");
    assert!(
        upstream.requests().is_empty(),
        "the app saw a static request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_and_conditional_requests_are_answered_from_the_file() {
    let s = site();
    let (_pki, _up, p, client) = start(&s, false).await;
    let addr = p.https_addr();
    let res = client
        .send(addr, get("/static/app.css", &[("range", "bytes=5-9")]))
        .await;
    assert_eq!(res.status(), 206);
    assert_eq!(
        header(&res, "content-range"),
        format!("bytes 5-9/{}", CSS.len())
    );
    assert_eq!(res.body().as_ref(), &CSS.as_bytes()[5..=9]);
    let res = client
        .send(addr, get("/static/app.css", &[("range", "bytes=9999-")]))
        .await;
    assert_eq!(res.status(), 416);

    let full = client.get(addr, "/static/app.css").await;
    let etag = header(&full, "etag").to_owned();
    let modified = header(&full, "last-modified").to_owned();
    assert!(!etag.is_empty() && !modified.is_empty());
    for (name, value) in [("if-none-match", &etag), ("if-modified-since", &modified)] {
        let res = client
            .send(addr, get("/static/app.css", &[(name, value)]))
            .await;
        assert_eq!(res.status(), 304, "{name}");
        assert!(res.body().is_empty(), "{name}");
        assert_eq!(
            header(&res, "cache-control"),
            "public, max-age=31536000",
            "{name}"
        );
    }
    let res = client
        .send(
            addr,
            get("/static/app.css", &[("if-none-match", "\"other\"")]),
        )
        .await;
    assert_eq!(res.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precompressed_siblings_are_sent_only_to_clients_that_accept_them() {
    let s = site();
    let (_pki, _up, p, client) = start(&s, false).await;
    let addr = p.https_addr();
    for (accept, encoding, body) in [
        ("br", "br", "BROTLI-BYTES"),
        ("gzip", "gzip", "GZIP-BYTES"),
        ("zstd", "zstd", "ZSTD-BYTES"),
        ("gzip, br;q=0.5", "gzip", "GZIP-BYTES"),
        ("identity", "", JS),
        ("", "", JS),
    ] {
        let headers: &[(&str, &str)] = if accept.is_empty() {
            &[]
        } else {
            &[("accept-encoding", accept)]
        };
        let res = client.send(addr, get("/static/app.js", headers)).await;
        assert_eq!(res.status(), 200, "{accept}");
        assert_eq!(header(&res, "content-encoding"), encoding, "{accept}");
        assert_eq!(header(&res, "content-type"), "text/javascript", "{accept}");
        assert_eq!(header(&res, "vary"), "accept-encoding", "{accept}");
        assert_eq!(String::from_utf8_lossy(res.body()), body, "{accept}");
    }
    // A file without siblings is sent as it is, whatever the client accepts.
    let res = client
        .send(
            addr,
            get("/static/app.css", &[("accept-encoding", "br, gzip")]),
        )
        .await;
    assert_eq!(header(&res, "content-encoding"), "");
    assert_eq!(res.body().as_ref(), CSS.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_fallback_and_a_route_to_one_file() {
    let s = site();
    let (_pki, upstream, p, client) = start(&s, false).await;
    let addr = p.https_addr();
    let body = |r: &Response<Bytes>| String::from_utf8_lossy(r.body()).into_owned();
    // A folder answers with its index; a path that matches nothing with the fallback (200, for a SPA);
    // neither is cached without revalidation.
    for (path, text) in [
        ("/app/", "spa shell"),
        ("/app/sub/", "sub index"),
        ("/app/users/42/edit", "spa shell"),
        ("/app/sub/missing", "spa shell"),
    ] {
        let res = client.get(addr, path).await;
        assert_eq!(res.status(), 200, "{path}");
        assert!(body(&res).contains(text), "{path}: {}", body(&res));
        assert_eq!(header(&res, "content-type"), "text/html", "{path}");
        assert_eq!(header(&res, "cache-control"), "no-cache", "{path}");
    }
    let res = client.get(addr, "/app/assets/main.js").await;
    assert_eq!(
        (res.status().as_u16(), body(&res).as_str()),
        (200, "spa();")
    );
    assert_eq!(
        header(&res, "cache-control"),
        "",
        "no `cache` on this route"
    );
    // A folder named without its '/' is sent to it (relative links need it).
    let res = client.get(addr, "/app/sub").await;
    assert_eq!(res.status(), 307);
    assert_eq!(header(&res, "location"), "/app/sub/");
    // No index, no fallback: a folder is 404 (never a listing), and so is a missing file.
    for path in ["/static/", "/static/fonts/", "/static/missing.css"] {
        let res = client.get(addr, path).await;
        assert_eq!(res.status(), 404, "{path}");
        assert!(!body(&res).contains("app.css"), "{path}: a listing");
    }
    // One file at its exact path; anything longer goes on to the shorter route (here the app).
    let res = client.get(addr, "/favicon.ico").await;
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "content-type"), "image/x-icon");
    assert_eq!(res.body().as_ref(), b"\x00\x00\x01\x00icon");
    assert!(upstream.requests().is_empty());
    let res = client.get(addr, "/favicon.ico.map").await;
    assert_eq!(res.status(), 200);
    assert_eq!(upstream.last().target, "/favicon.ico.map");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_get_and_head_are_served() {
    let s = site();
    let (_pki, upstream, p, client) = start(&s, false).await;
    for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
        let req = Request::builder()
            .method(method)
            .uri("/static/app.css")
            .body(Full::new(Bytes::from_static(b"x=1")))
            .unwrap();
        let res = client.send(p.https_addr(), req).await;
        assert_eq!(res.status(), 405, "{method}");
        assert_eq!(header(&res, "allow"), "GET, HEAD", "{method}");
        assert_eq!(header(&res, "x-content-type-options"), "nosniff");
    }
    assert!(upstream.requests().is_empty());
}

/// The paths that try to get out of `/static/`; none may answer with the secret (or anything but 400/404).
const CORPUS: &[&str] = &[
    "/static/../secret",
    "/static/%2e%2e/secret",
    "/static/%2E%2E/secret",
    "/static/%2e%2e%2fsecret",
    "/static/..%2fsecret",
    "/static/..%2Fsecret",
    "/static/.%2e/secret",
    "/static/fonts/../../secret",
    "/static/..\\secret",
    "/static/%5c..%5csecret",
    "/static/%5C..%5Csecret",
    "/static/%00",
    "/static/secret%00.css",
    "/static/%c0%ae%c0%ae/secret",
    "/static/%c0%ae%c0%ae%c0%afsecret",
    "/static/%e0%80%ae%e0%80%ae/secret",
    "/static//etc/passwd",
    "/static/%2fetc%2fpasswd",
    "/static/.env",
    "/static/%2eenv",
    "/static/.git/config",
    "/static/link.txt",
    "/static/up/secret",
];

fn refused(status: Option<u16>, body: &str, path: &str) {
    assert!(
        matches!(status, None | Some(400) | Some(404)),
        "{path}: answered {status:?}: {body}"
    );
    assert!(!body.contains(SECRET), "{path}: the secret was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversal_attempts_never_reach_a_file_outside_the_folder() {
    let s = site();
    let (_pki, upstream, p, client) = start(&s, false).await;
    let addr = p.https_addr();
    // HTTP/1.1: the request line exactly as written.
    for path in CORPUS {
        let raw = client
            .raw(
                addr,
                format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await;
        let status = raw.get(9..12).and_then(|s| s.parse().ok());
        refused(status, &raw, path);
    }
    // HTTP/2: each `:path` as written, on streams of one connection.
    let mut tls = client.tls(addr, &[b"h2"]).await;
    let mut bytes = h2raw::preface();
    for (i, path) in CORPUS.iter().enumerate() {
        let fields = [
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", "localhost"),
            (":path", *path),
        ];
        let stream = 1 + 2 * i as u32;
        bytes.extend(h2raw::frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            stream,
            &h2raw::block(&fields),
        ));
    }
    tokio::io::AsyncWriteExt::write_all(&mut tls, &bytes)
        .await
        .unwrap();
    let seen = h2raw::read_frames(&mut tls, |frames| {
        frames
            .iter()
            .filter(|f| f.flags & END_STREAM != 0 || f.kind == h2raw::RST_STREAM)
            .count()
            >= CORPUS.len()
            || frames.iter().any(|f| f.kind == h2raw::GOAWAY)
    })
    .await;
    assert!(
        !seen.frames.iter().any(|f| f.kind == h2raw::GOAWAY),
        "{:?}",
        seen.frames
    );
    for (i, path) in CORPUS.iter().enumerate() {
        let (status, body) = seen.answer(1 + 2 * i as u32);
        refused(status, &body, path);
    }
    // The app saw none of them (they all took the static route), and the folder still serves.
    assert!(upstream.requests().is_empty(), "{:?}", upstream.requests());
    assert_eq!(client.get(addr, "/static/app.css").await.status(), 200);
    // A symlink that leads back into the folder is fine: only where a file really is counts.
    let res = client.get(addr, "/static/up/www/app.css").await;
    assert_eq!(
        (res.status().as_u16(), res.body().as_ref()),
        (200, CSS.as_bytes())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_routes_keep_working_while_the_maintenance_flag_is_up() {
    let s = site();
    let (_pki, upstream, p, client) = start(&s, true).await;
    let addr = p.https_addr();
    assert_eq!(
        client.get(addr, "/").await.status(),
        503,
        "the app is in maintenance"
    );
    for path in [
        "/static/app.css",
        "/app/",
        "/app/some/route",
        "/favicon.ico",
    ] {
        let res = client.get(addr, path).await;
        assert_eq!(res.status(), 200, "{path}");
        assert_ne!(
            header(&res, "cache-control"),
            "no-store",
            "{path}: the maintenance page"
        );
    }
    assert!(upstream.requests().is_empty());
}

#[test]
fn check_names_the_static_key_of_a_missing_folder() {
    let dir = TempDir::new("static-check");
    let pki = Pki::new(dir.path(), &[]);
    let text = config(
        &pki,
        "127.0.0.1:9",
        &format!(
            "[[route]]\npath = \"/static/\"\nstatic = \"{}\"\n",
            dir.path().join("not-there").display()
        ),
    );
    let path = dir.write("p.toml", &text);
    let out = Command::new(binary())
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("p.toml:") && err.contains(": route[1].static: ") && err.contains("not-there"),
        "{err}"
    );
    // Fixed: check passes.
    std::fs::create_dir(dir.path().join("not-there")).unwrap();
    let out = Command::new(binary())
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
