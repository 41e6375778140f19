//! `[[route]]` and `[[site.route]]`: each path prefix and its [`Action`], checked (a leading `/`, not
//! routed twice, a warning for a prefix that reads like a segment), with its body limit, longest first.

use std::collections::BTreeMap;

use crate::check::Checker;
use crate::defaults;
use crate::file::{self, S};
use crate::model::{Action, Route};

impl Checker<'_> {
    pub(crate) fn routes(
        &mut self,
        key: &str,
        routes: Vec<S<file::Route>>,
        ups: &BTreeMap<String, S<file::Upstream>>,
        default_body: u64,
    ) -> Vec<Route> {
        if routes.is_empty() {
            self.problem(
                0..0,
                key,
                "missing: add at least one [[route]] with a path and an upstream",
            );
        }
        let mut out: Vec<Route> = Vec::with_capacity(routes.len());
        for (i, r) in routes.into_iter().enumerate() {
            let r = r.into_inner();
            let path = r.path.get_ref();
            if !path.starts_with('/') {
                self.problem(
                    r.path.span(),
                    format!("{key}[{i}].path"),
                    format!("{path:?} must start with '/'"),
                );
                continue;
            }
            if out.iter().any(|o| o.path == *path) {
                self.problem(
                    r.path.span(),
                    format!("{key}[{i}].path"),
                    format!("{path:?} is routed twice"),
                );
                continue;
            }
            if segment_like_prefix(path) {
                self.warning(
                    r.path.span(),
                    format!("{key}[{i}].path"),
                    format!(
                        "{path:?} is a plain prefix: it also routes every path that starts with it, like {:?}; \
                         write \"{path}/\" to route only {path}/ and below",
                        format!("{path}-old")
                    ),
                );
            }
            let max_body = self.size(&format!("{key}[{i}].max_body"), r.max_body, default_body);
            let buffer_requests = r
                .buffer_requests
                .map_or(defaults::BUFFER_REQUESTS, S::into_inner);
            let buffer_responses = r
                .buffer_responses
                .map_or(defaults::BUFFER_RESPONSES, S::into_inner);
            // BTreeMap order is the order of Checker::upstreams' output.
            match ups.keys().position(|k| k == r.upstream.get_ref()) {
                Some(upstream) => out.push(Route {
                    path: path.clone(),
                    action: Action::Upstream(upstream),
                    max_body,
                    buffer_requests,
                    buffer_responses,
                }),
                None => self.problem(
                    r.upstream.span(),
                    format!("{key}[{i}].upstream"),
                    format!("no [upstream.{}] is defined", r.upstream.get_ref()),
                ),
            }
        }
        out.sort_by_key(|r| std::cmp::Reverse(r.path.len()));
        out
    }
}

/// Whether a plain prefix reads like a path segment it does not stop at: not `/`, no trailing `/`, no `.` in
/// its last segment. `"/api"` also matches `"/apiary"`; `"/api/"`, `"/favicon.ico"` and `"/"` are fine.
pub(crate) fn segment_like_prefix(prefix: &str) -> bool {
    let last = prefix.rsplit('/').next().unwrap_or_default();
    !last.is_empty() && !last.contains('.')
}

#[cfg(test)]
mod tests {
    use super::segment_like_prefix;
    use crate::model::Action;
    use crate::testing::{EXAMPLE, parse};

    /// Issue 10 (Also): `"/api"` also routes `/apiary`; `check` says so for a prefix that reads like a segment.
    #[test]
    fn a_route_that_reads_like_a_segment_but_is_a_plain_prefix_warns() {
        let text = format!(
            "{EXAMPLE}[[route]]\npath = \"/api\"\nupstream = \"app\"\n[[route]]\npath = \"/static/\"\nupstream = \"app\"\n[[route]]\npath = \"/favicon.ico\"\nupstream = \"app\"\n[[route]]\npath = \"/v1.2\"\nupstream = \"app\"\n[[site]]\nnames = [\"b.test\"]\ntls = {{ self_signed = true }}\n[[site.route]]\npath = \"/admin\"\nupstream = \"app\"\n"
        );
        let c = parse(&text).unwrap();
        let w: Vec<String> = c.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains(":19:8:")
                && w[0].contains(": route[1].path: ")
                && w[0].contains("\"/api/\""),
            "{w:?}"
        );
        assert!(w[1].contains(": site[0].route[0].path: "), "{w:?}");
        // Still a plain prefix: the warning changes nothing about how it routes.
        assert!(
            c.sites[0]
                .route("/apiary")
                .is_some_and(|r| r.path == "/api")
        );
        assert!(segment_like_prefix("/api/v1"));
        for fine in [
            "/",
            "/api/",
            "/favicon.ico",
            "/.well-known/",
            "/static/app.js",
        ] {
            assert!(!segment_like_prefix(fine), "{fine}");
        }
    }

    #[test]
    fn longest_prefix_wins() {
        let text = format!(
            "{EXAMPLE}\n[[route]]\npath = \"/api/\"\nupstream = \"api\"\n[upstream.api]\nservers = [\"127.0.0.1:9000\"]\n"
        );
        let c = parse(&text).unwrap();
        let Action::Upstream(api) = c.sites[0].route("/api/x").unwrap().action;
        assert_eq!(c.upstreams[api].name, "api");
        let Action::Upstream(root) = c.sites[0].route("/x").unwrap().action;
        assert_eq!(c.upstreams[root].name, "app");
    }
}
