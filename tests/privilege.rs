//! Issue 4, least privilege, against the real binary and read back from /proc: started as root it binds
//! :443/:80 and becomes `nobody` with no capability in any set; without a user it refuses; started as
//! `nobody` with only an ambient CAP_NET_BIND_SERVICE it binds a privileged port and then holds nothing;
//! `portcullis check` refuses a private key open to other users or unreadable by the service user.
//! These run as root (CI does); see `launch::require_root`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod launch;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use launch::{Deployment, Launched, assert_unprivileged, free_port, nobody, require_root, threads};
use portcullis_tests::{Client, Pki, TempDir, Upstream, binary, config};

/// A config serving `upstream` on the given 127.0.0.1 ports, with `extra` TOML appended.
fn config_on(pki: &Pki, upstream: &str, https: u16, http: u16, extra: &str) -> String {
    config(pki, upstream, extra)
        .replacen(
            "https = [\"127.0.0.1:0\"]",
            &format!("https = [\"127.0.0.1:{https}\"]"),
            1,
        )
        .replacen(
            "http = [\"127.0.0.1:0\"]",
            &format!("http = [\"127.0.0.1:{http}\"]"),
            1,
        )
}

/// `portcullis run --config FILE EXTRA...`, exactly so (tests/support's `Portcullis::run` adds
/// `--insecure-keep-root` as root); waits for "ready" or the end.
fn run(config: &Path, extra: &[&str]) -> Launched {
    let mut cmd = Command::new(binary());
    cmd.args(["run", "--config", config.to_str().unwrap()])
        .args(extra);
    Launched::start(cmd)
}

fn check(config: &Path) -> (i32, String) {
    let out = Command::new(binary())
        .args(["check", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_start_binds_443_and_80_then_runs_as_nobody_with_no_capability_and_still_serves_https_and_reloads()
 {
    require_root();
    let https = free_port(443, 18443..18543);
    let http = free_port(80, 18080..18180);
    let d = Deployment::new("privdrop").await;
    let user = "[process]\nuser = \"nobody\"\n";
    let text = config_on(&d.pki, &d.upstream.addr_string(), https, http, user);
    let path = d.dir.write("portcullis.toml", &text);
    let (code, text) = check(&path);
    assert_eq!(code, 0, "check: {text}");

    let proxy = run(&path, &[]);
    assert!(proxy.ready, "did not start; log:\n{}", proxy.output());
    let addr = proxy.listening("https").unwrap();
    assert_eq!(addr.port(), https);
    assert_eq!(proxy.listening("http").map(|a| a.port()), Some(http));
    // Root could empty the bounding set too (CAP_SETPCAP); the runtime's workers are threads of their own.
    assert!(assert_unprivileged(proxy.pid(), nobody(), true) >= 2);
    assert!(
        proxy
            .output()
            .contains("privileges dropped: running as nobody"),
        "{}",
        proxy.output()
    );
    // The same line names the sandbox (issue 18): on by default, and this kernel has Landlock.
    assert!(
        proxy
            .output()
            .contains("; Landlock sandbox (fully enforced"),
        "{}",
        proxy.output()
    );

    let res = Client::new(&d.pki.ca_pem)
        .get(addr, "/after-the-drop")
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(d.upstream.last().target, "/after-the-drop");

    // As nobody, it still reloads: the same files (owned by nobody, 0600) rewritten in place, then SIGHUP.
    let ca = portcullis_tests::TestCa::new();
    let fresh = TempDir::new("privdrop-new");
    let leaf = ca.issue(fresh.path(), "new", &["localhost", "127.0.0.1"], None);
    std::fs::write(
        &d.pki.cert,
        std::fs::read(fresh.path().join("new.pem")).unwrap(),
    )
    .unwrap();
    std::fs::write(
        &d.pki.key,
        std::fs::read(fresh.path().join("new.key")).unwrap(),
    )
    .unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &proxy.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let mut served = false;
    for _ in 0..200 {
        if proxy.output().contains("reload on SIGHUP done") {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(
                ca.client().config(&[b"http/1.1"]),
            ))
            .connect("localhost".try_into().unwrap(), tcp)
            .await;
            if let Ok(tls) = tls {
                served =
                    tls.get_ref().1.peer_certificates().unwrap()[0].as_ref() == leaf.as_slice();
            }
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        served,
        "the reloaded certificate is not served; log:\n{}",
        proxy.output()
    );
}

#[test]
fn root_start_without_a_user_refuses_before_binding() {
    require_root();
    let dir = TempDir::new("noroot");
    let pki = Pki::new(dir.path(), &[]);
    let path = dir.write("portcullis.toml", &config(&pki, "127.0.0.1:9", ""));
    let mut proxy = run(&path, &[]);
    assert!(!proxy.ready, "served as root; log:\n{}", proxy.output());
    let status = proxy.wait();
    assert_eq!(status.code(), Some(64), "log:\n{}", proxy.output());
    let log = proxy.output();
    assert!(
        log.contains("started as root with no [process] user")
            && log.contains("--insecure-keep-root"),
        "{log}"
    );
    assert!(!log.contains("listening on"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_keep_root_serves_as_root_and_says_so() {
    require_root();
    let dir = TempDir::new("keeproot");
    let pki = Pki::new(dir.path(), &[]);
    let upstream = Upstream::tcp().await;
    let path = dir.write(
        "portcullis.toml",
        &config(&pki, &upstream.addr_string(), ""),
    );
    let proxy = run(&path, &["--insecure-keep-root"]);
    assert!(proxy.ready, "log:\n{}", proxy.output());
    assert!(
        proxy.output().contains("INSECURE: --insecure-keep-root"),
        "{}",
        proxy.output()
    );
    assert!(threads(proxy.pid()).iter().all(|t| t.uid == [0, 0, 0, 0]));
    let res = Client::new(&pki.ca_pem)
        .get(proxy.listening("https").unwrap(), "/")
        .await;
    assert_eq!(res.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_with_ambient_net_bind_service_binds_a_privileged_port_then_holds_no_capability() {
    require_root();
    // A port below 1024 is what needs the capability (ip_unprivileged_port_start is 1024 here); not 443,
    // which the root test above may hold at the same moment.
    let https = free_port(843, 844..1000);
    let d = Deployment::new("ambient").await;
    let text = config_on(&d.pki, &d.upstream.addr_string(), https, 0, "");
    let path = d.dir.write("portcullis.toml", &text);
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "--inh-caps=+net_bind_service",
        "--ambient-caps=+net_bind_service",
    ])
    .arg(binary())
    .args(["run", "--config", path.to_str().unwrap()]);
    let proxy = Launched::start(cmd);
    assert!(proxy.ready, "did not start; log:\n{}", proxy.output());
    assert_eq!(proxy.listening("https").map(|a| a.port()), Some(https));
    // Without CAP_SETPCAP the bounding set stays as inherited; NoNewPrivs keeps it from mattering.
    assert_unprivileged(proxy.pid(), nobody(), false);
    let res = Client::new(&d.pki.ca_pem)
        .get(proxy.listening("https").unwrap(), "/")
        .await;
    assert_eq!(res.status(), 200);
}

#[test]
fn check_refuses_a_private_key_other_users_can_read() {
    let dir = TempDir::new("keymode");
    let pki = Pki::new(dir.path(), &[]);
    std::fs::set_permissions(&pki.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let path = dir.write("portcullis.toml", &config(&pki, "127.0.0.1:9", ""));
    let (code, text) = check(&path);
    assert_eq!(code, 64, "{text}");
    assert!(text.contains(&pki.key.display().to_string()), "{text}");
    assert!(
        text.contains("mode 0644") && text.contains("chmod 600"),
        "{text}"
    );

    std::fs::set_permissions(&pki.key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 0, "{text}");
}

#[test]
fn check_reports_a_key_the_service_user_cannot_read() {
    require_root();
    let dir = TempDir::new("keyowner");
    let pki = Pki::new(dir.path(), &[]);
    // Root's own key, 0600: fine for root, unreadable once the process is `nobody`.
    std::fs::set_permissions(&pki.key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let path = dir.write(
        "portcullis.toml",
        &config(&pki, "127.0.0.1:9", "[process]\nuser = \"nobody\"\n"),
    );
    let (code, text) = check(&path);
    assert_eq!(code, 64, "{text}");
    assert!(
        text.contains(&pki.key.display().to_string()) && text.contains("user nobody"),
        "{text}"
    );
    assert!(text.contains("cannot read"), "{text}");

    let (uid, gid) = nobody();
    std::os::unix::fs::chown(&pki.key, Some(uid), Some(gid)).unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 0, "{text}");

    // At start the config is read as root, before the drop: root's own 0600 file is fine for `check` (a
    // SIGHUP reload reads it as the service user, and fails, saying `cannot read`, if it cannot).
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 0, "{text}");
}
