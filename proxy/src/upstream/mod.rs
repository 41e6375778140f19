//! Upstreams: the app servers and the groups the config makes of them. [`Servers`] lives as long as the
//! process: every server by address (its pool key and its own state, `server.rs`) and the keep-alive pool
//! over all of them (hyper-util's client with our TCP/unix connector, `connect.rs`). [`Groups`] belongs to
//! one config snapshot: each group names its servers and its balancing policy (`balance.rs`). [`forward`]
//! is the one way a request goes upstream: it picks a server, sends, and says what happened as a typed
//! [`Failure`]. What goes into a request and comes out of a response is `http`'s business, not this one's.

mod balance;
mod connect;
pub mod health;
mod server;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use portcullis_config::{Config, ServerAddr};

use crate::body::Body;
use balance::Policy;
use connect::Connector;
pub use server::Server;

/// Why a request got no response from its upstream, and whose fault that was.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// No connection could be made (refused, unreachable, socket missing): nothing reached the app (502).
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The connection broke, or the app closed it, before a response head: the app may have seen the
    /// request (502).
    #[error("no response: {0}")]
    Reset(String),
    /// No connection, or no response head, within the configured time (504).
    #[error("timed out")]
    Timeout,
    /// The group has no server to try (502).
    #[error("no server available")]
    NoServer,
    /// The client's body went past the route's limit while being forwarded (the client's fault: 413).
    #[error("request body too large")]
    BodyTooLarge,
    /// The client's body kept us waiting too long while being forwarded (idle for `client_body`, or under
    /// `min_body_rate`; the client's fault: 408).
    #[error("request body timed out ({})", .0.reason())]
    BodyTimeout(crate::pace::Cut),
}

/// Every upstream server the proxy knows, by address, and the pool they share. Servers are only ever added:
/// a server's pool key (its position) stays the same for the life of the process.
pub struct Servers {
    client: Client<Connector, Body>,
    /// In the order they were first named; a few per group, searched only when a config is loaded.
    list: Vec<Arc<Server>>,
    response_timeout: Duration,
}

impl Servers {
    pub fn new(config: &Config) -> Servers {
        let mut list: Vec<Arc<Server>> = Vec::new();
        for addr in config.upstreams.iter().flat_map(|u| &u.servers) {
            if !list.iter().any(|s| &s.addr == addr) {
                list.push(Arc::new(Server::new(addr.clone(), list.len())));
            }
        }
        let addrs: Arc<[ServerAddr]> = list.iter().map(|s| s.addr.clone()).collect();
        let connector = Connector::new(addrs, config.timeouts.upstream_connect);
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
        Servers {
            client,
            list,
            response_timeout: config.timeouts.upstream_response,
        }
    }

    fn get(&self, addr: &ServerAddr) -> Option<Arc<Server>> {
        self.list.iter().find(|s| &s.addr == addr).cloned()
    }
}

/// One config's upstream groups, in config order (routes name them by index).
pub struct Groups {
    groups: Vec<Group>,
}

/// A named group of servers, how a request picks one of them, and what a failure does.
pub struct Group {
    pub name: Arc<str>,
    members: Vec<Member>,
    balance: Policy,
    /// Passive health: failures in a row that take a server out (0: never), and for how long.
    pub max_fails: u32,
    pub fail_timeout: Duration,
    /// Other servers tried after a failure that is safe to retry.
    #[expect(
        dead_code,
        reason = "retries land with the per-server pools (issue 13)"
    )]
    pub retries: u32,
    /// Active checks of every member, when configured (`health.rs`).
    pub health: Option<portcullis_config::Health>,
}

/// A server as one group has it: the shared server and its weight in this group.
pub struct Member {
    pub server: Arc<Server>,
    pub weight: u32,
}

impl Groups {
    pub fn new(config: &Config, servers: &Servers) -> Groups {
        let groups = config
            .upstreams
            .iter()
            .map(|u| {
                let members: Vec<Member> = u
                    .servers
                    .iter()
                    .zip(&u.weights)
                    .filter_map(|(a, w)| servers.get(a).map(|server| Member { server, weight: *w }))
                    .collect();
                Group {
                    name: Arc::from(u.name.as_str()),
                    balance: Policy::new(u.balance, &members),
                    members,
                    max_fails: u.max_fails,
                    fail_timeout: u.fail_timeout,
                    retries: u.retries,
                    health: u.health.clone(),
                }
            })
            .collect();
        Groups { groups }
    }

    /// Every group, in config order.
    pub fn iter(&self) -> impl Iterator<Item = &Group> {
        self.groups.iter()
    }

    pub fn group(&self, i: usize) -> &Group {
        &self.groups[i]
    }
}

impl Group {
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The member a request from `client` goes to, among those not yet `tried` (bit i: member i). Only
    /// servers that are up are picked; when none is, the one that failed longest ago (so that a recovered
    /// server is found before the maintenance page is shown).
    pub fn pick(&self, client: IpAddr, tried: u64, now: Instant) -> Option<usize> {
        self.balance.pick(&self.members, client, tried, now)
    }

    /// Whether any member is up at `now` (no: the maintenance page).
    pub fn any_up(&self, now: Instant) -> bool {
        self.members.iter().any(|m| m.server.is_up(now))
    }
}

/// Sends `req` (its URI is the client's path and query; the authority is ours to choose) from `client` to
/// a server of `group`, and waits for the response head.
pub async fn forward(
    servers: &Servers,
    group: &Group,
    client: IpAddr,
    mut req: Request<Body>,
) -> Result<Response<Incoming>, Failure> {
    let now = Instant::now();
    let i = group.pick(client, 0, now).ok_or(Failure::NoServer)?;
    let server = &group.members[i].server;
    let pq = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(server.key.clone());
    parts.path_and_query = Some(pq);
    // Scheme, authority and an origin-form path always make a valid absolute URI.
    *req.uri_mut() = Uri::from_parts(parts).map_err(|e| Failure::Connect(e.to_string()))?;
    let in_flight = server.start();
    let result =
        match tokio::time::timeout(servers.response_timeout, servers.client.request(req)).await {
            Err(_) => Err(Failure::Timeout),
            Ok(Ok(res)) => Ok(res),
            Ok(Err(e)) => Err(classify(&e)),
        };
    drop(in_flight);
    match &result {
        Ok(_) => {
            if server.succeeded() {
                tracing::info!(upstream = %group.name, server = %server.addr, "upstream server is back: it answered");
            }
        }
        Err(f @ (Failure::Connect(_) | Failure::Reset(_) | Failure::Timeout)) => {
            tracing::debug!(server = %server.addr, in_flight = server.in_flight(), error = %f, "upstream request failed");
            if server.failed(Instant::now(), group.max_fails, group.fail_timeout) {
                tracing::warn!(upstream = %group.name, server = %server.addr, error = %f, out_for = ?group.fail_timeout, "upstream server is down: taken out after max_fails failures in a row");
            }
        }
        Err(_) => {}
    }
    result
}

/// What a client error means for the request.
fn classify(e: &hyper_util::client::legacy::Error) -> Failure {
    if caused_by::<crate::body::TooLarge>(e) {
        Failure::BodyTooLarge
    } else if let Some(stalled) = crate::body::Stalled::find(e) {
        Failure::BodyTimeout(stalled.0)
    } else if timed_out(e) {
        Failure::Timeout
    } else if e.is_connect() {
        Failure::Connect(describe(e))
    } else {
        Failure::Reset(describe(e))
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
