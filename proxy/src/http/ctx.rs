//! What one request's phases share ([`Ctx`]: the process state, the request's snapshot, who asked) and
//! what a connection lends its requests ([`Lease`]). Apart from `server` and `pipeline` so that the
//! connection, the phases and the actions all name them without naming each other.

use std::net::IpAddr;
use std::sync::Arc;

use http::header::HeaderValue;

use crate::admission::Ticket;
use crate::http::client_cert::ClientCert;
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

/// What a connection lends its requests: the listener's port (sent as `X-Forwarded-Port`), the peer's address
/// as a header value (formatted once per connection, not per request), and the connection's place in the
/// caps with a shutdown handle. An upgraded request's tunnel keeps a clone, so
/// that it counts against the caps and the drain waits for it after hyper's connection has ended.
#[derive(Clone)]
pub struct Lease {
    pub port: HeaderValue,
    /// The peer's IP address as text: `X-Forwarded-For` (and `X-Real-IP`) of each request it sends.
    pub peer: HeaderValue,
    pub shutdown: Shutdown,
    /// The client certificate verified at the handshake (a `client_auth` site's), read once.
    pub client_cert: Option<Arc<ClientCert>>,
    _ticket: Arc<Ticket>,
}

impl Lease {
    pub fn new(port: HeaderValue, peer: IpAddr, shutdown: Shutdown, ticket: Ticket) -> Lease {
        Lease {
            port,
            peer: ip_value(peer),
            shutdown,
            client_cert: None,
            _ticket: Arc::new(ticket),
        }
    }
}

/// `ip` as a header value whose clones share one buffer (a clone is a reference count, not a copy).
fn ip_value(ip: IpAddr) -> HeaderValue {
    let text = bytes::Bytes::from(ip.to_string());
    // An IP address's text is always a valid header value; the clone turns the buffer into a shared one
    // now, so that the requests' clones are reference counts.
    let v = HeaderValue::from_maybe_shared(text).unwrap_or_else(|_| HeaderValue::from_static(""));
    let _shared = v.clone();
    v
}
