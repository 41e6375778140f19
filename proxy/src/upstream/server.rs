//! One upstream server: its address, its keep-alive pool (`pool.rs`), and its own state: requests in
//! flight now, and its health (passive: consecutive failures, and until when they keep it
//! out; active: the last verdict of the health checks). Shared by every snapshot whose groups name the
//! server, so that the state survives a new config. Everything here is atomics: read on every request.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use portcullis_config::ServerAddr;

use super::pool::Pool;

#[derive(Debug)]
pub struct Server {
    pub addr: ServerAddr,
    /// Its kept connections.
    pub pool: Pool,
    in_flight: AtomicUsize,
    /// Connect/reset failures in a row (passive health); reset by a success.
    fails: AtomicU32,
    /// Out until this time (milliseconds on [`clock`]), after `max_fails` failures; 0: not out.
    out_until: AtomicU64,
    /// When it last failed (milliseconds on [`clock`]); 0: never.
    last_failure: AtomicU64,
    /// The active checks' verdict (true until a check says otherwise; always true without checks).
    checked_up: AtomicBool,
    /// Every failure so far, and every request sent on to another server after failing here (metrics).
    failures: AtomicU64,
    retries: AtomicU64,
}

/// A request in flight on a server; counted until dropped.
#[derive(Debug)]
pub struct InFlight<'a>(&'a Server);

/// Milliseconds since the process first asked, never 0: what the atomics store instead of an `Instant`.
pub fn clock(now: Instant) -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(|| now.checked_sub(Duration::from_secs(1)).unwrap_or(now));
    u64::try_from(now.saturating_duration_since(start).as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl Server {
    /// `position` is its place in `Servers` (kept for a stable signature; the pool needs no key).
    pub fn new(addr: ServerAddr, _position: usize) -> Server {
        Server {
            addr,
            pool: Pool::default(),
            in_flight: AtomicUsize::new(0),
            fails: AtomicU32::new(0),
            out_until: AtomicU64::new(0),
            last_failure: AtomicU64::new(0),
            checked_up: AtomicBool::new(true),
            failures: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        }
    }

    /// Requests sent to this server that have not had their response head yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn start(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    /// Whether the server may get traffic at `now`: not out after failures, not down by the checks.
    pub fn is_up(&self, now: Instant) -> bool {
        self.checked_up.load(Ordering::Relaxed)
            && self.out_until.load(Ordering::Relaxed) <= clock(now)
    }

    /// Connect, reset and timeout failures since it was first named.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Requests that failed here and went on to another server.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// A request that failed here goes on to another server.
    pub fn retried_elsewhere(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// When it last failed (for "all are down: try the least recently failed"); 0 if never.
    pub fn last_failure(&self) -> u64 {
        self.last_failure.load(Ordering::Relaxed)
    }

    /// A connect or reset failure (passive health). After `max_fails` in a row (0: never) the server is out
    /// for `fail_timeout`; returns true when this failure took it out (log it once).
    pub fn failed(&self, now: Instant, max_fails: u32, fail_timeout: Duration) -> bool {
        let t = clock(now);
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.last_failure.store(t, Ordering::Relaxed);
        let fails = self.fails.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if max_fails == 0 || fails < max_fails {
            return false;
        }
        let until = clock(now + fail_timeout);
        let before = self.out_until.swap(until, Ordering::Relaxed);
        before <= t
    }

    /// A response came back: the failure count starts again. Returns true when the server was out (it is
    /// back: log it once).
    pub fn succeeded(&self) -> bool {
        if self.fails.load(Ordering::Relaxed) == 0 {
            return false;
        }
        self.fails.store(0, Ordering::Relaxed);
        self.out_until.swap(0, Ordering::Relaxed) != 0
    }

    /// A server out after failures accepts connections again (no active checks): its time-out ends now.
    /// Returns true when it was out.
    pub fn accepts_again(&self) -> bool {
        if !self.checked_up.load(Ordering::Relaxed) {
            return false;
        }
        self.fails.store(0, Ordering::Relaxed);
        self.out_until.swap(0, Ordering::Relaxed) != 0
    }

    /// The active checks' verdict; returns true when it changed.
    pub fn set_checked(&self, up: bool) -> bool {
        let was = self.checked_up.swap(up, Ordering::Relaxed);
        if up {
            // A passing check also ends a passive time-out: the server answers again.
            self.fails.store(0, Ordering::Relaxed);
            self.out_until.store(0, Ordering::Relaxed);
        }
        was != up
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> Server {
        Server::new(ServerAddr::Tcp("127.0.0.1:1".parse().unwrap()), 0)
    }

    #[test]
    fn max_fails_takes_a_server_out_for_fail_timeout() {
        let s = server();
        let now = Instant::now();
        let out = Duration::from_secs(10);
        assert!(s.is_up(now));
        assert!(!s.failed(now, 2, out));
        assert!(s.is_up(now));
        assert!(s.failed(now, 2, out), "the second failure takes it out");
        assert!(!s.is_up(now + Duration::from_secs(9)));
        assert!(s.is_up(now + Duration::from_secs(11)));
        assert!(s.succeeded(), "it was out");
        assert!(!s.succeeded());
        assert!(!s.failed(now, 0, out), "max_fails = 0 never takes it out");
        assert!(s.is_up(now));
    }

    #[test]
    fn checks_take_it_down_and_bring_it_back() {
        let s = server();
        let now = Instant::now();
        assert!(s.set_checked(false));
        assert!(!s.set_checked(false));
        assert!(!s.is_up(now));
        s.failed(now, 1, Duration::from_secs(60));
        assert!(s.set_checked(true));
        assert!(s.is_up(now), "a passing check ends the passive time-out");
    }
}
