//! Active health checks: for every upstream with `health`, each of its servers gets `GET path` every
//! `interval` on a fresh connection (TCP or unix socket, HTTP/1.1 through hyper's `client::conn::http1`,
//! `Connection: close`), answered within `timeout`. A `2xx` or `3xx` is a pass. `fall` failures in a row take
//! the server down (`Server::set_checked(false)`), `rise` passes in a row bring it back, which also ends a
//! passive time-out (`max_fails`). Each change is logged with its reason. A server named by several upstreams
//! is checked once, by the first (in config order) whose `health` is set. A config reload re-plans the
//! tasks ([`Checks::replan`]): unchanged checks go on, changed and new ones start, others stop. Checks never
//! go through the request path: they are not in the access log and count no request in flight.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use portcullis_config::{Action, Config, Health, ServerAddr};
use tokio::net::{TcpStream, UnixStream};
use tokio::task::JoinHandle;

use super::{Groups, Server};
use crate::shutdown::Shutdown;

/// The checking tasks running now, one per server that some group with `health` names (each server once),
/// re-planned for each new config ([`Checks::replan`]). Held by the control task that reloads the config.
pub struct Checks {
    running: Vec<(Check, JoinHandle<()>)>,
    /// The bare-connect watch over the servers without active checks (`watch_return`), if any.
    returns: Option<JoinHandle<()>>,
    shutdown: Shutdown,
}

/// What [`Checks::replan`] changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replanned {
    pub kept: usize,
    pub started: usize,
    pub stopped: usize,
}

impl Checks {
    /// Starts the checks of the first config.
    pub fn start(config: &Config, groups: &Groups, shutdown: Shutdown) -> Checks {
        let mut checks = Checks {
            running: Vec::new(),
            returns: None,
            shutdown,
        };
        checks.replan(config, groups);
        checks
    }

    /// The checks of a new config: a server checked as before (same upstream, settings and `Host`) keeps
    /// its task; a changed or new check starts a task (the server keeps its verdict: a server down stays
    /// down until `rise` passes); a check no longer planned stops, and its server is no longer held down
    /// by it.
    pub fn replan(&mut self, config: &Config, groups: &Groups) -> Replanned {
        let mut out = Replanned::default();
        let mut old = std::mem::take(&mut self.running);
        for c in plan(config, groups) {
            if let Some(i) = old.iter().position(|(o, _)| *o == c) {
                self.running.push(old.swap_remove(i));
                out.kept += 1;
            } else {
                let handle = tokio::spawn(watch(c.clone(), self.shutdown.clone()));
                self.running.push((c, handle));
                out.started += 1;
            }
        }
        for (c, handle) in old {
            handle.abort();
            out.stopped += 1;
            if !self
                .running
                .iter()
                .any(|(n, _)| Arc::ptr_eq(&n.server, &c.server))
                && c.server.set_checked(true)
            {
                tracing::info!(upstream = %c.upstream, server = %c.server.addr, "upstream server no longer health-checked: back in");
            }
        }
        // Servers out after failures that no active check watches: a bare connect each second.
        let mut unchecked: Vec<Arc<Server>> = Vec::new();
        for group in groups.iter().filter(|g| g.max_fails > 0) {
            for m in group.members() {
                let checked = self
                    .running
                    .iter()
                    .any(|(c, _)| Arc::ptr_eq(&c.server, &m.server));
                if !checked && !unchecked.iter().any(|s| Arc::ptr_eq(s, &m.server)) {
                    unchecked.push(m.server.clone());
                }
            }
        }
        if let Some(old) = self.returns.take() {
            old.abort();
        }
        if !unchecked.is_empty() {
            self.returns = Some(tokio::spawn(watch_return(unchecked, self.shutdown.clone())));
        }
        out
    }
}

/// How often a server out after failures, without active checks, is tried with a bare connect.
const RETURN_PROBE: Duration = Duration::from_secs(1);

/// Servers without active checks that `max_fails` took out: every second, each one that is out gets a bare
/// connect (TCP or unix socket, within a second); one that accepts again is back at once, rather than after
/// the rest of `fail_timeout` (HAProxy's layer-4 check does the same). An app that accepts but still fails is
/// taken out again by its next failures, which are retried elsewhere by the usual rules.
async fn watch_return(servers: Vec<Arc<Server>>, mut shutdown: Shutdown) {
    let mut tick = tokio::time::interval(RETURN_PROBE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.begun() => return,
        }
        let now = Instant::now();
        let out: Vec<&Arc<Server>> = servers.iter().filter(|s| !s.is_up(now)).collect();
        if out.is_empty() {
            continue;
        }
        let probes = out.iter().map(|s| async move {
            let ok = tokio::time::timeout(RETURN_PROBE, accepts(&s.addr))
                .await
                .is_ok_and(|r| r.is_ok());
            (*s, ok)
        });
        let results = tokio::select! {
            r = futures_util::future::join_all(probes) => r,
            () = shutdown.begun() => return,
        };
        for (server, ok) in results {
            if ok && server.accepts_again() {
                tracing::info!(server = %server.addr, "upstream server is back: it accepts connections again");
            }
        }
    }
}

/// A bare connect, closed at once.
async fn accepts(addr: &ServerAddr) -> io::Result<()> {
    match addr {
        ServerAddr::Tcp(a) => TcpStream::connect(a).await.map(drop),
        ServerAddr::Unix(p) => UnixStream::connect(p).await.map(drop),
    }
}

/// One server's checks: what to ask, and for which upstream's log lines.
#[derive(Debug, Clone)]
struct Check {
    server: Arc<Server>,
    upstream: Arc<str>,
    health: Health,
    host: HeaderValue,
}

impl PartialEq for Check {
    /// The same check of the same server (the same `Server`, not only the same address).
    fn eq(&self, other: &Check) -> bool {
        Arc::ptr_eq(&self.server, &other.server)
            && self.upstream == other.upstream
            && self.health == other.health
            && self.host == other.host
    }
}

/// Every server to check, once each: by the first group (in config order) with `health` that names it.
fn plan(config: &Config, groups: &Groups) -> Vec<Check> {
    let mut checks: Vec<Check> = Vec::new();
    for (g, group) in groups.iter().enumerate() {
        let Some(health) = &group.health else {
            continue;
        };
        let host = host_for(config, g);
        for m in group.members() {
            if let Some(c) = checks.iter().find(|c| Arc::ptr_eq(&c.server, &m.server)) {
                if c.health != *health {
                    tracing::warn!(server = %m.server.addr, upstream = %group.name, checked_by = %c.upstream, "server is in several upstreams with different health settings: checked once, as the first says");
                }
                continue;
            }
            checks.push(Check {
                server: m.server.clone(),
                upstream: group.name.clone(),
                health: health.clone(),
                host: host.clone(),
            });
        }
    }
    checks
}

/// Checks one server every `interval` until shutdown begins, and turns the verdicts into its state.
async fn watch(check: Check, mut shutdown: Shutdown) {
    let Check {
        server,
        upstream,
        health,
        host,
    } = check;
    let mut tick = tokio::time::interval(health.interval);
    // A check that took its whole timeout is followed by the next one at once, then on schedule.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut streak = Streak::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.begun() => return,
        }
        let outcome = tokio::select! {
            o = probe(&server.addr, &host, &health.path, health.timeout) => o,
            () = shutdown.begun() => return,
        };
        let now = Instant::now();
        match streak.record(
            outcome.passed(),
            server.last_failure(),
            health.rise,
            health.fall,
        ) {
            Some(true) if !server.is_up(now) => {
                server.set_checked(true);
                tracing::info!(upstream = %upstream, server = %server.addr, check = %outcome, "upstream server is back: health check passed");
            }
            Some(false) if server.set_checked(false) => {
                tracing::warn!(upstream = %upstream, server = %server.addr, check = %outcome, fails = health.fall, "upstream server is down: health checks failed");
            }
            _ if !outcome.passed() => {
                tracing::debug!(upstream = %upstream, server = %server.addr, check = %outcome, "health check failed");
            }
            _ => {}
        }
    }
}

/// Passes and failures in a row, and the last passive failure already seen (one since the last check
/// starts the passes again: `rise` counts from the server's latest failure, whoever saw it).
#[derive(Debug, Default)]
struct Streak {
    passes: u32,
    fails: u32,
    seen_failure: u64,
}

impl Streak {
    /// Counts one check; `Some(up)` once the server has passed `rise` in a row (it should be in) or failed
    /// `fall` in a row (it should be out).
    fn record(&mut self, passed: bool, last_failure: u64, rise: u32, fall: u32) -> Option<bool> {
        if last_failure != self.seen_failure {
            self.seen_failure = last_failure;
            self.passes = 0;
        }
        if passed {
            self.passes = self.passes.saturating_add(1);
            self.fails = 0;
            (self.passes >= rise).then_some(true)
        } else {
            self.fails = self.fails.saturating_add(1);
            self.passes = 0;
            (self.fails >= fall).then_some(false)
        }
    }
}

/// What one check found.
#[derive(Debug)]
enum Outcome {
    Status(StatusCode),
    Refused,
    /// The unix socket is not there.
    Missing,
    TimedOut(Duration),
    /// Another connect error.
    Connect(io::Error),
    /// Connected, but no response head.
    Broken(String),
}

impl Outcome {
    fn passed(&self) -> bool {
        matches!(self, Outcome::Status(s) if s.is_success() || s.is_redirection())
    }

    fn connect(e: io::Error) -> Outcome {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => Outcome::Refused,
            io::ErrorKind::NotFound => Outcome::Missing,
            _ => Outcome::Connect(e),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Status(s) => write!(f, "status {}", s.as_u16()),
            Outcome::Refused => f.write_str("connect refused"),
            Outcome::Missing => f.write_str("socket missing"),
            Outcome::TimedOut(t) => write!(f, "timeout: no answer within {t:?}"),
            Outcome::Connect(e) => write!(f, "connect failed: {e}"),
            Outcome::Broken(e) => write!(f, "no response: {e}"),
        }
    }
}

/// One check: connect, `GET path`, the response head, all within `timeout`.
async fn probe(addr: &ServerAddr, host: &HeaderValue, path: &str, timeout: Duration) -> Outcome {
    let exchange = async {
        match addr {
            ServerAddr::Tcp(a) => match TcpStream::connect(a).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    ask(TokioIo::new(s), host, path).await
                }
                Err(e) => Outcome::connect(e),
            },
            ServerAddr::Unix(p) => match UnixStream::connect(p).await {
                Ok(s) => ask(TokioIo::new(s), host, path).await,
                Err(e) => Outcome::connect(e),
            },
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Outcome::TimedOut(timeout))
}

/// `GET path` on a connection of its own; the connection closes when this returns (nothing of it is kept).
async fn ask<T>(io: T, host: &HeaderValue, path: &str) -> Outcome
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut send, conn) = match hyper::client::conn::http1::handshake(io).await {
        Ok(pair) => pair,
        Err(e) => return Outcome::Broken(e.to_string()),
    };
    let req = match Request::get(path)
        .header(header::HOST, host)
        .header(header::CONNECTION, "close")
        .header(header::USER_AGENT, "portcullis-health")
        .body(Empty::<Bytes>::new())
    {
        Ok(r) => r,
        Err(e) => return Outcome::Broken(e.to_string()),
    };
    let response = send.send_request(req);
    tokio::pin!(response, conn);
    let res = tokio::select! {
        biased;
        r = &mut response => r,
        // The connection ended first: the response (if any) is already handed over, or never comes.
        _ = &mut conn => response.await,
    };
    match res {
        Ok(r) => Outcome::Status(r.status()),
        Err(e) => Outcome::Broken(e.to_string()),
    }
}

/// The `Host` a check sends: the first exact name of a site with a route to upstream `group` (apps that
/// check Host, like Django's `ALLOWED_HOSTS`, accept it), else `localhost`.
fn host_for(config: &Config, group: usize) -> HeaderValue {
    config
        .sites
        .iter()
        .filter(|s| s.routes.iter().any(|r| r.action == Action::Upstream(group)))
        .flat_map(|s| &s.names)
        .find(|n| !n.starts_with('*'))
        .and_then(|n| HeaderValue::from_str(n).ok())
        .unwrap_or_else(|| HeaderValue::from_static("localhost"))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::upstream::Servers;

    #[test]
    fn a_server_in_two_upstreams_is_checked_once() {
        let text = r#"
names = ["*.example.test", "app.example.test"]
[listen]
https = ["127.0.0.1:8443"]
[tls]
cert = "/etc/portcullis/fullchain.pem"
key = "/etc/portcullis/privkey.pem"
[[route]]
path = "/api/"
upstream = "api"
[[route]]
path = "/"
upstream = "web"
[upstream.api]
servers = ["127.0.0.1:5001", "127.0.0.1:5002"]
health = { path = "/health" }
[upstream.nochecks]
servers = ["127.0.0.1:5004"]
[upstream.web]
servers = ["127.0.0.1:5002", "unix:/run/app3.sock"]
health = { path = "/up", interval = "5s" }
"#;
        let config = Config::parse(Path::new("/etc/portcullis/portcullis.toml"), text).unwrap();
        let servers = Servers::new(&config);
        let groups = Groups::new(&config, &servers);
        let checks = plan(&config, &groups);
        let got: Vec<(String, &str, &str)> = checks
            .iter()
            .map(|c| {
                (
                    c.server.addr.to_string(),
                    &*c.upstream,
                    c.health.path.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("127.0.0.1:5001".to_owned(), "api", "/health"),
                ("127.0.0.1:5002".to_owned(), "api", "/health"),
                ("unix:/run/app3.sock".to_owned(), "web", "/up"),
            ]
        );
        // The Host is the site's first exact name.
        assert!(checks.iter().all(|c| c.host == "app.example.test"));
    }

    #[tokio::test]
    async fn a_reload_keeps_unchanged_checks_and_restarts_changed_ones() {
        let parse = |health: &str| {
            let text = format!(
                "[listen]\nhttps = [\"127.0.0.1:8443\"]\n[tls]\nself_signed = true\n[[route]]\npath = \"/\"\nupstream = \"app\"\n[upstream.app]\nservers = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\n{health}"
            );
            Config::parse(Path::new("/etc/portcullis/portcullis.toml"), &text).unwrap()
        };
        let (_trigger, shutdown) = crate::shutdown::Trigger::new();
        let first = parse("health = { path = \"/up\", interval = \"1h\" }");
        let servers = Servers::new(&first);
        let groups = Groups::new(&first, &servers);
        let mut checks = Checks::start(&first, &groups, shutdown);
        let same = checks.replan(&first, &groups);
        assert_eq!(
            same,
            Replanned {
                kept: 2,
                started: 0,
                stopped: 0
            }
        );
        let down = groups.group(0).members()[0].server.clone();
        down.set_checked(false);
        // New settings: new tasks; the server keeps its verdict until they give one.
        let changed = parse("health = { path = \"/ready\", interval = \"1h\" }");
        servers.learn(&changed);
        let next = Groups::new(&changed, &servers);
        assert_eq!(
            checks.replan(&changed, &next),
            Replanned {
                kept: 0,
                started: 2,
                stopped: 2
            }
        );
        assert!(!down.is_up(Instant::now()));
        // No checks any more: nothing holds the server down.
        let none = parse("");
        assert_eq!(
            checks.replan(&none, &Groups::new(&none, &servers)),
            Replanned {
                kept: 0,
                started: 0,
                stopped: 2
            }
        );
        assert!(down.is_up(Instant::now()));
    }

    #[test]
    fn fall_failures_take_it_out_and_rise_passes_bring_it_back() {
        let mut s = Streak::default();
        // rise 2, fall 3.
        assert_eq!(s.record(false, 0, 2, 3), None);
        assert_eq!(s.record(false, 0, 2, 3), None);
        assert_eq!(s.record(true, 0, 2, 3), None, "a pass breaks the run");
        assert_eq!(s.record(false, 0, 2, 3), None);
        assert_eq!(s.record(false, 0, 2, 3), None);
        assert_eq!(s.record(false, 0, 2, 3), Some(false));
        assert_eq!(s.record(false, 0, 2, 3), Some(false));
        assert_eq!(s.record(true, 0, 2, 3), None);
        assert_eq!(s.record(true, 0, 2, 3), Some(true));
        // A passive failure since the last check: the passes start again.
        assert_eq!(s.record(true, 77, 2, 3), None);
        assert_eq!(s.record(true, 77, 2, 3), Some(true));
        // rise 1: the first pass brings it back.
        let mut s = Streak::default();
        assert_eq!(s.record(false, 0, 1, 1), Some(false));
        assert_eq!(s.record(true, 0, 1, 1), Some(true));
    }

    #[tokio::test]
    async fn probes_say_why_over_tcp_and_unix_sockets() {
        let host = HeaderValue::from_static("localhost");
        let t = Duration::from_secs(5);
        // Refused: a port that was just free.
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        let o = probe(&ServerAddr::Tcp(addr), &host, "/health", t).await;
        assert!(matches!(o, Outcome::Refused), "{o}");
        // Missing socket.
        let dir = std::env::temp_dir().join(format!("portcullis-health-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("app.sock");
        let _ = std::fs::remove_file(&sock);
        let o = probe(&ServerAddr::Unix(sock.clone()), &host, "/health", t).await;
        assert!(matches!(o, Outcome::Missing), "{o}");
        // A server that accepts and never answers: the timeout.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let o = probe(
            &ServerAddr::Tcp(silent.local_addr().unwrap()),
            &host,
            "/health",
            Duration::from_millis(200),
        )
        .await;
        assert!(matches!(o, Outcome::TimedOut(_)), "{o}");
        // Answers, over a unix socket: the request as sent, and the status.
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut heads = Vec::new();
            for status in ["204 No Content", "503 Service Unavailable"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = vec![0; 4096];
                let n = s.read(&mut buf).await.unwrap();
                heads.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                s.write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
            }
            heads
        });
        let unix = ServerAddr::Unix(sock.clone());
        let o = probe(&unix, &host, "/health", t).await;
        assert!(o.passed(), "{o}");
        let o = probe(&unix, &host, "/health", t).await;
        assert!(!o.passed());
        assert_eq!(o.to_string(), "status 503");
        let heads = server.await.unwrap();
        let head = heads[0].to_ascii_lowercase();
        assert!(head.starts_with("get /health http/1.1\r\n"), "{head}");
        for want in [
            "host: localhost",
            "connection: close",
            "user-agent: portcullis-health",
        ] {
            assert!(head.contains(want), "{want} missing: {head}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
