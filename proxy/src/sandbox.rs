//! The process confines itself after the privilege drop (issue 18, first part: Landlock's filesystem
//! rules). [`rules`] lists what the running proxy may read and write, from the config (certificate,
//! static, maintenance, ACME, temp and log folders) and from the system (CA bundles, DNS files, its own
//! `/proc` entry); [`apply`] restricts the still single-threaded process to them, so every thread the
//! runtime starts later inherits the domain; [`uncovered`] is what a reloaded config would need that the
//! sandbox set at start does not allow (the reload then says "restart"). Nothing grants `execute`: no
//! program can be run after start-up. Which files the service user may read by its mode bits is
//! `privdrop::access`'s.

use std::fmt;
use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus,
};
use portcullis_config::{Config, Sandbox, ServerAddr};

use crate::privdrop::access::{self, Needed};

/// Tests only: set to `1` to behave as on a kernel without Landlock (nothing is restricted).
pub const SIMULATE_UNSUPPORTED: &str = "PORTCULLIS_TEST_SIMULATE_NO_LANDLOCK";

/// The filesystem rights the ruleset handles: every one Landlock had by ABI 5 (later ABIs add none for
/// files). What no rule grants is refused, `execute` (no rule grants it) included.
const HANDLED: ABI = ABI::V5;

/// Files the system provides that the running proxy reads: CA bundles (the ACME and OCSP clients verify
/// through the platform's roots, loaded at first use), name resolution, time zones, and what the runtime
/// reads to size itself.
const SYSTEM_READ: &[(&str, &str)] = &[
    ("/etc/ssl", "system CA certificates"),
    ("/etc/pki", "system CA certificates"),
    ("/etc/ca-certificates", "system CA certificates"),
    ("/usr/share/ca-certificates", "system CA certificates"),
    ("/usr/local/share/ca-certificates", "system CA certificates"),
    ("/etc/resolv.conf", "name resolution"),
    ("/etc/hosts", "name resolution"),
    ("/etc/nsswitch.conf", "name resolution"),
    ("/etc/host.conf", "name resolution"),
    ("/etc/gai.conf", "name resolution"),
    ("/etc/services", "name resolution"),
    ("/etc/localtime", "time zone"),
    ("/usr/share/zoneinfo", "time zone"),
    // /proc/self is the process's own folder (the static routes read back /proc/self/fd, the privilege
    // check reads /proc/self/task/*/status); the kernel resolves it at start to /proc/PID.
    ("/proc/self", "the process's own /proc entry"),
    ("/sys/fs/cgroup", "CPU quota (the runtime's thread count)"),
    (
        "/sys/devices/system/cpu",
        "CPU count (the runtime's thread count)",
    ),
];

/// Read-only or read-write beneath a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rights {
    /// Read files and list folders beneath.
    Read,
    /// Also create, write, truncate, rename and remove beneath (never execute).
    ReadWrite,
}

/// One path the sandbox allows, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// As the kernel resolved it (symbolic links followed) when it exists.
    pub path: PathBuf,
    pub rights: Rights,
    pub what: &'static str,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rights = match self.rights {
            Rights::Read => "read",
            Rights::ReadWrite => "read-write",
        };
        write!(f, "{rights:<10} {} ({})", self.path.display(), self.what)
    }
}

/// What the sandbox is, once [`apply`] has run: logged at start, and what reloads are checked against.
#[derive(Debug, Clone)]
pub enum State {
    /// `sandbox = "off"`.
    Off,
    /// Best effort on a kernel without Landlock (or the test switch): nothing restricted.
    Unsupported,
    /// Landlock restricts the process to `rules` (`full`: every handled right is enforced by this kernel).
    Enforced { rules: Vec<Rule>, full: bool },
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            State::Off => write!(f, "sandbox off ([process] sandbox = \"off\")"),
            State::Unsupported => write!(f, "no sandbox (this kernel has no Landlock)"),
            State::Enforced { rules, full } => write!(
                f,
                "Landlock sandbox ({}, {} paths allowed, no execute)",
                if *full {
                    "fully enforced"
                } else {
                    "partly enforced"
                },
                rules.len()
            ),
        }
    }
}

/// Why the sandbox was not set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `require` on a kernel that cannot enforce it (the operator's: another kernel, or best-effort).
    #[error(
        "[process] sandbox = \"require\", but this kernel does not enforce Landlock: run on Linux 5.13 or \
         later with Landlock enabled (lsm=landlock), or set sandbox = \"best-effort\""
    )]
    Required,
    /// Landlock refused the ruleset (ours, or the kernel's).
    #[error("cannot set up the Landlock sandbox: {0}")]
    Landlock(#[from] landlock::RulesetError),
}

/// Every path the running proxy needs, as the kernel resolves it today, folded so that no rule is
/// beneath another with the same or more rights.
pub fn rules(config: &Config) -> Vec<Rule> {
    let mut out = config_rules(config);
    let env_certs = ["SSL_CERT_FILE", "SSL_CERT_DIR"]
        .into_iter()
        .filter_map(std::env::var_os)
        .map(PathBuf::from)
        .map(|p| (p, "CA certificates named by the environment"));
    for (path, what) in SYSTEM_READ
        .iter()
        .map(|(p, w)| (PathBuf::from(p), *w))
        .chain(env_certs)
    {
        push(&mut out, &path, Rights::Read, what);
    }
    fold(out)
}

/// Confines this process to [`rules`]. Must run while it has one thread: Landlock restricts the calling
/// thread and those it starts afterwards.
pub fn apply(config: &Config) -> Result<State, Error> {
    let mode = config.process.sandbox;
    if mode == Sandbox::Off {
        return Ok(State::Off);
    }
    if std::env::var_os(SIMULATE_UNSUPPORTED).is_some_and(|v| v == "1") {
        return unsupported(mode);
    }
    let rules = rules(config);
    let read = AccessFs::ReadFile | AccessFs::ReadDir;
    let write = AccessFs::from_all(HANDLED) & !AccessFs::Execute;
    let mut created = Ruleset::default()
        .handle_access(AccessFs::from_all(HANDLED))?
        .create()?;
    for r in &rules {
        // A path gone since `rules` looked: nothing to allow there.
        let Ok(fd) = PathFd::new(&r.path) else {
            continue;
        };
        let rights: BitFlags<AccessFs> = match r.rights {
            Rights::Read => read,
            Rights::ReadWrite => write,
        };
        // A rule on a file may carry only file rights.
        let rights = if r.path.is_dir() {
            rights
        } else {
            rights & AccessFs::from_file(HANDLED)
        };
        created = created.add_rule(PathBeneath::new(fd, rights))?;
    }
    let status = created.restrict_self()?;
    match status.ruleset {
        RulesetStatus::NotEnforced => unsupported(mode),
        RulesetStatus::FullyEnforced => Ok(State::Enforced { rules, full: true }),
        _ => Ok(State::Enforced { rules, full: false }),
    }
}

/// What `config` needs that the sandbox in force does not allow: a reload naming any of it needs a
/// restart. Empty when nothing is enforced.
pub fn uncovered(state: &State, config: &Config) -> Vec<Rule> {
    let State::Enforced { rules: allowed, .. } = state else {
        return Vec::new();
    };
    fold(config_rules(config))
        .into_iter()
        .filter(|need| {
            !allowed
                .iter()
                .any(|a| a.rights >= need.rights && need.path.starts_with(&a.path))
        })
        .collect()
}

/// The rules the config's own paths make (the system's are added by [`rules`]).
fn config_rules(config: &Config) -> Vec<Rule> {
    let mut out = Vec::new();
    // The config is read again on reload; editors and deploys replace it (a new file in its folder).
    if let Some(dir) = config.source.parent().filter(|d| !d.as_os_str().is_empty()) {
        push(&mut out, dir, Rights::Read, "config file's folder");
    }
    for n in access::needed(config) {
        let Needed { path, what, .. } = &n;
        match n.access {
            access::Access::WriteDir => push(&mut out, path, Rights::ReadWrite, what),
            access::Access::EnterDir => push(&mut out, path, Rights::Read, what),
            // A file is replaced on renewal or deploy (certbot, `mv`): allow its folder, and the folder
            // of what a symbolic link points to (certbot's live/ links into archive/).
            access::Access::Read => {
                for p in [Some(path.clone()), std::fs::canonicalize(path).ok()]
                    .into_iter()
                    .flatten()
                {
                    if let Some(dir) = p.parent() {
                        push(&mut out, dir, Rights::Read, what);
                    }
                }
            }
        }
    }
    // `[acme]` without an ACME site yet: a reload that adds the first one starts ACME, so its folders are
    // allowed from the start (`needed` lists them only once a site uses them).
    if let Some(acme) = &config.acme_paths {
        let state = acme
            .state_dir
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(&acme.state_dir);
        push(
            &mut out,
            state,
            Rights::ReadWrite,
            "ACME state directory (or the folder it will be created in)",
        );
        if let Some(dir) = acme.ca_root.as_deref().and_then(Path::parent) {
            push(&mut out, dir, Rights::Read, "ACME CA root's folder");
        }
    }
    if let Some(page) = &config.maintenance.page
        && let Some(dir) = page.parent()
    {
        push(
            &mut out,
            dir,
            Rights::Read,
            "maintenance page's folder (read on reload)",
        );
    }
    push(
        &mut out,
        &config.process.temp_dir,
        Rights::ReadWrite,
        "[process] temp_dir (buffered bodies)",
    );
    if let Some(dir) = config.log.file.as_deref().and_then(Path::parent) {
        push(
            &mut out,
            dir,
            Rights::ReadWrite,
            "[log] file's folder (reopened after rotation)",
        );
    }
    for up in &config.upstreams {
        for s in &up.servers {
            if let ServerAddr::Unix(sock) = s
                && let Some(dir) = sock.parent()
            {
                push(&mut out, dir, Rights::Read, "unix-socket upstream's folder");
            }
        }
    }
    // `[cluster]`: the password is read once at start (before the sandbox); the CA of a `rediss://` server
    // and a `unix://` socket may be opened again when the connection is made anew.
    if let Some(cluster) = &config.cluster {
        if let Some(dir) = cluster.ca_file.as_deref().and_then(Path::parent) {
            push(&mut out, dir, Rights::Read, "[cluster] ca_file's folder");
        }
        if let Some(dir) = cluster
            .redis
            .strip_prefix("unix://")
            .map(Path::new)
            .and_then(Path::parent)
        {
            push(
                &mut out,
                dir,
                Rights::Read,
                "[cluster] Redis socket's folder",
            );
        }
    }
    out
}

/// Adds a rule for `path` as the kernel will resolve it (when it exists; one that does not is kept as
/// written, for `check` to show, and skipped by `apply`).
fn push(out: &mut Vec<Rule>, path: &Path, rights: Rights, what: &'static str) {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    out.push(Rule { path, rights, what });
}

/// Sorted, with every rule beneath another of the same or more rights left out.
fn fold(mut rules: Vec<Rule>) -> Vec<Rule> {
    rules.sort_by(|a, b| a.path.cmp(&b.path).then(b.rights.cmp(&a.rights)));
    let mut out: Vec<Rule> = Vec::new();
    for r in rules {
        if !out
            .iter()
            .any(|o| o.rights >= r.rights && r.path.starts_with(&o.path))
        {
            out.push(r);
        }
    }
    out
}

fn unsupported(mode: Sandbox) -> Result<State, Error> {
    match mode {
        Sandbox::Require => Err(Error::Required),
        _ => Ok(State::Unsupported),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(path: &str, rights: Rights) -> Rule {
        Rule {
            path: path.into(),
            rights,
            what: "t",
        }
    }

    #[test]
    fn rules_beneath_a_wider_one_are_folded() {
        let folded = fold(vec![
            rule("/srv/www/img", Rights::Read),
            rule("/srv/www", Rights::Read),
            rule("/srv/www/up", Rights::ReadWrite),
            rule("/srv/wwwx", Rights::Read),
        ]);
        assert_eq!(
            folded,
            [
                rule("/srv/www", Rights::Read),
                rule("/srv/www/up", Rights::ReadWrite),
                rule("/srv/wwwx", Rights::Read),
            ]
        );
    }
}
