//! For the privilege and systemd tests: start `portcullis` under another program (setpriv,
//! systemd-socket-activate) or with extra environment (NOTIFY_SOCKET), wait for its "ready" line, and read
//! every thread's credentials from /proc. tests/support's `Portcullis` covers the plain start.

// reason: included by two test binaries (privilege.rs, systemd.rs), each using a part of it
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use portcullis_tests::{Pki, TempDir, Upstream};

/// A process started by a test, its stderr collected line by line. Killed on drop if still running.
pub struct Launched {
    child: Child,
    log: Arc<(Mutex<Vec<String>>, Condvar)>,
    pub ready: bool,
}

impl Launched {
    /// Spawns `cmd` (stderr captured) and waits for a line saying "ready", or for the process to end.
    pub fn start(cmd: Command) -> Launched {
        let mut l = Launched::spawn(cmd);
        l.wait_ready();
        l
    }

    /// Spawns `cmd` with its stderr captured, without waiting for anything.
    pub fn spawn(mut cmd: Command) -> Launched {
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let reader = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("PORTCULLIS_TEST_ECHO").is_some() {
                    eprintln!("[portcullis] {line}");
                }
                reader.0.lock().expect("log lock").push(line);
                reader.1.notify_all();
            }
            reader.0.lock().expect("log lock").push("<eof>".into());
            reader.1.notify_all();
        });
        Launched {
            child,
            log,
            ready: false,
        }
    }

    /// Waits for the "ready" line (true) or the end of the process (false).
    pub fn wait_ready(&mut self) -> bool {
        self.ready = self
            .wait_for(
                |line| portcullis_tests::is_ready_line(line) || line == "<eof>",
                Duration::from_secs(30),
            )
            .is_some_and(|line| line != "<eof>");
        self.ready
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn output(&self) -> String {
        self.log.0.lock().expect("log lock").join("\n")
    }

    /// The first line matching `pred`, waiting up to `limit` (a safety net, not a sleep).
    pub fn wait_for(&self, pred: impl Fn(&str) -> bool, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        let mut lines = self.log.0.lock().expect("log lock");
        loop {
            if let Some(l) = lines.iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            lines = self
                .log
                .1
                .wait_timeout(lines, deadline - now)
                .expect("log lock")
                .0;
        }
    }

    /// The address after "listening on {scheme}://" in the log.
    pub fn listening(&self, scheme: &str) -> Option<SocketAddr> {
        let marker = format!("listening on {scheme}://");
        let line = self.wait_for(|l| l.contains(&marker), Duration::from_secs(1))?;
        let rest = &line[line.find(&marker)? + marker.len()..];
        rest.split(|c: char| c.is_whitespace() || c == '"')
            .next()?
            .parse()
            .ok()
    }

    /// Sends SIGTERM and waits (up to 30 s) for the process to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -TERM {} failed", self.pid());
        self.wait()
    }

    /// Waits (up to 30 s) for the process to exit and its stderr to be read.
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.wait_for(|l| l == "<eof>", Duration::from_secs(5));
                return status;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("process did not exit; log:\n{}", self.output());
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One thread's credentials, from /proc/PID/task/TID/status.
#[derive(Debug)]
pub struct ThreadCreds {
    pub tid: String,
    pub uid: Vec<u32>,
    pub gid: Vec<u32>,
    pub groups: Vec<u32>,
    pub cap_inh: u64,
    pub cap_prm: u64,
    pub cap_eff: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
    pub no_new_privs: bool,
    /// The `Seccomp:` mode: 0 none, 2 a filter.
    pub seccomp: u32,
}

/// Every thread of process `pid`.
pub fn threads(pid: u32) -> Vec<ThreadCreds> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).expect("read /proc/PID/task") {
        let entry = entry.expect("task entry");
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .unwrap_or_else(|| panic!("no {name} in {status}"))
                .trim()
                .to_owned()
        };
        let ids = |name: &str| -> Vec<u32> {
            field(name)
                .split_whitespace()
                .map(|n| n.parse().expect("id"))
                .collect()
        };
        let cap = |name: &str| u64::from_str_radix(&field(name), 16).expect("hex capability set");
        out.push(ThreadCreds {
            tid: entry.file_name().to_string_lossy().into_owned(),
            uid: ids("Uid"),
            gid: ids("Gid"),
            groups: ids("Groups"),
            cap_inh: cap("CapInh"),
            cap_prm: cap("CapPrm"),
            cap_eff: cap("CapEff"),
            cap_bnd: cap("CapBnd"),
            cap_amb: cap("CapAmb"),
            no_new_privs: field("NoNewPrivs") == "1",
            seccomp: field("Seccomp").parse().expect("Seccomp mode"),
        });
    }
    out
}

/// These tests change users and bind privileged ports: CI runs them as root; anywhere else they fail
/// loudly rather than pass without having run.
pub fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .expect("Uid line");
    assert_eq!(
        euid, "0",
        "this test must run as root (CI does): it switches users and binds privileged ports"
    );
}

/// `preferred` if it can be bound on 127.0.0.1 right now, else the first free port of `fallback`.
pub fn free_port(preferred: u16, fallback: impl IntoIterator<Item = u16>) -> u16 {
    std::iter::once(preferred)
        .chain(fallback)
        .find(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port")
}

/// The uid and gid of `nobody`, from /etc/passwd.
pub fn nobody() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    let line = passwd
        .lines()
        .find(|l| l.starts_with("nobody:"))
        .expect("a `nobody` user");
    let f: Vec<&str> = line.split(':').collect();
    (f[2].parse().expect("uid"), f[3].parse().expect("gid"))
}

/// A deployment for `nobody`: a temp dir, a PKI whose private key is owned by `nobody` with mode 0600
/// (readable by the service user, by no other), and a recording upstream.
pub struct Deployment {
    pub dir: TempDir,
    pub pki: Pki,
    pub upstream: Upstream,
}

impl Deployment {
    pub async fn new(tag: &str) -> Deployment {
        let dir = TempDir::new(tag);
        let pki = Pki::new(dir.path(), &[]);
        let (uid, gid) = nobody();
        std::os::unix::fs::chown(&pki.key, Some(uid), Some(gid)).expect("chown the key");
        std::fs::set_permissions(&pki.key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        // The config's `[process] temp_dir`, made for the service user as an operator would (a process
        // started as nobody cannot create it inside this root-owned folder).
        let buffers = pki.cert.with_file_name("buffers");
        std::fs::create_dir(&buffers).expect("mkdir buffers");
        std::os::unix::fs::chown(&buffers, Some(uid), Some(gid)).expect("chown buffers");
        let upstream = Upstream::tcp().await;
        Deployment { dir, pki, upstream }
    }
}

/// Asserts from /proc that every thread of `pid` runs as `(uid, gid)` (real, effective, saved, fs) in no
/// root group, with empty effective, permitted, inheritable and ambient sets and NoNewPrivs (and an empty
/// bounding set, with `bounding`). Returns how many threads there were.
pub fn assert_unprivileged(pid: u32, (uid, gid): (u32, u32), bounding: bool) -> usize {
    let all = threads(pid);
    for t in &all {
        let ids = (
            t.uid.iter().all(|u| *u == uid),
            t.gid.iter().all(|g| *g == gid),
        );
        assert_eq!(
            ids,
            (true, true),
            "thread {}: uid {:?} gid {:?}",
            t.tid,
            t.uid,
            t.gid
        );
        assert!(
            !t.groups.contains(&0),
            "thread {}: groups {:?}",
            t.tid,
            t.groups
        );
        assert_eq!(
            (t.cap_eff, t.cap_prm, t.cap_inh, t.cap_amb),
            (0, 0, 0, 0),
            "thread {}: CapEff/CapPrm/CapInh/CapAmb",
            t.tid
        );
        if bounding {
            assert_eq!(t.cap_bnd, 0, "thread {}: CapBnd", t.tid);
        }
        assert!(t.no_new_privs, "thread {}: NoNewPrivs", t.tid);
    }
    all.len()
}
