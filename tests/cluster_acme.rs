//! Issue 17, ACME across a cluster: three real nodes (node `i` on 127.0.0.`i+1`, every node on the same
//! HTTP and HTTPS ports, as behind DNS round robin), one real `redis-server` and Pebble validating for
//! real. The site has three names, each resolving (pebble-challtestsrv) to another node, so that whichever
//! node orders, the CA validates at least two names at nodes that did not: they answer from Redis. The
//! test holds the site's lock in Redis until every node runs (else the first node up would order before
//! the others listen), then lets go: exactly one order reaches Pebble and every node serves its
//! certificate. A node killed (SIGKILL) while it holds the lock and talks to the CA: another node orders
//! once its lease runs out.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)] // acme.rs uses the rest
#[path = "acme/pebble.rs"]
mod pebble;

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use pebble::{Options, Pebble, free_port};
use portcullis_tests::redis::RedisServer;
use portcullis_tests::{Portcullis, TempDir, Upstream};
use rustls::pki_types::ServerName;

const NAMES: [&str; 3] = ["a.test", "b.test", "c.test"];
/// A safety net, never expected to be reached.
const LIMIT: Duration = Duration::from_secs(30);
/// `openssl rand -base64 32`, once.
const KEY: &str = "q8Vx1n0mYc2m2cJ0Gk6a2m8r5Hq3VwZl1sPq9tXy0aE=\n";
const INSTALLED: &str = "ACME certificate installed";
const HOLDING: &str = "holding the cluster's ACME lock";
const WAITING: &str = "another node is ordering these names (cluster lock)";

struct Setup {
    dir: TempDir,
    redis: RedisServer,
    upstream: Upstream,
    http: u16,
    https: u16,
}

impl Setup {
    async fn new(tag: &str) -> Setup {
        let dir = TempDir::new(tag);
        let redis = RedisServer::start(dir.path());
        Setup {
            redis,
            upstream: Upstream::tcp().await,
            http: free_port(),
            https: free_port(),
            dir,
        }
    }

    /// Node `i`'s config: the site with `names`, `challenge`, its own state_dir, the shared Redis; the
    /// self-check on or off (it resolves names with the system's resolver, which knows nothing of
    /// Pebble's DNS: only IP names can be checked here).
    fn node(
        &self,
        i: usize,
        pebble: &Pebble,
        names: &[&str],
        (challenge, self_check): (&str, bool),
    ) -> std::path::PathBuf {
        let ip = format!("127.0.0.{}", i + 1);
        let key = self.dir.write("cluster.key", KEY);
        let names: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
        let validation_port = if challenge == "http-01" {
            self.http
        } else {
            self.https
        };
        let text = format!(
            r#"names = [{names}]

[listen]
https = ["{ip}:{https}"]
http = ["{ip}:{http}"]

[tls]
acme = true

[[route]]
path = "/"
upstream = "app"

[upstream.app]
servers = ["{upstream}"]

[acme]
email = "ops@example.com"
directory = "{directory}"
ca_root = "{ca_root}"
state_dir = "{state}"
challenge = "{challenge}"
validation_port = {validation_port}
self_check = {self_check}

{cluster}key_file = "{key}"
"#,
            names = names.join(", "),
            https = self.https,
            http = self.http,
            upstream = self.upstream.addr_string(),
            directory = pebble.directory,
            ca_root = pebble.api_ca.display(),
            state = self.dir.path().join(format!("state{i}")).display(),
            cluster = self.redis.cluster_toml(""),
            key = key.display(),
        );
        self.dir.write(&format!("node{i}.toml"), &text)
    }

    /// `redis-cli` against the test's server.
    fn redis_cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .arg("-s")
            .arg(&self.redis.socket)
            .args(["-a", &self.redis.password, "--no-auth-warning"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn lock_key(pebble: &Pebble, name: &str) -> String {
        format!("portcullis:acme:{}:lock:{name}", pebble.state_folder())
    }
}

fn start(config: &Path, lease_ms: Option<&str>) -> Portcullis {
    let env: Vec<(&str, &str)> = lease_ms
        .map(|ms| vec![("PORTCULLIS_TEST_ACME_LEASE_MS", ms)])
        .unwrap_or_default();
    let mut p = Portcullis::run_with_env(config, &env);
    if !p.ready {
        p.wait();
    }
    assert!(p.ready, "{}", p.output());
    p
}

fn wait(p: &Portcullis, what: &str) -> String {
    p.wait_for_log(|l| l.contains(what), LIMIT)
        .unwrap_or_else(|| panic!("no {what:?} in the log:\n{}", p.output()))
}

/// The leaf node `addr` shows for `name`, verified against Pebble's root.
async fn leaf(pebble: &Pebble, addr: SocketAddr, name: &str) -> Vec<u8> {
    let client = pebble.client().await;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client.config(&[b"http/1.1"])))
        .connect(ServerName::try_from(name.to_owned()).unwrap(), tcp)
        .await
        .unwrap_or_else(|e| panic!("{addr} for {name}: {e}"));
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// Three nodes, the lock held by the test until all run: one order, every validation answered, whichever
/// node it reached, and the one certificate served by all three.
async fn three_nodes_order_once(challenge: &str) {
    let s = Setup::new(&format!("cluster-acme-{challenge}")).await;
    let pebble = Pebble::start(Options::new(s.http, s.https));
    for (i, n) in NAMES.iter().enumerate() {
        pebble.set_host(n, &format!("127.0.0.{}", i + 1));
    }
    let lock = Setup::lock_key(&pebble, NAMES[0]);
    assert_eq!(
        s.redis_cli(&["SET", &lock, "test", "NX", "PX", "60000"])
            .trim(),
        "OK"
    );
    let configs: Vec<_> = (0..3)
        .map(|i| s.node(i, &pebble, &NAMES, (challenge, false)))
        .collect();
    let mut nodes: Vec<Portcullis> = configs.iter().map(|c| start(c, None)).collect();
    for n in &nodes {
        wait(n, WAITING);
    }
    assert_eq!(pebble.orders(), 0);
    s.redis_cli(&["DEL", &lock]);
    for n in &nodes {
        wait(n, INSTALLED);
    }
    assert_eq!(pebble.orders(), 1, "{:?}", pebble.log());
    let holders: Vec<usize> = (0..3)
        .filter(|&i| nodes[i].output().contains(HOLDING))
        .collect();
    assert_eq!(holders.len(), 1, "one node orders");
    for (i, n) in nodes.iter().enumerate() {
        if i != holders[0] {
            assert!(
                n.output()
                    .contains("another node stored the certificate for these names"),
                "node {i}:\n{}",
                n.output()
            );
        }
    }
    // Every name was validated by the CA, each at its own node: two of them at nodes that did not order.
    let valid = pebble
        .log()
        .iter()
        .filter(|l| l.contains("set VALID by completed challenge"))
        .count();
    assert_eq!(valid, 3, "{:?}", pebble.log());
    let first = leaf(&pebble, nodes[0].https_addr(), NAMES[0]).await;
    for n in &nodes {
        for name in NAMES {
            assert_eq!(leaf(&pebble, n.https_addr(), name).await, first);
        }
    }
    // Sealed at rest: no private key in Redis in the clear.
    let dump = s.redis_cli(&["--scan", "--pattern", "portcullis:acme:*"]);
    assert!(
        dump.contains(":cert:a.test") && dump.contains(":account"),
        "{dump}"
    );
    let cert_key = format!("portcullis:acme:{}:cert:a.test", pebble.state_folder());
    let sealed = s.redis_cli(&["HGET", &cert_key, "sealed"]);
    assert!(!sealed.contains("PRIVATE KEY") && !sealed.contains("CERTIFICATE"));

    // Redis gone, a node restarted: it serves its last certificate from its state_dir (its cache).
    let mut s = s;
    s.redis.kill();
    nodes.remove(0);
    let again = start(&configs[0], None);
    assert_eq!(leaf(&pebble, again.https_addr(), NAMES[1]).await, first);
    assert_eq!(pebble.orders(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_order_once_by_http01_and_every_node_answers_the_ca() {
    three_nodes_order_once("http-01").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_order_once_by_tls_alpn01_and_every_node_answers_the_ca() {
    three_nodes_order_once("tls-alpn-01").await;
}

/// The holder is killed while it talks to the CA (a listener that never answers stands where Pebble will
/// be): after its lease, another node orders, once, and both survivors serve that certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_order_is_replaced_once_its_lease_runs_out() {
    let s = Setup::new("cluster-acme-kill").await;
    let options = Options::new(s.http, s.https);
    let silent = TcpListener::bind(format!("127.0.0.1:{}", options.acme_port)).unwrap();
    let mut pebble = Pebble::new(options);
    let names = ["a.test"];
    let lock = Setup::lock_key(&pebble, names[0]);
    assert_eq!(
        s.redis_cli(&["SET", &lock, "test", "NX", "PX", "60000"])
            .trim(),
        "OK"
    );
    let mut nodes: Vec<Portcullis> = (0..3)
        .map(|i| {
            start(
                &s.node(i, &pebble, &names, ("http-01", false)),
                Some("3000"),
            )
        })
        .collect();
    for n in &nodes {
        wait(n, WAITING);
    }
    s.redis_cli(&["DEL", &lock]);
    let holder = loop {
        if let Some(i) = (0..3).find(|&i| nodes[i].output().contains(HOLDING)) {
            break i;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Mid-order: it asks the CA (which never answers) for its directory, holding the lock.
    nodes[holder].signal("KILL");
    nodes[holder].wait();
    drop(silent);
    pebble.run();
    let survivors: Vec<usize> = (0..3).filter(|&i| i != holder).collect();
    pebble.set_host(names[0], &format!("127.0.0.{}", survivors[0] + 1));
    for &i in &survivors {
        wait(&nodes[i], INSTALLED);
    }
    assert_eq!(pebble.orders(), 1, "{:?}", pebble.log());
    let second: Vec<usize> = survivors
        .iter()
        .copied()
        .filter(|&i| nodes[i].output().contains(HOLDING))
        .collect();
    assert_eq!(
        second.len(),
        1,
        "one survivor took the lock after the lease"
    );
    let first = leaf(&pebble, nodes[survivors[0]].https_addr(), names[0]).await;
    assert_eq!(
        leaf(&pebble, nodes[survivors[1]].https_addr(), names[0]).await,
        first
    );
    nodes.clear();
}

/// Short certificates (12 s, renewed at two thirds): each renewal is ordered once for the cluster, and
/// every node swaps the renewed certificate in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_is_ordered_once_and_every_node_picks_it_up() {
    let s = Setup::new("cluster-acme-renew").await;
    let pebble = Pebble::start(Options {
        validity: Some(12),
        ..Options::new(s.http, s.https)
    });
    for (i, n) in NAMES.iter().enumerate() {
        pebble.set_host(n, &format!("127.0.0.{}", i + 1));
    }
    let lock = Setup::lock_key(&pebble, NAMES[0]);
    assert_eq!(
        s.redis_cli(&["SET", &lock, "test", "NX", "PX", "60000"])
            .trim(),
        "OK"
    );
    let nodes: Vec<Portcullis> = (0..3)
        .map(|i| start(&s.node(i, &pebble, &NAMES, ("http-01", false)), None))
        .collect();
    for n in &nodes {
        wait(n, WAITING);
    }
    s.redis_cli(&["DEL", &lock]);
    for n in &nodes {
        wait(n, INSTALLED);
    }
    let first = leaf(&pebble, nodes[0].https_addr(), NAMES[0]).await;
    for (i, n) in nodes.iter().enumerate() {
        n.wait_for_nth(
            |l| l.contains("ACME certificate") && l.contains(" installed"),
            2,
            LIMIT,
        )
        .unwrap_or_else(|| panic!("node {i} never got the renewal:\n{}", n.output()));
    }
    assert_eq!(pebble.orders(), 2, "{:?}", pebble.log());
    let holds: usize = nodes
        .iter()
        .map(|n| n.lines().iter().filter(|l| l.contains(HOLDING)).count())
        .sum();
    assert_eq!(holds, 2, "one holder per order");
    let renewed = leaf(&pebble, nodes[0].https_addr(), NAMES[0]).await;
    assert_ne!(renewed, first);
    for n in &nodes {
        assert_eq!(leaf(&pebble, n.https_addr(), NAMES[2]).await, renewed);
    }
}

/// Redis down when the first order is due: the node orders nothing alone (it serves its bootstrap
/// certificate), says why, and orders as soon as Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_due_while_redis_is_down_waits_for_it_then_is_made_once() {
    let mut s = Setup::new("cluster-acme-down").await;
    let pebble = Pebble::start(Options::new(s.http, s.https));
    let names = ["a.test"];
    let config = s.node(0, &pebble, &names, ("http-01", false));
    s.redis.kill();
    let node = start(&config, None);
    wait(&node, "ordering waits for it");
    assert_eq!(pebble.orders(), 0);
    s.redis.restart();
    wait(
        &node,
        "the cluster's Redis is back: the ACME attempt is made now",
    );
    wait(&node, INSTALLED);
    assert_eq!(pebble.orders(), 1);
    let issued = leaf(&pebble, node.https_addr(), names[0]).await;
    assert!(!issued.is_empty());
}

/// The holder's order fails (the name leads nowhere): the nodes that waited on it do not each try the
/// same order in turn; they back off as it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_order_is_not_retried_by_every_node_in_turn() {
    let s = Setup::new("cluster-acme-fail").await;
    let pebble = Pebble::start(Options::new(s.http, s.https));
    let names = ["a.test"];
    // Nothing listens there: the CA's validation fails.
    pebble.set_host(names[0], "127.0.0.9");
    let lock = Setup::lock_key(&pebble, names[0]);
    assert_eq!(
        s.redis_cli(&["SET", &lock, "test", "NX", "PX", "60000"])
            .trim(),
        "OK"
    );
    let nodes: Vec<Portcullis> = (0..3)
        .map(|i| start(&s.node(i, &pebble, &names, ("http-01", false)), None))
        .collect();
    for n in &nodes {
        wait(n, WAITING);
    }
    s.redis_cli(&["DEL", &lock]);
    let failures: Vec<String> = nodes
        .iter()
        .map(|n| wait(n, "ACME attempt failed"))
        .collect();
    assert_eq!(pebble.orders(), 1, "{failures:?}");
    let deferred = failures
        .iter()
        .filter(|l| l.contains("another node's attempt for these names failed"))
        .count();
    assert_eq!(deferred, 2, "{failures:?}");
}

/// IP names (each node's own address): the holder's self-check probes every address before it orders,
/// and the two nodes that do not order answer its probes from Redis, as they answer the CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_self_check_passes_through_the_nodes_that_do_not_order() {
    let s = Setup::new("cluster-acme-check").await;
    let pebble = Pebble::start(Options::new(s.http, s.https));
    let names = ["127.0.0.1", "127.0.0.2", "127.0.0.3"];
    let lock = Setup::lock_key(&pebble, names[0]);
    assert_eq!(
        s.redis_cli(&["SET", &lock, "test", "NX", "PX", "60000"])
            .trim(),
        "OK"
    );
    let nodes: Vec<Portcullis> = (0..3)
        .map(|i| start(&s.node(i, &pebble, &names, ("http-01", true)), None))
        .collect();
    for n in &nodes {
        wait(n, WAITING);
    }
    s.redis_cli(&["DEL", &lock]);
    for n in &nodes {
        wait(n, INSTALLED);
    }
    assert_eq!(pebble.orders(), 1, "{:?}", pebble.log());
    for n in &nodes {
        assert!(!n.output().contains("self-check failed"), "{}", n.output());
    }
}

/// A node whose key_file is not the cluster's cannot open what Redis holds: it says so and orders nothing
/// over it (else the others could no longer open theirs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_key_orders_nothing_over_the_clusters_certificate() {
    let s = Setup::new("cluster-acme-key").await;
    let pebble = Pebble::start(Options::new(s.http, s.https));
    let names = ["a.test"];
    let first = start(&s.node(0, &pebble, &names, ("http-01", false)), None);
    wait(&first, INSTALLED);
    let other_key = s.dir.write("other.key", &"11".repeat(32));
    let config = s.node(1, &pebble, &names, ("http-01", false));
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &s.dir.path().join("cluster.key").display().to_string(),
        &other_key.display().to_string(),
    );
    std::fs::write(&config, text).unwrap();
    let second = start(&config, None);
    wait(&second, "does not open with this node's cluster.key_file");
    wait(&second, "ACME attempt failed");
    assert_eq!(pebble.orders(), 1);
    assert!(!second.output().contains(HOLDING), "{}", second.output());
}
