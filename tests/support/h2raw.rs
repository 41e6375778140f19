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

/// A frame as received.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The RST_STREAM or GOAWAY error code (0 for other frames).
    pub fn code(&self) -> u32 {
        let p = &self.payload;
        match self.kind {
            RST_STREAM if p.len() >= 4 => u32::from_be_bytes([p[0], p[1], p[2], p[3]]),
            GOAWAY if p.len() >= 8 => u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
            _ => 0,
        }
    }

    /// For a HEADERS frame of a response: its `:status` (see [`status`]).
    pub fn status(&self) -> Option<u16> {
        (self.kind == HEADERS)
            .then(|| status(&self.payload))
            .flatten()
    }
}

/// What a read of frames saw: the frames, and whether the server closed the connection (EOF or an error)
/// rather than falling silent for 5 s.
#[derive(Debug, Default)]
pub struct Seen {
    pub frames: Vec<Frame>,
    pub closed: bool,
}

impl Seen {
    /// The status `stream` was answered with (its first HEADERS), and its body (its DATA, joined).
    pub fn answer(&self, stream: u32) -> (Option<u16>, String) {
        let status = self
            .frames
            .iter()
            .find(|f| f.stream == stream && f.kind == HEADERS)
            .and_then(|f| f.status());
        let body: Vec<u8> = self
            .frames
            .iter()
            .filter(|f| f.stream == stream && f.kind == DATA)
            .flat_map(|f| f.payload.clone())
            .collect();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
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
    let summary = |frames: &[Frame]| -> Vec<(u8, u8, u32)> {
        frames.iter().map(|f| (f.kind, f.flags, f.code())).collect()
    };
    summary(&read_frames(s, |f| done(&summary(f))).await.frames)
}

/// Reads frames until the server closes, sends GOAWAY, `done` says so, or 5 s pass without a byte.
pub async fn read_frames<S>(s: &mut S, done: impl Fn(&[Frame]) -> bool) -> Seen
where
    S: tokio::io::AsyncRead + Unpin,
{
    let mut seen = Seen::default();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        let n = match tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut chunk))
            .await
        {
            Ok(Ok(n)) if n > 0 => n,
            Ok(_) => {
                seen.closed = true;
                break;
            }
            Err(_) => break,
        };
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= 9 {
            let len =
                (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            seen.frames.push(Frame {
                kind: buf[3],
                flags: buf[4],
                stream: u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff,
                payload: buf[9..9 + len].to_vec(),
            });
            buf.drain(..9 + len);
        }
        if seen.frames.iter().any(|f| f.kind == GOAWAY) || done(&seen.frames) {
            break;
        }
    }
    seen
}

/// The `:status` of a response header block, which servers send first: indexed from the static table
/// (RFC 7541 Appendix A: 8..=14) or a literal with the `:status` name (index 8), its value plain or
/// Huffman-coded digits. Enough for the first response on a connection (no dynamic table).
pub fn status(block: &[u8]) -> Option<u16> {
    let mut b = block;
    // Dynamic table size updates (001xxxxx) may come first.
    while b.first().is_some_and(|x| x & 0xe0 == 0x20) {
        b = &b[1..];
    }
    let first = *b.first()?;
    if first & 0x80 != 0 {
        return [200, 204, 206, 304, 400, 404, 500]
            .get(usize::from(first & 0x7f).checked_sub(8)?)
            .copied();
    }
    // Literal with incremental indexing (01xxxxxx, 6-bit index) or without / never indexed (4-bit).
    let index = if first & 0x40 != 0 {
        first & 0x3f
    } else {
        first & 0x0f
    };
    if index != 8 {
        return None;
    }
    let (huffman, len) = (b.get(1)? & 0x80 != 0, usize::from(b.get(1)? & 0x7f));
    let value = b.get(2..2 + len)?;
    let digits = if huffman {
        huffman_digits(value)?
    } else {
        String::from_utf8(value.to_vec()).ok()?
    };
    digits.parse().ok()
}

/// Decodes a Huffman string of digits (RFC 7541 Appendix B: '0'-'2' are 5 bits, 00000-00010; '3'-'9'
/// 6 bits, 011001-011111), ending in EOS padding (all ones).
fn huffman_digits(bytes: &[u8]) -> Option<String> {
    let bits: Vec<bool> = bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| b >> i & 1 == 1))
        .collect();
    let mut out = String::new();
    let mut i = 0;
    while i < bits.len() {
        let rest = &bits[i..];
        if rest.iter().all(|&b| b) && rest.len() < 8 {
            break;
        }
        let code = |n: usize| {
            rest.get(..n)
                .map(|c| c.iter().fold(0u8, |acc, &b| acc << 1 | u8::from(b)))
        };
        match code(5)? {
            c @ 0..=2 => {
                out.push(char::from(b'0' + c));
                i += 5;
            }
            _ => match code(6)? {
                c @ 0x19..=0x1f => {
                    out.push(char::from(b'0' + 3 + (c - 0x19)));
                    i += 6;
                }
                _ => return None,
            },
        }
    }
    Some(out)
}
