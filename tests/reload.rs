//! Issue 14, config hot reload: SIGHUP re-reads the config file. Under load, a route and an upstream change
//! with no failed request, and new requests go where the new config says once `config reloaded` is
//! logged; a WebSocket opened before keeps working on its old upstream; a broken config changes nothing
//! and says where it is broken (`FILE:LINE:COL`); a changed listener address is reported as needing a
//! restart while the rest applies; a rate limit the reload does not touch keeps its counts; systemd hears
//! `RELOADING=1` with `MONOTONIC_USEC`, then `READY=1`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use portcullis_tests::client::read_until;
use portcullis_tests::load::Load;
use portcullis_tests::{Portcullis, Setup, Upstream, config};
use tokio::io::AsyncWriteExt;

const UPGRADE: &[u8] = b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// A safety net for each wait on the log, not a timing assertion.
const LIMIT: Duration = Duration::from_secs(20);

/// Writes the config `text` over the running one, sends SIGHUP, and waits for reload number `n` (counted
/// from 1) to be logged as done or failed; returns that line.
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
    let s = Setup::new("", "").await;
    let a = &s.upstream;
    let b = Upstream::tcp().await;
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
    let s = Setup::new("", "").await;
    let b = Upstream::tcp().await;
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
    let s = Setup::new("", "").await;
    let b = Upstream::tcp().await;
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
    let s = Setup::new("", "").await;
    let b = Upstream::tcp().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sites_change_is_refused_whole_as_needing_a_restart() {
    let s = Setup::new("", "").await;
    let b = Upstream::tcp().await;
    let renamed = format!(
        "names = [\"app.test\"]\n{}",
        config(&s.pki, &b.addr_string(), "")
    );
    let line = reload(&s, &renamed, 1);
    assert!(
        line.contains("config reload failed") && line.contains("restart"),
        "{line}"
    );
    assert_eq!(s.client.get(s.https(), "/unchanged").await.status(), 200);
    assert_eq!(who_got("/unchanged", &s.upstream, &b), (true, false));
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
