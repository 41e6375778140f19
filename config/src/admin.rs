//! `[admin]`: the admin listener (`/metrics`, `/health`, what `check --live` reads). `listen` is
//! `"IP:PORT"` or `"unix:/absolute/path.sock"`, the spelling of an upstream server; an address other than
//! loopback needs `public = true`, since nothing on that listener asks who is asking. The socket itself is
//! the proxy's.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::check::Checker;
use crate::defaults;
use crate::file::{self, S};
use crate::model::{Admin, ServerAddr};

impl Checker<'_> {
    /// `None` without an `[admin]` section: no admin listener.
    pub(crate) fn admin(&mut self, a: Option<S<file::Admin>>) -> Option<Admin> {
        let a = a?;
        let span = a.span();
        let a = a.into_inner();
        let public = a.public.is_some_and(|p| *p.get_ref());
        let (text, at) = match &a.listen {
            Some(l) => (l.get_ref().as_str(), l.span()),
            None => (defaults::ADMIN_LISTEN, span),
        };
        let listen = if let Some(path) = text.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            if !path.is_absolute() {
                self.problem(
                    at,
                    "admin.listen",
                    format!("{text:?}: a unix socket needs an absolute path, like \"unix:/run/portcullis/admin.sock\""),
                );
                return None;
            }
            ServerAddr::Unix(path)
        } else {
            match text.parse::<SocketAddr>() {
                Ok(addr) if addr.ip().is_loopback() || public => ServerAddr::Tcp(addr),
                Ok(addr) => {
                    self.problem(
                        at,
                        "admin.listen",
                        format!(
                            "{addr} is not a loopback address: the admin listener has no authentication, so \
                             anyone who can reach it reads the metrics; set public = true to serve it there anyway"
                        ),
                    );
                    return None;
                }
                Err(_) => {
                    self.problem(
                        at,
                        "admin.listen",
                        format!("{text:?} is not \"IP:PORT\" (like \"127.0.0.1:9180\") or \"unix:/path/to.sock\""),
                    );
                    return None;
                }
            }
        };
        Some(Admin { listen, public })
    }
}

#[cfg(test)]
mod tests {
    use crate::model::ServerAddr;
    use crate::testing::{EXAMPLE, parse, problems};

    #[test]
    fn no_section_no_admin_listener() {
        assert!(parse(EXAMPLE).unwrap().admin.is_none());
    }

    #[test]
    fn an_empty_section_listens_on_the_default_loopback_port() {
        let c = parse(&format!("{EXAMPLE}\n[admin]\n")).unwrap();
        assert_eq!(
            c.admin.unwrap().listen,
            ServerAddr::Tcp("127.0.0.1:9180".parse().unwrap())
        );
    }

    #[test]
    fn a_unix_socket_needs_an_absolute_path() {
        let c = parse(&format!(
            "{EXAMPLE}\n[admin]\nlisten = \"unix:/run/portcullis/admin.sock\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.admin.unwrap().listen,
            ServerAddr::Unix("/run/portcullis/admin.sock".into())
        );
        let p = problems(&format!(
            "{EXAMPLE}\n[admin]\nlisten = \"unix:admin.sock\"\n"
        ));
        assert!(p[0].contains("admin.listen"), "{p:?}");
    }

    #[test]
    fn a_public_address_needs_public_true() {
        let text = format!("{EXAMPLE}\n[admin]\nlisten = \"0.0.0.0:9180\"\n");
        let p = problems(&text);
        let line = text.lines().count();
        assert!(
            p[0].contains(&format!(":{line}:10: admin.listen")) && p[0].contains("public = true"),
            "{p:?}"
        );
        let c = parse(&format!("{text}public = true\n")).unwrap();
        assert!(c.admin.unwrap().public);
        assert!(
            problems(&format!("{EXAMPLE}\n[admin]\nlisten = \"nonsense\"\n"))[0]
                .contains("admin.listen")
        );
    }
}
