//! Issue 4, systemd: socket activation (sockets passed with `LISTEN_FDS` by systemd-socket-activate, matched
//! by `LISTEN_FDNAMES` or by address), sd_notify (`READY=1`, `WATCHDOG=1`, `STOPPING=1` on a
//! `NOTIFY_SOCKET` the test listens on), and the shipped units: `systemd-analyze verify` passes and
//! `systemd-analyze security --offline=yes` rates them 1.5 or less ("OK"; issue 18). Needs the Debian package
//! `systemd` (systemd-analyze, systemd-socket-activate) and `util-linux` (setpriv).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod launch;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use launch::{Deployment, Launched, assert_unprivileged, free_port, nobody, require_root};
use portcullis_tests::{Client, Pki, TempDir, Upstream, binary, config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn with_listen(config: String, https: &str, http: &str) -> String {
    config
        .replacen(
            "https = [\"127.0.0.1:0\"]",
            &format!("https = [\"{https}\"]"),
            1,
        )
        .replacen(
            "http = [\"127.0.0.1:0\"]",
            &format!("http = [\"{http}\"]"),
            1,
        )
}

/// Waits for systemd-socket-activate's "Listening on ADDR as N." for each of `fds`.
fn wait_listening(p: &Launched, fds: &[&str]) {
    for fd in fds {
        let line = format!(" as {fd}.");
        assert!(
            p.wait_for(
                |l| l.starts_with("Listening on") && l.ends_with(&line),
                Duration::from_secs(10)
            )
            .is_some(),
            "systemd-socket-activate did not listen; log:\n{}",
            p.output()
        );
    }
}

async fn plain_http_status_line(addr: std::net::SocketAddr) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    tcp.flush().await.unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    out.lines().next().unwrap_or("").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_passed_sockets_serve_privileged_ports_with_no_capability_at_all() {
    require_root();
    // Privileged ports, away from the 443/80/8xx the privilege tests use.
    let https = free_port(743, 744..760);
    let http = free_port(780, 781..799);
    let d = Deployment::new("activate-named").await;
    // [listen] names ports `nobody` could never bind: serving at all proves the passed sockets were used.
    let text = config(&d.pki, &d.upstream.addr_string(), "");
    let path = d.dir.write(
        "portcullis.toml",
        &with_listen(text, "127.0.0.1:1", "127.0.0.1:2"),
    );
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.arg(format!("--listen=127.0.0.1:{https}"))
        .arg(format!("--listen=127.0.0.1:{http}"))
        .arg("--fdname=https:http")
        .args([
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
        ])
        .arg(binary())
        .args(["run", "--config", path.to_str().unwrap()]);
    let mut proxy = Launched::spawn(cmd);
    wait_listening(&proxy, &["3", "4"]);

    // The first connection reaches the socket before Portcullis even runs, and is served: nothing is lost.
    let addr = format!("127.0.0.1:{https}").parse().unwrap();
    let res = Client::new(&d.pki.ca_pem).get(addr, "/first").await;
    assert_eq!(res.status(), 200, "log:\n{}", proxy.output());
    assert!(proxy.wait_ready(), "log:\n{}", proxy.output());
    assert_eq!(d.upstream.last().target, "/first");
    let log = proxy.output();
    assert!(
        log.contains("fdname=https kind=Https") && log.contains("fdname=http kind=Http"),
        "{log}"
    );
    assert_eq!(proxy.listening("https"), Some(addr));

    let status = plain_http_status_line(format!("127.0.0.1:{http}").parse().unwrap()).await;
    assert!(
        status.contains(" 301 ") || status.contains(" 308 "),
        "{status}"
    );
    // Started as `nobody` with no capability at all: none to drop, none held.
    assert_unprivileged(proxy.pid(), nobody(), false);
    assert_eq!(
        proxy.terminate().code(),
        Some(0),
        "log:\n{}",
        proxy.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnamed_passed_sockets_are_matched_by_their_listen_address() {
    require_root();
    let https = free_port(19443, 19444..19500);
    let http = free_port(19080, 19081..19140);
    let dir = TempDir::new("activate-addr");
    let pki = Pki::new(dir.path(), &[]);
    let upstream = Upstream::tcp().await;
    let text = with_listen(
        config(
            &pki,
            &upstream.addr_string(),
            "[process]\nuser = \"nobody\"\n",
        ),
        &format!("127.0.0.1:{https}"),
        &format!("127.0.0.1:{http}"),
    );
    let path = dir.write("portcullis.toml", &text);
    // systemd-socket-activate holds both addresses: binding them again would fail with EADDRINUSE.
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.arg(format!("--listen=127.0.0.1:{http}"))
        .arg(format!("--listen=127.0.0.1:{https}"))
        .arg(binary())
        .args(["run", "--config", path.to_str().unwrap()]);
    let mut proxy = Launched::spawn(cmd);
    wait_listening(&proxy, &["3", "4"]);
    let status = plain_http_status_line(format!("127.0.0.1:{http}").parse().unwrap()).await;
    assert!(
        status.contains(" 301 ") || status.contains(" 308 "),
        "{status}"
    );
    assert!(proxy.wait_ready(), "log:\n{}", proxy.output());
    let addr = format!("127.0.0.1:{https}").parse().unwrap();
    let res = Client::new(&pki.ca_pem).get(addr, "/by-address").await;
    assert_eq!(res.status(), 200);
    assert_eq!(proxy.listening("https"), Some(addr));
    assert_eq!(
        proxy.terminate().code(),
        Some(0),
        "log:\n{}",
        proxy.output()
    );
}

/// Every datagram received on `sock` until `until` matches one of them, or `limit` passes.
fn receive_until(sock: &UnixDatagram, until: &str, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        sock.set_read_timeout(Some(deadline - Instant::now()))
            .unwrap();
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = msg.lines().any(|l| l == until);
                got.push(msg);
                if done {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break;
            }
            Err(e) => panic!("recv: {e}"),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_says_ready_pings_the_watchdog_and_says_stopping() {
    require_root();
    let d = Deployment::new("notify").await;
    let socket_path = d.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&socket_path).unwrap();
    // The service user (after the drop) must be able to send to it, as to systemd's /run/systemd/notify.
    std::fs::set_permissions(&socket_path, std::fs::Permissions::from_mode(0o777)).unwrap();
    let text = config(
        &d.pki,
        &d.upstream.addr_string(),
        "[process]\nuser = \"nobody\"\n",
    );
    let path = d.dir.write("portcullis.toml", &text);
    let mut cmd = Command::new(binary());
    cmd.args(["run", "--config", path.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000");
    let mut proxy = Launched::start(cmd);
    assert!(proxy.ready, "log:\n{}", proxy.output());

    let first = receive_until(&sock, "READY=1", Duration::from_secs(10));
    assert!(
        first
            .last()
            .is_some_and(|m| m.lines().any(|l| l == "READY=1")),
        "no READY=1: {first:?}; log:\n{}",
        proxy.output()
    );
    // WATCHDOG_USEC=200000: a ping every 100 ms.
    let pings = receive_until(&sock, "WATCHDOG=1", Duration::from_secs(5));
    assert!(pings.iter().any(|m| m.contains("WATCHDOG=1")), "{pings:?}");

    assert_eq!(
        proxy.terminate().code(),
        Some(0),
        "log:\n{}",
        proxy.output()
    );
    let last = receive_until(&sock, "STOPPING=1", Duration::from_secs(5));
    assert!(
        last.iter().any(|m| m.lines().any(|l| l == "STOPPING=1")),
        "no STOPPING=1: {last:?}"
    );
}

fn units() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("systemd")
}

/// The shipped units in a directory of their own, run from the built binary (verify checks it exists);
/// with `drop_in`, socket-activated.conf installed as portcullis.service.d/.
fn unit_dir(tag: &str, drop_in: bool) -> TempDir {
    let dir = TempDir::new(tag);
    let service = std::fs::read_to_string(units().join("portcullis.service")).unwrap();
    dir.write(
        "portcullis.service",
        &service.replace("/usr/bin/portcullis", binary().to_str().unwrap()),
    );
    std::fs::copy(
        units().join("portcullis.socket"),
        dir.path().join("portcullis.socket"),
    )
    .unwrap();
    if drop_in {
        std::fs::create_dir(dir.path().join("portcullis.service.d")).unwrap();
        std::fs::copy(
            units().join("socket-activated.conf"),
            dir.path()
                .join("portcullis.service.d/socket-activated.conf"),
        )
        .unwrap();
    }
    dir
}

/// `systemd-analyze` with only `dir` (then the built-in paths) as the unit search path.
fn analyze(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("systemd-analyze")
        .args(args)
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.display()))
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn exposure(dir: &Path) -> f64 {
    let service = dir.join("portcullis.service");
    let (ok, out, err) = analyze(
        dir,
        &["security", "--offline=yes", service.to_str().unwrap()],
    );
    assert!(ok, "systemd-analyze security failed: {err}");
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in:\n{out}"));
    let score = line
        .rsplit(':')
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score in {line:?}"));
    eprintln!("{line}");
    score
}

#[test]
fn the_units_verify_and_their_exposure_is_ok() {
    for drop_in in [false, true] {
        let dir = unit_dir("units", drop_in);
        let (ok, _, err) = analyze(
            dir.path(),
            &[
                "verify",
                dir.path().join("portcullis.socket").to_str().unwrap(),
                dir.path().join("portcullis.service").to_str().unwrap(),
            ],
        );
        assert!(
            ok && err.trim().is_empty(),
            "systemd-analyze verify (drop-in: {drop_in}):\n{err}"
        );
    }
    let plain = exposure(unit_dir("exposure", false).path());
    assert!(
        plain <= 1.5,
        "portcullis.service exposure {plain}, over 1.5 (issue 18)"
    );
    let activated = exposure(unit_dir("exposure-activated", true).path());
    assert!(
        activated <= plain,
        "socket activation (no capability at all) must not score worse: {activated} > {plain}"
    );
}
