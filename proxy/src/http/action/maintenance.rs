//! The maintenance page (`[maintenance]`): a `503` with `Retry-After` and `Cache-Control: no-store`, the
//! configured HTML page (read once at start-up, before the privilege drop) or a built-in one. Shown to
//! every client outside `allow` while the `flag` file exists (looked at no more than once a second, the
//! answer kept in an atomic), and instead of a `502` when a route's upstream has no server up and the
//! one server tried anyway failed. The security headers are added by the pipeline, as on every response.
//! The decision of when to show it is `action/mod.rs`'s; static routes do not consult it.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use portcullis_config::Cidr;

use crate::body::Body;

/// Larger pages are refused at start-up: this is one page, served from memory on every refused request.
pub const MAX_PAGE: u64 = 1024 * 1024;

/// What the page says when `[maintenance] page` is not set.
const BUILT_IN: &str = "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>503 Service Unavailable</title></head>\n<body><h1>Down for maintenance</h1><p>This site is being worked on and will be back shortly. Please try again in a few minutes.</p></body></html>\n";

/// Reads `[maintenance] page` (at most [`MAX_PAGE`] bytes): `None` without one, `Err` naming the problem.
pub fn load(page: Option<&Path>) -> Result<Option<Bytes>, String> {
    let Some(path) = page else {
        return Ok(None);
    };
    let read = || -> io::Result<Vec<u8>> {
        let len = std::fs::metadata(path)?.len();
        if len > MAX_PAGE {
            return Err(io::Error::other(format!(
                "{len} bytes: at most {MAX_PAGE} (1 MiB)"
            )));
        }
        std::fs::read(path)
    };
    read()
        .map(|b| Some(Bytes::from(b)))
        .map_err(|e| format!("[maintenance] page {}: {e}", path.display()))
}

/// One config's maintenance settings, ready to answer with.
#[derive(Debug)]
pub struct Maintenance {
    page: Bytes,
    retry_after: HeaderValue,
    allow: Vec<Cidr>,
    flag: Option<Flag>,
}

/// The flag file and what was last seen of it.
#[derive(Debug)]
struct Flag {
    path: PathBuf,
    start: Instant,
    /// When it was last looked at: milliseconds since `start`, plus one.
    looked: AtomicU64,
    present: AtomicBool,
}

/// How long a look at the flag file holds.
const LOOK_EVERY: Duration = Duration::from_secs(1);

impl Maintenance {
    /// `page` is what [`load`] read (`None`: the built-in page).
    pub fn new(config: &portcullis_config::Maintenance, page: Option<Bytes>) -> Maintenance {
        let secs = config.retry_after.as_secs() + u64::from(config.retry_after.subsec_nanos() > 0);
        let flag = config.flag.as_ref().map(|path| {
            let present = path.try_exists().unwrap_or(false);
            if present {
                tracing::warn!(flag = %path.display(), "maintenance: the flag file exists: clients outside [maintenance] allow get the maintenance page");
            }
            Flag {
                path: path.clone(),
                start: Instant::now(),
                looked: AtomicU64::new(1),
                present: AtomicBool::new(present),
            }
        });
        Maintenance {
            page: page.unwrap_or_else(|| Bytes::from_static(BUILT_IN.as_bytes())),
            retry_after: HeaderValue::from(secs.max(1)),
            allow: config.allow.clone(),
            flag,
        }
    }

    /// Whether `client` (the real client, after trusted proxies) still reaches the app during maintenance.
    pub fn allows(&self, client: IpAddr) -> bool {
        self.allow.iter().any(|c| c.contains(client))
    }

    /// Whether the flag file exists, as last seen (looked at again when the last look is a second old).
    pub fn flagged(&self, now: Instant) -> bool {
        let Some(flag) = &self.flag else {
            return false;
        };
        let ms = u64::try_from(now.saturating_duration_since(flag.start).as_millis())
            .unwrap_or(u64::MAX - 1)
            + 1;
        let looked = flag.looked.load(Ordering::Relaxed);
        let every = LOOK_EVERY.as_millis() as u64;
        // One request a second looks (the one that moves `looked`); the others use what it saw.
        if ms.saturating_sub(looked) >= every
            && flag
                .looked
                .compare_exchange(looked, ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            // A stat in /run: microseconds, once a second, so done in place rather than on a thread.
            let present = flag.path.try_exists().unwrap_or(false);
            if flag.present.swap(present, Ordering::Relaxed) != present {
                if present {
                    tracing::warn!(flag = %flag.path.display(), "maintenance on: the flag file exists: clients outside [maintenance] allow get the maintenance page");
                } else {
                    tracing::info!(flag = %flag.path.display(), "maintenance off: the flag file is gone");
                }
            }
            return present;
        }
        flag.present.load(Ordering::Relaxed)
    }

    /// The page: `503`, `Retry-After`, never cached.
    pub fn response(&self) -> Response<Body> {
        let mut res = Response::new(Body::full(self.page.clone()));
        *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(header::RETRY_AFTER, self.retry_after.clone());
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(flag: Option<PathBuf>) -> portcullis_config::Maintenance {
        portcullis_config::Maintenance {
            page: None,
            retry_after: Duration::from_millis(1500),
            flag,
            allow: vec!["10.0.0.0/8".parse().unwrap()],
        }
    }

    #[test]
    fn the_page_is_a_503_with_retry_after_that_is_never_cached() {
        let m = Maintenance::new(&settings(None), Some(Bytes::from_static(b"<p>brb</p>")));
        let res = m.response();
        assert_eq!(res.status(), 503);
        assert_eq!(res.headers()[header::RETRY_AFTER], "2", "rounded up");
        assert_eq!(res.headers()[header::CACHE_CONTROL], "no-store");
        assert!(m.allows("10.1.2.3".parse().unwrap()));
        assert!(m.allows("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!m.allows("192.0.2.1".parse().unwrap()));
        assert!(!m.flagged(Instant::now()), "no flag configured");
    }

    #[test]
    fn the_flag_is_looked_at_once_a_second() {
        let dir = std::env::temp_dir().join(format!("portcullis-flag-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("maintenance");
        let _ = std::fs::remove_file(&path);
        let m = Maintenance::new(&settings(Some(path.clone())), None);
        let t = Instant::now();
        assert!(!m.flagged(t));
        std::fs::write(&path, "").unwrap();
        assert!(!m.flagged(t), "not looked at again within the second");
        assert!(m.flagged(t + Duration::from_millis(1100)));
        std::fs::remove_file(&path).unwrap();
        assert!(m.flagged(t + Duration::from_millis(1200)));
        assert!(!m.flagged(t + Duration::from_millis(2200)));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_or_huge_page_is_refused_at_start() {
        assert_eq!(load(None), Ok(None));
        let e = load(Some(Path::new("/nonexistent/maintenance.html"))).unwrap_err();
        assert!(e.contains("/nonexistent/maintenance.html"), "{e}");
    }
}
