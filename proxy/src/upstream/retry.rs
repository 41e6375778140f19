//! What may be sent again after a failure, and how often. A request that never reached the app (no
//! connection, or one that closed before the request was written) may go to another server whatever its
//! method. One the app may have seen goes again only if its method is idempotent (RFC 9110 §9.2.2) and its
//! body can be replayed (empty, one buffer, or a spool written whole). Retries on other servers are held to
//! a per-group [`Budget`], so that a failing upstream does not get its traffic multiplied.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use http::{Method, Request};

use super::server::clock;
use crate::body::Body;

/// GET, HEAD, OPTIONS, TRACE, PUT, DELETE: repeating them has the effect of sending them once (RFC 9110
/// §9.2.2). POST, PATCH and anything unknown are not.
pub fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// A copy of `req` to send again, if its body can be replayed (the original is then set to replay too).
/// Extensions are not copied: nothing upstream reads them.
pub fn spare(req: &mut Request<Body>) -> Option<Request<Body>> {
    let body = req.body_mut().replay()?;
    let mut copy = Request::new(body);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// Over the last [`WINDOW`] seconds, retries may be at most [`RATIO`] of the requests, or [`FLOOR`] in the
/// current second whatever the traffic (a quiet upstream can still fail over). Counted in one-second
/// buckets; the counters are approximate under races, which is all a budget needs.
#[derive(Debug, Default)]
pub struct Budget {
    buckets: [Bucket; WINDOW],
    /// Retries refused since the last warning, and the second of that warning.
    refused: AtomicU32,
    warned: AtomicU64,
}

/// Seconds of history.
const WINDOW: usize = 10;
/// Retries per request allowed over the window: 1 in 5 (Finagle's and gRPC's default retry budgets are 20%
/// too).
const RATIO: u64 = 5;
/// Retries always allowed per second.
const FLOOR: u32 = 3;

#[derive(Debug, Default)]
struct Bucket {
    /// The second (on `server::clock`) these counts are for.
    second: AtomicU64,
    requests: AtomicU32,
    retries: AtomicU32,
}

impl Budget {
    /// A request came for the group.
    pub fn request(&self, now: Instant) {
        self.bucket(second(now))
            .requests
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Whether a retry would be allowed now (without taking it): a copy for a retry is worth keeping.
    pub fn has_room(&self, now: Instant) -> bool {
        self.allows(second(now))
    }

    /// Takes a retry if the budget allows one; otherwise says so in the log (at most once a second per group).
    pub fn retry(&self, now: Instant, group: &str) -> bool {
        let s = second(now);
        if self.allows(s) {
            self.bucket(s).retries.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        if self.warned.swap(s, Ordering::Relaxed) != s {
            self.refused.store(0, Ordering::Relaxed);
            tracing::warn!(
                upstream = %group,
                refused,
                "upstream retry refused: retries are over 20% of the last 10 s of requests (retry budget)"
            );
        }
        false
    }

    fn allows(&self, s: u64) -> bool {
        let (mut requests, mut retries) = (0u64, 0u64);
        let mut this_second = 0;
        for b in &self.buckets {
            let at = b.second.load(Ordering::Relaxed);
            if at + (WINDOW as u64) > s {
                let r = b.retries.load(Ordering::Relaxed);
                requests += u64::from(b.requests.load(Ordering::Relaxed));
                retries += u64::from(r);
                if at == s {
                    this_second = r;
                }
            }
        }
        this_second < FLOOR || retries * RATIO < requests
    }

    /// The bucket for second `s`, emptied first if it held an older second.
    fn bucket(&self, s: u64) -> &Bucket {
        let b = &self.buckets[(s % WINDOW as u64) as usize];
        let at = b.second.load(Ordering::Relaxed);
        if at != s
            && b.second
                .compare_exchange(at, s, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            b.requests.store(0, Ordering::Relaxed);
            b.retries.store(0, Ordering::Relaxed);
        }
        b
    }
}

fn second(now: Instant) -> u64 {
    clock(now) / 1000
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn idempotent_methods_are_rfc_9110s() {
        for m in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
            assert!(idempotent(&m.parse().unwrap()), "{m}");
        }
        for m in ["POST", "PATCH", "CONNECT", "PURGE"] {
            assert!(!idempotent(&m.parse().unwrap()), "{m}");
        }
    }

    #[test]
    fn the_budget_allows_a_fifth_of_the_requests_or_three_a_second() {
        let b = Budget::default();
        let t = Instant::now();
        // No traffic: the floor still lets a few through.
        assert!(b.retry(t, "g"));
        assert!(b.retry(t, "g"));
        assert!(b.retry(t, "g"));
        assert!(!b.retry(t, "g"), "over the floor with no requests");
        // The next second: the floor again.
        let t1 = t + Duration::from_secs(1);
        assert!(b.retry(t1, "g"));
        // Plenty of requests: one in five.
        let t2 = t + Duration::from_secs(2);
        for _ in 0..100 {
            b.request(t2);
        }
        let allowed = (0..100).filter(|_| b.retry(t2, "g")).count();
        // 4 retries were already in the window; 20% of 100 requests is 20 in all.
        assert_eq!(allowed, 16);
        // Once the window has passed, the old retries no longer count.
        let later = t + Duration::from_secs(30);
        for _ in 0..10 {
            b.request(later);
        }
        assert!(b.has_room(later));
    }

    #[test]
    fn spares_copy_replayable_requests_only() {
        let mut req = Request::put("/x")
            .header("host", "app.test")
            .body(Body::full("abc"))
            .unwrap();
        let copy = spare(&mut req).expect("one buffer replays");
        assert_eq!(copy.method(), Method::PUT);
        assert_eq!(copy.headers()["host"], "app.test");
        assert!(spare(&mut Request::new(Body::Empty)).is_some());
    }
}
