//! When to renew and when to retry. Renewal: a random point in the CA's ARI window (RFC 9773 section 4.2)
//! when it offers one, else `renew_before` ahead of expiry when configured, else two thirds into the
//! lifetime (a 90-day certificate at day 60, a 6-day one at day 4). Retries: exponential backoff from two
//! minutes, doubling, capped at six hours, with +-10 % jitter; at most about five failed validations per
//! name an hour, under Let's Encrypt's limit for them.

use std::time::{Duration, SystemTime};

use crate::inspect::Info;

/// The first retry after a failure.
pub const RETRY_FIRST: Duration = Duration::from_secs(120);
/// The longest wait between two attempts.
pub const RETRY_MAX: Duration = Duration::from_secs(6 * 3600);

/// When a certificate with these facts should be renewed, without ARI. A `renew_before` that is not
/// shorter than the lifetime would renew at once and again after every issue: two thirds are used instead.
pub fn renewal_time(info: &Info, renew_before: Option<Duration>) -> SystemTime {
    let life = info
        .not_after
        .duration_since(info.not_before)
        .unwrap_or_default();
    match renew_before {
        Some(before) if before < life => info.not_after - before,
        _ => info.not_before + life.mul_f64(2.0 / 3.0),
    }
}

/// Whether `renew_before` is too long for a certificate with this lifetime (and so is ignored).
pub fn renew_before_ignored(info: &Info, renew_before: Option<Duration>) -> bool {
    let life = info
        .not_after
        .duration_since(info.not_before)
        .unwrap_or_default();
    renew_before.is_some_and(|b| b >= life)
}

/// A point in the suggested window, picked with `unit` in [0, 1) (RFC 9773: uniformly at random).
pub fn in_window(start: SystemTime, end: SystemTime, unit: f64) -> SystemTime {
    let span = end.duration_since(start).unwrap_or_default();
    start + span.mul_f64(unit.clamp(0.0, 1.0))
}

/// How long to wait after the `failures`-th failure in a row (1 is the first), `unit` in [0, 1) for jitter.
pub fn retry_delay(failures: u32, unit: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let base = RETRY_FIRST.saturating_mul(1 << exp).min(RETRY_MAX);
    base.mul_f64(0.9 + 0.2 * unit.clamp(0.0, 1.0))
}

/// A random number in [0, 1) from the crypto provider's generator (jitter, ARI window points).
pub fn unit_random() -> f64 {
    let mut b = [0u8; 8];
    // A failing system RNG leaves zeros: no jitter that once, which is harmless.
    let _ = crate::provider().secure_random.fill(&mut b);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(from: u64, life: u64) -> Info {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(from);
        Info {
            subject: String::new(),
            issuer: String::new(),
            names: Vec::new(),
            not_before: t,
            not_after: t + Duration::from_secs(life),
            key_type: String::new(),
            serial: String::new(),
            chain_in_order: true,
            chain_len: 1,
        }
    }

    #[test]
    fn two_thirds_or_renew_before() {
        let day = 86_400;
        let i = info(1000, 90 * day);
        let at = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(at(renewal_time(&i, None)), 1000 + 60 * day);
        assert_eq!(
            at(renewal_time(&i, Some(Duration::from_secs(10 * day)))),
            1000 + 80 * day
        );
        // Longer than the lifetime: two thirds, never "renew at once, forever".
        assert_eq!(
            at(renewal_time(&i, Some(Duration::from_secs(100 * day)))),
            1000 + 60 * day
        );
        assert!(renew_before_ignored(
            &i,
            Some(Duration::from_secs(100 * day))
        ));
    }

    #[test]
    fn backoff_doubles_is_capped_and_jittered() {
        assert_eq!(retry_delay(1, 0.5), RETRY_FIRST);
        assert_eq!(retry_delay(2, 0.5), RETRY_FIRST * 2);
        assert_eq!(retry_delay(40, 0.5), RETRY_MAX);
        assert!(retry_delay(1, 0.0) < retry_delay(1, 0.99));
        assert!(
            retry_delay(3, 0.0) > retry_delay(2, 0.99),
            "jitter never reorders two steps"
        );
        let r = unit_random();
        assert!((0.0..1.0).contains(&r));
    }

    #[test]
    fn window_point() {
        let s = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let e = s + Duration::from_secs(100);
        assert_eq!(in_window(s, e, 0.5), s + Duration::from_secs(50));
        assert_eq!(
            in_window(e, s, 0.5),
            e,
            "a window that ends before it starts is its start"
        );
    }
}
