//! The host a request names (`:authority`, absolute-form target, or `Host`), split from its port, and
//! matched against the configured `names` (exact, or `*.example.com` for one label).

use http::Request;
use http::header::{self, HeaderValue};

/// The raw host[:port] the client asked for, as a header value to forward.
pub fn requested<B>(req: &Request<B>) -> Option<HeaderValue> {
    if let Some(a) = req.uri().authority() {
        return HeaderValue::from_str(a.as_str()).ok();
    }
    req.headers().get(header::HOST).cloned()
}

/// The host part of `host[:port]`, if it is a syntactically valid host name or IP literal.
pub fn name(value: &HeaderValue) -> Option<&str> {
    let s = value.to_str().ok()?;
    let host = if s.starts_with('[') {
        let end = s.find(']')?;
        let (h, rest) = s.split_at(end + 1);
        if !(rest.is_empty() || valid_port(rest)) {
            return None;
        }
        h
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) if valid_port(p) => h,
            Some(_) => return None,
            None => s,
        }
    };
    let ok = !host.is_empty()
        && host.len() <= 255
        && host.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'[' | b']' | b':')
        });
    ok.then_some(host)
}

fn valid_port(p: &str) -> bool {
    let p = p.strip_prefix(':').unwrap_or(p);
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

/// Whether `host` is one of `names` (lower-case; `*.x` matches exactly one label in front of `x`).
pub fn allowed(names: &[String], host: &str) -> bool {
    let host = host.trim_end_matches('.');
    names.iter().any(|n| match n.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest.eq_ignore_ascii_case(suffix)),
        None => n.eq_ignore_ascii_case(host),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ports() {
        assert_eq!(
            name(&HeaderValue::from_static("Example.com:8443")),
            Some("Example.com")
        );
        assert_eq!(name(&HeaderValue::from_static("[::1]:8443")), Some("[::1]"));
        assert_eq!(name(&HeaderValue::from_static("a.test")), Some("a.test"));
        assert_eq!(name(&HeaderValue::from_static("evil.com/x")), None);
        assert_eq!(name(&HeaderValue::from_static("a.test:http")), None);
        assert_eq!(name(&HeaderValue::from_static("")), None);
    }

    #[test]
    fn wildcards_match_one_label() {
        let names = vec!["*.example.com".to_owned(), "localhost".to_owned()];
        assert!(allowed(&names, "a.example.com"));
        assert!(allowed(&names, "LOCALHOST"));
        assert!(!allowed(&names, "example.com"));
        assert!(!allowed(&names, "a.b.example.com"));
        assert!(!allowed(&names, "other.test"));
    }
}
