//! `[log]`: whether to write access lines, their format, the log level, and the file access lines go to
//! (its folder must exist: a stat, the only I/O here). Writing them is the proxy's (`telemetry`, `logfile`).

use crate::check::Checker;
use crate::defaults;
use crate::file::{self, S};
use crate::model::{Log, LogFormat};

impl Checker<'_> {
    pub(crate) fn log(&mut self, l: Option<file::Log>) -> Log {
        let mut log = Log {
            access: defaults::LOG_ACCESS,
            format: defaults::LOG_FORMAT,
            level: defaults::LOG_LEVEL.to_owned(),
            file: defaults::LOG_FILE.map(Into::into),
        };
        let Some(l) = l else { return log };
        if let Some(a) = l.access {
            log.access = *a.get_ref();
        }
        if let Some(f) = l.format {
            match f.get_ref().as_str() {
                "text" => log.format = LogFormat::Text,
                "json" => log.format = LogFormat::Json,
                other => self.problem(
                    f.span(),
                    "log.format",
                    format!("{other:?}: use \"text\" or \"json\""),
                ),
            }
        }
        if let Some(lv) = l.level {
            match lv.get_ref().as_str() {
                "error" | "warn" | "info" | "debug" | "trace" => log.level = lv.get_ref().clone(),
                other => self.problem(
                    lv.span(),
                    "log.level",
                    format!("{other:?}: use error, warn, info, debug or trace"),
                ),
            }
        }
        if let Some(f) = l.file {
            log.file = self.log_file(&f);
        }
        log
    }

    /// `log.file`: a file name in a folder that exists (made by the package or the operator: we never make
    /// folders in /var/log), and not itself a folder.
    fn log_file(&mut self, f: &S<String>) -> Option<std::path::PathBuf> {
        let given = f.get_ref();
        let path = self.resolve(given);
        let folder = path.parent().filter(|p| !p.as_os_str().is_empty());
        let problem = if given.is_empty() || given.ends_with('/') || path.file_name().is_none() {
            Some(format!(
                "{given:?}: name a file, e.g. \"/var/log/portcullis/access.log\""
            ))
        } else if path.is_dir() {
            Some(format!(
                "{}: is a folder; name a file in it",
                path.display()
            ))
        } else {
            match folder.map(std::fs::metadata) {
                Some(Ok(m)) if m.is_dir() => None,
                Some(Ok(_)) => Some(format!(
                    "{}: {} is not a folder",
                    path.display(),
                    folder.map_or("".into(), |p| p.display().to_string())
                )),
                _ => Some(format!(
                    "{}: the folder {} does not exist (make it first, e.g. `install -d -o root -g adm -m 0750 {}`)",
                    path.display(),
                    folder.map_or("".into(), |p| p.display().to_string()),
                    folder.map_or("".into(), |p| p.display().to_string()),
                )),
            }
        };
        match problem {
            Some(p) => {
                self.problem(f.span(), "log.file", p);
                None
            }
            None => Some(path),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::{EXAMPLE, parse, problems};

    #[test]
    fn a_log_file_needs_a_folder_that_exists() {
        let tmp = std::env::temp_dir();
        let ok = format!(
            "{EXAMPLE}\n[log]\nfile = \"{}/access.log\"\n",
            tmp.display()
        );
        assert_eq!(
            parse(&ok).unwrap().log.file.unwrap(),
            tmp.join("access.log")
        );
        assert_eq!(parse(EXAMPLE).unwrap().log.file, None);
        let missing =
            format!("{EXAMPLE}\n[log]\nfile = \"/nonexistent-portcullis/logs/access.log\"\n");
        let p = problems(&missing);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("log.file")
                && p[0].contains("the folder /nonexistent-portcullis/logs does not exist"),
            "{p:?}"
        );
        let folder = format!("{EXAMPLE}\n[log]\nfile = \"{}\"\n", tmp.display());
        assert!(problems(&folder)[0].contains("is a folder"));
    }
}
