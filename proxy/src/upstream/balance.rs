//! Load-balancing policies: how a request picks one member of its group among those not tried yet.
//! Every policy sees the same candidates: members that are up and whose `tried` bit is clear. When none
//! is up, the untried one that failed longest ago (never-failed first) is tried anyway, so that a server
//! that recovered is found before the maintenance page is shown. What each policy builds (a schedule,
//! address seeds) is built once, when the config is loaded; `pick` takes no lock and allocates nothing.
//!
//! - `least_requests`: the fewest requests in flight relative to weight (`in_flight / weight`); ties go
//!   by the weighted round-robin schedule, so idle servers share requests by weight.
//! - `round_robin`: smooth weighted round robin (nginx's), expanded into one cycle of member indices.
//! - `random_two`: two distinct members drawn by weight, the less loaded of the two (power of two choices).
//! - `ip_hash`: weighted rendezvous (highest random weight) hashing of the client address (IPv4 whole,
//!   IPv6 by its /64): taking a server out, or removing it from the config, moves only its own clients.

use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use portcullis_config::{Balance, ServerAddr};

use super::Member;

/// The most members a group can pick from: `tried` is one bit per member.
pub const MAX_MEMBERS: usize = 64;

/// One group's policy and what it keeps between picks.
#[derive(Debug)]
pub struct Policy {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    LeastRequests(Schedule),
    RoundRobin(Schedule),
    RandomTwo(Rng),
    /// Each member's seed, from its address (not its position): editing the list moves no other keys.
    IpHash(Box<[u64]>),
}

impl Policy {
    pub fn new(kind: Balance, members: &[Member]) -> Policy {
        let members = &members[..members.len().min(MAX_MEMBERS)];
        let kind = match kind {
            Balance::LeastRequests => Kind::LeastRequests(Schedule::new(members)),
            Balance::RoundRobin => Kind::RoundRobin(Schedule::new(members)),
            Balance::RandomTwo => Kind::RandomTwo(Rng::new()),
            Balance::IpHash => Kind::IpHash(members.iter().map(|m| seed(&m.server.addr)).collect()),
        };
        Policy { kind }
    }

    /// The index of the member to try, among those whose bit is not set in `tried`; `None` when every
    /// member has been tried.
    pub fn pick(
        &self,
        members: &[Member],
        client: IpAddr,
        tried: u64,
        now: Instant,
    ) -> Option<usize> {
        let n = members.len().min(MAX_MEMBERS);
        let untried = (0..n).filter(|&i| tried & (1 << i) == 0);
        let up = untried
            .clone()
            .filter(|&i| members[i].server.is_up(now))
            .fold(0u64, |m, i| m | 1 << i);
        if up == 0 {
            // Nobody is up: the one that failed longest ago.
            return untried.min_by_key(|&i| members[i].server.last_failure());
        }
        let i = match &self.kind {
            Kind::LeastRequests(schedule) => {
                let start = schedule.next(up, n);
                // The lightest, scanning from the scheduled member: it wins every tie.
                (0..n)
                    .map(|k| (start + k) % n)
                    .filter(|&i| up & (1 << i) != 0)
                    .fold(start, |best, i| {
                        if lighter(&members[i], &members[best]) {
                            i
                        } else {
                            best
                        }
                    })
            }
            Kind::RoundRobin(schedule) => schedule.next(up, n),
            Kind::RandomTwo(rng) => {
                if up.count_ones() == 1 {
                    up.trailing_zeros() as usize
                } else {
                    let r = rng.next();
                    let total = weight_of(members, up);
                    let a = by_weight(members, up, (r >> 32) % total);
                    let rest = up & !(1 << a);
                    let b = by_weight(members, rest, (r & 0xffff_ffff) % weight_of(members, rest));
                    if lighter(&members[b], &members[a]) {
                        b
                    } else {
                        a
                    }
                }
            }
            Kind::IpHash(seeds) => {
                let key = client_key(client);
                bits(up)
                    .map(|i| (i, score(key, seeds[i], members[i].weight)))
                    .fold((usize::MAX, f64::NEG_INFINITY), |best, s| {
                        if s.1 > best.1 { s } else { best }
                    })
                    .0
            }
        };
        Some(i)
    }
}

/// One cycle of smooth weighted round robin as member indices (weights divided by their common divisor),
/// and where the group is in it.
#[derive(Debug)]
struct Schedule {
    order: Box<[u8]>,
    next: AtomicUsize,
}

/// Other slots of the cycle tried when the scheduled member cannot take the request, before walking the
/// members in order: a down member's share is spread over the others by weight, not handed to its neighbour.
const PROBES: u64 = 4;

impl Schedule {
    fn new(members: &[Member]) -> Schedule {
        let weights: Vec<u64> = members.iter().map(|m| u64::from(m.weight.max(1))).collect();
        let g = weights.iter().copied().fold(0, gcd).max(1);
        let weights: Vec<i64> = weights.iter().map(|w| (w / g) as i64).collect();
        let total: i64 = weights.iter().sum();
        // nginx's smooth weighted round robin: each turn every member gains its weight, the richest is
        // picked and pays the total. One cycle (`total` turns) gives each member exactly its weight.
        let mut current = vec![0i64; weights.len()];
        let mut order = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        for _ in 0..total {
            let mut best = 0;
            for (i, w) in weights.iter().enumerate() {
                current[i] += w;
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            // At most MAX_MEMBERS (64) members: every index fits in a byte.
            order.push(u8::try_from(best).unwrap_or(0));
        }
        if order.is_empty() {
            order.push(0);
        }
        Schedule {
            order: order.into_boxed_slice(),
            next: AtomicUsize::new(0),
        }
    }

    /// The next member in the schedule among `up` (not empty), whose bits are below `n`.
    fn next(&self, up: u64, n: usize) -> usize {
        let t = self.next.fetch_add(1, Ordering::Relaxed);
        let len = self.order.len();
        let first = usize::from(self.order[t % len]);
        if up & (1 << first) != 0 {
            return first;
        }
        for k in 1..=PROBES {
            let slot = (mix(((t as u64) << 3) ^ k) % len as u64) as usize;
            let i = usize::from(self.order[slot]);
            if up & (1 << i) != 0 {
                return i;
            }
        }
        (1..n)
            .map(|k| (first + k) % n)
            .find(|&i| up & (1 << i) != 0)
            .unwrap_or(first)
    }
}

/// A lock-free pseudo-random source: a splitmix64 counter (one atomic add per draw).
#[derive(Debug)]
struct Rng(AtomicU64);

impl Rng {
    fn new() -> Rng {
        // A different sequence per process; any value works.
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Rng(AtomicU64::new(seed))
    }

    fn next(&self) -> u64 {
        mix(self.0.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed))
    }
}

/// Whether `a` carries less load than `b` for its weight: `a.in_flight / a.weight < b.in_flight / b.weight`.
fn lighter(a: &Member, b: &Member) -> bool {
    let (fa, fb) = (a.server.in_flight() as u64, b.server.in_flight() as u64);
    fa * u64::from(b.weight.max(1)) < fb * u64::from(a.weight.max(1))
}

fn weight_of(members: &[Member], set: u64) -> u64 {
    bits(set)
        .map(|i| u64::from(members[i].weight.max(1)))
        .sum::<u64>()
        .max(1)
}

/// The member of `set` that the weight offset `r` (below the set's total weight) falls on.
fn by_weight(members: &[Member], set: u64, mut r: u64) -> usize {
    let mut last = 0;
    for i in bits(set) {
        let w = u64::from(members[i].weight.max(1));
        if r < w {
            return i;
        }
        r -= w;
        last = i;
    }
    last
}

/// The indices of the set bits of `set`, lowest first.
fn bits(mut set: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if set == 0 {
            return None;
        }
        let i = set.trailing_zeros() as usize;
        set &= set - 1;
        Some(i)
    })
}

/// What `ip_hash` keys on: an IPv4 address whole (IPv4-mapped IPv6 too), an IPv6 address by its /64 (one
/// subscriber's network; privacy addresses change within it).
fn client_key(client: IpAddr) -> u64 {
    match client.to_canonical() {
        IpAddr::V4(v4) => mix(u64::from(u32::from(v4))),
        IpAddr::V6(v6) => mix((u128::from(v6) >> 64) as u64 ^ 0x6666_0000_0000_0000),
    }
}

/// A member's rendezvous score for `key`: `weight / -ln(u)` with `u` uniform in (0, 1) from the hash of
/// the pair. The member with the highest score takes the key; each wins in proportion to its weight.
fn score(key: u64, seed: u64, weight: u32) -> f64 {
    let h = mix(key ^ seed);
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    f64::from(weight.max(1)) / -u.ln()
}

/// A member's seed for `ip_hash`: FNV-1a of its address as written (stable across restarts and releases).
fn seed(addr: &ServerAddr) -> u64 {
    let text = addr.to_string();
    let h = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    mix(h)
}

/// splitmix64's finalizer: every input bit moves every output bit.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::upstream::Server;

    fn members(weights: &[u32]) -> Vec<Member> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Member {
                server: Arc::new(Server::new(
                    ServerAddr::Tcp(format!("127.0.0.1:{}", 5001 + i).parse().unwrap()),
                    i,
                )),
                weight,
            })
            .collect()
    }

    fn ip(i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(
            0x0a00_0000 + i.wrapping_mul(2_654_435_761) % 0x00ff_ffff,
        ))
    }

    /// How many of `picks` requests (from clients `ip(k)`) each member gets.
    fn counts(policy: &Policy, m: &[Member], picks: u32) -> Vec<u32> {
        let now = Instant::now();
        let mut out = vec![0; m.len()];
        for k in 0..picks {
            out[policy.pick(m, ip(k), 0, now).unwrap()] += 1;
        }
        out
    }

    /// Each share within `tolerance` (a fraction of all picks) of its weight's share.
    fn assert_shares(counts: &[u32], weights: &[u32], tolerance: f64) {
        let total: u32 = counts.iter().sum();
        let wsum: u32 = weights.iter().sum();
        for (c, w) in counts.iter().zip(weights) {
            let want = f64::from(*w) / f64::from(wsum);
            let got = f64::from(*c) / f64::from(total);
            assert!(
                (got - want).abs() <= tolerance,
                "counts {counts:?} for weights {weights:?}"
            );
        }
    }

    #[test]
    fn round_robin_gives_each_server_its_weight_smoothly() {
        let m = members(&[5, 1, 1]);
        let p = Policy::new(Balance::RoundRobin, &m);
        let now = Instant::now();
        let seq: Vec<usize> = (0..7).map(|_| p.pick(&m, ip(0), 0, now).unwrap()).collect();
        // nginx's smooth order for 5:1:1, not five in a row.
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);
        let m = members(&[1, 2, 3]);
        let p = Policy::new(Balance::RoundRobin, &m);
        assert_eq!(counts(&p, &m, 600), [100, 200, 300]);
    }

    #[test]
    fn least_requests_shares_by_weight_when_idle_and_by_load_when_busy() {
        let m = members(&[1, 1, 2]);
        let p = Policy::new(Balance::LeastRequests, &m);
        assert_eq!(counts(&p, &m, 400), [100, 100, 200]);
        // Requests that never finish: in flight ends up in proportion to weight.
        let now = Instant::now();
        let mut held = Vec::new();
        for _ in 0..400 {
            let i = p.pick(&m, ip(0), 0, now).unwrap();
            held.push(m[i].server.start());
        }
        let flights: Vec<usize> = m.iter().map(|x| x.server.in_flight()).collect();
        assert_eq!(flights, [100, 100, 200]);
        drop(held);
        // One busy server gets nothing until the others are as busy.
        let _busy: Vec<_> = (0..3).map(|_| m[1].server.start()).collect();
        let picks: Vec<usize> = (0..6).map(|_| p.pick(&m, ip(0), 0, now).unwrap()).collect();
        assert!(!picks.contains(&1), "{picks:?}");
    }

    #[test]
    fn random_two_respects_weights_and_avoids_the_busy_server() {
        let m = members(&[1, 1, 2]);
        let p = Policy::new(Balance::RandomTwo, &m);
        assert_shares(&counts(&p, &m, 40_000), &[1, 1, 2], 0.02);
        let _busy: Vec<_> = (0..5).map(|_| m[0].server.start()).collect();
        let c = counts(&p, &m, 1_000);
        assert_eq!(c[0], 0, "the busy server lost every draw: {c:?}");
        // Two members: always the less loaded one.
        let m2 = members(&[1, 1]);
        let p2 = Policy::new(Balance::RandomTwo, &m2);
        let _b = m2[1].server.start();
        assert_eq!(counts(&p2, &m2, 100), [100, 0]);
    }

    #[test]
    fn ip_hash_is_sticky_and_respects_weights() {
        let m = members(&[1, 1, 2]);
        let p = Policy::new(Balance::IpHash, &m);
        assert_shares(&counts(&p, &m, 40_000), &[1, 1, 2], 0.02);
        let now = Instant::now();
        for k in 0..100 {
            let first = p.pick(&m, ip(k), 0, now);
            assert!((0..5).all(|_| p.pick(&m, ip(k), 0, now) == first));
        }
        // One IPv6 /64 is one client; IPv4-mapped addresses are their IPv4 address.
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::7".parse().unwrap();
        assert_eq!(p.pick(&m, a, 0, now), p.pick(&m, b, 0, now));
        let v4: IpAddr = "192.0.2.9".parse().unwrap();
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 9).to_ipv6_mapped());
        assert_eq!(p.pick(&m, v4, 0, now), p.pick(&m, mapped, 0, now));
    }

    #[test]
    fn ip_hash_moves_only_the_keys_of_a_removed_or_down_server() {
        let m = members(&[1, 1, 1, 1]);
        let p = Policy::new(Balance::IpHash, &m);
        let now = Instant::now();
        let before: Vec<usize> = (0..4_000)
            .map(|k| p.pick(&m, ip(k), 0, now).unwrap())
            .collect();
        // Removed from the config: members 0, 1, 3 (positions shift, addresses do not).
        let kept: Vec<Member> = [0, 1, 3]
            .iter()
            .map(|&i| Member {
                server: m[i].server.clone(),
                weight: 1,
            })
            .collect();
        let p2 = Policy::new(Balance::IpHash, &kept);
        let mut moved_to = [0u32; 4];
        for (k, &was) in before.iter().enumerate() {
            let now_on = [0, 1, 3][p2.pick(&kept, ip(k as u32), 0, now).unwrap()];
            if was == 2 {
                moved_to[now_on] += 1;
            } else {
                assert_eq!(now_on, was, "client {k} moved off a server that stayed");
            }
        }
        // Server 2's clients spread over the other three.
        assert!(
            moved_to.iter().enumerate().all(|(i, &c)| i == 2 || c > 150),
            "{moved_to:?}"
        );
        // Down (passively or by checks): the same, and they come back when it does.
        m[2].server.set_checked(false);
        for (k, &was) in before.iter().enumerate() {
            let got = p.pick(&m, ip(k as u32), 0, now).unwrap();
            assert!(got != 2 && (was == 2 || got == was));
        }
        m[2].server.set_checked(true);
        for (k, &was) in before.iter().enumerate() {
            assert_eq!(p.pick(&m, ip(k as u32), 0, now).unwrap(), was);
        }
    }

    #[test]
    fn every_policy_skips_down_and_tried_members() {
        for kind in [
            Balance::LeastRequests,
            Balance::RoundRobin,
            Balance::RandomTwo,
            Balance::IpHash,
        ] {
            let m = members(&[1, 3, 1, 2]);
            let p = Policy::new(kind, &m);
            let now = Instant::now();
            m[1].server.failed(now, 1, Duration::from_secs(60));
            m[3].server.set_checked(false);
            for k in 0..500 {
                let i = p.pick(&m, ip(k), 0, now).unwrap();
                assert!(i == 0 || i == 2, "{kind:?} picked down member {i}");
                let j = p.pick(&m, ip(k), 1 << i, now).unwrap();
                assert_eq!(j, 2 - i, "{kind:?}: the other one that is up");
            }
            // The shares of the down members go to both others, not to one neighbour.
            let c = counts(&p, &m, 2_000);
            assert!(c[0] > 700 && c[2] > 700, "{kind:?}: {c:?}");
        }
    }

    #[test]
    fn all_down_tries_the_least_recently_failed_then_nothing() {
        for kind in [
            Balance::LeastRequests,
            Balance::RoundRobin,
            Balance::RandomTwo,
            Balance::IpHash,
        ] {
            let m = members(&[1, 1, 1]);
            let p = Policy::new(kind, &m);
            let t = Instant::now();
            let out = Duration::from_secs(60);
            m[2].server.failed(t, 1, out);
            m[0].server.failed(t + Duration::from_millis(10), 1, out);
            m[1].server.failed(t + Duration::from_millis(20), 1, out);
            let now = t + Duration::from_millis(30);
            assert_eq!(p.pick(&m, ip(1), 0, now), Some(2), "{kind:?}");
            assert_eq!(p.pick(&m, ip(1), 1 << 2, now), Some(0), "{kind:?}");
            assert_eq!(p.pick(&m, ip(1), 0b111, now), None, "{kind:?}");
        }
    }
}
