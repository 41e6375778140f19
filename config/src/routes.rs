//! `[[route]]` and `[[site.route]]`: each path prefix and its [`Action`], checked (a leading `/`, not
//! routed twice, a warning for a prefix that reads like a segment; exactly one of `upstream` and `static`),
//! with its body limit, longest first. A static route's folder or file must exist when the config is loaded:
//! the one look at the file system this crate makes besides reading the config (a stat per static route).

use std::collections::BTreeMap;
use std::path::Path;

use crate::check::Checker;
use crate::defaults;
use crate::file::{self, S};
use crate::model::{Action, Route, Static, StaticKind};

impl Checker<'_> {
    pub(crate) fn routes(
        &mut self,
        key: &str,
        routes: Vec<S<file::Route>>,
        ups: &BTreeMap<String, S<file::Upstream>>,
        default_body: u64,
        client_auth: bool,
    ) -> Vec<Route> {
        if routes.is_empty() {
            self.problem(
                0..0,
                key,
                "missing: add at least one [[route]] with a path and an upstream (or a static folder)",
            );
        }
        let mut out: Vec<Route> = Vec::with_capacity(routes.len());
        for (i, r) in routes.into_iter().enumerate() {
            let span = r.span();
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
            let action = match (&r.upstream, &r.r#static) {
                (Some(_), Some(st)) => {
                    self.problem(
                        st.span(),
                        format!("{key}[{i}]"),
                        "has both `upstream` and `static`: a route either forwards to an upstream or serves \
                         files; give it one of the two",
                    );
                    continue;
                }
                (None, None) => {
                    self.problem(
                        span,
                        format!("{key}[{i}]"),
                        "has neither `upstream` (an [upstream.NAME] to forward to) nor `static` (a folder or \
                         file to serve): give it one of the two",
                    );
                    continue;
                }
                (Some(up), None) => {
                    for (name, given) in [
                        ("cache", r.cache.as_ref().map(S::span)),
                        ("index", r.index.as_ref().map(S::span)),
                        ("fallback", r.fallback.as_ref().map(S::span)),
                    ] {
                        if let Some(at) = given {
                            self.problem(
                                at,
                                format!("{key}[{i}].{name}"),
                                "only for a static route (one with `static`); the app sets its own caching",
                            );
                        }
                    }
                    // BTreeMap order is the order of Checker::upstreams' output.
                    match ups.keys().position(|k| k == up.get_ref()) {
                        Some(group) => Action::Upstream(group),
                        None => {
                            self.problem(
                                up.span(),
                                format!("{key}[{i}].upstream"),
                                format!("no [upstream.{}] is defined", up.get_ref()),
                            );
                            continue;
                        }
                    }
                }
                (None, Some(_)) => {
                    for (name, given) in [
                        ("buffer_requests", r.buffer_requests.as_ref().map(S::span)),
                        ("buffer_responses", r.buffer_responses.as_ref().map(S::span)),
                    ] {
                        if let Some(at) = given {
                            self.problem(
                                at,
                                format!("{key}[{i}].{name}"),
                                "only for an upstream route: a static route reads no body and streams files",
                            );
                        }
                    }
                    match self.static_files(&format!("{key}[{i}]"), &r) {
                        Some(s) => Action::Static(s),
                        None => continue,
                    }
                }
            };
            let file_route = matches!(
                action,
                Action::Static(Static {
                    kind: StaticKind::File,
                    ..
                })
            );
            if !file_route && segment_like_prefix(path) {
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
            let compress = r.compress.map_or(defaults::COMPRESS, S::into_inner);
            let require_client_cert = match r.require_client_cert {
                Some(v) if *v.get_ref() && !client_auth => {
                    self.problem(
                        v.span(),
                        format!("{key}[{i}].require_client_cert"),
                        "the site has no `client_auth`: give the site `client_auth = { ca = ... }`",
                    );
                    false
                }
                Some(v) => v.into_inner(),
                None => defaults::REQUIRE_CLIENT_CERT,
            };
            out.push(Route {
                path: path.clone(),
                action,
                max_body,
                buffer_requests,
                buffer_responses,
                compress,
                require_client_cert,
            });
        }
        out.sort_by_key(|r| std::cmp::Reverse(r.path.len()));
        out
    }

    /// A static route's `static`, `cache`, `index` and `fallback`; `None` (with the problems) when wrong.
    fn static_files(&mut self, key: &str, r: &file::Route) -> Option<Static> {
        let st = r.r#static.as_ref()?;
        let root = self.resolve(st.get_ref());
        let root = std::path::absolute(&root).unwrap_or(root);
        let kind = match std::fs::metadata(&root) {
            Ok(m) if m.is_dir() => StaticKind::Folder,
            Ok(m) if m.is_file() => StaticKind::File,
            Ok(_) => {
                self.problem(
                    st.span(),
                    format!("{key}.static"),
                    format!("{}: neither a folder nor a regular file", root.display()),
                );
                return None;
            }
            Err(e) => {
                self.problem(
                    st.span(),
                    format!("{key}.static"),
                    format!("{}: {e} (the folder, or file, to serve)", root.display()),
                );
                return None;
            }
        };
        // A wrong value is a problem (reported by `duration`), and leaves the route without the header.
        let cache = r.cache.clone().and_then(|c| {
            let d = self.duration(&format!("{key}.cache"), Some(c), std::time::Duration::ZERO);
            (!d.is_zero()).then_some(d)
        });
        let mut ok = true;
        let mut name = |this: &mut Self, field: &str, v: &Option<S<String>>, nested: bool| {
            let v = v.as_ref()?;
            if kind == StaticKind::File {
                this.problem(
                    v.span(),
                    format!("{key}.{field}"),
                    format!(
                        "only for a folder: {} is one file, answered at the route's exact path",
                        root.display()
                    ),
                );
                ok = false;
                return None;
            }
            if let Err(why) = plain_relative(v.get_ref(), nested) {
                this.problem(v.span(), format!("{key}.{field}"), why);
                ok = false;
                return None;
            }
            Some((v.span(), v.get_ref().clone()))
        };
        let index = name(self, "index", &r.index, false).map(|(_, v)| v);
        let fallback = name(self, "fallback", &r.fallback, true);
        if let Some((span, f)) = &fallback {
            let file = root.join(f);
            if !std::fs::metadata(&file).is_ok_and(|m| m.is_file()) {
                self.problem(
                    span.clone(),
                    format!("{key}.fallback"),
                    format!("{}: no such file in the folder", file.display()),
                );
                ok = false;
            }
        }
        ok.then(|| Static {
            root,
            kind,
            cache: cache.or(defaults::STATIC_CACHE),
            index: index.or(defaults::STATIC_INDEX.map(str::to_owned)),
            fallback: fallback
                .map(|(_, f)| f)
                .or(defaults::STATIC_FALLBACK.map(str::to_owned)),
        })
    }
}

/// A file name (or, `nested`, a relative path of names joined by `/`) that stays inside the folder and is
/// served: no empty, `.`/`..` or dot-file segment, no `\\` or NUL, not absolute.
fn plain_relative(v: &str, nested: bool) -> Result<(), String> {
    if Path::new(v).is_absolute() {
        return Err(format!("{v:?} must be relative to the folder"));
    }
    if !nested && v.contains('/') {
        return Err(format!("{v:?} must be a file name, without '/'"));
    }
    for seg in v.split('/') {
        if seg.is_empty() || seg.starts_with('.') || seg.contains(['\\', '\0']) {
            return Err(format!(
                "{v:?}: every part must be a plain name (no empty part, none starting with '.', no '\\\\')"
            ));
        }
    }
    Ok(())
}

/// Whether a plain prefix reads like a path segment it does not stop at: not `/`, no trailing `/`, no `.` in
/// its last segment. `"/api"` also matches `"/apiary"`; `"/api/"`, `"/favicon.ico"` and `"/"` are fine.
pub(crate) fn segment_like_prefix(prefix: &str) -> bool {
    let last = prefix.rsplit('/').next().unwrap_or_default();
    !last.is_empty() && !last.contains('.')
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::segment_like_prefix;
    use crate::model::{Action, Static, StaticKind};
    use crate::testing::{EXAMPLE, parse, problems};

    /// A folder and a file that exist wherever the tests run: this crate's own.
    const DIR: &str = env!("CARGO_MANIFEST_DIR");

    fn static_route(keys: &str) -> String {
        format!("{EXAMPLE}[[route]]\npath = \"/static/\"\n{keys}\n")
    }

    #[test]
    fn a_static_route_serves_a_folder_with_its_cache_index_and_fallback() {
        let c = parse(&static_route(&format!(
            "static = \"{DIR}\"\ncache = \"365d\"\nindex = \"index.html\"\nfallback = \"Cargo.toml\""
        )))
        .unwrap();
        let r = c.sites[0].route("/static/app.css").unwrap();
        assert_eq!(
            r.action,
            Action::Static(Static {
                root: DIR.into(),
                kind: StaticKind::Folder,
                cache: Some(Duration::from_secs(365 * 86_400)),
                index: Some("index.html".into()),
                fallback: Some("Cargo.toml".into()),
            })
        );
    }

    /// `path = "/favicon.ico"` with `static` naming a file answers that exact path only: anything longer
    /// goes on to a shorter route (nginx's `location = /favicon.ico`), and no "plain prefix" warning.
    #[test]
    fn a_static_route_to_a_file_takes_only_its_exact_path() {
        let c = parse(&format!(
            "{EXAMPLE}[[route]]\npath = \"/robots\"\nstatic = \"{DIR}/Cargo.toml\"\n"
        ))
        .unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let site = &c.sites[0];
        assert!(matches!(
            site.route("/robots").unwrap().action,
            Action::Static(Static {
                kind: StaticKind::File,
                ..
            })
        ));
        for other in ["/robots.txt", "/robots/", "/robotsx"] {
            assert_eq!(site.route(other).unwrap().path, "/", "{other}");
        }
    }

    #[test]
    fn a_route_needs_exactly_one_of_upstream_and_static() {
        let both = problems(&static_route(&format!(
            "upstream = \"app\"\nstatic = \"{DIR}\""
        )));
        assert_eq!(both.len(), 1, "{both:?}");
        assert!(
            both[0].contains(":21:10: route[1]: has both `upstream` and `static`"),
            "{both:?}"
        );
        let neither = problems(&static_route("max_body = \"1MiB\""));
        assert_eq!(neither.len(), 1, "{neither:?}");
        assert!(
            neither[0].contains(": route[1]: has neither `upstream`"),
            "{neither:?}"
        );
        let on_upstream = problems(&static_route("upstream = \"app\"\ncache = \"1h\""));
        assert!(
            on_upstream.len() == 1
                && on_upstream[0].contains("route[1].cache: only for a static route"),
            "{on_upstream:?}"
        );
    }

    #[test]
    fn a_missing_folder_or_a_bad_index_or_fallback_names_its_key() {
        let p = problems(&static_route("static = \"/nonexistent/portcullis/static\""));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains(":20:10: route[1].static: /nonexistent/portcullis/static: No such file"),
            "{p:?}"
        );
        let p = problems(&static_route(&format!(
            "static = \"{DIR}\"\nindex = \"../index.html\"\nfallback = \"missing.html\"\ncache = \"forever\"\nbuffer_requests = false"
        )));
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(
            p.iter()
                .any(|l| l.contains("route[1].index: \"../index.html\"")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|l| l.contains("route[1].fallback: ")
                    && l.contains("missing.html: no such file")),
            "{p:?}"
        );
        assert!(p.iter().any(|l| l.contains("route[1].cache: ")), "{p:?}");
        assert!(
            p.iter()
                .any(|l| l.contains("route[1].buffer_requests: only for an upstream route")),
            "{p:?}"
        );
        let p = problems(&format!(
            "{EXAMPLE}[[route]]\npath = \"/favicon.ico\"\nstatic = \"{DIR}/Cargo.toml\"\nindex = \"index.html\"\n"
        ));
        assert!(
            p.len() == 1 && p[0].contains("route[1].index: only for a folder"),
            "{p:?}"
        );
    }

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
        let Action::Upstream(api) = c.sites[0].route("/api/x").unwrap().action else {
            panic!("an upstream route")
        };
        assert_eq!(c.upstreams[api].name, "api");
        let Action::Upstream(root) = c.sites[0].route("/x").unwrap().action else {
            panic!("an upstream route")
        };
        assert_eq!(c.upstreams[root].name, "app");
    }
}
