//! `[log]`: whether to write access lines, their format, and the log level. Writing them is the proxy's
//! (`telemetry`).

use crate::check::Checker;
use crate::defaults;
use crate::file;
use crate::model::{Log, LogFormat};

impl Checker<'_> {
    pub(crate) fn log(&mut self, l: Option<file::Log>) -> Log {
        let mut log = Log {
            access: defaults::LOG_ACCESS,
            format: defaults::LOG_FORMAT,
            level: defaults::LOG_LEVEL.to_owned(),
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
        log
    }
}
