//! `[acme]`: the CA, account contact, state folder, challenge type, EAB and renewal settings for the sites
//! with `acme = true`, checked against those sites (host names, no wildcards, IP names need http-01) and
//! the listeners (each challenge needs its listener). The ACME client is in `certs`, its task in `proxy`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::check::Checker;
use crate::file::{self, S};
use crate::model::{Acme, AcmeChallenge, AcmePaths, CertSource, Eab, Listen, Site};
use crate::{defaults, duration};

impl Checker<'_> {
    /// `[acme]` and the sites that use it. `first_site` is the index of `[[site]]` 0 in `sites`.
    /// The folders the section names, as the checked `[acme]` would have them.
    pub(crate) fn acme_paths(&self, a: &file::Acme) -> AcmePaths {
        AcmePaths {
            state_dir: a.state_dir.as_ref().map_or_else(
                || PathBuf::from(defaults::ACME_STATE_DIR),
                |d| self.resolve(d.get_ref()),
            ),
            ca_root: a.ca_root.as_ref().map(|p| self.resolve(p.get_ref())),
            directory: a.directory.as_ref().map(|d| d.get_ref().clone()),
            validation_port: a.validation_port.as_ref().map(|p| *p.get_ref()),
        }
    }

    pub(crate) fn acme(
        &mut self,
        a: Option<S<file::Acme>>,
        sites: &[Site],
        first_site: usize,
        listen: &Listen,
    ) -> Option<Acme> {
        let users: Vec<usize> = (0..sites.len())
            .filter(|i| matches!(sites[*i].tls, CertSource::Acme { .. }))
            .collect();
        let (span, a) = match a {
            Some(a) => (a.span(), a.into_inner()),
            None if users.is_empty() => return None,
            None => (
                0..0,
                file::Acme {
                    email: None,
                    directory: None,
                    state_dir: None,
                    challenge: None,
                    ca_root: None,
                    eab: None,
                    renew_before: None,
                    self_check: None,
                    validation_port: None,
                },
            ),
        };
        if users.is_empty() {
            self.warning(
                span,
                "acme",
                "no site has `acme = true`: this section is not used",
            );
            return None;
        }
        for &i in &users {
            let key = if i < first_site {
                "names".to_owned()
            } else {
                format!("site[{}].names", i - first_site)
            };
            if sites[i].names.is_empty() {
                self.problem(0..0, key.clone(), "an `acme = true` site needs its host names: they are what the certificate is for");
            }
            for n in sites[i].names.iter().filter(|n| n.starts_with("*.")) {
                self.problem(0..0, key.clone(), format!("{n:?}: wildcard names need the DNS-01 challenge, which Portcullis does not do"));
            }
        }
        let email = a.email.and_then(|e| {
            let ok = e.get_ref().contains('@')
                && !e
                    .get_ref()
                    .contains(|c: char| c.is_whitespace() || c == ',' || c == '<' || c == '>');
            if !ok {
                self.problem(
                    e.span(),
                    "acme.email",
                    format!("{:?} is not an email address", e.get_ref()),
                );
            }
            ok.then(|| e.into_inner())
        });
        let directory = match a.directory {
            None => defaults::ACME_DIRECTORY.to_owned(),
            Some(d) => match d.get_ref().as_str() {
                "letsencrypt" => defaults::ACME_DIRECTORY.to_owned(),
                "letsencrypt-staging" => defaults::ACME_DIRECTORY_STAGING.to_owned(),
                url if url.starts_with("https://")
                    && url.len() > "https://".len()
                    && !url.contains(char::is_whitespace) =>
                {
                    url.to_owned()
                }
                other => {
                    self.problem(d.span(), "acme.directory", format!("{other:?}: give the CA's https:// directory URL, \"letsencrypt\" or \"letsencrypt-staging\""));
                    defaults::ACME_DIRECTORY.to_owned()
                }
            },
        };
        let state_dir = a.state_dir.map_or_else(
            || PathBuf::from(defaults::ACME_STATE_DIR),
            |d| self.resolve(d.get_ref()),
        );
        let default_challenge = if listen.http.is_empty() {
            AcmeChallenge::TlsAlpn01
        } else {
            AcmeChallenge::Http01
        };
        let challenge = match a.challenge {
            None => default_challenge,
            Some(c) => match c.get_ref().as_str() {
                "http-01" if listen.http.is_empty() => {
                    self.problem(c.span(), "acme.challenge", "http-01 needs the plain-HTTP listener (listen.http): use \"tls-alpn-01\" or add it");
                    AcmeChallenge::Http01
                }
                "http-01" => AcmeChallenge::Http01,
                "tls-alpn-01" if listen.https.is_empty() => {
                    self.problem(
                        c.span(),
                        "acme.challenge",
                        "tls-alpn-01 needs the HTTPS listener (listen.https)",
                    );
                    AcmeChallenge::TlsAlpn01
                }
                "tls-alpn-01" => AcmeChallenge::TlsAlpn01,
                other => {
                    self.problem(
                        c.span(),
                        "acme.challenge",
                        format!("{other:?}: use \"http-01\" or \"tls-alpn-01\""),
                    );
                    default_challenge
                }
            },
        };
        if challenge == AcmeChallenge::TlsAlpn01 {
            for &i in &users {
                for n in sites[i]
                    .names
                    .iter()
                    .filter(|n| n.parse::<IpAddr>().is_ok())
                {
                    self.problem(
                        0..0,
                        "acme.challenge",
                        format!("{n:?}: an IP address needs the http-01 challenge"),
                    );
                }
            }
        }
        let ca_root = a.ca_root.map(|p| self.resolve(p.get_ref()));
        let eab = a.eab.map(|e| {
            let e = e.into_inner();
            if e.kid.get_ref().is_empty() {
                self.problem(e.kid.span(), "acme.eab.kid", "is empty");
            }
            let key = e.hmac_key.get_ref();
            if key.is_empty()
                || !key
                    .trim_end_matches('=')
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                self.problem(
                    e.hmac_key.span(),
                    "acme.eab.hmac_key",
                    "must be the base64url key the CA gave",
                );
            }
            Eab {
                kid: e.kid.into_inner(),
                hmac_key: e.hmac_key.into_inner(),
            }
        });
        let renew_before = a.renew_before.and_then(|r| {
            let text = r.get_ref().trim();
            let parsed = match text.strip_suffix('d').map(str::trim).map(str::parse::<u64>) {
                Some(Ok(days)) if days > 0 => Ok(Duration::from_secs(days.saturating_mul(86_400))),
                Some(_) => Err(format!("{text:?} is not a number of days like \"30d\"")),
                None => duration::parse(text),
            };
            match parsed {
                Ok(d) => Some(d),
                Err(why) => {
                    self.problem(r.span(), "acme.renew_before", why);
                    None
                }
            }
        });
        let validation_port = a.validation_port.and_then(|p| {
            if *p.get_ref() == 0 {
                self.problem(
                    p.span(),
                    "acme.validation_port",
                    "must be a port number, 1-65535",
                );
                None
            } else {
                Some(*p.get_ref())
            }
        });
        Some(Acme {
            email,
            directory,
            state_dir,
            challenge,
            ca_root,
            eab,
            renew_before,
            self_check: a
                .self_check
                .map_or(defaults::ACME_SELF_CHECK, |s| *s.get_ref()),
            validation_port,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use crate::defaults;
    use crate::model::{AcmeChallenge, CertSource};
    use crate::testing::{EXAMPLE, parse, problems};

    #[test]
    fn acme_sites_and_the_acme_section() {
        let text = format!(
            "{EXAMPLE}\n[[site]]\nnames = [\"a.example.com\", \"b.example.com\"]\ntls = {{ acme = true }}\n[[site.route]]\npath = \"/\"\nupstream = \"app\"\n[acme]\nemail = \"ops@example.com\"\ndirectory = \"letsencrypt-staging\"\nstate_dir = \"acme\"\nrenew_before = \"30d\"\n"
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.sites[1].tls, CertSource::Acme { files: None });
        let a = c.acme.unwrap();
        assert_eq!(a.directory, defaults::ACME_DIRECTORY_STAGING);
        assert_eq!(a.state_dir, PathBuf::from("/etc/portcullis/acme"));
        assert_eq!(a.challenge, AcmeChallenge::Http01);
        assert_eq!(a.renew_before, Some(Duration::from_secs(30 * 86_400)));
        assert!(a.self_check && a.eab.is_none() && a.ca_root.is_none());

        let bad = text
            .replace("\"b.example.com\"", "\"*.example.com\"")
            .replace(
                "renew_before = \"30d\"",
                "challenge = \"dns-01\"\neab = { kid = \"k\", hmac_key = \"not base64!\" }",
            );
        let p = problems(&bad);
        assert!(
            p.iter()
                .any(|l| l.contains("site[0].names") && l.contains("DNS-01")),
            "{p:?}"
        );
        assert!(p.iter().any(|l| l.contains("acme.challenge")), "{p:?}");
        assert!(p.iter().any(|l| l.contains("acme.eab.hmac_key")), "{p:?}");

        // The top-level [tls]: its files serve until the first certificate; no [acme] means the defaults.
        let top = EXAMPLE.replace(
            "key  = \"/etc/portcullis/privkey.pem\"",
            "key  = \"/etc/portcullis/privkey.pem\"\nacme = true",
        );
        let c = parse(&top).unwrap();
        assert!(matches!(
            &c.sites[0].tls,
            CertSource::Acme { files: Some(_) }
        ));
        assert_eq!(c.acme.unwrap().directory, defaults::ACME_DIRECTORY);
        let no_http = top.replace("http  = [\"127.0.0.1:8080\"]", "http = []");
        assert_eq!(
            parse(&no_http).unwrap().acme.unwrap().challenge,
            AcmeChallenge::TlsAlpn01
        );
        assert!(
            problems(&format!("{no_http}\n[acme]\nchallenge = \"http-01\"\n"))[0]
                .contains("acme.challenge")
        );
    }
}
