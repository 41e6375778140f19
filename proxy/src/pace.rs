//! How long a request body may keep the proxy waiting (`[timeouts] client_body`, `[limits] min_body_rate`
//! and `min_body_rate_grace`): the arithmetic both body watchers share, the HTTP/1.1 guard
//! (`http/guard.rs`) and HTTP/2's `Body::Watched` (`body.rs`). Timers and I/O stay with them.
//!
//! Only time spent *waiting* for the client counts: from a poll that found nothing to the next bytes. Time
//! in which the proxy is not reading (a slow upstream holding the body back) is not the client's fault and
//! is not counted. A wait is cut off after `client_body` (idle), or once the body's waiting in all exceeds
//! `grace + bytes / rate` (Apache mod_reqtimeout's `MinRate`, measured on waiting time): after the grace,
//! a body must average `rate` bytes per second of waiting.

use std::num::NonZeroU64;
use std::time::Duration;

use portcullis_config::Config;
use tokio::time::Instant;

/// What a request body is held to, from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// One wait may last this long (`[timeouts] client_body`).
    pub idle: Duration,
    /// Bytes per second of waiting, after `grace` (`[limits] min_body_rate`; `None`: "off").
    pub rate: Option<NonZeroU64>,
    /// Waiting this long in all is free (`[limits] min_body_rate_grace`).
    pub grace: Duration,
}

impl Rule {
    pub fn of(config: &Config) -> Rule {
        Rule {
            idle: config.timeouts.client_body,
            rate: config.limits.min_body_rate.and_then(NonZeroU64::new),
            grace: config.limits.min_body_rate_grace,
        }
    }
}

/// Why a body was cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// No byte for `client_body` while one was awaited.
    Idle,
    /// Under `min_body_rate`, averaged over the time spent waiting for it, after the grace.
    TooSlow,
}

impl Cut {
    /// For the log's `reason` field.
    pub fn reason(self) -> &'static str {
        match self {
            Cut::Idle => "idle: no byte for client_body",
            Cut::TooSlow => "too slow: under min_body_rate",
        }
    }
}

/// One body's account: bytes received, time waited, and the wait under way (if any). No allocation; the
/// clock is read only when a wait starts, when bytes end one, and when a timer fires.
#[derive(Debug, Clone, Default)]
pub struct Pace {
    bytes: u64,
    /// Waiting in finished waits.
    waited: Duration,
    /// When the wait under way began.
    since: Option<Instant>,
}

impl Pace {
    /// A poll found nothing: a wait begins (unless one is under way; `now` is only called if not).
    pub fn wait(&mut self, now: impl FnOnce() -> Instant) {
        if self.since.is_none() {
            self.since = Some(now());
        }
    }

    /// `n` bytes arrived: the wait under way (if any) ends (`now` is only called then).
    pub fn arrived(&mut self, n: usize, now: impl FnOnce() -> Instant) {
        if let Some(since) = self.since.take() {
            self.waited = self
                .waited
                .saturating_add(now().saturating_duration_since(since));
        }
        self.bytes = self.bytes.saturating_add(n as u64);
    }

    /// When the wait under way is to be cut off, and why; `None` if no wait is under way. It never moves
    /// earlier from one wait to the next (bytes only add allowance; a wait starts no earlier than the
    /// last one ended), so a timer armed for an earlier wait fires no later than needed: re-check then.
    pub fn deadline(&self, rule: &Rule) -> Option<(Instant, Cut)> {
        let since = self.since?;
        let idle = (
            since.checked_add(rule.idle).unwrap_or_else(|| far(since)),
            Cut::Idle,
        );
        let Some(rate) = rule.rate else {
            return Some(idle);
        };
        // grace + bytes / rate, less what was already waited.
        let earned = Duration::from_nanos(
            u64::try_from(u128::from(self.bytes) * 1_000_000_000 / u128::from(rate.get()))
                .unwrap_or(u64::MAX),
        );
        let left = rule
            .grace
            .saturating_add(earned)
            .saturating_sub(self.waited);
        match since.checked_add(left) {
            Some(at) if at < idle.0 => Some((at, Cut::TooSlow)),
            _ => Some(idle),
        }
    }

    /// At `now` (a timer fired): `Err` if the wait under way is past its deadline, else the deadline.
    pub fn check(&self, rule: &Rule, now: Instant) -> Result<Instant, Cut> {
        match self.deadline(rule) {
            Some((at, cut)) if now >= at => Err(cut),
            Some((at, _)) => Ok(at),
            // Not waiting: nothing to cut; a timer that fires now has nothing to say until the next wait.
            None => Ok(far(now)),
        }
    }
}

/// A deadline that never comes (tokio's own "far future" is 30 years).
fn far(from: Instant) -> Instant {
    from + Duration::from_secs(86400 * 365 * 30)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn rule(rate: Option<u64>) -> Rule {
        Rule {
            idle: 60 * S,
            rate: rate.and_then(NonZeroU64::new),
            grace: 2 * S,
        }
    }

    #[test]
    fn a_stalled_body_is_cut_after_the_grace_not_the_idle_timeout() {
        let t0 = Instant::now();
        let mut p = Pace::default();
        p.wait(|| t0);
        assert_eq!(
            p.deadline(&rule(Some(1024))),
            Some((t0 + 2 * S, Cut::TooSlow))
        );
        assert_eq!(p.check(&rule(Some(1024)), t0 + S), Ok(t0 + 2 * S));
        assert_eq!(p.check(&rule(Some(1024)), t0 + 2 * S), Err(Cut::TooSlow));
        // Without a minimum rate only the idle timeout applies.
        assert_eq!(p.deadline(&rule(None)), Some((t0 + 60 * S, Cut::Idle)));
        assert_eq!(p.check(&rule(None), t0 + 59 * S), Ok(t0 + 60 * S));
        assert_eq!(p.check(&rule(None), t0 + 60 * S), Err(Cut::Idle));
    }

    #[test]
    fn a_trickle_runs_out_of_allowance_once_the_grace_is_spent() {
        // 1 byte per 500 ms of waiting against 1 KiB/s: each byte earns under 1 ms.
        let r = rule(Some(1024));
        let mut p = Pace::default();
        let mut t = Instant::now();
        let mut cut = None;
        for _ in 0..10 {
            p.wait(|| t);
            let (at, why) = p.deadline(&r).unwrap();
            if at <= t + S / 2 {
                cut = Some((at, why));
                break;
            }
            t += S / 2;
            p.arrived(1, || t);
        }
        let (at, why) = cut.expect("never cut off");
        assert_eq!(why, Cut::TooSlow);
        // 4 bytes in 2 s of waiting: cut as the fifth wait passes grace + 4/1024 s.
        assert_eq!(p.bytes, 4);
        assert_eq!(at, t + Duration::from_nanos(4 * 1_000_000_000 / 1024));
    }

    #[test]
    fn bytes_earn_waiting_time_at_the_rate() {
        let r = rule(Some(1024));
        let t0 = Instant::now();
        let mut p = Pace::default();
        // 8 KiB after 1 s of waiting: 2 s grace + 8 s earned - 1 s waited = 9 s for the next wait.
        p.wait(|| t0);
        p.arrived(8192, || t0 + S);
        p.wait(|| t0 + 5 * S);
        assert_eq!(p.deadline(&r), Some((t0 + 14 * S, Cut::TooSlow)));
    }

    #[test]
    fn time_not_spent_waiting_is_not_counted() {
        // Backpressure: bytes arrive, then nobody reads for a minute; the next wait starts afresh.
        let r = rule(Some(1024));
        let t0 = Instant::now();
        let mut p = Pace::default();
        p.wait(|| t0);
        p.arrived(10, || t0 + S);
        let later = t0 + 61 * S;
        p.wait(|| later);
        let (at, why) = p.deadline(&r).unwrap();
        assert_eq!(why, Cut::TooSlow);
        assert_eq!(
            at,
            later + S + Duration::from_nanos(10 * 1_000_000_000 / 1024)
        );
        // Bytes that arrive with no wait under way do not read the clock.
        p.arrived(0, || later + S);
        p.arrived(5, || panic!("the clock was read without a wait"));
        p.wait(|| later + 2 * S);
        // Repeated polls during one wait keep its start.
        p.wait(|| panic!("the clock was read during a wait"));
        assert_eq!(p.since, Some(later + 2 * S));
    }

    #[test]
    fn the_idle_timeout_wins_when_it_comes_first() {
        let r = Rule {
            idle: S,
            ..rule(Some(1024))
        };
        let t0 = Instant::now();
        let mut p = Pace::default();
        p.wait(|| t0);
        assert_eq!(p.deadline(&r), Some((t0 + S, Cut::Idle)));
    }

    #[test]
    fn the_deadline_never_moves_earlier_between_waits() {
        let r = rule(Some(1024));
        let mut t = Instant::now();
        let mut p = Pace::default();
        let mut last = None;
        for i in 0..50u64 {
            p.wait(|| t);
            let (at, _) = p.deadline(&r).unwrap();
            assert!(last.is_none_or(|l| at >= l), "wait {i}");
            last = Some(at);
            t += Duration::from_millis(7 * (i % 5) + 1);
            p.arrived((i % 3) as usize * 100, || t);
            t += Duration::from_millis(3 * (i % 4));
        }
    }

    #[test]
    fn huge_counts_and_durations_saturate() {
        let r = Rule {
            idle: Duration::MAX,
            rate: NonZeroU64::new(1),
            grace: Duration::MAX,
        };
        let t0 = Instant::now();
        let mut p = Pace::default();
        p.arrived(usize::MAX, || t0);
        p.arrived(usize::MAX, || t0);
        p.wait(|| t0);
        let (at, _) = p.deadline(&r).unwrap();
        assert!(at > t0 + 86400 * S);
        assert_eq!(p.check(&r, t0 + S), Ok(at));
        assert!(Pace::default().deadline(&r).is_none());
    }
}
