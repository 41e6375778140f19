//! The hardened defaults, in one place (docs/CONFIG.md repeats them for users). Every checker takes its
//! default from here; nothing else in the crate spells a default value.

use std::time::Duration;

use crate::model::{LogFormat, Sandbox, Seccomp, TlsVersion};

pub const HTTPS: &[&str] = &["0.0.0.0:443", "[::]:443"];
pub const HTTP: &[&str] = &["0.0.0.0:80", "[::]:80"];
/// `[admin]` without `listen`: loopback only (the admin listener has no authentication), on a port of the
/// 9xxx range exporters use.
pub const ADMIN_LISTEN: &str = "127.0.0.1:9180";
/// `[cluster] prefix`: every key in Redis starts with it, so that other users of the same Redis (or another
/// cluster, with its own prefix) do not collide.
pub const CLUSTER_PREFIX: &str = "portcullis:";
/// `[cluster] timeout`: a Redis round trip on a LAN takes well under a millisecond; past this the node goes
/// on with its local state rather than keep a request (or a handshake) waiting.
pub const CLUSTER_TIMEOUT: Duration = Duration::from_millis(100);
/// TLS 1.2 and 1.3 (Mozilla "intermediate").
pub const TLS_MIN_VERSION: TlsVersion = TlsVersion::Tls12;
pub const HSTS: &str = "max-age=63072000; includeSubDomains";
pub const X_FRAME_OPTIONS: &str = "DENY";
pub const X_CONTENT_TYPE_OPTIONS: &str = "nosniff";
/// Not `no-referrer`: Django's CSRF check rejects HTTPS POSTs without a same-origin Referer.
pub const REFERRER_POLICY: &str = "strict-origin-when-cross-origin";
pub const UPSTREAM_CONNECT: Duration = Duration::from_secs(5);
/// As nginx's `proxy_read_timeout`; gunicorn kills a worker after 30 s by default.
pub const UPSTREAM_RESPONSE: Duration = Duration::from_secs(60);
pub const CLIENT_IDLE: Duration = Duration::from_secs(60);
/// An upgraded connection (WebSocket) with no byte either way for this long is closed. Apps ping
/// every 20-60 s to keep a socket open (Socket.IO 25 s, Django Channels and browsers' proxies ~60 s);
/// nginx's `proxy_read_timeout` (60 s) cuts quieter apps, so the default is generous.
pub const TUNNEL_IDLE: Duration = Duration::from_secs(600);
/// A request head must arrive whole within this (slowloris).
pub const CLIENT_HEADER: Duration = Duration::from_secs(10);
/// A request body that stops moving for this long is cut off.
pub const CLIENT_BODY: Duration = Duration::from_secs(60);
/// Request line + header lines (nginx: 4 x 8 KiB large buffers).
pub const HEADER_BYTES: u64 = 32 * 1024;
pub const HEADERS: u64 = 100;
pub const URI_BYTES: u64 = 8 * 1024;
/// Request bodies; raise it per route for upload endpoints (nginx's 1 MiB breaks too many apps).
pub const BODY: u64 = 10 * 1024 * 1024;
pub const MAX_REQUESTS_PER_CONNECTION: u64 = 10_000;
pub const CONNECTIONS: u64 = 10_000;
pub const CONNECTIONS_PER_IP: u64 = 256;
pub const H2_MAX_STREAMS: u64 = 128;
/// 1 KiB/s: a modem's pace; a 1 B/s trickle (the slow-body attack) is cut off after the grace.
pub const MIN_BODY_RATE: u64 = 1024;
/// Waiting this long for a body costs nothing; after it the average must hold (mod_reqtimeout's `body=20`).
pub const MIN_BODY_RATE_GRACE: Duration = Duration::from_secs(10);
/// Most form posts, JSON bodies and HTML pages fit; larger bodies go to a temporary file
/// (nginx: 16 KiB `client_body_buffer_size`, 8 x 4 KiB `proxy_buffers`).
pub const BUFFER_MEMORY_PER_REQUEST: u64 = 64 * 1024;
/// Every in-memory buffer together: 1,000 requests at their full memory budget.
pub const BUFFER_MEMORY: u64 = 64 * 1024 * 1024;
/// Every temporary file together.
pub const BUFFER_DISK: u64 = 2 * 1024 * 1024 * 1024;
/// One response's temporary file (nginx's `proxy_max_temp_file_size`).
pub const BUFFER_MAX_RESPONSE: u64 = 1024 * 1024 * 1024;
/// A route buffers both ways unless it says otherwise (gunicorn's sync workers need it).
pub const BUFFER_REQUESTS: bool = true;
pub const BUFFER_RESPONSES: bool = true;
/// A site with `client_auth` still serves clients without a certificate unless told otherwise: the
/// routes that need one say so (`require_client_cert`), and the app sees `X-Client-Cert-Verified: NONE`.
pub const CLIENT_AUTH_MODE: crate::model::ClientAuthMode = crate::model::ClientAuthMode::Optional;
/// An expired CRL is logged loudly but does not lock every client out: a CA that is late publishing its
/// CRL should page someone, not take the site down (`crl_expired = "refuse"` for the strict choice).
pub const CRL_EXPIRED: crate::model::CrlExpired = crate::model::CrlExpired::Warn;
/// The client's whole certificate is not sent to the app unless asked: the subject, issuer, serial and
/// fingerprint are enough to identify it, and a PEM header is large.
pub const FORWARD_CERT: bool = false;
/// A route asks for no client certificate unless it says so (or its site's mode is `required`).
pub const REQUIRE_CLIENT_CERT: bool = false;
/// A rate limit counts clients by address unless it says `key = "client_cert"`.
pub const RATE_LIMIT_KEY: crate::model::RateKey = crate::model::RateKey::ClientAddr;
/// No compression unless a route asks for it: a compressed response's length leaks what it holds when
/// it reflects the client's input next to a secret (BREACH); only the route's owner knows whether it does.
pub const COMPRESS: bool = false;
/// Bodies shorter than this go as they are (nginx's `gzip_min_length` idea): the framing costs more
/// than it saves, and a tiny answer is one packet either way.
pub const COMPRESS_MIN_SIZE: u64 = 1024;
/// A static route sends no `Cache-Control` on its files unless it has `cache` (browsers then revalidate
/// with `If-None-Match`/`If-Modified-Since`, nginx's behaviour); index and fallback answers always carry
/// `no-cache`, since what a folder URL shows changes with every deploy.
pub const STATIC_CACHE: Option<std::time::Duration> = None;
/// No index file: a request for a folder is `404` (there is never a listing).
pub const STATIC_INDEX: Option<&str> = None;
/// No fallback: a path that matches no file is `404`.
pub const STATIC_FALLBACK: Option<&str> = None;
/// `[upstream.NAME]` balancing: in-flight counts suit gunicorn's one-request-per-worker model best.
pub const BALANCE: crate::model::Balance = crate::model::Balance::LeastRequests;
pub const SERVER_WEIGHT: u32 = 1;
/// One connect/reset failure takes a server out (nginx's `max_fails=1`)...
pub const MAX_FAILS: u32 = 1;
/// ...for this long (nginx's `fail_timeout=10s`); active checks bring it back sooner.
pub const FAIL_TIMEOUT: Duration = Duration::from_secs(10);
/// Other servers tried after a failure that is safe to retry.
pub const RETRIES: u32 = 2;
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
pub const HEALTH_RISE: u32 = 1;
pub const HEALTH_FALL: u32 = 2;
/// `[maintenance] retry_after`.
pub const MAINTENANCE_RETRY_AFTER: Duration = Duration::from_secs(30);
pub const SHUTDOWN: Duration = Duration::from_secs(30);
/// One access line per request, as text, at `info`.
pub const LOG_ACCESS: bool = true;
pub const LOG_FORMAT: LogFormat = LogFormat::Text;
pub const LOG_LEVEL: &str = "info";
/// No file: access lines go to standard error with the rest, which journald keeps under systemd (rotated,
/// indexed, `journalctl -u portcullis`) with nothing to reopen.
pub const LOG_FILE: Option<&str> = None;
/// The built-in rate limit (no `[[rate_limit]]` in the file): POSTs to the usual Django/Flask login,
/// password-reset and token endpoints, per client.
pub const AUTH_LIMIT_NAME: &str = "auth";
pub const AUTH_PATHS: &[&str] = &[
    "/login",
    "/login/",
    "/auth/login",
    "/auth/login/",
    "/accounts/login/",
    "/admin/login/",
    "/accounts/password_reset/",
    "/accounts/password/reset/",
    "/api/token",
    "/api/token/*",
    "/api-token-auth/",
    "/o/token/",
    "/dj-rest-auth/login/",
];
/// 10 per minute sustained.
pub const AUTH_RATE: (u32, Duration) = (10, Duration::from_secs(60));
pub const AUTH_BURST: u32 = 5;
/// The methods a `[[rate_limit]]` (and the built-in one) counts when it names none.
pub const RATE_LIMIT_METHODS: &[&str] = &["POST"];
/// One host usually holds a whole /64.
pub const RATE_LIMIT_IPV6_PREFIX: u8 = 64;
/// Per limit (and again for its accounts): about 5 MiB at the measured ~50 bytes per key.
pub const RATE_LIMIT_MAX_KEYS: u64 = 100_000;
/// `[acme] directory`: Let's Encrypt production; `"letsencrypt-staging"` names its staging twin.
pub const ACME_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";
pub const ACME_DIRECTORY_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";
/// Account key, certificates and keys (folders 0700, files 0600); systemd's `StateDirectory=`.
pub const ACME_STATE_DIR: &str = "/var/lib/portcullis/acme";
/// Prove each name reaches this instance before ordering: no failed authorization spent on a misconfiguration.
pub const ACME_SELF_CHECK: bool = true;

/// `[process] sandbox`: confine the process with Landlock where the kernel can, warn once where it cannot.
pub const SANDBOX: Sandbox = Sandbox::BestEffort;
/// `[process] seccomp`: a system call outside the allow-list fails with EPERM. A call we missed costs one
/// failed operation (logged where it happens), not the process and every connection on it.
pub const SECCOMP: Seccomp = Seccomp::Errno;

/// `[process] temp_dir`: under systemd's `RuntimeDirectory=` when the unit gives one (a tmpfs: files there
/// cost memory), else `/var/tmp/portcullis` (on disk; private with the unit's `PrivateTmp=`).
pub fn temp_dir(runtime_directory: Option<&std::ffi::OsStr>) -> std::path::PathBuf {
    match runtime_directory {
        // RUNTIME_DIRECTORY may list several folders, separated by ':'; the first is ours.
        Some(dirs) if !dirs.is_empty() => {
            let first = dirs.to_string_lossy();
            let first = first.split(':').next().unwrap_or_default();
            std::path::Path::new(first).join("buffers")
        }
        _ => std::path::PathBuf::from("/var/tmp/portcullis"),
    }
}

/// `[process] sandbox_connect_ports`: at most this many ports (ranges expanded): each is one Landlock rule.
pub const SANDBOX_CONNECT_PORTS_MAX: usize = 4096;
