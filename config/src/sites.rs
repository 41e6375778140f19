//! Sites: the top-level `names` + `[tls]` (the default site) and each `[[site]]` with its names, its
//! certificate source (files, self-signed, or ACME) and its routes; host names checked (RFC 1123) and
//! distinct across sites; `tls.min_version`, which every site shares.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::ops::Range;

use crate::check::Checker;
use crate::defaults;
use crate::file::{self, S};
use crate::model::{CertSource, ClientAuth, ClientAuthMode, CrlExpired, Site, Tls, TlsVersion};

impl Checker<'_> {
    pub(crate) fn names(&mut self, names: Option<S<Vec<S<String>>>>) -> Vec<String> {
        match names {
            None => Vec::new(),
            Some(n) => self.host_names("names", n),
        }
    }

    fn host_names(&mut self, key: &str, names: S<Vec<S<String>>>) -> Vec<String> {
        let span = names.span();
        let names = names.into_inner();
        if names.is_empty() {
            self.problem(span, key, "is empty: list the host names served");
        }
        let mut out = Vec::with_capacity(names.len());
        for (i, n) in names.into_iter().enumerate() {
            let lower = n.get_ref().trim_end_matches('.').to_ascii_lowercase();
            if valid_host_name(&lower) {
                out.push(lower);
            } else {
                self.problem(
                    n.span(),
                    format!("{key}[{i}]"),
                    format!("{:?} is not a host name", n.get_ref()),
                );
            }
        }
        out
    }

    pub(crate) fn site(
        &mut self,
        i: usize,
        s: S<file::Site>,
        ups: &BTreeMap<String, S<file::Upstream>>,
        default_body: u64,
    ) -> Site {
        let s = s.into_inner();
        let names = self.host_names(&format!("site[{i}].names"), s.names);
        let tls_span = s.tls.span();
        let t = s.tls.into_inner();
        if let Some(v) = &t.min_version {
            self.problem(
                v.span(),
                format!("site[{i}].tls.min_version"),
                "is set once, in the top-level [tls]",
            );
        }
        let self_signed = t.self_signed.as_ref().is_some_and(|s| *s.get_ref());
        let acme = t.acme.as_ref().is_some_and(|s| *s.get_ref());
        let tls = match (t.cert, t.key, self_signed) {
            (cert, key, false) if acme => {
                self.acme_source(&format!("site[{i}].tls"), tls_span, cert, key)
            }
            (Some(cert), Some(key), false) => CertSource::Files {
                cert: self.resolve(cert.get_ref()),
                key: self.resolve(key.get_ref()),
            },
            (None, None, true) if !acme => CertSource::SelfSigned,
            _ => {
                self.problem(
                    tls_span,
                    format!("site[{i}].tls"),
                    "give `cert` and `key`, `self_signed = true`, or `acme = true`",
                );
                CertSource::SelfSigned
            }
        };
        let client_auth = s
            .client_auth
            .map(|c| self.client_auth(&format!("site[{i}].client_auth"), c));
        let routes = self.routes(
            &format!("site[{i}].route"),
            s.route,
            ups,
            default_body,
            client_auth.is_some(),
        );
        Site {
            names,
            tls,
            routes,
            client_auth,
        }
    }

    /// `client_auth = { ca, crl, mode, crl_expired, forward_cert }`: paths resolved against the config's
    /// folder, the words checked. The files themselves are read by the proxy (at start and on change).
    fn client_auth(&mut self, key: &str, c: S<file::ClientAuth>) -> ClientAuth {
        let c = c.into_inner();
        let mode = match c.mode {
            None => defaults::CLIENT_AUTH_MODE,
            Some(m) => match m.get_ref().as_str() {
                "optional" => ClientAuthMode::Optional,
                "required" => ClientAuthMode::Required,
                other => {
                    self.problem(
                        m.span(),
                        format!("{key}.mode"),
                        format!("{other:?}: use \"optional\" or \"required\""),
                    );
                    defaults::CLIENT_AUTH_MODE
                }
            },
        };
        let crl_expired = match c.crl_expired {
            None => defaults::CRL_EXPIRED,
            Some(m) => match m.get_ref().as_str() {
                "warn" => CrlExpired::Warn,
                "refuse" => CrlExpired::Refuse,
                other => {
                    self.problem(
                        m.span(),
                        format!("{key}.crl_expired"),
                        format!("{other:?}: use \"warn\" or \"refuse\""),
                    );
                    defaults::CRL_EXPIRED
                }
            },
        };
        if c.crl.is_none() && crl_expired == CrlExpired::Refuse {
            self.warning(
                c.ca.span(),
                format!("{key}.crl_expired"),
                "has no effect without `crl` (a folder of CRLs)",
            );
        }
        if c.ca.get_ref().is_empty() {
            self.problem(
                c.ca.span(),
                format!("{key}.ca"),
                "is empty: give the CA bundle's path",
            );
        }
        ClientAuth {
            ca: self.resolve(c.ca.get_ref()),
            crl: c.crl.map(|p| self.resolve(p.get_ref())),
            mode,
            crl_expired,
            forward_cert: c.forward_cert.map_or(defaults::FORWARD_CERT, S::into_inner),
        }
    }

    /// A host name may belong to one site only, or SNI and Host could not pick one.
    pub(crate) fn distinct_site_names(&mut self, sites: &[Site]) {
        let mut seen: Vec<&str> = Vec::new();
        for s in sites {
            for n in &s.names {
                if seen.contains(&n.as_str()) {
                    self.problem(0..0, "site", format!("{n:?} is named by two sites"));
                }
                seen.push(n);
            }
        }
    }

    /// The default site's certificate source, and the settings every site shares.
    pub(crate) fn tls(&mut self, t: Option<S<file::Tls>>, need_source: bool) -> (CertSource, Tls) {
        if !need_source {
            // Only [[site]]s: the top-level [tls] may still set min_version, and nothing else.
            let min_version = match t.map(S::into_inner) {
                Some(t) => {
                    for (k, v) in [
                        ("cert", t.cert.map(|s| s.span())),
                        ("key", t.key.map(|s| s.span())),
                        ("self_signed", t.self_signed.map(|s| s.span())),
                        ("acme", t.acme.map(|s| s.span())),
                    ] {
                        if let Some(span) = v {
                            self.problem(
                                span,
                                format!("tls.{k}"),
                                "only with top-level [[route]]s: each [[site]] has its own tls",
                            );
                        }
                    }
                    self.min_version(t.min_version)
                }
                None => defaults::TLS_MIN_VERSION,
            };
            return (CertSource::SelfSigned, Tls { min_version });
        }
        let Some(t) = t else {
            self.problem(
                0..0,
                "tls",
                "missing: give `cert` and `key` files, or `self_signed = true`",
            );
            return (
                CertSource::SelfSigned,
                Tls {
                    min_version: defaults::TLS_MIN_VERSION,
                },
            );
        };
        let span = t.span();
        let t = t.into_inner();
        let self_signed = t.self_signed.as_ref().is_some_and(|s| *s.get_ref());
        let acme = t.acme.as_ref().is_some_and(|s| *s.get_ref());
        let source = match (t.cert, t.key, self_signed) {
            (cert, key, false) if acme => self.acme_source("tls", span.clone(), cert, key),
            (_, _, true) if acme => {
                self.problem(
                    span.clone(),
                    "tls.acme",
                    "give either `acme = true` or `self_signed = true`, not both",
                );
                CertSource::SelfSigned
            }
            (Some(cert), Some(key), false) => CertSource::Files {
                cert: self.resolve(cert.get_ref()),
                key: self.resolve(key.get_ref()),
            },
            (None, None, true) => CertSource::SelfSigned,
            (Some(c), _, true) => {
                self.problem(
                    c.span(),
                    "tls.cert",
                    "give either `cert` and `key`, or `self_signed = true`, not both",
                );
                CertSource::SelfSigned
            }
            (_, Some(k), true) => {
                self.problem(
                    k.span(),
                    "tls.key",
                    "give either `cert` and `key`, or `self_signed = true`, not both",
                );
                CertSource::SelfSigned
            }
            (Some(_), None, false) => {
                self.problem(
                    span,
                    "tls.key",
                    "missing: `cert` needs its private key file",
                );
                CertSource::SelfSigned
            }
            (None, Some(_), false) => {
                self.problem(
                    span,
                    "tls.cert",
                    "missing: `key` needs its certificate chain file",
                );
                CertSource::SelfSigned
            }
            (None, None, false) => {
                self.problem(
                    span,
                    "tls",
                    "give `cert` and `key` files, or `self_signed = true`",
                );
                CertSource::SelfSigned
            }
        };
        let min_version = self.min_version(t.min_version);
        (source, Tls { min_version })
    }

    /// `acme = true`, with the `cert`/`key` files served until the first certificate when both are given.
    fn acme_source(
        &mut self,
        key: &str,
        span: Range<usize>,
        cert: Option<S<String>>,
        k: Option<S<String>>,
    ) -> CertSource {
        match (cert, k) {
            (Some(c), Some(k)) => CertSource::Acme {
                files: Some((self.resolve(c.get_ref()), self.resolve(k.get_ref()))),
            },
            (None, None) => CertSource::Acme { files: None },
            _ => {
                self.problem(span, key, "with `acme = true`, give both `cert` and `key` (served until the first certificate) or neither");
                CertSource::Acme { files: None }
            }
        }
    }

    fn min_version(&mut self, v: Option<S<String>>) -> TlsVersion {
        match v {
            None => defaults::TLS_MIN_VERSION,
            Some(v) => match v.get_ref().as_str() {
                "1.2" => TlsVersion::Tls12,
                "1.3" => TlsVersion::Tls13,
                other => {
                    self.problem(
                        v.span(),
                        "tls.min_version",
                        format!("{other:?}: use \"1.2\" or \"1.3\""),
                    );
                    defaults::TLS_MIN_VERSION
                }
            },
        }
    }
}

/// RFC 1123 host name, lower-case, optionally a leading `*.` wildcard label.
fn valid_host_name(n: &str) -> bool {
    let n = n.strip_prefix("*.").unwrap_or(n);
    if n.parse::<IpAddr>().is_ok() {
        return true;
    }
    !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use crate::model::{Action, CertSource, ClientAuthMode, CrlExpired, TlsVersion};
    use crate::testing::{EXAMPLE, parse, problems};

    #[test]
    fn sites_add_to_the_default_site_or_stand_alone() {
        let text = format!(
            "{EXAMPLE}\n[[site]]\nnames = [\"app.example.com\", \"*.example.com\"]\ntls = {{ self_signed = true }}\n  [[site.route]]\n  path = \"/\"\n  upstream = \"app\"\n"
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.sites.len(), 2);
        assert_eq!(c.sites[0].names, ["localhost"]);
        assert_eq!(c.sites[1].names, ["app.example.com", "*.example.com"]);
        assert_eq!(c.sites[1].tls, CertSource::SelfSigned);
        assert_eq!(c.sites[1].route("/x").unwrap().action, Action::Upstream(0));

        let only = "[[site]]\nnames = [\"a.test\"]\ntls = { cert = \"a.pem\", key = \"a.key\" }\n[[site.route]]\npath = \"/\"\nupstream = \"app\"\n[upstream.app]\nservers = [\"127.0.0.1:1\"]\n[tls]\nmin_version = \"1.3\"\n";
        let c = parse(only).unwrap();
        assert_eq!(c.sites.len(), 1);
        assert_eq!(c.tls.min_version, TlsVersion::Tls13);
        assert_eq!(
            c.sites[0].tls,
            CertSource::Files {
                cert: "/etc/portcullis/a.pem".into(),
                key: "/etc/portcullis/a.key".into()
            }
        );

        let dup = format!(
            "{EXAMPLE}\n[[site]]\nnames = [\"localhost\"]\ntls = {{ self_signed = true }}\n[[site.route]]\npath = \"/\"\nupstream = \"nope\"\n"
        );
        let p = problems(&dup);
        assert!(
            p.iter()
                .any(|l| l.contains("site: \"localhost\" is named by two sites")),
            "{p:?}"
        );
        assert!(
            p.iter().any(|l| l.contains("site[0].route[0].upstream")),
            "{p:?}"
        );
    }

    #[test]
    fn client_auth_is_checked_and_a_route_that_requires_it_needs_it() {
        let site = |ca: &str, route: &str| {
            format!(
                "{EXAMPLE}\n[[site]]\nnames = [\"app.test\"]\ntls = {{ self_signed = true }}\n{ca}\n  [[site.route]]\n  path = \"/admin/\"\n  upstream = \"app\"\n  {route}\n"
            )
        };
        let c = parse(&site(
            "client_auth = { ca = \"ca.pem\", crl = \"crl/\", mode = \"required\", crl_expired = \"refuse\", forward_cert = true }",
            "require_client_cert = true",
        ))
        .unwrap();
        let a = c.sites[1].client_auth.as_ref().unwrap();
        assert_eq!(a.ca, std::path::Path::new("/etc/portcullis/ca.pem"));
        assert_eq!(
            a.crl.as_deref(),
            Some(std::path::Path::new("/etc/portcullis/crl/"))
        );
        assert_eq!(a.mode, ClientAuthMode::Required);
        assert_eq!(a.crl_expired, CrlExpired::Refuse);
        assert!(a.forward_cert);
        assert!(c.sites[1].routes[0].require_client_cert);
        assert!(c.sites[0].client_auth.is_none());

        let d = parse(&site("client_auth = { ca = \"ca.pem\" }", "")).unwrap();
        let a = d.sites[1].client_auth.as_ref().unwrap();
        assert_eq!(
            (a.mode, a.crl_expired, a.forward_cert, a.crl.as_ref()),
            (ClientAuthMode::Optional, CrlExpired::Warn, false, None)
        );
        assert!(!d.sites[1].routes[0].require_client_cert);

        let p = problems(&site("", "require_client_cert = true"));
        assert!(
            p.iter().any(|l| l.contains(":26:25:")
                && l.contains(
                    "site[0].route[0].require_client_cert: the site has no `client_auth`"
                )),
            "{p:?}"
        );
        let p = problems(&site(
            "client_auth = { ca = \"ca.pem\", mode = \"sometimes\", crl_expired = \"ignore\" }",
            "",
        ));
        assert!(
            p.iter()
                .any(|l| l.contains("site[0].client_auth.mode: \"sometimes\"")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|l| l.contains("site[0].client_auth.crl_expired: \"ignore\"")),
            "{p:?}"
        );
        let p = problems(&site("client_auth = { mode = \"required\" }", ""));
        assert!(p.iter().any(|l| l.contains("ca")), "{p:?}");
    }
}
