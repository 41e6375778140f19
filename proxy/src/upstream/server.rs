//! One upstream server: its address, the opaque key its pooled connections are filed under, and its own
//! state (requests in flight now; health and failure counts join it with load balancing). Shared by every
//! snapshot whose groups name the server, so that the state survives a new config.

use std::sync::atomic::{AtomicUsize, Ordering};

use http::uri::Authority;
use portcullis_config::ServerAddr;

#[derive(Debug)]
pub struct Server {
    pub addr: ServerAddr,
    /// `sN`: the authority the pool and the connector know this server by (N is its position in `Servers`).
    pub key: Authority,
    in_flight: AtomicUsize,
}

/// A request in flight on a server; counted until dropped.
#[derive(Debug)]
pub struct InFlight<'a>(&'a Server);

impl Server {
    pub fn new(addr: ServerAddr, position: usize) -> Server {
        Server {
            addr,
            // `s` and a decimal number is always a valid authority.
            key: Authority::try_from(format!("s{position}"))
                .unwrap_or_else(|_| Authority::from_static("s0")),
            in_flight: AtomicUsize::new(0),
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
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
