//! `[headers]`: the security headers added to every response, each with its value (or off) and whether it
//! replaces the app's own value (`force`). Applying them is the proxy's.

use crate::check::Checker;
use crate::defaults;
use crate::file::{self, S};
use crate::model::{HeaderRule, SecurityHeaders};

impl Checker<'_> {
    pub(crate) fn headers(&mut self, h: Option<file::Headers>) -> SecurityHeaders {
        const KEYS: [&str; 4] = [
            "strict_transport_security",
            "x_frame_options",
            "x_content_type_options",
            "referrer_policy",
        ];
        let h = h.unwrap_or(file::Headers {
            strict_transport_security: None,
            x_frame_options: None,
            x_content_type_options: None,
            referrer_policy: None,
            force: None,
        });
        let mut forced = [false; 4];
        for (i, f) in h.force.unwrap_or_default().into_iter().enumerate() {
            match KEYS.iter().position(|k| k == f.get_ref()) {
                Some(k) => forced[k] = true,
                None => self.problem(
                    f.span(),
                    format!("headers.force[{i}]"),
                    format!("{:?} is not one of {}", f.get_ref(), KEYS.join(", ")),
                ),
            }
        }
        SecurityHeaders {
            strict_transport_security: self.header(
                KEYS[0],
                h.strict_transport_security,
                defaults::HSTS,
                forced[0],
            ),
            x_frame_options: self.header(
                KEYS[1],
                h.x_frame_options,
                defaults::X_FRAME_OPTIONS,
                forced[1],
            ),
            x_content_type_options: self.header(
                KEYS[2],
                h.x_content_type_options,
                defaults::X_CONTENT_TYPE_OPTIONS,
                forced[2],
            ),
            referrer_policy: self.header(
                KEYS[3],
                h.referrer_policy,
                defaults::REFERRER_POLICY,
                forced[3],
            ),
        }
    }

    fn header(
        &mut self,
        key: &str,
        s: Option<S<file::HeaderSetting>>,
        default: &str,
        force: bool,
    ) -> Option<HeaderRule> {
        let value = match s {
            None => default.to_owned(),
            Some(s) => match s.get_ref() {
                file::HeaderSetting::On(false) => return None,
                file::HeaderSetting::On(true) => default.to_owned(),
                file::HeaderSetting::Value(v) => {
                    if v.is_empty() || !v.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b)) {
                        self.problem(
                            s.span(),
                            format!("headers.{key}"),
                            "must be non-empty visible ASCII (or false to turn it off)",
                        );
                    }
                    v.clone()
                }
            },
        };
        Some(HeaderRule { value, force })
    }
}

#[cfg(test)]
mod tests {
    use crate::model::HeaderRule;
    use crate::testing::{EXAMPLE, parse};

    #[test]
    fn headers_can_be_turned_off_changed_and_forced() {
        let text = format!(
            "{EXAMPLE}\n[headers]\nx_frame_options = false\nreferrer_policy = \"no-referrer\"\nforce = [\"referrer_policy\"]\n"
        );
        let c = parse(&text).unwrap();
        assert!(c.headers.x_frame_options.is_none());
        assert_eq!(
            c.headers.referrer_policy,
            Some(HeaderRule {
                value: "no-referrer".into(),
                force: true
            })
        );
        assert!(!c.headers.x_content_type_options.unwrap().force);
    }
}
