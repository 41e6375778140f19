//! Opening connections to upstream servers, over TCP or a unix socket, within the connect timeout. The
//! pooled client asks for a connection by an opaque authority `sN`; N indexes the server list built at config
//! load, so the request path never parses an address.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use portcullis_config::ServerAddr;
use tokio::net::{TcpStream, UnixStream};

/// Connects to the servers of every upstream; cheap to clone (the pool holds one per connection attempt).
#[derive(Debug, Clone)]
pub struct Connector {
    servers: Arc<[ServerAddr]>,
    timeout: Duration,
}

impl Connector {
    pub fn new(servers: Arc<[ServerAddr]>, timeout: Duration) -> Connector {
        Connector { servers, timeout }
    }
}

/// An upstream connection, TCP or unix socket.
#[derive(Debug)]
pub enum Io {
    Tcp(TokioIo<TcpStream>),
    Unix(TokioIo<UnixStream>),
}

impl tower_service::Service<Uri> for Connector {
    type Response = Io;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Io>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let server = uri
            .host()
            .and_then(|h| h.strip_prefix('s'))
            .and_then(|n| n.parse::<usize>().ok())
            .and_then(|n| self.servers.get(n).cloned());
        let timeout = self.timeout;
        Box::pin(async move {
            let server = server.ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "no such upstream server")
            })?;
            match tokio::time::timeout(timeout, connect(&server)).await {
                Ok(io) => io,
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "upstream connect timed out",
                )),
            }
        })
    }
}

async fn connect(server: &ServerAddr) -> io::Result<Io> {
    match server {
        ServerAddr::Tcp(addr) => {
            let s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Ok(Io::Tcp(TokioIo::new(s)))
        }
        ServerAddr::Unix(path) => Ok(Io::Unix(TokioIo::new(
            UnixStream::connect(Path::new(path)).await?,
        ))),
    }
}

impl Connection for Io {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl Read for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl Write for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Io::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Tcp(s) => s.is_write_vectored(),
            Io::Unix(s) => s.is_write_vectored(),
        }
    }
}
