//! Issue 5: certificates that never cause an outage. Several sites by SNI (421 when Host names another
//! site), hot reload by file change (the certbot way: new files, then symlinks flipped) under load with zero
//! failed requests, bad pairs refused with the old one still serving, SIGHUP, self-signed sites, expiry
//! warnings.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step should fail the test loudly

use std::net::SocketAddr;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use portcullis_tests::client::insecure_config;
use portcullis_tests::load::Load;
use portcullis_tests::{Client, Portcullis, TempDir, TestCa, Upstream, openssl, s_client};

/// The leaf a handshake with `sni` is shown, or None when the handshake fails.
async fn leaf(client: &Client, addr: SocketAddr, sni: &str) -> Option<Vec<u8>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).ok()?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client.config(&[b"http/1.1"])))
        .connect(name, tcp)
        .await
        .ok()?;
    Some(tls.get_ref().1.peer_certificates()?[0].to_vec())
}

fn site_config(upstream: &str, sites: &str, top: &str, cert: &Path, key: &Path) -> String {
    format!(
        "{top}\n[listen]\nhttps = [\"127.0.0.1:0\"]\nhttp = []\n\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n\n[[route]]\npath = \"/\"\nupstream = \"app\"\n\n[upstream.app]\nservers = [\"{upstream}\"]\n\n{sites}",
        cert.display(),
        key.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sites_by_sni_and_421_when_host_names_another_site() {
    let dir = TempDir::new("sites");
    let ca = TestCa::new();
    let a = ca.issue(dir.path(), "a", &["a.test", "localhost"], None);
    let b = ca.issue(dir.path(), "b", &["b.test", "*.wild.test"], None);
    let up = Upstream::tcp().await;
    let sites = format!(
        "[[site]]\nnames = [\"b.test\", \"*.wild.test\"]\ntls = {{ cert = \"{}\", key = \"{}\" }}\n  [[site.route]]\n  path = \"/\"\n  upstream = \"app\"\n",
        dir.path().join("b.pem").display(),
        dir.path().join("b.key").display()
    );
    let text = site_config(
        &up.addr_string(),
        &sites,
        "names = [\"a.test\", \"localhost\"]",
        &dir.path().join("a.pem"),
        &dir.path().join("a.key"),
    );
    let p = Portcullis::run(&dir.write("p.toml", &text), &[]);
    assert!(p.ready, "{}", p.output());
    let client = ca.client();
    let addr = p.https_addr();
    assert_eq!(leaf(&client, addr, "a.test").await, Some(a.clone()));
    assert_eq!(leaf(&client, addr, "b.test").await, Some(b.clone()));
    assert_eq!(leaf(&client, addr, "x.wild.test").await, Some(b));
    // Unknown SNI: the default site's certificate (which the client then does not trust for that name).
    assert_eq!(leaf(&client, addr, "localhost").await, Some(a));

    // SNI b.test, Host a.test: another configured site -> 421.
    let tls = client
        .tls_with(addr, "b.test", client.config(&[b"http/1.1"]))
        .await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let res = send
        .send_request(
            Request::get("/")
                .header("host", "a.test")
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 421);
    assert_eq!(res.headers()["x-content-type-options"], "nosniff");
    // Read the 421 page whole and wait for the connection, as any HTTP/1.1 client must before reusing it.
    http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap();
    send.ready().await.unwrap();
    let res = send
        .send_request(
            Request::get("/ok")
                .header("host", "b.test")
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(up.last().headers["host"], "b.test");
}

/// The leaf a handshake with `sni` is shown by a client that accepts any certificate (so that only the
/// server can make it fail), or the handshake's error.
async fn leaf_whatever_the_name(addr: SocketAddr, sni: &str) -> Result<Vec<u8>, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name =
        rustls::pki_types::ServerName::try_from(sni.to_owned()).map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(insecure_config(&[b"http/1.1"])))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    Ok(tls.get_ref().1.peer_certificates().unwrap()[0].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_sni_refuses_unknown_names() {
    let dir = TempDir::new("strict");
    let ca = TestCa::new();
    let a = ca.issue(dir.path(), "a", &["a.test"], None);
    let up = Upstream::tcp().await;
    let start = |strict: bool| {
        let text = site_config(
            &up.addr_string(),
            "",
            &format!("names = [\"a.test\"]\nstrict_sni = {strict}"),
            &dir.path().join("a.pem"),
            &dir.path().join("a.key"),
        );
        let p = Portcullis::run(&dir.write(&format!("p{strict}.toml"), &text), &[]);
        assert!(p.ready, "{}", p.output());
        p
    };
    // The client takes any certificate for any name: a failed handshake is the server's refusal.
    let lax = start(false);
    assert_eq!(
        leaf_whatever_the_name(lax.https_addr(), "other.test").await,
        Ok(a.clone()),
        "without strict_sni an unknown name gets the default site's certificate"
    );
    let p = start(true);
    assert_eq!(leaf(&ca.client(), p.https_addr(), "a.test").await, Some(a));
    let refused = leaf_whatever_the_name(p.https_addr(), "other.test").await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("received fatal alert")),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_signed_sites_are_generated_for_their_names() {
    let dir = TempDir::new("selfsigned");
    let up = Upstream::tcp().await;
    let text = format!(
        "names = [\"self.test\"]\n[listen]\nhttps = [\"127.0.0.1:0\"]\nhttp = []\n[tls]\nself_signed = true\n[[route]]\npath = \"/\"\nupstream = \"app\"\n[upstream.app]\nservers = [\"{}\"]\n",
        up.addr_string()
    );
    let p = Portcullis::run(&dir.write("p.toml", &text), &[]);
    assert!(p.ready, "{}", p.output());
    assert!(
        p.output()
            .contains("self-signed certificate generated at start")
    );
    let tcp = tokio::net::TcpStream::connect(p.https_addr())
        .await
        .unwrap();
    let tls =
        tokio_rustls::TlsConnector::from(Arc::new(portcullis_tests::client::insecure_config(&[
            b"http/1.1",
        ])))
        .connect("self.test".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let der = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    assert!(
        der.windows(9).any(|w| w == b"self.test"),
        "the generated certificate does not name self.test"
    );
}

/// The certbot layout: archive/ holds numbered files, live/ holds symlinks to the current ones.
struct Certbot {
    dir: TempDir,
}

impl Certbot {
    fn new(ca: &TestCa) -> (Certbot, Vec<u8>) {
        let dir = TempDir::new("certbot");
        std::fs::create_dir_all(dir.path().join("archive")).unwrap();
        std::fs::create_dir_all(dir.path().join("live")).unwrap();
        let der = ca.issue(
            &dir.path().join("archive"),
            "cert1",
            &["localhost", "127.0.0.1"],
            None,
        );
        symlink(
            "../archive/cert1.pem",
            dir.path().join("live/fullchain.pem"),
        )
        .unwrap();
        symlink("../archive/cert1.key", dir.path().join("live/privkey.pem")).unwrap();
        (Certbot { dir }, der)
    }

    fn live(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join("live").join(name)
    }

    /// Points live/NAME at archive/TARGET atomically (a new symlink renamed over the old one).
    fn flip(&self, name: &str, target: &str) {
        let tmp = self.dir.path().join("live").join(format!(".{name}.new"));
        let _ = std::fs::remove_file(&tmp);
        symlink(format!("../archive/{target}"), &tmp).unwrap();
        std::fs::rename(&tmp, self.live(name)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certbot_renewal_under_load_fails_no_request() {
    let ca = TestCa::new();
    let (cb, first) = Certbot::new(&ca);
    let up = Upstream::tcp().await;
    let text = site_config(
        &up.addr_string(),
        "",
        "",
        &cb.live("fullchain.pem"),
        &cb.live("privkey.pem"),
    );
    let p = Portcullis::run(&cb.dir.write("p.toml", &text), &[]);
    assert!(p.ready, "{}", p.output());
    let addr = p.https_addr();
    let client = ca.client();
    assert_eq!(leaf(&client, addr, "localhost").await, Some(first.clone()));

    // Clients 1 and 2: a new TLS connection per request, and one keep-alive connection.
    let load = Load::start(&client, addr).await;
    // Client 3: one long request in flight across the renewal.
    let long = {
        let c = client.clone();
        tokio::spawn(async move { c.get(addr, "/slow/4000").await })
    };

    tokio::time::sleep(Duration::from_millis(1000)).await;
    let second = ca.issue(
        &cb.dir.path().join("archive"),
        "cert2",
        &["localhost", "127.0.0.1"],
        None,
    );
    cb.flip("fullchain.pem", "cert2.pem");
    // Between the two flips the chain is new and the key old: that pair must never be served.
    tokio::time::sleep(Duration::from_millis(300)).await;
    cb.flip("privkey.pem", "cert2.key");
    let flipped = Instant::now();
    let mut seen = None;
    while flipped.elapsed() < Duration::from_secs(2) {
        if leaf(&client, addr, "localhost").await == Some(second.clone()) {
            seen = Some(flipped.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let res = long.await.unwrap();
    let (done, failures) = load.stop().await;
    assert!(
        seen.is_some(),
        "the new certificate was not served within 2 s; log:\n{}",
        p.output()
    );
    eprintln!(
        "new certificate served {:?} after the key flip; {} requests",
        seen.unwrap(),
        done
    );
    assert_eq!(res.status(), 200);
    assert_eq!(failures, 0, "requests failed during the renewal");
    assert!(done > 20);
    assert!(p.output().contains("certificate reloaded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pairs_are_refused_and_the_old_one_keeps_serving() {
    let ca = TestCa::new();
    let (cb, first) = Certbot::new(&ca);
    let up = Upstream::tcp().await;
    let text = site_config(
        &up.addr_string(),
        "",
        "",
        &cb.live("fullchain.pem"),
        &cb.live("privkey.pem"),
    );
    let p = Portcullis::run(&cb.dir.write("p.toml", &text), &[]);
    assert!(p.ready, "{}", p.output());
    let client = ca.client();
    let archive = cb.dir.path().join("archive");

    // A truncated key.
    let key = std::fs::read_to_string(archive.join("cert1.key")).unwrap();
    std::fs::write(archive.join("truncated.key"), &key[..key.len() / 2]).unwrap();
    cb.flip("privkey.pem", "truncated.key");
    p.wait_for_log(
        |l| l.contains("reload refused") && l.contains("no PKCS#8"),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|| panic!("no refusal logged:\n{}", p.output()));
    assert_eq!(
        leaf(&client, p.https_addr(), "localhost").await,
        Some(first.clone())
    );
    cb.flip("privkey.pem", "cert1.key");

    // A key that does not fit.
    ca.issue(&archive, "other", &["localhost"], None);
    cb.flip("privkey.pem", "other.key");
    p.wait_for_log(|l| l.contains("does not fit"), Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no mismatch logged:\n{}", p.output()));
    assert_eq!(
        leaf(&client, p.https_addr(), "localhost").await,
        Some(first.clone())
    );
    cb.flip("privkey.pem", "cert1.key");

    // An expired certificate.
    ca.issue(
        &archive,
        "old",
        &["localhost", "127.0.0.1"],
        Some((2020, 1, 1)),
    );
    cb.flip("fullchain.pem", "old.pem");
    cb.flip("privkey.pem", "old.key");
    p.wait_for_log(
        |l| l.contains("reload refused") && l.contains("expired"),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|| panic!("no expiry refusal logged:\n{}", p.output()));
    assert_eq!(
        leaf(&client, p.https_addr(), "localhost").await,
        Some(first)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_files_replaced_in_place() {
    let dir = TempDir::new("hup");
    let ca = TestCa::new();
    ca.issue(dir.path(), "site", &["localhost"], None);
    let up = Upstream::tcp().await;
    let text = site_config(
        &up.addr_string(),
        "",
        "",
        &dir.path().join("site.pem"),
        &dir.path().join("site.key"),
    );
    let p = Portcullis::run(&dir.write("p.toml", &text), &[]);
    assert!(p.ready, "{}", p.output());
    let second = ca.issue(dir.path(), "site", &["localhost"], None);
    p.signal("HUP");
    p.wait_for_log(
        |l| l.contains("reload on SIGHUP done"),
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(
        leaf(&ca.client(), p.https_addr(), "localhost").await,
        Some(second)
    );
}

/// Today + `days` as (year, month, day).
fn date_in(days: u64) -> (i32, u8, u8) {
    let d = (SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 86_400
        + days) as i64;
    let z = d + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year as i32, month as u8, day as u8)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_near_expiry_is_warned_about_at_start() {
    let dir = TempDir::new("expiry");
    let ca = TestCa::new();
    ca.issue(dir.path(), "soon", &["localhost"], Some(date_in(5)));
    let up = Upstream::tcp().await;
    let text = site_config(
        &up.addr_string(),
        "",
        "",
        &dir.path().join("soon.pem"),
        &dir.path().join("soon.key"),
    );
    let p = Portcullis::run(&dir.write("p.toml", &text), &[]);
    assert!(p.ready, "{}", p.output());
    assert!(
        p.output().contains("expires within 14 days"),
        "{}",
        p.output()
    );

    ca.issue(dir.path(), "gone", &["localhost"], Some((2020, 1, 1)));
    let text = site_config(
        &up.addr_string(),
        "",
        "",
        &dir.path().join("gone.pem"),
        &dir.path().join("gone.key"),
    );
    let mut p = Portcullis::run(&dir.write("p2.toml", &text), &[]);
    assert!(!p.ready);
    assert!(!p.wait().success());
    assert!(
        p.output().contains("expired on 2020-01-01"),
        "{}",
        p.output()
    );
}

/// `openssl ocsp` as a responder on loopback; killed on drop.
struct Responder(std::process::Child);

impl Drop for Responder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Portcullis serving `STEM.pem` and `STEM.key` from `dir` in front of `upstream`, ready.
fn serve_files(dir: &TempDir, upstream: &Upstream, stem: &str) -> Portcullis {
    let d = dir.path();
    let text = site_config(
        &upstream.addr_string(),
        "",
        "",
        &d.join(format!("{stem}.pem")),
        &d.join(format!("{stem}.key")),
    );
    let p = Portcullis::run(&dir.write("p.toml", &text), &[]);
    assert!(p.ready, "{}", p.output());
    p
}

/// An OCSP test CA made by openssl in `d` (`ca.pem`, `ca.key`) and an empty `index.txt`, the database
/// `openssl ocsp` answers from (with its `.attr`).
fn ocsp_ca(d: &Path) {
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=OCSP Test CA",
            "-days",
            "2",
        ],
    );
    std::fs::write(d.join("index.txt"), "").unwrap();
    // Several leaves share the subject CN=localhost.
    std::fs::write(d.join("index.txt.attr"), "unique_subject = no\n").unwrap();
}

/// A leaf for localhost with serial `serial` (hex) that names the responder on `port` in its AIA extension:
/// `STEM.pem` (leaf, then the CA) and `STEM.key` (mode 0600), listed as good in `index.txt`. Returns the
/// leaf's DER.
fn ocsp_leaf(d: &Path, stem: &str, serial: &str, port: u16) -> Vec<u8> {
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{stem}.key"),
            "-out",
            &format!("{stem}.csr"),
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        d.join("ext.cnf"),
        format!("subjectAltName=DNS:localhost,IP:127.0.0.1\nauthorityInfoAccess=OCSP;URI:http://127.0.0.1:{port}\nbasicConstraints=CA:FALSE\n"),
    )
    .unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{stem}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            &format!("0x{serial}"),
            "-out",
            &format!("{stem}.leaf.pem"),
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    let leaf = std::fs::read(d.join(format!("{stem}.leaf.pem"))).unwrap();
    std::fs::write(
        d.join(format!("{stem}.pem")),
        [leaf.clone(), std::fs::read(d.join("ca.pem")).unwrap()].concat(),
    )
    .unwrap();
    std::fs::set_permissions(
        d.join(format!("{stem}.key")),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let mut index = std::fs::read_to_string(d.join("index.txt")).unwrap();
    index.push_str(&format!(
        "V\t301231235959Z\t\t{serial}\tunknown\t/CN=localhost\n"
    ));
    std::fs::write(d.join("index.txt"), index).unwrap();
    let der = format!("{stem}.der");
    let pem = format!("{stem}.leaf.pem");
    openssl(d, &["x509", "-in", &pem, "-outform", "DER", "-out", &der]);
    std::fs::read(d.join(der)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ocsp_responses_are_fetched_verified_and_stapled() {
    let dir = TempDir::new("ocsp");
    let d = dir.path();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // A test CA, and a leaf that names the responder in its AIA extension.
    ocsp_ca(d);
    ocsp_leaf(d, "leaf", "1234ABCD", port);
    let mut responder = std::process::Command::new("openssl")
        .current_dir(d)
        .args([
            "ocsp",
            "-index",
            "index.txt",
            "-port",
            &port.to_string(),
            "-rsigner",
            "ca.pem",
            "-rkey",
            "ca.key",
            "-CA",
            "ca.pem",
            "-ignore_err",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Readiness: its "waiting for OCSP client connections" line (a probe connection would jam it: it
    // serves one connection at a time and waits on an empty one).
    let stderr = responder.stderr.take().unwrap();
    let _responder = Responder(responder);
    let ready = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stderr).lines();
        let found = lines
            .by_ref()
            .map_while(Result::ok)
            .any(|l| l.contains("waiting for OCSP client connections"));
        // Keep draining so the responder never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        found
    })
    .await
    .unwrap();
    assert!(ready, "openssl ocsp did not start");

    let upstream = Upstream::tcp().await;
    let p = serve_files(&dir, &upstream, "leaf");
    p.wait_for_log(
        |l| l.contains("OCSP response stapled"),
        Duration::from_secs(15),
    )
    .unwrap_or_else(|| panic!("nothing stapled:\n{}", p.output()));
    let text = s_client(
        p.https_addr(),
        &["-status", "-CAfile", d.join("ca.pem").to_str().unwrap()],
    );
    assert!(text.contains("OCSP Response Status: successful"), "{text}");
    assert!(text.contains("Cert Status: good"), "{text}");
}

/// An OCSP responder the test controls: each POST is answered by `openssl ocsp` run on the request (the CA
/// of `ocsp_ca` signs, from its `index.txt`), but every request that arrives before `release` is held
/// until then. Each arrival is announced on `arrived`.
struct HeldResponder {
    port: u16,
    arrived: tokio::sync::mpsc::UnboundedReceiver<()>,
    release: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl HeldResponder {
    async fn start(dir: &Path) -> HeldResponder {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, arrived) = tokio::sync::mpsc::unbounded_channel();
        let (release, released) = tokio::sync::watch::channel(false);
        let dir = dir.to_path_buf();
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (tx, released, dir, count) =
                    (tx.clone(), released.clone(), dir.clone(), count.clone());
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let (tx, mut released, dir, count) =
                                (tx.clone(), released.clone(), dir.clone(), count.clone());
                            async move {
                                let body = req.into_body().collect().await?.to_bytes();
                                let _ = tx.send(());
                                let _ = released.wait_for(|r| *r).await;
                                let n = count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                let (req, res) = (format!("req{n}.der"), format!("res{n}.der"));
                                std::fs::write(dir.join(&req), &body).unwrap();
                                let (d, out) = (dir.clone(), res.clone());
                                tokio::task::spawn_blocking(move || {
                                    openssl(
                                        &d,
                                        &[
                                            "ocsp",
                                            "-index",
                                            "index.txt",
                                            "-rsigner",
                                            "ca.pem",
                                            "-rkey",
                                            "ca.key",
                                            "-CA",
                                            "ca.pem",
                                            "-ndays",
                                            "1",
                                            "-reqin",
                                            &req,
                                            "-respout",
                                            &out,
                                        ],
                                    )
                                })
                                .await
                                .unwrap();
                                let der = std::fs::read(dir.join(res)).unwrap();
                                Ok::<_, hyper::Error>(
                                    http::Response::builder()
                                        .header("content-type", "application/ocsp-response")
                                        .body(Full::new(Bytes::from(der)))
                                        .unwrap(),
                                )
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        HeldResponder {
            port,
            arrived,
            release,
            task,
        }
    }

    /// Waits (a 20 s safety net) for the next request to arrive.
    async fn next_request(&mut self) {
        tokio::time::timeout(Duration::from_secs(20), self.arrived.recv())
            .await
            .expect("no OCSP request arrived")
            .unwrap();
    }
}

impl Drop for HeldResponder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Issue 10 item 6: the OCSP task read the certificate, fetched a staple, then stored a certificate built
/// from what it had read, putting the old leaf back over a reload that landed during the fetch. The
/// responder holds the fetch until the new files are served, then answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_during_a_slow_ocsp_fetch_keeps_the_new_certificate() {
    let dir = TempDir::new("ocsp-reload");
    let d = dir.path();
    let mut responder = HeldResponder::start(d).await;
    ocsp_ca(d);
    let old = ocsp_leaf(d, "old", "1234ABCD", responder.port);
    let new = ocsp_leaf(d, "new", "5678ABCD", responder.port);
    std::fs::copy(d.join("old.pem"), d.join("site.pem")).unwrap();
    std::fs::copy(d.join("old.key"), d.join("site.key")).unwrap();
    let upstream = Upstream::tcp().await;
    let p = serve_files(&dir, &upstream, "site");
    let client = Client::new(&std::fs::read_to_string(d.join("ca.pem")).unwrap());
    let addr = p.https_addr();

    // The fetch for the old leaf is in flight (held); the new pair replaces the files (renamed into
    // place, key first) and is reloaded and served meanwhile.
    responder.next_request().await;
    assert_eq!(leaf(&client, addr, "localhost").await, Some(old));
    for (from, to) in [("new.key", "site.key"), ("new.pem", "site.pem")] {
        std::fs::copy(d.join(from), d.join("next.tmp")).unwrap();
        std::fs::rename(d.join("next.tmp"), d.join(to)).unwrap();
    }
    tokio::task::block_in_place(|| {
        p.wait_for_log(
            |l| l.contains("certificate reloaded"),
            Duration::from_secs(10),
        )
    })
    .unwrap_or_else(|| panic!("no reload:\n{}", p.output()));
    assert_eq!(leaf(&client, addr, "localhost").await, Some(new.clone()));

    // Answered now: the response is for the old leaf, which must not come back; the new leaf gets its own.
    responder.release.send_replace(true);
    tokio::task::block_in_place(|| {
        p.wait_for_log(
            |l| l.contains("OCSP response stapled"),
            Duration::from_secs(20),
        )
    })
    .unwrap_or_else(|| panic!("nothing stapled:\n{}", p.output()));
    assert_eq!(
        leaf(&client, addr, "localhost").await,
        Some(new),
        "the old certificate is served again:\n{}",
        p.output()
    );
    let text = s_client(
        addr,
        &["-status", "-CAfile", d.join("ca.pem").to_str().unwrap()],
    );
    assert!(text.contains("Serial Number: 5678ABCD"), "{text}");
    assert!(text.contains("Cert Status: good"), "{text}");
}
