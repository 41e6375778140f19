//! `[upstream.NAME]`: each group's servers, `IP:PORT` or `unix:/path` (relative to the config folder), in
//! name order (routes refer to a group by its index in that order). Connecting is the proxy's.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::check::Checker;
use crate::file::{self, S};
use crate::model::{ServerAddr, Upstream};

impl Checker<'_> {
    pub(crate) fn upstreams(&mut self, ups: &BTreeMap<String, S<file::Upstream>>) -> Vec<Upstream> {
        let mut out = Vec::with_capacity(ups.len());
        for (name, u) in ups {
            let servers = u.get_ref().servers.get_ref();
            if servers.is_empty() {
                self.problem(
                    u.get_ref().servers.span(),
                    format!("upstream.{name}.servers"),
                    "is empty: list at least one server",
                );
            }
            let mut addrs = Vec::with_capacity(servers.len());
            for (i, s) in servers.iter().enumerate() {
                let key = format!("upstream.{name}.servers[{i}]");
                let text = s.get_ref();
                if let Some(path) = text.strip_prefix("unix:") {
                    if path.is_empty() {
                        self.problem(s.span(), key, "\"unix:\" needs a socket path");
                    } else {
                        addrs.push(ServerAddr::Unix(self.resolve(path)));
                    }
                } else {
                    match text.parse::<SocketAddr>() {
                        Ok(a) => addrs.push(ServerAddr::Tcp(a)),
                        Err(_) => self.problem(
                            s.span(),
                            key,
                            format!("{text:?} is not \"IP:PORT\" or \"unix:/path/to.sock\""),
                        ),
                    }
                }
            }
            out.push(Upstream {
                name: name.clone(),
                servers: addrs,
            });
        }
        out
    }
}
