//! A real Flask app under gunicorn (Debian packages python3-flask and gunicorn) on a unix socket, behind
//! Portcullis: what the app receives and what the client gets back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use portcullis_tests::{Client, Pki, Portcullis, TempDir, config};

struct Gunicorn(Child);

impl Drop for Gunicorn {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// gunicorn serving `app` (`module:variable` in tests/fixtures) on the unix socket `socket`.
fn start_gunicorn(socket: &Path, app: &str) -> Gunicorn {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let child = Command::new("/usr/bin/gunicorn")
        .args(["--bind", &format!("unix:{}", socket.display()), "--workers", "2", "--chdir"])
        .arg(&fixtures)
        .arg(app)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("/usr/bin/gunicorn is needed (Debian packages gunicorn and python3-flask; the test command installs them)");
    let mut g = Gunicorn(child);
    // Readiness: gunicorn creates the socket once it has bound it (workers then accept from its backlog).
    for _ in 0..1000 {
        if socket.exists() {
            return g;
        }
        if let Ok(Some(status)) = g.0.try_wait() {
            panic!("gunicorn exited: {status}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("gunicorn did not create {}", socket.display());
}

/// Portcullis in front of gunicorn serving `app` on a unix socket, and a client trusting its certificate.
/// Fields drop in order: the proxy, then gunicorn, then their folder.
struct Behind {
    p: Portcullis,
    client: Client,
    _g: Gunicorn,
    _dir: TempDir,
}

fn behind_portcullis(app: &str) -> Behind {
    let dir = TempDir::new("gunicorn");
    let pki = Pki::new(dir.path(), &["app.test"]);
    let socket = dir.path().join("gunicorn.sock");
    let g = start_gunicorn(&socket, app);
    let p = Portcullis::run(
        &dir.write(
            "p.toml",
            &config(&pki, &format!("unix:{}", socket.display()), ""),
        ),
        &[],
    );
    assert!(p.ready, "{}", p.output());
    Behind {
        p,
        client: Client::new(&pki.ca_pem),
        _g: g,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flask_under_gunicorn_on_a_unix_socket() {
    let b = behind_portcullis("flask_app:app");
    let (p, client) = (&b.p, &b.client);

    let req = Request::get("/?q=1")
        .header("host", "app.test")
        .header("x-forwarded-for", "6.6.6.6")
        .body(Full::default())
        .unwrap();
    let res = client.send(p.https_addr(), req).await;
    assert_eq!(res.status(), 200, "{}", String::from_utf8_lossy(res.body()));
    assert!(
        res.headers().get("server").is_none(),
        "gunicorn's Server banner leaked: {:?}",
        res.headers().get("server")
    );
    assert_eq!(
        res.headers()["strict-transport-security"],
        "max-age=63072000; includeSubDomains"
    );
    let body = String::from_utf8_lossy(res.body()).into_owned();
    assert!(body.contains("\"X-Forwarded-For\":\"127.0.0.1\""), "{body}");
    assert!(body.contains("\"X-Forwarded-Proto\":\"https\""), "{body}");
    assert!(body.contains("\"host\":\"app.test\""), "{body}");
    assert!(body.contains("\"path\":\"/?q=1\""), "{body}");

    let form = Request::post("/accounts/login/")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from_static(
            b"username=alice&password=s3cret",
        )))
        .unwrap();
    let res = client.send(p.https_addr(), form).await;
    assert_eq!(res.status(), 200);
    assert!(String::from_utf8_lossy(res.body()).contains("\"user\":\"alice\""));

    let res = client
        .send_h2(
            p.https_addr(),
            Request::get("/big").body(Full::default()).unwrap(),
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.body().len(), 1_000_000);
}

/// A `curl -F file=@binary` multipart upload over HTTP/1.1 reaches Flask's `request.files` intact (it used
/// to be refused with 400 when the first body bytes arrived with the head and held a bare CR or LF).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_binary_upload_reaches_flask_request_files_intact() {
    let dir = TempDir::new("gunicorn-upload");
    let pki = Pki::new(dir.path(), &["app.test"]);
    let socket = dir.path().join("gunicorn.sock");
    let _g = start_gunicorn(&socket, "flask_app:app");
    let p = Portcullis::run(
        &dir.write(
            "p.toml",
            &config(
                &pki,
                &format!("unix:{}", socket.display()),
                "[limits]\nbody = \"64MiB\"\n",
            ),
        ),
        &[],
    );
    assert!(p.ready, "{}", p.output());
    for (name, n) in [("small.bin", 700usize), ("photo.jpg", 3 << 20)] {
        let mut data = portcullis_tests::random_bytes(n, n as u64);
        let start = b"\xff\xd8\r\n\n\r--x\r\n\r\n";
        data[..start.len()].copy_from_slice(start);
        let file = dir.path().join(name);
        std::fs::write(&file, &data).unwrap();
        let out = Command::new("curl")
            .args(["--http1.1", "-sS", "--max-time", "60", "--cacert"])
            .arg(pki.ca_path())
            .arg("-F")
            .arg(format!("file=@{}", file.display()))
            .args(["-F", "note=hello"])
            .arg(format!(
                "https://localhost:{}/upload",
                p.https_addr().port()
            ))
            .output()
            .expect("curl is needed (Debian package curl)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let sha = portcullis_tests::sha256_hex(&data);
        assert!(
            text.contains(&format!("\"sha256\":\"{sha}\"")),
            "{name}: Flask got other bytes: {text}\nlog:\n{}",
            p.output()
        );
        assert!(text.contains(&format!("\"length\":{n}")), "{text}");
        assert!(text.contains(&format!("\"filename\":\"{name}\"")), "{text}");
        assert!(text.contains("\"note\":\"hello\""), "{text}");

        // The same bytes as a raw body (`--data-binary`): curl sends a small one in the same write as the head.
        let out = Command::new("curl")
            .args(["--http1.1", "-sS", "--max-time", "60", "--cacert"])
            .arg(pki.ca_path())
            .args([
                "-H",
                "Content-Type: application/octet-stream",
                "--data-binary",
            ])
            .arg(format!("@{}", file.display()))
            .arg(format!("https://localhost:{}/raw", p.https_addr().port()))
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            text.contains(&format!("\"sha256\":\"{sha}\"")),
            "{name} as --data-binary: Flask got other bytes: {text}\nlog:\n{}",
            p.output()
        );
    }
}

/// What a client may claim about itself in headers that frameworks believe behind a proxy, spoofed.
const SPOOFED: [(&str, &str); 16] = [
    ("x-forwarded-for", "6.6.6.6"),
    ("x-forwarded-proto", "http"),
    ("x-forwarded-host", "evil.test"),
    ("x-forwarded-port", "1"),
    ("x-forwarded-prefix", "/evil"),
    ("x-real-ip", "6.6.6.6"),
    ("forwarded", "for=6.6.6.6;proto=http;host=evil.test"),
    ("x-client-ip", "6.6.6.6"),
    ("true-client-ip", "6.6.6.6"),
    ("cf-connecting-ip", "6.6.6.6"),
    ("x-cluster-client-ip", "6.6.6.6"),
    ("fastly-client-ip", "6.6.6.6"),
    ("x-original-forwarded-for", "6.6.6.6"),
    ("x-forwarded-ssl", "off"),
    ("x-forwarded-protocol", "http"),
    ("x-forwarded-scheme", "http"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_address_headers_do_not_fool_a_proxyfix_app() {
    let b = behind_portcullis("flask_proxyfix:app");
    let (p, client) = (&b.p, &b.client);
    let port = p.https_addr().port();
    for h2 in [false, true] {
        // HTTP/1.1 with a Host without port (the port comes from X-Forwarded-Port); HTTP/2 with one.
        let mut req = Request::get("/whoami?q=1");
        if !h2 {
            req = req.header("host", "localhost");
        }
        for (name, value) in SPOOFED {
            req = req.header(name, value);
        }
        let req = req.body(Full::default()).unwrap();
        let res = if h2 {
            client.send_h2(p.https_addr(), req).await
        } else {
            client.send(p.https_addr(), req).await
        };
        let body = String::from_utf8_lossy(res.body()).into_owned();
        assert_eq!(res.status(), 200, "h2={h2}: {body}");
        for want in [
            format!("\"url\":\"https://localhost:{port}/whoami?q=1\""),
            "\"remote_addr\":\"127.0.0.1\"".to_owned(),
            "\"scheme\":\"https\"".to_owned(),
            format!("\"port\":\"{port}\""),
            "\"script_root\":\"\"".to_owned(),
        ] {
            assert!(body.contains(&want), "h2={h2}: {want} missing in {body}");
        }
        assert!(!body.contains("6.6.6.6"), "h2={h2}: {body}");
        assert!(!body.contains("evil"), "h2={h2}: {body}");
    }
}
