//! The Landlock sandbox the binary sets up after the privilege drop (`[process] sandbox`): on this kernel
//! it is enforced by default, and reading outside what the config names fails as the kernel refuses it
//! (EACCES); a reload naming a folder outside needs a restart; a kernel without Landlock (simulated with
//! the test switch) starts with a warning under `best-effort` and refuses under `require` (exit 64).
//! From inside (the debug build's `PORTCULLIS_TEST_SANDBOX_PROBE`, run on a runtime thread once ready),
//! as `nobody`: a file the user may read by its mode but outside the sandbox is refused, no program runs,
//! and TCP connects only to what the config names; ACME against Pebble gets and serves its certificate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod launch;
#[allow(dead_code)]
#[path = "acme/pebble.rs"]
mod pebble;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use portcullis_tests::{Pki, Portcullis, Setup, TempDir, Upstream, binary, config};

const LIMIT: Duration = Duration::from_secs(10);
const NO_LANDLOCK: (&str, &str) = ("PORTCULLIS_TEST_SIMULATE_NO_LANDLOCK", "1");
const PROBE: &str = "PORTCULLIS_TEST_SANDBOX_PROBE";

/// Waits for the probe line of `what` (`read /path`, `connect 127.0.0.1:9`, ...) and gives its result.
fn probe_result(log: impl Fn(Duration) -> Option<String>, what: &str) -> String {
    let line = log(LIMIT).unwrap_or_else(|| panic!("no probe line for {what}"));
    line.split_once(&format!("sandbox probe: {what}: "))
        .map(|(_, r)| r.to_owned())
        .unwrap_or(line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_nobody_inside_the_sandbox_no_file_outside_is_read_nothing_runs_and_only_named_ports_connect()
 {
    launch::require_root();
    let d = launch::Deployment::new("sandbox-probe").await;
    // A file `nobody` may read by its mode bits, in a folder it may enter: only Landlock stands in the way.
    let outside = TempDir::new("sandbox-outside");
    std::fs::set_permissions(outside.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = outside.write("secret", "TOP-SECRET");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    // A port that is not an upstream, listening on loopback.
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other = other.local_addr().unwrap();
    let up = d.upstream.addr_string();
    let user = "[process]\nuser = \"nobody\"\n";
    let path = d.dir.write("portcullis.toml", &config(&d.pki, &up, user));
    let probes = [
        format!("read:{}", d.pki.cert.display()),
        format!("read:{}", secret.display()),
        "exec:/bin/true".to_owned(),
        format!("connect:{up}"),
        format!("connect:{other}"),
    ]
    .join(",");
    let mut cmd = Command::new(binary());
    cmd.args(["run", "--config", path.to_str().unwrap()])
        .env(PROBE, &probes);
    let proxy = launch::Launched::start(cmd);
    assert!(proxy.ready, "did not start:\n{}", proxy.output());
    let result = |what: &str| {
        let what = what.to_owned();
        probe_result(
            |limit| proxy.wait_for(|l| l.contains(&format!("sandbox probe: {what}: ")), limit),
            &what,
        )
    };
    assert_eq!(result(&format!("read {}", d.pki.cert.display())), "ok");
    assert_eq!(
        result(&format!("read {}", secret.display())),
        "Permission denied (os error 13)"
    );
    assert_eq!(result("exec /bin/true"), "Permission denied (os error 13)");
    assert_eq!(result(&format!("connect {up}")), "ok");
    assert_eq!(
        result(&format!("connect {other}")),
        "Permission denied (os error 13)"
    );
    // And it still serves, through the upstream port it may connect to.
    let res = portcullis_tests::Client::new(&d.pki.ca_pem)
        .get(proxy.listening("https").unwrap(), "/after-the-probes")
        .await;
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn a_reload_adding_an_upstream_on_a_port_outside_the_sandbox_needs_a_restart() {
    let s = Setup::new("", "").await;
    let other = Upstream::tcp().await;
    let text = std::fs::read_to_string(s.dir.path().join("portcullis.toml")).unwrap();
    let text = format!(
        "{text}\n[[route]]\npath = \"/other/\"\nupstream = \"other\"\n\n[upstream.other]\nservers = [\"{}\"]\n",
        other.addr_string()
    );
    s.dir.write("portcullis.toml", &text);
    s.proxy.signal("HUP");
    let line = s
        .proxy
        .wait_for_log(|l| l.contains("config reload failed"), LIMIT)
        .unwrap_or_else(|| panic!("reload not refused:\n{}", s.proxy.output()));
    assert!(line.contains("needs a restart"), "{line}");
    let port = other.addr_string().rsplit(':').next().unwrap().to_owned();
    assert!(
        line.contains(&format!("connect    tcp port {port}")),
        "{line}"
    );
    // Not half-applied: /other/ still goes to the first upstream.
    let resp = s.client.get(s.https(), "/other/x").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(s.upstream.last().target, "/other/x");
}

/// A config file for a fresh PKI, with `extra` appended.
async fn write_config(extra: &str) -> (TempDir, Upstream, std::path::PathBuf) {
    let dir = TempDir::new("sandbox");
    let pki = Pki::new(dir.path(), &[]);
    let up = Upstream::tcp().await;
    let path = dir.write("portcullis.toml", &config(&pki, &up.addr_string(), extra));
    (dir, up, path)
}

#[tokio::test]
async fn the_sandbox_is_on_by_default_and_the_start_up_log_says_so() {
    let s = Setup::new("", "").await;
    let line = s
        .proxy
        .wait_for_log(|l| l.contains("Landlock sandbox"), LIMIT)
        .unwrap_or_else(|| panic!("no sandbox line:\n{}", s.proxy.output()));
    assert!(line.contains("fully enforced"), "{line}");
    assert!(line.contains("no execute"), "{line}");
    // Serving works inside it.
    let resp = s.client.get(s.https(), "/inside").await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn require_on_a_kernel_without_landlock_refuses_to_start_with_exit_64() {
    let (_dir, _up, path) = write_config("[process]\nsandbox = \"require\"\n").await;
    let mut p = Portcullis::run_with_env(&path, &[NO_LANDLOCK]);
    assert!(!p.ready, "started:\n{}", p.output());
    assert_eq!(p.wait().code(), Some(64), "{}", p.output());
    assert!(
        p.output().contains("sandbox = \"require\""),
        "{}",
        p.output()
    );
}

#[tokio::test]
async fn best_effort_on_a_kernel_without_landlock_starts_with_one_warning() {
    let (_dir, _up, path) = write_config("").await;
    let p = Portcullis::run_with_env(&path, &[NO_LANDLOCK]);
    assert!(p.ready, "did not start:\n{}", p.output());
    let warned = p
        .lines()
        .iter()
        .filter(|l| l.contains("does not enforce Landlock"))
        .count();
    assert_eq!(warned, 1, "{}", p.output());
}

#[tokio::test]
async fn a_reload_naming_a_certificate_folder_outside_the_sandbox_needs_a_restart() {
    let s = Setup::new("", "").await;
    let outside = TempDir::new("sandbox-outside");
    let other = Pki::new(outside.path(), &[]);
    let text = std::fs::read_to_string(s.dir.path().join("portcullis.toml"))
        .unwrap()
        .replace(
            &s.pki.cert.display().to_string(),
            &other.cert.display().to_string(),
        )
        .replace(
            &s.pki.key.display().to_string(),
            &other.key.display().to_string(),
        );
    s.dir.write("portcullis.toml", &text);
    s.proxy.signal("HUP");
    let line = s
        .proxy
        .wait_for_log(|l| l.contains("config reload failed"), LIMIT)
        .unwrap_or_else(|| panic!("reload not refused:\n{}", s.proxy.output()));
    assert!(line.contains("needs a restart"), "{line}");
    assert!(
        line.contains(&outside.path().display().to_string()),
        "{line}"
    );
    // Nothing was half-applied: the running certificate is still served.
    let resp = s.client.get(s.https(), "/after").await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_certificate_swapped_for_a_link_outside_the_sandbox_is_refused_by_the_kernel() {
    let s = Setup::new("", "").await;
    // A valid pair outside every allowed folder, linked in where the running certificate is: the
    // reload (on a runtime worker thread) opens it through the link, and Landlock refuses.
    let outside = TempDir::new("sandbox-outside");
    let other = Pki::new(outside.path(), &[]);
    std::fs::remove_file(&s.pki.cert).unwrap();
    std::os::unix::fs::symlink(&other.cert, &s.pki.cert).unwrap();
    s.proxy.signal("HUP");
    let line = s
        .proxy
        .wait_for_log(|l| l.contains("Permission denied"), LIMIT)
        .unwrap_or_else(|| panic!("no EACCES:\n{}", s.proxy.output()));
    assert!(line.contains("os error 13"), "{line}");
    let resp = s.client.get(s.https(), "/after").await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_static_route_gives_nothing_from_outside_its_folder_through_a_link() {
    let outside = TempDir::new("sandbox-outside");
    let secret = outside.write("secret", "TOP-SECRET-sandbox");
    let www = TempDir::new("sandbox-www");
    www.write("index.html", "inside");
    std::os::unix::fs::symlink(&secret, www.path().join("leak.html")).unwrap();
    let s = Setup::new(
        "",
        &format!(
            "[[route]]\npath = \"/www/\"\nstatic = \"{}\"\n",
            www.path().display()
        ),
    )
    .await;
    let ok = s.client.get(s.https(), "/www/index.html").await;
    assert_eq!(ok.status(), 200);
    let leak = s.client.get(s.https(), "/www/leak.html").await;
    assert_eq!(leak.status(), 404);
    assert!(!String::from_utf8_lossy(leak.body()).contains("TOP-SECRET"));
}

#[tokio::test]
async fn a_reload_adding_a_static_folder_outside_the_sandbox_needs_a_restart() {
    let s = Setup::new("", "").await;
    let www = TempDir::new("sandbox-www");
    www.write("index.html", "new");
    let text = std::fs::read_to_string(s.dir.path().join("portcullis.toml")).unwrap();
    let text = format!(
        "{text}\n[[route]]\npath = \"/www/\"\nstatic = \"{}\"\n",
        www.path().display()
    );
    s.dir.write("portcullis.toml", &text);
    s.proxy.signal("HUP");
    let line = s
        .proxy
        .wait_for_log(|l| l.contains("config reload failed"), LIMIT)
        .unwrap_or_else(|| panic!("reload not refused:\n{}", s.proxy.output()));
    assert!(line.contains("needs a restart"), "{line}");
    assert!(line.contains(&www.path().display().to_string()), "{line}");
    // Not half-applied: the route does not exist, `/` still goes upstream.
    let resp = s.client.get(s.https(), "/www/index.html").await;
    assert_ne!(String::from_utf8_lossy(resp.body()), "new");
}

#[test]
fn check_lists_what_the_sandbox_allows() {
    let dir = TempDir::new("sandbox-check");
    let pki = Pki::new(dir.path(), &[]);
    let path = dir.write("portcullis.toml", &config(&pki, "127.0.0.1:9", ""));
    let out = Command::new(binary())
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("sandbox: Landlock (best effort), no execute"),
        "{stdout}"
    );
    let folder = std::fs::canonicalize(dir.path()).unwrap();
    assert!(
        stdout.contains(&format!(
            "read       {} (config file's folder)",
            folder.display()
        )),
        "{stdout}"
    );
    assert!(stdout.contains("read-write "), "{stdout}");
    assert!(
        stdout.contains("connect    tcp port 9 (upstream server)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("connect    tcp port 53 (DNS over TCP)"),
        "{stdout}"
    );
    assert!(stdout.contains("/etc/resolv.conf"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_nobody_inside_the_sandbox_acme_against_pebble_gets_and_serves_its_certificate() {
    launch::require_root();
    let (https, http) = (pebble::free_port(), pebble::free_port());
    let ca = pebble::Pebble::start(pebble::Options::new(http, https));
    let dir = TempDir::new("sandbox-acme");
    let (uid, gid) = launch::nobody();
    // The state and temp folders an operator (or the package) makes for the service user.
    let state = dir.path().join("state");
    let buffers = dir.path().join("buffers");
    for d in [&state, &buffers] {
        std::fs::create_dir(d).unwrap();
        std::os::unix::fs::chown(d, Some(uid), Some(gid)).unwrap();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let up = Upstream::tcp().await;
    let text = format!(
        r#"names = ["localhost"]

[listen]
https = ["127.0.0.1:{https}"]
http = ["127.0.0.1:{http}"]

[tls]
acme = true

[[route]]
path = "/"
upstream = "app"

[upstream.app]
servers = ["{}"]

[acme]
directory = "{}"
ca_root = "{}"
state_dir = "{}"
challenge = "http-01"
validation_port = {http}

[process]
user = "nobody"
temp_dir = "{}"
"#,
        up.addr_string(),
        ca.directory,
        ca.api_ca.display(),
        state.display(),
        buffers.display()
    );
    let path = dir.write("portcullis.toml", &text);
    let mut cmd = Command::new(binary());
    cmd.args(["run", "--config", path.to_str().unwrap()]);
    let proxy = launch::Launched::start(cmd);
    assert!(proxy.ready, "did not start:\n{}", proxy.output());
    assert!(
        proxy.output().contains("running as nobody")
            && proxy.output().contains("Landlock sandbox (fully enforced"),
        "{}",
        proxy.output()
    );
    proxy
        .wait_for(|l| l.contains("ACME certificate installed"), LIMIT * 3)
        .unwrap_or_else(|| panic!("no certificate:\n{}", proxy.output()));
    let client = ca.client().await;
    let (status, leaf) =
        portcullis_tests::client::fresh_get(&client, proxy.listening("https").unwrap())
            .await
            .unwrap();
    assert_eq!(status, 200);
    assert!(leaf.windows(9).any(|w| w == b"localhost"));
    assert_eq!(ca.orders(), 1);
}
