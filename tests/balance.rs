//! Several real app instances (gunicorn + Flask, Debian's) behind Portcullis: how each balancing policy
//! shares requests among them (reported per instance), `ip_hash` stickiness and what a stopped instance
//! moves, and active health checks taking a stopped instance out and a restarted one back in.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use portcullis_tests::instances::{Instance, get};
use portcullis_tests::{Client, Pki, Portcullis, TempDir};

/// A config with `top` (top-level keys), one HTTPS listener (no plain HTTP), and `body` (routes and
/// upstreams).
fn config(pki: &Pki, top: &str, body: &str) -> String {
    format!(
        "{top}\n[listen]\nhttps = [\"127.0.0.1:0\"]\nhttp = []\n\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n\n{body}\n[process]\ntemp_dir = \"{}\"\n",
        pki.cert.display(),
        pki.key.display(),
        pki.cert.with_file_name("buffers").display()
    )
}

fn start(dir: &TempDir, pki: &Pki, top: &str, body: &str) -> Portcullis {
    let p = Portcullis::run(&dir.write("p.toml", &config(pki, top, body)), &[]);
    assert!(p.ready, "portcullis did not start; log:\n{}", p.output());
    p
}

/// `n` requests to `path`, one after another; how many each instance answered.
async fn tally(p: &Portcullis, client: &Client, path: &str, n: usize) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let (status, who) = get(client, p.https_addr(), path, None).await;
        assert_eq!(status, 200, "{who}\nlog:\n{}", p.output());
        *out.entry(who).or_default() += 1;
    }
    out
}

/// `clients` clients at once, each sending `each` requests to `path` one after another.
async fn tally_concurrent(
    p: &Portcullis,
    client: &Client,
    path: &str,
    clients: usize,
    each: usize,
) -> BTreeMap<String, usize> {
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, addr, path) = (client.clone(), p.https_addr(), path.to_owned());
            tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..each {
                    got.push(get(&client, addr, &path, None).await);
                }
                got
            })
        })
        .collect();
    let mut out = BTreeMap::new();
    for t in tasks {
        for (status, who) in t.await.unwrap() {
            assert_eq!(status, 200, "{who}");
            *out.entry(who).or_default() += 1;
        }
    }
    out
}

fn count(t: &BTreeMap<String, usize>, who: &str) -> usize {
    t.get(who).copied().unwrap_or(0)
}

/// Waits (a safety bound, not a timing assertion) for the proxy's log line `what` about server `addr`.
fn wait_for_server_line(p: &Portcullis, what: &str, addr: &str) -> String {
    let server = format!("server={addr} ");
    p.wait_for_log(
        |l| l.contains(what) && l.contains(&server),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|| panic!("no \"{what}\" line for {addr}; log:\n{}", p.output()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_policy_shares_requests_over_real_instances_by_weight() {
    let dir = TempDir::new("balance");
    let pki = Pki::new(dir.path(), &[]);
    let a = Instance::tcp("a");
    let b = Instance::tcp("b");
    let c = Instance::unix("c", &dir.path().join("c.sock"));
    let servers = format!(
        "[\"{}\", \"{}\", {{ addr = \"{}\", weight = 2 }}]",
        a.addr(),
        b.addr(),
        c.addr()
    );
    let policies = ["least_requests", "round_robin", "random_two"];
    let body: String = policies
        .iter()
        .map(|p| format!("[[route]]\npath = \"/{p}/\"\nupstream = \"{p}\"\n\n[upstream.{p}]\nservers = {servers}\nbalance = \"{p}\"\n\n"))
        .collect();
    let p = start(&dir, &pki, "", &body);
    let client = Client::new(&pki.ca_pem);

    for policy in policies {
        let t = tally(&p, &client, &format!("/{policy}/x"), 200).await;
        eprintln!("{policy}, 200 requests one at a time (weights a=1 b=1 c=2): {t:?}");
        if policy == "random_two" {
            // Each draw is by weight; about 50/50/100.
            for (who, want) in [("a", 50), ("b", 50), ("c", 100)] {
                assert!(count(&t, who).abs_diff(want) <= 30, "{policy}: {t:?}");
            }
        } else {
            // Idle servers: the smooth weighted schedule, exactly.
            let want: BTreeMap<String, usize> =
                [("a".into(), 50), ("b".into(), 50), ("c".into(), 100)].into();
            assert_eq!(t, want, "{policy}");
        }
    }
    // Four clients at once on requests that take 50 ms: every instance serves, by load and weight.
    for policy in ["least_requests", "random_two"] {
        let t = tally_concurrent(&p, &client, &format!("/{policy}/x?sleep_ms=50"), 4, 15).await;
        eprintln!("{policy}, 4 clients x 15 requests of 50 ms: {t:?}");
        assert!(
            ["a", "b", "c"].iter().all(|w| count(&t, w) > 0),
            "{policy}: {t:?}"
        );
        assert_eq!(t.values().sum::<usize>(), 60);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_keeps_each_client_on_one_instance_and_a_stopped_one_moves_only_its_own() {
    let dir = TempDir::new("iphash");
    let pki = Pki::new(dir.path(), &[]);
    let a = Instance::tcp("a");
    let mut b = Instance::tcp("b");
    let c = Instance::unix("c", &dir.path().join("c.sock"));
    let body = format!(
        "[[route]]\npath = \"/\"\nupstream = \"app\"\n\n[upstream.app]\nservers = [\"{}\", \"{}\", \"{}\"]\nbalance = \"ip_hash\"\nhealth = {{ path = \"/health\", interval = \"250ms\", timeout = \"2s\", rise = 1, fall = 1 }}\n",
        a.addr(),
        b.addr(),
        c.addr()
    );
    // The test's 127.0.0.1 is a trusted proxy: X-Forwarded-For names the client.
    let p = start(&dir, &pki, "trusted_proxies = [\"127.0.0.1\"]", &body);
    let client = Client::new(&pki.ca_pem);
    let clients: Vec<String> = (1..=30)
        .map(|i| format!("203.0.113.{i}"))
        .chain((1..=10).map(|i| format!("2001:db8:{i}::1")))
        .collect();

    let mut home = BTreeMap::new();
    for x in &clients {
        let (s1, first) = get(&client, p.https_addr(), "/", Some(x)).await;
        let (s2, again) = get(&client, p.https_addr(), "/", Some(x)).await;
        assert_eq!((s1, s2), (200, 200));
        assert_eq!(first, again, "client {x} moved between two requests");
        home.insert(x.clone(), first);
    }
    let per: BTreeMap<&str, usize> = home.values().fold(BTreeMap::new(), |mut m, w| {
        *m.entry(w.as_str()).or_default() += 1;
        m
    });
    eprintln!("ip_hash: clients per instance: {per:?}");
    assert_eq!(per.len(), 3, "every instance has clients: {per:?}");

    // b stops: once the checks have seen it, its clients go elsewhere and nobody else moves.
    b.kill();
    wait_for_server_line(&p, "upstream server is down", &b.addr());
    let mut moved = 0;
    for x in &clients {
        let (s, now) = get(&client, p.https_addr(), "/", Some(x)).await;
        assert_eq!(s, 200, "{now}");
        if home[x] == "b" {
            assert_ne!(now, "b");
            moved += 1;
        } else {
            assert_eq!(now, home[x], "client {x} moved though its instance is up");
        }
    }
    eprintln!("ip_hash: b stopped: {moved} clients moved, all of them b's");
    assert_eq!(moved, per["b"]);

    // b is back: its clients return to it.
    b.restart();
    wait_for_server_line(&p, "upstream server is back", &b.addr());
    for x in &clients {
        let (s, now) = get(&client, p.https_addr(), "/", Some(x)).await;
        assert_eq!((s, &now), (200, &home[x]), "client {x}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_take_stopped_instances_out_and_bring_restarted_ones_back() {
    let dir = TempDir::new("health");
    let pki = Pki::new(dir.path(), &[]);
    let a = Instance::tcp("a");
    let mut b = Instance::tcp("b");
    let mut c = Instance::unix("c", &dir.path().join("c.sock"));
    // Passive health off: only the active checks take a server out here.
    let body = format!(
        "[[route]]\npath = \"/\"\nupstream = \"app\"\n\n[upstream.app]\nservers = [\"{}\", \"{}\", \"{}\"]\nbalance = \"round_robin\"\nmax_fails = 0\nhealth = {{ path = \"/health\", interval = \"500ms\", timeout = \"2s\", rise = 1, fall = 2 }}\n",
        a.addr(),
        b.addr(),
        c.addr()
    );
    let p = start(&dir, &pki, "", &body);
    let client = Client::new(&pki.ca_pem);
    let t = tally(&p, &client, "/", 30).await;
    assert_eq!(t.len(), 3, "{t:?}");

    // b (TCP) and c (unix socket) die; after `fall` failed checks nothing is sent to them.
    b.kill();
    c.kill();
    let down_b = wait_for_server_line(&p, "upstream server is down", &b.addr());
    let down_c = wait_for_server_line(&p, "upstream server is down", &c.addr());
    assert!(down_b.contains("check=connect refused"), "{down_b}");
    assert!(down_c.contains("check=connect refused"), "{down_c}");
    let t = tally(&p, &client, "/", 30).await;
    assert_eq!(t, BTreeMap::from([("a".to_owned(), 30)]));

    // Restarted: each is back once a check passes (rise = 1), at most an interval after its port opens.
    for i in [&mut b, &mut c] {
        let opened = i.restart();
        wait_for_server_line(&p, "upstream server is back", &i.addr());
        eprintln!(
            "{}: back in {:?} after its socket opened (interval 500 ms)",
            i.name,
            Instant::now() - opened
        );
    }
    let t = tally(&p, &client, "/", 30).await;
    eprintln!("after the restarts: {t:?}");
    assert_eq!(t.len(), 3, "{t:?}");

    // The checks went straight to the instances: none is in the access log.
    assert!(
        !p.output().contains("path=/health"),
        "a health check was logged as a request:\n{}",
        p.output()
    );
}
