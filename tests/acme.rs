//! Issue 6: ACME against a real ACME server (Pebble, real validation). The first certificate by HTTP-01 and
//! by TLS-ALPN-01 (and how fast: start with an empty state_dir to the first HTTPS response with the issued
//! certificate), renewal swapped in under load with zero failed requests, the CA unreachable at start (the
//! bootstrap certificate serves, retries back off, SIGHUP retries), a restart reusing the stored account and
//! certificate without a new order, a second instance sharing state_dir ordering nothing while the first
//! holds the lock, a self-check that refuses to order for a name this instance does not answer, and a site
//! added by a config reload ordering its certificate while the other keeps its own.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step should fail the test loudly

#[path = "acme/pebble.rs"]
mod pebble;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use pebble::{Options, Pebble, free_port};
use portcullis_tests::client::fresh_get;
use portcullis_tests::load::Load;
use portcullis_tests::{Portcullis, TempDir, Upstream};

/// Generous safety limits (never expected to be reached): the figure is printed, not asserted tightly.
const LIMIT: Duration = Duration::from_secs(20);

struct Setup<'a> {
    pebble: &'a Pebble,
    state: &'a Path,
    upstream: &'a Upstream,
    https: u16,
    /// None: no plain-HTTP listener.
    http: Option<u16>,
    challenge: &'a str,
    validation_port: u16,
    extra: &'a str,
}

impl Setup<'_> {
    fn config(&self) -> String {
        format!(
            r#"names = ["localhost"]

[listen]
https = ["127.0.0.1:{}"]
http = [{}]

[tls]
acme = true

[[route]]
path = "/"
upstream = "app"

[upstream.app]
servers = ["{}"]

[acme]
email = "ops@example.com"
directory = "{}"
ca_root = "{}"
state_dir = "{}"
challenge = "{}"
validation_port = {}
{}
"#,
            self.https,
            self.http
                .map_or(String::new(), |p| format!("\"127.0.0.1:{p}\"")),
            self.upstream.addr_string(),
            self.pebble.directory,
            self.pebble.api_ca.display(),
            self.state.display(),
            self.challenge,
            self.validation_port,
            self.extra
        )
    }
}

/// The leaf served for SNI `localhost`, trusting anything (the bootstrap certificate is self-signed).
async fn any_leaf(addr: SocketAddr) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls =
        tokio_rustls::TlsConnector::from(Arc::new(portcullis_tests::client::insecure_config(&[
            b"http/1.1",
        ])))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// A plain-HTTP GET: status and Location.
async fn http_get(addr: SocketAddr, path: &str) -> (u16, Option<String>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let res = send
        .send_request(
            Request::get(path)
                .header("host", "localhost")
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap();
    let location = res
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_owned());
    (res.status().as_u16(), location)
}

fn wait(p: &Portcullis, what: &str) -> String {
    p.wait_for_log(|l| l.contains(what), LIMIT)
        .unwrap_or_else(|| panic!("no {what:?} in the log:\n{}", p.output()))
}

/// Every folder under `dir` is 0700 and every file 0600.
fn assert_private(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        if path.is_dir() {
            assert_eq!(mode, 0o700, "{}", path.display());
            assert_private(&path);
        } else {
            assert_eq!(mode, 0o600, "{}", path.display());
        }
    }
}

/// "retrying in 118s" -> 118.
fn retry_secs(line: &str) -> u64 {
    let rest = &line[line.find("retrying in ").unwrap() + "retrying in ".len()..];
    rest[..rest.find('s').unwrap()].parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_certificate_by_http01_is_served_stored_and_reported() {
    let (https, http) = (free_port(), free_port());
    let pebble = Pebble::start(Options::new(http, https));
    let dir = TempDir::new("acme-http01");
    let state = dir.path().join("state");
    let upstream = Upstream::tcp().await;
    let setup = Setup {
        pebble: &pebble,
        state: &state,
        upstream: &upstream,
        https,
        http: Some(http),
        challenge: "http-01",
        validation_port: http,
        extra: "",
    };
    let config = dir.write("p.toml", &setup.config());
    let client = pebble.client().await;

    let started = Instant::now();
    let p = Portcullis::run(&config, &[]);
    assert!(p.ready, "{}", p.output());
    wait(&p, "ACME certificate installed");
    let (status, leaf) = fresh_get(&client, p.https_addr()).await.unwrap();
    let took = started.elapsed();
    assert_eq!(status, 200);
    eprintln!(
        "FIGURE http-01: {:.3} s from start (empty state_dir) to the first HTTPS response with the CA's certificate",
        took.as_secs_f64()
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(leaf.windows(9).any(|w| w == b"localhost"));
    let out = p.output();
    assert!(
        out.contains("ACME account created") && out.contains("issuer=CN=Pebble Intermediate"),
        "{out}"
    );
    assert_eq!(pebble.orders(), 1);

    // The :80 listener still redirects everything that is not a pending challenge.
    let http_addr = p.http_addr();
    assert_eq!(
        http_get(http_addr, "/x?y").await,
        (301, Some(format!("https://localhost:{https}/x?y")))
    );
    assert_eq!(
        http_get(http_addr, "/.well-known/acme-challenge/unknown")
            .await
            .0,
        301
    );

    // Account, certificate and key on disk, private; no temp file left.
    assert_private(&state);
    let site = state.join(pebble.state_folder()).join("sites/localhost");
    assert!(
        site.join("fullchain.pem").is_file() && site.join("privkey.pem").is_file(),
        "{}",
        site.display()
    );

    // `portcullis check` reports the account, the expiry and the next renewal.
    let check = std::process::Command::new(portcullis_tests::binary())
        .args(["check", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(
        stdout.contains("acme         account https://127.0.0.1:"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        stdout.contains("expires") && stdout.contains("renewal at"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_certificate_by_tls_alpn01_with_bad_nonces_retried() {
    let https = free_port();
    // Pebble's default: 5 % of good nonces rejected, which instant-acme retries.
    let pebble = Pebble::start(Options {
        reject_nonces: true,
        ..Options::new(free_port(), https)
    });
    let dir = TempDir::new("acme-alpn");
    let state = dir.path().join("state");
    let upstream = Upstream::tcp().await;
    let setup = Setup {
        pebble: &pebble,
        state: &state,
        upstream: &upstream,
        https,
        http: None,
        challenge: "tls-alpn-01",
        validation_port: https,
        extra: "",
    };
    let config = dir.write("p.toml", &setup.config());
    let client = pebble.client().await;

    let started = Instant::now();
    let p = Portcullis::run(&config, &[]);
    assert!(p.ready, "{}", p.output());
    wait(&p, "ACME certificate installed");
    let (status, _) = fresh_get(&client, p.https_addr()).await.unwrap();
    eprintln!(
        "FIGURE tls-alpn-01: {:.3} s from start (empty state_dir) to the first HTTPS response with the CA's certificate",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(status, 200);
    assert!(
        p.output().contains("challenge=\"tls-alpn-01\""),
        "{}",
        p.output()
    );
    assert_eq!(pebble.orders(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_under_load_swaps_in_with_no_failed_request() {
    let (https, http) = (free_port(), free_port());
    // Nine-second certificates: renewed two thirds in, about six seconds after the first.
    let pebble = Pebble::start(Options {
        validity: Some(9),
        ..Options::new(http, https)
    });
    let dir = TempDir::new("acme-renew");
    let state = dir.path().join("state");
    let upstream = Upstream::tcp().await;
    let setup = Setup {
        pebble: &pebble,
        state: &state,
        upstream: &upstream,
        https,
        http: Some(http),
        challenge: "http-01",
        validation_port: http,
        extra: "",
    };
    let p = Portcullis::run(&dir.write("p.toml", &setup.config()), &[]);
    assert!(p.ready, "{}", p.output());
    wait(&p, "ACME certificate installed");
    let client = pebble.client().await;
    let addr = p.https_addr();
    let (_, first) = fresh_get(&client, addr).await.unwrap();

    // A new verified TLS connection per request, and one keep-alive connection, both through the renewal.
    let load = Load::start(&client, addr).await;
    let serial = |l: &str| {
        l.split("serial=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .map(str::to_owned)
    };
    let first_serial = serial(&wait(&p, "ACME certificate installed")).unwrap();
    let renewed = tokio::task::block_in_place(|| {
        p.wait_for_log(
            |l| {
                l.contains("ACME certificate installed")
                    && serial(l).as_deref() != Some(first_serial.as_str())
            },
            LIMIT,
        )
    });
    assert!(
        renewed.is_some(),
        "no renewal within {LIMIT:?}:\n{}",
        p.output()
    );
    let (_, second) = fresh_get(&client, addr).await.unwrap();
    let (n, failures) = load.stop().await;
    assert_ne!(first, second, "the renewed certificate is not served");
    assert_eq!(failures, 0, "requests failed during the renewal");
    eprintln!("{n} requests across the renewal, none failed");
    assert!(n > 20);
    assert_eq!(pebble.orders(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_unreachable_at_start_serves_the_bootstrap_and_backs_off() {
    let (https, http) = (free_port(), free_port());
    // Configured, not running: the directory URL refuses connections.
    let mut pebble = Pebble::new(Options::new(http, https));
    let dir = TempDir::new("acme-down");
    let state = dir.path().join("state");
    let upstream = Upstream::tcp().await;
    let setup = Setup {
        pebble: &pebble,
        state: &state,
        upstream: &upstream,
        https,
        http: Some(http),
        challenge: "http-01",
        validation_port: http,
        extra: "",
    };
    let p = Portcullis::run(&dir.write("p.toml", &setup.config()), &[]);
    assert!(p.ready, "{}", p.output());
    let first = wait(&p, "ACME attempt failed");
    assert!(
        first.contains("Connection refused") || first.contains("onnect"),
        "the CA's error is logged: {first}"
    );
    let delay1 = retry_secs(&first);
    assert!((100..=140).contains(&delay1), "{first}");

    // The site serves from the first second: its self-signed bootstrap certificate.
    let bootstrap = any_leaf(p.https_addr()).await;
    assert!(
        p.output()
            .contains("serving a self-signed certificate until the first ACME certificate")
    );

    // SIGHUP retries at once; the CA is still down, and the next wait is about twice as long.
    p.signal("HUP");
    let second = p
        .wait_for_log(
            |l| l.contains("ACME attempt failed") && l.contains("failures=2"),
            LIMIT,
        )
        .unwrap_or_else(|| panic!("{}", p.output()));
    let delay2 = retry_secs(&second);
    assert!(
        delay2 > delay1 && (200..=280).contains(&delay2),
        "{delay1} then {delay2}"
    );
    assert_eq!(
        p.lines()
            .iter()
            .filter(|l| l.contains("ACME attempt failed"))
            .count(),
        2,
        "no tight loop"
    );
    assert!(
        state
            .join(pebble.state_folder())
            .join("sites/localhost/retry.json")
            .is_file()
    );

    // The CA comes up; SIGHUP: the certificate arrives and replaces the bootstrap one.
    pebble.run();
    p.signal("HUP");
    wait(&p, "ACME certificate installed");
    let (status, leaf) = fresh_get(&pebble.client().await, p.https_addr())
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_ne!(leaf, bootstrap);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_reuses_the_stored_account_and_certificate_without_a_new_order() {
    let (https, http) = (free_port(), free_port());
    let pebble = Pebble::start(Options::new(http, https));
    let dir = TempDir::new("acme-restart");
    let state = dir.path().join("state");
    let upstream = Upstream::tcp().await;
    let setup = Setup {
        pebble: &pebble,
        state: &state,
        upstream: &upstream,
        https,
        http: Some(http),
        challenge: "http-01",
        validation_port: http,
        extra: "",
    };
    let config = dir.write("p.toml", &setup.config());
    let client = pebble.client().await;

    let mut p = Portcullis::run(&config, &[]);
    assert!(p.ready, "{}", p.output());
    wait(&p, "ACME certificate installed");
    let (_, first) = fresh_get(&client, p.https_addr()).await.unwrap();
    p.signal("TERM");
    assert!(p.wait().success());

    let p = Portcullis::run(&config, &[]);
    assert!(p.ready, "{}", p.output());
    assert!(
        p.output().contains("serving the stored ACME certificate"),
        "{}",
        p.output()
    );
    let (_, again) = fresh_get(&client, p.https_addr()).await.unwrap();
    assert_eq!(again, first, "the stored certificate serves from the start");
    // The stored account is restored (to ask the CA about renewal), never created again.
    wait(&p, "ACME account restored from state_dir");
    wait(&p, "next ACME attempt scheduled");
    let out = p.output();
    assert!(
        !out.contains("ACME account created") && !out.contains("ACME order"),
        "{out}"
    );
    assert_eq!(
        (pebble.orders(), pebble.accounts()),
        (1, 1),
        "one order and one account in all"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_sharing_state_dir_orders_nothing() {
    let (https, http) = (free_port(), free_port());
    // Validation after a random 0-2 s sleep: the first instance holds the lock for a while.
    let pebble = Pebble::start(Options {
        nosleep: false,
        sleep_time: Some(3),
        ..Options::new(http, https)
    });
    let dir = TempDir::new("acme-lock");
    let state = dir.path().join("state");
    let upstream = Upstream::tcp().await;
    let a = Setup {
        pebble: &pebble,
        state: &state,
        upstream: &upstream,
        https,
        http: Some(http),
        challenge: "http-01",
        validation_port: http,
        extra: "",
    };
    let pa = Portcullis::run(&dir.write("a.toml", &a.config()), &[]);
    assert!(pa.ready, "{}", pa.output());
    wait(&pa, "ACME order");
    // Without the lock, the second would order too (its self-check is off, so nothing else stops it).
    let b = Setup {
        https: free_port(),
        http: Some(free_port()),
        extra: "self_check = false",
        ..a
    };
    let pb = Portcullis::run(&dir.write("b.toml", &b.config()), &[]);
    assert!(pb.ready, "{}", pb.output());
    wait(&pa, "ACME certificate installed");
    let took_over = pb
        .wait_for_log(
            |l| {
                l.contains("another instance stored a newer certificate")
                    || l.contains("serving the stored ACME certificate")
            },
            LIMIT,
        )
        .unwrap_or_else(|| panic!("{}", pb.output()));
    eprintln!(
        "second instance: {took_over}; waited on the lock: {}",
        pb.output()
            .contains("another instance is ordering these names")
    );
    let client = pebble.client().await;
    let (_, leaf_a) = fresh_get(&client, pa.https_addr()).await.unwrap();
    let (_, leaf_b) = fresh_get(&client, pb.https_addr()).await.unwrap();
    assert_eq!(leaf_a, leaf_b, "both serve the one certificate");
    assert!(!pb.output().contains("ACME order"), "{}", pb.output());
    assert_eq!(pebble.orders(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_answered_by_another_server_fails_the_self_check_and_orders_nothing() {
    let (https, http) = (free_port(), free_port());
    let pebble = Pebble::start(Options::new(http, https));
    let dir = TempDir::new("acme-selfcheck");
    let state = dir.path().join("state");
    let upstream = Upstream::tcp().await;
    // The CA would reach another server (the upstream), not this instance.
    let elsewhere: u16 = upstream
        .addr_string()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let setup = Setup {
        pebble: &pebble,
        state: &state,
        upstream: &upstream,
        https,
        http: Some(http),
        challenge: "http-01",
        validation_port: elsewhere,
        extra: "",
    };
    let p = Portcullis::run(&dir.write("p.toml", &setup.config()), &[]);
    assert!(p.ready, "{}", p.output());
    let failed = wait(&p, "ACME attempt failed");
    assert!(
        failed.contains("self-check failed, nothing ordered")
            && failed.contains("answered by another server"),
        "{failed}"
    );
    assert_eq!(pebble.orders(), 0, "no order, so no failed authorization");
}

/// Issue 14: ACME sites change with a config reload. The process starts with `[acme]` and no ACME site;
/// a reload that adds one starts ACME and its order (the certificate is then served for its name); one
/// that turns the default site to ACME orders for it while the first keeps its certificate and orders
/// nothing; one that removes a site ends its task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_sites_added_by_sighup_get_their_certificates_and_the_others_keep_theirs() {
    let (https, http) = (free_port(), free_port());
    let pebble = Pebble::start(Options::new(http, https));
    let dir = TempDir::new("acme-add");
    let state = dir.path().join("state");
    let upstream = Upstream::tcp().await;
    let setup = Setup {
        pebble: &pebble,
        state: &state,
        upstream: &upstream,
        https,
        http: Some(http),
        challenge: "http-01",
        validation_port: http,
        // Pebble's DNS answers 127.0.0.1 for new.test; this machine's resolver does not know the name.
        extra: "self_check = false",
    };
    let acme_default = setup.config();
    let self_signed = acme_default.replacen("acme = true", "self_signed = true", 1);
    let new_site = "\n[[site]]\nnames = [\"new.test\"]\ntls = { acme = true }\n  [[site.route]]\n  path = \"/\"\n  upstream = \"app\"\n";
    let config = dir.write("p.toml", &self_signed);
    let client = pebble.client().await;
    let p = Portcullis::run(&config, &[]);
    assert!(p.ready, "{}", p.output());
    let reload = |text: &str, n: usize| {
        dir.write("p.toml", text);
        p.signal("HUP");
        p.wait_for_nth(|l| l.contains("config reloaded"), n, LIMIT)
            .unwrap_or_else(|| panic!("no reload {n}:\n{}", p.output()))
    };
    let installed = |n: usize| {
        p.wait_for_nth(|l| l.contains("ACME certificate installed"), n, LIMIT)
            .unwrap_or_else(|| panic!("no certificate {n}:\n{}", p.output()))
    };

    // 1. The first ACME site: ACME starts with it.
    let line = reload(&format!("{self_signed}{new_site}"), 1);
    assert!(
        line.contains("sites_added=1") && line.contains("sites_kept=1"),
        "{line}"
    );
    assert!(
        !line.contains("acme"),
        "[acme] applied, not refused: {line}"
    );
    assert!(installed(1).contains("new.test"));
    let new_leaf = {
        let tls = client
            .tls_with(p.https_addr(), "new.test", client.config(&[b"http/1.1"]))
            .await;
        let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get("/new").header("host", "new.test");
        let res = send
            .send_request(req.body(Full::<Bytes>::default()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(upstream.last().headers["host"], "new.test");
        leaf
    };
    assert!(new_leaf.windows(8).any(|w| w == b"new.test"));
    assert_eq!(pebble.orders(), 1);

    // 2. The default site turns to ACME (another certificate source: a new site); new.test is kept.
    let line = reload(&format!("{acme_default}{new_site}"), 2);
    assert!(
        line.contains("sites_added=1") && line.contains("sites_kept=1"),
        "{line}"
    );
    assert!(installed(2).contains("localhost"));
    let (status, _) = fresh_get(&client, p.https_addr()).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(any_leaf_for(p.https_addr(), "new.test").await, new_leaf);
    // The reload's SIGHUP is "retry now" only to a site waiting on a retry: new.test orders nothing.
    assert_eq!(pebble.orders(), 2, "new.test kept its certificate");

    // 3. new.test goes: its task ends; localhost is kept.
    let line = reload(&acme_default, 3);
    assert!(
        line.contains("sites_removed=1") && line.contains("sites_kept=1"),
        "{line}"
    );
    let ended = wait(&p, "its ACME task ends");
    assert!(ended.contains("new.test"), "{ended}");
    assert_eq!(fresh_get(&client, p.https_addr()).await.unwrap().0, 200);
    assert_eq!(pebble.orders(), 2);
}

/// The leaf served for SNI `name`, trusting anything.
async fn any_leaf_for(addr: SocketAddr, name: &str) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls =
        tokio_rustls::TlsConnector::from(Arc::new(portcullis_tests::client::insecure_config(&[
            b"http/1.1",
        ])))
        .connect(name.to_owned().try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}
