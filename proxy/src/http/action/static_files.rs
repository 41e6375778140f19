//! Static routes (`static = "..."`): files from a folder, or one file, served by tower-http's `ServeDir`
//! (Range, `If-None-Match`/`If-Modified-Since`, precompressed `.br`/`.gz`/`.zst` siblings when accepted,
//! MIME types by extension). Around it, ours: GET and HEAD only (`405` + `Allow`); the path below the route
//! is checked before any file is looked at ([`below`]: `400` for traversal and encoding tricks, `404` for
//! dot-files and empty segments); every file goes through [`Contained`], a `ServeDir` backend that opens it
//! and then reads back where it really is (`/proc/self/fd`), refusing anything outside the folder, so a
//! symlink (or one swapped in meanwhile) never reaches out; `index`, `fallback` and `Cache-Control`. Never
//! a listing. The maintenance check is not consulted (`action/mod.rs`), and the security headers are added
//! by the pipeline as on every response.

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use portcullis_config::{Route, Static, StaticKind};
use tokio::io::{AsyncRead, AsyncSeek, ReadBuf};
use tower_http::services::fs::{self as fs, ServeDir, ServeFileSystemResponseBody};

use crate::body::Body;
use crate::http::pages;

/// What a folder URL answers with (its index) or a SPA's fallback: never cached without revalidation, since
/// it changes with every deploy while its URL does not.
const REVALIDATE: HeaderValue = HeaderValue::from_static("no-cache");

/// Answers `req` from `st`, the static action of `route`.
pub async fn run(route: &Route, st: &Static, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut res = pages::status(StatusCode::METHOD_NOT_ALLOWED);
        res.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return res;
    }
    let path = req.uri().path();
    let Some(rest) = path.strip_prefix(route.path.as_str()) else {
        return pages::status(StatusCode::NOT_FOUND);
    };
    // The URI handed to `ServeDir`: `/` + the path below the route (still percent-encoded).
    let (target, answer) = match st.kind {
        // Only the exact path reaches this route (`Route::matches`); `ServeDir` serves its base itself.
        StaticKind::File => ("/".to_owned(), Answer::Named),
        StaticKind::Folder => {
            let rest = if route.path.ends_with('/') {
                rest
            } else if rest.is_empty() {
                // `/static` for a folder: its files' relative links need `/static/`.
                return to_folder(route, req.uri());
            } else if let Some(r) = rest.strip_prefix('/') {
                r
            } else {
                return pages::status(StatusCode::NOT_FOUND);
            };
            if let Err(code) = below(rest) {
                return pages::status(code);
            }
            let mut target = String::with_capacity(rest.len() + 16);
            target.push('/');
            target.push_str(rest);
            let folder = rest.is_empty() || rest.ends_with('/');
            match &st.index {
                Some(index) if folder => {
                    encode(&mut target, index);
                    (target, Answer::Index)
                }
                _ => (target, Answer::Named),
            }
        }
    };
    let (mut parts, _body) = req.into_parts();
    let again = st.fallback.as_ref().map(|_| parts.headers.clone());
    let query = parts.uri.query().map(str::to_owned);
    let Some(uri) = build_uri(target, query.as_deref()) else {
        return pages::status(StatusCode::BAD_REQUEST);
    };
    parts.uri = uri;
    let mut answered = (
        serve(route, st, Request::from_parts(parts, ())).await,
        answer,
    );
    if let (Some(fallback), Some(headers)) = (&st.fallback, again)
        && match &answered.0 {
            Ok(res) => res.status() == StatusCode::NOT_FOUND,
            Err(e) => gone(e),
        }
    {
        let mut target = String::from("/");
        encode(&mut target, fallback);
        if let Some(uri) = build_uri(target, None) {
            let mut req = Request::new(());
            *req.uri_mut() = uri;
            *req.headers_mut() = headers;
            answered = (serve(route, st, req).await, Answer::Fallback);
        }
    }
    respond(st, answered)
}

/// How a file came to answer: by its own name, as a folder's index, or as the fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Named,
    Index,
    Fallback,
}

/// One `ServeDir` call (built per request: a few small allocations, as `ServeDir` makes anyway).
async fn serve(
    route: &Route,
    st: &Static,
    req: Request<()>,
) -> io::Result<Response<ServeFileSystemResponseBody>> {
    let within: Arc<Path> = match st.kind {
        StaticKind::Folder => Arc::from(st.root.as_path()),
        // One file: it, and its precompressed siblings, must be in its folder.
        StaticKind::File => Arc::from(st.root.parent().unwrap_or(&st.root)),
    };
    let mut dir = ServeDir::with_backend(&st.root, Contained { root: within })
        // Our own index name is appended before `ServeDir` sees the path; with this on, `ServeDir` also
        // redirects a folder named without its trailing `/`.
        .append_index_html_on_directories(st.index.is_some())
        .redirect_to_trailing_slash(true)
        .redirect_path_prefix(route.path.trim_end_matches('/'))
        .precompressed_br()
        .precompressed_gzip()
        .precompressed_zstd();
    dir.try_call(req).await
}

/// The response for what `ServeDir` said: our pages for its errors, `Cache-Control` for what it served.
fn respond(
    st: &Static,
    (answered, answer): (io::Result<Response<ServeFileSystemResponseBody>>, Answer),
) -> Response<Body> {
    let mut res = match answered {
        Ok(res) => res,
        Err(e) if gone(&e) => return pages::status(StatusCode::NOT_FOUND),
        Err(e) => {
            tracing::warn!(folder = %st.root.display(), error = %e, "static file could not be read");
            return pages::status(StatusCode::INTERNAL_SERVER_ERROR);
        }
    };
    let status = res.status();
    if status == StatusCode::NOT_FOUND || status.is_server_error() {
        return pages::status(status);
    }
    if status.is_success() || status == StatusCode::NOT_MODIFIED {
        let value = match (answer, st.cache) {
            (Answer::Index | Answer::Fallback, _) => Some(REVALIDATE),
            (Answer::Named, Some(age)) => {
                HeaderValue::try_from(format!("public, max-age={}", age.as_secs())).ok()
            }
            (Answer::Named, None) => None,
        };
        if let Some(v) = value {
            res.headers_mut().insert(header::CACHE_CONTROL, v);
        }
    }
    res.map(|b| Body::Static(crate::body::File(b)))
}

/// Whether a file error means "no such file" to the client (`ServeDir`'s own rule: missing, not allowed,
/// or a file where a folder was expected).
fn gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied | io::ErrorKind::NotADirectory
    )
}

/// `301` from a folder route's own path without its `/` to the path with it.
fn to_folder(route: &Route, uri: &Uri) -> Response<Body> {
    let location = match uri.query() {
        Some(q) => format!("{}/?{q}", route.path),
        None => format!("{}/", route.path),
    };
    match HeaderValue::try_from(location) {
        Ok(v) => pages::redirect(v),
        Err(_) => pages::status(StatusCode::BAD_REQUEST),
    }
}

fn build_uri(mut target: String, query: Option<&str>) -> Option<Uri> {
    if let Some(q) = query {
        target.push('?');
        target.push_str(q);
    }
    Uri::try_from(target).ok()
}

/// Checks the path below a folder route, as the client sent it (percent-encoded): `Ok` when every segment
/// names a plain file or folder; `400` for what only an attack sends (`.`/`..` in any spelling, an encoded
/// `/`, a backslash, NUL or another control byte, bad percent-encoding, bytes that are not UTF-8 such as
/// the overlong `%c0%ae`); `404` for a dot-file (`.env`, `.git/`) and for an empty segment (`a//b`). Only
/// the last segment may be empty: a folder (`css/`).
pub fn below(rest: &str) -> Result<(), StatusCode> {
    let mut decoded = Vec::new();
    let mut segments = rest.split('/').peekable();
    while let Some(seg) = segments.next() {
        if seg.is_empty() {
            if segments.peek().is_none() {
                return Ok(());
            }
            return Err(StatusCode::NOT_FOUND);
        }
        decoded.clear();
        let raw = seg.as_bytes();
        let mut i = 0;
        while i < raw.len() {
            let b = if raw[i] == b'%' {
                let hex = raw.get(i + 1..i + 3).ok_or(StatusCode::BAD_REQUEST)?;
                let hex = std::str::from_utf8(hex).map_err(|_| StatusCode::BAD_REQUEST)?;
                i += 3;
                u8::from_str_radix(hex, 16).map_err(|_| StatusCode::BAD_REQUEST)?
            } else {
                i += 1;
                raw[i - 1]
            };
            if b == b'/' || b == b'\\' || b < 0x20 || b == 0x7f {
                return Err(StatusCode::BAD_REQUEST);
            }
            decoded.push(b);
        }
        let name = std::str::from_utf8(&decoded).map_err(|_| StatusCode::BAD_REQUEST)?;
        if name == "." || name == ".." {
            return Err(StatusCode::BAD_REQUEST);
        }
        if name.starts_with('.') {
            return Err(StatusCode::NOT_FOUND);
        }
    }
    Ok(())
}

/// Appends `name` (a checked relative path: `index`, `fallback`) to a URI path, percent-encoding what a
/// path may not hold as it is; `ServeDir` decodes it back.
fn encode(out: &mut String, name: &str) {
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// The `ServeDir` backend for a static route: files are opened as `tokio::fs` would, then kept only if
/// their real path is inside `root`.
#[derive(Clone, Debug)]
struct Contained {
    root: Arc<Path>,
}

type Boxed<T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send>>;

impl fs::Backend for Contained {
    type File = Opened;
    type Metadata = std::fs::Metadata;
    type OpenFuture = Boxed<Opened>;
    type MetadataFuture = Boxed<std::fs::Metadata>;

    fn open(&self, path: PathBuf) -> Self::OpenFuture {
        let root = self.root.clone();
        Box::pin(async move {
            let (file, meta) = blocking(move || open_within(&root, &path)).await?;
            Ok(Opened {
                file: tokio::fs::File::from_std(file),
                meta,
            })
        })
    }

    fn metadata(&self, path: PathBuf) -> Self::MetadataFuture {
        let root = self.root.clone();
        Box::pin(blocking(move || {
            let real = std::fs::canonicalize(&path)?;
            inside(&root, &real)?;
            std::fs::metadata(&real)
        }))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io::Error::other)?
}

/// Opens `path` for reading, then checks where the open file really is. `O_NONBLOCK` so that a FIFO in
/// the folder cannot hold a blocking thread; only regular files are served.
fn open_within(root: &Path, path: &Path) -> io::Result<(std::fs::File, std::fs::Metadata)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::ErrorKind::NotFound.into());
    }
    // The kernel's name for what was opened: no window between the check and the open. Without /proc,
    // the path resolved now (a symlink swapped in after this is the only way past it).
    let real = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .or_else(|_| std::fs::canonicalize(path))?;
    inside(root, &real)?;
    Ok((file, meta))
}

/// `Ok` when `real` (a resolved path) is inside `root`: as written (the usual case, no system call), or as
/// `root` resolves now (a folder reached through a symlink, e.g. a `current` release link).
fn inside(root: &Path, real: &Path) -> io::Result<()> {
    if real.starts_with(root) || real.starts_with(std::fs::canonicalize(root)?) {
        return Ok(());
    }
    tracing::warn!(folder = %root.display(), file = %real.display(), "static route: refused a file outside its folder (a symlink points out of it)");
    Err(io::ErrorKind::NotFound.into())
}

/// An open static file, and what `fstat` said about it when it was opened.
#[derive(Debug)]
struct Opened {
    file: tokio::fs::File,
    meta: std::fs::Metadata,
}

impl AsyncRead for Opened {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_read(cx, buf)
    }
}

impl AsyncSeek for Opened {
    fn start_seek(mut self: Pin<&mut Self>, position: io::SeekFrom) -> io::Result<()> {
        Pin::new(&mut self.file).start_seek(position)
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Pin::new(&mut self.file).poll_complete(cx)
    }
}

impl fs::File for Opened {
    type Metadata = std::fs::Metadata;
    type MetadataFuture<'a> = std::future::Ready<io::Result<std::fs::Metadata>>;

    fn metadata(&self) -> Self::MetadataFuture<'_> {
        std::future::ready(Ok(self.meta.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_below_the_route_is_refused_for_every_traversal_spelling() {
        for ok in [
            "",
            "app.css",
            "css/",
            "css/app.v2.css",
            "a%20b.txt",
            "caf%C3%A9.txt",
            "a..b",
        ] {
            assert_eq!(below(ok), Ok(()), "{ok}");
        }
        for bad in [
            "..",
            "../secret",
            "css/../../secret",
            "%2e%2e/secret",
            "%2E%2e%2fsecret",
            "..%2fsecret",
            "..\\secret",
            "%5c..%5csecret",
            "%00",
            "a%00.txt",
            "%c0%ae%c0%ae/secret",
            "%2",
            "%zz",
            "./x",
            "a%0ab",
        ] {
            assert_eq!(below(bad), Err(StatusCode::BAD_REQUEST), "{bad}");
        }
        for hidden in [
            ".env",
            ".git/config",
            "css/.htaccess",
            "%2egit/config",
            "a//b",
            "/etc/passwd",
        ] {
            assert_eq!(below(hidden), Err(StatusCode::NOT_FOUND), "{hidden}");
        }
    }

    #[test]
    fn index_and_fallback_names_are_encoded_for_the_uri() {
        let mut s = String::from("/");
        encode(&mut s, "app/index page.html");
        assert_eq!(s, "/app/index%20page.html");
    }

    #[test]
    fn a_file_is_inside_its_folder_only_by_its_real_path() {
        let dir = std::env::temp_dir().join(format!("portcullis-static-{}", std::process::id()));
        let served = dir.join("served");
        std::fs::create_dir_all(&served).unwrap();
        std::fs::write(served.join("in.txt"), "in").unwrap();
        std::fs::write(dir.join("secret.txt"), "secret").unwrap();
        let _ = std::fs::remove_file(served.join("out.txt"));
        std::os::unix::fs::symlink(dir.join("secret.txt"), served.join("out.txt")).unwrap();
        assert!(open_within(&served, &served.join("in.txt")).is_ok());
        let e = open_within(&served, &served.join("out.txt")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        // Through a symlinked folder (a release link): the folder as it resolves now.
        let link = dir.join("current");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&served, &link).unwrap();
        assert!(open_within(&link, &link.join("in.txt")).is_ok());
        assert!(open_within(&link, &link.join("out.txt")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
