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
            sandbox_connect_ports: None,
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
        let sandbox_connect_ports = self.connect_ports(p.sandbox_connect_ports);
        Process {
            user,
            group,
            temp_dir,
            sandbox,
            seccomp,
            sandbox_connect_ports,
        }
    }

    /// `sandbox_connect_ports`: numbers and `"A-B"` ranges, expanded, sorted, each once; 0 and empty or
    /// reversed ranges are problems, and so are more than [`defaults::SANDBOX_CONNECT_PORTS_MAX`].
    fn connect_ports(&mut self, v: Option<S<Vec<S<file::PortSpec>>>>) -> Vec<u16> {
        const KEY: &str = "process.sandbox_connect_ports";
        let Some(list) = v else {
            return Vec::new();
        };
        let span = list.span();
        let mut out = Vec::new();
        for item in list.into_inner() {
            let at = item.span();
            let range = match item.into_inner() {
                file::PortSpec::One(p) => Some((p, p)),
                file::PortSpec::Range(text) => text
                    .split_once('-')
                    .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?))),
            };
            match range {
                Some((a, b)) if a != 0 && a <= b => out.extend(a..=b),
                _ => self.problem(
                    at,
                    KEY,
                    "give a port (1-65535) or a range \"LOW-HIGH\" (e.g. \"8000-8099\")",
                ),
            }
        }
        out.sort_unstable();
        out.dedup();
        if out.len() > defaults::SANDBOX_CONNECT_PORTS_MAX {
            self.problem(
                span,
                KEY,
                format!(
                    "{} ports: at most {} (each is one sandbox rule)",
                    out.len(),
                    defaults::SANDBOX_CONNECT_PORTS_MAX
                ),
            );
            out.truncate(defaults::SANDBOX_CONNECT_PORTS_MAX);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::{EXAMPLE, parse, problems};

    #[test]
    fn sandbox_connect_ports_are_ports_and_ranges() {
        let c = parse(&format!(
            "{EXAMPLE}\n[process]\nsandbox_connect_ports = [8001, \"9000-9002\", 8001]\n"
        ))
        .unwrap();
        assert_eq!(
            c.process.sandbox_connect_ports,
            vec![8001, 9000, 9001, 9002]
        );
        for bad in ["0", "\"9-3\"", "\"80\"", "\"1-65535\""] {
            let p = problems(&format!(
                "{EXAMPLE}\n[process]\nsandbox_connect_ports = [{bad}]\n"
            ));
            assert!(
                p.iter()
                    .any(|p| p.contains("process.sandbox_connect_ports")),
                "{bad}: {p:?}"
            );
        }
    }

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
