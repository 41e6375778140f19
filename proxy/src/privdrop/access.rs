//! Can the service user still reach what it needs after the drop? Certificates and keys are read again on
//! reload, when root is long gone (the config is not: it is read once, before the drop); static routes'
//! folders and files are read on every request. Every file the process needs is listed in [`needed`], and
//! [`problems`] checks it against the service user's ids with the owner/group/other mode bits (POSIX ACLs
//! are not read), along with every directory above it. A private key must not be open to other users.

use std::fmt;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use portcullis_config::{Action, CertSource, Config, StaticKind};

use super::Identity;

/// One file the running process needs after the drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needed {
    pub path: PathBuf,
    pub what: &'static str,
    pub access: Access,
    /// A private key: also refused when other users may read it or anyone but its owner may write it.
    pub secret: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    /// Read, write and enter: a directory the process keeps state in (ACME's `state_dir`).
    WriteDir,
    /// Enter: a directory the process looks for a file in (the `[maintenance] flag`).
    EnterDir,
}

/// What is wrong with one needed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: PathBuf,
    pub kind: Kind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The service user cannot reach or read (or write) it.
    Inaccessible,
    /// A private key other users can read, or that someone besides its owner can write.
    KeyExposed,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.message)
    }
}

/// Every file the process reads or writes after the drop. Add new ones here (the state directory, per-site
/// certificates, client CA files, ...).
pub fn needed(config: &Config) -> Vec<Needed> {
    let mut out = Vec::new();
    for site in &config.sites {
        if let Some(auth) = &site.client_auth {
            out.push(Needed {
                path: auth.ca.clone(),
                what: "client CA bundle (read again when it changes)",
                access: Access::Read,
                secret: false,
            });
            if let Some(dir) = &auth.crl {
                // Listed and each file read on every change: read and enter.
                for access in [Access::Read, Access::EnterDir] {
                    out.push(Needed {
                        path: dir.clone(),
                        what: "CRL folder (listed and read again when it changes)",
                        access,
                        secret: false,
                    });
                }
            }
        }
        let CertSource::Files { cert, key } = &site.tls else {
            continue;
        };
        out.push(Needed {
            path: cert.clone(),
            what: "certificate chain (read again on reload)",
            access: Access::Read,
            secret: false,
        });
        out.push(Needed {
            path: key.clone(),
            what: "private key (read again on reload)",
            access: Access::Read,
            secret: true,
        });
    }
    let acme_sites = config
        .sites
        .iter()
        .any(|s| matches!(s.tls, CertSource::Acme { .. }));
    if let (Some(acme), true) = (&config.acme, acme_sites) {
        // The state directory is made at the first order: until then, the folder it will be made in.
        let dir = acme
            .state_dir
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(&acme.state_dir)
            .to_path_buf();
        out.push(Needed {
            what: if dir == acme.state_dir {
                "ACME state directory (account, certificates, keys)"
            } else {
                "folder the ACME state directory will be created in"
            },
            path: dir,
            access: Access::WriteDir,
            secret: false,
        });
        if let Some(root) = &acme.ca_root {
            out.push(Needed {
                path: root.clone(),
                what: "ACME CA root (read at every order)",
                access: Access::Read,
                secret: false,
            });
        }
    }
    for route in config.sites.iter().flat_map(|s| &s.routes) {
        let Action::Static(st) = &route.action else {
            continue;
        };
        // Read-only: the folder entered (never listed), the file itself, and the files the config names
        // (the fallback, and the index at the folder's top when there is one). Each file below is the
        // deploy's business; they cannot all be checked here.
        let mut files = Vec::new();
        match st.kind {
            StaticKind::File => {
                files.push((st.root.clone(), "static file (read on every request)"))
            }
            StaticKind::Folder => {
                out.push(Needed {
                    path: st.root.clone(),
                    what: "static folder (its files are read on every request)",
                    access: Access::EnterDir,
                    secret: false,
                });
                if let Some(f) = &st.fallback {
                    files.push((st.root.join(f), "static route's fallback file"));
                }
                if let Some(i) = &st.index {
                    let top = st.root.join(i);
                    if top.exists() {
                        files.push((top, "static folder's index file"));
                    }
                }
            }
        }
        out.extend(files.into_iter().map(|(path, what)| Needed {
            path,
            what,
            access: Access::Read,
            secret: false,
        }));
    }
    if let Some(flag) = &config.maintenance.flag {
        // Whether the flag exists is a stat in its folder (or, before that folder is made, the one above).
        let folder = flag.parent().unwrap_or(flag);
        out.push(Needed {
            path: folder
                .ancestors()
                .find(|p| p.exists())
                .unwrap_or(folder)
                .to_path_buf(),
            what: "folder of the [maintenance] flag (looked for every second)",
            access: Access::EnterDir,
            secret: false,
        });
    }
    out
}

/// Every problem with the files `config` needs, for the service user `who`.
pub fn problems(config: &Config, who: &Identity) -> Vec<Problem> {
    needed(config).iter().flat_map(|n| check(n, who)).collect()
}

/// The problems with one needed file.
pub fn check(n: &Needed, who: &Identity) -> Vec<Problem> {
    let problem = |kind, message| Problem {
        path: n.path.clone(),
        kind,
        message,
    };
    let meta = match std::fs::metadata(&n.path) {
        Ok(m) => m,
        Err(e) => return vec![problem(Kind::Inaccessible, format!("{}: {e}", n.what))],
    };
    let mut out = Vec::new();
    if n.secret {
        let mode = meta.mode() & 0o7777;
        if mode & 0o007 != 0 || mode & 0o020 != 0 {
            out.push(problem(
                Kind::KeyExposed,
                format!(
                    "private key has mode {mode:04o}: users other than its owner can {}; fix with `chmod 600 {p}` (or \
                     `chmod 640 {p}` with a group only the service user is in) and `chown {user} {p}`",
                    if mode & 0o022 != 0 { "write it" } else { "read it" },
                    p = n.path.display(),
                    user = who.name,
                ),
            ));
        }
    }
    if let Some(why) = unreachable(&n.path, who) {
        out.push(problem(Kind::Inaccessible, format!("{}: {why}", n.what)));
    } else {
        let (bits, verb) = match n.access {
            Access::Read => (R, "read"),
            Access::WriteDir => (R | W | X, "write into"),
            Access::EnterDir => (X, "look into"),
        };
        if !allowed(&meta, who, bits) {
            out.push(problem(
                Kind::Inaccessible,
                format!(
                    "{}: user {who} cannot {verb} it after dropping privileges (owner {}:{}, mode {:04o}); \
                     e.g. `chown {} {}`, or give it a group of that user with the group bits",
                    n.what,
                    meta.uid(),
                    meta.gid(),
                    meta.mode() & 0o7777,
                    who.name,
                    n.path.display(),
                ),
            ));
        }
    }
    out
}

const R: u32 = 4;
const W: u32 = 2;
const X: u32 = 1;

/// Why `who` cannot get to `path` through its directories (both as written and with symlinks resolved).
fn unreachable(path: &Path, who: &Identity) -> Option<String> {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| absolute.clone());
    for p in [&absolute, &real] {
        for dir in p.ancestors().skip(1).filter(|d| !d.as_os_str().is_empty()) {
            let Ok(meta) = std::fs::metadata(dir) else {
                continue;
            };
            if !allowed(&meta, who, X) {
                return Some(format!(
                    "user {who} cannot enter directory {} (owner {}:{}, mode {:04o})",
                    dir.display(),
                    meta.uid(),
                    meta.gid(),
                    meta.mode() & 0o7777
                ));
            }
        }
    }
    None
}

/// The permission check the kernel makes for an unprivileged process, from the mode bits alone: the owner
/// class if it owns the file, else the group class if the file's group is one of its groups, else other.
fn allowed(meta: &Metadata, who: &Identity, bits: u32) -> bool {
    if who.uid.is_root() {
        return true;
    }
    let mode = meta.mode();
    let class = if meta.uid() == who.uid.as_raw() {
        mode >> 6
    } else if meta.gid() == who.gid.as_raw() || who.groups.iter().any(|g| g.as_raw() == meta.gid())
    {
        mode >> 3
    } else {
        mode
    };
    class & bits == bits
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt;

    use nix::unistd::{Gid, Uid};

    use super::*;

    fn nobody() -> Identity {
        Identity {
            name: "nobody".into(),
            uid: Uid::from_raw(65534),
            gid: Gid::from_raw(65534),
            groups: vec![Gid::from_raw(65534)],
        }
    }

    fn key_in_temp(mode: u32) -> (PathBuf, Needed) {
        let dir =
            std::env::temp_dir().join(format!("portcullis-access-{}-{mode:o}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.join("key.pem");
        std::fs::write(&path, "k").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let n = Needed {
            path,
            what: "private key",
            access: Access::Read,
            secret: true,
        };
        (dir, n)
    }

    #[test]
    fn a_world_readable_key_is_refused_with_its_mode_and_the_fix() {
        let (dir, n) = key_in_temp(0o644);
        let found = check(&n, &nobody());
        let exposed: Vec<_> = found
            .iter()
            .filter(|p| p.kind == Kind::KeyExposed)
            .collect();
        assert_eq!(exposed.len(), 1, "{found:?}");
        assert!(exposed[0].message.contains("mode 0644"), "{}", exposed[0]);
        assert!(exposed[0].message.contains("chmod 600"), "{}", exposed[0]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_group_writable_key_is_refused_but_group_readable_is_fine() {
        let (dir, n) = key_in_temp(0o660);
        assert!(
            check(&n, &nobody())
                .iter()
                .any(|p| p.kind == Kind::KeyExposed)
        );
        std::fs::set_permissions(&n.path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(
            !check(&n, &nobody())
                .iter()
                .any(|p| p.kind == Kind::KeyExposed)
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A static route's folder must be enterable and its fallback readable by the service user.
    #[test]
    fn a_static_folder_closed_to_the_service_user_is_reported_with_its_fallback() {
        let dir =
            std::env::temp_dir().join(format!("portcullis-access-static-{}", std::process::id()));
        let www = dir.join("www");
        std::fs::create_dir_all(&www).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(www.join("index.html"), "i").unwrap();
        let text = format!(
            "names = [\"localhost\"]\n[tls]\nself_signed = true\n[[route]]\npath = \"/\"\nstatic = \"{}\"\nindex = \"index.html\"\nfallback = \"index.html\"\n",
            www.display()
        );
        let config = Config::parse(&dir.join("p.toml"), &text).unwrap();
        let needed = needed(&config);
        assert!(
            needed
                .iter()
                .any(|n| n.path == www && n.access == Access::EnterDir),
            "{needed:?}"
        );
        assert!(
            needed
                .iter()
                .any(|n| n.path == www.join("index.html") && n.access == Access::Read),
            "{needed:?}"
        );
        std::fs::set_permissions(&www, std::fs::Permissions::from_mode(0o700)).unwrap();
        let found = problems(&config, &nobody());
        assert!(
            found
                .iter()
                .any(|p| p.path == www && p.message.contains("cannot look into it")),
            "{found:?}"
        );
        std::fs::set_permissions(&www, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(
            www.join("index.html"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(problems(&config, &nobody()).is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn mode_bits_pick_the_owner_then_group_then_other_class() {
        let (dir, n) = key_in_temp(0o604);
        let meta = std::fs::metadata(&n.path).unwrap();
        let mut who = nobody();
        // Not the owner (root, or whoever runs the test), not in the group: "other" (r--).
        assert!(allowed(&meta, &who, R));
        // The owner class (rw-) applies to the owner even when "other" would say otherwise.
        who.uid = Uid::from_raw(meta.uid());
        assert!(allowed(&meta, &who, R | W));
        // Group class (---) applies to a member that is not the owner: denied, though "other" could read.
        who.uid = Uid::from_raw(meta.uid().wrapping_add(1));
        who.groups.push(Gid::from_raw(meta.gid()));
        assert!(!allowed(&meta, &who, R));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
