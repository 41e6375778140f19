//! Debian's gunicorn with synchronous workers (`-k sync`, one request at a time each) serving a Flask
//! fixture from tests/fixtures on a unix socket, with the two logs a test reads to know what reached the app:
//! gunicorn's access log (a line when a request ends, if its answer could be written) and the fixture's seen
//! log (`SEEN_LOG`: a line when a worker starts a request, before reading its body).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running gunicorn, stopped on drop: SIGQUIT to its arbiter (by PID), which ends its workers at once and
/// exits; SIGKILL after 5 s (its workers would then notice only at their next loop, up to 15 s later).
pub struct Gunicorn {
    child: Child,
    socket: PathBuf,
    access_log: PathBuf,
    seen_log: PathBuf,
    error_log: PathBuf,
}

impl Gunicorn {
    /// `gunicorn -k sync -w WORKERS APP` (`module:variable` in tests/fixtures) on `DIR/gunicorn.sock`, its
    /// logs in `dir`; returns once the socket exists (gunicorn binds it before booting the workers, which
    /// then accept what waits in its backlog).
    pub fn start(dir: &Path, app: &str, workers: u32) -> Gunicorn {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        let socket = dir.join("gunicorn.sock");
        let access_log = dir.join("gunicorn-access.log");
        let seen_log = dir.join("app-seen.log");
        let error_log = dir.join("gunicorn-error.log");
        std::fs::write(&seen_log, "").unwrap();
        let child = Command::new("/usr/bin/gunicorn")
            .args(["--worker-class", "sync", "--workers", &workers.to_string()])
            .arg("--bind")
            .arg(format!("unix:{}", socket.display()))
            .arg("--access-logfile")
            .arg(&access_log)
            // The default format, and the request's duration in seconds (%(L)s).
            .args([
                "--access-logformat",
                r#"%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" %(L)s"#,
            ])
            .arg("--error-logfile")
            .arg(&error_log)
            .arg("--chdir")
            .arg(&fixtures)
            .arg(app)
            .env("SEEN_LOG", &seen_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("/usr/bin/gunicorn is needed (Debian packages gunicorn and python3-flask; the test command installs them)");
        let mut g = Gunicorn {
            child,
            socket,
            access_log,
            seen_log,
            error_log,
        };
        for _ in 0..1000 {
            if g.socket.exists() {
                return g;
            }
            if let Ok(Some(status)) = g.child.try_wait() {
                panic!("gunicorn exited: {status}\n{}", g.error_log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("gunicorn did not create {}", g.socket.display());
    }

    /// The upstream server as Portcullis' config names it: `unix:PATH`.
    pub fn upstream(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    /// gunicorn's access log so far.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(&self.access_log).unwrap_or_default()
    }

    /// The seen log so far: `PID METHOD PATH?QUERY` per request a worker started.
    pub fn seen(&self) -> String {
        std::fs::read_to_string(&self.seen_log).unwrap_or_default()
    }

    /// gunicorn's error log so far (worker boots, timeouts, tracebacks).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(&self.error_log).unwrap_or_default()
    }
}

impl Drop for Gunicorn {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-QUIT", &self.child.id().to_string()])
                .status();
            for _ in 0..500 {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
