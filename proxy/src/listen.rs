//! The listeners, before the runtime starts and before privileges are dropped: bound here from `[listen]`,
//! or adopted from systemd socket activation (`LISTEN_FDS`, sd_listen_fds(3)), which needs no privilege at
//! all. IPv6 sockets we bind are v6-only so that `0.0.0.0:443` and `[::]:443` can both be bound, as in
//! the default. The admin listener (`[admin]`, TCP or a unix socket) is always bound here, socket
//! activation or not.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;

use nix::unistd::{Gid, Uid};
use portcullis_config::{Listen, ServerAddr};
use socket2::{Domain, SockRef, Socket, Type};

/// The bound, listening sockets, still std (no runtime yet).
#[derive(Debug)]
pub struct Bound {
    pub https: Vec<TcpListener>,
    pub http: Vec<TcpListener>,
    /// `[admin]`'s listener, if the config has one.
    pub admin: Option<Admin>,
}

/// The admin listener's socket.
#[derive(Debug)]
pub enum Admin {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Why there is nothing to listen on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An address could not be bound (the operator's: in use, or no privilege for a port below 1024).
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    /// A socket passed by systemd is unusable (the operator's: the .socket unit).
    #[error("socket activation: passed socket {index}{name}: {message}")]
    Adopt {
        index: usize,
        name: String,
        message: String,
    },
    /// The admin listener could not be bound (the operator's: in use, a folder missing, not a socket).
    #[error("cannot listen on {addr} ([admin] listen): {source}")]
    Admin { addr: ServerAddr, source: io::Error },
}

/// Raises the soft open-file limit to the hard one, and warns when that still leaves fewer than two
/// descriptors per connection `[limits] connections` allows (each client connection takes one, and its
/// upstream connection another). systemd starts services with a soft limit of 1024 (hard 524288) and asks
/// those that need more to raise it themselves, which needs no privilege.
pub fn raise_open_file_limit(connections: u64) {
    match raise_to_hard() {
        Ok(n) if n < connections.saturating_mul(2) => tracing::warn!(
            "the open-file limit ({n}) is below two per connection for [limits] connections = {connections}: \
             connections past it fail at accept; raise LimitNOFILE (systemd) or ulimit -n"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot raise the open-file limit: {e}"),
    }
}

/// Adopts systemd's sockets when `LISTEN_PID` names this process, else binds `[listen]`.
pub fn bind_or_adopt(listen: &Listen) -> Result<Bound, Error> {
    match passed() {
        Some(fds) => adopt(listen, fds),
        None => bind(listen),
    }
}

/// Binds `[admin] listen`. A unix socket replaces a stale one left by an earlier run (never another kind of
/// file, nor a socket something still answers on), is made 0660 and given to `owner` (the service user and its group, who may then connect, as root
/// may).
pub fn bind_admin(addr: &ServerAddr, owner: (Uid, Gid)) -> Result<Admin, Error> {
    let err = |source| Error::Admin {
        addr: addr.clone(),
        source,
    };
    match addr {
        ServerAddr::Tcp(a) => bind_one(*a).map(Admin::Tcp).map_err(err),
        ServerAddr::Unix(path) => bind_unix(path, owner).map(Admin::Unix).map_err(err),
    }
}

pub fn bind(listen: &Listen) -> Result<Bound, Error> {
    let all = |addrs: &[SocketAddr]| {
        addrs
            .iter()
            .map(|a| bind_one(*a).map_err(|source| Error::Bind { addr: *a, source }))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(Bound {
        https: all(&listen.https)?,
        http: all(&listen.http)?,
        admin: None,
    })
}

fn bind_unix(path: &Path, (uid, gid): (Uid, Gid)) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            // Another instance may be serving on it: a socket someone answers on is not stale.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is listening on this socket",
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    if Uid::effective().is_root() {
        nix::unistd::chown(path, Some(uid), Some(gid)).map_err(io::Error::from)?;
    }
    listener.set_nonblocking(true)?;
    Ok(listener)
}

fn raise_to_hard() -> nix::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard)
}

fn bind_one(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Which listener a socket serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Https,
    Http,
}

/// The passed sockets' indices and names, when systemd started this very process with some.
fn passed() -> Option<Vec<(usize, String)>> {
    let pid = std::env::var("LISTEN_PID").ok()?;
    let count: usize = std::env::var("LISTEN_FDS").ok()?.trim().parse().ok()?;
    if pid.trim().parse::<u32>().ok()? != std::process::id() {
        // Meant for another process (we were started by something that inherited the environment).
        return None;
    }
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|n| n.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    Some(
        (0..count)
            .map(|i| (i, names.get(i).cloned().unwrap_or_default()))
            .collect(),
    )
}

/// Takes every passed socket: by name (`https`, `http`: systemd's `FileDescriptorName=`), else by the
/// `[listen]` address it is bound to, else by its port alone.
fn adopt(listen: &Listen, fds: Vec<(usize, String)>) -> Result<Bound, Error> {
    let mut passed = listenfd::ListenFd::from_env();
    let mut bound = Bound {
        https: Vec::new(),
        http: Vec::new(),
        admin: None,
    };
    for (index, name) in fds {
        let err = |message: String| Error::Adopt {
            index,
            name: if name.is_empty() {
                String::new()
            } else {
                format!(" ({name})")
            },
            message,
        };
        let listener = passed
            .take_tcp_listener(index)
            .map_err(|e| err(e.to_string()))?
            .ok_or_else(|| err("already taken".into()))?;
        if !SockRef::from(&listener)
            .is_listener()
            .map_err(|e| err(e.to_string()))?
        {
            return Err(err(
                "is not listening (a .socket unit with Accept=yes? Portcullis needs Accept=no)"
                    .into(),
            ));
        }
        let addr = listener.local_addr().map_err(|e| err(e.to_string()))?;
        let kind = match name.as_str() {
            "https" => Kind::Https,
            "http" => Kind::Http,
            _ => by_address(listen, addr).ok_or_else(|| {
                err(format!(
                    "bound to {addr}, which is in neither [listen] https nor http (or in both): name it \
                     with FileDescriptorName=https or =http in the .socket unit"
                ))
            })?,
        };
        listener
            .set_nonblocking(true)
            .map_err(|e| err(e.to_string()))?;
        tracing::info!(%addr, fdname = %name, ?kind, "socket activation: adopted a socket from systemd");
        match kind {
            Kind::Https => bound.https.push(listener),
            Kind::Http => bound.http.push(listener),
        }
    }
    if bound.https.is_empty() {
        tracing::warn!(
            "socket activation: no HTTPS socket was passed; serving plain HTTP redirects only"
        );
    }
    Ok(bound)
}

/// The listener `addr` belongs to: an exact `[listen]` address, else a unique port (systemd's
/// `ListenStream=443` is `[::]:443`, dual-stack, where the config may say `0.0.0.0:443`).
fn by_address(listen: &Listen, addr: SocketAddr) -> Option<Kind> {
    let pick = |https: bool, http: bool| match (https, http) {
        (true, false) => Some(Kind::Https),
        (false, true) => Some(Kind::Http),
        _ => None,
    };
    pick(listen.https.contains(&addr), listen.http.contains(&addr)).or_else(|| {
        let port = |list: &[SocketAddr]| list.iter().any(|a| a.port() == addr.port());
        pick(port(&listen.https), port(&listen.http))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn listen() -> Listen {
        Listen {
            https: vec!["0.0.0.0:443".parse().unwrap(), "[::]:443".parse().unwrap()],
            http: vec!["127.0.0.1:80".parse().unwrap()],
            proxy_protocol: false,
        }
    }

    fn kind(l: &Listen, addr: &str) -> Option<Kind> {
        by_address(l, addr.parse().unwrap())
    }

    #[test]
    fn passed_sockets_match_by_exact_address_then_by_port() {
        let l = listen();
        assert_eq!(kind(&l, "[::]:443"), Some(Kind::Https));
        assert_eq!(kind(&l, "10.0.0.1:443"), Some(Kind::Https));
        assert_eq!(kind(&l, "[::]:80"), Some(Kind::Http));
        assert_eq!(kind(&l, "[::]:8080"), None);
    }

    #[test]
    fn a_port_in_both_lists_is_ambiguous() {
        let mut l = listen();
        l.http.push("127.0.0.2:443".parse().unwrap());
        assert_eq!(kind(&l, "10.0.0.1:443"), None);
        assert_eq!(kind(&l, "[::]:443"), Some(Kind::Https));
        assert_eq!(kind(&l, "127.0.0.2:443"), Some(Kind::Http));
    }
}
