//! Upstreams: the app servers and the groups the config makes of them. [`Servers`] lives as long as the
//! process: every server by address, each with its own state (`server.rs`) and keep-alive pool (`pool.rs`,
//! on hyper's HTTP/1.1 connection API, over `connect.rs`'s TCP or unix sockets). [`Groups`] belongs to one
//! config snapshot: each group names its servers, its balancing policy (`balance.rs`) and its retry budget
//! (`retry.rs`). [`forward`] is the one way a request goes upstream: it picks a server, sends, retries what is
//! safe to retry on another, and says what happened as a typed [`Failure`]. What goes into a request and
//! comes out of a response is `http`'s business, not this one's.

mod balance;
mod connect;
pub mod health;
mod pool;
mod retry;
mod server;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use portcullis_config::Config;

use crate::body::{Body, BrokeOff};
use crate::shutdown::Shutdown;
use balance::Policy;
use retry::Budget;
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
    /// The response body broke off after its head (the app died mid-response) while being buffered, before
    /// any of it reached the client (502; an idempotent request goes to another server).
    #[error("{0}")]
    BrokeOff(String),
    /// The client's body went past the route's limit while being forwarded (the client's fault: 413).
    #[error("request body too large")]
    BodyTooLarge,
    /// The client's body kept us waiting too long while being forwarded (idle for `client_body`, or under
    /// `min_body_rate`; the client's fault: 408).
    #[error("request body timed out ({})", .0.reason())]
    BodyTimeout(crate::pace::Cut),
}

/// Every upstream server the proxy knows, by address, each with its pool. A config's servers are *current*;
/// a reload adds the new ones ([`Servers::learn`]) and keeps the state and connections of those it names
/// again. A server no config names any more is *retired*: the sweep closes its idle connections once no
/// snapshot (no request in flight) holds it, and forgets it. Locked only when a config is loaded and by the
/// once-a-second sweep: requests reach their servers through their snapshot's groups.
pub struct Servers {
    known: std::sync::Mutex<Known>,
}

#[derive(Default)]
struct Known {
    /// The latest config's servers, in the order they were first named.
    current: Vec<Arc<Server>>,
    /// Named by an older config only; held until the last snapshot that names them is gone.
    retired: Vec<Arc<Server>>,
}

/// What [`Servers::learn`] changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Learned {
    pub added: usize,
    pub kept: usize,
    pub retired: usize,
}

impl Servers {
    pub fn new(config: &Config) -> Servers {
        let servers = Servers {
            known: std::sync::Mutex::default(),
        };
        servers.learn(config);
        servers
    }

    /// Makes `config`'s servers the current ones: a server already known (by address: current, or retired
    /// and named again) keeps its pool and health; a new one is added; one no longer named is retired.
    pub fn learn(&self, config: &Config) -> Learned {
        let mut known = self.lock();
        let Known { current, retired } = &mut *known;
        let mut next: Vec<Arc<Server>> = Vec::new();
        let mut learned = Learned::default();
        for addr in config.upstreams.iter().flat_map(|u| &u.servers) {
            if next.iter().any(|s| &s.addr == addr) {
                continue;
            }
            let found = current
                .iter()
                .position(|s| &s.addr == addr)
                .map(|i| current.swap_remove(i))
                .or_else(|| {
                    retired
                        .iter()
                        .position(|s| &s.addr == addr)
                        .map(|i| retired.swap_remove(i))
                });
            match found {
                Some(s) => {
                    learned.kept += 1;
                    next.push(s);
                }
                None => {
                    learned.added += 1;
                    next.push(Arc::new(Server::new(addr.clone(), next.len())));
                }
            }
        }
        learned.retired = current.len();
        retired.append(current);
        *current = next;
        learned
    }

    fn get(&self, addr: &portcullis_config::ServerAddr) -> Option<Arc<Server>> {
        self.lock()
            .current
            .iter()
            .find(|s| &s.addr == addr)
            .cloned()
    }

    /// Every server known now, current and retired.
    fn all(&self) -> Vec<Arc<Server>> {
        let known = self.lock();
        known
            .current
            .iter()
            .chain(&known.retired)
            .cloned()
            .collect()
    }

    /// Forgets the retired servers no snapshot holds any more, closing their idle connections.
    fn forget_unused(&self) {
        let mut known = self.lock();
        known.retired.retain(|s| {
            // Only this list holds it: no group of a live snapshot names it, no request uses it.
            let used = Arc::strong_count(s) > 1;
            if !used {
                s.pool.close();
                tracing::debug!(server = %s.addr, "retired upstream server forgotten");
            }
            used
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Known> {
        // Poisoning only means a panic elsewhere mid-update; the lists are still whole.
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Every second, lets go of the pooled connections that closed or expired, and forgets the retired servers
/// nothing uses; when shutdown begins, lets go of all of them (requests still in flight finish on theirs,
/// which then close).
pub async fn sweep(servers: Arc<Servers>, mut shutdown: Shutdown) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = Instant::now();
                for s in servers.all() {
                    s.pool.sweep(now);
                }
                servers.forget_unused();
            }
            () = shutdown.begun() => {
                for s in servers.all() {
                    s.pool.close();
                }
                return;
            }
        }
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
    /// Other servers tried after a failure that is safe to retry, within `budget`.
    pub retries: u32,
    budget: Budget,
    /// When a request last went to a group with no server up (`server::clock` ms): one such try a second.
    probed: std::sync::atomic::AtomicU64,
    /// Active checks of every member, when configured (`health.rs`).
    pub health: Option<portcullis_config::Health>,
    /// `[timeouts] upstream_connect` and `upstream_response` of the config this group is from.
    connect_timeout: Duration,
    response_timeout: Duration,
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
                    budget: Budget::default(),
                    probed: std::sync::atomic::AtomicU64::new(0),
                    health: u.health.clone(),
                    connect_timeout: config.timeouts.upstream_connect,
                    response_timeout: config.timeouts.upstream_response,
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

    pub fn len(&self) -> usize {
        self.groups.len()
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

    /// With no server up, whether this request may try one anyway (the one that failed longest ago may
    /// be back): one request a second per group does, the others get the maintenance page at once instead of
    /// each waiting on a dead server (up to `upstream_connect` for one that drops packets).
    pub fn may_probe(&self, now: Instant) -> bool {
        use std::sync::atomic::Ordering;
        let t = server::clock(now);
        self.probed
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                (last == 0 || t >= last.saturating_add(1000)).then_some(t)
            })
            .is_ok()
    }
}

/// A connection unused for longer than this may be closing under us (the app's keep-alive timeout: 2 s for
/// gunicorn, 5 s for uvicorn, 75 s for nginx): an idempotent request on it keeps a copy to send again on a
/// fresh connection, and a non-idempotent one takes a fresh connection instead.
const MAYBE_CLOSING: Duration = Duration::from_millis(500);

/// Sends `req` (its URI is the client's path and query) from `client` to a server of `group`, and waits
/// for the response head. A failure that is safe to retry is retried on another server, up to the group's
/// `retries` and within its budget: one that reached no app (no connection) whatever the method; one the
/// app may have seen (reset, closed, timed out before a response head) only for an idempotent method with a
/// body that can be replayed. The app's own answers, 502 and 503 included, are never retried.
pub async fn forward(
    group: &Group,
    client: IpAddr,
    mut req: Request<Body>,
    finish: Finish<'_>,
) -> Result<Answer, Failure> {
    origin_form(&mut req);
    let idempotent = retry::idempotent(req.method());
    let now = Instant::now();
    group.budget.request(now);
    let members = group.members.len().min(64);
    let mut tried = 0u64;
    let mut retries = group.retries;
    loop {
        let now = Instant::now();
        let Some(i) = group.pick(client, tried, now) else {
            return Err(Failure::NoServer);
        };
        tried |= 1 << i;
        let server = &group.members[i].server;
        // Another server could take it after a failure: worth keeping a copy if the app may see this one.
        let elsewhere =
            retries > 0 && (tried.count_ones() as usize) < members && group.budget.has_room(now);
        let failure = match attempt(group, server, req, idempotent, elsewhere).await {
            // The response is finished (its body buffered, unless it streams) before the server is judged:
            // a body that breaks off while nothing of it has reached the client is the server failing, and
            // an idempotent request with a copy goes to another one.
            Outcome::Response(res, spare) => match finish.run(res).await {
                Ok(done) => {
                    if server.succeeded() {
                        tracing::info!(upstream = %group.name, server = %server.addr, "upstream server is back: it answered");
                    }
                    return Ok(done);
                }
                Err(broke) => {
                    let f = Failure::BrokeOff(broke.to_string());
                    failed(group, server, &f);
                    match spare {
                        Some(copy) if idempotent => {
                            req = copy;
                            f
                        }
                        _ => return Err(f),
                    }
                }
            },
            Outcome::Client(f) => return Err(f),
            Outcome::NotSent(back, f) => {
                failed(group, server, &f);
                req = back;
                f
            }
            Outcome::Sent(f, spare) => {
                failed(group, server, &f);
                match spare {
                    Some(copy) if idempotent => {
                        req = copy;
                        f
                    }
                    _ => return Err(f),
                }
            }
        };
        if retries == 0
            || (tried.count_ones() as usize) >= members
            || !group.budget.retry(Instant::now(), &group.name)
        {
            return Err(failure);
        }
        retries -= 1;
        server.retried_elsewhere();
        tracing::debug!(upstream = %group.name, server = %server.addr, error = %failure, "retrying on another server");
    }
}

/// A response from the app, as [`forward`] finished it.
pub enum Answer {
    /// For the client: its body buffered, or streaming.
    Fed(Response<Body>),
    /// `101 Switching Protocols`: the connection is the tunnel's now.
    Switched(Response<Incoming>),
}

/// How [`forward`] finishes a response head before the server is judged: the body is buffered in `buffers`
/// unless `buffer` is off, the content type streams (`text/event-stream`) or the app sent
/// `X-Accel-Buffering: no` (which is removed).
pub struct Finish<'a> {
    pub buffers: &'a Arc<crate::body::Buffers>,
    pub buffer: bool,
}

impl Finish<'_> {
    async fn run(&self, mut res: Response<Incoming>) -> Result<Answer, BrokeOff> {
        if res.status() == StatusCode::SWITCHING_PROTOCOLS {
            return Ok(Answer::Switched(res));
        }
        let stream = crate::body::streaming(res.headers_mut(), self.buffer);
        crate::body::feed(self.buffers, res, stream)
            .await
            .map(Answer::Fed)
    }
}

/// How one try on one server went.
enum Outcome {
    /// A response head, and the copy of the request kept for another server, if any.
    Response(Response<Incoming>, Option<Request<Body>>),
    /// Nothing reached the app (no connection, or a new one that closed before the request was written):
    /// the request is back, untouched.
    NotSent(Request<Body>, Failure),
    /// The app may have seen the request; a copy to send again, if one was kept.
    Sent(Failure, Option<Request<Body>>),
    /// The client's body failed: nobody else's fault, nothing to retry.
    Client(Failure),
}

/// One try on `server`: a pooled connection if one is ready, else a new one. A pooled connection that turns
/// out closed before the request was written, or (for an idempotent request with a copy) that breaks before
/// a response head after a long idle time, was the app closing it while idle: the request goes again on a
/// new connection to the same server, and the server is not blamed. `spare`: keep a copy of an idempotent
/// request for another server.
async fn attempt(
    group: &Group,
    server: &Server,
    mut req: Request<Body>,
    idempotent: bool,
    spare: bool,
) -> Outcome {
    let _in_flight = server.start();
    let now = Instant::now();
    let mut pooled = server.pool.checkout(now);
    if !idempotent
        && pooled
            .as_ref()
            .is_some_and(|(_, idle)| *idle >= MAYBE_CLOSING)
    {
        // A request that must not be sent twice does not go where the app may be closing.
        pooled = None;
    }
    loop {
        let reused = pooled.is_some();
        let (mut send, idle) = match pooled.take() {
            Some(p) => p,
            None => match pool::open(&server.addr, group.connect_timeout).await {
                Ok(send) => (send, Duration::ZERO),
                Err(e) => return Outcome::NotSent(req, connect_failure(&e)),
            },
        };
        let mut copy = if idempotent && (spare || (reused && idle >= MAYBE_CLOSING)) {
            retry::spare(&mut req)
        } else {
            None
        };
        let sent = tokio::time::timeout(group.response_timeout, send.try_send_request(req)).await;
        let e = match sent {
            // Dropping the response future closes the connection (hyper's way to cancel an HTTP/1 request).
            Err(_) => return Outcome::Sent(Failure::Timeout, copy),
            Ok(Ok(res)) => {
                if reusable(&res) {
                    server.pool.put(send, Instant::now());
                }
                return Outcome::Response(res, copy);
            }
            Ok(Err(mut e)) => match e.take_message() {
                Some(back) if reused => {
                    tracing::debug!(server = %server.addr, "pooled upstream connection was closed; sending on a new one");
                    req = back;
                    continue;
                }
                Some(back) => {
                    return Outcome::NotSent(back, Failure::Reset(describe(e.error())));
                }
                None => e.into_error(),
            },
        };
        let failure = classify(&e);
        match failure {
            Failure::BodyTooLarge | Failure::BodyTimeout(_) => return Outcome::Client(failure),
            Failure::Reset(_) if reused && idle >= MAYBE_CLOSING => {
                if let Some(again) = copy.take() {
                    tracing::debug!(server = %server.addr, error = %failure, "pooled upstream connection closed under the request; sending it again on a new one");
                    req = again;
                    continue;
                }
            }
            _ => {}
        }
        return Outcome::Sent(failure, copy);
    }
}

/// The request line's target in origin form (`/path?query`): an HTTP/2 request's URI is absolute.
fn origin_form(req: &mut Request<Body>) {
    let uri = req.uri();
    if uri.scheme().is_some() || uri.authority().is_some() {
        let pq = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(pq);
    }
}

/// Whether the connection can carry another request after this response: not after an upgrade (it is the
/// tunnel's now) or when the app said it closes.
fn reusable(res: &Response<Incoming>) -> bool {
    res.status() != StatusCode::SWITCHING_PROTOCOLS
        && !res
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .any(says_close)
}

fn says_close(v: &HeaderValue) -> bool {
    v.as_bytes()
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
}

/// Passive health: a connect, reset or timeout failure counts against the server.
fn failed(group: &Group, server: &Server, f: &Failure) {
    tracing::debug!(server = %server.addr, in_flight = server.in_flight(), error = %f, "upstream request failed");
    if server.failed(Instant::now(), group.max_fails, group.fail_timeout) {
        tracing::warn!(upstream = %group.name, server = %server.addr, error = %f, out_for = ?group.fail_timeout, "upstream server is down: taken out after max_fails failures in a row");
    }
}

fn connect_failure(e: &std::io::Error) -> Failure {
    if e.kind() == std::io::ErrorKind::TimedOut {
        Failure::Timeout
    } else {
        Failure::Connect(describe(e))
    }
}

/// What a failed exchange means for the request.
fn classify(e: &hyper::Error) -> Failure {
    if caused_by::<crate::body::TooLarge>(e) {
        Failure::BodyTooLarge
    } else if let Some(stalled) = crate::body::Stalled::find(e) {
        Failure::BodyTimeout(stalled.0)
    } else if timed_out(e) {
        Failure::Timeout
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config(groups: &str) -> Config {
        let text = format!(
            "[listen]\nhttps = [\"127.0.0.1:8443\"]\n[tls]\nself_signed = true\n[[route]]\npath = \"/\"\nupstream = \"app\"\n{groups}"
        );
        Config::parse(Path::new("/etc/portcullis/portcullis.toml"), &text).unwrap()
    }

    #[test]
    fn a_new_config_keeps_known_servers_adds_new_ones_and_retires_the_rest() {
        let one = config("[upstream.app]\nservers = [\"127.0.0.1:5001\", \"127.0.0.1:5002\"]\n");
        let servers = Servers::new(&one);
        let groups = Groups::new(&one, &servers);
        let kept = groups.group(0).members()[1].server.clone();
        kept.failed(Instant::now(), 1, Duration::from_secs(60));
        let two = config("[upstream.app]\nservers = [\"127.0.0.1:5002\", \"127.0.0.1:5003\"]\n");
        let learned = servers.learn(&two);
        assert_eq!(
            learned,
            Learned {
                added: 1,
                kept: 1,
                retired: 1
            }
        );
        let next = Groups::new(&two, &servers);
        let same = &next.group(0).members()[0].server;
        assert!(Arc::ptr_eq(same, &kept), "5002 is the same server");
        assert!(!same.is_up(Instant::now()), "and keeps its health");
        // 5001 is retired but still named by the first groups: kept until they are gone.
        servers.forget_unused();
        assert_eq!(servers.all().len(), 3);
        drop(groups);
        servers.forget_unused();
        assert_eq!(servers.all().len(), 2);
        // Named again before it is forgotten, a retired server comes back as it was.
        let three = config("[upstream.app]\nservers = [\"127.0.0.1:5003\"]\n");
        servers.learn(&three);
        let learned = servers.learn(&two);
        assert_eq!(learned.kept, 2, "{learned:?}");
    }
}
