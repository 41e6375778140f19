//! `/metrics` as the admin listener serves it: what `metrics::Metrics` counted, then what the state holds now
//! (open connections, upstream servers, rate-limit refusals, buffers, certificate expiry), read at each
//! scrape into a registry of its own and written in the Prometheus text format (0.0.4).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::metrics::{Labels, secs, site_label};
use crate::state::{Shared, Snapshot};

/// The `Content-Type` of what [`render`] writes.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// `/metrics`: the counters, then what the state holds now.
pub fn render(shared: &Shared) -> String {
    let snap = shared.snapshot();
    let mut r = Registry::with_prefix("portcullis");
    shared.metrics.register(&mut r);
    r.register(
        "connections_open",
        "Client connections open now (tunnels included), against [limits] connections",
        gauge(shared.admission.open()),
    );
    let (memory, disk) = shared.buffers.used();
    r.register(
        "buffer_memory_bytes",
        "Bytes of request and response bodies buffered in memory now",
        gauge(memory),
    );
    r.register(
        "buffer_disk_bytes",
        "Bytes of request and response bodies buffered in temporary files now",
        gauge(disk),
    );
    upstreams(&mut r, &snap);
    let limits = Family::<Labels, Counter>::default();
    for (name, rejected) in snap.rate_limits.rejections() {
        limits
            .get_or_create(&vec![("limit", name.to_owned())])
            .inc_by(rejected);
    }
    r.register(
        "rate_limited",
        "Requests refused (429) by a rate limit, by limit (one changed by a reload counts from 0)",
        limits,
    );
    certificates(&mut r, &snap);
    if let Some(node) = &shared.cluster {
        cluster(&mut r, node);
    }
    let mut out = String::new();
    // Writing to a String cannot fail; an encoder error would be a bug of ours (say, a bad name).
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &r) {
        tracing::error!(error = %e, "cannot encode the metrics");
    }
    out
}

/// `[cluster]`: whether Redis is in use now, how often it went away, what was done without it.
fn cluster(r: &mut Registry, node: &crate::cluster::Node) {
    let (downs, fallbacks) = node.redis.counts();
    r.register(
        "cluster_redis_up",
        "1 while the cluster's Redis answers (shared rate limits and ticket keys), 0 while this node uses its own",
        gauge(i64::from(node.redis.is_up())),
    );
    let c = Counter::<u64>::default();
    c.inc_by(downs);
    r.register(
        "cluster_redis_down",
        "Times the cluster's Redis stopped answering (logged once each)",
        c,
    );
    let c = Counter::<u64>::default();
    c.inc_by(fallbacks);
    r.register(
        "cluster_fallbacks",
        "Redis round trips not made (Redis down) or not answered within [cluster] timeout: decided locally",
        c,
    );
    r.register(
        "cluster_tickets_shared",
        "1 while new session tickets are sealed with the cluster's key (any node resumes them), 0 with this node's own",
        gauge(i64::from(node.tickets.shared())),
    );
}

/// Each server once (under the first group that names it): up, in flight, failures, retries.
fn upstreams(r: &mut Registry, snap: &Snapshot) {
    let up = Family::<Labels, Gauge>::default();
    let in_flight = Family::<Labels, Gauge>::default();
    let failures = Family::<Labels, Counter>::default();
    let retries = Family::<Labels, Counter>::default();
    let now = std::time::Instant::now();
    let mut seen: Vec<&portcullis_config::ServerAddr> = Vec::new();
    for g in snap.upstreams.iter() {
        for member in g.members() {
            let s = &member.server;
            if seen.contains(&&s.addr) {
                continue;
            }
            seen.push(&s.addr);
            let labels = vec![
                ("upstream", g.name.to_string()),
                ("server", s.addr.to_string()),
            ];
            up.get_or_create(&labels).set(i64::from(s.is_up(now)));
            in_flight
                .get_or_create(&labels)
                .set(i64::try_from(s.in_flight()).unwrap_or(i64::MAX));
            failures.get_or_create(&labels).inc_by(s.failures());
            retries.get_or_create(&labels).inc_by(s.retries());
        }
    }
    r.register(
        "upstream_server_up",
        "Whether an upstream server takes traffic now (1) or is out after failures or failed checks (0)",
        up,
    );
    r.register(
        "upstream_server_in_flight",
        "Requests sent to an upstream server still waiting for their response head",
        in_flight,
    );
    r.register(
        "upstream_server_failures",
        "Connect, reset and timeout failures of an upstream server (passive health)",
        failures,
    );
    r.register(
        "upstream_server_retries",
        "Requests sent again to another server after failing on this one",
        retries,
    );
}

/// Each site name's certificate's notAfter, as served now.
fn certificates(r: &mut Registry, snap: &Snapshot) {
    let expiry = Family::<Labels, Gauge>::default();
    for (i, site) in snap.config.sites.iter().enumerate() {
        let Some(key) = snap.sites.current(i) else {
            continue;
        };
        let Ok(info) = portcullis_certs::inspect::Info::read(&key.cert) else {
            continue;
        };
        let names = if site.names.is_empty() {
            vec![site_label(&site.names)]
        } else {
            site.names.clone()
        };
        for name in names {
            expiry
                .get_or_create(&vec![("name", name)])
                .set(secs(info.not_after));
        }
    }
    r.register(
        "certificate_expiry_timestamp_seconds",
        "The notAfter of the certificate served for each site name (unix time)",
        expiry,
    );
}

fn gauge(v: impl TryInto<i64>) -> Gauge {
    let g = Gauge::default();
    g.set(v.try_into().unwrap_or(i64::MAX));
    g
}
