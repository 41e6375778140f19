//! The process confines itself after the privilege drop (issue 18: Landlock). [`rules`] lists what the
//! running proxy may read and write, from the config (certificate, static, maintenance, ACME, temp and log
//! folders) and from the system (CA bundles, DNS files, its own `/proc` entry); [`ports`] the TCP ports it
//! may bind (its listeners) and connect to (upstreams, the ACME CA, OCSP responders, Redis, DNS over TCP);
//! [`apply`] restricts the still single-threaded process to them, so every thread the runtime starts later
//! inherits the domain; [`uncovered`] is what a reloaded config would need that the sandbox set at start
//! does not allow (the reload then says "restart"). Nothing grants `execute`: no program can be run after
//! start-up. Signals can reach no process outside the domain (ABI 6). Which files the service user may
//! read by its mode bits is `privdrop::access`'s.

use std::fmt;
use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, AccessNet, BitFlags, NetPort, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope,
};
use portcullis_config::{Config, Sandbox, ServerAddr};
use rustls::pki_types::CertificateDer;

use crate::privdrop::access::{self, Needed};

/// Tests only: set to `1` to behave as on a kernel without Landlock (nothing is restricted).
pub const SIMULATE_UNSUPPORTED: &str = "PORTCULLIS_TEST_SIMULATE_NO_LANDLOCK";

/// The filesystem rights the ruleset handles: every one Landlock had by ABI 5 (later ABIs add none for
/// files). What no rule grants is refused, `execute` (no rule grants it) included.
const HANDLED: ABI = ABI::V5;

/// The network rights the ruleset handles (ABI 4: TCP bind and connect; UDP, e.g. DNS, is not covered by
/// Landlock). A kernel before ABI 4 enforces the filesystem rules only ("partly enforced").
const HANDLED_NET: ABI = ABI::V4;

/// Ports the running proxy connects to whatever the config says: DNS over TCP (the resolver's fallback for
/// a long answer), and the default HTTP and HTTPS ports for OCSP responders (a renewed certificate may
/// name another responder than the one at start).
const SYSTEM_CONNECT: &[(u16, &str)] = &[
    (53, "DNS over TCP"),
    (80, "OCSP responders (http)"),
    (443, "OCSP responders (https)"),
];

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

/// Bind or connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NetOp {
    /// `bind(2)` to the port (the listeners, bound before the sandbox; listed so that nothing else can).
    Bind,
    /// `connect(2)` to the port on any address.
    Connect,
}

/// One TCP port the sandbox allows, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRule {
    pub port: u16,
    pub op: NetOp,
    pub what: &'static str,
}

impl fmt::Display for PortRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.op {
            NetOp::Bind => "bind",
            NetOp::Connect => "connect",
        };
        write!(f, "{op:<10} tcp port {} ({})", self.port, self.what)
    }
}

/// What the sandbox is, once [`apply`] has run: logged at start, and what reloads are checked against.
#[derive(Debug, Clone)]
pub enum State {
    /// `sandbox = "off"`.
    Off,
    /// Best effort on a kernel without Landlock (or the test switch): nothing restricted.
    Unsupported,
    /// Landlock restricts the process to `rules` and `ports` (`full`: every handled right is enforced by
    /// this kernel; a kernel before ABI 4 leaves the network alone).
    Enforced {
        rules: Vec<Rule>,
        ports: Vec<PortRule>,
        full: bool,
    },
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            State::Off => write!(f, "sandbox off ([process] sandbox = \"off\")"),
            State::Unsupported => write!(f, "no sandbox (this kernel has no Landlock)"),
            State::Enforced { rules, ports, full } => write!(
                f,
                "Landlock sandbox ({}, {} paths and {} TCP ports allowed, no execute)",
                if *full {
                    "fully enforced"
                } else {
                    "partly enforced"
                },
                rules.len(),
                ports.len()
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

/// Every TCP port the running proxy binds or connects to: its listeners, the config's upstreams, the ACME
/// CA (and the self-check's validation port), Redis, the OCSP responders the certificates served at start
/// name (`responders`, see [`responders`]), and [`SYSTEM_CONNECT`]. Sorted, each port and operation once.
pub fn ports(config: &Config, responders: &[String]) -> Vec<PortRule> {
    let mut out = config_ports(config);
    out.extend(allowance(config));
    for url in responders {
        if let Some(port) = url_port(url) {
            out.push(PortRule {
                port,
                op: NetOp::Connect,
                what: "OCSP responder of a certificate served at start",
            });
        }
    }
    for &(port, what) in SYSTEM_CONNECT {
        out.push(PortRule {
            port,
            op: NetOp::Connect,
            what,
        });
    }
    fold_ports(out)
}

/// The OCSP responder URLs the certificates' leaves name.
pub fn responders<'a>(chains: impl IntoIterator<Item = &'a [CertificateDer<'a>]>) -> Vec<String> {
    chains
        .into_iter()
        .filter_map(portcullis_certs::ocsp::responder_of)
        .collect()
}

/// Confines this process to [`rules`] and [`ports`]. Must run while it has one thread: Landlock restricts
/// the calling thread and those it starts afterwards.
pub fn apply(config: &Config, responders: &[String]) -> Result<State, Error> {
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
    let ports = ports(config, responders);
    let mut created = Ruleset::default()
        .handle_access(AccessFs::from_all(HANDLED))?
        .handle_access(AccessNet::from_all(HANDLED_NET))?
        // ABI 6: no signal to a process outside the domain. Abstract unix sockets are left alone:
        // systemd's `NOTIFY_SOCKET` may be one.
        .scope(Scope::Signal)?
        .create()?;
    for p in &ports {
        let access = match p.op {
            NetOp::Bind => AccessNet::BindTcp,
            NetOp::Connect => AccessNet::ConnectTcp,
        };
        created = created.add_rule(NetPort::new(p.port, access))?;
    }
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
        RulesetStatus::FullyEnforced => Ok(State::Enforced {
            rules,
            ports,
            full: true,
        }),
        _ => Ok(State::Enforced {
            rules,
            ports,
            full: false,
        }),
    }
}

/// What `config` needs that the sandbox in force does not allow: a reload naming any of it needs a
/// restart. Empty when nothing is enforced.
pub fn uncovered(state: &State, config: &Config) -> Vec<String> {
    let State::Enforced {
        rules: allowed,
        ports,
        ..
    } = state
    else {
        return Vec::new();
    };
    let paths = fold(config_rules(config)).into_iter().filter(|need| {
        !allowed
            .iter()
            .any(|a| a.rights >= need.rights && need.path.starts_with(&a.path))
    });
    let net = fold_ports(config_ports(config))
        .into_iter()
        .filter(|need| !ports.iter().any(|a| a.port == need.port && a.op == need.op));
    paths
        .map(|r| r.to_string())
        .chain(net.map(|p| {
            format!("{p}, which [process] sandbox_connect_ports can allow from the start")
        }))
        .collect()
}

/// The ports the config itself names (the certificates' and the system's are added by [`ports`]).
fn config_ports(config: &Config) -> Vec<PortRule> {
    let mut out = Vec::new();
    // Port 0 (a port the kernel picks, as in tests) is bound before the sandbox and needs no rule.
    let mut bind = |port: u16, what| {
        if port != 0 {
            out.push(PortRule {
                port,
                op: NetOp::Bind,
                what,
            });
        }
    };
    for a in &config.listen.https {
        bind(a.port(), "listen.https");
    }
    for a in &config.listen.http {
        bind(a.port(), "listen.http");
    }
    if let Some(portcullis_config::Admin {
        listen: ServerAddr::Tcp(a),
        ..
    }) = &config.admin
    {
        bind(a.port(), "[admin] listen");
    }
    let mut connect = |port: u16, what| {
        out.push(PortRule {
            port,
            op: NetOp::Connect,
            what,
        })
    };
    for up in &config.upstreams {
        for s in &up.servers {
            if let ServerAddr::Tcp(a) = s {
                connect(a.port(), "upstream server");
            }
        }
    }
    // `[acme]`, used by a site or not yet (a reload may add the first ACME site): the CA's directory and
    // the port the self-check asks this instance on.
    if let Some(acme) = &config.acme_paths {
        // A named CA ("letsencrypt"), or a URL without a port: 443.
        let directory = acme.directory.as_deref().and_then(url_port).unwrap_or(443);
        connect(directory, "[acme] CA directory");
        match acme.validation_port {
            Some(port) => connect(port, "[acme] self-check of the validation port"),
            None => {
                connect(80, "[acme] self-check of the validation port");
                connect(443, "[acme] self-check of the validation port");
            }
        }
    }
    if let Some(port) = config.cluster.as_ref().and_then(|c| url_port(&c.redis)) {
        connect(port, "[cluster] redis");
    }
    out
}

/// The ports `[process] sandbox_connect_ports` allows beyond what the config names: with [`ports`], never
/// judged by [`uncovered`] (the operator's allowance for later reloads).
fn allowance(config: &Config) -> impl Iterator<Item = PortRule> + '_ {
    config
        .process
        .sandbox_connect_ports
        .iter()
        .map(|&port| PortRule {
            port,
            op: NetOp::Connect,
            what: "[process] sandbox_connect_ports",
        })
}

/// The TCP port a URL names, or its scheme's default; `None` for a unix socket or what does not parse.
fn url_port(url: &str) -> Option<u16> {
    let uri: http::Uri = url.parse().ok()?;
    if let Some(port) = uri.port_u16() {
        return Some(port);
    }
    match uri.scheme_str()? {
        "http" => Some(80),
        "https" => Some(443),
        "redis" | "rediss" => Some(6379),
        _ => None,
    }
}

/// Sorted by port, each port and operation once (the first reason kept).
fn fold_ports(mut ports: Vec<PortRule>) -> Vec<PortRule> {
    ports.sort_by_key(|p| (p.op, p.port));
    ports.dedup_by_key(|p| (p.op, p.port));
    ports
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
    fn a_url_gives_its_port_or_its_schemes() {
        assert_eq!(url_port("https://127.0.0.1:14000/dir"), Some(14000));
        assert_eq!(url_port("https://[::1]:8443/dir"), Some(8443));
        assert_eq!(
            url_port("https://acme-v02.api.letsencrypt.org/directory"),
            Some(443)
        );
        assert_eq!(url_port("redis://127.0.0.1/0"), Some(6379));
        assert_eq!(url_port("letsencrypt"), None);
        assert_eq!(url_port("unix:///run/redis.sock"), None);
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
