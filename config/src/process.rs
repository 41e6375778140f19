//! `[process]`: the user and group the process becomes after binding its listeners (the drop itself is
//! the proxy's, `privdrop`), and the private folder for buffered bodies that outgrow memory.

use std::path::PathBuf;

use crate::check::Checker;
use crate::defaults;
use crate::file::{self, S};
use crate::model::{Process, Sandbox, Seccomp};

impl Checker<'_> {
    pub(crate) fn process(&mut self, p: Option<file::Process>) -> Process {
        let p = p.unwrap_or(file::Process {
            user: None,
            group: None,
            temp_dir: None,
            sandbox: None,
            seccomp: None,
        });
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
        let user = name("user", p.user);
        let group = name("group", p.group);
        let temp_dir = match p.temp_dir {
            None => defaults::temp_dir(std::env::var_os("RUNTIME_DIRECTORY").as_deref()),
            Some(d) => {
                let path = PathBuf::from(d.get_ref());
                if !path.is_absolute() {
                    self.problem(
                        d.span(),
                        "process.temp_dir",
                        format!("{:?} must be an absolute path", d.get_ref()),
                    );
                }
                path
            }
        };
        let sandbox = match p.sandbox {
            None => defaults::SANDBOX,
            Some(v) => match v.get_ref().as_str() {
                "best-effort" => Sandbox::BestEffort,
                "require" => Sandbox::Require,
                "off" => Sandbox::Off,
                other => {
                    self.problem(
                        v.span(),
                        "process.sandbox",
                        format!("{other:?}: use \"best-effort\", \"require\" or \"off\""),
                    );
                    defaults::SANDBOX
                }
            },
        };
        let seccomp = match p.seccomp {
            None => defaults::SECCOMP,
            Some(v) => match v.get_ref().as_str() {
                "errno" => Seccomp::Errno,
                "kill" => Seccomp::Kill,
                "off" => Seccomp::Off,
                other => {
                    self.problem(
                        v.span(),
                        "process.seccomp",
                        format!("{other:?}: use \"errno\", \"kill\" or \"off\""),
                    );
                    defaults::SECCOMP
                }
            },
        };
        Process {
            user,
            group,
            temp_dir,
            sandbox,
            seccomp,
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
        assert!(c.process.temp_dir.is_absolute());
        let c = parse(&format!(
            "{EXAMPLE}\n[process]\ntemp_dir = \"/srv/tmp/px\"\n"
        ))
        .unwrap();
        assert_eq!(c.process.temp_dir, std::path::Path::new("/srv/tmp/px"));
        assert!(
            problems(&format!("{EXAMPLE}\n[process]\ntemp_dir = \"tmp\"\n"))[0]
                .contains("process.temp_dir")
        );
        assert_eq!(c.process.sandbox, crate::Sandbox::BestEffort);
        let c = parse(&format!("{EXAMPLE}\n[process]\nsandbox = \"require\"\n")).unwrap();
        assert_eq!(c.process.sandbox, crate::Sandbox::Require);
        assert!(
            problems(&format!("{EXAMPLE}\n[process]\nsandbox = \"on\"\n"))[0]
                .contains("process.sandbox")
        );
        assert_eq!(c.process.seccomp, crate::Seccomp::Errno);
        let c = parse(&format!("{EXAMPLE}\n[process]\nseccomp = \"kill\"\n")).unwrap();
        assert_eq!(c.process.seccomp, crate::Seccomp::Kill);
        assert!(
            problems(&format!("{EXAMPLE}\n[process]\nseccomp = \"trap\"\n"))[0]
                .contains("process.seccomp")
        );
        assert!(
            problems(&format!("{EXAMPLE}\n[process]\nuser = \"a b\"\n"))[0]
                .contains("process.user")
        );
    }
}
