//! Portcullis configuration: reads the TOML file (`file.rs` mirrors it), checks every key, and builds the
//! typed [`Config`] that the proxy runs on (`model.rs`). Each section has its checker (`listen.rs`,
//! `sites.rs`, `routes.rs`, `upstreams.rs`, `limits.rs`, `headers.rs`, `log.rs`, `process.rs`,
//! `ratelimit.rs`, `acme.rs`, `admin.rs`) on the core in `check.rs`; every default lives in [`defaults`], and every
//! problem is reported as `FILE:LINE:COL: key: what is wrong`. No sockets, no certificates: those are other
//! crates'.

#![forbid(unsafe_code)]

mod acme;
mod admin;
mod check;
mod cidr;
mod cluster;
pub mod defaults;
mod duration;
mod error;
pub mod file;
mod headers;
mod limits;
mod listen;
mod log;
mod model;
mod process;
mod ratelimit;
mod routes;
mod sites;
mod size;
#[cfg(test)]
mod testing;
mod upstreams;

use std::path::Path;

use check::Checker;

pub use cidr::Cidr;
pub use error::{Error, Problem};
pub use model::{
    Acme, AcmeChallenge, AcmePaths, Action, Admin, Balance, Buffers, CertSource, ClientAuth,
    ClientAuthMode, Cluster, Config, CrlExpired, Eab, HeaderRule, Health, Limits, Listen, Log,
    LogFormat, Maintenance, PathMatch, PerAccount, Process, Rate, RateKey, RateLimit, Route,
    Sandbox, Seccomp, SecurityHeaders, ServerAddr, Site, Static, StaticKind, Timeouts, Tls,
    TlsVersion, Upstream,
};
pub use ratelimit::parse_rate;

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Checks config text; `path` names it in messages and anchors relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Config, Error> {
        let mut check = Checker::new(path, text);
        let file: file::File = match toml::from_str(text) {
            Ok(f) => f,
            Err(e) => {
                check.toml_error(&e);
                return Err(check.into_error());
            }
        };
        let mut config = check.build(file);
        config.warnings = check.take_warnings();
        check.finish(config)
    }
}

impl Checker<'_> {
    /// Every section, in this order (problems are reported in it); each checker is in its section's file.
    fn build(&mut self, f: file::File) -> Config {
        let names = self.names(f.names);
        let listen = self.listen(f.listen);
        // The top-level form is the default site unless only [[site]]s are given.
        let top_level = !f.route.is_empty() || f.site.is_empty();
        let (default_source, tls) = self.tls(f.tls, top_level);
        let upstreams = self.upstreams(&f.upstream);
        let limits = self.limits(f.limits);
        let routes = if top_level {
            self.routes("route", f.route, &f.upstream, limits.body, false)
        } else {
            Vec::new()
        };
        let mut sites = Vec::with_capacity(f.site.len() + 1);
        if top_level {
            sites.push(Site {
                names,
                tls: default_source,
                routes,
                client_auth: None,
            });
        }
        for (i, s) in f.site.into_iter().enumerate() {
            sites.push(self.site(i, s, &f.upstream, limits.body));
        }
        self.distinct_site_names(&sites);
        let acme_paths = f.acme.as_ref().map(|a| self.acme_paths(a.get_ref()));
        let acme = self.acme(f.acme, &sites, usize::from(top_level), &listen);
        let strict_sni = f.strict_sni.is_some_and(|s| *s.get_ref());
        let trusted_proxies = self.trusted_proxies(f.trusted_proxies, &listen);
        let headers = self.headers(f.headers);
        let timeouts = self.timeouts(f.timeouts);
        let log = self.log(f.log);
        let process = self.process(f.process);
        let buffers = self.buffers(f.buffers);
        let maintenance = self.maintenance(f.maintenance);
        let rate_limits = self.rate_limits(f.rate_limit);
        let admin = self.admin(f.admin);
        let cluster = self.cluster(f.cluster, acme.is_some());
        Config {
            source: self.path().to_owned(),
            sites,
            strict_sni,
            listen,
            tls,
            upstreams,
            trusted_proxies,
            headers,
            timeouts,
            log,
            process,
            limits,
            buffers,
            maintenance,
            rate_limits,
            acme,
            acme_paths,
            admin,
            cluster,
            warnings: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use crate::defaults;
    use crate::model::{ServerAddr, TlsVersion};
    use crate::testing::{EXAMPLE, parse, problems};

    #[test]
    fn the_issue_example_parses_with_hardened_defaults() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.sites[0].names, ["localhost"]);
        assert_eq!(
            c.listen.https,
            ["127.0.0.1:8443".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(c.sites[0].routes[0].path, "/");
        assert_eq!(
            c.upstreams[0].servers,
            [ServerAddr::Tcp("127.0.0.1:8000".parse().unwrap())]
        );
        assert_eq!(c.tls.min_version, TlsVersion::Tls12);
        assert_eq!(
            c.headers.strict_transport_security.unwrap().value,
            defaults::HSTS
        );
        assert_eq!(c.timeouts.shutdown, Duration::from_secs(30));
        assert_eq!(c.timeouts.tunnel_idle, Duration::from_secs(600));
        assert!(c.trusted_proxies.is_empty());
        assert_eq!((c.process.user, c.process.group), (None, None));
    }

    #[test]
    fn every_problem_is_reported_not_just_the_first() {
        let text = EXAMPLE
            .replace("127.0.0.1:8443", "nonsense")
            .replace("upstream = \"app\"", "upstream = \"nope\"")
            .replace("127.0.0.1:8000", "localhost");
        let p = problems(&text);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(
            p[0].contains(":5:") && p[0].contains("listen.https[0]"),
            "{}",
            p[0]
        );
        assert!(
            p.iter()
                .any(|l| l.contains("route[0].upstream: no [upstream.nope]"))
        );
        assert!(p.iter().any(|l| l.contains("upstream.app.servers[0]")));
    }
}
