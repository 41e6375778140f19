//! A real `redis-server` (Debian's) for the cluster tests: started on a unix socket in the test's own
//! folder (no TCP port), with a password, no persistence, and stopped by PID (SIGKILL, as a crash would).
//! It can start again on the same socket, empty. [`RedisServer::start_tls`] serves TLS on a free loopback
//! port instead, with a certificate of the test's CA.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub struct RedisServer {
    pub socket: PathBuf,
    pub password: String,
    dir: PathBuf,
    child: Option<Child>,
    /// `rediss://127.0.0.1:PORT/0` and the CA file, when it serves TLS.
    tls: Option<(String, PathBuf)>,
    args: Vec<String>,
}

impl RedisServer {
    /// Starts one in `dir` and waits for its "ready to accept connections" line.
    pub fn start(dir: &Path) -> RedisServer {
        let mut r = RedisServer {
            socket: dir.join("redis.sock"),
            password: "correct horse battery staple".into(),
            dir: dir.to_owned(),
            child: None,
            tls: None,
            args: Vec::new(),
        };
        r.restart();
        r
    }

    /// One serving TLS only (no plain port, no socket) on a free loopback port, with `pki`'s leaf.
    pub fn start_tls(dir: &Path, pki: &crate::Pki) -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = RedisServer {
            socket: dir.join("unused.sock"),
            password: "correct horse battery staple".into(),
            dir: dir.to_owned(),
            child: None,
            tls: Some((format!("rediss://127.0.0.1:{port}/0"), pki.ca_path())),
            args: [
                "--bind",
                "127.0.0.1",
                "--tls-port",
                &port.to_string(),
                "--tls-cert-file",
                &pki.cert.display().to_string(),
                "--tls-key-file",
                &pki.key.display().to_string(),
                "--tls-auth-clients",
                "no",
            ]
            .map(String::from)
            .to_vec(),
        };
        r.restart();
        r
    }

    /// `[cluster]` for this server: its socket and the password in a file beside it.
    pub fn cluster_toml(&self, extra: &str) -> String {
        let pass = self.dir.join("redis.pass");
        std::fs::write(&pass, format!("{}\n", self.password)).unwrap();
        let at = match &self.tls {
            Some((url, ca)) => format!("redis = \"{url}\"\nca_file = \"{}\"", ca.display()),
            None => format!("redis = \"unix://{}\"", self.socket.display()),
        };
        format!(
            "[cluster]\n{at}\npassword_file = \"{}\"\n{extra}\n",
            pass.display()
        )
    }

    /// Starts it again (after [`RedisServer::kill`]), on the same socket, empty.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server is running");
        let _ = std::fs::remove_file(&self.socket);
        let mut command = Command::new("redis-server");
        command.args(["--port", "0"]);
        if self.tls.is_some() {
            command.args(&self.args);
        } else {
            command.arg("--unixsocket").arg(&self.socket);
        }
        let mut child = command
            .args([
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--requirepass", &self.password, "--dir"])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian's redis-server package; scripts/test installs it)");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if line.to_lowercase().contains("ready to accept connections") {
                    let _ = tx.send(());
                }
            }
        });
        // Kept first, so that a server that never becomes ready is still killed on drop.
        self.child = Some(child);
        rx.recv_timeout(Duration::from_secs(20))
            .expect("redis-server did not become ready");
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`), by PID: a Redis that stops answering, its connections open.
    pub fn pause(&self, stop: bool) {
        let pid = self.child.as_ref().expect("redis-server is running").id();
        let sig = if stop { "-STOP" } else { "-CONT" };
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    }

    /// SIGKILL, by PID, and reaped.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // A stopped process dies of SIGKILL as well.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
