//! `State`: everything a connection needs, built once from the config at start and shared by `Arc`.
//! Built here, read everywhere; nothing in it is mutated on the request path except the admission counters
//! (per connection, not per request) and the upstream pool's own internals.

use std::sync::Arc;

use portcullis_config::Config;

use crate::http::guard::{Canned, Settings};
use crate::http::head::Limits;
use crate::http::headers::SecurityHeaders;
use crate::http::server::Admission;
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
}

impl State {
    pub fn new(config: Config, tls: Arc<rustls::ServerConfig>, https_port: u16) -> State {
        let headers = SecurityHeaders::new(&config.headers);
        let l = &config.limits;
        let guard = Arc::new(Settings {
            limits: Limits {
                head_bytes: usize::try_from(l.header_bytes).unwrap_or(usize::MAX),
                headers: usize::try_from(l.headers).unwrap_or(usize::MAX),
                uri_bytes: usize::try_from(l.uri_bytes).unwrap_or(usize::MAX),
            },
            header_timeout: config.timeouts.client_header,
            body_timeout: config.timeouts.client_body,
        });
        State {
            upstreams: Upstreams::new(&config),
            canned_https: Arc::new(Canned::new(&headers, true)),
            canned_http: Arc::new(Canned::new(&headers, false)),
            admission: Arc::new(Admission::new(l.connections, l.connections_per_ip)),
            headers,
            redirect_port: if https_port == 443 { String::new() } else { format!(":{https_port}") },
            guard,
            config,
            tls,
        }
    }
}
