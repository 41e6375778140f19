//! A real `redis-server` (Debian's) for the cluster tests: started on a unix socket in the test's own
//! folder (no TCP port), with a password, no persistence, and stopped by PID (SIGKILL, as a crash would).
//! It can start again on the same socket, empty.

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
}

impl RedisServer {
    /// Starts one in `dir` and waits for its "ready to accept connections" line.
    pub fn start(dir: &Path) -> RedisServer {
        let mut r = RedisServer {
            socket: dir.join("redis.sock"),
            password: "correct horse battery staple".into(),
            dir: dir.to_owned(),
            child: None,
        };
        r.restart();
        r
    }

    /// `[cluster]` for this server: its socket and the password in a file beside it.
    pub fn cluster_toml(&self, extra: &str) -> String {
        let pass = self.dir.join("redis.pass");
        std::fs::write(&pass, format!("{}\n", self.password)).unwrap();
        format!(
            "[cluster]\nredis = \"unix://{}\"\npassword_file = \"{}\"\n{extra}\n",
            self.socket.display(),
            pass.display()
        )
    }

    /// Starts it again (after [`RedisServer::kill`]), on the same socket, empty.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server is running");
        let _ = std::fs::remove_file(&self.socket);
        let mut child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&self.socket)
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
                if line.contains("ready to accept connections") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("redis-server did not become ready");
        self.child = Some(child);
    }

    /// SIGKILL, by PID, and reaped.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
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
