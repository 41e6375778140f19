//! Everything HTTP: connections (`server`), the proxying handler (`proxy`), upgraded connections (`tunnel`),
//! the plain-HTTP redirect (`redirect`), and the header rules they share.

pub mod forwarded;
pub mod guard;
pub mod h2;
pub mod head;
pub mod headers;
pub mod hop;
pub mod host;
mod io;
pub mod pages;
pub mod proxy;
pub mod proxyproto;
pub mod redirect;
pub mod server;
pub mod tunnel;
