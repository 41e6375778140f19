//! The process's system-call filter (issue 18, second part): [`allow_list`] is every system call the
//! running proxy makes, in groups, derived from `strace -f -c` over the whole test suite plus what tokio,
//! glibc and rustls call on paths the suite does not take; [`apply`] installs it (seccomp-BPF, built by
//! `seccompiler`) right after the privilege drop and Landlock, so every thread started later inherits it.
//! A call outside the list fails with `EPERM`, or kills the process (`[process] seccomp`). Program
//! execution (`execve`, `execveat`), new processes (a `clone` without `CLONE_THREAD`), `ptrace`, `mount`,
//! `bpf`, `keyctl`, module loading and the like are in no group. The files it may touch are `sandbox`'s.

use std::collections::BTreeMap;
use std::fmt;

use nix::libc;
use portcullis_config::{Config, Sandbox, Seccomp};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Tests only (debug builds): set to `1` to behave as on a kernel that refuses seccomp filters.
pub const SIMULATE_UNSUPPORTED: &str = "PORTCULLIS_TEST_SIMULATE_NO_SECCOMP";

/// One group of the allow-list: what it is for, and its calls (each with the argument values it is
/// limited to, when it is).
#[derive(Debug)]
pub struct Group {
    pub what: &'static str,
    pub calls: Vec<Call>,
}

/// One allowed system call.
#[derive(Debug)]
pub struct Call {
    pub name: &'static str,
    nr: i64,
    /// Alternatives (any one matching allows the call); empty: any arguments.
    only: Vec<SeccompRule>,
    /// How `check` shows the limit, if there is one.
    pub limit: Option<&'static str>,
}

/// What the filter is, once [`apply`] has run: logged at start.
#[derive(Debug, Clone)]
pub enum State {
    /// `seccomp = "off"`, or `sandbox = "off"` (which turns the whole self-confinement off).
    Off,
    /// Best effort, and this kernel (or a filter around the process) refused ours.
    Unsupported(String),
    /// In force on every thread: `allowed` system calls; the others fail with EPERM or kill the process.
    Enforced { allowed: usize, action: Seccomp },
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            State::Off => write!(f, "seccomp off"),
            State::Unsupported(why) => write!(f, "no seccomp filter ({why})"),
            State::Enforced { allowed, action } => {
                write!(
                    f,
                    "seccomp: {allowed} syscalls allowed, others {}",
                    others(*action)
                )
            }
        }
    }
}

/// Why the filter was not set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `sandbox = "require"` and the kernel refused the filter (the operator's: another kernel or container
    /// policy, or best-effort).
    #[error(
        "[process] sandbox = \"require\", but this kernel does not accept a seccomp filter ({0}): run on \
         a kernel with CONFIG_SECCOMP_FILTER, outside a policy that forbids seccomp(2), or set sandbox = \
         \"best-effort\""
    )]
    Required(String),
    /// Our allow-list did not compile to BPF (ours).
    #[error("cannot build the seccomp filter: {0}")]
    Build(String),
}

/// Installs the filter on this process unless the config turns it off. Runs after the privilege drop and
/// Landlock, while the process has one thread; TSYNC puts it on any other thread too.
pub fn apply(config: &Config) -> Result<State, Error> {
    let action = config.process.seccomp;
    if action == Seccomp::Off || config.process.sandbox == Sandbox::Off {
        return Ok(State::Off);
    }
    let refused = |why: String| match config.process.sandbox {
        Sandbox::Require => Err(Error::Required(why)),
        _ => Ok(State::Unsupported(why)),
    };
    if cfg!(debug_assertions) && std::env::var_os(SIMULATE_UNSUPPORTED).is_some_and(|v| v == "1") {
        return refused("simulated for a test".into());
    }
    let Ok(arch) = TargetArch::try_from(std::env::consts::ARCH) else {
        return refused(format!("no filter for {}", std::env::consts::ARCH));
    };
    let groups = allow_list(std::process::id());
    let allowed = groups.iter().map(|g| g.calls.len()).sum();
    let (clone3, list) = programs(groups, action, arch)?;
    // clone3's flags are behind a pointer the filter cannot read: it answers ENOSYS, and glibc falls back
    // to clone, whose flags it can (threads only). Installed first, so that installing the allow-list
    // (prctl, seccomp) is still allowed; the kernel takes the stricter answer of the two filters.
    for program in [&clone3, &list] {
        if let Err(e) = seccompiler::apply_filter_all_threads(program) {
            return refused(e.to_string());
        }
    }
    Ok(State::Enforced { allowed, action })
}

/// What happens to a system call outside the list, for the log and `check`.
pub fn others(action: Seccomp) -> &'static str {
    match action {
        Seccomp::Kill => "kill the process",
        _ => "EPERM",
    }
}

/// The allow-list, in one place: each group with what it is for. `pid` is this process's (signals may be
/// sent to its own threads only).
pub fn allow_list(pid: u32) -> Vec<Group> {
    let mut out = Vec::new();
    let mut group = |what, calls| out.push(Group { what, calls });

    group(
        "I/O on open descriptors (sockets, files, eventfd)",
        vec![
            any("read", libc::SYS_read),
            any("write", libc::SYS_write),
            any("readv", libc::SYS_readv),
            any("writev", libc::SYS_writev),
            any("pread64", libc::SYS_pread64),
            any("pwrite64", libc::SYS_pwrite64),
            any("preadv", libc::SYS_preadv),
            any("pwritev", libc::SYS_pwritev),
            any("lseek", libc::SYS_lseek),
            any("close", libc::SYS_close),
            any("fcntl", libc::SYS_fcntl),
            any("dup", libc::SYS_dup),
            any("dup3", libc::SYS_dup3),
            // Non-blocking mode, bytes readable, close-on-exec; TCGETS and TIOCGWINSZ: is standard error a
            // terminal (the log's colours). No other ioctl (no TIOCSTI).
            only(
                "ioctl",
                libc::SYS_ioctl,
                one_of(
                    1,
                    &[
                        libc::FIONBIO,
                        libc::FIONREAD,
                        libc::FIOCLEX,
                        libc::FIONCLEX,
                        libc::TCGETS,
                        libc::TIOCGWINSZ,
                    ]
                    .map(u64::from),
                ),
                "FIONBIO, FIONREAD, FIOCLEX, FIONCLEX, TCGETS, TIOCGWINSZ",
            ),
        ],
    );
    group(
        "readiness: epoll (tokio), eventfd (its waker), poll (the resolver, std)",
        vec![
            any("epoll_create1", libc::SYS_epoll_create1),
            any("epoll_ctl", libc::SYS_epoll_ctl),
            any("epoll_pwait", libc::SYS_epoll_pwait),
            any("epoll_pwait2", libc::SYS_epoll_pwait2),
            any("eventfd2", libc::SYS_eventfd2),
            any("ppoll", libc::SYS_ppoll),
        ],
    );
    group(
        "sockets: listeners, clients, upstreams, ACME/OCSP/Redis clients, DNS, sd_notify",
        vec![
            // The families the unit's RestrictAddressFamilies= allows: no netlink, packet or raw sockets.
            only(
                "socket",
                libc::SYS_socket,
                one_of(
                    0,
                    &[libc::AF_INET, libc::AF_INET6, libc::AF_UNIX].map(|f| f as u64),
                ),
                "AF_INET, AF_INET6, AF_UNIX",
            ),
            only(
                "socketpair",
                libc::SYS_socketpair,
                one_of(0, &[libc::AF_UNIX as u64]),
                "AF_UNIX",
            ),
            any("bind", libc::SYS_bind),
            any("listen", libc::SYS_listen),
            any("accept", libc::SYS_accept),
            any("accept4", libc::SYS_accept4),
            any("connect", libc::SYS_connect),
            any("shutdown", libc::SYS_shutdown),
            any("getsockname", libc::SYS_getsockname),
            any("getpeername", libc::SYS_getpeername),
            any("getsockopt", libc::SYS_getsockopt),
            any("setsockopt", libc::SYS_setsockopt),
            any("sendto", libc::SYS_sendto),
            any("recvfrom", libc::SYS_recvfrom),
            any("sendmsg", libc::SYS_sendmsg),
            any("recvmsg", libc::SYS_recvmsg),
            any("sendmmsg", libc::SYS_sendmmsg),
            any("recvmmsg", libc::SYS_recvmmsg),
        ],
    );
    group(
        "memory: the allocator, thread stacks; never a new executable mapping",
        vec![
            only("mmap", libc::SYS_mmap, no_exec(2), "without PROT_EXEC"),
            only(
                "mprotect",
                libc::SYS_mprotect,
                no_exec(2),
                "without PROT_EXEC",
            ),
            any("munmap", libc::SYS_munmap),
            any("mremap", libc::SYS_mremap),
            any("madvise", libc::SYS_madvise),
            any("brk", libc::SYS_brk),
        ],
    );
    group(
        "threads: the runtime's workers and blocking pool, the log writer",
        vec![
            // Threads only: a new process (fork, posix_spawn) has no CLONE_THREAD. clone3: see `apply`.
            only(
                "clone",
                libc::SYS_clone,
                vec![rule(vec![cond(
                    0,
                    SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
                    libc::CLONE_THREAD as u64,
                )])],
                "CLONE_THREAD set",
            ),
            // Allowed here so that the ENOSYS of the filter before this one is the answer (see `apply`).
            any("clone3", libc::SYS_clone3),
            any("futex", libc::SYS_futex),
            any("set_robust_list", libc::SYS_set_robust_list),
            any("rseq", libc::SYS_rseq),
            any("set_tid_address", libc::SYS_set_tid_address),
            any("gettid", libc::SYS_gettid),
            any("sched_yield", libc::SYS_sched_yield),
            any("sched_getaffinity", libc::SYS_sched_getaffinity),
            any("exit", libc::SYS_exit),
            any("exit_group", libc::SYS_exit_group),
            // Thread names (the runtime's); reading the no-new-privileges and bounding-set state back.
            only(
                "prctl",
                libc::SYS_prctl,
                one_of(
                    0,
                    &[
                        libc::PR_SET_NAME,
                        libc::PR_GET_NAME,
                        libc::PR_GET_NO_NEW_PRIVS,
                        libc::PR_CAPBSET_READ,
                        libc::PR_GET_DUMPABLE,
                    ]
                    .map(|o| o as u64),
                ),
                "PR_SET_NAME, PR_GET_NAME, PR_GET_NO_NEW_PRIVS, PR_CAPBSET_READ, PR_GET_DUMPABLE",
            ),
        ],
    );
    group(
        "time: timers and deadlines (clock_gettime is the vDSO's, the calls are its fallback)",
        vec![
            any("clock_gettime", libc::SYS_clock_gettime),
            any("clock_getres", libc::SYS_clock_getres),
            any("gettimeofday", libc::SYS_gettimeofday),
            any("nanosleep", libc::SYS_nanosleep),
            any("clock_nanosleep", libc::SYS_clock_nanosleep),
        ],
    );
    group(
        "signals: SIGHUP/SIGTERM/SIGUSR1 handlers, stack overflow guard, abort to this process only",
        vec![
            any("rt_sigaction", libc::SYS_rt_sigaction),
            any("rt_sigprocmask", libc::SYS_rt_sigprocmask),
            any("rt_sigreturn", libc::SYS_rt_sigreturn),
            any("sigaltstack", libc::SYS_sigaltstack),
            any("restart_syscall", libc::SYS_restart_syscall),
            only(
                "tgkill",
                libc::SYS_tgkill,
                one_of(0, &[u64::from(pid)]),
                "this process's threads",
            ),
        ],
    );
    group(
        "files: config and certificate reload, static files, buffered bodies (O_TMPFILE), ACME state \
         (written, fsync'd, renamed, locked), the log file; Landlock decides which paths",
        vec![
            any("openat", libc::SYS_openat),
            any("newfstatat", libc::SYS_newfstatat),
            any("fstat", libc::SYS_fstat),
            any("statx", libc::SYS_statx),
            any("readlinkat", libc::SYS_readlinkat),
            any("faccessat", libc::SYS_faccessat),
            any("faccessat2", libc::SYS_faccessat2),
            any("getdents64", libc::SYS_getdents64),
            any("getcwd", libc::SYS_getcwd),
            any("mkdirat", libc::SYS_mkdirat),
            any("unlinkat", libc::SYS_unlinkat),
            any("renameat", libc::SYS_renameat),
            any("renameat2", libc::SYS_renameat2),
            any("fchmod", libc::SYS_fchmod),
            any("fchmodat", libc::SYS_fchmodat),
            any("ftruncate", libc::SYS_ftruncate),
            any("fallocate", libc::SYS_fallocate),
            any("fsync", libc::SYS_fsync),
            any("fdatasync", libc::SYS_fdatasync),
            any("flock", libc::SYS_flock),
        ],
    );
    #[cfg(target_arch = "x86_64")]
    group(
        "files and readiness, the older x86-64 calls glibc still makes",
        vec![
            any("stat", libc::SYS_stat),
            any("lstat", libc::SYS_lstat),
            any("readlink", libc::SYS_readlink),
            any("access", libc::SYS_access),
            any("mkdir", libc::SYS_mkdir),
            any("unlink", libc::SYS_unlink),
            any("rename", libc::SYS_rename),
            any("chmod", libc::SYS_chmod),
            any("dup2", libc::SYS_dup2),
            any("epoll_wait", libc::SYS_epoll_wait),
            any("poll", libc::SYS_poll),
        ],
    );
    group(
        "inotify: certificate, config and maintenance-flag watches",
        vec![
            any("inotify_init1", libc::SYS_inotify_init1),
            any("inotify_add_watch", libc::SYS_inotify_add_watch),
            any("inotify_rm_watch", libc::SYS_inotify_rm_watch),
        ],
    );
    group(
        "process facts: ids (the drop's check, the log), limits read back (never set), usage",
        vec![
            any("getpid", libc::SYS_getpid),
            any("getuid", libc::SYS_getuid),
            any("geteuid", libc::SYS_geteuid),
            any("getgid", libc::SYS_getgid),
            any("getegid", libc::SYS_getegid),
            any("getresuid", libc::SYS_getresuid),
            any("getresgid", libc::SYS_getresgid),
            any("getgroups", libc::SYS_getgroups),
            any("capget", libc::SYS_capget),
            any("uname", libc::SYS_uname),
            any("getrusage", libc::SYS_getrusage),
            // prlimit64(pid, resource, new, old): reading only (new is NULL).
            only(
                "prlimit64",
                libc::SYS_prlimit64,
                vec![rule(vec![cond_wide(2, SeccompCmpOp::Eq, 0)])],
                "read only",
            ),
        ],
    );
    group(
        "randomness: rustls/aws-lc keys and nonces, hash seeds",
        vec![any("getrandom", libc::SYS_getrandom)],
    );
    // Not here: execve, execveat (no program is run after start-up), fork/vfork, ptrace, process_vm_*,
    // mount and namespaces, bpf, perf_event_open, keyctl, add_key, init_module, kexec, reboot, swapon,
    // set*id, setgroups, capset (the drop is done), chown (the temp folder is handed over before),
    // io_uring, userfaultfd, pipe (the runtime wakes with eventfd), seccomp and landlock_* (both set
    // before this filter; a second filter could only restrict more, but none is needed).
    out
}

/// The two BPF programs: clone3 answered ENOSYS (everything else allowed), then the allow-list.
fn programs(
    groups: Vec<Group>,
    action: Seccomp,
    arch: TargetArch,
) -> Result<(BpfProgram, BpfProgram), Error> {
    let build = |e: seccompiler::BackendError| Error::Build(e.to_string());
    let others = match action {
        Seccomp::Kill => SeccompAction::KillProcess,
        _ => SeccompAction::Errno(libc::EPERM as u32),
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for call in groups.into_iter().flat_map(|g| g.calls) {
        rules.entry(call.nr).or_default().extend(call.only);
    }
    let list = SeccompFilter::new(rules, others, SeccompAction::Allow, arch).map_err(build)?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(build)?;
    Ok((
        clone3.try_into().map_err(build)?,
        list.try_into().map_err(build)?,
    ))
}

fn any(name: &'static str, nr: i64) -> Call {
    Call {
        name,
        nr,
        only: Vec::new(),
        limit: None,
    }
}

fn only(name: &'static str, nr: i64, only: Vec<SeccompRule>, limit: &'static str) -> Call {
    Call {
        name,
        nr,
        only,
        limit: Some(limit),
    }
}

/// Argument `arg` is one of `values` (compared as 32 bits: every value here fits).
fn one_of(arg: u8, values: &[u64]) -> Vec<SeccompRule> {
    values
        .iter()
        .map(|v| rule(vec![cond(arg, SeccompCmpOp::Eq, *v)]))
        .collect()
}

/// Argument `arg` (a mapping's protection) does not have PROT_EXEC.
fn no_exec(arg: u8) -> Vec<SeccompRule> {
    let exec = libc::PROT_EXEC as u64;
    vec![rule(vec![cond(arg, SeccompCmpOp::MaskedEq(exec), 0)])]
}

fn rule(conditions: Vec<SeccompCondition>) -> SeccompRule {
    // Invariant: only `SeccompRule::new(vec![])` fails, and every caller passes one condition.
    #[allow(clippy::expect_used)]
    SeccompRule::new(conditions).expect("a rule with at least one condition")
}

/// A condition on an `int` argument: its low 32 bits (the C ABI leaves the high ones unspecified).
fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    condition(arg, SeccompCmpArgLen::Dword, op, value)
}

/// A condition on a pointer or `long` argument: all 64 bits.
fn cond_wide(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    condition(arg, SeccompCmpArgLen::Qword, op, value)
}

fn condition(arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    // Invariant: `new` fails only for an argument index over 5; every caller passes 0 to 2.
    #[allow(clippy::expect_used)]
    SeccompCondition::new(arg, len, op, value).expect("argument index <= 5")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allow_list_compiles_and_names_each_call_once() {
        let groups = allow_list(1);
        let mut names: Vec<_> = groups
            .iter()
            .flat_map(|g| g.calls.iter().map(|c| c.name))
            .collect();
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n, "a call listed twice");
        for banned in [
            "execve", "execveat", "ptrace", "mount", "bpf", "keyctl", "capset",
        ] {
            assert!(!names.contains(&banned), "{banned} is allowed");
        }
        let arch = TargetArch::try_from(std::env::consts::ARCH).unwrap();
        for action in [Seccomp::Errno, Seccomp::Kill] {
            programs(allow_list(1), action, arch).unwrap();
        }
    }
}
