//! ACME (RFC 8555) for `acme = true` sites: the answers the listeners give the CA, and the task that orders
//! and renews. Each file owns one part:
//! - `http01`, `tls_alpn01`: which requests and handshakes are the CA's validations, and their answers;
//! - `bootstrap`: the certificate a site serves at start, before any order;
//! - `task`: one task per site (started at start or by the config reload that adds the site, ended by the
//!   one that removes it): order when there is no certificate, renew on schedule, back off on failure;
//! - `account`: the one ACME account, and the HTTPS client that talks to the CA;
//! - `self_check`: before an order, that every name leads to this instance;
//! - `failure`: why an attempt failed, and the store's file operations run off the async threads.
//!
//! The protocol, persistence and scheduling are `portcullis_certs::acme`'s; sockets are here. Nothing here
//! knows the proxy's `State` or its HTTP layer: the callers hand over the challenge store, each site's
//! `SiteCert` and the `[acme]` settings.

mod account;
mod bootstrap;
mod failure;
pub mod http01;
mod self_check;
mod task;
pub mod tls_alpn01;

pub use bootstrap::bootstrap;
pub use task::Acme;
