//! Rate limits on the request path (`[[rate_limit]]`, or the built-in `auth` limit): which requests a limit
//! counts (method and path, matched against values computed at start), governor's keyed GCRA limiter per
//! client key (IPv4 address, IPv6 prefix) and per submitted account name, the bounded body read that finds
//! the account, and the memory bound (a timer purge plus a key cap). The 429 page itself is `pages`'.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use governor::clock::{Clock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{Quota, RateLimiter};
use http::header;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use portcullis_config::{Cidr, PathMatch, Rate, RateLimit};

use crate::body::Body;
use crate::http::pages;
use crate::telemetry::{Refusals, refused};

/// Most bytes read from a request body to find the account name. A login form is a few hundred bytes; a
/// larger body on a `per_account` path is refused (413), or padding would hide the account from the limit.
pub const MAX_ACCOUNT_BODY: usize = 64 * 1024;
/// How often keys whose state is indistinguishable from a fresh one are dropped.
pub const PURGE_EVERY: Duration = Duration::from_secs(10);
/// At most this many distinct account names are counted from one body (a field may be repeated).
const MAX_ACCOUNTS_PER_REQUEST: usize = 4;
/// Account names are counted by their first this many characters (after case folding).
const MAX_ACCOUNT_CHARS: usize = 256;

/// Every configured limit, built once at start.
pub struct RateLimits {
    limits: Vec<Limit>,
    /// The log's budget for `rate limited` lines (one per refused request otherwise).
    refusals: Arc<Refusals>,
}

/// One `[[rate_limit]]`: what it counts, and its limiters.
pub struct Limit {
    pub name: String,
    paths: Vec<PathMatch>,
    methods: Vec<Method>,
    exempt: Vec<Cidr>,
    ipv6_prefix: u8,
    clients: Keyed<u128>,
    accounts: Option<Accounts>,
    rejected: AtomicU64,
}

struct Accounts {
    field: String,
    keyed: Keyed<u64>,
    /// Account names are stored as a 64-bit keyed hash: fixed size per key, never the attacker's string.
    hasher: RandomState,
}

impl RateLimits {
    pub fn new(config: &[RateLimit], refusals: Arc<Refusals>) -> RateLimits {
        RateLimits {
            limits: config.iter().map(Limit::new).collect(),
            refusals,
        }
    }

    /// Whether any limit counts this request. Reads only values built at start: no lock, no allocation
    /// (unless the path holds `%` escapes or `//` and a limit counts its method).
    pub fn applies(&self, method: &Method, path: &str) -> bool {
        self.limits.iter().any(|l| l.matches(method, path))
    }

    /// Counts the request against every limit that matches it. `Ok(Some(body))`: a `per_account` limit read
    /// the whole body, which must be forwarded as it is; `Err(page)`: answer with that instead.
    pub async fn check(
        &self,
        client: IpAddr,
        req: &mut Request<Incoming>,
        max_body: u64,
        body_timeout: Duration,
    ) -> Result<Option<Bytes>, Response<Body>> {
        // Only requests some limit counts come here: this small allocation is theirs alone.
        let matching: Vec<&Limit> = self
            .limits
            .iter()
            .filter(|l| l.matches(req.method(), req.uri().path()) && !l.exempts(client))
            .collect();
        for limit in &matching {
            if let Err(wait) = limit.clients.check(&limit.client_key(client)) {
                return Err(limit.refuse(client, None, wait, &self.refusals));
            }
        }
        if !matching.iter().any(|l| l.accounts.is_some()) {
            return Ok(None);
        }
        let bound = u64::try_from(MAX_ACCOUNT_BODY).map_or(max_body, |m| m.min(max_body));
        let body = match read_bounded(req.body_mut(), bound, body_timeout).await {
            Ok(b) => b,
            Err(code) => {
                refused!(self.refusals, Body => info!(client = %client, status = code.as_u16(), "rate limit: request body refused before reading the account"));
                return Err(pages::status(code));
            }
        };
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        for limit in &matching {
            let Some(a) = &limit.accounts else { continue };
            let names = account_names(content_type, &body, &a.field);
            for name in &names {
                if let Err(wait) = a.keyed.check(&a.hasher.hash_one(name)) {
                    return Err(limit.refuse(client, Some(name), wait, &self.refusals));
                }
            }
        }
        Ok(Some(body))
    }

    /// Drops every key whose limiter state is as good as fresh (governor's `retain_recent`).
    pub fn purge(&self) {
        for l in &self.limits {
            l.clients.purge();
            if let Some(a) = &l.accounts {
                a.keyed.purge();
            }
            tracing::debug!(
                limit = %l.name,
                clients = l.clients.len(),
                accounts = l.accounts.as_ref().map_or(0, |a| a.keyed.len()),
                rejected = l.rejected(),
                "rate limit keys after purge"
            );
        }
    }

    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }
}

/// The purge timer: every [`PURGE_EVERY`], for as long as the process serves.
pub async fn purge(limits: Arc<RateLimits>) {
    if limits.is_empty() {
        return;
    }
    let mut tick = tokio::time::interval(PURGE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        limits.purge();
    }
}

impl Limit {
    fn new(c: &RateLimit) -> Limit {
        let cap = usize::try_from(c.max_keys).unwrap_or(usize::MAX);
        Limit {
            name: c.name.clone(),
            paths: c.paths.clone(),
            // Checked as upper-case ASCII tokens by the config: always valid methods.
            methods: c
                .methods
                .iter()
                .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                .collect(),
            exempt: c.exempt.clone(),
            ipv6_prefix: c.ipv6_prefix,
            clients: Keyed::new(c.rate, c.burst, cap, Elapsed::new()),
            accounts: c.per_account.as_ref().map(|p| Accounts {
                field: p.field.clone(),
                keyed: Keyed::new(p.rate, p.burst, cap, Elapsed::new()),
                hasher: RandomState::new(),
            }),
            rejected: AtomicU64::new(0),
        }
    }

    fn matches(&self, method: &Method, path: &str) -> bool {
        if !self.methods.iter().any(|m| m == method) {
            return false;
        }
        if path.contains('%') || path.contains("//") {
            // What the app will route on: gunicorn decodes escapes, and `/log%69n` is `/login` to Django.
            let path = normalize(path);
            self.paths.iter().any(|p| p.matches(&path))
        } else {
            self.paths.iter().any(|p| p.matches(path))
        }
    }

    fn exempts(&self, client: IpAddr) -> bool {
        self.exempt.iter().any(|c| c.contains(client))
    }

    fn client_key(&self, client: IpAddr) -> u128 {
        client_key(client, self.ipv6_prefix)
    }

    /// Rejections so far (for the metrics).
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    fn refuse(
        &self,
        client: IpAddr,
        account: Option<&str>,
        wait: Duration,
        refusals: &Refusals,
    ) -> Response<Body> {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        let retry_after = whole_seconds_up(wait);
        // `?`: the account name is the client's text, quoted and escaped in the log.
        refused!(refusals, RateLimited => warn!(client = %client, limit = %self.name, account = ?account, retry_after, "rate limited"));
        pages::too_many_requests(retry_after)
    }
}

/// The key a client is counted under: its IPv4 address (as `::ffff:a.b.c.d`), or its IPv6 address cut to
/// `ipv6_prefix` bits. An IPv4-mapped IPv6 peer counts as the IPv4 address it is.
pub fn client_key(ip: IpAddr, ipv6_prefix: u8) -> u128 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => (0xffff_u128 << 32) | u128::from(u32::from(v4)),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            match ipv6_prefix.min(128) {
                0 => 0,
                p => bits & (u128::MAX << (128 - u32::from(p))),
            }
        }
    }
}

/// `Retry-After` is whole seconds (RFC 9110 §10.2.3): rounded up, so a retry at that time passes.
fn whole_seconds_up(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// Percent escapes decoded and runs of `/` merged: the path as the app will see it, for matching only.
fn normalize(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let byte = match (
            b[i],
            b.get(i + 1).and_then(|h| hex(*h)),
            b.get(i + 2).and_then(|l| hex(*l)),
        ) {
            (b'%', Some(h), Some(l)) => {
                i += 3;
                h << 4 | l
            }
            (c, _, _) => {
                i += 1;
                c
            }
        };
        if !(byte == b'/' && out.last() == Some(&b'/')) {
            out.push(byte);
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Reads a whole request body of at most `limit` bytes (413 past it, 408 if it stalls, 400 if it breaks).
async fn read_bounded(
    body: &mut Incoming,
    limit: u64,
    timeout: Duration,
) -> Result<Bytes, StatusCode> {
    let read = async {
        let mut first: Option<Bytes> = None;
        let mut more: Option<BytesMut> = None;
        let mut len: u64 = 0;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| StatusCode::BAD_REQUEST)?;
            // Trailers (never sent with a login form) are dropped.
            let Ok(data) = frame.into_data() else {
                continue;
            };
            len += data.len() as u64;
            if len > limit {
                return Err(StatusCode::PAYLOAD_TOO_LARGE);
            }
            match (&mut first, &mut more) {
                (None, _) => first = Some(data),
                (Some(f), None) => {
                    let mut m = BytesMut::with_capacity(f.len() + data.len());
                    m.extend_from_slice(f);
                    m.extend_from_slice(&data);
                    more = Some(m);
                }
                (Some(_), Some(m)) => m.extend_from_slice(&data),
            }
        }
        Ok(more.map(BytesMut::freeze).or(first).unwrap_or_default())
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or(Err(StatusCode::REQUEST_TIMEOUT))
}

/// The account names a login body submits in `field`: from a urlencoded form, a multipart form or a JSON
/// object (what Django and Flask parse), trimmed, case-folded, distinct, at most a few. Empty when the body is
/// something else: then only the per-client limit applies.
pub fn account_names(content_type: Option<&str>, body: &[u8], field: &str) -> Vec<String> {
    let Some(ct) = content_type else {
        return Vec::new();
    };
    let mut params = ct.split(';');
    let media = params.next().unwrap_or("").trim().to_ascii_lowercase();
    let raw: Vec<String> = match media.as_str() {
        "application/x-www-form-urlencoded" => body
            .split(|b| *b == b'&')
            .filter_map(|pair| {
                let mut kv = pair.splitn(2, |b| *b == b'=');
                let k = form_decode(kv.next()?);
                (k == field).then(|| form_decode(kv.next().unwrap_or(b"")))
            })
            .collect(),
        "multipart/form-data" => params
            .filter_map(|p| p.trim().split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
            .map(|(_, v)| multipart_fields(body, v.trim().trim_matches('"'), field))
            .unwrap_or_default(),
        m if m == "application/json" || m.ends_with("+json") => {
            match serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body) {
                Ok(obj) => match obj.get(field) {
                    Some(serde_json::Value::String(s)) => vec![s.clone()],
                    Some(serde_json::Value::Number(n)) => vec![n.to_string()],
                    _ => Vec::new(),
                },
                Err(_) => Vec::new(),
            }
        }
        _ => Vec::new(),
    };
    let mut out: Vec<String> = Vec::new();
    for r in raw {
        let name: String = r
            .trim()
            .to_lowercase()
            .chars()
            .take(MAX_ACCOUNT_CHARS)
            .collect();
        if !name.is_empty() && !out.contains(&name) {
            out.push(name);
            if out.len() == MAX_ACCOUNTS_PER_REQUEST {
                break;
            }
        }
    }
    out
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte (WHATWG URL §5.1).
fn form_decode(b: &[u8]) -> String {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1).and_then(|h| hex(*h)),
            b.get(i + 2).and_then(|l| hex(*l)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push(h << 4 | l);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The values of the non-file parts named `field` in a `multipart/form-data` body (RFC 7578).
fn multipart_fields(body: &[u8], boundary: &str, field: &str) -> Vec<String> {
    if boundary.is_empty() {
        return Vec::new();
    }
    let delimiter = format!("--{boundary}");
    let mut out = Vec::new();
    for part in split_on(body, delimiter.as_bytes()).skip(1) {
        let part = part.strip_prefix(b"\r\n").unwrap_or(part);
        let Some(end) = find(part, b"\r\n\r\n") else {
            continue;
        };
        let (head, value) = (&part[..end], &part[end + 4..]);
        let value = value.strip_suffix(b"\r\n").unwrap_or(value);
        let head = String::from_utf8_lossy(head);
        let named = head.split("\r\n").any(|line| {
            let Some((name, rest)) = line.split_once(':') else {
                return false;
            };
            name.trim().eq_ignore_ascii_case("content-disposition")
                && !rest.contains("filename")
                && rest
                    .split(';')
                    .filter_map(|p| p.trim().split_once('='))
                    .any(|(k, v)| {
                        k.trim().eq_ignore_ascii_case("name") && v.trim().trim_matches('"') == field
                    })
        });
        if named {
            out.push(String::from_utf8_lossy(value).into_owned());
        }
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn split_on<'a>(mut hay: &'a [u8], delimiter: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        match find(hay, delimiter) {
            Some(at) => {
                let piece = &hay[..at];
                hay = &hay[at + delimiter.len()..];
                Some(piece)
            }
            None => {
                done = true;
                Some(hay)
            }
        }
    })
}

/// governor's clock for our limiters: nanoseconds since the limiter was made (`std::time::Instant`, no TSC
/// calibration), so that the key cap can compute the same "now" the limiter does.
#[derive(Debug, Clone, Copy)]
pub struct Elapsed(Instant);

impl Elapsed {
    pub fn new() -> Elapsed {
        Elapsed(Instant::now())
    }
}

impl Clock for Elapsed {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::new(u64::try_from(self.0.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }
}

/// One keyed GCRA limiter with its memory bound: governor's `RateLimiter` over [`Store`] (a `DashMap` that
/// counts its keys), and the cap that evicts, nearest-to-fresh first, when the count passes `cap`.
struct Keyed<K: Hash + Eq + Clone, C: Clock<Instant = Nanos> = Elapsed> {
    limiter: RateLimiter<K, Store<K>, C, NoOpMiddleware<Nanos>>,
    store: Arc<StoreInner<K>>,
    clock: C,
    /// The clock's reading just before the limiter read its own start: keys' states count from there.
    start: Nanos,
    /// How far ahead of now the state of a key at its limit lies: the whole burst, `t + tau`.
    window: u64,
    cap: usize,
    evicting: AtomicBool,
}

impl<K: Hash + Eq + Clone, C: Clock<Instant = Nanos> + Clone> Keyed<K, C> {
    fn new(rate: Rate, burst: u32, cap: usize, clock: C) -> Keyed<K, C> {
        let interval = rate.interval().max(Duration::from_nanos(1));
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        // `with_period` is `None` only for a zero interval, and the interval is at least 1 ns.
        let quota = Quota::with_period(interval)
            .map_or_else(|| Quota::per_second(burst), |q| q.allow_burst(burst));
        let store = Arc::new(StoreInner {
            map: DashMapStateStore::default(),
            len: AtomicUsize::new(0),
        });
        let start = clock.now();
        let limiter = RateLimiter::new(quota, Store(store.clone()), clock.clone());
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
    fn check(&self, key: &K) -> Result<(), Duration> {
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
struct Store<K: Hash + Eq + Clone>(Arc<StoreInner<K>>);

struct StoreInner<K: Hash + Eq + Clone> {
    map: DashMapStateStore<K>,
    /// Keys inserted since the last purge plus the count then: an upper bound between purges.
    len: AtomicUsize,
}

impl<K: Hash + Eq + Clone> StoreInner<K> {
    fn retain_below(&self, drop_below: Nanos) {
        ShrinkableKeyedStateStore::retain_recent(&self.map, drop_below);
        self.len.store(self.map.len(), Ordering::Relaxed);
    }
}

impl<K: Hash + Eq + Clone> StateStore for Store<K> {
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

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<K> for Store<K> {
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
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;

    fn rate(count: u32, secs: u64) -> Rate {
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
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(whole_seconds_up(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds_up(Duration::from_millis(1000)), 1);
        assert_eq!(whole_seconds_up(Duration::from_millis(1001)), 2);
        assert_eq!(whole_seconds_up(Duration::ZERO), 1);
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

    #[test]
    fn ipv6_clients_share_their_prefix_and_ipv4_maps_to_itself() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a, 64), client_key(b, 64));
        assert_ne!(client_key(a, 64), client_key(c, 64));
        assert_ne!(client_key(a, 128), client_key(b, 128));
        assert_eq!(client_key(a, 48), client_key(c, 48));
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(client_key(v4, 64), client_key(mapped, 64));
        assert_ne!(
            client_key(v4, 64),
            client_key("192.0.2.8".parse().unwrap(), 64)
        );
    }

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
                max_keys: 1000,
            }],
            Arc::default(),
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

    #[test]
    fn account_names_from_forms_multipart_and_json() {
        let form = Some("application/x-www-form-urlencoded; charset=utf-8");
        assert_eq!(
            account_names(
                form,
                b"csrfmiddlewaretoken=x&username=Alice%40Example.com&password=a+b",
                "username"
            ),
            ["alice@example.com"]
        );
        // Django reads the last value, Flask the first: count both.
        assert_eq!(
            account_names(form, b"username=bob&username=+carol+", "username"),
            ["bob", "carol"]
        );
        assert!(account_names(form, b"user=bob", "username").is_empty());
        let json = Some("application/json");
        assert_eq!(
            account_names(
                json,
                br#"{"username": " Dave ", "password": "x"}"#,
                "username"
            ),
            ["dave"]
        );
        assert_eq!(
            account_names(json, br#"{"username": 12345}"#, "username"),
            ["12345"]
        );
        assert!(account_names(json, b"[1,2]", "username").is_empty());
        let multipart = b"--XyZ\r\nContent-Disposition: form-data; name=\"password\"\r\n\r\nsecret\r\n--XyZ\r\nContent-Disposition: form-data; name=\"username\"\r\n\r\nEve\r\n--XyZ--\r\n";
        assert_eq!(
            account_names(
                Some("multipart/form-data; boundary=XyZ"),
                multipart,
                "username"
            ),
            ["eve"]
        );
        assert_eq!(
            account_names(
                Some("multipart/form-data; boundary=\"XyZ\""),
                multipart,
                "password"
            ),
            ["secret"]
        );
        assert!(account_names(Some("text/plain"), b"username=x", "username").is_empty());
        assert!(account_names(None, b"username=x", "username").is_empty());
        let many = (0..20)
            .map(|i| format!("username=u{i}"))
            .collect::<Vec<_>>()
            .join("&");
        assert_eq!(
            account_names(form, many.as_bytes(), "username").len(),
            MAX_ACCOUNTS_PER_REQUEST
        );
    }
}
