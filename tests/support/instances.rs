//! Several app instances, as a deployment runs them: Debian's gunicorn serving
//! tests/fixtures/flask_instance.py, each answering every path with its own name, on TCP (a port it
//! picks) or a unix socket. An instance can die as a crashed one does (SIGKILL to its whole process
//! group: the master and its workers, as systemd stops a unit) and start again on the same address.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::Client;

/// What gunicorn printed, shared with the thread that reads its stderr.
#[derive(Default)]
struct Lines {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

pub struct Instance {
    pub name: String,
    /// As gunicorn's `--bind` takes it: `127.0.0.1:PORT` (port 0 until the first start) or `unix:PATH`.
    bind: String,
    child: Option<Child>,
    lines: Arc<Lines>,
}

impl Instance {
    /// An instance on 127.0.0.1 and a port of its choosing (kept for restarts).
    pub fn tcp(name: &str) -> Instance {
        Instance::start(name, "127.0.0.1:0".to_owned())
    }

    /// An instance on the unix socket `path`.
    pub fn unix(name: &str, path: &Path) -> Instance {
        Instance::start(name, format!("unix:{}", path.display()))
    }

    fn start(name: &str, bind: String) -> Instance {
        let mut i = Instance {
            name: name.to_owned(),
            bind,
            child: None,
            lines: Arc::default(),
        };
        i.restart();
        i
    }

    /// The config's `servers` entry for this instance.
    pub fn addr(&self) -> String {
        self.bind.clone()
    }

    /// The socket path of a unix instance.
    pub fn socket(&self) -> Option<PathBuf> {
        self.bind.strip_prefix("unix:").map(PathBuf::from)
    }

    /// Starts it (again) on its address; returns when it logged `Listening at:` (its port is open then),
    /// with that moment.
    pub fn restart(&mut self) -> Instant {
        assert!(self.child.is_none(), "{} is running", self.name);
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        self.lines = Arc::default();
        let mut child = Command::new("/usr/bin/gunicorn")
            .args(["--bind", &self.bind, "--workers", "2", "--chdir"])
            .arg(&fixtures)
            .env("INSTANCE", &self.name)
            .arg("flask_instance:app")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("/usr/bin/gunicorn is needed (Debian packages gunicorn and python3-flask)");
        let stderr = child.stderr.take().unwrap();
        let lines = self.lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                lines.lines.lock().unwrap().push(line);
                lines.changed.notify_all();
            }
            lines.lines.lock().unwrap().push("<eof>".into());
            lines.changed.notify_all();
        });
        self.child = Some(child);
        let line = self.wait_for(|l| l.contains("Listening at: ") || l == "<eof>");
        let at = Instant::now();
        assert!(
            line.contains("Listening at: "),
            "{} did not start:\n{}",
            self.name,
            self.lines.lines.lock().unwrap().join("\n")
        );
        if self.bind.ends_with(":0") {
            // "[INFO] Listening at: http://127.0.0.1:PORT (PID)"
            let url = line.split("Listening at: http://").nth(1).unwrap();
            self.bind = url.split_whitespace().next().unwrap().to_owned();
        }
        at
    }

    /// Kills the master and its workers at once (SIGKILL to the process group), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn wait_for(&self, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut lines = self.lines.lines.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().find(|l| pred(l)) {
                return l.clone();
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "{}: gunicorn said nothing useful",
                self.name
            );
            lines = self
                .lines
                .changed
                .wait_timeout(lines, deadline - now)
                .unwrap()
                .0;
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `GET path` through the proxy (a new connection), as the client `xff` when given (sent as
/// `X-Forwarded-For`: the config must trust the test's 127.0.0.1); the status and the body as text.
pub async fn get(
    client: &Client,
    addr: std::net::SocketAddr,
    path: &str,
    xff: Option<&str>,
) -> (u16, String) {
    let mut req = Request::get(path);
    if let Some(x) = xff {
        req = req.header("x-forwarded-for", x);
    }
    let res = client
        .send(addr, req.body(Full::<Bytes>::default()).unwrap())
        .await;
    (
        res.status().as_u16(),
        String::from_utf8_lossy(res.body()).into_owned(),
    )
}
