//! Connection caps: how many client connections may be open in total and, under pressure, per client
//! address. Taken once per connection at accept (before any TLS work), given back when the connection
//! (or the tunnel it became) ends; never touched per request.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Connection caps: in total, and per client address while the proxy is under pressure. Taken once per
/// connection (a tunnel keeps its connection's), never per request.
///
/// The per-address cap applies only once more than half of the total cap is in use: below that, one
/// address (an office or a carrier's CGNAT behind one IP) may open as many connections as it needs; past
/// it, an address that already holds `max_per_ip` gets no more, so that the other half stays for everyone
/// else. nginx and HAProxy have no per-address cap by default.
#[derive(Debug)]
pub struct Admission {
    total: AtomicU64,
    max_total: u64,
    /// Past this many open connections the per-address cap applies.
    pressure: u64,
    /// Open connections per address, in shards by address: connections from different clients rarely
    /// wait on one another's lock (there is no global lock per accept).
    per_ip: [Mutex<HashMap<IpAddr, u64>>; SHARDS],
    max_per_ip: u64,
}

/// Shards of the per-address counts (a power of two).
const SHARDS: usize = 16;

/// The shard of `ip`'s count: a multiplicative hash of its bytes, so that neighbouring addresses spread.
fn shard(ip: IpAddr) -> usize {
    let folded = match ip {
        IpAddr::V4(a) => u64::from(a.to_bits()),
        IpAddr::V6(a) => {
            let b = a.to_bits();
            (b as u64) ^ ((b >> 64) as u64)
        }
    };
    (folded.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60) as usize % SHARDS
}

/// A connection's place; given back on drop.
pub struct Ticket {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Admission {
    pub fn new(max_total: u64, max_per_ip: u64) -> Admission {
        Admission {
            total: AtomicU64::new(0),
            max_total,
            pressure: max_total / 2,
            per_ip: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            max_per_ip,
        }
    }

    /// Connections (and the tunnels they became) open now.
    pub fn open(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Ticket> {
        let ip = ip.to_canonical();
        let total = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        if total > self.max_total {
            self.total.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        // A poisoned lock only means another connection task panicked mid-update: the counts are still usable.
        let mut per_ip = self.per_ip[shard(ip)]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = per_ip.entry(ip).or_insert(0);
        if total > self.pressure && *n >= self.max_per_ip {
            drop(per_ip);
            self.total.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        *n += 1;
        Some(Ticket {
            admission: self.clone(),
            ip,
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.total.fetch_sub(1, Ordering::Relaxed);
        let mut per_ip = self.admission.per_ip[shard(self.ip)]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_address_may_exceed_its_cap_until_half_of_the_total_is_in_use() {
        let a = Arc::new(Admission::new(10, 2));
        // Below half of the total cap, an office behind one address is not refused.
        let office: Vec<Ticket> = (0..5).map(|_| a.admit(ip("192.0.2.1")).unwrap()).collect();
        // Past half, an address already at its cap gets no more, and others still get theirs.
        assert!(a.admit(ip("192.0.2.1")).is_none());
        let b1 = a.admit(ip("192.0.2.2")).unwrap();
        let _b2 = a.admit(ip("192.0.2.2")).unwrap();
        assert!(a.admit(ip("192.0.2.2")).is_none());
        // IPv4-mapped IPv6 is the same client.
        assert!(a.admit(ip("::ffff:192.0.2.2")).is_none());
        let _c: Vec<Ticket> = (3..6)
            .map(|n| a.admit(ip(&format!("192.0.2.{n}"))).unwrap())
            .collect();
        // The total cap holds whoever asks.
        assert!(a.admit(ip("192.0.2.9")).is_none());
        drop(b1);
        let _d = a.admit(ip("192.0.2.9")).unwrap();
        drop(office);
        assert_eq!(a.total.load(Ordering::Relaxed), 5);
        let gone = ip("192.0.2.1");
        assert!(!a.per_ip[shard(gone)].lock().unwrap().contains_key(&gone));
    }

    #[test]
    fn addresses_spread_over_the_shards() {
        let mut used = [0usize; SHARDS];
        for n in 0..=255u8 {
            used[shard(IpAddr::from([192, 0, 2, n]))] += 1;
            used[shard(IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(n)]))] += 1;
        }
        // 512 addresses, 16 shards: none empty, none with more than a quarter.
        assert!(used.iter().all(|&n| n > 0 && n < 128), "{used:?}");
    }
}
