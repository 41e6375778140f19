//! A rate limit counted in Redis, so that a client limited on one node is limited on all: [`Clustered`]
//! is a `ratelimit::Store` whose every count is one round trip (`EVALSHA` of [`GCRA`]: read the key's
//! theoretical arrival time, compare, write it back, all atomically in Redis, on Redis's clock so that the
//! nodes' clocks do not matter). When Redis is down, slow (past `[cluster] timeout`) or fails, the count is
//! made by the node's own limiter instead (`Memory`, as without `[cluster]`), so nothing waits and nothing
//! fails; once Redis answers again the counts go back to it. Requests no limit counts never come here.
//!
//! Keys: `PREFIX rl:NAME:INTERVAL_USxBURST:c:CLIENT` (the client key in hex) and `…:a:HASH` for an account
//! (the first 16 bytes of SHA-256 of the case-folded name: fixed size, and not the name in clear). Each
//! expires once its state is as good as fresh, so Redis holds only clients being counted.

use std::sync::Arc;
use std::time::Duration;

use portcullis_config::{Rate, RateLimit};

use super::Redis;
use super::{Memory, Store};

/// GCRA (as governor's): `ARGV[1]` the emission interval, `ARGV[2]` the tolerance (interval × burst), in
/// microseconds. Returns 0 when the request passes, else the microseconds until the next one would.
pub const GCRA: &str = r"
local interval = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new = tat + interval
local ahead = new - now
if ahead > tau then return ahead - tau end
redis.call('SET', KEYS[1], string.format('%d', new), 'PX', math.ceil(ahead / 1000) + 1)
return 0
";

/// One limit's counts: in Redis while it answers, else in this node's memory.
pub struct Clustered {
    redis: Arc<Redis>,
    script: Arc<redis::Script>,
    local: Memory,
    clients: Params,
    accounts: Option<Params>,
}

struct Params {
    /// The key prefix of this limit's clients (or accounts).
    prefix: String,
    interval_us: u64,
    tau_us: u64,
}

impl Params {
    fn new(redis: &Redis, name: &str, kind: &str, rate: Rate, burst: u32) -> Params {
        let interval_us = u64::try_from(rate.interval().as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let burst = u64::from(burst.max(1));
        Params {
            prefix: format!("{}rl:{name}:{interval_us}x{burst}:{kind}:", redis.prefix),
            interval_us,
            tau_us: interval_us.saturating_mul(burst),
        }
    }
}

impl Clustered {
    pub fn new(c: &RateLimit, redis: Arc<Redis>, script: Arc<redis::Script>) -> Clustered {
        Clustered {
            clients: Params::new(&redis, &c.name, "c", c.rate, c.burst),
            accounts: c
                .per_account
                .as_ref()
                .map(|p| Params::new(&redis, &c.name, "a", p.rate, p.burst)),
            local: Memory::new(c),
            redis,
            script,
        }
    }

    /// `Some(decision)` from Redis, `None` when Redis could not decide in time.
    async fn count(&self, p: &Params, key: String) -> Option<Result<(), Duration>> {
        let script = self.script.clone();
        let (interval, tau) = (p.interval_us, p.tau_us);
        let wait: u64 = self
            .redis
            .call("rate limit", move |mut c| async move {
                script
                    .key(key)
                    .arg(interval)
                    .arg(tau)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Some(if wait == 0 {
            Ok(())
        } else {
            Err(Duration::from_micros(wait))
        })
    }
}

impl Store for Clustered {
    async fn count_client(&self, client: u128) -> Result<(), Duration> {
        let key = format!("{}{client:x}", self.clients.prefix);
        match self.count(&self.clients, key).await {
            Some(decision) => decision,
            None => self.local.count_client(client).await,
        }
    }

    async fn count_account(&self, name: &str) -> Result<(), Duration> {
        let Some(p) = &self.accounts else {
            return Ok(());
        };
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, name.as_bytes());
        let mut key = p.prefix.clone();
        for b in digest.as_ref().iter().take(16) {
            key.push_str(&format!("{b:02x}"));
        }
        match self.count(p, key).await {
            Some(decision) => decision,
            None => self.local.count_account(name).await,
        }
    }

    fn purge(&self) {
        self.local.purge();
    }

    fn keys(&self) -> (usize, usize) {
        self.local.keys()
    }
}
