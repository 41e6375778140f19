//! `[process]`: the user and group the process becomes after binding its listeners. The drop itself is
//! the proxy's (`privdrop`).

use crate::check::Checker;
use crate::file::{self, S};
use crate::model::Process;

impl Checker<'_> {
    pub(crate) fn process(&mut self, p: Option<file::Process>) -> Process {
        let Some(p) = p else {
            return Process::default();
        };
        let mut name = |key: &str, v: Option<S<String>>| {
            let v = v?;
            let ok = !v.get_ref().is_empty()
                && v.get_ref().len() <= 32
                && v.get_ref()
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            if !ok {
                self.problem(
                    v.span(),
                    format!("process.{key}"),
                    format!("{:?} is not a user or group name", v.get_ref()),
                );
            }
            Some(v.into_inner())
        };
        Process {
            user: name("user", p.user),
            group: name("group", p.group),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::{EXAMPLE, parse, problems};

    #[test]
    fn process_user_and_group() {
        let c = parse(&format!("{EXAMPLE}\n[process]\nuser = \"portcullis\"\n")).unwrap();
        assert_eq!(c.process.user.as_deref(), Some("portcullis"));
        assert_eq!(c.process.group, None);
        assert!(
            problems(&format!("{EXAMPLE}\n[process]\nuser = \"a b\"\n"))[0]
                .contains("process.user")
        );
    }
}
