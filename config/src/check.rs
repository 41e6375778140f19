//! The checker's core: [`Checker`] collects every problem and warning, each located by its span as
//! `FILE:LINE:COL` and named by its key, and turns the values every section shares (sizes, counts,
//! durations, paths relative to the config file) into checked ones. Each section's checks are `impl Checker`
//! blocks in that section's file; `lib.rs` calls them in order.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Problem};
use crate::file::{self, S};
use crate::{duration, size};

/// One pass over one file: where it came from, its text (for line and column), and what was found.
pub(crate) struct Checker<'a> {
    path: &'a Path,
    text: &'a str,
    problems: Vec<Problem>,
    warnings: Vec<Problem>,
}

impl<'a> Checker<'a> {
    pub(crate) fn new(path: &'a Path, text: &'a str) -> Checker<'a> {
        Checker {
            path,
            text,
            problems: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// The file being checked, as it names itself in messages.
    pub(crate) fn path(&self) -> &'a Path {
        self.path
    }
}

impl Checker<'_> {
    /// The warnings so far, taken out (they go into the `Config`; they never fail a load).
    pub(crate) fn take_warnings(&mut self) -> Vec<Problem> {
        std::mem::take(&mut self.warnings)
    }

    /// `Ok(value)` when nothing was wrong, else every problem found.
    pub(crate) fn finish<T>(self, value: T) -> Result<T, Error> {
        if self.problems.is_empty() {
            Ok(value)
        } else {
            Err(self.into_error())
        }
    }

    pub(crate) fn into_error(self) -> Error {
        Error::Invalid {
            problems: self.problems,
        }
    }

    /// Something that works but deserves a second look: `check` prints it; it does not fail the load.
    pub(crate) fn warning(
        &mut self,
        span: Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let w = self.locate(span, key.into(), message.into());
        self.warnings.push(w);
    }

    /// Something wrong: the load fails, with every problem found.
    pub(crate) fn problem(
        &mut self,
        span: Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let p = self.locate(span, key.into(), message.into());
        self.problems.push(p);
    }

    /// `FILE:LINE:COL` of where `span` starts (line and column count from 1).
    fn locate(&self, span: Range<usize>, key: String, message: String) -> Problem {
        let offset = span.start.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let col = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
        Problem {
            file: self.path.to_owned(),
            line,
            col,
            key,
            message,
        }
    }

    /// A file that is not valid TOML, or does not fit the mirror in `file.rs` (unknown key, wrong type).
    pub(crate) fn toml_error(&mut self, e: &toml::de::Error) {
        let span = e.span().unwrap_or(0..0);
        // The key is what the error points at when that is a bare key, else the table it sits in.
        let at = self.text.get(span.clone()).unwrap_or("").trim();
        let key = if !at.is_empty()
            && at
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            at.to_owned()
        } else {
            self.enclosing_table(span.start)
        };
        let message = e.message().trim().replace('\n', " ");
        self.problem(span, key, message);
    }

    fn enclosing_table(&self, offset: usize) -> String {
        let before = &self.text[..offset.min(self.text.len())];
        before
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('['))
            .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned())
            .unwrap_or_else(|| "(top level)".to_owned())
    }

    /// A path from the file: relative ones are relative to the config file's folder.
    pub(crate) fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.path.parent().unwrap_or(Path::new("")).join(p)
        }
    }

    /// A size in bytes (`size.rs`), more than zero; `default` when absent or wrong.
    pub(crate) fn size(&mut self, key: &str, s: Option<S<file::Size>>, default: u64) -> u64 {
        let Some(s) = s else { return default };
        let parsed = match s.get_ref() {
            file::Size::Bytes(n) => Ok(*n),
            file::Size::Text(t) => size::parse(t),
        };
        match parsed {
            Ok(0) => {
                self.problem(s.span(), key, "must be more than zero");
                default
            }
            Ok(n) => n,
            Err(why) => {
                self.problem(s.span(), key, why);
                default
            }
        }
    }

    /// A count, more than zero; `default` when absent or zero.
    pub(crate) fn count(&mut self, key: &str, s: Option<S<u64>>, default: u64) -> u64 {
        match s {
            None => default,
            Some(s) if *s.get_ref() == 0 => {
                self.problem(s.span(), key, "must be more than zero");
                default
            }
            Some(s) => *s.get_ref(),
        }
    }

    /// A positive duration (`duration.rs`); `default` when absent or wrong.
    pub(crate) fn duration(
        &mut self,
        key: &str,
        s: Option<S<String>>,
        default: Duration,
    ) -> Duration {
        match s {
            None => default,
            Some(s) => match duration::parse(s.get_ref()) {
                Ok(d) => d,
                Err(why) => {
                    self.problem(s.span(), key, why);
                    default
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::model::{CertSource, ServerAddr};
    use crate::testing::{EXAMPLE, parse, problems};

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let c = parse(
            &EXAMPLE
                .replace("/etc/portcullis/fullchain.pem", "certs/full.pem")
                .replace("127.0.0.1:8000", "unix:run/app.sock"),
        )
        .unwrap();
        assert_eq!(
            c.sites[0].tls,
            CertSource::Files {
                cert: "/etc/portcullis/certs/full.pem".into(),
                key: "/etc/portcullis/privkey.pem".into()
            }
        );
        assert_eq!(
            c.upstreams[0].servers,
            [ServerAddr::Unix("/etc/portcullis/run/app.sock".into())]
        );
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let p = problems(&EXAMPLE.replace("http  =", "htp ="));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("/etc/portcullis/portcullis.toml:6:1: htp: unknown field"),
            "{}",
            p[0]
        );
    }
}
