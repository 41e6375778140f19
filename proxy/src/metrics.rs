//! What `/metrics` shows (the admin listener serves it), in the Prometheus text format through
//! `prometheus-client`. Two kinds of numbers:
//! - counted as things happen, in [`Metrics`] (process lifetime, so a reload keeps them): requests by
//!   route, status class and method and their latency ([`RouteCell`]: resolved once per route and snapshot,
//!   then one atomic add per request and three for the latency histogram, no label lookup, no lock), bytes
//!   read and written on client connections, open tunnels, TLS handshakes and failures by reason, reloads,
//!   ACME outcomes;
//! - read from the state that already holds them when a scrape asks (`scrape.rs`, which also writes the
//!   text): open connections (admission), upstream servers (health, in flight, failures, retries),
//!   rate-limit refusals, buffers in memory and on disk, certificate expiry.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Method, StatusCode};
use portcullis_config::Config;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// Labels, in the order written. Values come from the config (site names, route paths, upstream names and
/// addresses, limit names) or from fixed lists here: never from a request.
pub type Labels = Vec<(&'static str, String)>;

/// Request methods counted by name; any other is `other`.
const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "other",
];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
/// Latency buckets, in seconds: from a cached page to `upstream_response`'s default (60 s).
const BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Why a TLS handshake failed: a fixed list, so that the label is bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// Not within the handshake timeout.
    Timeout,
    /// The client closed the connection before the handshake was done.
    Eof,
    /// What came was not TLS (a plain HTTP request on the HTTPS port, say).
    NotTls,
    /// Nothing in common: protocol versions, cipher suites, groups, signature schemes, ALPN.
    Incompatible,
    /// The client sent an alert (often: it does not trust our certificate).
    AlertReceived,
    /// `strict_sni` and a name no site has, or no certificate to offer.
    NoCertificate,
    /// A TLS protocol error of another kind.
    Protocol,
    /// A socket error.
    Io,
}

impl HandshakeFailure {
    const ALL: [HandshakeFailure; 8] = [
        HandshakeFailure::Timeout,
        HandshakeFailure::Eof,
        HandshakeFailure::NotTls,
        HandshakeFailure::Incompatible,
        HandshakeFailure::AlertReceived,
        HandshakeFailure::NoCertificate,
        HandshakeFailure::Protocol,
        HandshakeFailure::Io,
    ];

    fn label(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Eof => "eof",
            HandshakeFailure::NotTls => "not_tls",
            HandshakeFailure::Incompatible => "incompatible",
            HandshakeFailure::AlertReceived => "alert_received",
            HandshakeFailure::NoCertificate => "no_certificate",
            HandshakeFailure::Protocol => "protocol",
            HandshakeFailure::Io => "io",
        }
    }

    /// What a failed handshake's error says (tokio-rustls hands rustls' error inside an `io::Error`).
    pub fn of(e: &std::io::Error) -> HandshakeFailure {
        use rustls::Error as E;
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            return HandshakeFailure::Eof;
        }
        let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
            return HandshakeFailure::Io;
        };
        match tls {
            E::InvalidMessage(_) | E::InappropriateMessage { .. } => HandshakeFailure::NotTls,
            E::PeerIncompatible(_) | E::NoApplicationProtocol => HandshakeFailure::Incompatible,
            E::AlertReceived(_) => HandshakeFailure::AlertReceived,
            E::NoCertificatesPresented | E::General(_) => HandshakeFailure::NoCertificate,
            _ => HandshakeFailure::Protocol,
        }
    }
}

/// What is counted as it happens; lives as long as the process (a reload keeps every count).
#[derive(Debug)]
pub struct Metrics {
    requests: Family<Labels, Counter>,
    latency: Family<Labels, Histogram>,
    pub bytes_received: Counter,
    pub bytes_sent: Counter,
    tunnels: Gauge,
    handshakes: Counter,
    handshake_failures: Family<Labels, Counter>,
    /// By [`HandshakeFailure::ALL`]'s order.
    failures_by_reason: Vec<Counter>,
    reloads: Family<Labels, Counter>,
    reloads_ok: Counter,
    reloads_failed: Counter,
    acme_success: Family<Labels, Gauge>,
    acme_failure: Family<Labels, Gauge>,
    started: SystemTime,
}

impl Default for Metrics {
    fn default() -> Self {
        let handshake_failures = Family::<Labels, Counter>::default();
        let failures_by_reason = HandshakeFailure::ALL
            .iter()
            .map(|r| handshake_failures.get_or_create_owned(&vec![("reason", r.label().into())]))
            .collect();
        let reloads = Family::<Labels, Counter>::default();
        let reloads_ok = reloads.get_or_create_owned(&vec![("result", "ok".into())]);
        let reloads_failed = reloads.get_or_create_owned(&vec![("result", "failed".into())]);
        Metrics {
            requests: Family::default(),
            latency: Family::default(),
            bytes_received: Counter::default(),
            bytes_sent: Counter::default(),
            tunnels: Gauge::default(),
            handshakes: Counter::default(),
            handshake_failures,
            failures_by_reason,
            reloads,
            reloads_ok,
            reloads_failed,
            acme_success: Family::default(),
            acme_failure: Family::default(),
            started: SystemTime::now(),
        }
    }
}

impl Metrics {
    /// Registers what is counted here (each a clone sharing the counts) in a scrape's registry.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "requests",
            concat!(
                "Requests answered, by site, route (its configured path; none: refused before routing; ",
                "redirect: plain HTTP), method and status class"
            ),
            self.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time from the request's start to its response head being ready, by site and route",
            self.latency.clone(),
        );
        r.register(
            "received_bytes",
            "Bytes read from client connections (after TLS), heads and bodies, tunnels included",
            self.bytes_received.clone(),
        );
        r.register(
            "sent_bytes",
            "Bytes written to client connections (before TLS), heads and bodies, tunnels included",
            self.bytes_sent.clone(),
        );
        r.register(
            "tunnels_open",
            "Upgraded connections (WebSockets) open now",
            self.tunnels.clone(),
        );
        r.register(
            "tls_handshakes",
            "TLS handshakes completed",
            self.handshakes.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "TLS handshakes that failed, by reason",
            self.handshake_failures.clone(),
        );
        r.register(
            "config_reloads",
            "Config reloads (SIGHUP), by result",
            self.reloads.clone(),
        );
        r.register(
            "acme_last_success_timestamp_seconds",
            "When an ACME order last installed a certificate, by site (unix time)",
            self.acme_success.clone(),
        );
        r.register(
            "acme_last_failure_timestamp_seconds",
            "When an ACME attempt last failed, by site (unix time)",
            self.acme_failure.clone(),
        );
        r.register(
            "start_time_seconds",
            "When the process started (unix time)",
            {
                let g = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
                g.set(secs(self.started));
                g
            },
        );
    }

    pub fn handshake_done(&self) {
        self.handshakes.inc();
    }

    pub fn handshake_failed(&self, why: HandshakeFailure) {
        if let Some(c) = HandshakeFailure::ALL
            .iter()
            .position(|r| *r == why)
            .and_then(|i| self.failures_by_reason.get(i))
        {
            c.inc();
        }
    }

    pub fn reloaded(&self, ok: bool) {
        if ok {
            self.reloads_ok.inc();
        } else {
            self.reloads_failed.inc();
        }
    }

    /// An ACME attempt for the site named `site` ended now, well or not.
    pub fn acme_attempt(&self, site: &str, ok: bool) {
        let family = if ok {
            &self.acme_success
        } else {
            &self.acme_failure
        };
        family
            .get_or_create(&vec![("site", site.to_owned())])
            .set(unix_now());
    }

    /// Counts an open tunnel until the guard is dropped.
    pub fn tunnel_opened(&self) -> TunnelOpen {
        self.tunnels.inc();
        TunnelOpen(self.tunnels.clone())
    }
}

/// An open tunnel (WebSocket), counted until dropped.
#[derive(Debug)]
pub struct TunnelOpen(Gauge);

impl Drop for TunnelOpen {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One route's counters in one snapshot: its label values fixed, each (method, status class) counter
/// resolved the first time it is needed and kept, the latency histogram resolved when the snapshot is
/// built. A reload builds new cells on the same families: the counts go on.
#[derive(Debug)]
pub struct RouteCell {
    site: String,
    route: String,
    family: Family<Labels, Counter>,
    counters: [[OnceLock<Counter>; CLASSES.len()]; METHODS.len()],
    latency: Histogram,
}

impl RouteCell {
    fn new(metrics: &Metrics, site: String, route: String) -> RouteCell {
        let latency = metrics
            .latency
            .get_or_create_owned(&vec![("site", site.clone()), ("route", route.clone())]);
        RouteCell {
            site,
            route,
            family: metrics.requests.clone(),
            counters: Default::default(),
            latency,
        }
    }

    /// One request answered with `status` after `took` (the response head is ready): one atomic add for
    /// the count, three for the latency.
    pub fn count(&self, method: usize, status: StatusCode, took: Duration) {
        let class = usize::from(status.as_u16() / 100)
            .saturating_sub(1)
            .min(CLASSES.len() - 1);
        let method = method.min(METHODS.len() - 1);
        self.counters[method][class]
            .get_or_init(|| {
                self.family.get_or_create_owned(&vec![
                    ("site", self.site.clone()),
                    ("route", self.route.clone()),
                    ("method", METHODS[method].into()),
                    ("class", CLASSES[class].into()),
                ])
            })
            .inc();
        self.latency.observe(took);
    }
}

/// Every route's cell in one snapshot, by site and route index, and the cells of requests no route took
/// (refused before routing, no site, no route: `route="none"`) and of plain-HTTP redirects
/// (`route="redirect"`).
#[derive(Debug)]
pub struct RouteCells {
    sites: Vec<Vec<RouteCell>>,
    pub unrouted: RouteCell,
    pub redirect: RouteCell,
}

impl RouteCells {
    pub fn new(metrics: &Metrics, config: &Config) -> RouteCells {
        let sites = config
            .sites
            .iter()
            .map(|s| {
                let site = site_label(&s.names);
                s.routes
                    .iter()
                    .map(|r| RouteCell::new(metrics, site.clone(), r.path.clone()))
                    .collect()
            })
            .collect();
        RouteCells {
            sites,
            unrouted: RouteCell::new(metrics, String::new(), "none".into()),
            redirect: RouteCell::new(metrics, String::new(), "redirect".into()),
        }
    }

    pub fn route(&self, site: usize, route: usize) -> &RouteCell {
        self.sites
            .get(site)
            .and_then(|s| s.get(route))
            .unwrap_or(&self.unrouted)
    }
}

/// The index of a request method in the counted list (`other` for the rest).
pub fn method_index(m: &Method) -> usize {
    METHODS
        .iter()
        .position(|name| *name == m.as_str())
        .unwrap_or(METHODS.len() - 1)
}

/// A site's label: its first name, or `default` for a nameless default site.
pub fn site_label(names: &[String]) -> String {
    names.first().cloned().unwrap_or_else(|| "default".into())
}

/// A latency histogram of atomics (prometheus-client's own takes a lock per observation): a count per
/// bucket, the sum in microseconds, the count. Clones share the counts.
#[derive(Debug, Clone, Default)]
pub struct Histogram(std::sync::Arc<HistogramInner>);

#[derive(Debug, Default)]
struct HistogramInner {
    /// Per bucket (not cumulative), the last for above every bound.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, took: Duration) {
        let s = took.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(BUCKETS.len());
        let h = &self.0;
        h.buckets[i].fetch_add(1, Ordering::Relaxed);
        h.sum_micros.fetch_add(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        h.count.fetch_add(1, Ordering::Relaxed);
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let h = &self.0;
        let mut buckets: Vec<(f64, u64)> = BUCKETS
            .iter()
            .zip(&h.buckets)
            .map(|(b, n)| (*b, n.load(Ordering::Relaxed)))
            .collect();
        let over = h.buckets[BUCKETS.len()].load(Ordering::Relaxed);
        buckets.push((f64::INFINITY, over));
        // The count is the buckets' total, so that the two agree within one scrape.
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

pub fn secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn unix_now() -> i64 {
    secs(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_outside_the_list_are_other() {
        assert_eq!(METHODS[method_index(&Method::GET)], "GET");
        assert_eq!(METHODS[method_index(&Method::PATCH)], "PATCH");
        let odd = Method::from_bytes(b"PROPFIND").unwrap();
        assert_eq!(METHODS[method_index(&odd)], "other");
    }

    #[test]
    fn a_route_counts_by_method_and_class_and_its_latency() {
        let m = Metrics::default();
        let cell = RouteCell::new(&m, "app.test".into(), "/".into());
        for _ in 0..3 {
            cell.count(0, StatusCode::OK, Duration::from_millis(3));
        }
        cell.count(2, StatusCode::NOT_FOUND, Duration::from_secs(100));
        cell.count(99, StatusCode::from_u16(599).unwrap(), Duration::ZERO);
        let mut r = Registry::default();
        r.register("requests", "", m.requests.clone());
        r.register("latency", "", m.latency.clone());
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &r).unwrap();
        for line in [
            r#"requests_total{site="app.test",route="/",method="GET",class="2xx"} 3"#,
            r#"requests_total{site="app.test",route="/",method="POST",class="4xx"} 1"#,
            r#"requests_total{site="app.test",route="/",method="other",class="5xx"} 1"#,
            r#"latency_bucket{site="app.test",route="/",le="0.005"} 4"#,
            r#"latency_bucket{site="app.test",route="/",le="60"} 4"#,
            r#"latency_bucket{site="app.test",route="/",le="+Inf"} 5"#,
            r#"latency_count{site="app.test",route="/"} 5"#,
        ] {
            assert!(out.lines().any(|l| l == line), "{line} not in\n{out}");
        }
    }
}
