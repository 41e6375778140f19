//! The Landlock sandbox the binary sets up after the privilege drop (`[process] sandbox`): on this kernel
//! it is enforced by default, and reading outside what the config names fails as the kernel refuses it
//! (EACCES); a reload naming a folder outside needs a restart; a kernel without Landlock (simulated with
//! the test switch) starts with a warning under `best-effort` and refuses under `require` (exit 64).
//! From inside (the debug build's `PORTCULLIS_TEST_SANDBOX_PROBE`, run on a runtime thread once ready),
//! as `nobody`: a file the user may read by its mode but outside the sandbox is refused, no program runs,
//! and TCP connects only to what the config names; ACME against Pebble gets and serves its certificate.
//! The seccomp filter set with it (`[process] seccomp`): every thread has it, serving, reloads, static
//! files and buffered uploads keep working under it, `"off"` leaves none, and without Landlock it alone
//! stops a program from running (EPERM; `"kill"`: the process dies of SIGSYS).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod launch;
#[allow(dead_code)]
#[path = "acme/pebble.rs"]
mod pebble;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use launch::{Deployment, Launched, nobody, require_root, threads};
use portcullis_tests::{
    Pki, Portcullis, Setup, TempDir, Upstream, binary, config, random_bytes, sha256_hex,
};

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

/// Asserts from /proc that every thread of `pid` has seccomp mode `mode` (2: a filter) and NoNewPrivs;
/// returns how many threads there were.
fn assert_seccomp(pid: u32, mode: u32) -> usize {
    let all = threads(pid);
    for t in &all {
        assert_eq!(t.seccomp, mode, "thread {}: Seccomp", t.tid);
        assert!(t.no_new_privs, "thread {}: NoNewPrivs", t.tid);
    }
    all.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_nobody_every_thread_has_the_seccomp_filter_and_h1_h2_static_uploads_and_reloads_work() {
    require_root();
    let d = Deployment::new("seccomp-nobody").await;
    let www = TempDir::new("seccomp-www");
    www.write("index.html", "inside the filter");
    let extra = format!(
        "[[route]]\npath = \"/www/\"\nstatic = \"{}\"\n\n[buffers]\nmemory_per_request = \"64KiB\"\n\n\
         [process]\nuser = \"nobody\"\n",
        www.path().display()
    );
    let path = d.dir.write(
        "portcullis.toml",
        &config(&d.pki, &d.upstream.addr_string(), &extra),
    );
    let mut cmd = Command::new(binary());
    cmd.args(["run", "--config", path.to_str().unwrap()]);
    let proxy = Launched::start(cmd);
    assert!(proxy.ready, "did not start; log:\n{}", proxy.output());
    let line = proxy
        .wait_for(|l| l.contains("privileges dropped"), LIMIT)
        .unwrap_or_else(|| panic!("no drop line:\n{}", proxy.output()));
    assert!(line.contains("running as nobody"), "{line}");
    assert!(line.contains("syscalls allowed, others EPERM"), "{line}");
    let addr = proxy.listening("https").unwrap();
    let client = portcullis_tests::Client::new(&d.pki.ca_pem);

    // HTTP/1.1 and HTTP/2 to the upstream; a static file (read on the blocking pool).
    assert_eq!(client.get(addr, "/h1").await.status(), 200);
    let h2 = client
        .send_h2(addr, Request::get("/h2").body(Full::default()).unwrap())
        .await;
    assert_eq!(h2.status(), 200);
    let page = client.get(addr, "/www/index.html").await;
    assert_eq!(page.status(), 200);
    assert_eq!(page.body().as_ref(), b"inside the filter");
    // An upload past memory_per_request goes through a temp file (O_TMPFILE in temp_dir) whole.
    let body = random_bytes(1 << 20, 18);
    let req = Request::post("/sha256")
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    let res = client.send_h2(addr, req).await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        String::from_utf8_lossy(res.body()),
        format!("sha256={} len={}", sha256_hex(&body), body.len())
    );
    // A reload (config and certificate files read again, on a worker thread).
    let hup = Command::new("kill")
        .args(["-HUP", &proxy.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    proxy
        .wait_for(|l| l.contains("reload on SIGHUP done"), LIMIT)
        .unwrap_or_else(|| panic!("no reload:\n{}", proxy.output()));
    assert_eq!(client.get(addr, "/after-reload").await.status(), 200);

    // Every thread, the blocking pool's included, has the filter and NoNewPrivs, and runs as nobody.
    assert!(assert_seccomp(proxy.pid(), 2) >= 2);
    launch::assert_unprivileged(proxy.pid(), nobody(), true);
    assert!(
        !proxy.output().contains("Operation not permitted"),
        "{}",
        proxy.output()
    );
}

#[tokio::test]
async fn seccomp_kill_is_in_force_on_every_thread_and_serves() {
    let s = Setup::new("", "[process]\nseccomp = \"kill\"\n").await;
    assert!(
        s.proxy
            .output()
            .contains("syscalls allowed, others kill the process"),
        "{}",
        s.proxy.output()
    );
    assert_eq!(s.client.get(s.https(), "/kill-mode").await.status(), 200);
    assert!(assert_seccomp(s.proxy.pid(), 2) >= 2);
}

#[tokio::test]
async fn seccomp_off_and_sandbox_off_leave_no_filter() {
    for extra in [
        "[process]\nseccomp = \"off\"\n",
        "[process]\nsandbox = \"off\"\n",
    ] {
        let s = Setup::new("", extra).await;
        assert!(
            s.proxy.output().contains("seccomp off"),
            "{}",
            s.proxy.output()
        );
        assert_eq!(s.client.get(s.https(), "/off").await.status(), 200);
        for t in threads(s.proxy.pid()) {
            assert_eq!(t.seccomp, 0, "{extra}: thread {}: Seccomp", t.tid);
        }
    }
}

#[tokio::test]
async fn a_kernel_refusing_seccomp_gets_one_warning_under_best_effort_and_exit_64_under_require() {
    const NO_SECCOMP: (&str, &str) = ("PORTCULLIS_TEST_SIMULATE_NO_SECCOMP", "1");
    let (_dir, _up, path) = write_config("").await;
    let p = Portcullis::run_with_env(&path, &[NO_SECCOMP]);
    assert!(p.ready, "did not start:\n{}", p.output());
    let warned = p
        .lines()
        .iter()
        .filter(|l| l.contains("running without the seccomp filter"))
        .count();
    assert_eq!(warned, 1, "{}", p.output());
    assert!(p.output().contains("no seccomp filter ("), "{}", p.output());

    let (_dir, _up, path) = write_config("[process]\nsandbox = \"require\"\n").await;
    let mut p = Portcullis::run_with_env(&path, &[NO_SECCOMP]);
    assert!(!p.ready, "started:\n{}", p.output());
    assert_eq!(p.wait().code(), Some(64), "{}", p.output());
    assert!(
        p.output().contains("does not accept a seccomp filter"),
        "{}",
        p.output()
    );
}

#[test]
fn check_lists_the_system_calls_the_filter_allows() {
    let dir = TempDir::new("seccomp-check");
    let pki = Pki::new(dir.path(), &[]);
    let path = dir.write("portcullis.toml", &config(&pki, "127.0.0.1:9", ""));
    let out = Command::new(binary())
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("syscalls allowed, others EPERM; no program can be run"),
        "{stdout}"
    );
    assert!(
        stdout.contains("socket (AF_INET, AF_INET6, AF_UNIX)"),
        "{stdout}"
    );
    assert!(!stdout.contains("execve"), "{stdout}");
}

#[test]
fn the_units_system_call_filter_allows_every_call_the_binarys_filter_allows() {
    // The binary's list, as `check` prints it: "  what it is for: read, ioctl (FIONBIO, ...), ...".
    let dir = TempDir::new("seccomp-unit");
    let pki = Pki::new(dir.path(), &[]);
    let path = dir.write("portcullis.toml", &config(&pki, "127.0.0.1:9", ""));
    let out = Command::new(binary())
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut ours = Vec::new();
    for line in stdout
        .lines()
        .skip_while(|l| !l.starts_with("seccomp: "))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
    {
        let (_, calls) = line.rsplit_once(": ").unwrap();
        // Limits in parentheses are not names.
        let mut depth = 0;
        let bare: String = calls
            .chars()
            .filter(|c| {
                depth += i32::from(*c == '(') - i32::from(*c == ')');
                depth == 0 && *c != ')'
            })
            .collect();
        ours.extend(bare.split(',').map(|n| n.trim().to_owned()));
    }
    assert!(ours.len() > 50, "{stdout}");
    // And the calls that set the sandbox up, before the filter (in no group but @known on systemd 252).
    ours.extend(
        [
            "landlock_create_ruleset",
            "landlock_add_rule",
            "landlock_restrict_self",
            "seccomp",
        ]
        .map(String::from),
    );

    // The unit's, expanded as systemd 252 does: allow-list lines add, `~` lines take away.
    let groups = Command::new("systemd-analyze")
        .args(["syscall-filter", "--no-pager"])
        .output()
        .unwrap();
    let groups = String::from_utf8_lossy(&groups.stdout);
    let mut members: std::collections::HashMap<&str, Vec<&str>> = Default::default();
    let mut current = "";
    for line in groups.lines() {
        if line.starts_with('@') {
            current = line.trim();
        } else if let Some(item) = line.strip_prefix("    ").map(str::trim)
            && !item.is_empty()
            && !item.starts_with('#')
        {
            members.entry(current).or_default().push(item);
        }
    }
    fn expand<'a>(
        name: &'a str,
        members: &std::collections::HashMap<&'a str, Vec<&'a str>>,
        out: &mut std::collections::HashSet<&'a str>,
    ) {
        match members.get(name) {
            Some(items) if name.starts_with('@') => {
                for i in items {
                    expand(i, members, out);
                }
            }
            _ => {
                out.insert(name);
            }
        }
    }
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/portcullis.service"),
    )
    .unwrap();
    let mut allowed = std::collections::HashSet::new();
    for value in unit
        .lines()
        .filter_map(|l| l.strip_prefix("SystemCallFilter="))
    {
        let (deny, list) = match value.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, value),
        };
        let mut these = std::collections::HashSet::new();
        for name in list.split_whitespace() {
            expand(name, &members, &mut these);
        }
        if deny {
            allowed.retain(|n| !these.contains(n));
        } else {
            allowed.extend(these);
        }
    }
    let refused: Vec<_> = ours
        .iter()
        .filter(|n| !allowed.contains(n.as_str()))
        .collect();
    assert!(
        refused.is_empty(),
        "the unit refuses what the binary needs: {refused:?}"
    );
}

#[tokio::test]
async fn without_landlock_the_seccomp_filter_alone_stops_a_program_from_running_and_off_lets_it() {
    for (extra, expected) in [
        ("", "Operation not permitted (os error 1)"),
        ("[process]\nseccomp = \"off\"\n", "ok"),
    ] {
        let (_dir, _up, path) = write_config(extra).await;
        let p = Portcullis::run_with_env(&path, &[NO_LANDLOCK, (PROBE, "exec:/bin/true")]);
        assert!(p.ready, "did not start:\n{}", p.output());
        assert!(p.output().contains("no sandbox"), "{}", p.output());
        let result = probe_result(
            |limit| p.wait_for_log(|l| l.contains("sandbox probe: exec /bin/true: "), limit),
            "exec /bin/true",
        );
        assert_eq!(result, expected, "{extra:?}");
    }
}

#[tokio::test]
async fn under_seccomp_kill_running_a_program_kills_the_process_with_sigsys() {
    use std::os::unix::process::ExitStatusExt;
    let (_dir, _up, path) = write_config("[process]\nseccomp = \"kill\"\n").await;
    let mut p = Portcullis::run_with_env(&path, &[NO_LANDLOCK, (PROBE, "exec:/bin/true")]);
    assert!(p.ready, "did not start:\n{}", p.output());
    let status = p.wait();
    // SIGSYS (31 on x86-64 and aarch64): the signal a seccomp kill delivers.
    assert_eq!(status.signal(), Some(31), "{status:?}\n{}", p.output());
    assert!(
        !p.output().contains("sandbox probe: exec"),
        "{}",
        p.output()
    );
}
