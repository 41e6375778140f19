//! What one request's phases share ([`Ctx`]: the process state, the request's snapshot, who asked) and
//! what a connection lends its requests ([`Lease`]). Apart from `server` and `pipeline` so that the
//! connection, the phases and the actions all name them without naming each other.

use std::net::IpAddr;
use std::sync::Arc;

use http::header::HeaderValue;

use crate::admission::Ticket;
use crate::shutdown::Shutdown;
use crate::state::{Shared, Snapshot};

/// What every phase of one request may read: the process state, the request's snapshot, who asked, and
/// what its connection lends it.
pub struct Ctx<'a> {
    pub shared: &'a Shared,
    pub snap: &'a Snapshot,
    /// The connection's peer address.
    pub peer: IpAddr,
    /// The client as far as we trust it (the peer, or the right-most untrusted hop from a trusted proxy).
    pub client: IpAddr,
    /// The listener's port, the connection's place in the caps and its shutdown handle.
    pub lease: &'a Lease,
    /// The request's `X-Request-Id` (`http/request_id.rs`), sent upstream as it is.
    pub request_id: &'a HeaderValue,
}

/// What a connection lends its requests: the listener's port (sent as `X-Forwarded-Port`), and the
/// connection's place in the caps with a shutdown handle. An upgraded request's tunnel keeps a clone, so
/// that it counts against the caps and the drain waits for it after hyper's connection has ended.
#[derive(Clone)]
pub struct Lease {
    pub port: HeaderValue,
    pub shutdown: Shutdown,
    _ticket: Arc<Ticket>,
}

impl Lease {
    pub fn new(port: HeaderValue, shutdown: Shutdown, ticket: Ticket) -> Lease {
        Lease {
            port,
            shutdown,
            _ticket: Arc::new(ticket),
        }
    }
}
