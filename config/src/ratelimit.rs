//! `[[rate_limit]]`: its check, and the rate syntax (`"10/minute"`); the checked types are in `model.rs`.
//! No `[[rate_limit]]` at all means the built-in `auth` limit ([`defaults::AUTH_PATHS`], POST, 10/minute,
//! burst 5); `rate_limit = []` means none; any list the user writes replaces the built-in one. The limiter
//! itself (governor, per client key) is the proxy's.

use std::time::Duration;

use crate::check::Checker;
use crate::cidr::Cidr;
use crate::defaults;
use crate::file::{self, S};
use crate::model::{PathMatch, PerAccount, Rate, RateKey, RateLimit};
use crate::routes::segment_like_prefix;

/// The limit that applies when the config has no `[[rate_limit]]`.
pub fn builtin() -> RateLimit {
    RateLimit {
        name: defaults::AUTH_LIMIT_NAME.to_owned(),
        paths: defaults::AUTH_PATHS.iter().map(|p| path_match(p)).collect(),
        methods: default_methods(),
        rate: Rate {
            count: defaults::AUTH_RATE.0,
            per: defaults::AUTH_RATE.1,
        },
        burst: defaults::AUTH_BURST,
        per_account: None,
        exempt: Vec::new(),
        ipv6_prefix: defaults::RATE_LIMIT_IPV6_PREFIX,
        max_keys: defaults::RATE_LIMIT_MAX_KEYS,
        key: defaults::RATE_LIMIT_KEY,
    }
}

fn default_methods() -> Vec<String> {
    defaults::RATE_LIMIT_METHODS
        .iter()
        .map(|m| (*m).to_owned())
        .collect()
}

fn path_match(p: &str) -> PathMatch {
    match p.strip_suffix('*') {
        Some(prefix) => PathMatch::Prefix(prefix.to_owned()),
        None => PathMatch::Exact(p.to_owned()),
    }
}

/// `"10/minute"`: a positive whole number, `/`, and second|minute|hour|day (or s|min|h|d).
pub fn parse_rate(text: &str) -> Result<Rate, String> {
    let bad =
        || format!("{text:?} is not a rate like \"10/minute\" (per second, minute, hour or day)");
    let (n, unit) = text.split_once('/').ok_or_else(bad)?;
    let count: u32 = n.trim().parse().map_err(|_| bad())?;
    if count == 0 {
        return Err(format!("{text:?}: the count must be more than zero"));
    }
    let per = match unit.trim() {
        "second" | "sec" | "s" => Duration::from_secs(1),
        "minute" | "min" | "m" => Duration::from_secs(60),
        "hour" | "h" => Duration::from_secs(3600),
        "day" | "d" => Duration::from_secs(86_400),
        _ => return Err(bad()),
    };
    Ok(Rate { count, per })
}

impl Checker<'_> {
    pub(crate) fn rate_limits(
        &mut self,
        limits: Option<Vec<S<file::RateLimit>>>,
    ) -> Vec<RateLimit> {
        let Some(limits) = limits else {
            return vec![builtin()];
        };
        let mut out: Vec<RateLimit> = Vec::with_capacity(limits.len());
        for (i, l) in limits.into_iter().enumerate() {
            let l = l.into_inner();
            let key = |k: &str| format!("rate_limit[{i}].{k}");
            let name = l.name.get_ref().clone();
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                self.problem(
                    l.name.span(),
                    key("name"),
                    format!("{name:?}: use letters, digits, '_' and '-'"),
                );
            } else if out.iter().any(|o| o.name == name) {
                self.problem(
                    l.name.span(),
                    key("name"),
                    format!("{name:?} is used twice"),
                );
            }
            let paths = self.rate_limit_paths(&key("paths"), l.paths);
            let methods = self.rate_limit_methods(&key("methods"), l.methods);
            let rate = self.rate(&key("rate"), &l.rate).unwrap_or(Rate {
                count: 1,
                per: Duration::from_secs(1),
            });
            let burst = self.burst(&key("burst"), l.burst, defaults::AUTH_BURST);
            let per_account = l.per_account.map(|p| {
                let p = p.into_inner();
                let field = p.field.get_ref().clone();
                if field.is_empty() {
                    self.problem(
                        p.field.span(),
                        key("per_account.field"),
                        "is empty: name the form or JSON field holding the account name",
                    );
                }
                PerAccount {
                    field,
                    rate: p
                        .rate
                        .and_then(|r| self.rate(&key("per_account.rate"), &r))
                        .unwrap_or(rate),
                    burst: self.burst(&key("per_account.burst"), p.burst, burst),
                }
            });
            let exempt = l
                .exempt
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .filter_map(|(j, s)| match s.get_ref().parse::<Cidr>() {
                    Ok(c) => Some(c),
                    Err(why) => {
                        self.problem(s.span(), key(&format!("exempt[{j}]")), why);
                        None
                    }
                })
                .collect();
            let ipv6_prefix = match l.ipv6_prefix {
                None => defaults::RATE_LIMIT_IPV6_PREFIX,
                Some(p) => match u8::try_from(*p.get_ref()) {
                    Ok(n @ 1..=128) => n,
                    _ => {
                        self.problem(p.span(), key("ipv6_prefix"), "must be from 1 to 128");
                        defaults::RATE_LIMIT_IPV6_PREFIX
                    }
                },
            };
            let max_keys = match l.max_keys {
                None => defaults::RATE_LIMIT_MAX_KEYS,
                Some(m) if *m.get_ref() < 100 => {
                    self.problem(m.span(), key("max_keys"), "must be at least 100");
                    defaults::RATE_LIMIT_MAX_KEYS
                }
                Some(m) => *m.get_ref(),
            };
            let client_key = match l.key {
                None => defaults::RATE_LIMIT_KEY,
                Some(k) => match k.get_ref().as_str() {
                    "client_addr" => RateKey::ClientAddr,
                    "client_cert" => RateKey::ClientCert,
                    other => {
                        self.problem(
                            k.span(),
                            key("key"),
                            format!("{other:?}: use \"client_addr\" or \"client_cert\""),
                        );
                        defaults::RATE_LIMIT_KEY
                    }
                },
            };
            out.push(RateLimit {
                name,
                paths,
                methods,
                rate,
                burst,
                per_account,
                exempt,
                ipv6_prefix,
                max_keys,
                key: client_key,
            });
        }
        out
    }

    fn rate_limit_paths(&mut self, key: &str, paths: S<Vec<S<String>>>) -> Vec<PathMatch> {
        let span = paths.span();
        let paths = paths.into_inner();
        if paths.is_empty() {
            self.problem(
                span,
                key,
                "is empty: list at least one path (\"/login\", or a prefix \"/api/token/*\")",
            );
        }
        let mut out = Vec::with_capacity(paths.len());
        for (i, p) in paths.into_iter().enumerate() {
            let text = p.get_ref();
            let body = text.strip_suffix('*').unwrap_or(text);
            if !text.starts_with('/') || body.contains('*') {
                self.problem(
                    p.span(),
                    format!("{key}[{i}]"),
                    format!("{text:?}: a path starts with '/'; '*' may only end it (a prefix)"),
                );
                continue;
            }
            if let Some(prefix) = text.strip_suffix('*')
                && segment_like_prefix(prefix)
            {
                self.warning(
                    p.span(),
                    format!("{key}[{i}]"),
                    format!(
                        "{text:?} also counts every path that starts with {prefix:?}, like {:?}: write \
                         \"{prefix}/*\" (and \"{prefix}\" for the path itself) to count only {prefix} and below",
                        format!("{prefix}-old")
                    ),
                );
            }
            out.push(path_match(text));
        }
        out
    }

    fn rate_limit_methods(&mut self, key: &str, methods: Option<S<Vec<S<String>>>>) -> Vec<String> {
        let Some(methods) = methods else {
            return default_methods();
        };
        let span = methods.span();
        let methods = methods.into_inner();
        if methods.is_empty() {
            self.problem(
                span,
                key,
                "is empty: list the methods to count, like [\"POST\"]",
            );
        }
        let mut out = Vec::with_capacity(methods.len());
        for (i, m) in methods.into_iter().enumerate() {
            let upper = m.get_ref().to_ascii_uppercase();
            if upper.is_empty()
                || upper.len() > 16
                || !upper.bytes().all(|b| b.is_ascii_uppercase())
            {
                self.problem(
                    m.span(),
                    format!("{key}[{i}]"),
                    format!("{:?} is not an HTTP method", m.get_ref()),
                );
            } else if !out.contains(&upper) {
                out.push(upper);
            }
        }
        out
    }

    fn rate(&mut self, key: &str, r: &S<String>) -> Option<Rate> {
        match parse_rate(r.get_ref()) {
            Ok(rate) => Some(rate),
            Err(why) => {
                self.problem(r.span(), key, why);
                None
            }
        }
    }

    fn burst(&mut self, key: &str, b: Option<S<u64>>, default: u32) -> u32 {
        let Some(b) = b else { return default };
        match u32::try_from(*b.get_ref()) {
            Ok(n @ 1..=1_000_000) => n,
            _ => {
                self.problem(b.span(), key, "must be from 1 to 1000000");
                default
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{parse, problems};

    const BASE: &str = "[tls]\nself_signed = true\n[[route]]\npath = \"/\"\nupstream = \"app\"\n[upstream.app]\nservers = [\"127.0.0.1:8000\"]\n";

    /// The `[[rate_limit]]` block docs/RATE_LIMIT.md shows as the built-in limit.
    fn documented_builtin() -> &'static str {
        let doc = include_str!("../../docs/RATE_LIMIT.md");
        let section = &doc[doc.find("## The built-in `auth` limit").unwrap()..];
        let start = section.find("```toml\n").unwrap() + "```toml\n".len();
        let len = section[start..].find("```").unwrap();
        &section[start..start + len]
    }

    /// No `[[rate_limit]]`: the built-in limit, which is what docs/RATE_LIMIT.md says it is (written in the
    /// file, that block parses to the same limit, with no warning); users are told to copy it.
    #[test]
    fn no_rate_limit_means_the_builtin_auth_limit() {
        let c = parse(BASE).unwrap();
        let documented = parse(&format!("{BASE}\n{}", documented_builtin())).unwrap();
        assert_eq!(documented.rate_limits.len(), 1);
        assert_eq!(c.rate_limits, documented.rate_limits);
        assert!(documented.warnings.is_empty(), "{:?}", documented.warnings);
        let auth = &c.rate_limits[0];
        assert_eq!(auth.name, "auth");
        assert_eq!(auth.methods, ["POST"]);
        assert_eq!(
            auth.rate,
            Rate {
                count: 10,
                per: Duration::from_secs(60)
            }
        );
        assert_eq!(auth.burst, 5);
        assert!(auth.paths.iter().any(|p| p.matches("/accounts/login/")));
        assert!(auth.paths.iter().any(|p| p.matches("/api/token/refresh/")));
        assert!(auth.paths.iter().any(|p| p.matches("/api/token")));
        assert!(!auth.paths.iter().any(|p| p.matches("/")));
    }

    /// Issue 10 (Also): a `*` right after a segment (`"/api*"`) also counts `/apiary`; `check` says so. Exact
    /// paths match one path only and never warn; the built-in paths do not warn.
    #[test]
    fn a_star_after_a_segment_warns_and_exact_paths_do_not() {
        let text = format!(
            "{BASE}\n[[rate_limit]]\nname = \"x\"\npaths = [\"/login\", \"/api*\", \"/api/*\", \"/robots.txt*\", \"/*\"]\nrate = \"1/s\"\n"
        );
        let c = parse(&text).unwrap();
        let w: Vec<String> = c.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains(":11:20:")
                && w[0].contains(": rate_limit[0].paths[1]: ")
                && w[0].contains("\"/api/*\""),
            "{w:?}"
        );
        assert!(c.rate_limits[0].paths[1].matches("/apiary"));
        for p in defaults::AUTH_PATHS {
            let warns = p.strip_suffix('*').is_some_and(segment_like_prefix);
            assert!(!warns, "built-in {p}");
        }
    }

    #[test]
    fn an_empty_list_turns_it_off_and_a_written_one_replaces_it() {
        let off = parse(&format!("rate_limit = []\n{BASE}")).unwrap();
        assert!(off.rate_limits.is_empty());
        let text = format!(
            "{BASE}\n[[rate_limit]]\nname = \"login\"\npaths = [\"/login\", \"/api/token/*\"]\nmethods = [\"post\", \"PUT\"]\nrate = \"30/hour\"\nburst = 3\nper_account = {{ field = \"username\", rate = \"5/minute\" }}\nexempt = [\"10.0.0.0/8\"]\nipv6_prefix = 56\nmax_keys = 1000\n"
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.rate_limits.len(), 1);
        let l = &c.rate_limits[0];
        assert_eq!(l.name, "login");
        assert_eq!(
            l.paths,
            [
                PathMatch::Exact("/login".into()),
                PathMatch::Prefix("/api/token/".into())
            ]
        );
        assert_eq!(l.methods, ["POST", "PUT"]);
        assert_eq!(
            l.rate,
            Rate {
                count: 30,
                per: Duration::from_secs(3600)
            }
        );
        assert_eq!(l.rate.interval(), Duration::from_secs(120));
        assert_eq!(
            l.per_account,
            Some(PerAccount {
                field: "username".into(),
                rate: Rate {
                    count: 5,
                    per: Duration::from_secs(60)
                },
                burst: 3
            })
        );
        assert_eq!(l.exempt, ["10.0.0.0/8".parse::<Cidr>().unwrap()]);
        assert_eq!((l.ipv6_prefix, l.max_keys), (56, 1000));
    }

    #[test]
    fn mistakes_are_named_with_their_line() {
        let text = format!(
            "{BASE}\n[[rate_limit]]\nname = \"a b\"\npaths = [\"login\", \"/a*b\"]\nmethods = [\"P0ST\"]\nrate = \"10/fortnight\"\nburst = 0\nipv6_prefix = 129\nexempt = [\"nope\"]\n"
        );
        let p = problems(&text);
        for k in [
            "rate_limit[0].name",
            "rate_limit[0].paths[0]",
            "rate_limit[0].paths[1]",
            "rate_limit[0].methods[0]",
            "rate_limit[0].rate",
            "rate_limit[0].burst",
            "rate_limit[0].ipv6_prefix",
            "rate_limit[0].exempt[0]",
        ] {
            assert!(
                p.iter().any(|l| l.contains(&format!(": {k}: "))),
                "{k} not in {p:?}"
            );
        }
        assert!(
            p.iter()
                .any(|l| l.contains(":10:") && l.contains("rate_limit[0].name")),
            "{p:?}"
        );
        let p = problems(&format!(
            "{BASE}\n[[rate_limit]]\nname = \"x\"\npaths = [\"/x\"]\nrate = \"1/s\"\nlimit = 3\n"
        ));
        assert!(
            p.iter()
                .any(|l| l.contains("limit") && l.contains("unknown field")),
            "{p:?}"
        );
        let p = problems(&format!(
            "{BASE}\n[[rate_limit]]\nname = \"x\"\npaths = [\"/x\"]\n"
        ));
        assert!(p.iter().any(|l| l.contains("rate")), "{p:?}");
    }

    #[test]
    fn rates() {
        assert_eq!(
            parse_rate("10/minute").unwrap().interval(),
            Duration::from_secs(6)
        );
        assert_eq!(
            parse_rate("4/s").unwrap().interval(),
            Duration::from_millis(250)
        );
        assert_eq!(
            parse_rate(" 2 / day ").unwrap().per,
            Duration::from_secs(86_400)
        );
        assert!(parse_rate("0/minute").is_err());
        assert!(parse_rate("10").is_err());
        assert!(parse_rate("-1/h").is_err());
    }
}
