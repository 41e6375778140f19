//! The PROXY protocol (HAProxy's spec, versions 1 and 2): a load balancer in front of us states the client's
//! address in a header before the TLS bytes. Accepted only from `trusted_proxies`; read with `peek` so that
//! not one byte past the header is consumed.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// v1 headers are at most 107 bytes; v2 with TLVs at most 16 + 65535, but we accept 16 + 512.
const MAX: usize = 16 + 512;

/// What a complete header said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The client's address (the connection came through the proxy on its behalf).
    Proxied { len: usize, source: SocketAddr },
    /// A health check or an unknown family: keep the peer's own address.
    Local { len: usize },
}

/// Parses a header at the start of `buf`: `Ok(None)` means more bytes are needed.
pub fn parse(buf: &[u8]) -> Result<Option<Header>, &'static str> {
    if buf.len() >= 12 && &buf[..12] == V2_SIGNATURE {
        return v2(buf);
    }
    if V2_SIGNATURE.starts_with(&buf[..buf.len().min(12)])
        && buf.len() < 12
        && !buf.is_empty()
        && buf[0] == b'\r'
    {
        return Ok(None);
    }
    v1(buf)
}

fn v1(buf: &[u8]) -> Result<Option<Header>, &'static str> {
    if !b"PROXY ".starts_with(&buf[..buf.len().min(6)]) {
        return Err("not a PROXY header");
    }
    let Some(end) = buf.windows(2).take(107).position(|w| w == b"\r\n") else {
        return if buf.len() >= 107 {
            Err("PROXY v1 header too long")
        } else {
            Ok(None)
        };
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| "PROXY v1 header is not text")?;
    let parts: Vec<&str> = line.split(' ').collect();
    let len = end + 2;
    match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(Some(Header::Local { len })),
        ["PROXY", fam @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src.parse().map_err(|_| "PROXY v1: bad source address")?;
            if (*fam == "TCP4") != ip.is_ipv4() {
                return Err("PROXY v1: address does not match the family");
            }
            let port: u16 = sport.parse().map_err(|_| "PROXY v1: bad source port")?;
            Ok(Some(Header::Proxied {
                len,
                source: SocketAddr::new(ip, port),
            }))
        }
        _ => Err("PROXY v1: malformed header"),
    }
}

fn v2(buf: &[u8]) -> Result<Option<Header>, &'static str> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let (ver_cmd, fam) = (buf[12], buf[13]);
    if ver_cmd >> 4 != 2 {
        return Err("PROXY v2: bad version");
    }
    let body = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let len = 16 + body;
    if len > MAX {
        return Err("PROXY v2 header too long");
    }
    if buf.len() < len {
        return Ok(None);
    }
    let a = &buf[16..len];
    match (ver_cmd & 0x0f, fam) {
        (0, _) => Ok(Some(Header::Local { len })),
        (1, 0x11) if a.len() >= 12 => Ok(Some(Header::Proxied {
            len,
            source: SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])),
                u16::from_be_bytes([a[8], a[9]]),
            ),
        })),
        (1, 0x21) if a.len() >= 36 => {
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&a[..16]);
            Ok(Some(Header::Proxied {
                len,
                source: SocketAddr::new(
                    IpAddr::V6(Ipv6Addr::from(ip)),
                    u16::from_be_bytes([a[32], a[33]]),
                ),
            }))
        }
        (1, _) => Ok(Some(Header::Local { len })),
        _ => Err("PROXY v2: bad command"),
    }
}

/// Reads the header from `stream` within `limit`, consuming exactly its bytes; returns the client address.
pub async fn read(
    stream: &mut TcpStream,
    peer: SocketAddr,
    limit: Duration,
) -> io::Result<SocketAddr> {
    let bad = |why: &'static str| io::Error::new(io::ErrorKind::InvalidData, why);
    let header = tokio::time::timeout(limit, async {
        let mut buf = [0u8; MAX];
        loop {
            let n = stream.peek(&mut buf).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before the PROXY header",
                ));
            }
            match parse(&buf[..n]) {
                Ok(Some(h)) => return Ok(h),
                Ok(None) if n == MAX => return Err(bad("PROXY header too long")),
                Ok(None) => stream.readable().await?,
                Err(why) => return Err(bad(why)),
            }
            // peek returns what is buffered; give the rest of the header a moment to arrive.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "PROXY header timeout"))??;
    let (len, addr) = match header {
        Header::Proxied { len, source } => (len, source),
        Header::Local { len } => (len, peer),
    };
    let mut sink = vec![0u8; len];
    stream.read_exact(&mut sink).await?;
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1() {
        let h = parse(b"PROXY TCP4 203.0.113.5 10.0.0.1 5555 443\r\n\x16\x03")
            .unwrap()
            .unwrap();
        assert_eq!(
            h,
            Header::Proxied {
                len: 42,
                source: "203.0.113.5:5555".parse().unwrap()
            }
        );
        let h = parse(b"PROXY TCP6 2001:db8::1 ::1 1 443\r\n")
            .unwrap()
            .unwrap();
        assert!(
            matches!(h, Header::Proxied { source, .. } if source.ip() == "2001:db8::1".parse::<IpAddr>().unwrap())
        );
        assert!(matches!(
            parse(b"PROXY UNKNOWN\r\n"),
            Ok(Some(Header::Local { len: 15 }))
        ));
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4"), Ok(None));
        assert!(parse(b"PROXY TCP4 ::1 ::1 1 2\r\n").is_err());
        assert!(parse(b"\x16\x03\x01").is_err());
        assert!(parse(b"GET / HTTP/1.1\r\n").is_err());
    }

    #[test]
    fn v2() {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[
            0x21, 0x11, 0, 12, 198, 51, 100, 7, 10, 0, 0, 1, 0x30, 0x39, 1, 187,
        ]);
        assert_eq!(parse(&h[..20]), Ok(None));
        let got = parse(&h).unwrap().unwrap();
        assert_eq!(
            got,
            Header::Proxied {
                len: 28,
                source: "198.51.100.7:12345".parse().unwrap()
            }
        );
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local), Ok(Some(Header::Local { len: 16 })));
    }
}
