//! Least privilege: who the process becomes once its listeners exist, and the proof that it did. [`plan`]
//! decides before anything is bound (config, `--insecure-keep-root`, who started us); [`apply`] drops the
//! supplementary groups, gid, uid and every capability set while the process is still single-threaded;
//! [`verify`] reads every thread's `/proc/self/task/*/status` and refuses anything that kept a privilege.
//! What the service user must still be able to read is [`access`]'s. System calls go through nix and caps.

pub mod access;

use std::ffi::CString;
use std::fmt;

use caps::{CapSet, Capability};
use nix::sys::prctl;
use nix::unistd::{self, Gid, Group, Uid, User};
use portcullis_config::Process;

/// Who the service runs as: what file access is checked against, and what `apply` switches to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user name, for messages (a number when the uid has no name).
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    /// Supplementary groups (as `initgroups` would set them).
    pub groups: Vec<Gid>,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (uid {}, gid {})", self.name, self.uid, self.gid)
    }
}

/// What [`apply`] will do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Started as root: switch to this unprivileged identity and drop every capability set.
    Switch(Identity),
    /// Started unprivileged (perhaps with CAP_NET_BIND_SERVICE): stay who we are, drop every capability.
    Stay(Identity),
    /// Started as root with no `[process] user` and `--insecure-keep-root`: nothing is dropped.
    InsecureKeepRoot(Identity),
}

impl Plan {
    /// The identity the process serves as: the one file access is checked against.
    pub fn identity(&self) -> &Identity {
        match self {
            Plan::Switch(i) | Plan::Stay(i) | Plan::InsecureKeepRoot(i) => i,
        }
    }
}

/// What [`verify`] requires of every thread after [`apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    /// The bounding set was emptied too (needs CAP_SETPCAP, which only a root start has).
    pub bounding: bool,
}

/// Why the process will not serve with the privileges it has.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Started as root and told nobody to become (the operator's: config or command line).
    #[error(
        "started as root with no [process] user: set `user = \"portcullis\"` (a dedicated \
         unprivileged account) under [process] in the config, or pass --insecure-keep-root to serve every request as root"
    )]
    RootWithoutUser,
    /// The configured user or group does not exist (the operator's).
    #[error("[process] {key} = {name:?}: no such {key} on this system")]
    Unknown { key: &'static str, name: String },
    /// The configured user or group is root, or the user is in group root (the operator's).
    #[error("[process] {what}: that is root (id 0); choose an unprivileged account")]
    IsRoot { what: String },
    /// An unprivileged process cannot become someone else (the operator's: start it as root or as that user).
    #[error(
        "[process] {key} = {name:?}, but the process was started unprivileged as {current}: only a process \
         started as root can switch; start it as {name:?} (systemd `User=`) or as root"
    )]
    CannotSwitch {
        key: &'static str,
        name: String,
        current: String,
    },
    /// Threads exist before the drop: some would keep their capabilities (ours: a start-up order bug).
    #[error(
        "{0} threads exist before dropping privileges: the drop must happen before any thread starts"
    )]
    NotSingleThreaded(usize),
    /// A system call failed (the system's, or a sandbox that forbids it).
    #[error("{step}: {source}")]
    Sys {
        step: &'static str,
        source: nix::Error,
    },
    /// A capability call failed.
    #[error("{step}: {message}")]
    Caps { step: &'static str, message: String },
    /// /proc could not be read, so nothing can be proven.
    #[error("cannot read {path} to verify the privilege drop: {source}")]
    Proc {
        path: String,
        source: std::io::Error,
    },
    /// After the drop, some thread still holds a privilege (ours, or the kernel's: refuse to serve).
    #[error("privileges still held after the drop, refusing to serve: {}", .0.join("; "))]
    Kept(Vec<String>),
}

/// True when any of the real, effective or saved user ids is root.
pub fn started_as_root() -> bool {
    unistd::getresuid().map_or(unistd::geteuid().is_root(), |r| {
        r.real.is_root() || r.effective.is_root() || r.saved.is_root()
    })
}

/// Decides who the process becomes, before anything is bound: a bad `[process]` costs no socket.
pub fn plan(process: &Process, insecure_keep_root: bool) -> Result<Plan, Error> {
    let current = current()?;
    if !started_as_root() {
        return stay(process, current).map(Plan::Stay);
    }
    match &process.user {
        Some(_) => target(process).map(Plan::Switch),
        None if insecure_keep_root => Ok(Plan::InsecureKeepRoot(current)),
        None => Err(Error::RootWithoutUser),
    }
}

/// The identity files must be accessible to (`portcullis check`): the configured user, else whoever runs
/// the check.
pub fn service_identity(process: &Process) -> Result<Identity, Error> {
    match &process.user {
        Some(_) => target(process),
        None => current(),
    }
}

/// Carries out `plan`. Must run before any thread exists: capabilities are per thread, and every thread
/// made later inherits what this one has.
pub fn apply(plan: &Plan) -> Result<Option<Dropped>, Error> {
    let target = match plan {
        Plan::InsecureKeepRoot(_) => return Ok(None),
        Plan::Switch(t) => Some(t),
        Plan::Stay(_) => None,
    };
    let threads = task_ids()?.len();
    if threads != 1 {
        return Err(Error::NotSingleThreaded(threads));
    }
    // The bounding set can only shrink with CAP_SETPCAP (a root start has it; systemd's ambient
    // CAP_NET_BIND_SERVICE start does not, and there NoNewPrivs plus empty sets leave nothing to regain).
    let bounding = caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false);
    if bounding {
        caps::clear(None, CapSet::Bounding)
            .map_err(caps_err("emptying the capability bounding set"))?;
    }
    caps::clear(None, CapSet::Ambient).map_err(caps_err("clearing the ambient capabilities"))?;
    clear(CapSet::Inheritable, "clearing the inheritable capabilities")?;
    if let Some(t) = target {
        unistd::setgroups(&t.groups).map_err(sys("setgroups"))?;
        unistd::setresgid(t.gid, t.gid, t.gid).map_err(sys("setresgid"))?;
        // Last: it takes CAP_SETUID/CAP_SETGID with it (the kernel also clears permitted and effective).
        unistd::setresuid(t.uid, t.uid, t.uid).map_err(sys("setresuid"))?;
    }
    // Permitted (and with it effective): CAP_NET_BIND_SERVICE after binding, or whatever a root start kept.
    clear(CapSet::Permitted, "clearing the permitted capabilities")?;
    prctl::set_no_new_privs().map_err(sys("prctl(PR_SET_NO_NEW_PRIVS)"))?;
    Ok(Some(Dropped { bounding }))
}

/// Proves the drop from `/proc/self/task/*/status`: every thread has non-root uids and gids, no root
/// supplementary group, empty effective/permitted/inheritable/ambient sets (and bounding set, when it was
/// emptied) and NoNewPrivs. Returns the number of threads checked.
pub fn verify(dropped: Dropped) -> Result<usize, Error> {
    let tids = task_ids()?;
    let mut kept = Vec::new();
    for tid in &tids {
        let path = format!("/proc/self/task/{tid}/status");
        let status = match std::fs::read_to_string(&path) {
            Ok(s) => s,
            // The thread ended between listing and reading: nothing left to check.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(Error::Proc { path, source }),
        };
        kept.extend(
            status_problems(&status, dropped)
                .into_iter()
                .map(|p| format!("thread {tid}: {p}")),
        );
    }
    if kept.is_empty() {
        Ok(tids.len())
    } else {
        Err(Error::Kept(kept))
    }
}

/// The privileges a `/proc/*/status` text shows that a dropped thread must not have.
fn status_problems(status: &str, dropped: Dropped) -> Vec<String> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let mut out = Vec::new();
    for name in ["Uid", "Gid"] {
        match field(name) {
            Some(ids) if !ids.split_whitespace().any(|id| id == "0") => {}
            Some(ids) => out.push(format!("{name} {ids}")),
            None => out.push(format!("no {name} line")),
        }
    }
    if let Some(groups) = field("Groups").filter(|g| g.split_whitespace().any(|g| g == "0")) {
        out.push(format!("Groups {groups}"));
    }
    let mut sets = vec!["CapEff", "CapPrm", "CapInh", "CapAmb"];
    if dropped.bounding {
        sets.push("CapBnd");
    }
    for name in sets {
        match field(name).map(|v| u64::from_str_radix(v, 16)) {
            Some(Ok(0)) => {}
            Some(_) => out.push(format!("{name} {}", field(name).unwrap_or(""))),
            None if name == "CapAmb" => {} // kernels before 4.3 have no ambient set
            None => out.push(format!("no {name} line")),
        }
    }
    if field("NoNewPrivs") != Some("1") {
        out.push(format!(
            "NoNewPrivs {}",
            field("NoNewPrivs").unwrap_or("missing")
        ));
    }
    out
}

/// The thread ids of this process.
fn task_ids() -> Result<Vec<String>, Error> {
    let proc_err = |source| Error::Proc {
        path: "/proc/self/task".into(),
        source,
    };
    let mut ids = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").map_err(proc_err)? {
        ids.push(
            entry
                .map_err(proc_err)?
                .file_name()
                .to_string_lossy()
                .into_owned(),
        );
    }
    Ok(ids)
}

/// Who we are now (effective ids and supplementary groups).
fn current() -> Result<Identity, Error> {
    let uid = unistd::geteuid();
    let name = User::from_uid(uid)
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |u| u.name);
    Ok(Identity {
        name,
        uid,
        gid: unistd::getegid(),
        groups: unistd::getgroups().map_err(sys("getgroups"))?,
    })
}

/// The configured user (and group), resolved; none of them root.
fn target(process: &Process) -> Result<Identity, Error> {
    let Some(name) = &process.user else {
        return current();
    };
    let user = user_named(name)?;
    if user.uid.is_root() {
        return Err(Error::IsRoot {
            what: format!("user = {name:?}"),
        });
    }
    let gid = match &process.group {
        Some(g) => group_id(g)?,
        None => user.gid,
    };
    if gid.as_raw() == 0 {
        return Err(Error::IsRoot {
            what: format!("group of user {name:?}"),
        });
    }
    // The config checker allows only [A-Za-z0-9_.-] in names, so there is no NUL to fail on.
    let cname = CString::new(name.as_str()).map_err(|_| Error::Unknown {
        key: "user",
        name: name.clone(),
    })?;
    let groups = unistd::getgrouplist(&cname, gid).map_err(sys("getgrouplist"))?;
    if groups.iter().any(|g| g.as_raw() == 0) {
        return Err(Error::IsRoot {
            what: format!("user {name:?} is a member of group root"),
        });
    }
    Ok(Identity {
        name: user.name,
        uid: user.uid,
        gid,
        groups,
    })
}

/// Started unprivileged: `[process]` may only name who we already are.
fn stay(process: &Process, current: Identity) -> Result<Identity, Error> {
    let mismatch = |key, name: &String| Error::CannotSwitch {
        key,
        name: name.clone(),
        current: current.to_string(),
    };
    if let Some(name) = &process.user {
        let uid = user_named(name)?.uid;
        if uid != current.uid {
            return Err(mismatch("user", name));
        }
    }
    if let Some(name) = &process.group {
        let gid = group_id(name)?;
        if gid != current.gid {
            return Err(mismatch("group", name));
        }
    }
    Ok(current)
}

fn user_named(name: &str) -> Result<User, Error> {
    User::from_name(name)
        .map_err(sys("looking up [process] user"))?
        .ok_or_else(|| Error::Unknown {
            key: "user",
            name: name.to_owned(),
        })
}

fn group_id(name: &str) -> Result<Gid, Error> {
    let group = Group::from_name(name)
        .map_err(sys("looking up [process] group"))?
        .ok_or_else(|| Error::Unknown {
            key: "group",
            name: name.to_owned(),
        })?;
    if group.gid.as_raw() == 0 {
        return Err(Error::IsRoot {
            what: format!("group = {name:?}"),
        });
    }
    Ok(group.gid)
}

/// Empties a capability set, with no capset(2) call when it is empty already: a socket-activated service
/// holds nothing, and its unit may forbid capset (systemd `SystemCallFilter=~@privileged`).
fn clear(set: CapSet, step: &'static str) -> Result<(), Error> {
    if caps::read(None, set).map_err(caps_err(step))?.is_empty() {
        return Ok(());
    }
    caps::clear(None, set).map_err(caps_err(step))
}

fn sys(step: &'static str) -> impl Fn(nix::Error) -> Error {
    move |source| Error::Sys { step, source }
}

fn caps_err(step: &'static str) -> impl Fn(caps::errors::CapsError) -> Error {
    move |e| Error::Caps {
        step,
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DROPPED: &str = "Name:\tportcullis\nUid:\t65534\t65534\t65534\t65534\nGid:\t65534\t65534\t65534\t65534\n\
        Groups:\t65534 \nCapInh:\t0000000000000000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n\
        CapBnd:\t0000000000000000\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\n";

    #[test]
    fn a_dropped_thread_passes() {
        assert!(status_problems(DROPPED, Dropped { bounding: true }).is_empty());
    }

    #[test]
    fn a_saved_root_uid_is_caught() {
        let s = DROPPED.replace(
            "Uid:\t65534\t65534\t65534\t65534",
            "Uid:\t65534\t65534\t0\t65534",
        );
        assert_eq!(
            status_problems(&s, Dropped { bounding: true }),
            ["Uid 65534\t65534\t0\t65534"]
        );
    }

    #[test]
    fn any_capability_left_is_caught() {
        let s = DROPPED
            .replace("CapEff:\t0000000000000000", "CapEff:\t0000000000000400")
            .replace("CapBnd:\t0000000000000000", "CapBnd:\t000001ffffffffff")
            .replace("NoNewPrivs:\t1", "NoNewPrivs:\t0");
        let found = status_problems(&s, Dropped { bounding: true });
        assert_eq!(found.len(), 3, "{found:?}");
        // Without CAP_SETPCAP the bounding set stays; the other sets must still be empty.
        assert_eq!(status_problems(&s, Dropped { bounding: false }).len(), 2);
    }

    #[test]
    fn membership_of_group_root_is_caught() {
        let s = DROPPED.replace("Groups:\t65534 ", "Groups:\t0 65534");
        assert_eq!(status_problems(&s, Dropped { bounding: true }).len(), 1);
    }
}
