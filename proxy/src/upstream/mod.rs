//! Upstreams: the named groups of gunicorn-style servers from the config, one keep-alive pool over all of
//! them (hyper-util's client with our TCP/unix connector), and the choice of server (round robin for now).
//! What goes into a request and comes out of a response is `http::proxy`'s business, not this module's.

mod connect;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use portcullis_config::{Config, ServerAddr};

use crate::body::Body;
use connect::Connector;

/// Why an upstream gave no response.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Refused, reset, socket missing, closed before answering: the upstream's fault (502).
    #[error("upstream unavailable: {0}")]
    Unavailable(String),
    /// No response (or no connection) within the configured time: the upstream's fault (504).
    #[error("upstream timed out")]
    Timeout,
    /// The client's body went past the route's limit while being forwarded (the client's fault: 413).
    #[error("request body too large")]
    BodyTooLarge,
    /// The client's body stopped coming for `client_body` while being forwarded (the client's fault: 408).
    #[error("request body timed out")]
    BodyTimeout,
}

#[derive(Debug)]
pub struct Group {
    pub name: Arc<str>,
    /// Pool keys (`sN`) of this group's servers.
    servers: Vec<Authority>,
    next: AtomicUsize,
}

/// Every upstream group and the pool they share.
pub struct Upstreams {
    client: Client<Connector, Body>,
    groups: Vec<Group>,
    response_timeout: Duration,
}

impl Upstreams {
    pub fn new(config: &Config) -> Upstreams {
        let mut all: Vec<ServerAddr> = Vec::new();
        let groups = config
            .upstreams
            .iter()
            .map(|u| Group {
                name: Arc::from(u.name.as_str()),
                servers: u
                    .servers
                    .iter()
                    .map(|s| {
                        let n = all.iter().position(|a| a == s).unwrap_or_else(|| {
                            all.push(s.clone());
                            all.len() - 1
                        });
                        Authority::try_from(format!("s{n}"))
                            .unwrap_or_else(|_| Authority::from_static("s0"))
                    })
                    .collect(),
                next: AtomicUsize::new(0),
            })
            .collect();
        let connector = Connector::new(all.into(), config.timeouts.upstream_connect);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            // gunicorn's async workers close idle keep-alive connections after 2 s; stay under nginx's 60 s.
            .pool_idle_timeout(Duration::from_secs(30))
            // Enough idle connections for HTTP/2 fan-in (500 streams in flight must not reopen connections).
            .pool_max_idle_per_host(512)
            // hyper's default read buffer grows to ~400 KiB per upstream connection: a large response in flight
            // then costs that much memory. 64 KiB reads stream just as fast.
            .http1_max_buf_size(64 * 1024)
            .set_host(false)
            .build(connector);
        Upstreams {
            client,
            groups,
            response_timeout: config.timeouts.upstream_response,
        }
    }

    pub fn group(&self, i: usize) -> &Group {
        &self.groups[i]
    }

    /// The next server of `group` (round robin), as the authority the request URI must carry.
    pub fn pick(&self, group: usize) -> &Authority {
        let g = &self.groups[group];
        let i = g.next.fetch_add(1, Ordering::Relaxed) % g.servers.len();
        &g.servers[i]
    }

    /// Sends a request whose URI is `http://sN/path` and waits for the response head.
    pub async fn send(&self, req: Request<Body>) -> Result<Response<Incoming>, Error> {
        match tokio::time::timeout(self.response_timeout, self.client.request(req)).await {
            Err(_) => Err(Error::Timeout),
            Ok(Ok(res)) => Ok(res),
            Ok(Err(e)) => {
                if caused_by::<crate::body::TooLarge>(&e) {
                    Err(Error::BodyTooLarge)
                } else if caused_by::<crate::body::Stalled>(&e) {
                    Err(Error::BodyTimeout)
                } else if timed_out(&e) {
                    Err(Error::Timeout)
                } else {
                    Err(Error::Unavailable(describe(&e)))
                }
            }
        }
    }
}

fn caused_by<T: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<T>() {
            return true;
        }
        cur = err.source();
    }
    false
}

fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return true;
        }
        cur = err.source();
    }
    false
}

fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        out.push_str(": ");
        out.push_str(&err.to_string());
        cur = err.source();
    }
    out
}
