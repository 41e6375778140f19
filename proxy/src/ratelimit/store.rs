//! Where a limit's counts live, behind [`Store`]: a GCRA state per client key and per account name. Today's
//! one store is [`Memory`]: governor's keyed limiter in this process, over a `DashMap` that counts its keys,
//! with its memory bound (the purge drops keys as good as fresh; past `max_keys` the nearest to fresh are
//! evicted). A store shared between proxies (Redis, say) is another implementation of the trait.

use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use governor::clock::{Clock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{Quota, RateLimiter};
use portcullis_config::{Rate, RateLimit};

/// The keyed counts of one limit. Each `count_*` counts one request: `Err(wait)` when it is over the limit,
/// and the next request passes after `wait`. Asynchronous, so that a store across the network fits.
pub trait Store: Send + Sync + 'static {
    /// One request from the client counted under `client` (its address, or its IPv6 prefix).
    fn count_client(&self, client: u128) -> impl Future<Output = Result<(), Duration>> + Send;
    /// One request naming the account `name` (case-folded; `per_account` limits only).
    fn count_account(&self, name: &str) -> impl Future<Output = Result<(), Duration>> + Send;
    /// Drops the keys whose state is as good as fresh (the purge timer calls it).
    fn purge(&self);
    /// How many (client, account) keys it holds, for the log.
    fn keys(&self) -> (usize, usize);
}

/// Counts in this process's memory: governor's keyed GCRA per client key and per account name, each
/// bounded by the limit's `max_keys`.
pub struct Memory {
    clients: Keyed<u128>,
    accounts: Option<Accounts>,
}

struct Accounts {
    keyed: Keyed<u64>,
    /// Account names are stored as a 64-bit keyed hash: fixed size per key, never the attacker's string.
    hasher: RandomState,
}

impl Memory {
    pub fn new(c: &RateLimit) -> Memory {
        let cap = usize::try_from(c.max_keys).unwrap_or(usize::MAX);
        Memory {
            clients: Keyed::new(c.rate, c.burst, cap, Elapsed::new()),
            accounts: c.per_account.as_ref().map(|p| Accounts {
                keyed: Keyed::new(p.rate, p.burst, cap, Elapsed::new()),
                hasher: RandomState::new(),
            }),
        }
    }
}

impl Store for Memory {
    fn count_client(&self, client: u128) -> impl Future<Output = Result<(), Duration>> + Send {
        std::future::ready(self.clients.check(&client))
    }

    fn count_account(&self, name: &str) -> impl Future<Output = Result<(), Duration>> + Send {
        std::future::ready(match &self.accounts {
            Some(a) => a.keyed.check(&a.hasher.hash_one(name)),
            None => Ok(()),
        })
    }

    fn purge(&self) {
        self.clients.purge();
        if let Some(a) = &self.accounts {
            a.keyed.purge();
        }
    }

    fn keys(&self) -> (usize, usize) {
        (
            self.clients.len(),
            self.accounts.as_ref().map_or(0, |a| a.keyed.len()),
        )
    }
}

/// governor's clock for our limiters: nanoseconds since the limiter was made (`std::time::Instant`, no TSC
/// calibration), so that the key cap can compute the same "now" the limiter does.
#[derive(Debug, Clone, Copy)]
pub(super) struct Elapsed(Instant);

impl Elapsed {
    pub(super) fn new() -> Elapsed {
        Elapsed(Instant::now())
    }
}

impl Clock for Elapsed {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::new(u64::try_from(self.0.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }
}

/// One keyed GCRA limiter with its memory bound: governor's `RateLimiter` over [`Counted`] (a `DashMap` that
/// counts its keys), and the cap that evicts, nearest-to-fresh first, when the count passes `cap`.
pub(super) struct Keyed<K: Hash + Eq + Clone, C: Clock<Instant = Nanos> = Elapsed> {
    limiter: RateLimiter<K, Counted<K>, C, NoOpMiddleware<Nanos>>,
    store: Arc<CountedMap<K>>,
    clock: C,
    /// The clock's reading just before the limiter read its own start: keys' states count from there.
    start: Nanos,
    /// How far ahead of now the state of a key at its limit lies: the whole burst, `t + tau`.
    window: u64,
    cap: usize,
    evicting: AtomicBool,
}

impl<K: Hash + Eq + Clone, C: Clock<Instant = Nanos> + Clone> Keyed<K, C> {
    pub(super) fn new(rate: Rate, burst: u32, cap: usize, clock: C) -> Keyed<K, C> {
        let interval = rate.interval().max(Duration::from_nanos(1));
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        // `with_period` is `None` only for a zero interval, and the interval is at least 1 ns.
        let quota = Quota::with_period(interval)
            .map_or_else(|| Quota::per_second(burst), |q| q.allow_burst(burst));
        let store = Arc::new(CountedMap {
            map: DashMapStateStore::default(),
            len: AtomicUsize::new(0),
        });
        let start = clock.now();
        let limiter = RateLimiter::new(quota, Counted(store.clone()), clock.clone());
        let window = u64::try_from(interval.as_nanos())
            .unwrap_or(u64::MAX)
            .saturating_mul(u64::from(burst.get()));
        Keyed {
            limiter,
            store,
            clock,
            start,
            window,
            cap,
            evicting: AtomicBool::new(false),
        }
    }

    /// `Err(wait)`: over the limit, and the next request passes after `wait`.
    pub(super) fn check(&self, key: &K) -> Result<(), Duration> {
        match self.limiter.check_key(key) {
            Ok(()) => {
                if self.store.len.load(Ordering::Relaxed) > self.cap {
                    self.evict();
                }
                Ok(())
            }
            Err(not_until) => Err(not_until.wait_time_from(self.clock.now())),
        }
    }

    fn purge(&self) {
        self.limiter.retain_recent();
        // Give memory back after a flood has gone.
        if self.store.map.capacity() > 4 * self.store.map.len().max(1024) {
            self.limiter.shrink_to_fit();
        }
    }

    fn len(&self) -> usize {
        self.limiter.len()
    }

    /// Over the cap: drop the keys nearest to a fresh state first (a key's state is the time its credit is
    /// all back: the lowest belong to clients that asked least, longest ago) until about three quarters of
    /// the cap remain. The clients most in debt, the ones being limited, are kept longest. The cut is the
    /// matching quantile of a sample of ~1000 states; should ties leave too many, whole quarters of the burst
    /// window go. One request does this at a time; the others carry on.
    fn evict(&self) {
        if self.evicting.swap(true, Ordering::Acquire) {
            return;
        }
        let before = self.store.map.len();
        let target = self.cap / 4 * 3;
        if before > target {
            let stride = (before / 1024).max(1);
            let mut sample: Vec<u64> = self
                .store
                .map
                .iter()
                .step_by(stride)
                .map(|e| tat(e.value()))
                .collect();
            sample.sort_unstable();
            let cut =
                (sample.len() * (before - target) / before).min(sample.len().saturating_sub(1));
            if let Some(&below) = sample.get(cut) {
                self.store.retain_below(Nanos::new(below));
            }
        }
        let now = self.clock.now().duration_since(self.start).as_u64();
        let mut quarter = 0;
        while self.store.map.len() > self.cap && quarter <= 4 {
            self.store
                .retain_below(Nanos::new(now.saturating_add(self.window / 4 * quarter)));
            quarter += 1;
        }
        tracing::info!(
            before,
            after = self.store.map.len(),
            cap = self.cap,
            "rate limit: more client keys than max_keys; evicted the nearest to fresh"
        );
        self.evicting.store(false, Ordering::Release);
    }
}

/// A key's GCRA state (its theoretical arrival time), read through governor's own update call: a closure
/// that declines to update leaves the state as it was and hands back what it saw.
fn tat(state: &InMemoryState) -> u64 {
    state
        .measure_and_replace(&NotKeyed::NonKey, |tat| {
            Err::<((), Nanos), u64>(tat.map_or(0, Nanos::as_u64))
        })
        .err()
        .unwrap_or(0)
}

/// governor's `DashMapStateStore`, counting its keys so that the cap costs one atomic load per request.
struct Counted<K: Hash + Eq + Clone>(Arc<CountedMap<K>>);

struct CountedMap<K: Hash + Eq + Clone> {
    map: DashMapStateStore<K>,
    /// Keys inserted since the last purge plus the count then: an upper bound between purges.
    len: AtomicUsize,
}

impl<K: Hash + Eq + Clone> CountedMap<K> {
    fn retain_below(&self, drop_below: Nanos) {
        ShrinkableKeyedStateStore::retain_recent(&self.map, drop_below);
        self.len.store(self.map.len(), Ordering::Relaxed);
    }
}

impl<K: Hash + Eq + Clone> StateStore for Counted<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if let Some(state) = self.0.map.get(key) {
            return state.measure_and_replace(&NotKeyed::NonKey, f);
        }
        let mut inserted = false;
        let result = self
            .0
            .map
            .entry(key.clone())
            .or_insert_with(|| {
                inserted = true;
                InMemoryState::default()
            })
            .measure_and_replace(&NotKeyed::NonKey, f);
        if inserted {
            self.0.len.fetch_add(1, Ordering::Relaxed);
        }
        result
    }
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<K> for Counted<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        self.0.retain_below(drop_below);
    }

    fn shrink_to_fit(&self) {
        self.0.map.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.0.map.len()
    }

    fn is_empty(&self) -> bool {
        self.0.map.is_empty()
    }
}

#[cfg(test)]
pub(super) mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;
    use crate::ratelimit::policy::whole_seconds_up;

    /// `count` per `secs` seconds (shared with the module's other tests).
    pub(in crate::ratelimit) fn rate(count: u32, secs: u64) -> Rate {
        Rate {
            count,
            per: Duration::from_secs(secs),
        }
    }

    #[test]
    fn burst_then_retry_after_is_exactly_when_the_next_request_passes() {
        let clock = FakeRelativeClock::default();
        let k: Keyed<u128, _> = Keyed::new(rate(10, 60), 5, 1000, clock.clone());
        for _ in 0..5 {
            assert!(k.check(&1).is_ok());
        }
        let wait = k.check(&1).unwrap_err();
        assert_eq!(wait, Duration::from_secs(6));
        assert_eq!(whole_seconds_up(wait), 6);
        clock.advance(Duration::from_millis(5_999));
        let wait = k.check(&1).unwrap_err();
        assert_eq!(whole_seconds_up(wait), 1);
        clock.advance(Duration::from_millis(1));
        assert!(k.check(&1).is_ok());
        assert!(k.check(&1).is_err());
        // Another key is unaffected.
        assert!(k.check(&2).is_ok());
    }

    #[test]
    fn purge_drops_keys_that_are_as_good_as_fresh() {
        let clock = FakeRelativeClock::default();
        let k: Keyed<u128, _> = Keyed::new(rate(1, 1), 2, 1000, clock.clone());
        for key in 0..100 {
            k.check(&key).unwrap();
        }
        assert_eq!(k.len(), 100);
        clock.advance(Duration::from_secs(3));
        k.purge();
        assert_eq!(k.len(), 0);
        assert_eq!(k.store.len.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_key_cap_evicts_the_nearest_to_fresh_and_keeps_the_limited() {
        let clock = FakeRelativeClock::default();
        let k: Keyed<u128, _> = Keyed::new(rate(1, 1), 4, 1000, clock.clone());
        // Key 0 is at its limit.
        for _ in 0..4 {
            k.check(&0).unwrap();
        }
        assert!(k.check(&0).is_err());
        clock.advance(Duration::from_millis(500));
        for key in 1..=5000u128 {
            let _ = k.check(&key);
            assert!(k.store.map.len() <= 1001, "{} keys", k.store.map.len());
        }
        assert!(k.check(&0).is_err(), "the limited client was evicted");
    }

    #[test]
    fn bytes_per_key() {
        let k: Keyed<u128, _> =
            Keyed::new(rate(1, 60), 5, usize::MAX, FakeRelativeClock::default());
        let n = 100_000u128;
        for key in 0..n {
            k.check(&key).unwrap();
        }
        // DashMap shards are hashbrown tables: one (key, state) slot plus one control byte per bucket.
        let slot = std::mem::size_of::<(u128, InMemoryState)>() + 1;
        let per_key = k.store.map.capacity() * slot / k.store.map.len();
        println!("bytes per client key at {n} keys: {per_key} (slot {slot})");
        assert!(per_key <= 80, "{per_key}");
    }
}
