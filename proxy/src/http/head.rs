//! Strict HTTP/1.1 request heads (RFC 9112), checked before hyper sees a byte of them: the framing-relevant
//! rules that lenient parsers differ on, which is what request smuggling exploits. Pure functions over bytes,
//! no I/O: `guard.rs` feeds them and turns a [`Reject`] into a response. Also the chunked body framing
//! (RFC 9112 §7.1), checked as it streams.

/// Limits on a request head.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Request line plus header lines, in bytes (431 past it).
    pub head_bytes: usize,
    /// Header fields (431 past it).
    pub headers: usize,
    /// Request-target length (414 past it).
    pub uri_bytes: usize,
}

/// Why a head is refused; each maps to one status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// 400, with the reason for the log.
    Bad(&'static str),
    /// 414
    UriTooLong,
    /// 431
    HeadTooLarge,
    /// 501: a transfer coding or method we do not implement.
    NotImplemented(&'static str),
    /// 505
    Version,
    /// 408: the head did not arrive whole in time.
    Timeout,
}

impl Reject {
    pub fn status(self) -> u16 {
        match self {
            Reject::Bad(_) => 400,
            Reject::UriTooLong => 414,
            Reject::HeadTooLarge => 431,
            Reject::NotImplemented(_) => 501,
            Reject::Version => 505,
            Reject::Timeout => 408,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Reject::Bad(why) | Reject::NotImplemented(why) => why,
            Reject::UriTooLong => "request-target too long",
            Reject::HeadTooLarge => "request head too large",
            Reject::Version => "HTTP version not supported",
            Reject::Timeout => "request head timeout",
        }
    }
}

/// How the body after a head is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
}

/// A complete, valid head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Bytes of the head, including leading empty lines and the final CRLF CRLF.
    pub len: usize,
    pub framing: Framing,
    /// The request asks to switch protocols (`Upgrade` + `Connection: upgrade`, HTTP/1.1). Whether bytes
    /// after it stop being HTTP/1.1 depends on the answer: only a `101` does that.
    pub upgrade: bool,
    /// `Expect: 100-continue`: the client sends no body before it is told to.
    pub expect_continue: bool,
}

/// The outcome of looking at the bytes buffered so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Complete(Head),
    /// Need more bytes; `scanned` is where to resume looking for the end of the head.
    Incomplete {
        scanned: usize,
    },
    Reject(Reject),
}

/// Looks for a complete head at the start of `buf`, resuming the search for its end at `scanned`.
pub fn check(buf: &[u8], scanned: usize, limits: &Limits) -> Verdict {
    // RFC 9112 §2.2: ignore empty lines (CRLF) before the request-line.
    let mut start = 0;
    while buf.len() >= start + 2 && &buf[start..start + 2] == b"\r\n" {
        start += 2;
    }
    if buf.len() > start && buf[start] == b'\n' {
        return Verdict::Reject(Reject::Bad("bare LF"));
    }
    // Line endings are checked as bytes arrive, so a head that never uses CRLF is refused at once. The scan
    // stops at the empty line that ends the head: what follows is a body (framed, never parsed as a head)
    // or the next pipelined request (judged on its own).
    let from_byte = scanned.saturating_sub(1).max(start);
    let mut end = None;
    for i in from_byte..buf.len() {
        match buf[i] {
            b'\n' => {
                if i == start || buf[i - 1] != b'\r' {
                    return Verdict::Reject(Reject::Bad("bare LF"));
                }
                if i >= start + 3 && buf[i - 3..i] == *b"\r\n\r" {
                    end = Some(i + 1);
                    break;
                }
            }
            b'\r' if i + 1 < buf.len() && buf[i + 1] != b'\n' => {
                return Verdict::Reject(Reject::Bad("bare CR"));
            }
            _ => {}
        }
    }
    let Some(end) = end else {
        let seen = &buf[start..];
        if !seen.contains(&b'\n') && seen.len() > limits.uri_bytes + 32 {
            return Verdict::Reject(Reject::UriTooLong);
        }
        // The shortest head this can still become ends in "\r\n\r\n" after what is here: refuse as soon as
        // that head would be over the limit the complete check below applies, not one byte earlier.
        if seen.len() >= limits.head_bytes + 4 {
            return Verdict::Reject(Reject::HeadTooLarge);
        }
        return Verdict::Incomplete { scanned: buf.len() };
    };
    if end - start > limits.head_bytes + 4 {
        return Verdict::Reject(Reject::HeadTooLarge);
    }
    match parse(&buf[start..end - 2], limits) {
        Ok(mut head) => {
            head.len = end;
            Verdict::Complete(head)
        }
        Err(r) => Verdict::Reject(r),
    }
}

/// `head` is the request line and header lines, each ending in CRLF (the final empty line excluded). The
/// returned head's `len` is left for the caller to set.
fn parse(head: &[u8], limits: &Limits) -> Result<Head, Reject> {
    let mut lines = Lines { rest: head };
    let line = lines.next().ok_or(Reject::Bad("empty request"))??;
    let (method, target, http10) = request_line(line, limits)?;

    let mut count = 0usize;
    let mut content_length: Option<u64> = None;
    let mut te: Option<&[u8]> = None;
    let mut hosts = 0usize;
    let mut host: &[u8] = b"";
    let mut upgrade = false;
    let mut connection_upgrade = false;
    let mut expect_continue = false;
    for line in lines {
        let line = line?;
        count += 1;
        if count > limits.headers {
            return Err(Reject::HeadTooLarge);
        }
        if matches!(line.first(), Some(b' ' | b'\t')) {
            return Err(Reject::Bad("obs-fold header line"));
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(Reject::Bad("header line without a colon"))?;
        let name = &line[..colon];
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return Err(Reject::Bad("invalid header name"));
        }
        let raw = &line[colon + 1..];
        if !raw
            .iter()
            .all(|&b| b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80)
        {
            return Err(Reject::Bad("control character in a header value"));
        }
        let value = trim_ows(raw);
        if name.eq_ignore_ascii_case(b"content-length") {
            if content_length.is_some() {
                return Err(Reject::Bad("more than one Content-Length"));
            }
            content_length = Some(parse_length(value)?);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if te.is_some() {
                return Err(Reject::Bad("more than one Transfer-Encoding"));
            }
            te = Some(raw);
        } else if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
            host = value;
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            connection_upgrade |= names_upgrade(value);
        } else if name.eq_ignore_ascii_case(b"expect") {
            expect_continue |= value.eq_ignore_ascii_case(b"100-continue");
        }
    }

    if !http10 && hosts != 1 {
        return Err(Reject::Bad("HTTP/1.1 needs exactly one Host"));
    }
    if hosts > 1 {
        return Err(Reject::Bad("more than one Host"));
    }
    if let Some(authority) = absolute_form_authority(target)
        && !authority.eq_ignore_ascii_case(host)
    {
        return Err(Reject::Bad("absolute-form target does not match Host"));
    }
    if method == b"CONNECT" {
        return Err(Reject::NotImplemented("CONNECT"));
    }
    let framing = match (te, content_length) {
        (Some(_), Some(_)) => return Err(Reject::Bad("both Content-Length and Transfer-Encoding")),
        (Some(_), None) if http10 => {
            return Err(Reject::Bad("Transfer-Encoding in an HTTP/1.0 request"));
        }
        (Some(raw), None) => transfer_encoding(raw)?,
        (None, Some(n)) => Framing::Length(n),
        (None, None) => Framing::Length(0),
    };
    Ok(Head {
        len: 0,
        framing,
        upgrade: upgrade && connection_upgrade && !http10,
        expect_continue: expect_continue && !http10,
    })
}

/// Whether a `Connection` field value lists the `upgrade` option.
pub fn names_upgrade(value: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| trim_ows(t).eq_ignore_ascii_case(b"upgrade"))
}

/// Exactly `chunked` (one optional space either side): anything else that ends in chunked is 501, the rest
/// cannot be delimited and is 400.
fn transfer_encoding(raw: &[u8]) -> Result<Framing, Reject> {
    let exact = raw.strip_prefix(b" ").unwrap_or(raw);
    let exact = exact.strip_suffix(b" ").unwrap_or(exact);
    if exact == b"chunked" {
        return Ok(Framing::Chunked);
    }
    let codings: Vec<&[u8]> = raw.split(|&b| b == b',').map(trim_ows).collect();
    let valid = codings
        .iter()
        .all(|c| !c.is_empty() && c.iter().all(|&b| is_tchar(b)));
    let chunked_count = codings
        .iter()
        .filter(|c| c.eq_ignore_ascii_case(b"chunked"))
        .count();
    if valid
        && codings.len() > 1
        && chunked_count == 1
        && codings.last() == Some(&&b"chunked"[..])
        && !raw.contains(&b'\t')
    {
        return Err(Reject::NotImplemented("transfer coding other than chunked"));
    }
    Err(Reject::Bad("Transfer-Encoding is not exactly \"chunked\""))
}

fn request_line<'a>(line: &'a [u8], limits: &Limits) -> Result<(&'a [u8], &'a [u8], bool), Reject> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(if line.len() > limits.uri_bytes {
            Reject::UriTooLong
        } else {
            Reject::Bad("request line is not METHOD SP TARGET SP VERSION")
        });
    };
    // The same bound a head still waiting for its first LF is held to (`check`), so that how the bytes
    // were split never changes the answer.
    if line.len() > limits.uri_bytes + 32 {
        return Err(Reject::UriTooLong);
    }
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return Err(Reject::Bad("invalid method"));
    }
    if target.len() > limits.uri_bytes {
        return Err(Reject::UriTooLong);
    }
    if target.is_empty() || !target.iter().all(|&b| (0x21..=0x7e).contains(&b)) {
        return Err(Reject::Bad("invalid request-target"));
    }
    let form_ok = target[0] == b'/'
        || (target == b"*" && method == b"OPTIONS")
        || absolute_form_authority(target).is_some()
        || method == b"CONNECT";
    if !form_ok {
        return Err(Reject::Bad(
            "request-target is not origin-form or absolute-form",
        ));
    }
    let http10 = match version {
        b"HTTP/1.1" => false,
        b"HTTP/1.0" => true,
        v if v.len() == 8
            && v.starts_with(b"HTTP/")
            && v[5].is_ascii_digit()
            && v[6] == b'.'
            && v[7].is_ascii_digit() =>
        {
            return Err(Reject::Version);
        }
        _ => return Err(Reject::Bad("invalid HTTP version")),
    };
    Ok((method, target, http10))
}

/// The authority of an absolute-form target (`http://host[:port]/...`), if it is one.
fn absolute_form_authority(target: &[u8]) -> Option<&[u8]> {
    let lower_starts =
        |p: &[u8]| target.len() >= p.len() && target[..p.len()].eq_ignore_ascii_case(p);
    let rest = if lower_starts(b"http://") {
        &target[7..]
    } else if lower_starts(b"https://") {
        &target[8..]
    } else {
        return None;
    };
    let end = rest
        .iter()
        .position(|&b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(rest.len());
    let authority = &rest[..end];
    (!authority.is_empty() && !authority.contains(&b'@')).then_some(authority)
}

fn parse_length(v: &[u8]) -> Result<u64, Reject> {
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return Err(Reject::Bad("invalid Content-Length"));
    }
    Ok(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Splits on CRLF; a bare CR or bare LF anywhere is an error.
struct Lines<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Lines<'a> {
    type Item = Result<&'a [u8], Reject>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let i = match self.rest.iter().position(|&b| b == b'\r' || b == b'\n') {
            Some(i) => i,
            None => return Some(Err(Reject::Bad("line without CRLF"))),
        };
        if self.rest[i] == b'\n' {
            return Some(Err(Reject::Bad("bare LF")));
        }
        if self.rest.get(i + 1) != Some(&b'\n') {
            return Some(Err(Reject::Bad("bare CR")));
        }
        let line = &self.rest[..i];
        self.rest = &self.rest[i + 2..];
        Some(Ok(line))
    }
}

fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(start, |e| e + 1);
    &v[start..end]
}

/// RFC 9110 §5.6.2 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Chunked body framing, checked as bytes stream by: sizes in hex (at most 15 digits), extensions bounded,
/// CRLF exactly, trailers as header lines. It never holds body data, only the current framing line.
#[derive(Debug, Clone, Default)]
pub struct Chunked {
    state: ChunkState,
    line: Vec<u8>,
    trailer_bytes: usize,
    sized: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    DataCr,
    DataLf,
    Trailer,
    Done,
}

/// The longest chunk-size line (size and extensions) accepted.
const MAX_CHUNK_LINE: usize = 1024;
const MAX_TRAILERS: usize = 8192;

impl Chunked {
    /// Checks `bytes`, the next part of the body; returns how many belong to the body (fewer than
    /// `bytes.len()` only when the body ended inside them).
    pub fn feed(&mut self, bytes: &[u8]) -> Result<usize, &'static str> {
        let mut i = 0;
        while i < bytes.len() {
            match self.state {
                ChunkState::Done => return Ok(i),
                ChunkState::Data(left) => {
                    let take = left.min((bytes.len() - i) as u64);
                    i += take as usize;
                    self.state = if left == take {
                        ChunkState::DataCr
                    } else {
                        ChunkState::Data(left - take)
                    };
                }
                ChunkState::DataCr => {
                    if bytes[i] != b'\r' {
                        return Err("chunk data not followed by CRLF");
                    }
                    self.state = ChunkState::DataLf;
                    i += 1;
                }
                ChunkState::DataLf => {
                    if bytes[i] != b'\n' {
                        return Err("chunk data not followed by CRLF");
                    }
                    self.state = ChunkState::Size;
                    i += 1;
                }
                ChunkState::Size | ChunkState::Trailer => {
                    let b = bytes[i];
                    i += 1;
                    self.line.push(b);
                    if b != b'\n' {
                        let limit = if self.state == ChunkState::Size {
                            MAX_CHUNK_LINE
                        } else {
                            MAX_TRAILERS
                        };
                        if self.line.len() > limit {
                            return Err("chunk-size line or trailer too long");
                        }
                        continue;
                    }
                    if self.line.len() < 2 || self.line[self.line.len() - 2] != b'\r' {
                        return Err("bare LF in chunked framing");
                    }
                    let line = std::mem::take(&mut self.line);
                    let line = &line[..line.len() - 2];
                    if line.contains(&b'\r') {
                        return Err("bare CR in chunked framing");
                    }
                    if self.state == ChunkState::Size {
                        let size = chunk_size(line)?;
                        self.sized = true;
                        self.state = if size == 0 {
                            ChunkState::Trailer
                        } else {
                            ChunkState::Data(size)
                        };
                    } else if line.is_empty() {
                        self.state = ChunkState::Done;
                        return Ok(i);
                    } else {
                        self.trailer_bytes += line.len();
                        if self.trailer_bytes > MAX_TRAILERS {
                            return Err("trailers too large");
                        }
                        let colon = line
                            .iter()
                            .position(|&b| b == b':')
                            .ok_or("trailer without a colon")?;
                        if colon == 0 || !line[..colon].iter().all(|&b| is_tchar(b)) {
                            return Err("invalid trailer name");
                        }
                    }
                }
            }
        }
        Ok(i)
    }

    pub fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// True once the first chunk-size line has been checked.
    pub fn sized(&self) -> bool {
        self.sized
    }
}

fn chunk_size(line: &[u8]) -> Result<u64, &'static str> {
    let end = line.iter().position(|&b| b == b';').unwrap_or(line.len());
    let (size, ext) = line.split_at(end);
    let size = size.strip_suffix(b" ").unwrap_or(size);
    if size.is_empty() || size.len() > 15 || !size.iter().all(u8::is_ascii_hexdigit) {
        return Err("invalid chunk size");
    }
    if !ext
        .iter()
        .all(|&b| b == b'\t' || (0x20..=0x7e).contains(&b))
    {
        return Err("invalid chunk extension");
    }
    let s = std::str::from_utf8(size).map_err(|_| "invalid chunk size")?;
    u64::from_str_radix(s, 16).map_err(|_| "invalid chunk size")
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        head_bytes: 8192,
        headers: 50,
        uri_bytes: 2048,
    };

    fn verdict(head: &str) -> Verdict {
        check(head.as_bytes(), 0, &LIMITS)
    }

    fn rejected(head: &str) -> u16 {
        match verdict(head) {
            Verdict::Reject(r) => r.status(),
            v => panic!("accepted {head:?}: {v:?}"),
        }
    }

    #[test]
    fn accepts_ordinary_requests() {
        let text = "GET /a?b HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n";
        assert_eq!(
            verdict(text),
            Verdict::Complete(Head {
                len: text.len(),
                framing: Framing::Length(0),
                upgrade: false,
                expect_continue: false,
            })
        );
        let v = verdict("\r\nPOST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(matches!(
            v,
            Verdict::Complete(Head {
                framing: Framing::Chunked,
                ..
            })
        ));
        let head = "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n";
        let v = verdict(&format!("{head}hello"));
        assert_eq!(
            v,
            Verdict::Complete(Head {
                len: head.len(),
                framing: Framing::Length(5),
                upgrade: false,
                expect_continue: false,
            })
        );
        assert!(matches!(
            verdict("GET / HTTP/1.0\r\n\r\n"),
            Verdict::Complete(_)
        ));
        assert!(matches!(
            verdict("GET http://x/y HTTP/1.1\r\nHost: x\r\n\r\n"),
            Verdict::Complete(_)
        ));
        let v = verdict(
            "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        );
        assert!(matches!(
            v,
            Verdict::Complete(Head {
                framing: Framing::Length(0),
                upgrade: true,
                ..
            })
        ));
        assert!(matches!(
            verdict("GET / HTTP/1.1\r\nHost: x\r\n"),
            Verdict::Incomplete { .. }
        ));
    }

    #[test]
    fn rejects_ambiguous_framing() {
        for te in [
            "chunked, identity",
            "  chunked",
            "xchunked",
            "chunked, chunked",
            "\tchunked",
            "Chunked",
            "chunked\t",
        ] {
            assert_eq!(
                rejected(&format!(
                    "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {te}\r\n\r\n"
                )),
                400,
                "{te:?}"
            );
        }
        assert_eq!(
            rejected("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            501
        );
        assert_eq!(
            rejected(
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            ),
            400
        );
        assert_eq!(
            rejected(
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
            ),
            400
        );
        assert_eq!(
            rejected(
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"
            ),
            400
        );
        assert_eq!(
            rejected(
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"
            ),
            400
        );
        assert_eq!(
            rejected("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\n"),
            400
        );
        assert_eq!(
            rejected("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n"),
            400
        );
        assert_eq!(
            rejected("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400
        );
    }

    #[test]
    fn rejects_malformed_lines() {
        assert_eq!(rejected("GET / HTTP/1.1\nHost: x\r\n\r\n"), 400);
        assert_eq!(rejected("GET / HTTP/1.1\r\nHost: x\rX: y\r\n\r\n"), 400);
        assert_eq!(
            rejected("GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n"),
            400
        );
        assert_eq!(rejected("GET / HTTP/1.1\r\nHost : x\r\n\r\n"), 400);
        assert_eq!(
            rejected("GET / HTTP/1.1\r\nHost: x\r\nX: a\0b\r\n\r\n"),
            400
        );
        assert_eq!(
            rejected("GET / HTTP/1.1\r\nHost: x\r\n: empty\r\n\r\n"),
            400
        );
        assert_eq!(rejected(" GET / HTTP/1.1\r\nHost: x\r\n\r\n"), 400);
        assert_eq!(rejected("G(T / HTTP/1.1\r\nHost: x\r\n\r\n"), 400);
        assert_eq!(rejected("GET /\r\n\r\n"), 400);
        assert_eq!(rejected("GET / HTTP/2.0\r\nHost: x\r\n\r\n"), 505);
        assert_eq!(rejected("GET / HTTP/1.2\r\nHost: x\r\n\r\n"), 505);
        assert_eq!(rejected("GET / HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(
            rejected("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
            400
        );
        assert_eq!(
            rejected("GET http://other/ HTTP/1.1\r\nHost: x\r\n\r\n"),
            400
        );
        assert_eq!(rejected("GET x HTTP/1.1\r\nHost: x\r\n\r\n"), 400);
        assert_eq!(rejected("GET  / HTTP/1.1\r\nHost: x\r\n\r\n"), 400);
        assert_eq!(
            rejected("CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n"),
            501
        );
    }

    #[test]
    fn limits() {
        let long = "a".repeat(3000);
        assert_eq!(
            rejected(&format!("GET /{long} HTTP/1.1\r\nHost: x\r\n\r\n")),
            414
        );
        assert_eq!(rejected(&format!("GET /{long}")), 414);
        let many: String = (0..60).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(
            rejected(&format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n")),
            431
        );
        let big = format!("GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n", "b".repeat(9000));
        assert_eq!(rejected(&big), 431);
    }

    #[test]
    fn incremental_search_finds_a_split_terminator() {
        let full = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut scanned = 0;
        for end in 1..full.len() {
            match check(&full[..end], scanned, &LIMITS) {
                Verdict::Incomplete { scanned: s } => scanned = s,
                v => panic!("{end}: {v:?}"),
            }
        }
        assert!(matches!(
            check(full, scanned, &LIMITS),
            Verdict::Complete(_)
        ));
    }

    #[test]
    fn chunked_framing() {
        let mut c = Chunked::default();
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-T: 1\r\n\r\nGET /next";
        let n = c.feed(body).unwrap();
        assert!(c.done());
        assert_eq!(&body[n..], b"GET /next");
        // Byte by byte gives the same answer.
        let mut c = Chunked::default();
        let mut total = 0;
        for b in body.iter() {
            total += c.feed(std::slice::from_ref(b)).unwrap();
            if c.done() {
                break;
            }
        }
        assert_eq!(total, n);
        for bad in [
            &b"zz\r\n"[..],
            b"5\nhello\r\n",
            b"5\r\nhelloX\r\n",
            b"-1\r\n",
            b"1ffffffffffffffff\r\n",
            b"5;\x00\r\n",
        ] {
            assert!(Chunked::default().feed(bad).is_err(), "{bad:?}");
        }
        let long_ext = format!("1;{}\r\n", "e".repeat(2000));
        assert!(Chunked::default().feed(long_ext.as_bytes()).is_err());
    }
}

/// The fuzz target for the request-head path: arbitrary bytes, valid requests with bytes flipped, inserted
/// or cut, and valid requests carrying bodies of arbitrary bytes followed by pipelined requests, walked the
/// way the guard walks a connection (head, body by its framing, next head), fed whole and byte by byte.
/// It must never panic, and both ways must give the same answers: a request accepted one way and refused
/// the other is a failure, whichever way round.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: Limits = Limits {
        head_bytes: 4096,
        headers: 32,
        uri_bytes: 1024,
    };

    const SEEDS: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
        b"GET http://a/b HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    ];

    /// What the walk saw, request by request.
    #[derive(Debug, PartialEq, Eq)]
    enum Step {
        Head(Head),
        /// Refused head (its status) or refused chunked framing (0).
        Refused(u16),
        /// The bytes ran out inside a head or a body.
        Incomplete,
        /// An upgrade request: what follows depends on the answer, not on these rules.
        Upgrade,
    }

    fn head_step(rest: &[u8], piecewise: bool) -> Verdict {
        if !piecewise {
            return check(rest, 0, &LIMITS);
        }
        let mut scanned = 0;
        let mut last = Verdict::Incomplete { scanned: 0 };
        for end in 1..=rest.len() {
            last = check(&rest[..end], scanned, &LIMITS);
            match last {
                Verdict::Incomplete { scanned: s } => scanned = s,
                _ => break,
            }
        }
        last
    }

    fn chunked_step(rest: &[u8], piecewise: bool) -> Result<Option<usize>, ()> {
        let mut c = Chunked::default();
        if !piecewise {
            let n = c.feed(rest).map_err(|_| ())?;
            return Ok(c.done().then_some(n));
        }
        let mut total = 0;
        for b in rest {
            total += c.feed(std::slice::from_ref(b)).map_err(|_| ())?;
            if c.done() {
                return Ok(Some(total));
            }
        }
        Ok(None)
    }

    fn walk(buf: &[u8], piecewise: bool) -> Vec<Step> {
        let mut steps = Vec::new();
        let mut rest = buf;
        while !rest.is_empty() {
            let h = match head_step(rest, piecewise) {
                Verdict::Complete(h) => h,
                Verdict::Reject(r) => {
                    steps.push(Step::Refused(r.status()));
                    break;
                }
                Verdict::Incomplete { .. } => {
                    steps.push(Step::Incomplete);
                    break;
                }
            };
            assert!(h.len <= rest.len());
            steps.push(Step::Head(h));
            rest = &rest[h.len..];
            let body = match h.framing {
                Framing::Length(n) => usize::try_from(n).ok().filter(|&n| n <= rest.len()),
                Framing::Chunked => match chunked_step(rest, piecewise) {
                    Ok(n) => n,
                    Err(()) => {
                        steps.push(Step::Refused(0));
                        break;
                    }
                },
            };
            let Some(n) = body else {
                steps.push(Step::Incomplete);
                break;
            };
            rest = &rest[n..];
            if h.upgrade {
                steps.push(Step::Upgrade);
                break;
            }
        }
        steps
    }

    fn check_consistent(buf: &[u8]) {
        let whole = walk(buf, false);
        let piecewise = walk(buf, true);
        let accepted = |s: &[Step]| s.iter().filter(|s| matches!(s, Step::Head(_))).count();
        let refused = |s: &[Step]| s.iter().any(|s| matches!(s, Step::Refused(_)));
        assert_eq!(
            (accepted(&whole), refused(&whole)),
            (accepted(&piecewise), refused(&piecewise)),
            "whole {whole:?} and piecewise {piecewise:?} disagree on {:?}",
            String::from_utf8_lossy(buf)
        );
        assert_eq!(
            whole
                .iter()
                .filter(|s| matches!(s, Step::Head(_)))
                .collect::<Vec<_>>(),
            piecewise
                .iter()
                .filter(|s| matches!(s, Step::Head(_)))
                .collect::<Vec<_>>(),
        );
    }

    /// A request with a body of arbitrary bytes, framed by Content-Length or as chunks.
    fn with_body(body: &[u8], chunked: bool, cuts: &[usize]) -> Vec<u8> {
        if !chunked {
            let mut v = format!(
                "POST /up HTTP/1.1\r\nHost: a\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            v.extend_from_slice(body);
            return v;
        }
        let mut v = b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        let mut at = 0;
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
        cuts.push(body.len());
        cuts.sort_unstable();
        for cut in cuts {
            if cut > at {
                v.extend_from_slice(format!("{:x}\r\n", cut - at).as_bytes());
                v.extend_from_slice(&body[at..cut]);
                v.extend_from_slice(b"\r\n");
                at = cut;
            }
        }
        v.extend_from_slice(b"0\r\n\r\n");
        v
    }

    #[test]
    fn body_bytes_are_never_judged_as_head_bytes() {
        // The regression: a body whose first bytes arrive with the head held a bare CR/LF against it.
        for body in [
            &b"\n"[..],
            b"\r",
            b"a\nb",
            b"\r\r\n\n",
            b"\x89PNG\r\n\x1a\n",
        ] {
            for chunked in [false, true] {
                let mut buf = with_body(body, chunked, &[1]);
                buf.extend_from_slice(SEEDS[0]);
                let steps = walk(&buf, false);
                assert_eq!(steps.len(), 2, "{steps:?} for {body:?}");
                assert!(
                    steps.iter().all(|s| matches!(s, Step::Head(_))),
                    "{steps:?}"
                );
                check_consistent(&buf);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..600)) {
            check_consistent(&buf);
            let _ = Chunked::default().feed(&buf);
        }

        #[test]
        fn mutated_requests_never_panic(
            seed in 0..SEEDS.len(),
            edits in proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 1..6),
        ) {
            let mut buf = SEEDS[seed].to_vec();
            for (pos, byte, op) in edits {
                let at = pos % (buf.len() + 1);
                match op {
                    0 if at < buf.len() => buf[at] = byte,
                    1 => buf.insert(at, byte),
                    _ if at < buf.len() => { buf.remove(at); }
                    _ => {}
                }
            }
            check_consistent(&buf);
        }

        #[test]
        fn arbitrary_bodies_then_pipelined_requests(
            body in proptest::collection::vec(any::<u8>(), 0..400),
            chunked in any::<bool>(),
            cuts in proptest::collection::vec(any::<usize>(), 0..4),
            next in proptest::collection::vec(0..SEEDS.len(), 0..3),
            truncate in proptest::option::of(any::<usize>()),
        ) {
            let mut buf = with_body(&body, chunked, &cuts);
            for n in &next {
                buf.extend_from_slice(SEEDS[*n]);
            }
            if let Some(t) = truncate {
                buf.truncate(t % (buf.len() + 1));
            }
            let steps = walk(&buf, false);
            if truncate.is_none() {
                // Every request is accepted whatever its body holds; the walk stops only at an upgrade.
                let heads = steps.iter().filter(|s| matches!(s, Step::Head(_))).count();
                let until_upgrade = next.iter().position(|&n| n == 3).map_or(next.len(), |i| i + 1);
                prop_assert_eq!(heads, 1 + until_upgrade, "{:?}", steps);
            }
            check_consistent(&buf);
        }
    }
}
