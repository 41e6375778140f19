//! Several app instances behind one upstream, and what a client sees when one of them fails: real
//! gunicorn + Flask instances (Debian packages gunicorn and python3-flask; tests/fixtures/flask_failover.py)
//! on loopback TCP ports and unix sockets, and a few hand-written upstreams for what gunicorn will not do on
//! demand (accept and never answer; close a kept connection under the next request).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis_tests::{Client, Pki, Portcullis, TempDir, config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The kill -9 scenario: load for this long, one instance killed at a third of it, restarted at two thirds.
const SCENARIO: Duration = Duration::from_secs(15);

/// A gunicorn instance (master and workers in a process group of their own, so that a kill -9 takes all of
/// them at once, as a crashed or OOM-killed container would). Killed on drop.
struct Gunicorn {
    child: Child,
}

/// Where a gunicorn instance listens.
#[derive(Clone)]
enum Bind {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Bind {
    /// The address as the config's `servers` names it.
    fn server(&self) -> String {
        match self {
            Bind::Tcp(a) => a.to_string(),
            Bind::Unix(p) => format!("unix:{}", p.display()),
        }
    }
}

impl Gunicorn {
    /// flask_failover:app as instance `name`, 2 `gthread` workers (keep-alive, closed by gunicorn after
    /// `keep_alive` seconds idle) appending POST ids to `work_log`; returns once it accepts connections.
    fn start(bind: &Bind, name: &str, work_log: &Path, keep_alive: u32, dir: &Path) -> Gunicorn {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        let log = std::fs::File::create(dir.join(format!("gunicorn-{name}.log"))).unwrap();
        let child = Command::new("/usr/bin/gunicorn")
            .args([
                "--bind",
                &bind.server(),
                "--workers",
                "2",
                "--worker-class",
                "gthread",
            ])
            .args(["--threads", "4", "--keep-alive", &keep_alive.to_string()])
            .arg("--chdir")
            .arg(&fixtures)
            .arg("flask_failover:app")
            .env("INSTANCE", name)
            .env("WORK_LOG", work_log)
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("/usr/bin/gunicorn is needed (Debian packages gunicorn and python3-flask)");
        let mut g = Gunicorn { child };
        // Readiness: the master has bound its socket (the workers then accept from its backlog).
        for _ in 0..1000 {
            let up = match bind {
                Bind::Tcp(a) => std::net::TcpStream::connect(a).is_ok(),
                Bind::Unix(p) => std::os::unix::net::UnixStream::connect(p).is_ok(),
            };
            if up {
                return g;
            }
            if let Ok(Some(status)) = g.child.try_wait() {
                panic!("gunicorn {name} exited: {status}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("gunicorn {name} does not accept connections");
    }

    /// SIGKILL to the master and its workers (our own process group, by its PID).
    fn kill9(&mut self) {
        let pgid = self.child.id();
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{pgid}")])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Gunicorn {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// Two loopback ports nothing listens on now (bound together, then released; gunicorn binds them next).
fn free_ports() -> [SocketAddr; 2] {
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    [a.local_addr().unwrap(), b.local_addr().unwrap()]
}

/// A config with `servers` in `[upstream.app]`, `upstream_keys` added to it, and `extra` tables.
fn config_for(pki: &Pki, servers: &[String], upstream_keys: &str, extra: &str) -> String {
    let list = servers
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ");
    config(pki, "PLACEHOLDER", &format!("{upstream_keys}\n{extra}")).replacen(
        "[\"PLACEHOLDER\"]",
        &format!("[{list}]"),
        1,
    )
}

/// What one client request came to: the instance that answered, or what went wrong.
type Outcome = (Instant, Result<String, String>);

/// One keep-alive client (HTTP/1.1 or HTTP/2 on a single connection, reopened only if it breaks) sending
/// `make(n)` one after the other until `stop`.
async fn client_loop(
    client: Client,
    addr: SocketAddr,
    h2: bool,
    stop: Arc<AtomicBool>,
    make: impl Fn(usize) -> Request<Full<Bytes>> + Send + 'static,
) -> Vec<Outcome> {
    let mut out = Vec::new();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
        let tls = client.tls(addr, alpn).await;
        enum Sender {
            H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
            H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
        }
        let mut send = if h2 {
            let (s, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            Sender::H2(s)
        } else {
            let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(conn);
            Sender::H1(s)
        };
        while !stop.load(Ordering::Relaxed) {
            let mut req = make(n);
            n += 1;
            let res = match &mut send {
                Sender::H1(s) => s.send_request(req).await,
                Sender::H2(s) => {
                    *req.uri_mut() = format!(
                        "https://localhost:{}{}",
                        addr.port(),
                        req.uri().path_and_query().unwrap()
                    )
                    .parse()
                    .unwrap();
                    s.send_request(req).await
                }
            };
            let res = match res {
                Ok(res) => res,
                Err(e) => {
                    out.push((Instant::now(), Err(format!("client connection: {e}"))));
                    break;
                }
            };
            let status = res.status();
            match res.into_body().collect().await {
                Ok(b) if status == 200 => out.push((
                    Instant::now(),
                    Ok(String::from_utf8_lossy(&b.to_bytes()).into_owned()),
                )),
                Ok(b) => out.push((
                    Instant::now(),
                    Err(format!(
                        "{status}: {}",
                        String::from_utf8_lossy(&b.to_bytes())
                    )),
                )),
                Err(e) => {
                    out.push((Instant::now(), Err(format!("{status}, body: {e}"))));
                    break;
                }
            }
        }
    }
    out
}

/// What the kill -9 scenario saw.
struct Scenario {
    outcomes: Vec<Outcome>,
    start: Instant,
    killed: Instant,
    /// When the restarted instance accepted connections again.
    reopened: Instant,
    proxy: Portcullis,
    work_log: PathBuf,
    _instances: Vec<Gunicorn>,
    _dir: TempDir,
}

/// Three instances (g1, g2 on TCP, g3 on a unix socket) behind Portcullis; six keep-alive clients (three
/// HTTP/1.1, three HTTP/2) sending `make` for [`SCENARIO`]; g1 SIGKILLed at a third and restarted at two
/// thirds of it.
async fn kill9_scenario(
    tag: &str,
    make: impl Fn(usize, usize) -> Request<Full<Bytes>> + Clone + Send + Sync + 'static,
) -> Scenario {
    let dir = TempDir::new(tag);
    let pki = Pki::new(dir.path(), &["app.test"]);
    let work_log = dir.path().join("work.log");
    let [p1, p2] = free_ports();
    let binds = [
        Bind::Tcp(p1),
        Bind::Tcp(p2),
        Bind::Unix(dir.path().join("g3.sock")),
    ];
    let mut instances: Vec<Gunicorn> = binds
        .iter()
        .enumerate()
        .map(|(i, b)| Gunicorn::start(b, &format!("g{}", i + 1), &work_log, 2, dir.path()))
        .collect();
    let servers: Vec<String> = binds.iter().map(Bind::server).collect();
    // A server taken out after one failure is tried again after a second (active checks, which bring it
    // back sooner, are not configured here: this is passive health and retries alone).
    let text = config_for(
        &pki,
        &servers,
        "max_fails = 1\nfail_timeout = \"1s\"\n",
        "[limits]\nmax_requests_per_connection = 1000000\n",
    );
    let proxy = Portcullis::run(&dir.write("p.toml", &text), &[]);
    assert!(proxy.ready, "{}", proxy.output());
    let addr = proxy.https_addr();
    let client = Client::new(&pki.ca_pem);

    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let tasks: Vec<_> = (0..6)
        .map(|c| {
            let make = make.clone();
            tokio::spawn(client_loop(
                client.clone(),
                addr,
                c >= 3,
                stop.clone(),
                move |n| make(c, n),
            ))
        })
        .collect();

    tokio::time::sleep_until((start + SCENARIO / 3).into()).await;
    let killed = Instant::now();
    instances[0].kill9();
    tokio::time::sleep_until((start + SCENARIO * 2 / 3).into()).await;
    let (bind, log, folder) = (binds[0].clone(), work_log.clone(), dir.path().to_owned());
    instances[0] =
        tokio::task::spawn_blocking(move || Gunicorn::start(&bind, "g1", &log, 2, &folder))
            .await
            .unwrap();
    let reopened = Instant::now();
    tokio::time::sleep_until((start + SCENARIO).into()).await;
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.extend(t.await.unwrap());
    }
    Scenario {
        outcomes,
        start,
        killed,
        reopened,
        proxy,
        work_log,
        _instances: instances,
        _dir: dir,
    }
}

impl Scenario {
    fn failures(&self) -> Vec<&str> {
        self.outcomes
            .iter()
            .filter_map(|(_, r)| r.as_ref().err().map(String::as_str))
            .collect()
    }

    /// Prints requests per instance before the kill, while g1 was dead, and after its restart, and how
    /// long the restarted g1 took to get traffic again.
    fn report(&self, what: &str) {
        let mut phases: [HashMap<String, usize>; 3] = Default::default();
        let mut back: Option<Instant> = None;
        for (t, r) in &self.outcomes {
            let phase = if *t < self.killed {
                0
            } else if *t < self.reopened {
                1
            } else {
                2
            };
            let who = match r {
                Ok(name) => name.clone(),
                Err(_) => "FAILED".into(),
            };
            if phase == 2 && who == "g1" && back.is_none_or(|b| *t < b) {
                back = Some(*t);
            }
            *phases[phase].entry(who).or_default() += 1;
        }
        println!(
            "{what}: {} requests in {:.1} s, {} failed",
            self.outcomes.len(),
            self.outcomes
                .iter()
                .map(|(t, _)| *t)
                .max()
                .map_or(0.0, |t| (t - self.start).as_secs_f64()),
            self.failures().len()
        );
        for (name, counts) in ["before the kill", "g1 dead", "after g1's restart"]
            .iter()
            .zip(&phases)
        {
            let mut row: Vec<_> = counts.iter().collect();
            row.sort();
            println!("  {name:>20}: {row:?}");
        }
        match back {
            Some(b) => println!(
                "  g1 served again {} ms after its port opened",
                (b - self.reopened).as_millis()
            ),
            None => println!("  g1 did not serve again"),
        }
    }
}

/// The scenario with GETs: every request the dead instance would have failed went to another one.
/// Connections to it break mid-request (reset: a GET is replayed elsewhere), new ones are refused (retried
/// elsewhere, and it is taken out), and it takes traffic again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_one_instance_fails_no_get() {
    let s = kill9_scenario("kill9-get", |_, _| {
        Request::get("/")
            .header("host", "localhost")
            .body(Full::default())
            .unwrap()
    })
    .await;
    s.report("GET, kill -9 of g1");
    let failures = s.failures();
    assert!(
        failures.is_empty(),
        "{} GETs failed: {:?}\nlog:\n{}",
        failures.len(),
        &failures[..failures.len().min(10)],
        s.proxy.output()
    );
    assert!(
        s.outcomes
            .iter()
            .any(|(t, r)| *t > s.reopened && r.as_deref() == Ok("g1")),
        "the restarted instance never got traffic again; log:\n{}",
        s.proxy.output()
    );
    assert!(
        s.proxy
            .output()
            .contains("upstream server is down: taken out after max_fails failures in a row"),
        "the dead instance was not taken out; log:\n{}",
        s.proxy.output()
    );
}

/// The same with POSTs, whose `X-Request-Id` (ours: one per request, the same on a retry) the app logs
/// before its work: a POST the app may have seen is never sent again, so no id is executed twice; the only failures are POSTs in flight on the killed instance
/// (at most one per client).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_one_instance_never_executes_a_post_twice() {
    let s = kill9_scenario("kill9-post", |_, _| {
        Request::post("/work")
            .header("host", "localhost")
            .body(Full::new(Bytes::from_static(b"x=1")))
            .unwrap()
    })
    .await;
    s.report("POST, kill -9 of g1");
    let log = std::fs::read_to_string(&s.work_log).unwrap();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for line in log.lines() {
        *seen.entry(line.split(' ').next().unwrap()).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "executed more than once: {twice:?}");
    let failures = s.failures();
    println!(
        "  {} POSTs executed, {} failed: {:?}",
        seen.len(),
        failures.len(),
        failures
    );
    assert!(
        failures.len() <= 6,
        "more POSTs failed than were in flight on the killed instance: {failures:?}\nlog:\n{}",
        s.proxy.output()
    );
}

/// An instance whose unix socket file is gone (deleted, or the app not started yet): nothing reached it, so
/// every request, POST included, goes to another server; the client sees no failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_unix_socket_is_retried_on_another_server_for_any_method() {
    let dir = TempDir::new("gone-socket");
    let pki = Pki::new(dir.path(), &["app.test"]);
    let work_log = dir.path().join("work.log");
    let gone = Bind::Unix(dir.path().join("gone.sock"));
    let good = Bind::Unix(dir.path().join("good.sock"));
    let g_gone = Gunicorn::start(&gone, "gone", &work_log, 2, dir.path());
    let _g_good = Gunicorn::start(&good, "good", &work_log, 2, dir.path());
    let text = config_for(&pki, &[gone.server(), good.server()], "", "");
    let p = Portcullis::run(&dir.write("p.toml", &text), &[]);
    assert!(p.ready, "{}", p.output());
    // The socket file disappears (the app still runs: only its address is gone).
    std::fs::remove_file(dir.path().join("gone.sock")).unwrap();
    let client = Client::new(&pki.ca_pem);
    for i in 0..6 {
        let get = client.get(p.https_addr(), "/").await;
        assert_eq!(get.status(), 200, "{}", p.output());
        assert_eq!(&get.body()[..], b"good");
        let post = Request::post("/work")
            .header("x-request-id", format!("p{i}"))
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap();
        let post = client.send(p.https_addr(), post).await;
        assert_eq!(post.status(), 200, "{}", p.output());
        assert_eq!(&post.body()[..], b"good");
    }
    assert!(
        p.output().contains("upstream server is down"),
        "the server without a socket was not taken out:\n{}",
        p.output()
    );
    drop(g_gone);
}

/// An upstream that accepts connections and reads requests but never answers, recording each request line.
struct Silent {
    addr: SocketAddr,
    lines: Arc<std::sync::Mutex<Vec<String>>>,
}

async fn silent() -> Silent {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = lines.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                // Each connection carries one request (none is ever answered): its first line is recorded.
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                let mut recorded = false;
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    if recorded {
                        continue;
                    }
                    got.extend_from_slice(&buf[..n]);
                    if let Some(end) = got.windows(2).position(|w| w == b"\r\n") {
                        seen.lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&got[..end]).into_owned());
                        recorded = true;
                    }
                }
            });
        }
    });
    Silent { addr, lines }
}

/// A server that accepts and never answers: a POST gets `504` after `upstream_response` and is never sent
/// to another server (the app may be working on it); a GET goes to another server after the same wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_gives_post_504_and_get_another_server() {
    let dir = TempDir::new("silent");
    let pki = Pki::new(dir.path(), &["app.test"]);
    let work_log = dir.path().join("work.log");
    let hang = silent().await;
    let good = Bind::Unix(dir.path().join("good.sock"));
    let _g = Gunicorn::start(&good, "good", &work_log, 2, dir.path());
    // max_fails = 0: the silent server is never taken out, so that each request may meet it.
    let text = config_for(
        &pki,
        &[hang.addr.to_string(), good.server()],
        "max_fails = 0\n",
        "[timeouts]\nupstream_response = \"1s\"\n",
    );
    let p = Portcullis::run(&dir.write("p.toml", &text), &[]);
    assert!(p.ready, "{}", p.output());
    let client = Client::new(&pki.ca_pem);
    let met = |method: &str| {
        hang.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with(method))
            .count()
    };

    let mut timed_out = None;
    for _ in 0..10 {
        // The id the app logs is ours (a client's own is replaced), and the response names it.
        let post = Request::post("/work")
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap();
        let t = Instant::now();
        let res = client.send(p.https_addr(), post).await;
        match res.status().as_u16() {
            200 => assert_eq!(&res.body()[..], b"good"),
            504 => {
                assert!(
                    t.elapsed() >= Duration::from_millis(900),
                    "{:?}",
                    t.elapsed()
                );
                timed_out = Some(res.headers()["x-request-id"].to_str().unwrap().to_owned());
                break;
            }
            other => panic!("POST: {other}\n{}", p.output()),
        }
    }
    let id = timed_out.expect("no POST met the silent server in 10 tries");
    let log = std::fs::read_to_string(&work_log).unwrap_or_default();
    assert!(
        !log.lines().any(|l| l.split(' ').next() == Some(&id)),
        "the POST that timed out was sent to another server too: {log}"
    );
    assert_eq!(met("POST"), 1);

    for _ in 0..10 {
        let before = met("GET");
        let res = client.get(p.https_addr(), "/").await;
        assert_eq!(res.status(), 200, "{}", p.output());
        assert_eq!(&res.body()[..], b"good");
        if met("GET") > before {
            // It met the silent server, waited for upstream_response, and went to the other one.
            return;
        }
    }
    panic!("no GET met the silent server in 10 tries");
}

/// A recording upstream that answers the first request on each connection (keep-alive; `conn N`, and the
/// body's SHA-256 if it had one) and closes the connection, without answering, when the next request comes
/// on it: what an app closing an idle connection looks like from a proxy that sent a request at that moment.
struct Closer {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    /// (connection, request line) of every request read, answered or not.
    seen: Arc<std::sync::Mutex<Vec<(usize, String)>>>,
}

async fn closer() -> Closer {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (conns, log) = (connections.clone(), seen.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let conn = conns.fetch_add(1, Ordering::Relaxed);
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                let mut answered = false;
                loop {
                    let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&got[..end]).into_owned();
                    let line = head.lines().next().unwrap_or("").to_owned();
                    log.lock().unwrap().push((conn, line));
                    if answered {
                        // The app closes the connection under the request.
                        return;
                    }
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap())
                        })
                        .unwrap_or(0);
                    while got.len() < end + 4 + len {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let sent: Vec<u8> = got.drain(..end + 4 + len).skip(end + 4).collect();
                    let body = if sent.is_empty() {
                        format!("conn {conn}")
                    } else {
                        format!("conn {conn} sha256={}", portcullis_tests::sha256_hex(&sent))
                    };
                    let res = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(res.as_bytes()).await.is_err() {
                        return;
                    }
                    answered = true;
                }
            });
        }
    });
    Closer {
        addr,
        connections,
        seen,
    }
}

/// A kept connection that the app closes while idle is not used (gunicorn closes them after its
/// keep-alive; hyper notices the close), and one it closes under the next request is replaced for a GET:
/// the request still succeeds, and the server is not counted as failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_the_app_closed_is_replaced_without_failing_or_blaming_the_server() {
    let dir = TempDir::new("idle-closed");
    let pki = Pki::new(dir.path(), &["app.test"]);
    let work_log = dir.path().join("work.log");
    // gunicorn closing its kept connections after 1 s idle.
    let g = Bind::Unix(dir.path().join("g.sock"));
    let _g = Gunicorn::start(&g, "g", &work_log, 1, dir.path());
    let up = closer().await;
    let text = format!(
        "{}\n[upstream.closer]\nservers = [\"{}\"]\n\n[[route]]\npath = \"/closer/\"\nupstream = \"closer\"\n",
        config_for(&pki, &[g.server()], "", ""),
        up.addr
    );
    let p = Portcullis::run_with_log(
        &dir.write("p.toml", &text),
        "info,portcullis::upstream=debug",
    );
    assert!(p.ready, "{}", p.output());
    let client = Client::new(&pki.ca_pem);
    let blamed = || {
        p.lines()
            .iter()
            .filter(|l| l.contains("upstream request failed") || l.contains("server is down"))
            .cloned()
            .collect::<Vec<_>>()
    };

    // gunicorn: the connection kept from the first request is closed by gunicorn before the second.
    for _ in 0..2 {
        let res = client.get(p.https_addr(), "/").await;
        assert_eq!(res.status(), 200, "{}", p.output());
        // gthread workers close a connection idle for keep-alive (1 s) on their next 1 s tick: wait both
        // out. The idle time is what is being tested.
        tokio::time::sleep(Duration::from_millis(2300)).await;
    }
    let res = client.get(p.https_addr(), "/").await;
    assert_eq!(res.status(), 200, "{}", p.output());
    assert!(blamed().is_empty(), "{:?}", blamed());

    // The closer: the second request on a kept connection finds it closed under it.
    let res = client.get(p.https_addr(), "/closer/a").await;
    assert_eq!(res.status(), 200);
    assert_eq!(up.connections.load(Ordering::Relaxed), 1);
    // Idle for longer than a connection is trusted to stay open.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let res = client.get(p.https_addr(), "/closer/b").await;
    assert_eq!(res.status(), 200, "{}", p.output());
    assert_eq!(&res.body()[..], b"conn 1", "sent again on a new connection");
    assert!(blamed().is_empty(), "{:?}", blamed());

    // A PUT whose body was buffered into memory and a temporary file (300 kB, over memory_per_request) is
    // sent again whole.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let big = portcullis_tests::random_bytes(300_000, 13);
    let put = Request::put("/closer/put")
        .body(Full::new(Bytes::from(big.clone())))
        .unwrap();
    let res = client.send(p.https_addr(), put).await;
    assert_eq!(res.status(), 200, "{}", p.output());
    assert_eq!(
        String::from_utf8_lossy(res.body()),
        format!("conn 2 sha256={}", portcullis_tests::sha256_hex(&big))
    );

    // A POST after the same idle time never goes on the kept connection: it takes a new one, once.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let post = Request::post("/closer/c")
        .body(Full::new(Bytes::from_static(b"x")))
        .unwrap();
    let res = client.send(p.https_addr(), post).await;
    assert_eq!(res.status(), 200, "{}", p.output());
    assert_eq!(
        String::from_utf8_lossy(res.body()),
        format!("conn 3 sha256={}", portcullis_tests::sha256_hex(b"x"))
    );
    let posts: Vec<_> = up
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, l)| l.starts_with("POST"))
        .cloned()
        .collect();
    assert_eq!(posts, [(3, "POST /closer/c HTTP/1.1".to_owned())]);
    assert!(blamed().is_empty(), "{:?}", blamed());
}

/// The app's own 502 and 503 are its answer: passed on as they are (its page, not ours), never sent to
/// another server, whatever the method, and the server is not taken out for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apps_own_502_and_503_are_passed_on_and_never_retried() {
    let a = portcullis_tests::Upstream::tcp().await;
    let b = portcullis_tests::Upstream::tcp().await;
    let dir = TempDir::new("app502");
    let pki = Pki::new(dir.path(), &[]);
    let text = config(&pki, &a.addr_string(), "").replace(
        &format!("servers = [\"{}\"]", a.addr_string()),
        &format!(
            "servers = [\"{}\", \"{}\"]\nbalance = \"round_robin\"",
            a.addr_string(),
            b.addr_string()
        ),
    );
    let proxy = Portcullis::run(&dir.write("portcullis.toml", &text), &[]);
    assert!(proxy.ready, "{}", proxy.output());
    let client = Client::new(&pki.ca_pem);
    let https = proxy.https_addr();
    for (method, code) in [("GET", 502u16), ("POST", 502), ("GET", 503), ("POST", 503)] {
        let before = a.requests().len() + b.requests().len();
        let req = Request::builder()
            .method(method)
            .uri(format!("/status/{code}"))
            .header("host", "localhost")
            .body(Full::new(Bytes::from_static(b"order=1")))
            .unwrap();
        let res = client.send(https, req).await;
        assert_eq!(res.status().as_u16(), code, "{method}");
        assert_eq!(
            String::from_utf8_lossy(res.body()),
            format!("the app said {code}"),
            "{method}: the app's page, not ours"
        );
        assert_eq!(
            a.requests().len() + b.requests().len(),
            before + 1,
            "{method} {code} was sent to more than one server"
        );
    }
    // Neither server was taken out: both still get their turns.
    for _ in 0..4 {
        assert_eq!(client.get(https, "/").await.status(), 200);
    }
    let to =
        |u: &portcullis_tests::Upstream| u.requests().iter().filter(|r| r.target == "/").count();
    assert_eq!((to(&a), to(&b)), (2, 2));
    assert!(
        !proxy.output().contains("upstream server is down"),
        "{}",
        proxy.output()
    );
}

/// Without active checks, a server out after failures is back as soon as it accepts connections again
/// (a bare connect every second), not after the rest of `fail_timeout` (here a minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_out_after_failures_is_back_once_it_accepts_again_without_health_checks() {
    let a = portcullis_tests::Upstream::tcp().await;
    // B's address, with nothing listening on it yet: connections are refused.
    let b_addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = TempDir::new("back");
    let pki = Pki::new(dir.path(), &[]);
    let text = config(&pki, &a.addr_string(), "").replace(
        &format!("servers = [\"{}\"]", a.addr_string()),
        &format!(
            "servers = [\"{}\", \"{b_addr}\"]\nbalance = \"round_robin\"\nfail_timeout = \"60s\"",
            a.addr_string()
        ),
    );
    let proxy = Portcullis::run(&dir.write("portcullis.toml", &text), &[]);
    assert!(proxy.ready, "{}", proxy.output());
    let client = Client::new(&pki.ca_pem);
    let https = proxy.https_addr();
    // B refuses: retried on A (no failure), and B is taken out.
    for _ in 0..2 {
        assert_eq!(client.get(https, "/").await.status(), 200);
    }
    proxy
        .wait_for_log(
            |l| l.contains("upstream server is down") && l.contains(&b_addr.to_string()),
            Duration::from_secs(5),
        )
        .expect("B was not taken out");
    // B comes up on the same address.
    let listener = TcpListener::bind(b_addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                        Bytes::from_static(b"b"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    proxy
        .wait_for_log(
            |l| l.contains("accepts connections again") && l.contains(&b_addr.to_string()),
            Duration::from_secs(10),
        )
        .expect("B never came back");
    let mut from_b = 0;
    for _ in 0..4 {
        let res = client.get(https, "/").await;
        assert_eq!(res.status(), 200);
        from_b += usize::from(res.body().as_ref() == b"b");
    }
    assert_eq!(from_b, 2, "B does not get its turns again");
}
