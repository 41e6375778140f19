//! `[listen]` and `trusted_proxies`: the addresses served, the PROXY protocol, and the peers trusted to name
//! the client (by PROXY header or `X-Forwarded-For`). The sockets themselves are the proxy's.

use std::net::SocketAddr;

use crate::check::Checker;
use crate::cidr::Cidr;
use crate::defaults;
use crate::file::{self, S};
use crate::model::Listen;

impl Checker<'_> {
    pub(crate) fn listen(&mut self, l: Option<file::Listen>) -> Listen {
        let default = |d: &[&str]| {
            d.iter()
                .filter_map(|s| s.parse().ok())
                .collect::<Vec<SocketAddr>>()
        };
        let (https, http, proxy_protocol) = match l {
            None => (None, None, None),
            Some(l) => (l.https, l.http, l.proxy_protocol),
        };
        let https = match https {
            Some(list) => self.addrs("https", list),
            None => default(defaults::HTTPS),
        };
        let http = match http {
            Some(list) => self.addrs("http", list),
            None => default(defaults::HTTP),
        };
        Listen {
            https,
            http,
            proxy_protocol: proxy_protocol.is_some_and(|p| *p.get_ref()),
        }
    }

    /// `trusted_proxies`; `listen.proxy_protocol` needs at least one.
    pub(crate) fn trusted_proxies(
        &mut self,
        list: Option<Vec<S<String>>>,
        listen: &Listen,
    ) -> Vec<Cidr> {
        let trusted_proxies = list
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .filter_map(|(i, s)| match s.get_ref().parse::<Cidr>() {
                Ok(c) => {
                    if c.is_everything() {
                        self.warning(
                            s.span(),
                            format!("trusted_proxies[{i}]"),
                            format!("{c} trusts every address on the internet: any client can then claim any address in X-Forwarded-For"),
                        );
                    }
                    Some(c)
                }
                Err(why) => {
                    self.problem(s.span(), format!("trusted_proxies[{i}]"), why);
                    None
                }
            })
            .collect::<Vec<Cidr>>();
        if listen.proxy_protocol && trusted_proxies.is_empty() {
            self.problem(
                0..0,
                "listen.proxy_protocol",
                "needs trusted_proxies: PROXY headers are accepted only from them",
            );
        }
        trusted_proxies
    }

    fn addrs(&mut self, key: &str, list: Vec<S<String>>) -> Vec<SocketAddr> {
        let mut out = Vec::with_capacity(list.len());
        for (i, a) in list.into_iter().enumerate() {
            match a.get_ref().parse::<SocketAddr>() {
                Ok(addr) => out.push(addr),
                Err(_) => self.problem(
                    a.span(),
                    format!("listen.{key}[{i}]"),
                    format!("{:?} is not an address with a port, like \"127.0.0.1:8443\" or \"[::]:443\"", a.get_ref()),
                ),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::{EXAMPLE, parse};

    #[test]
    fn trusting_everyone_is_a_warning() {
        let c = parse(&format!(
            "trusted_proxies = [\"10.0.0.0/8\", \"0.0.0.0/0\"]\n{EXAMPLE}"
        ))
        .unwrap();
        assert_eq!(c.warnings.len(), 1);
        assert!(
            c.warnings[0].to_string().contains(":1:") && c.warnings[0].key == "trusted_proxies[1]",
            "{:?}",
            c.warnings
        );
    }
}
