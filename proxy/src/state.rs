//! `State`: everything a connection needs, built once from the config at start and shared by `Arc`.
//! Built here, read everywhere; nothing in it is mutated on the request path except the certificate store
//! (swapped by reloads) and the upstream pool's own internals.

use std::sync::Arc;

use portcullis_config::Config;

use crate::http::headers::SecurityHeaders;
use crate::upstream::Upstreams;

pub struct State {
    pub config: Config,
    pub tls: Arc<rustls::ServerConfig>,
    pub upstreams: Upstreams,
    pub headers: SecurityHeaders,
    /// `""` when HTTPS is on 443, else `":PORT"`: what a redirect appends to the host.
    pub redirect_port: String,
}

impl State {
    pub fn new(config: Config, tls: Arc<rustls::ServerConfig>, https_port: u16) -> State {
        State {
            upstreams: Upstreams::new(&config),
            headers: SecurityHeaders::new(&config.headers),
            redirect_port: if https_port == 443 {
                String::new()
            } else {
                format!(":{https_port}")
            },
            config,
            tls,
        }
    }
}
