//! A raw HTTP/2 client for what a well-behaved one refuses to send: hand-built frames (RFC 9113 §4) and
//! HPACK literals without indexing or Huffman (RFC 7541 §6.2.2), so tests can send malformed requests,
//! rapid resets and CONTINUATION floods, and see which frames come back.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const DATA: u8 = 0;
pub const HEADERS: u8 = 1;
pub const RST_STREAM: u8 = 3;
pub const SETTINGS: u8 = 4;
pub const GOAWAY: u8 = 7;
pub const CONTINUATION: u8 = 9;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn int(out: &mut Vec<u8>, mut n: usize) {
    // 7-bit prefix integer, H bit clear.
    if n < 127 {
        out.push(n as u8);
        return;
    }
    out.push(127);
    n -= 127;
    while n >= 128 {
        out.push((n % 128 + 128) as u8);
        n /= 128;
    }
    out.push(n as u8);
}

/// A header block of literal fields, never indexed.
pub fn block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        int(&mut out, name.len());
        out.extend_from_slice(name.as_bytes());
        int(&mut out, value.len());
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// The connection preface and an empty SETTINGS frame.
pub fn preface() -> Vec<u8> {
    let mut p = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    p.extend(frame(SETTINGS, 0, 0, &[]));
    p
}

/// Writes `bytes`, then reads frames until the server closes, sends GOAWAY, `done` says so, or 5 s pass
/// without a byte; returns the frame types and flags seen, with each RST_STREAM / GOAWAY error code.
pub async fn exchange<S>(
    s: &mut S,
    bytes: &[u8],
    done: impl Fn(&[(u8, u8, u32)]) -> bool,
) -> Vec<(u8, u8, u32)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    // The server may stop reading mid-way (GOAWAY, close): a failed write is part of what is observed.
    let _ = s.write_all(bytes).await;
    let _ = s.flush().await;
    let mut got = Vec::new();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        let n = match tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut chunk))
            .await
        {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= 9 {
            let len =
                (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let payload = &buf[9..9 + len];
            let code = match kind {
                RST_STREAM if len >= 4 => {
                    u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                }
                GOAWAY if len >= 8 => {
                    u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]])
                }
                _ => 0,
            };
            got.push((kind, flags, code));
            buf.drain(..9 + len);
        }
        if got.iter().any(|(k, _, _)| *k == GOAWAY) || done(&got) {
            break;
        }
    }
    got
}
