//! `[upstream.NAME]`: each group's servers, `IP:PORT` or `unix:/path` (relative to the config folder) with
//! a weight, in name order (routes refer to a group by its index in that order), its balancing policy,
//! health checks, passive failure rule and retries; and `[maintenance]`. Connecting is the proxy's.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::check::Checker;
use crate::cidr::Cidr;
use crate::defaults;
use crate::file::{self, S};
use crate::model::{Balance, Health, Maintenance, ServerAddr, Upstream};

/// Servers one upstream may list.
pub const MAX_SERVERS: usize = 64;

impl Checker<'_> {
    pub(crate) fn upstreams(&mut self, ups: &BTreeMap<String, S<file::Upstream>>) -> Vec<Upstream> {
        let mut out = Vec::with_capacity(ups.len());
        for (name, u) in ups {
            let u = u.get_ref();
            let servers = u.servers.get_ref();
            if servers.is_empty() {
                self.problem(
                    u.servers.span(),
                    format!("upstream.{name}.servers"),
                    "is empty: list at least one server",
                );
            }
            let mut addrs = Vec::with_capacity(servers.len());
            let mut weights = Vec::with_capacity(servers.len());
            for (i, s) in servers.iter().enumerate() {
                let key = format!("upstream.{name}.servers[{i}]");
                let (text, weight) = match s.get_ref() {
                    file::ServerEntry::Addr(a) => (a.as_str(), None),
                    file::ServerEntry::Weighted(w) => (w.addr.as_str(), w.weight),
                };
                let weight = match weight {
                    None => defaults::SERVER_WEIGHT,
                    Some(w) if (1..=1000).contains(&w) => w as u32,
                    Some(w) => {
                        self.problem(
                            s.span(),
                            format!("{key}.weight"),
                            format!("{w} must be from 1 to 1000"),
                        );
                        defaults::SERVER_WEIGHT
                    }
                };
                let addr = if let Some(path) = text.strip_prefix("unix:") {
                    if path.is_empty() {
                        self.problem(s.span(), key, "\"unix:\" needs a socket path");
                        continue;
                    }
                    ServerAddr::Unix(self.resolve(path))
                } else {
                    match text.parse::<SocketAddr>() {
                        Ok(a) => ServerAddr::Tcp(a),
                        Err(_) => {
                            self.problem(
                                s.span(),
                                key,
                                format!("{text:?} is not \"IP:PORT\" or \"unix:/path/to.sock\""),
                            );
                            continue;
                        }
                    }
                };
                if addrs.contains(&addr) {
                    self.problem(s.span(), key, format!("{text:?} is listed twice"));
                    continue;
                }
                addrs.push(addr);
                weights.push(weight);
            }
            if addrs.len() > MAX_SERVERS {
                self.problem(
                    u.servers.span(),
                    format!("upstream.{name}.servers"),
                    format!(
                        "lists {} servers: at most {MAX_SERVERS} (a request remembers which it tried in 64 bits)",
                        addrs.len()
                    ),
                );
            }
            let balance = match u.balance.as_ref().map(|b| (b, b.get_ref().as_str())) {
                None => defaults::BALANCE,
                Some((_, "least_requests")) => Balance::LeastRequests,
                Some((_, "round_robin")) => Balance::RoundRobin,
                Some((_, "random_two")) => Balance::RandomTwo,
                Some((_, "ip_hash")) => Balance::IpHash,
                Some((b, other)) => {
                    self.problem(
                        b.span(),
                        format!("upstream.{name}.balance"),
                        format!("{other:?} is not \"least_requests\", \"round_robin\", \"random_two\" or \"ip_hash\""),
                    );
                    defaults::BALANCE
                }
            };
            let health = u.health.as_ref().map(|h| self.health(name, h));
            let max_fails = self.small(
                &format!("upstream.{name}.max_fails"),
                u.max_fails.as_ref(),
                defaults::MAX_FAILS,
                true,
            );
            let fail_timeout = self.duration(
                &format!("upstream.{name}.fail_timeout"),
                u.fail_timeout.clone(),
                defaults::FAIL_TIMEOUT,
            );
            let retries = self.small(
                &format!("upstream.{name}.retries"),
                u.retries.as_ref(),
                defaults::RETRIES,
                true,
            );
            out.push(Upstream {
                name: name.clone(),
                servers: addrs,
                weights,
                balance,
                health,
                max_fails,
                fail_timeout,
                retries,
            });
        }
        out
    }

    fn health(&mut self, name: &str, h: &S<file::Health>) -> Health {
        let key = |k: &str| format!("upstream.{name}.health.{k}");
        let hr = h.get_ref();
        let path = hr.path.get_ref().clone();
        if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            self.problem(
                hr.path.span(),
                key("path"),
                format!("{path:?} must start with '/' and hold no spaces or control characters"),
            );
        }
        Health {
            path,
            interval: self.duration(
                &key("interval"),
                hr.interval.clone(),
                defaults::HEALTH_INTERVAL,
            ),
            timeout: self.duration(
                &key("timeout"),
                hr.timeout.clone(),
                defaults::HEALTH_TIMEOUT,
            ),
            rise: self.small(&key("rise"), hr.rise.as_ref(), defaults::HEALTH_RISE, false),
            fall: self.small(&key("fall"), hr.fall.as_ref(), defaults::HEALTH_FALL, false),
        }
    }

    /// A small count (at most 100); zero only when `zero_ok`.
    fn small(&mut self, key: &str, v: Option<&S<u64>>, default: u32, zero_ok: bool) -> u32 {
        let Some(v) = v else { return default };
        let n = *v.get_ref();
        if (n == 0 && !zero_ok) || n > 100 {
            let lowest = u64::from(!zero_ok);
            self.problem(v.span(), key, format!("{n} must be from {lowest} to 100"));
            return default;
        }
        n as u32
    }

    pub(crate) fn maintenance(&mut self, m: Option<S<file::Maintenance>>) -> Maintenance {
        let Some(m) = m else {
            return Maintenance {
                page: None,
                retry_after: defaults::MAINTENANCE_RETRY_AFTER,
                flag: None,
                allow: Vec::new(),
            };
        };
        let m = m.into_inner();
        let allow = m
            .allow
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .filter_map(|(i, s)| match s.get_ref().parse::<Cidr>() {
                Ok(c) => Some(c),
                Err(why) => {
                    self.problem(s.span(), format!("maintenance.allow[{i}]"), why);
                    None
                }
            })
            .collect();
        Maintenance {
            page: m.page.map(|p| self.resolve(p.get_ref())),
            retry_after: self.duration(
                "maintenance.retry_after",
                m.retry_after,
                defaults::MAINTENANCE_RETRY_AFTER,
            ),
            flag: m.flag.map(|p| self.resolve(p.get_ref())),
            allow,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::model::{Balance, ServerAddr};
    use crate::testing::{EXAMPLE, parse, problems};

    const MANY: &str = r#"
[upstream.app]
servers = ["127.0.0.1:5001", { addr = "127.0.0.1:5002", weight = 3 }, "unix:/run/app3.sock"]
balance = "ip_hash"
health = { path = "/health", interval = "2s", timeout = "500ms", rise = 2, fall = 3 }
max_fails = 2
fail_timeout = "5s"
retries = 1

[maintenance]
page = "maintenance.html"
retry_after = "1m"
flag = "/run/portcullis/maintenance"
allow = ["10.0.0.0/8"]
"#;

    #[test]
    fn defaults_for_one_server() {
        let c = parse(EXAMPLE).unwrap();
        let u = &c.upstreams[0];
        assert_eq!(u.weights, [1]);
        assert_eq!(u.balance, Balance::LeastRequests);
        assert_eq!(u.health, None);
        assert_eq!((u.max_fails, u.retries), (1, 2));
        assert_eq!(u.fail_timeout, Duration::from_secs(10));
        assert_eq!(c.maintenance.page, None);
        assert_eq!(c.maintenance.retry_after, Duration::from_secs(30));
    }

    #[test]
    fn weights_balance_health_retries_and_maintenance() {
        let text = EXAMPLE.replace("[upstream.app]\nservers = [\"127.0.0.1:8000\"]\n", MANY);
        let c = parse(&text).unwrap();
        let u = &c.upstreams[0];
        assert_eq!(u.servers.len(), 3);
        assert_eq!(u.servers[2], ServerAddr::Unix("/run/app3.sock".into()));
        assert_eq!(u.weights, [1, 3, 1]);
        assert_eq!(u.balance, Balance::IpHash);
        let h = u.health.as_ref().unwrap();
        assert_eq!(h.path, "/health");
        assert_eq!(
            (h.interval, h.timeout),
            (Duration::from_secs(2), Duration::from_millis(500))
        );
        assert_eq!((h.rise, h.fall), (2, 3));
        assert_eq!((u.max_fails, u.retries), (2, 1));
        assert_eq!(u.fail_timeout, Duration::from_secs(5));
        let m = &c.maintenance;
        assert_eq!(
            m.page.as_deref(),
            Some(std::path::Path::new("/etc/portcullis/maintenance.html"))
        );
        assert_eq!(m.retry_after, Duration::from_secs(60));
        assert_eq!(m.allow.len(), 1);
    }

    #[test]
    fn an_upstream_lists_at_most_64_servers() {
        let list = |n: u16| {
            let servers: Vec<String> = (0..n)
                .map(|i| format!("\"127.0.0.1:{}\"", 5000 + i))
                .collect();
            EXAMPLE.replace("[\"127.0.0.1:8000\"]", &format!("[{}]", servers.join(", ")))
        };
        assert_eq!(parse(&list(64)).unwrap().upstreams[0].servers.len(), 64);
        let p = problems(&list(65));
        assert!(
            p.iter()
                .any(|l| l.contains(": upstream.app.servers: lists 65 servers")),
            "{p:?}"
        );
    }

    #[test]
    fn bad_upstream_keys_are_named() {
        let text = EXAMPLE.replace(
            "servers = [\"127.0.0.1:8000\"]\n",
            "servers = [\"127.0.0.1:8000\", \"127.0.0.1:8000\", { addr = \"127.0.0.1:1\", weight = 0 }]\nbalance = \"fastest\"\nhealth = { path = \"health\", fall = 0 }\nretries = 1000\n[maintenance]\nallow = [\"10.0.0.0/33\"]\n",
        );
        let p = problems(&text);
        for key in [
            "upstream.app.servers[1]",
            "upstream.app.servers[2].weight",
            "upstream.app.balance",
            "upstream.app.health.path",
            "upstream.app.health.fall",
            "upstream.app.retries",
            "maintenance.allow[0]",
        ] {
            assert!(
                p.iter().any(|l| l.contains(&format!(": {key}: "))),
                "{key}: {p:?}"
            );
        }
    }
}
