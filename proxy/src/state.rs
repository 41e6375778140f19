//! What the proxy runs on, in two lifetimes. [`Shared`] lives as long as the process: connection
//! accounting, ACME challenges, upstream servers (pool and per-server state), the buffers' budgets, the
//! log's refusal budget, the metrics, and the live [`Snapshot`]. A [`Snapshot`] is everything built from one checked
//! `Config`: the sites (SNI and Host pick one from the same set), routes and their actions, security
//! headers, canned refusals, guard settings, redirect names, upstream groups, rate limits, the maintenance
//! page, the rustls config around those sites. It lives in an
//! `ArcSwap`: a connection takes one when it starts (its TLS config, guard and limits), a request takes one
//! when it starts and uses it to its end; a config reload ([`Shared::install`], from `reconfigure.rs`)
//! swaps in the next for new connections and requests. What must outlive a snapshot is found by a stable
//! key (a server by its address, a rate limit by its settings), never by position.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use arc_swap::ArcSwap;
use bytes::Bytes;
use portcullis_config::Config;

use crate::admission::Admission;
use crate::body::Buffers;
use crate::client_auth::ClientAuths;
use crate::http::action::maintenance::Maintenance;
use crate::http::guard::{Canned, Settings};
use crate::http::head::Limits;
use crate::http::headers::SecurityHeaders;
use crate::http::request_id::RequestIds;
use crate::metrics::{Metrics, RouteCells};
use crate::ratelimit::RateLimits;
use crate::telemetry::Refusals;
use crate::upstream::{Groups, Servers};

/// Process-lifetime state, shared by every connection and task through one `Arc`.
pub struct Shared {
    pub admission: Arc<Admission>,
    /// ACME challenge responses being validated (HTTP-01 on :80, TLS-ALPN-01 on :443); the ACME task fills it.
    pub challenges: Arc<portcullis_certs::acme::Challenges>,
    /// Every upstream server by address: the keep-alive pool and each server's own state.
    pub servers: Arc<Servers>,
    /// What request and response buffering hold now, against the budgets of the config it started with.
    pub buffers: Arc<Buffers>,
    /// The log's budget for lines about refused input (the guard's settings and the rate limits share it).
    pub refusals: Arc<Refusals>,
    /// What `/metrics` counts as it happens (kept across reloads).
    pub metrics: Arc<Metrics>,
    /// Shutdown has begun (set by `main` before the drain): the admin listener's `/health` answers 503.
    pub draining: AtomicBool,
    /// Each request's `X-Request-Id` when it brings none we keep (a counter and keys drawn at start).
    pub request_ids: RequestIds,
    /// `[cluster]` (fixed at start): the shared Redis and the ticket keys kept through it.
    pub cluster: Option<crate::cluster::Node>,
    /// The port HTTPS is served on (the listeners are bound once): what a redirect names.
    https_port: u16,
    /// The sandbox set up at start (fixed for the process's life): what a reload's paths must fit in.
    pub sandbox: crate::sandbox::State,
    live: ArcSwap<Snapshot>,
}

/// Everything derived from one checked config; immutable once built.
pub struct Snapshot {
    pub config: Config,
    /// Each site's names and certificate, in `config.sites` order: the handshake's certificate (through
    /// `tls`, whose resolver this is), the SNI's site and the Host's site all come from it.
    pub sites: Arc<portcullis_certs::Sites>,
    pub tls: Arc<rustls::ServerConfig>,
    /// The `client_auth` sites' own configs (their verifiers, reloaded in place), chosen by SNI.
    pub client_auth: Arc<ClientAuths>,
    /// The config's upstream groups, each naming its servers in [`Shared::servers`].
    pub upstreams: Groups,
    /// `[maintenance]`: the page as ready bytes, `allow`, and the flag file's last look.
    pub maintenance: Maintenance,
    pub headers: SecurityHeaders,
    /// `""` when HTTPS is on 443, else `":PORT"`: what a redirect appends to the host.
    pub redirect_port: String,
    /// `[[rate_limit]]` (or the built-in `auth` limit) and their stores; kept across reloads by settings.
    pub rate_limits: Arc<RateLimits>,
    /// What the HTTP/1.1 request guard enforces.
    pub guard: Arc<Settings>,
    /// The guard's own refusals, with the security headers (HSTS only in the HTTPS set).
    pub canned_https: Arc<Canned>,
    pub canned_http: Arc<Canned>,
    /// Each route's request counters, resolved against [`Shared::metrics`] once per snapshot.
    pub routes: RouteCells,
    /// Hosts a plain-HTTP redirect may point at: every site's names, or any host (empty) when the default
    /// site has none.
    pub redirect_names: Vec<String>,
}

impl Shared {
    /// The process state and its first snapshot, from the config it started with. `maintenance_page` is
    /// `[maintenance] page` as read at start-up (`None`: the built-in page).
    #[allow(clippy::too_many_arguments)] // each is one thing start-up made for the process state, used once
    pub fn new(
        config: Config,
        tls: Arc<rustls::ServerConfig>,
        sites: Arc<portcullis_certs::Sites>,
        client_auth: Arc<ClientAuths>,
        maintenance_page: Option<Bytes>,
        https_port: u16,
        cluster: Option<crate::cluster::Node>,
        sandbox: crate::sandbox::State,
    ) -> Shared {
        let l = &config.limits;
        let refusals = Arc::new(Refusals::default());
        let servers = Arc::new(Servers::new(&config));
        let admission = Arc::new(Admission::new(l.connections, l.connections_per_ip));
        let rate_limits = Arc::new(RateLimits::new(
            &config.rate_limits,
            refusals.clone(),
            cluster.as_ref().map(|n| n.redis.clone()),
        ));
        let buffers = Arc::new(Buffers::new(&config));
        let metrics = Arc::new(Metrics::default());
        let lasting = Lasting {
            servers: &servers,
            refusals: &refusals,
            metrics: &metrics,
        };
        let snapshot = Snapshot::new(
            config,
            sites,
            (tls, client_auth),
            &lasting,
            maintenance_page,
            https_port,
            rate_limits,
        );
        // `[cluster]` with its key: challenge answers are published to, and looked up in, Redis.
        let challenges = Arc::new(portcullis_certs::acme::Challenges::default());
        if let Some(shared) = cluster.as_ref().and_then(|n| n.acme.clone()) {
            challenges.share_with(shared);
        }
        Shared {
            admission,
            challenges,
            servers,
            buffers,
            refusals,
            metrics,
            draining: AtomicBool::new(false),
            request_ids: RequestIds::default(),
            cluster,
            https_port,
            sandbox,
            live: ArcSwap::from_pointee(snapshot),
        }
    }

    /// The cluster's ticketer, for a TLS config built anew (`None`: each config makes its own keys).
    pub fn tickets(&self) -> Option<Arc<dyn rustls::server::ProducesTickets>> {
        self.cluster
            .as_ref()
            .map(|n| n.tickets.clone() as Arc<dyn rustls::server::ProducesTickets>)
    }

    /// The snapshot in force now; keep it for the whole connection or request.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.live.load_full()
    }

    /// The snapshot of a reloaded config, with its sites (`tls` built around them), its groups on
    /// [`Shared::servers`] (which must have learnt the config's servers first) and with the rate limits
    /// `renew` kept or built.
    pub fn next(
        &self,
        config: Config,
        sites: Arc<portcullis_certs::Sites>,
        tls: (Arc<rustls::ServerConfig>, Arc<ClientAuths>),
        maintenance_page: Option<Bytes>,
        rate_limits: Arc<RateLimits>,
    ) -> Snapshot {
        Snapshot::new(
            config,
            sites,
            tls,
            &Lasting {
                servers: &self.servers,
                refusals: &self.refusals,
                metrics: &self.metrics,
            },
            maintenance_page,
            self.https_port,
            rate_limits,
        )
    }

    /// Puts `next` in force for every connection and request from now on, in one swap; those that took the
    /// previous one finish on it.
    pub fn install(&self, next: Snapshot) {
        self.live.store(Arc::new(next));
    }
}

/// What a snapshot is built on that outlives it: the servers its groups name, the log's refusal budget its
/// guard shares, the metrics its route counters count into.
struct Lasting<'a> {
    servers: &'a Servers,
    refusals: &'a Arc<Refusals>,
    metrics: &'a Metrics,
}

impl Snapshot {
    #[allow(clippy::too_many_arguments)] // each is one piece of the snapshot, built by its two callers
    fn new(
        config: Config,
        sites: Arc<portcullis_certs::Sites>,
        (tls, client_auth): (Arc<rustls::ServerConfig>, Arc<ClientAuths>),
        lasting: &Lasting<'_>,
        maintenance_page: Option<Bytes>,
        https_port: u16,
        rate_limits: Arc<RateLimits>,
    ) -> Snapshot {
        let catch_all = config.sites.first().is_some_and(|s| s.names.is_empty());
        let redirect_names = if catch_all {
            Vec::new()
        } else {
            config
                .sites
                .iter()
                .flat_map(|s| s.names.iter().cloned())
                .collect()
        };
        let headers = SecurityHeaders::new(&config.headers);
        let l = &config.limits;
        let guard = Arc::new(Settings {
            limits: Limits {
                head_bytes: usize::try_from(l.header_bytes).unwrap_or(usize::MAX),
                headers: usize::try_from(l.headers).unwrap_or(usize::MAX),
                uri_bytes: usize::try_from(l.uri_bytes).unwrap_or(usize::MAX),
            },
            header_timeout: config.timeouts.client_header,
            body: crate::pace::Rule::of(&config),
            refusals: lasting.refusals.clone(),
        });
        Snapshot {
            upstreams: Groups::new(&config, lasting.servers),
            routes: RouteCells::new(lasting.metrics, &config),
            maintenance: Maintenance::new(&config.maintenance, maintenance_page),
            canned_https: Arc::new(Canned::new(&headers, true)),
            canned_http: Arc::new(Canned::new(&headers, false)),
            headers,
            redirect_names,
            redirect_port: if https_port == 443 {
                String::new()
            } else {
                format!(":{https_port}")
            },
            guard,
            rate_limits,
            config,
            sites,
            tls,
            client_auth,
        }
    }
}
