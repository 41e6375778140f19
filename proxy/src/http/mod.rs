//! Everything HTTP: connections (`server`, with the HTTP/1.1 `guard` and its `head` rules, the HTTP/2 `h2`
//! limits), one request's phases (`pipeline`: site, route, `filters`, the route's `action`, response
//! headers, `compress` for routes that ask, the `request_id` every request carries), upgraded connections (`tunnel`), the plain-HTTP `redirect`, and the header rules they share.

pub mod action;
pub mod client_cert;
pub mod compress;
pub mod ctx;
pub mod filters;
pub mod forwarded;
pub mod guard;
pub mod h2;
pub mod head;
pub mod headers;
pub mod hop;
pub mod host;
mod io;
pub mod pages;
pub mod pipeline;
pub mod proxyproto;
pub mod redirect;
pub mod request_id;
pub mod server;
pub mod tunnel;
