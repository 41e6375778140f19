//! Issue 17, several nodes sharing state through one Redis (`[cluster]`): a real `redis-server` on a unix
//! socket in the test's folder, with a password read from a file, and three (or two) real nodes on their
//! own loopback addresses. A session ticket issued by one node resumes on another; a brute-forcer spread
//! round-robin over three nodes is limited at the configured rate in total; Redis killed with SIGKILL
//! under load fails no request (limits fall back to each node's own), and once restarted the nodes use it
//! again; up and down are logged once per change and shown in `/metrics`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use portcullis_tests::admin::Metrics;
use portcullis_tests::client::get_on;
use portcullis_tests::redis::RedisServer;
use portcullis_tests::upstream::Upstream;
use portcullis_tests::{Client, Pki, Portcullis, TempDir, config};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const SHARED: &str = "cluster: session tickets sealed with the cluster's key";
const UP: &str = "cluster: Redis is up";
const DOWN: &str = "cluster: Redis is down";
const LOGIN: &str = "[[rate_limit]]\nname = \"login\"\npaths = [\"/login\"]\nmethods = [\"POST\"]\nrate = \"5/minute\"\nburst = 5\n";

struct Cluster {
    _dir: TempDir,
    redis: RedisServer,
    nodes: Vec<Portcullis>,
    client: Client,
    ca_pem: String,
    _upstream: Upstream,
}

impl Cluster {
    /// `n` nodes (node `i` on 127.0.0.`i+1`) in front of one upstream, sharing one Redis; `extra` is
    /// appended to each node's config. Returns once every node seals tickets with the cluster's key.
    async fn start(n: usize, extra: &str) -> Cluster {
        let dir = TempDir::new("cluster");
        let pki = Pki::new(dir.path(), &[]);
        let upstream = Upstream::tcp().await;
        let redis = RedisServer::start(dir.path());
        let mut nodes = Vec::new();
        for i in 0..n {
            let text = config(
                &pki,
                &upstream.addr_string(),
                &format!(
                    "{extra}\n{}\n[admin]\nlisten = \"127.0.0.1:0\"\n",
                    redis.cluster_toml("")
                ),
            )
            .replacen(
                "https = [\"127.0.0.1:0\"]",
                &format!("https = [\"127.0.0.{}:0\"]", i + 1),
                1,
            );
            let path = dir.write(&format!("node{i}.toml"), &text);
            let node = Portcullis::run(&path, &[]);
            assert!(node.ready, "node {i} did not start:\n{}", node.output());
            nodes.push(node);
        }
        for (i, node) in nodes.iter().enumerate() {
            assert!(
                node.wait_for_log(|l| l.contains(SHARED), Duration::from_secs(20))
                    .is_some(),
                "node {i} never used the cluster's ticket key:\n{}",
                node.output()
            );
        }
        Cluster {
            client: Client::new(&pki.ca_pem),
            ca_pem: pki.ca_pem.clone(),
            _dir: dir,
            redis,
            nodes,
            _upstream: upstream,
        }
    }

    fn https(&self, i: usize) -> SocketAddr {
        self.nodes[i].https_addr()
    }

    async fn metrics(&self, i: usize) -> Metrics {
        Metrics::scrape(self.nodes[i].admin_addr()).await
    }
}

fn roots(ca_pem: &str) -> Arc<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    Arc::new(roots)
}

/// One request on a new connection: its status, or what failed (a failed request is never a panic here,
/// so that a test can count them).
async fn request(
    client: &Client,
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> Result<u16, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = TlsConnector::from(Arc::new(client.config(&[b"http/1.1"])))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from_static(
            b"username=admin&password=guess",
        )))
        .unwrap();
    let res = send.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(res.status().as_u16())
}

/// `rounds` login attempts per node, round-robin over the nodes: how many passed (not 429), and any failure.
async fn brute_force(c: &Cluster, rounds: usize) -> (usize, Vec<String>) {
    let mut passed = 0;
    let mut failed = Vec::new();
    for _ in 0..rounds {
        for i in 0..c.nodes.len() {
            match request(&c.client, c.https(i), "POST", "/login").await {
                Ok(429) => {}
                Ok(200) => passed += 1,
                Ok(other) => failed.push(format!("node {i}: status {other}")),
                Err(e) => failed.push(format!("node {i}: {e}")),
            }
        }
    }
    (passed, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_issued_by_node_1_resumes_on_node_2_and_3() {
    let c = Cluster::start(3, "").await;
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let mut config =
            rustls::ClientConfig::builder_with_provider(portcullis_tests::client::provider())
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(roots(&c.ca_pem))
                .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // TLS 1.2: the session-id cache is each node's own, so only the ticket can resume on another node.
        config.resumption = rustls::client::Resumption::in_memory_sessions(32)
            .tls12_resumption(rustls::client::Tls12Resumption::SessionIdOrTickets);
        for (from, to) in [(0, 1), (1, 2)] {
            let first = c
                .client
                .tls_with(c.https(from), "localhost", config.clone())
                .await;
            // TLS 1.3 tickets arrive after the handshake: a request makes sure they were read.
            assert_eq!(get_on(first, "/").await.status(), 200);
            let second = c
                .client
                .tls_with(c.https(to), "localhost", config.clone())
                .await;
            assert_eq!(
                second.get_ref().1.handshake_kind(),
                Some(rustls::HandshakeKind::Resumed),
                "{version:?}: a ticket from node {} did not resume on node {}",
                from + 1,
                to + 1
            );
            assert_eq!(get_on(second, "/").await.status(), 200);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_brute_forcer_spread_over_three_nodes_is_limited_at_the_configured_total() {
    let c = Cluster::start(3, LOGIN).await;
    // 5 a minute with a burst of 5, for the whole cluster: 30 attempts in well under a minute pass 5 or 6
    // times (6 if the first came more than 12 s before the last), never 5 per node (15).
    let (passed, failed) = brute_force(&c, 10).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert!((5..=6).contains(&passed), "{passed} of 30 attempts passed");
    for i in 0..3 {
        let m = c.metrics(i).await;
        assert_eq!(m.sum("portcullis_cluster_redis_up", &[]), 1.0, "node {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_fails_no_request_then_the_nodes_use_it_again() {
    let mut c = Cluster::start(3, LOGIN).await;
    // The cluster's budget, spent.
    let (passed, failed) = brute_force(&c, 4).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert!((5..=6).contains(&passed), "{passed}");

    // Load on every node (plain GETs, which never touch Redis, and counted POSTs), while Redis dies.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for i in 0..3 {
        let (client, addr, stop) = (c.client.clone(), c.https(i), stop.clone());
        load.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            // Bounded: at most 2,000 requests or until told to stop.
            for n in 0..2_000u32 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let (method, path) = if n % 2 == 0 {
                    ("GET", "/")
                } else {
                    ("POST", "/login")
                };
                match request(&client, addr, method, path).await {
                    Ok(200 | 429) => ok += 1,
                    Ok(s) => failed.push(format!("{method} {path}: {s}")),
                    Err(e) => failed.push(format!("{method} {path}: {e}")),
                }
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.redis.kill();
    for (i, node) in c.nodes.iter().enumerate() {
        assert!(
            node.wait_for_log(|l| l.contains(DOWN), Duration::from_secs(10))
                .is_some(),
            "node {i} never noticed:\n{}",
            node.output()
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for (i, l) in load.into_iter().enumerate() {
        let (ok, failed) = l.await.unwrap();
        assert!(
            failed.is_empty(),
            "node {i}: {ok} served, failed: {failed:?}"
        );
        assert!(ok > 0, "node {i} served nothing");
    }
    for i in 0..3 {
        let m = c.metrics(i).await;
        assert_eq!(m.sum("portcullis_cluster_redis_up", &[]), 0.0, "node {i}");
        assert_eq!(
            m.sum("portcullis_cluster_redis_down_total", &[]),
            1.0,
            "node {i}"
        );
        // Logged once, however many requests went without it.
        let downs = c.nodes[i]
            .lines()
            .iter()
            .filter(|l| l.contains(DOWN))
            .count();
        assert_eq!(downs, 1, "node {i}");
    }

    // Redis back, empty: the nodes use it again, so the budget is the cluster's once more (each node's own
    // limiter, which counted while Redis was away, no longer decides).
    c.redis.restart();
    for (i, node) in c.nodes.iter().enumerate() {
        assert!(
            node.wait_for_nth(|l| l.contains(UP), 2, Duration::from_secs(10))
                .is_some(),
            "node {i} never came back:\n{}",
            node.output()
        );
    }
    let (passed, failed) = brute_force(&c, 4).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert!(
        (5..=6).contains(&passed),
        "{passed} of 12 passed after Redis came back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_the_node_serves_on_its_own_and_says_so_once() {
    let dir = TempDir::new("cluster-none");
    let pki = Pki::new(dir.path(), &[]);
    let upstream = Upstream::tcp().await;
    let text = config(
        &pki,
        &upstream.addr_string(),
        &format!(
            "{LOGIN}\n[cluster]\nredis = \"unix://{}/nothing.sock\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            dir.path().display()
        ),
    );
    let node = Portcullis::run(&dir.write("p.toml", &text), &[]);
    assert!(node.ready, "{}", node.output());
    let client = Client::new(&pki.ca_pem);
    let mut passed = 0;
    for _ in 0..8 {
        match request(&client, node.https_addr(), "POST", "/login").await {
            Ok(200) => passed += 1,
            Ok(429) => {}
            other => panic!("{other:?}"),
        }
    }
    // The node's own limiter: its burst of 5.
    assert_eq!(passed, 5);
    let m = Metrics::scrape(node.admin_addr()).await;
    assert_eq!(m.sum("portcullis_cluster_redis_up", &[]), 0.0);
    assert_eq!(m.sum("portcullis_cluster_tickets_shared", &[]), 0.0);
    assert!(m.sum("portcullis_cluster_fallbacks_total", &[]) >= 8.0);
    assert!(
        node.wait_for_log(
            |l| l.contains("cluster: cannot connect to Redis"),
            Duration::from_secs(10)
        )
        .is_some(),
        "{}",
        node.output()
    );
    // Tried each second since, said once.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let warned = node
        .lines()
        .iter()
        .filter(|l| l.contains("cluster: cannot connect to Redis"))
        .count();
    assert_eq!(warned, 1, "{}", node.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rediss_server_is_reached_through_tls_with_the_configured_ca() {
    let dir = TempDir::new("cluster-tls");
    let pki = Pki::new(dir.path(), &[]);
    let upstream = Upstream::tcp().await;
    let redis = RedisServer::start_tls(dir.path(), &pki);
    let text = config(
        &pki,
        &upstream.addr_string(),
        &format!(
            "{}\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            redis.cluster_toml("")
        ),
    );
    let node = Portcullis::run(&dir.write("p.toml", &text), &[]);
    assert!(node.ready, "{}", node.output());
    assert!(
        node.wait_for_log(|l| l.contains(SHARED), Duration::from_secs(20))
            .is_some(),
        "{}",
        node.output()
    );
    let m = Metrics::scrape(node.admin_addr()).await;
    assert_eq!(m.sum("portcullis_cluster_redis_up", &[]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_stops_answering_holds_no_request_past_the_timeout() {
    let c = Cluster::start(2, LOGIN).await;
    c.redis.pause(true);
    let mut passed = 0;
    let mut slowest = Duration::ZERO;
    for i in 0..12 {
        let started = std::time::Instant::now();
        let status = request(&c.client, c.https(i % 2), "POST", "/login").await;
        slowest = slowest.max(started.elapsed());
        match status {
            Ok(200) => passed += 1,
            Ok(429) => {}
            other => panic!("request {i}: {other:?}"),
        }
    }
    // [cluster] timeout is 100 ms: the first counted request on each node waits that long, then the node
    // decides alone (a generous bound, as a safety net on a loaded machine).
    assert!(slowest < Duration::from_secs(2), "{slowest:?}");
    // Each node's own budget of 5.
    assert_eq!(passed, 10);
    for (i, node) in c.nodes.iter().enumerate() {
        assert!(
            node.wait_for_log(|l| l.contains(DOWN), Duration::from_secs(5))
                .is_some(),
            "node {i}:\n{}",
            node.output()
        );
    }
    c.redis.pause(false);
    for (i, node) in c.nodes.iter().enumerate() {
        assert!(
            node.wait_for_nth(|l| l.contains(UP), 2, Duration::from_secs(10))
                .is_some(),
            "node {i} never came back:\n{}",
            node.output()
        );
    }
}
