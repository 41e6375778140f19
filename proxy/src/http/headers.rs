//! Security headers (OWASP Secure Headers; HSTS per RFC 6797, never on plain HTTP), prepared once at config
//! load as ready `HeaderValue`s, and the upstream headers that leak versions (`Server`, `X-Powered-By`).

use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};
use portcullis_config as config;

#[derive(Debug)]
struct Rule {
    name: HeaderName,
    value: HeaderValue,
    force: bool,
    https_only: bool,
}

/// The security headers to add to every response, built from the config.
#[derive(Debug)]
pub struct SecurityHeaders {
    rules: Vec<Rule>,
}

impl SecurityHeaders {
    pub fn new(cfg: &config::SecurityHeaders) -> SecurityHeaders {
        let all = [
            (
                header::STRICT_TRANSPORT_SECURITY,
                &cfg.strict_transport_security,
                true,
            ),
            (header::X_FRAME_OPTIONS, &cfg.x_frame_options, false),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                &cfg.x_content_type_options,
                false,
            ),
            (header::REFERRER_POLICY, &cfg.referrer_policy, false),
        ];
        let rules = all
            .into_iter()
            .filter_map(|(name, rule, https_only)| {
                let rule = rule.as_ref()?;
                // The config crate checked the value is visible ASCII, so this only drops what it refused.
                let value = HeaderValue::from_str(&rule.value).ok()?;
                Some(Rule {
                    name,
                    value,
                    force: rule.force,
                    https_only,
                })
            })
            .collect();
        SecurityHeaders { rules }
    }

    /// Adds each header unless the app set its own (or replaces it, where the config forces it).
    pub fn apply(&self, headers: &mut HeaderMap, https: bool) {
        for r in &self.rules {
            if r.https_only && !https {
                continue;
            }
            if r.force || !headers.contains_key(&r.name) {
                headers.insert(r.name.clone(), r.value.clone());
            }
        }
    }
}

/// Removes the upstream's software and version banners.
pub fn strip_banners(headers: &mut HeaderMap) {
    headers.remove(header::SERVER);
    headers.remove(HeaderName::from_static("x-powered-by"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> config::SecurityHeaders {
        config::Config::parse(
            std::path::Path::new("t.toml"),
            "[tls]\nself_signed = true\n[[route]]\npath = \"/\"\nupstream = \"a\"\n[upstream.a]\nservers = [\"127.0.0.1:1\"]\n[headers]\nreferrer_policy = \"no-referrer\"\nforce = [\"referrer_policy\"]\n",
        )
        .unwrap()
        .headers
    }

    #[test]
    fn app_values_win_unless_forced_and_hsts_is_https_only() {
        let h = SecurityHeaders::new(&cfg());
        let mut m = HeaderMap::new();
        m.insert(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("SAMEORIGIN"),
        );
        m.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("unsafe-url"),
        );
        h.apply(&mut m, false);
        assert_eq!(m[header::X_FRAME_OPTIONS], "SAMEORIGIN");
        assert_eq!(m[header::REFERRER_POLICY], "no-referrer");
        assert_eq!(m[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert!(!m.contains_key(header::STRICT_TRANSPORT_SECURITY));
        h.apply(&mut m, true);
        assert_eq!(
            m[header::STRICT_TRANSPORT_SECURITY],
            "max-age=63072000; includeSubDomains"
        );
    }
}
