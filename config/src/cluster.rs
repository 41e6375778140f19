//! `[cluster]`: several nodes sharing state through one Redis (`redis = "redis://…"`, `"rediss://…"` or
//! `"unix:///path.sock"`), its AUTH password from a file, the key prefix, the CA of a `rediss://` server
//! the round-trip timeout, and the file of the key that ACME's state is sealed with in Redis (required once a
//! site has `acme = true`). Only the spelling is checked here: the password file is read by the proxy
//! at start, with its privileges then (it may be root's alone), and nothing connects.

use crate::check::Checker;
use crate::defaults;
use crate::file::{self, S};
use crate::model::Cluster;

impl Checker<'_> {
    /// `None` without a `[cluster]` section: one node, its state its own. `acme`: some site has
    /// `acme = true` (its account and certificates are then shared, sealed with `key_file`).
    pub(crate) fn cluster(&mut self, c: Option<S<file::Cluster>>, acme: bool) -> Option<Cluster> {
        let c = c?;
        let span = c.span();
        let c = c.into_inner();
        let Some(redis) = c.redis else {
            self.problem(
                span,
                "cluster.redis",
                "is missing: the Redis every node shares, like \"redis://127.0.0.1:6379/0\", \
                 \"rediss://redis.example:6380/0\" or \"unix:///run/redis/redis.sock\"",
            );
            return None;
        };
        let url = redis.get_ref().trim().to_owned();
        let scheme = url.split_once("://").map(|(s, _)| s);
        let tls = scheme == Some("rediss");
        match scheme {
            Some("redis" | "rediss") if url.len() > scheme.map_or(0, str::len) + 3 => {}
            Some("unix" | "redis+unix")
                if url
                    .split_once("://")
                    .is_some_and(|(_, p)| p.starts_with('/')) => {}
            _ => {
                self.problem(
                    redis.span(),
                    "cluster.redis",
                    format!(
                        "{url:?} is not \"redis://HOST:PORT/DB\", \"rediss://HOST:PORT/DB\" or \
                         \"unix:///absolute/path.sock\""
                    ),
                );
                return None;
            }
        }
        if url.contains('@') {
            self.problem(
                redis.span(),
                "cluster.redis",
                "holds credentials: put the password in password_file instead, so that the config can be \
                 shown without it",
            );
        }
        let password_file = c.password_file.map(|p| {
            if p.get_ref().trim().is_empty() {
                self.problem(p.span(), "cluster.password_file", "is empty");
            }
            self.resolve(p.get_ref())
        });
        let ca_file = c.ca_file.map(|p| {
            if !tls {
                self.problem(
                    p.span(),
                    "cluster.ca_file",
                    "is only used by a rediss:// server (TLS); this one is not",
                );
            }
            self.resolve(p.get_ref())
        });
        let prefix = match c.prefix {
            None => defaults::CLUSTER_PREFIX.to_owned(),
            Some(p) => {
                let text = p.get_ref();
                if text.is_empty()
                    || text.len() > 64
                    || text.chars().any(|ch| ch.is_whitespace() || ch.is_control())
                {
                    self.problem(
                        p.span(),
                        "cluster.prefix",
                        format!("{text:?}: 1 to 64 characters, no spaces, like \"portcullis:\""),
                    );
                }
                text.clone()
            }
        };
        let timeout = self.duration("cluster.timeout", c.timeout, defaults::CLUSTER_TIMEOUT);
        let key_file = match c.key_file {
            Some(p) => {
                if p.get_ref().trim().is_empty() {
                    self.problem(p.span(), "cluster.key_file", "is empty");
                }
                Some(self.resolve(p.get_ref()))
            }
            None if acme => {
                self.problem(
                    span.clone(),
                    "cluster.key_file",
                    "is missing: with [cluster], the ACME account, certificates and keys are kept in Redis \
                     sealed with this key (32 random bytes, base64 or hex: `openssl rand -base64 32 > \
                     /etc/portcullis/cluster.key`, the same file on every node)",
                );
                None
            }
            None => None,
        };
        Some(Cluster {
            redis: url,
            password_file,
            ca_file,
            prefix,
            timeout,
            key_file,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::testing::{EXAMPLE, parse, problems};

    #[test]
    fn no_section_no_cluster() {
        assert!(parse(EXAMPLE).unwrap().cluster.is_none());
    }

    #[test]
    fn the_three_spellings_and_the_defaults() {
        for url in [
            "redis://127.0.0.1:6379/0",
            "rediss://redis.example:6380/0",
            "unix:///run/redis/redis.sock",
        ] {
            let c = parse(&format!("{EXAMPLE}\n[cluster]\nredis = \"{url}\"\n"))
                .unwrap()
                .cluster
                .unwrap();
            assert_eq!(c.redis, url);
            assert_eq!(c.prefix, "portcullis:");
            assert_eq!(c.timeout, Duration::from_millis(100));
            assert_eq!(c.password_file, None);
        }
        let c = parse(&format!(
            "{EXAMPLE}\n[cluster]\nredis = \"redis://r:6379\"\npassword_file = \"redis.pass\"\nprefix = \"eu:\"\ntimeout = \"50ms\"\n"
        ))
        .unwrap()
        .cluster
        .unwrap();
        assert_eq!(
            c.password_file.as_deref(),
            Some(std::path::Path::new("/etc/portcullis/redis.pass"))
        );
        assert_eq!(
            (c.prefix.as_str(), c.timeout),
            ("eu:", Duration::from_millis(50))
        );
    }

    #[test]
    fn a_bad_url_is_located() {
        let text = format!("{EXAMPLE}\n[cluster]\nredis = \"http://127.0.0.1:6379\"\n");
        let p = problems(&text);
        let line = text.lines().count();
        assert!(p[0].contains(&format!(":{line}:9: cluster.redis")), "{p:?}");
        assert!(
            problems(&format!(
                "{EXAMPLE}\n[cluster]\nredis = \"unix://redis.sock\"\n"
            ))[0]
                .contains("cluster.redis")
        );
        assert!(
            problems(&format!("{EXAMPLE}\n[cluster]\nprefix = \"x:\"\n"))[0]
                .contains("cluster.redis: is missing")
        );
    }

    #[test]
    fn an_acme_site_in_a_cluster_needs_the_key_file() {
        let acme = "[[site]]\nnames = [\"a.example.com\"]\ntls = { acme = true }\n[[site.route]]\npath = \"/\"\n\
                    upstream = \"app\"\n[acme]\nemail = \"ops@example.com\"\nstate_dir = \"acme\"\n";
        let text = format!("{EXAMPLE}\n{acme}[cluster]\nredis = \"redis://127.0.0.1:6379\"\n");
        let p = problems(&text);
        let line = text.lines().position(|l| l == "[cluster]").unwrap() + 1;
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains(&format!(":{line}:")) && p[0].contains("cluster.key_file: is missing"),
            "{p:?}"
        );
        assert!(p[0].contains("portcullis.toml"), "{p:?}");
        let c = parse(&format!("{text}key_file = \"cluster.key\"\n"))
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(
            c.key_file.as_deref(),
            Some(std::path::Path::new("/etc/portcullis/cluster.key"))
        );
        // Without an ACME site nothing is sealed: no key needed.
        assert!(
            parse(&format!(
                "{EXAMPLE}\n[cluster]\nredis = \"redis://r:6379\"\n"
            ))
            .is_ok()
        );
    }

    #[test]
    fn credentials_in_the_url_and_a_ca_without_tls_are_refused() {
        let p = problems(&format!(
            "{EXAMPLE}\n[cluster]\nredis = \"redis://:secret@127.0.0.1:6379\"\n"
        ));
        assert!(p[0].contains("password_file"), "{p:?}");
        let p = problems(&format!(
            "{EXAMPLE}\n[cluster]\nredis = \"redis://127.0.0.1:6379\"\nca_file = \"ca.pem\"\n"
        ));
        assert!(p[0].contains("cluster.ca_file"), "{p:?}");
    }
}
