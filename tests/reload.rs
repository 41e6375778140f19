//! Issue 14, config hot reload: SIGHUP re-reads the config file. Under load, a route and an upstream change
//! with no failed request, and new requests go where the new config says once `config reloaded` is
//! logged; a WebSocket opened before keeps working on its old upstream; a broken config changes nothing
//! and says where it is broken (`FILE:LINE:COL`); a changed listener address is reported as needing a
//! restart while the rest applies; sites change live (added with their certificate and routes, removed
//! while their requests in flight finish, renamed; a new site whose certificate cannot be loaded refuses
//! the reload whole), over HTTP/1.1 and HTTP/2; a rate limit the reload does not touch keeps its counts; systemd hears
//! `RELOADING=1` with `MONOTONIC_USEC`, then `READY=1`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis_tests::client::{insecure_config, read_until};
use portcullis_tests::load::Load;
use portcullis_tests::{Portcullis, Setup, TempDir, TestCa, Upstream, config};
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;

const UPGRADE: &[u8] = b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// A safety net for each wait on the log, not a timing assertion.
const LIMIT: Duration = Duration::from_secs(20);

/// Writes the config `text` over the running one, sends SIGHUP, and waits for reload number `n` (counted
/// from 1) to be logged as done or failed; returns that line.
/// `[process]` allowing the sandbox to connect to `b`, which a reload will move traffic to (the sandbox
/// set at start allows only the ports the config names, and these: tests/sandbox.rs).
fn allow(b: &Upstream) -> String {
    let port = b.addr_string().rsplit(':').next().unwrap().to_owned();
    format!("[process]\nsandbox_connect_ports = [{port}]\n")
}

fn reload(s: &Setup, text: &str, n: usize) -> String {
    s.dir.write("portcullis.toml", text);
    s.proxy.signal("HUP");
    wait_reload(&s.proxy, n)
}

fn wait_reload(p: &Portcullis, n: usize) -> String {
    let done = |l: &str| l.contains("config reloaded") || l.contains("config reload failed");
    p.wait_for_nth(done, n, LIMIT)
        .unwrap_or_else(|| panic!("reload {n} not logged; log:\n{}", p.output()))
}

/// Which of `a` and `b` received a request for `target`.
fn who_got(target: &str, a: &Upstream, b: &Upstream) -> (bool, bool) {
    let got = |u: &Upstream| u.requests().iter().any(|r| r.target == target);
    (got(a), got(b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_and_an_upstream_change_under_load_with_no_failed_request() {
    let b = Upstream::tcp().await;
    let s = Setup::new("", &allow(&b)).await;
    let a = &s.upstream;
    // v1: everything to A. v2: `/` to B (the same group, a new server) and a new route `/new/` to a new
    // group, also on B.
    let v1 = config(&s.pki, &a.addr_string(), "");
    let v2 = config(
        &s.pki,
        &b.addr_string(),
        &format!(
            "[[route]]\npath = \"/new/\"\nupstream = \"web\"\n\n[upstream.web]\nservers = [\"{}\"]\n",
            b.addr_string()
        ),
    );
    assert_eq!(s.client.get(s.https(), "/new/before").await.status(), 200);
    assert_eq!(who_got("/new/before", a, &b), (true, false));

    // Four clients: two on a new TLS connection per request, two on one keep-alive connection each.
    let loads = [
        Load::start(&s.client, s.https()).await,
        Load::start(&s.client, s.https()).await,
    ];
    // Three reloads while they run: to v2, back to v1, to v2 again.
    let mut n = 0;
    for (text, to_b) in [(&v2, true), (&v1, false), (&v2, true)] {
        for i in 0..10 {
            let res = s.client.get(s.https(), &format!("/during/{n}/{i}")).await;
            assert_eq!(res.status(), 200);
        }
        n += 1;
        let line = reload(&s, text, n);
        assert!(line.contains("config reloaded"), "{line}");
        // Every request that starts after the line goes where the new config says.
        for i in 0..5 {
            let target = format!("/after/{n}/{i}");
            assert_eq!(s.client.get(s.https(), &target).await.status(), 200);
            let expected = if to_b { (false, true) } else { (true, false) };
            assert_eq!(who_got(&target, a, &b), expected, "{target}; line: {line}");
            let target = format!("/new/{n}/{i}");
            assert_eq!(s.client.get(s.https(), &target).await.status(), 200);
            // `/new/` is its own route on B in v2; in v1 `/` takes it to A.
            assert_eq!(who_got(&target, a, &b), expected, "{target}");
        }
    }
    let mut done = 0;
    for l in loads {
        let (ok, failed) = l.stop().await;
        assert_eq!(
            failed,
            0,
            "requests failed during the reloads; log:\n{}",
            s.proxy.output()
        );
        done += ok;
    }
    assert!(done > 0);
    // The last swap retired A (v2 names only B): the summary says so.
    let last = wait_reload(&s.proxy, 3);
    assert!(last.contains("servers_retired=1"), "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_opened_before_a_reload_keeps_working_after_it() {
    let b = Upstream::tcp().await;
    let s = Setup::new("", &allow(&b)).await;
    let mut tls = s.client.tls(s.https(), &[b"http/1.1"]).await;
    tls.write_all(UPGRADE).await.unwrap();
    tls.flush().await.unwrap();
    let head = read_until(&mut tls, "\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    echo(&mut tls, "before").await;

    // The upstream the tunnel goes to is no longer in the config at all.
    let line = reload(&s, &config(&s.pki, &b.addr_string(), ""), 1);
    assert!(line.contains("config reloaded"), "{line}");
    assert_eq!(s.client.get(s.https(), "/after").await.status(), 200);
    assert_eq!(who_got("/after", &s.upstream, &b), (false, true));
    for i in 0..5 {
        echo(&mut tls, &format!("after {i};")).await;
    }
}

async fn echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(tls: &mut S, text: &str) {
    tls.write_all(text.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let got = read_until(tls, text).await;
    assert!(got.contains(text), "sent {text:?}, got {got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_on_reload_changes_nothing_and_says_where() {
    let b = Upstream::tcp().await;
    let s = Setup::new("", &allow(&b)).await;
    // Good TOML, one key misspelt and one value wrong: both are reported.
    let broken = config(
        &s.pki,
        &b.addr_string(),
        "[[route]]\npath = \"/x/\"\nupstreem = \"app\"\n\n[timeouts]\nclient_idle = \"soon\"\n",
    );
    let line = reload(&s, &broken, 1);
    assert!(line.contains("config reload failed"), "{line}");
    let file = s.dir.path().join("portcullis.toml").display().to_string();
    let located = s
        .proxy
        .lines()
        .into_iter()
        .filter(|l| {
            l.split_once(&format!("{file}:")).is_some_and(|(_, rest)| {
                let mut parts = rest.splitn(3, ':');
                let line = parts.next().unwrap_or("");
                let col = parts.next().unwrap_or("");
                !line.is_empty()
                    && line.chars().all(|c| c.is_ascii_digit())
                    && !col.is_empty()
                    && col.chars().all(|c| c.is_ascii_digit())
            })
        })
        .count();
    assert!(
        located >= 1,
        "no FILE:LINE:COL problem logged:\n{}",
        s.proxy.output()
    );
    // The old config still serves: `/` to the first upstream.
    assert_eq!(s.client.get(s.https(), "/still").await.status(), 200);
    assert_eq!(who_got("/still", &s.upstream, &b), (true, false));

    // A good config afterwards applies.
    let line = reload(&s, &config(&s.pki, &b.addr_string(), ""), 2);
    assert!(line.contains("config reloaded"), "{line}");
    assert_eq!(s.client.get(s.https(), "/fixed").await.status(), 200);
    assert_eq!(who_got("/fixed", &s.upstream, &b), (false, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_listener_address_needs_a_restart_and_the_rest_applies() {
    let b = Upstream::tcp().await;
    let s = Setup::new("", &allow(&b)).await;
    let moved = config(&s.pki, &b.addr_string(), "").replacen(
        "https = [\"127.0.0.1:0\"]",
        "https = [\"127.0.0.2:0\"]",
        1,
    );
    let line = reload(&s, &moved, 1);
    assert!(line.contains("config reloaded"), "{line}");
    assert!(line.contains("listen.https"), "{line}");
    assert!(
        s.proxy
            .output()
            .contains("listen.https changed: restart to apply"),
        "{}",
        s.proxy.output()
    );
    // The listener it had keeps serving, with the new upstream.
    assert_eq!(s.client.get(s.https(), "/same-port").await.status(), 200);
    assert_eq!(who_got("/same-port", &s.upstream, &b), (false, true));
}

/// A connection made with SNI `sni` by a client that takes any certificate (which one is shown is what these
/// tests look at), speaking HTTP/2 or HTTP/1.1; each request on it says `Host: sni` (`:authority` on h2).
enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Conn {
    /// The connection and the leaf the handshake showed.
    async fn open(addr: SocketAddr, sni: &str, h2: bool) -> (Conn, Vec<u8>) {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
        let tls = tokio_rustls::TlsConnector::from(Arc::new(insecure_config(alpn)))
            .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
            .await
            .unwrap();
        let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        let io = TokioIo::new(tls);
        let conn = if h2 {
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            Conn::H2(send)
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            Conn::H1(send)
        };
        (conn, leaf)
    }

    /// GET `path` for `host`: the status and the body.
    async fn get(&mut self, host: &str, path: &str) -> (u16, Bytes) {
        let res = match self {
            Conn::H1(send) => {
                send.ready().await.unwrap();
                let req = Request::get(path).header("host", host);
                send.send_request(req.body(Full::default()).unwrap()).await
            }
            Conn::H2(send) => {
                send.ready().await.unwrap();
                let req = Request::get(format!("https://{host}{path}"));
                send.send_request(req.body(Full::default()).unwrap()).await
            }
        }
        .unwrap();
        let status = res.status().as_u16();
        (status, res.into_body().collect().await.unwrap().to_bytes())
    }
}

/// One GET on a new connection with SNI and Host `name`: the leaf shown and the status.
async fn get_as(addr: SocketAddr, name: &str, h2: bool, path: &str) -> (Vec<u8>, u16) {
    let (mut conn, leaf) = Conn::open(addr, name, h2).await;
    (leaf, conn.get(name, path).await.0)
}

/// Asserts that a GET for `target` on a new connection as `name` (SNI and Host), HTTP/2 or HTTP/1.1, is
/// shown `leaf`, answered 200, and reached `b` (`to_b`) or the setup's own upstream.
async fn served(
    s: &Setup,
    b: &Upstream,
    name: &str,
    h2: bool,
    target: &str,
    leaf: &[u8],
    to_b: bool,
) {
    let got = get_as(s.https(), name, h2, target).await;
    assert_eq!(got, (leaf.to_vec(), 200), "{name}{target} h2={h2}");
    assert_eq!(
        who_got(target, &s.upstream, b),
        (!to_b, to_b),
        "{name}{target} h2={h2}"
    );
}

/// A `[[site]]` for `names` with the certificate `dir/stem.pem` + `dir/stem.key` and one route `/` to
/// the upstream `up`, defined at `addr`.
fn site(names: &[&str], dir: &Path, stem: &str, up: &str, addr: &str) -> String {
    let names: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    format!(
        "[[site]]\nnames = [{}]\ntls = {{ cert = \"{}\", key = \"{}\" }}\n  [[site.route]]\n  path = \"/\"\n  upstream = \"{up}\"\n\n[upstream.{up}]\nservers = [\"{addr}\"]\n",
        names.join(", "),
        dir.join(format!("{stem}.pem")).display(),
        dir.join(format!("{stem}.key")).display(),
    )
}

/// The leaf of the default site (the one Setup's config serves for `localhost`).
async fn default_leaf(s: &Setup) -> Vec<u8> {
    Conn::open(s.https(), "localhost", false).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_added_by_sighup_serves_its_certificate_and_its_routes() {
    let b = Upstream::tcp().await;
    let s = Setup::new("", &allow(&b)).await;
    let a = &s.upstream;
    // Beneath the config's folder, which the sandbox set at start allows (a folder it does not allow
    // needs a restart: tests/sandbox.rs).
    let certs = s.dir.path().join("site-b");
    std::fs::create_dir(&certs).unwrap();
    let b_leaf = TestCa::new().issue(&certs, "b", &["b.test"], None);
    let default = default_leaf(&s).await;
    // Before: b.test is an unknown name, served by the default site.
    served(&s, &b, "b.test", false, "/before", &default, false).await;

    let with_b = config(
        &s.pki,
        &a.addr_string(),
        &site(&["b.test"], &certs, "b", "b", &b.addr_string()),
    );
    let line = reload(&s, &with_b, 1);
    assert!(line.contains("config reloaded"), "{line}");
    assert!(
        line.contains("sites_added=1") && line.contains("sites_kept=1"),
        "{line}"
    );
    for h2 in [false, true] {
        let target = format!("/added/{h2}");
        served(&s, &b, "b.test", h2, &target, &b_leaf, true).await;
        assert_eq!(b.last().headers["host"], "b.test");
        // The default site is as it was.
        let target = format!("/default/{h2}");
        served(&s, &b, "localhost", h2, &target, &default, false).await;
    }

    // Its certificate files are followed like those of the sites there at start: replaced, they are
    // reloaded without a SIGHUP.
    s.proxy
        .wait_for_log(|l| l.contains("reload on SIGHUP done"), LIMIT)
        .unwrap();
    let b_renewed = TestCa::new().issue(&certs, "b", &["b.test"], None);
    let reloaded = |l: &str| l.contains("certificate reloaded") && l.contains("site=1");
    // One `certificate reloaded` line for site 1 came from the SIGHUP's pass over every pair.
    s.proxy
        .wait_for_nth(reloaded, 2, LIMIT)
        .unwrap_or_else(|| panic!("b's new files not reloaded:\n{}", s.proxy.output()));
    served(&s, &b, "b.test", true, "/renewed", &b_renewed, true).await;

    // Its routes change like any other; the site itself is kept, certificate and all.
    let routed_to_a = with_b.replace("upstream = \"b\"", "upstream = \"app\"");
    let line = reload(&s, &routed_to_a, 2);
    assert!(
        line.contains("sites_kept=2") && line.contains("sites_added=0"),
        "{line}"
    );
    for h2 in [false, true] {
        let target = format!("/rerouted/{h2}");
        served(&s, &b, "b.test", h2, &target, &b_renewed, false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_removed_by_sighup_is_an_unknown_name_while_its_open_requests_finish() {
    let b = Upstream::tcp().await;
    let certs = TempDir::new("site-b");
    let b_leaf = TestCa::new().issue(certs.path(), "b", &["b.test"], None);
    let b_site = site(&["b.test"], certs.path(), "b", "b", &b.addr_string());
    let s = Setup::new("", &b_site).await;
    let a = &s.upstream;
    let default = default_leaf(&s).await;
    // One request in flight on each protocol, on site b, when the reload lands.
    let mut open = Vec::new();
    for h2 in [false, true] {
        let (mut conn, leaf) = Conn::open(s.https(), "b.test", h2).await;
        assert_eq!(leaf, b_leaf);
        let slow = tokio::spawn(async move {
            let got = conn.get("b.test", &format!("/slow/4000?{h2}")).await;
            (conn, got)
        });
        open.push(slow);
    }
    let started = Instant::now();
    while b.in_flight() < 2 {
        assert!(
            started.elapsed() < LIMIT,
            "the slow requests never reached b"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let line = reload(&s, &config(&s.pki, &a.addr_string(), ""), 1);
    assert!(line.contains("config reloaded"), "{line}");
    assert!(line.contains("sites_removed=1"), "{line}");
    // Still answering after the swap (a safety net against a slow reload, not a timing assertion).
    assert_eq!(
        b.in_flight(),
        2,
        "the slow requests ended before the reload was done"
    );
    // A new connection for b.test: an unknown name now, so the default site's certificate and, as that
    // site names no host (a catch-all), its routes.
    for h2 in [false, true] {
        let target = format!("/removed/{h2}");
        served(&s, &b, "b.test", h2, &target, &default, false).await;
    }
    // The requests in flight finish on the site they started on; the next one on the same connection is
    // for the sites in force now.
    for (slow, h2) in open.into_iter().zip([false, true]) {
        let (mut conn, (status, body)) = slow.await.unwrap();
        assert_eq!((status, &body[..]), (200, &b"slow done"[..]), "h2: {h2}");
        let target = format!("/next/{h2}");
        assert_eq!(conn.get("b.test", &target).await.0, 200);
        assert_eq!(who_got(&target, a, &b), (true, false), "{target}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_site_whose_certificate_is_missing_refuses_the_reload_whole() {
    let b = Upstream::tcp().await;
    let certs = TempDir::new("site-b");
    let b_leaf = TestCa::new().issue(certs.path(), "b", &["b.test"], None);
    let s = Setup::new(
        "",
        &site(&["b.test"], certs.path(), "b", "b", &b.addr_string()),
    )
    .await;
    let a = &s.upstream;
    let default = default_leaf(&s).await;
    // Site c's files were never written; the same config also moves `/` to b.
    let broken = config(
        &s.pki,
        &b.addr_string(),
        &format!(
            "{}{}",
            site(&["b.test"], certs.path(), "b", "b", &b.addr_string()),
            site(&["c.test"], certs.path(), "c", "c", &a.addr_string())
        ),
    );
    let line = reload(&s, &broken, 1);
    assert!(line.contains("config reload failed"), "{line}");
    let missing = certs.path().join("c.pem").display().to_string();
    assert!(
        line.contains(&missing) && line.contains("site 2 (c.test)"),
        "{line}"
    );
    // Nothing changed: `/` still to a, b.test still site b, c.test unknown.
    for h2 in [false, true] {
        let target = format!("/still/{h2}");
        served(&s, &b, "localhost", h2, &target, &default, false).await;
        let target = format!("/b/{h2}");
        served(&s, &b, "b.test", h2, &target, &b_leaf, true).await;
        assert_eq!(get_as(s.https(), "c.test", h2, "/c").await.0, default);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_renamed_by_sighup_answers_to_its_new_names_only_and_can_move_its_certificate() {
    let b = Upstream::tcp().await;
    let certs = TempDir::new("site-b");
    let b_leaf = TestCa::new().issue(certs.path(), "b", &["b.test", "www.b.test"], None);
    let s = Setup::new(
        "",
        &site(&["b.test"], certs.path(), "b", "b", &b.addr_string()),
    )
    .await;
    let a = &s.upstream;
    let default = default_leaf(&s).await;
    assert_eq!(get_as(s.https(), "www.b.test", false, "/").await.0, default);

    let renamed = config(
        &s.pki,
        &a.addr_string(),
        &site(&["www.b.test"], certs.path(), "b", "b", &b.addr_string()),
    );
    let line = reload(&s, &renamed, 1);
    assert!(line.contains("config reloaded"), "{line}");
    for h2 in [false, true] {
        let target = format!("/www/{h2}");
        served(&s, &b, "www.b.test", h2, &target, &b_leaf, true).await;
        let target = format!("/old-name/{h2}");
        served(&s, &b, "b.test", h2, &target, &default, false).await;
    }

    // A name its certificate does not cover: refused, naming the file and the name.
    let uncovered = config(
        &s.pki,
        &a.addr_string(),
        &site(&["other.test"], certs.path(), "b", "b", &b.addr_string()),
    );
    let line = reload(&s, &uncovered, 2);
    assert!(line.contains("config reload failed"), "{line}");
    assert!(line.contains("does not cover other.test"), "{line}");
    served(&s, &b, "www.b.test", true, "/kept", &b_leaf, true).await;

    // Its certificate moves to other files: the new pair is loaded and served.
    let moved_leaf = TestCa::new().issue(certs.path(), "moved", &["www.b.test"], None);
    let moved = config(
        &s.pki,
        &a.addr_string(),
        &site(
            &["www.b.test"],
            certs.path(),
            "moved",
            "b",
            &b.addr_string(),
        ),
    );
    let line = reload(&s, &moved, 3);
    assert!(
        line.contains("sites_added=1") && line.contains("sites_removed=1"),
        "{line}"
    );
    for h2 in [false, true] {
        let target = format!("/moved/{h2}");
        served(&s, &b, "www.b.test", h2, &target, &moved_leaf, true).await;
    }
}

const LIMITED: &str = "[[rate_limit]]\nname = \"slow\"\npaths = [\"/limited\"]\nmethods = [\"GET\"]\nrate = \"1/hour\"\nburst = 2\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_state_survives_a_reload_that_does_not_touch_the_limit() {
    let s = Setup::new("", LIMITED).await;
    let statuses = async || {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(s.client.get(s.https(), "/limited").await.status().as_u16());
        }
        v
    };
    assert_eq!(statuses().await, [200, 200, 429]);
    // Another route and a changed timeout, the same limit: the client is still limited.
    let other = format!(
        "[[route]]\npath = \"/other/\"\nupstream = \"app\"\n\n[timeouts]\nclient_idle = \"30s\"\n\n{LIMITED}"
    );
    let line = reload(&s, &config(&s.pki, &s.upstream.addr_string(), &other), 1);
    assert!(line.contains("rate_limits_kept=1"), "{line}");
    assert_eq!(statuses().await, [429, 429, 429]);
    // The limit changed: counted from fresh.
    let looser = LIMITED.replace("burst = 2", "burst = 3");
    let line = reload(&s, &config(&s.pki, &s.upstream.addr_string(), &looser), 2);
    assert!(line.contains("rate_limits_new=1"), "{line}");
    assert_eq!(statuses().await, [200, 200, 200]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_reloading_with_its_monotonic_time_then_ready() {
    let s = Setup::new("", "").await;
    drop(s.proxy);
    let socket_path = s.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&socket_path).unwrap();
    let path = s.dir.path().join("portcullis.toml");
    let p = Portcullis::run_with_env(&path, &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())]);
    assert!(p.ready, "{}", p.output());
    let ready = receive(&sock, "READY=1");
    assert!(
        ready.iter().any(|m| m.lines().any(|l| l == "READY=1")),
        "{ready:?}"
    );
    p.signal("HUP");
    let got = receive(&sock, "READY=1");
    let reloading = got
        .iter()
        .position(|m| m.lines().any(|l| l == "RELOADING=1"))
        .unwrap_or_else(|| panic!("no RELOADING=1: {got:?}"));
    assert!(
        got[reloading].lines().any(|l| l
            .strip_prefix("MONOTONIC_USEC=")
            .is_some_and(|v| v.parse::<u64>().is_ok())),
        "{got:?}"
    );
    assert!(
        got[reloading + 1..]
            .iter()
            .any(|m| m.lines().any(|l| l == "READY=1")),
        "no READY=1 after RELOADING=1: {got:?}"
    );
    assert!(p.output().contains("config reloaded"), "{}", p.output());
}

/// Every datagram until one has the line `until` (10 s as a safety net).
fn receive(sock: &UnixDatagram, until: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let Ok(n) = sock.recv(&mut buf) else { break };
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        let done = msg.lines().any(|l| l == until);
        got.push(msg);
        if done {
            break;
        }
    }
    got
}
