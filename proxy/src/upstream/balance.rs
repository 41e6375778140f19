//! Load-balancing policies: how a request picks one member of its group among those not tried yet. Only
//! members that are up are picked; when none is, the one that failed longest ago (never-failed first).
//! Today every policy is round robin over the members that are up; `least_requests` (weights),
//! `random_two` and `ip_hash` (consistent hashing) fill in `Policy` without changing its `pick`.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use portcullis_config::Balance;

use super::Member;

/// One group's policy and whatever state it keeps.
#[derive(Debug)]
pub struct Policy {
    kind: Balance,
    next: AtomicUsize,
}

impl Policy {
    pub fn new(kind: Balance, _members: &[Member]) -> Policy {
        Policy {
            kind,
            next: AtomicUsize::new(0),
        }
    }

    /// The index of the member to try, among those whose bit is not set in `tried`.
    pub fn pick(
        &self,
        members: &[Member],
        _client: IpAddr,
        tried: u64,
        now: Instant,
    ) -> Option<usize> {
        let _ = self.kind;
        let n = members.len().min(64);
        if n == 0 {
            return None;
        }
        let untried = |i: usize| tried & (1 << i) == 0;
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        if let Some(i) = (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| untried(i) && members[i].server.is_up(now))
        {
            return Some(i);
        }
        // Nobody is up: the one that failed longest ago.
        (0..n)
            .filter(|&i| untried(i))
            .min_by_key(|&i| members[i].server.last_failure())
    }
}
