//! `[cluster]`: the Redis several nodes share. [`Redis`] is the one connection (a redis-rs
//! `ConnectionManager`, which reconnects by itself) and whether it is usable now: [`run`] connects and
//! pings it once a second, and every round trip goes through [`Redis::call`], bounded by `[cluster] timeout`
//! and skipped outright while Redis is down, so that neither the accept loop nor a request ever waits on it
//! for longer. Up and down are logged once per change and exposed in `/metrics`. What is shared lives in
//! the submodules `tickets` (the TLS session-ticket keys) and `acme` (the ACME account, certificates, locks
//! and challenge answers, sealed with `key_file`); the GCRA state of each rate-limit key is
//! `ratelimit::cluster`'s.

pub mod acme;
pub mod tickets;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::IntoConnectionInfo;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::shutdown::Shutdown;

/// How often Redis is pinged (and, while it is down, connected to again).
pub const PING_EVERY: Duration = Duration::from_secs(1);
/// The most a connection attempt may take (in the background: nothing waits on it).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The least a ping (in the background too) may take before Redis counts as down: a busy machine's
/// scheduler alone can delay an answer past a 100 ms `[cluster] timeout`. Round trips a request waits on
/// are held to that timeout whatever this says.
const PING_TIMEOUT: Duration = Duration::from_millis(500);
/// The least a background round trip (see [`Redis::call_background`]) may take.
pub const BACKGROUND_TIMEOUT: Duration = Duration::from_secs(2);

/// What `[cluster]` gives a node: the Redis, the ticket keys shared through it, and (with `key_file`) the
/// shared ACME state.
#[derive(Debug, Clone)]
pub struct Node {
    pub redis: Arc<Redis>,
    pub tickets: Arc<tickets::Tickets>,
    pub acme: Option<Arc<acme::SharedAcme>>,
}

impl Node {
    /// See [`Redis::open`] and [`acme::SharedAcme::open`] (the key file is read now); the ticketer starts
    /// with a local key (the shared ones come with [`Node::start`]).
    pub fn open(c: &portcullis_config::Cluster) -> Result<Node, String> {
        let redis = Arc::new(Redis::open(c)?);
        let acme = match &c.key_file {
            Some(path) => Some(Arc::new(acme::SharedAcme::open(redis.clone(), path)?)),
            None => None,
        };
        Ok(Node {
            redis,
            tickets: tickets::Tickets::new().map_err(|e| format!("cluster: {e}"))?,
            acme,
        })
    }

    /// The connection task and the ticket keys' task (on the runtime; both end when shutdown begins).
    pub fn start(&self, shutdown: &Shutdown) {
        tokio::spawn(run(self.redis.clone(), shutdown.clone()));
        tokio::spawn(tickets::run(
            self.tickets.clone(),
            self.redis.clone(),
            shutdown.clone(),
        ));
    }
}

/// The shared Redis and this node's view of it.
pub struct Redis {
    client: redis::Client,
    /// Every key this cluster writes starts with it (`[cluster] prefix`).
    pub prefix: String,
    timeout: Duration,
    /// Set once the first connection succeeded; the manager reconnects by itself from then on.
    conn: ArcSwapOption<ConnectionManager>,
    up: AtomicBool,
    /// Times Redis went from up to down.
    downs: AtomicU64,
    /// Round trips not made or not answered in time: the node did with its local state instead.
    fallbacks: AtomicU64,
    /// What the URL names, for the log (no credentials: the checker refuses them in the URL).
    describe: String,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("at", &self.describe)
            .finish_non_exhaustive()
    }
}

impl Redis {
    /// The client for `[cluster]`: reads the password file (now, with the privileges the process starts
    /// with) and the CA of a `rediss://` server. Nothing connects yet. `Err` says what is wrong, naming the key.
    pub fn open(c: &portcullis_config::Cluster) -> Result<Redis, String> {
        let mut info = c
            .redis
            .as_str()
            .into_connection_info()
            .map_err(|e| format!("cluster.redis: {:?}: {e}", c.redis))?;
        if let Some(path) = &c.password_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                format!("cluster.password_file: cannot read {}: {e}", path.display())
            })?;
            let password = text.trim_end_matches(['\r', '\n']);
            if password.is_empty() {
                return Err(format!(
                    "cluster.password_file: {} is empty",
                    path.display()
                ));
            }
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let client = if c.redis.starts_with("rediss://") {
            // redis-rs builds its rustls client on the process's default provider: make it ours.
            let _ = rustls::crypto::CryptoProvider::install_default(Arc::unwrap_or_clone(
                portcullis_certs::provider(),
            ));
            let root_cert =
                match &c.ca_file {
                    None => None,
                    Some(p) => Some(std::fs::read(p).map_err(|e| {
                        format!("cluster.ca_file: cannot read {}: {e}", p.display())
                    })?),
                };
            redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert,
                },
            )
        } else {
            redis::Client::open(info)
        }
        .map_err(|e| format!("cluster.redis: {:?}: {e}", c.redis))?;
        Ok(Redis {
            client,
            prefix: c.prefix.clone(),
            timeout: c.timeout,
            conn: ArcSwapOption::empty(),
            up: AtomicBool::new(false),
            downs: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            describe: c.redis.clone(),
        })
    }

    /// Redis answered its last round trip (and the ping since).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// (times it went down, round trips done without) for `/metrics`.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.downs.load(Ordering::Relaxed),
            self.fallbacks.load(Ordering::Relaxed),
        )
    }

    /// One round trip: `None` at once while Redis is down, or when it fails or takes longer than the
    /// timeout (then Redis counts as down until the next ping answers).
    pub async fn call<T, F, Fut>(&self, what: &'static str, f: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.call_within(what, self.timeout, f).await
    }

    /// [`Redis::call`] for work in the background that no request waits on (ACME's locks and
    /// certificates): bounded by [`BACKGROUND_TIMEOUT`] when that is longer than `[cluster] timeout`, as
    /// the ping is, so that a busy moment does not make Redis count as down for everyone.
    pub async fn call_background<T, F, Fut>(&self, what: &'static str, f: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.call_within(what, self.timeout.max(BACKGROUND_TIMEOUT), f)
            .await
    }

    async fn call_within<T, F, Fut>(&self, what: &'static str, limit: Duration, f: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let conn = match self.conn.load_full() {
            Some(c) if self.is_up() => ConnectionManager::clone(&c),
            _ => {
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        match tokio::time::timeout(limit, f(conn)).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                self.down(format_args!("{what}: {e}"));
                None
            }
            Err(_) => {
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                self.down(format_args!(
                    "{what}: no answer within {}ms",
                    limit.as_millis()
                ));
                None
            }
        }
    }

    fn set_up(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            tracing::info!(redis = %self.describe, "cluster: Redis is up; shared state in use");
        }
    }

    fn down(&self, why: impl std::fmt::Display) {
        if self.up.swap(false, Ordering::Relaxed) {
            self.downs.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                redis = %self.describe,
                "cluster: Redis is down ({why}); this node uses its local state until it is back"
            );
        }
    }
}

/// Connects, then pings once a second: the up/down state follows. Ends when shutdown begins.
pub async fn run(redis: Arc<Redis>, mut shutdown: Shutdown) {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(redis.timeout.max(PING_TIMEOUT)))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    let mut first = true;
    loop {
        if redis.conn.load().is_none() {
            let connect = ConnectionManager::new_with_config(redis.client.clone(), config.clone());
            match tokio::time::timeout(CONNECT_TIMEOUT * 2, connect).await {
                Ok(Ok(m)) => {
                    redis.conn.store(Some(Arc::new(m)));
                }
                Ok(Err(e)) if first => tracing::warn!(
                    redis = %redis.describe,
                    "cluster: cannot connect to Redis ({e}); this node uses its local state until it can"
                ),
                Err(_) if first => tracing::warn!(
                    redis = %redis.describe,
                    "cluster: Redis does not answer; this node uses its local state until it does"
                ),
                _ => {}
            }
            first = false;
        }
        if let Some(c) = redis.conn.load_full() {
            let mut c = ConnectionManager::clone(&c);
            let cmd = redis::cmd("PING");
            let ping = cmd.query_async::<String>(&mut c);
            match tokio::time::timeout(redis.timeout.max(PING_TIMEOUT), ping).await {
                Ok(Ok(_)) => redis.set_up(),
                Ok(Err(e)) => redis.down(format_args!("ping: {e}")),
                Err(_) => redis.down("ping: no answer"),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(PING_EVERY) => {}
            () = shutdown.begun() => return,
        }
    }
}
