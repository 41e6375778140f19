//! Load-balancing policies: how a request picks one server of its group. Round robin for now; a new policy
//! is a new type here with the same `pick`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::Server;

/// Each server in turn.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    pub fn pick<'a>(&self, servers: &'a [Arc<Server>]) -> Option<&'a Arc<Server>> {
        if servers.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % servers.len();
        servers.get(i)
    }
}
