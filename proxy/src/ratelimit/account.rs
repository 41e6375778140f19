//! The account a login request names, for `per_account` limits: the bounded read of the whole body (it is
//! forwarded byte for byte afterwards), and the account names in a urlencoded form, a multipart form or a
//! JSON object, as Django and Flask would parse them.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::policy::hex;

/// Most bytes read from a request body to find the account name. A login form is a few hundred bytes; a
/// larger body on a `per_account` path is refused (413), or padding would hide the account from the limit.
pub const MAX_BODY: usize = 64 * 1024;
/// At most this many distinct account names are counted from one body (a field may be repeated).
const MAX_ACCOUNTS_PER_REQUEST: usize = 4;
/// Account names are counted by their first this many characters (after case folding).
const MAX_ACCOUNT_CHARS: usize = 256;

/// Reads a whole request body of at most `limit` bytes (413 past it, 408 if it stalls, 400 if it breaks).
pub(super) async fn read_bounded(
    body: &mut Incoming,
    limit: u64,
    timeout: Duration,
) -> Result<Bytes, StatusCode> {
    let read = async {
        let mut first: Option<Bytes> = None;
        let mut more: Option<BytesMut> = None;
        let mut len: u64 = 0;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| StatusCode::BAD_REQUEST)?;
            // Trailers (never sent with a login form) are dropped.
            let Ok(data) = frame.into_data() else {
                continue;
            };
            len += data.len() as u64;
            if len > limit {
                return Err(StatusCode::PAYLOAD_TOO_LARGE);
            }
            match (&mut first, &mut more) {
                (None, _) => first = Some(data),
                (Some(f), None) => {
                    let mut m = BytesMut::with_capacity(f.len() + data.len());
                    m.extend_from_slice(f);
                    m.extend_from_slice(&data);
                    more = Some(m);
                }
                (Some(_), Some(m)) => m.extend_from_slice(&data),
            }
        }
        Ok(more.map(BytesMut::freeze).or(first).unwrap_or_default())
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or(Err(StatusCode::REQUEST_TIMEOUT))
}

/// The account names a login body submits in `field`: from a urlencoded form, a multipart form or a JSON
/// object (what Django and Flask parse), trimmed, case-folded, distinct, at most a few. Empty when the body is
/// something else: then only the per-client limit applies.
pub fn account_names(content_type: Option<&str>, body: &[u8], field: &str) -> Vec<String> {
    let Some(ct) = content_type else {
        return Vec::new();
    };
    let mut params = ct.split(';');
    let media = params.next().unwrap_or("").trim().to_ascii_lowercase();
    let raw: Vec<String> = match media.as_str() {
        "application/x-www-form-urlencoded" => body
            .split(|b| *b == b'&')
            .filter_map(|pair| {
                let mut kv = pair.splitn(2, |b| *b == b'=');
                let k = form_decode(kv.next()?);
                (k == field).then(|| form_decode(kv.next().unwrap_or(b"")))
            })
            .collect(),
        "multipart/form-data" => params
            .filter_map(|p| p.trim().split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
            .map(|(_, v)| multipart_fields(body, v.trim().trim_matches('"'), field))
            .unwrap_or_default(),
        m if m == "application/json" || m.ends_with("+json") => {
            match serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body) {
                Ok(obj) => match obj.get(field) {
                    Some(serde_json::Value::String(s)) => vec![s.clone()],
                    Some(serde_json::Value::Number(n)) => vec![n.to_string()],
                    _ => Vec::new(),
                },
                Err(_) => Vec::new(),
            }
        }
        _ => Vec::new(),
    };
    let mut out: Vec<String> = Vec::new();
    for r in raw {
        let name: String = r
            .trim()
            .to_lowercase()
            .chars()
            .take(MAX_ACCOUNT_CHARS)
            .collect();
        if !name.is_empty() && !out.contains(&name) {
            out.push(name);
            if out.len() == MAX_ACCOUNTS_PER_REQUEST {
                break;
            }
        }
    }
    out
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte (WHATWG URL §5.1).
fn form_decode(b: &[u8]) -> String {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1).and_then(|h| hex(*h)),
            b.get(i + 2).and_then(|l| hex(*l)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push(h << 4 | l);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The values of the non-file parts named `field` in a `multipart/form-data` body (RFC 7578).
fn multipart_fields(body: &[u8], boundary: &str, field: &str) -> Vec<String> {
    if boundary.is_empty() {
        return Vec::new();
    }
    let delimiter = format!("--{boundary}");
    let mut out = Vec::new();
    for part in split_on(body, delimiter.as_bytes()).skip(1) {
        let part = part.strip_prefix(b"\r\n").unwrap_or(part);
        let Some(end) = find(part, b"\r\n\r\n") else {
            continue;
        };
        let (head, value) = (&part[..end], &part[end + 4..]);
        let value = value.strip_suffix(b"\r\n").unwrap_or(value);
        let head = String::from_utf8_lossy(head);
        let named = head.split("\r\n").any(|line| {
            let Some((name, rest)) = line.split_once(':') else {
                return false;
            };
            name.trim().eq_ignore_ascii_case("content-disposition")
                && !rest.contains("filename")
                && rest
                    .split(';')
                    .filter_map(|p| p.trim().split_once('='))
                    .any(|(k, v)| {
                        k.trim().eq_ignore_ascii_case("name") && v.trim().trim_matches('"') == field
                    })
        });
        if named {
            out.push(String::from_utf8_lossy(value).into_owned());
        }
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn split_on<'a>(mut hay: &'a [u8], delimiter: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        match find(hay, delimiter) {
            Some(at) => {
                let piece = &hay[..at];
                hay = &hay[at + delimiter.len()..];
                Some(piece)
            }
            None => {
                done = true;
                Some(hay)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_names_from_forms_multipart_and_json() {
        let form = Some("application/x-www-form-urlencoded; charset=utf-8");
        assert_eq!(
            account_names(
                form,
                b"csrfmiddlewaretoken=x&username=Alice%40Example.com&password=a+b",
                "username"
            ),
            ["alice@example.com"]
        );
        // Django reads the last value, Flask the first: count both.
        assert_eq!(
            account_names(form, b"username=bob&username=+carol+", "username"),
            ["bob", "carol"]
        );
        assert!(account_names(form, b"user=bob", "username").is_empty());
        let json = Some("application/json");
        assert_eq!(
            account_names(
                json,
                br#"{"username": " Dave ", "password": "x"}"#,
                "username"
            ),
            ["dave"]
        );
        assert_eq!(
            account_names(json, br#"{"username": 12345}"#, "username"),
            ["12345"]
        );
        assert!(account_names(json, b"[1,2]", "username").is_empty());
        let multipart = b"--XyZ\r\nContent-Disposition: form-data; name=\"password\"\r\n\r\nsecret\r\n--XyZ\r\nContent-Disposition: form-data; name=\"username\"\r\n\r\nEve\r\n--XyZ--\r\n";
        assert_eq!(
            account_names(
                Some("multipart/form-data; boundary=XyZ"),
                multipart,
                "username"
            ),
            ["eve"]
        );
        assert_eq!(
            account_names(
                Some("multipart/form-data; boundary=\"XyZ\""),
                multipart,
                "password"
            ),
            ["secret"]
        );
        assert!(account_names(Some("text/plain"), b"username=x", "username").is_empty());
        assert!(account_names(None, b"username=x", "username").is_empty());
        let many = (0..20)
            .map(|i| format!("username=u{i}"))
            .collect::<Vec<_>>()
            .join("&");
        assert_eq!(
            account_names(form, many.as_bytes(), "username").len(),
            MAX_ACCOUNTS_PER_REQUEST
        );
    }
}
