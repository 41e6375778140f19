//! Pebble, the ACME server Let's Encrypt publishes for testing (Debian package `pebble`), with
//! pebble-challtestsrv as its DNS server (every name is 127.0.0.1, no AAAA, its own challenge listeners off).
//! Both run on free loopback ports with their config in a temp dir, are waited on through their log lines
//! and a port accepting, and are stopped by PID on drop. Validation is real (no PEBBLE_VA_ALWAYS_VALID):
//! Pebble's `httpPort`/`tlsPort` are the ports Portcullis listens on. Its API certificate comes from a test
//! CA (the Debian package lacks the one its example config names), passed to Portcullis as `ca_root`.
//! [`Pebble::set_host`] points one name at another loopback address (challtestsrv's `/add-a`), so that
//! the CA validates each name at the node a test chooses.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use portcullis_tests::{Client, Pki, TempDir};

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What Pebble is told.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where it validates HTTP-01 and TLS-ALPN-01: Portcullis' listeners.
    pub http_port: u16,
    pub tls_port: u16,
    /// Its ACME API (the directory is `https://127.0.0.1:<acme_port>/dir`).
    pub acme_port: u16,
    /// `certificateValidityPeriod`, seconds (Pebble's default: five years).
    pub validity: Option<u64>,
    /// PEBBLE_VA_NOSLEEP=1: validate at once instead of after a random 0..N s sleep.
    pub nosleep: bool,
    /// PEBBLE_VA_SLEEPTIME: that N (when `nosleep` is off).
    pub sleep_time: Option<u32>,
    /// Pebble's default 5 % bad-nonce rejections (else PEBBLE_WFE_NONCEREJECT=0).
    pub reject_nonces: bool,
}

impl Options {
    pub fn new(http_port: u16, tls_port: u16) -> Options {
        Options {
            http_port,
            tls_port,
            acme_port: free_port(),
            validity: None,
            nosleep: true,
            sleep_time: None,
            reject_nonces: false,
        }
    }
}

/// A child process whose stdout and stderr lines are collected.
struct Proc {
    child: Child,
    out: Arc<Output>,
}

#[derive(Default)]
struct Output {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

impl Proc {
    fn spawn(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?} (apt-get install pebble): {e}"));
        let out = Arc::new(Output::default());
        let pipes: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        for pipe in pipes {
            let out = out.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if std::env::var_os("PORTCULLIS_TEST_ECHO").is_some() {
                        eprintln!("[pebble] {line}");
                    }
                    out.lines.lock().unwrap().push(line);
                    out.changed.notify_all();
                }
            });
        }
        Proc { child, out }
    }

    fn wait_for(&self, pred: impl Fn(&str) -> bool, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        let mut lines = self.out.lines.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            lines = self
                .out
                .changed
                .wait_timeout(lines, deadline - now)
                .unwrap()
                .0;
        }
    }

    fn lines(&self) -> Vec<String> {
        self.out.lines.lock().unwrap().clone()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Our own child, by PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pebble and its DNS server: configured at `new`, running after `start`.
pub struct Pebble {
    /// The ACME directory URL.
    pub directory: String,
    /// The test CA that signed Pebble's API certificate (Portcullis' `ca_root`).
    pub api_ca: PathBuf,
    pub management: SocketAddr,
    /// pebble-challtestsrv's management API (its DNS answers), while it runs.
    dns_management: Option<SocketAddr>,
    api_ca_pem: String,
    options: Options,
    config: PathBuf,
    running: Option<(Proc, Proc)>,
    dir: TempDir,
}

impl Pebble {
    /// Configured and started.
    pub fn start(options: Options) -> Pebble {
        let mut p = Pebble::new(options);
        p.run();
        p
    }

    /// Configured only: the directory URL and `ca_root` exist, nothing listens yet.
    pub fn new(options: Options) -> Pebble {
        let dir = TempDir::new("pebble");
        let pki = Pki::new(dir.path(), &[]);
        let management: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let validity = options.validity.map_or(String::new(), |v| {
            format!(",\n    \"certificateValidityPeriod\": {v}")
        });
        let config = dir.write(
            "pebble.json",
            &format!(
                r#"{{
  "pebble": {{
    "listenAddress": "127.0.0.1:{}",
    "managementListenAddress": "{management}",
    "certificate": "{}",
    "privateKey": "{}",
    "httpPort": {},
    "tlsPort": {},
    "ocspResponderURL": "",
    "externalAccountBindingRequired": false{validity}
  }}
}}
"#,
                options.acme_port,
                pki.cert.display(),
                pki.key.display(),
                options.http_port,
                options.tls_port
            ),
        );
        Pebble {
            directory: format!("https://127.0.0.1:{}/dir", options.acme_port),
            api_ca: pki.ca_path(),
            management,
            dns_management: None,
            api_ca_pem: pki.ca_pem,
            options,
            config,
            running: None,
            dir,
        }
    }

    /// Starts pebble-challtestsrv (DNS) then Pebble, and waits until both answer.
    pub fn run(&mut self) {
        let dns_port = free_port();
        let dns_management: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let dns = Proc::spawn(Command::new("pebble-challtestsrv").args([
            "-management",
            &dns_management.to_string(),
            "-dns01",
            &format!("127.0.0.1:{dns_port}"),
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
            // No AAAA answers: Portcullis listens on 127.0.0.1 only, and Pebble would try ::1 first.
            "-defaultIPv6",
            "",
        ]));
        dns.wait_for(
            |l| l.contains("Starting management server"),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|| panic!("pebble-challtestsrv did not start: {:?}", dns.lines()));
        let mut cmd = Command::new("pebble");
        cmd.args([
            "-config",
            self.config.to_str().unwrap(),
            "-dnsserver",
            &format!("127.0.0.1:{dns_port}"),
        ])
        .current_dir(self.dir.path())
        .env_remove("PEBBLE_VA_ALWAYS_VALID");
        if self.options.nosleep {
            cmd.env("PEBBLE_VA_NOSLEEP", "1");
        }
        if let Some(n) = self.options.sleep_time {
            cmd.env("PEBBLE_VA_SLEEPTIME", n.to_string());
        }
        if !self.options.reject_nonces {
            cmd.env("PEBBLE_WFE_NONCEREJECT", "0");
        }
        let pebble = Proc::spawn(&mut cmd);
        pebble
            .wait_for(
                |l| l.contains("ACME directory available at"),
                Duration::from_secs(10),
            )
            .unwrap_or_else(|| panic!("pebble did not start: {:?}", pebble.lines()));
        // It logs just before it listens: wait for the ports to accept as well.
        for addr in [
            format!("127.0.0.1:{}", self.options.acme_port)
                .parse()
                .unwrap(),
            self.management,
        ] {
            let deadline = Instant::now() + Duration::from_secs(10);
            while TcpStream::connect(addr).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "pebble does not listen on {addr}"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.running = Some((pebble, dns));
        self.dns_management = Some(dns_management);
    }

    /// From now on the DNS answers `ip` (an IPv4 address) for `host` (the CA resolves at each validation).
    #[allow(dead_code)] // used by cluster_acme.rs, not by acme.rs
    pub fn set_host(&self, host: &str, ip: &str) {
        use std::io::Write;
        let addr = self.dns_management.expect("pebble-challtestsrv runs");
        let body = format!(r#"{{"host":"{host}.","addresses":["{ip}"]}}"#);
        let mut tcp = TcpStream::connect(addr).unwrap();
        write!(
            tcp,
            "POST /add-a HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "add-a {host}: {answer}");
    }

    /// The folder Portcullis keeps this CA's account and certificates in, under its state_dir.
    pub fn state_folder(&self) -> String {
        format!("127.0.0.1_{}_dir", self.options.acme_port)
    }

    /// Pebble's issuing root, new at every start (`/roots/0` on the management port).
    pub async fn root_pem(&self) -> String {
        let res = Client::new(&self.api_ca_pem)
            .get(self.management, "/roots/0")
            .await;
        assert_eq!(res.status(), 200);
        String::from_utf8(res.into_body().to_vec()).unwrap()
    }

    /// A client that trusts what Pebble issues.
    pub async fn client(&self) -> Client {
        Client::new(&self.root_pem().await)
    }

    pub fn log(&self) -> Vec<String> {
        self.running
            .as_ref()
            .map(|(p, _)| p.lines())
            .unwrap_or_default()
    }

    /// Orders Pebble has accepted so far.
    pub fn orders(&self) -> usize {
        self.log()
            .iter()
            .filter(|l| l.contains("Added order"))
            .count()
    }

    /// Accounts Pebble has created so far.
    pub fn accounts(&self) -> usize {
        self.log()
            .iter()
            .filter(|l| l.contains("accounts in memory"))
            .count()
    }
}
