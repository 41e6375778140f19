//! Rate limits on the request path (`[[rate_limit]]`, or the built-in `auth` limit), a filter that returns a
//! decision: [`RateLimits::check`] lets a request through or says why not ([`Refused`]); the HTTP layer
//! renders the answer (`http::pages::rate_limited`). The parts:
//! - `policy`: which requests a limit counts (method, path, exemptions), the key a client is counted
//!   under, and the refusal (its log line, `Retry-After`);
//! - `account`: the bounded body read and the account names found in a form or JSON body;
//! - `store`: the keyed GCRA state behind [`Store`]: governor's in this process (`Memory`), with its
//!   memory bound (a timer purge plus a key cap); with `[cluster]`, each limit is counted in Redis
//!   (`cluster::Clustered`, which falls back to a `Memory` of its own); [`Counts`] is either.

mod account;
mod cluster;
mod policy;
mod store;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header;
use http::{Method, Request};
use hyper::body::Incoming;
use portcullis_config::RateLimit;

pub use self::policy::{Limit, Refused};
pub use self::store::{Memory, Store};
use crate::cluster::Redis;
use crate::shutdown::Shutdown;
use crate::telemetry::{Refusals, refused};
use cluster::{Clustered, GCRA};

/// How often keys whose state is indistinguishable from a fresh one are dropped.
pub const PURGE_EVERY: Duration = Duration::from_secs(10);

/// Every configured limit of one config, over one kind of store ([`Counts`]: this process's memory, or the
/// cluster's Redis). A reload builds the next with [`RateLimits::renew`], which keeps each limit whose
/// settings did not change, counts and all.
pub struct RateLimits<S = Counts> {
    limits: Vec<Arc<Limit<S>>>,
    /// The log's budget for `rate limited` lines (one per refused request otherwise).
    refusals: Arc<Refusals>,
    /// `[cluster]`: new limits are counted in its Redis.
    cluster: Option<(Arc<Redis>, Arc<redis::Script>)>,
}

/// Where one limit counts: this process's memory, or the cluster's Redis (with a memory of its own for
/// when Redis does not answer).
pub enum Counts {
    Local(Memory),
    Cluster(Clustered),
}

impl Store for Counts {
    async fn count_client(&self, client: u128) -> Result<(), Duration> {
        match self {
            Counts::Local(m) => m.count_client(client).await,
            Counts::Cluster(c) => c.count_client(client).await,
        }
    }

    async fn count_account(&self, name: &str) -> Result<(), Duration> {
        match self {
            Counts::Local(m) => m.count_account(name).await,
            Counts::Cluster(c) => c.count_account(name).await,
        }
    }

    fn purge(&self) {
        match self {
            Counts::Local(m) => m.purge(),
            Counts::Cluster(c) => c.purge(),
        }
    }

    fn keys(&self) -> (usize, usize) {
        match self {
            Counts::Local(m) => m.keys(),
            Counts::Cluster(c) => c.keys(),
        }
    }
}

impl RateLimits {
    /// The limits, counted in this process's memory, or with `cluster` in its Redis.
    pub fn new(
        config: &[RateLimit],
        refusals: Arc<Refusals>,
        cluster: Option<Arc<Redis>>,
    ) -> RateLimits {
        let cluster = cluster.map(|r| (r, Arc::new(redis::Script::new(GCRA))));
        let mut limits = RateLimits::with_store(config, refusals, |c| counts(c, cluster.as_ref()));
        limits.cluster = cluster;
        limits
    }

    /// The limits of a new config, counted where these are: see [`RateLimits::renew_with`].
    pub fn renew(&self, config: &[RateLimit]) -> (RateLimits, Renewed) {
        let cluster = self.cluster.clone();
        let (mut next, renewed) = self.renew_with(config, |c| counts(c, cluster.as_ref()));
        next.cluster = cluster;
        (next, renewed)
    }
}

fn counts(c: &RateLimit, cluster: Option<&(Arc<Redis>, Arc<redis::Script>)>) -> Counts {
    match cluster {
        None => Counts::Local(Memory::new(c)),
        Some((redis, script)) => Counts::Cluster(Clustered::new(c, redis.clone(), script.clone())),
    }
}

/// What [`RateLimits::renew`] kept and built.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Renewed {
    /// Same name, same settings: the same limit, its clients' counts kept.
    pub kept: usize,
    /// New, or changed: counted from fresh.
    pub built: usize,
}

impl<S: Store> RateLimits<S> {
    /// The limits, each counted in the store `store` makes for it.
    pub fn with_store(
        config: &[RateLimit],
        refusals: Arc<Refusals>,
        store: impl Fn(&RateLimit) -> S,
    ) -> RateLimits<S> {
        RateLimits {
            limits: config
                .iter()
                .map(|c| Arc::new(Limit::new(c, store(c))))
                .collect(),
            refusals,
            cluster: None,
        }
    }

    /// The limits of a new config: a limit with the same name and the same settings as one of these is
    /// kept (the same counts: a client limited before is limited after); a new or changed one is built in
    /// the store `store` makes for it, from fresh.
    pub fn renew_with(
        &self,
        config: &[RateLimit],
        store: impl Fn(&RateLimit) -> S,
    ) -> (RateLimits<S>, Renewed) {
        let mut renewed = Renewed::default();
        let limits = config
            .iter()
            .map(|c| match self.limits.iter().find(|l| l.settings == *c) {
                Some(same) => {
                    renewed.kept += 1;
                    same.clone()
                }
                None => {
                    renewed.built += 1;
                    Arc::new(Limit::new(c, store(c)))
                }
            })
            .collect();
        let next = RateLimits {
            limits,
            refusals: self.refusals.clone(),
            cluster: None,
        };
        (next, renewed)
    }

    /// Whether any limit counts this request. Reads only values built at start: no lock, no allocation
    /// (unless the path holds `%` escapes or `//` and a limit counts its method).
    pub fn applies(&self, method: &Method, path: &str) -> bool {
        self.limits.iter().any(|l| l.matches(method, path))
    }

    /// Counts the request against every limit that matches it. `Ok(Some(body))`: a `per_account` limit read
    /// the whole body, which must be forwarded as it is; `Err`: answer with that refusal instead.
    pub async fn check(
        &self,
        client: IpAddr,
        cert_key: Option<u128>,
        req: &mut Request<Incoming>,
        max_body: u64,
        body_timeout: Duration,
    ) -> Result<Option<Bytes>, Refused> {
        // Only requests some limit counts come here: this small allocation is theirs alone.
        let matching: Vec<&Limit<S>> = self
            .limits
            .iter()
            .map(|l| &**l)
            .filter(|l| l.matches(req.method(), req.uri().path()) && !l.exempts(client))
            .collect();
        for limit in &matching {
            if let Err(wait) = limit
                .store
                .count_client(limit.client_key(client, cert_key))
                .await
            {
                return Err(limit.refuse(client, None, wait, &self.refusals));
            }
        }
        if !matching.iter().any(|l| l.account_field.is_some()) {
            return Ok(None);
        }
        let bound = u64::try_from(account::MAX_BODY).map_or(max_body, |m| m.min(max_body));
        let body = match account::read_bounded(req.body_mut(), bound, body_timeout).await {
            Ok(b) => b,
            Err(code) => {
                refused!(self.refusals, Body => info!(client = %client, status = code.as_u16(), "rate limit: request body refused before reading the account"));
                return Err(Refused::Body(code));
            }
        };
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        for limit in &matching {
            let Some(field) = &limit.account_field else {
                continue;
            };
            let names = account::account_names(content_type, &body, field);
            for name in &names {
                if let Err(wait) = limit.store.count_account(name).await {
                    return Err(limit.refuse(client, Some(name), wait, &self.refusals));
                }
            }
        }
        Ok(Some(body))
    }

    /// Drops every key whose limiter state is as good as fresh.
    pub fn purge(&self) {
        for l in &self.limits {
            l.store.purge();
            let (clients, accounts) = l.store.keys();
            tracing::debug!(
                limit = %l.name,
                clients,
                accounts,
                rejected = l.rejected(),
                "rate limit keys after purge"
            );
        }
    }

    /// Each limit's name and how many requests it refused.
    pub fn rejections(&self) -> impl Iterator<Item = (&str, u64)> {
        self.limits.iter().map(|l| (&*l.name, l.rejected()))
    }

    /// How many limits there are.
    pub fn count(&self) -> usize {
        self.limits.len()
    }
}

/// The purge timer: every [`PURGE_EVERY`], the limits in force then (`current`: a reload replaces them),
/// until shutdown begins.
pub async fn purge<S: Store>(current: impl Fn() -> Arc<RateLimits<S>>, mut shutdown: Shutdown) {
    let mut tick = tokio::time::interval(PURGE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => current().purge(),
            () = shutdown.begun() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use portcullis_config::PathMatch;

    use super::store::tests::rate;
    use super::store::{Elapsed, Keyed};
    use super::*;

    #[test]
    fn paths_match_exactly_or_by_prefix_and_escapes_do_not_hide_them() {
        let limits = RateLimits::new(
            &[portcullis_config::RateLimit {
                name: "t".into(),
                paths: vec![
                    PathMatch::Exact("/login".into()),
                    PathMatch::Prefix("/api/token".into()),
                ],
                methods: vec!["POST".into()],
                rate: rate(1, 1),
                burst: 1,
                per_account: None,
                exempt: vec![],
                ipv6_prefix: 64,
                key: portcullis_config::RateKey::ClientAddr,
                max_keys: 1000,
            }],
            Arc::default(),
            None,
        );
        assert!(limits.applies(&Method::POST, "/login"));
        assert!(!limits.applies(&Method::GET, "/login"));
        assert!(!limits.applies(&Method::POST, "/login/"));
        assert!(!limits.applies(&Method::POST, "/"));
        assert!(limits.applies(&Method::POST, "/api/token/refresh/"));
        assert!(limits.applies(&Method::POST, "/log%69n"));
        assert!(limits.applies(&Method::POST, "//login"));
        assert!(limits.applies(&Method::POST, "/api%2Ftoken"));
    }

    #[tokio::test]
    async fn a_renewal_keeps_unchanged_limits_and_their_counts() {
        let limit = |name: &str, burst: u32| portcullis_config::RateLimit {
            name: name.into(),
            paths: vec![PathMatch::Prefix("/".into())],
            methods: vec!["GET".into()],
            rate: rate(1, 3600),
            burst,
            per_account: None,
            exempt: vec![],
            ipv6_prefix: 64,
            key: portcullis_config::RateKey::ClientAddr,
            max_keys: 1000,
        };
        let first = RateLimits::new(&[limit("a", 1), limit("b", 1)], Arc::default(), None);
        let key = 7u128;
        for l in &first.limits {
            assert!(l.store.count_client(key).await.is_ok());
            assert!(l.store.count_client(key).await.is_err());
        }
        // `a` as it was, `b` changed, `c` new.
        let (next, renewed) = first.renew(&[limit("a", 1), limit("b", 2), limit("c", 1)]);
        assert_eq!(renewed, Renewed { kept: 1, built: 2 });
        assert!(Arc::ptr_eq(&first.limits[0], &next.limits[0]));
        assert!(
            next.limits[0].store.count_client(key).await.is_err(),
            "a forgot its counts"
        );
        assert!(
            next.limits[1].store.count_client(key).await.is_ok(),
            "b is counted from fresh"
        );
        assert!(next.limits[2].store.count_client(key).await.is_ok());
    }

    /// Not a check: what a limit costs a request it does not match, and one it does (run with
    /// `cargo test --release -p portcullis -- --ignored --nocapture cost_per_request`).
    #[test]
    #[ignore]
    fn cost_per_request() {
        // The demo config has no [[rate_limit]]: the built-in `auth` limit.
        let any = "127.0.0.1:1".parse().unwrap();
        let limits = RateLimits::new(
            &crate::demo::config(any, any).unwrap().rate_limits,
            Arc::default(),
            None,
        );
        let n = 10_000_000u32;
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(limits.applies(
                std::hint::black_box(&Method::GET),
                std::hint::black_box("/"),
            ));
        }
        let unmatched = t.elapsed() / n;
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(limits.applies(
                std::hint::black_box(&Method::POST),
                std::hint::black_box("/accounts/login/"),
            ));
        }
        let matched = t.elapsed() / n;
        let k: Keyed<u128> = Keyed::new(rate(1_000_000, 1), 1_000_000, 100_000, Elapsed::new());
        let t = Instant::now();
        for i in 0..n {
            let _ = std::hint::black_box(k.check(&u128::from(i % 1000)));
        }
        let check = t.elapsed() / n;
        println!(
            "applies(GET /): {unmatched:?}; applies(POST /accounts/login/): {matched:?}; limiter check: {check:?}"
        );
    }
}
