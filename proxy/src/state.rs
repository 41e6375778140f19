//! `State`: everything a connection needs, built once from the config at start and shared by `Arc`.
//! Built here, read everywhere; nothing in it is mutated on the request path except the admission counters
//! (per connection, not per request), the refusal log's counters (atomics, per refusal) and the upstream
//! pool's own internals.

use std::sync::Arc;

use portcullis_config::Config;

use crate::http::guard::{Canned, Settings};
use crate::http::head::Limits;
use crate::http::headers::SecurityHeaders;
use crate::http::server::Admission;
use crate::ratelimit::RateLimits;
use crate::telemetry::Refusals;
use crate::upstream::Upstreams;

pub struct State {
    pub config: Config,
    pub tls: Arc<rustls::ServerConfig>,
    pub upstreams: Upstreams,
    pub headers: SecurityHeaders,
    /// `""` when HTTPS is on 443, else `":PORT"`: what a redirect appends to the host.
    pub redirect_port: String,
    /// What the HTTP/1.1 request guard enforces.
    pub guard: Arc<Settings>,
    /// The guard's own refusals, with the security headers (HSTS only in the HTTPS set).
    pub canned_https: Arc<Canned>,
    pub canned_http: Arc<Canned>,
    pub admission: Arc<Admission>,
    /// `[[rate_limit]]` (or the built-in `auth` limit); its purge task holds the other `Arc`.
    pub rate_limits: Arc<RateLimits>,
    /// Each site's certificate and names (SNI and Host pick the site).
    pub sites: Arc<portcullis_certs::Sites>,
    /// ACME challenge responses being validated (HTTP-01 on :80, TLS-ALPN-01 on :443); the ACME task fills it.
    pub challenges: Arc<portcullis_certs::acme::Challenges>,
    /// The log's budget for lines about refused input (the guard's settings and the rate limits share it).
    pub refusals: Arc<Refusals>,
    /// Hosts a plain-HTTP redirect may point at: every site's names, or any host (empty) when the default
    /// site has none.
    pub redirect_names: Vec<String>,
}

impl State {
    pub fn new(
        config: Config,
        tls: Arc<rustls::ServerConfig>,
        sites: Arc<portcullis_certs::Sites>,
        https_port: u16,
    ) -> State {
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
        let refusals = Arc::new(Refusals::default());
        let guard = Arc::new(Settings {
            limits: Limits {
                head_bytes: usize::try_from(l.header_bytes).unwrap_or(usize::MAX),
                headers: usize::try_from(l.headers).unwrap_or(usize::MAX),
                uri_bytes: usize::try_from(l.uri_bytes).unwrap_or(usize::MAX),
            },
            header_timeout: config.timeouts.client_header,
            body_timeout: config.timeouts.client_body,
            refusals: refusals.clone(),
        });
        State {
            upstreams: Upstreams::new(&config),
            canned_https: Arc::new(Canned::new(&headers, true)),
            canned_http: Arc::new(Canned::new(&headers, false)),
            admission: Arc::new(Admission::new(l.connections, l.connections_per_ip)),
            rate_limits: Arc::new(RateLimits::new(&config.rate_limits, refusals.clone())),
            refusals,
            headers,
            sites,
            challenges: Arc::default(),
            redirect_names,
            redirect_port: if https_port == 443 {
                String::new()
            } else {
                format!(":{https_port}")
            },
            guard,
            config,
            tls,
        }
    }
}
