//! Test support: start the real `portcullis` binary on port 0 and wait for its readiness line, a test CA
//! with leaf certificates, TLS clients (rustls, h1 and h2), and a recording upstream (hyper, TCP or unix
//! socket) whose endpoints play the app: echo, slow, large, upload, WebSocket-style upgrade; gunicorn with
//! sync workers and the logs that say which requests reached it; and app instances (`instances.rs`:
//! gunicorn + Flask) that can be killed and restarted.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: a failed step should fail the test loudly

pub mod admin;
pub mod client;
pub mod gunicorn;
pub mod h2raw;
pub mod instances;
pub mod load;
pub mod redis;
pub mod upstream;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

pub use client::Client;
pub use upstream::Upstream;

/// The `portcullis` binary built next to this test executable (target/debug/portcullis).
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("portcullis");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p portcullis` first (the README's test command does)",
        bin.display()
    );
    bin
}

/// The proxy's readiness line, exactly: `tracing::info!("ready")` in `portcullis` (proxy/src/main.rs), as
/// the text format writes it (`TIMESTAMP  INFO portcullis: ready`) or the JSON one (`"message":"ready"`,
/// target `portcullis`). Not any line that says "ready" somewhere: "Address already in use" is a failure.
pub fn is_ready_line(line: &str) -> bool {
    line.ends_with(" INFO portcullis: ready")
        || (line.starts_with('{')
            && line.contains("\"level\":\"INFO\"")
            && line.contains("\"message\":\"ready\"")
            && line.contains("\"target\":\"portcullis\""))
}

/// Whether this test process runs as root (uid 0), read from /proc.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// Runs `openssl ARGS` in `dir` (Debian package openssl); a failure fails the test with openssl's words.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl is needed (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `n` pseudo-random bytes (xorshift, fixed per `seed`): binary bodies full of CR, LF and every other byte.
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of `bytes`, as the `/sha256` endpoint of the recording upstream reports it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes).as_ref())
}

/// Runs `openssl s_client -connect ADDR -servername localhost ARGS` with no input; its standard output (a
/// completed handshake names its cipher; `-status` adds the stapled OCSP response).
pub fn s_client(addr: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            "localhost",
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("openssl is needed (Debian package openssl)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A temporary folder, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "portcullis-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A CA and a leaf for `names`, written as PEM files.
pub struct Pki {
    pub ca_pem: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    /// An ECDSA P-256 CA and leaf (for localhost, 127.0.0.1 and `names`) written into `dir`.
    pub fn new(dir: &Path, names: &[&str]) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Portcullis Test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let mut all: Vec<String> = vec!["localhost".into(), "127.0.0.1".into()];
        all.extend(names.iter().map(|n| n.to_string()));
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(all)
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let cert = dir.join("fullchain.pem");
        let key = dir.join("privkey.pem");
        std::fs::write(&cert, format!("{}{}", leaf.pem(), ca.pem())).unwrap();
        std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
        // A private key readable by others is refused by `check`, as it should be.
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let ca_pem = ca.pem();
        std::fs::write(dir.join("ca.pem"), &ca_pem).unwrap();
        Pki { ca_pem, cert, key }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.cert.parent().unwrap().join("ca.pem")
    }
}

/// What the proxy printed, shared with the thread that reads its stderr.
#[derive(Default)]
struct Log {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

/// A running `portcullis` process. Killed on drop if still running.
pub struct Portcullis {
    child: Child,
    log: Arc<Log>,
    pub https: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    /// The admin listener's TCP address (`[admin] listen` on TCP), from its log line.
    pub admin: Option<SocketAddr>,
    pub ready: bool,
}

impl Portcullis {
    /// `portcullis run --config FILE` with extra args; waits for "ready" (or exit).
    /// As root (CI), `--insecure-keep-root` is added: these tests are about HTTP, and their upstream sockets
    /// and files belong to root. The privilege tests start the binary themselves.
    pub fn run(config: &Path, extra: &[&str]) -> Portcullis {
        let mut args = vec!["run", "--config", config.to_str().unwrap()];
        if is_root() {
            args.push("--insecure-keep-root");
        }
        args.extend_from_slice(extra);
        Portcullis::start(&args)
    }

    /// As `run`, with `RUST_LOG=rust_log` (whatever `PORTCULLIS_TEST_LOG` says).
    pub fn run_with_log(config: &Path, rust_log: &str) -> Portcullis {
        let mut args = vec!["run", "--config", config.to_str().unwrap()];
        if is_root() {
            args.push("--insecure-keep-root");
        }
        Portcullis::start_with_log(&args, rust_log)
    }

    /// As `run`, with `env` added to the environment (`NOTIFY_SOCKET`, say).
    pub fn run_with_env(config: &Path, env: &[(&str, &str)]) -> Portcullis {
        let mut args = vec!["run", "--config", config.to_str().unwrap()];
        if is_root() {
            args.push("--insecure-keep-root");
        }
        let log = std::env::var("PORTCULLIS_TEST_LOG").unwrap_or_else(|_| "info".into());
        Portcullis::start_with(&args, &log, env)
    }

    /// Starts the binary with `args` and waits until it logs its readiness line ([`is_ready_line`]) or exits.
    pub fn start(args: &[&str]) -> Portcullis {
        let log = std::env::var("PORTCULLIS_TEST_LOG").unwrap_or_else(|_| "info".into());
        Portcullis::start_with_log(args, &log)
    }

    fn start_with_log(args: &[&str], rust_log: &str) -> Portcullis {
        Portcullis::start_with(args, rust_log, &[])
    }

    fn start_with(args: &[&str], rust_log: &str, env: &[(&str, &str)]) -> Portcullis {
        let mut child = Command::new(binary())
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn portcullis");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Log::default());
        let reader_log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("PORTCULLIS_TEST_ECHO").is_some() {
                    eprintln!("[portcullis] {line}");
                }
                reader_log.lines.lock().unwrap().push(line);
                reader_log.changed.notify_all();
            }
            reader_log.lines.lock().unwrap().push("<eof>".into());
            reader_log.changed.notify_all();
        });
        let mut p = Portcullis {
            child,
            log,
            https: None,
            http: None,
            admin: None,
            ready: false,
        };
        p.ready = p
            .wait_for_log(
                |l| is_ready_line(l) || l == "<eof>",
                Duration::from_secs(30),
            )
            .is_some_and(|l| l != "<eof>");
        p.https = p.find_addr("listening on https://");
        p.http = p.find_addr("listening on http://");
        p.admin = p.find_addr("admin listener on http://");
        p
    }

    fn find_addr(&self, marker: &str) -> Option<SocketAddr> {
        self.lines().iter().find_map(|l| {
            let rest = &l[l.find(marker)? + marker.len()..];
            let end = rest
                .find(|c: char| c.is_whitespace() || c == '"')
                .unwrap_or(rest.len());
            rest[..end].parse().ok()
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn lines(&self) -> Vec<String> {
        self.log.lines.lock().unwrap().clone()
    }

    /// Everything logged so far, one string.
    pub fn output(&self) -> String {
        self.lines().join("\n")
    }

    /// Waits (up to `limit`, a safety net, not an assertion) for a log line matching `pred`.
    pub fn wait_for_log(&self, pred: impl Fn(&str) -> bool, limit: Duration) -> Option<String> {
        self.wait_for_nth(pred, 1, limit)
    }

    /// Waits (up to `limit`, a safety net) until `n` log lines match `pred`; returns the `n`th.
    pub fn wait_for_nth(
        &self,
        pred: impl Fn(&str) -> bool,
        n: usize,
        limit: Duration,
    ) -> Option<String> {
        let deadline = std::time::Instant::now() + limit;
        let mut lines = self.log.lines.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().filter(|l| pred(l)).nth(n.saturating_sub(1)) {
                return Some(l.clone());
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return None;
            }
            lines = self
                .log
                .changed
                .wait_timeout(lines, deadline - now)
                .unwrap()
                .0;
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit (a safety limit of 60 s).
    pub fn wait(&mut self) -> ExitStatus {
        for _ in 0..6000 {
            if let Some(s) = self.child.try_wait().unwrap() {
                // Let the reader thread drain the pipe.
                self.wait_for_log(|l| l == "<eof>", Duration::from_secs(5));
                return s;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("portcullis did not exit; log:\n{}", self.output());
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    pub fn https_addr(&self) -> SocketAddr {
        self.https
            .unwrap_or_else(|| panic!("no https listener; log:\n{}", self.output()))
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .unwrap_or_else(|| panic!("no admin listener; log:\n{}", self.output()))
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http
            .unwrap_or_else(|| panic!("no http listener; log:\n{}", self.output()))
    }
}

impl Drop for Portcullis {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A config for one upstream, with `extra` TOML appended: HTTPS and HTTP on 127.0.0.1:0, buffered bodies
/// in a `buffers` folder beside the certificate (the test's own).
pub fn config(pki: &Pki, upstream: &str, extra: &str) -> String {
    let temp_dir = format!(
        "temp_dir = \"{}\"\n",
        pki.cert.with_file_name("buffers").display()
    );
    let extra = if extra.contains("[process]\n") {
        extra.replacen("[process]\n", &format!("[process]\n{temp_dir}"), 1)
    } else {
        format!("{extra}\n[process]\n{temp_dir}")
    };
    format!(
        r#"[listen]
https = ["127.0.0.1:0"]
http = ["127.0.0.1:0"]

[tls]
cert = "{}"
key = "{}"

[[route]]
path = "/"
upstream = "app"

[upstream.app]
servers = ["{upstream}"]

{extra}
"#,
        pki.cert.display(),
        pki.key.display()
    )
}

/// A test setup in one call: temp dir, PKI, recording upstream, and Portcullis in front of it.
pub struct Setup {
    pub dir: TempDir,
    pub pki: Pki,
    pub upstream: Upstream,
    pub proxy: Portcullis,
    pub client: Client,
}

impl Setup {
    /// `extra` is TOML appended to the config (top-level keys must come before any table: use `top`).
    pub async fn new(top: &str, extra: &str) -> Setup {
        Setup::with(top, extra, &[]).await
    }

    /// As `new`, with text replacements applied to the generated config (to add keys to its tables).
    pub async fn with(top: &str, extra: &str, replace: &[(&str, &str)]) -> Setup {
        let dir = TempDir::new("setup");
        let pki = Pki::new(dir.path(), &["app.test", "*.example.test"]);
        let upstream = Upstream::tcp().await;
        let mut text = format!("{top}\n{}", config(&pki, &upstream.addr_string(), extra));
        for (from, to) in replace {
            text = text.replacen(from, to, 1);
        }
        let path = dir.write("portcullis.toml", &text);
        let proxy = Portcullis::run(&path, &[]);
        assert!(
            proxy.ready,
            "portcullis did not start; log:\n{}",
            proxy.output()
        );
        let client = Client::new(&pki.ca_pem);
        Setup {
            dir,
            pki,
            upstream,
            proxy,
            client,
        }
    }

    pub fn https(&self) -> SocketAddr {
        self.proxy.https_addr()
    }
}

/// A test CA that can issue as many leaves as a test needs (other names, other validity).
pub struct TestCa {
    pub pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new() -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Portcullis Test CA 2");
        let pem = params.self_signed(&key).unwrap().pem();
        TestCa {
            pem,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// Issues a leaf for `names` valid until `not_after` (`None`: a year from the CA's default), writing
    /// `dir/stem.pem` (leaf then CA) and `dir/stem.key` (mode 0600). Returns the leaf's DER.
    pub fn issue(
        &self,
        dir: &Path,
        stem: &str,
        names: &[&str],
        not_after: Option<(i32, u8, u8)>,
    ) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        if let Some((y, m, d)) = not_after {
            params.not_before = rcgen::date_time_ymd(y - 1, 1, 1);
            params.not_after = rcgen::date_time_ymd(y, m, d);
        }
        let leaf = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::write(
            dir.join(format!("{stem}.pem")),
            format!("{}{}", leaf.pem(), self.pem),
        )
        .unwrap();
        let kp = dir.join(format!("{stem}.key"));
        std::fs::write(&kp, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&kp, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        leaf.der().to_vec()
    }

    pub fn client(&self) -> Client {
        Client::new(&self.pem)
    }
}

impl Default for TestCa {
    fn default() -> Self {
        TestCa::new()
    }
}
