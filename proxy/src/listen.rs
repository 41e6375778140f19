//! Binding the listeners, before the runtime starts (and, later, before privileges are dropped). IPv6
//! sockets are v6-only so that `0.0.0.0:443` and `[::]:443` can both be bound, as in the default.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Socket, Type};

/// The bound, listening sockets, still std (no runtime yet).
#[derive(Debug)]
pub struct Bound {
    pub https: Vec<std::net::TcpListener>,
    pub http: Vec<std::net::TcpListener>,
}

pub fn bind(listen: &portcullis_config::Listen) -> Result<Bound, (SocketAddr, io::Error)> {
    let all = |addrs: &[SocketAddr]| {
        addrs
            .iter()
            .map(|a| bind_one(*a).map_err(|e| (*a, e)))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(Bound {
        https: all(&listen.https)?,
        http: all(&listen.http)?,
    })
}

fn bind_one(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
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
