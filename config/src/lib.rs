//! Portcullis configuration: reads the TOML file (`file.rs` mirrors it), checks every key, and builds the
//! typed [`Config`] that the proxy runs on. Every default lives here, in [`defaults`], and every problem is
//! reported as `FILE:LINE:COL: key: what is wrong`. No sockets, no certificates: those are other crates'.

#![forbid(unsafe_code)]

mod cidr;
mod duration;
pub mod file;
mod ratelimit;
mod size;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use cidr::Cidr;
use file::S;
pub use ratelimit::{PathMatch, PerAccount, Rate, RateLimit, parse_rate};

/// The hardened defaults, in one place (docs/CONFIG.md repeats them for users).
pub mod defaults {
    use std::time::Duration;

    pub const HTTPS: &[&str] = &["0.0.0.0:443", "[::]:443"];
    pub const HTTP: &[&str] = &["0.0.0.0:80", "[::]:80"];
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
    pub const SHUTDOWN: Duration = Duration::from_secs(30);
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
    /// One host usually holds a whole /64.
    pub const RATE_LIMIT_IPV6_PREFIX: u8 = 64;
    /// Per limit (and again for its accounts): about 5 MiB at the measured ~50 bytes per key.
    pub const RATE_LIMIT_MAX_KEYS: u64 = 100_000;
    /// `[acme] directory`: Let's Encrypt production; `"letsencrypt-staging"` names its staging twin.
    pub const ACME_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";
    pub const ACME_DIRECTORY_STAGING: &str =
        "https://acme-staging-v02.api.letsencrypt.org/directory";
    /// Account key, certificates and keys (folders 0700, files 0600); systemd's `StateDirectory=`.
    pub const ACME_STATE_DIR: &str = "/var/lib/portcullis/acme";
}

/// The checked configuration the proxy runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (for messages and relative paths); `<demo>` for the embedded default.
    pub source: PathBuf,
    /// Every site: the top-level `names` + `[tls]` + `[[route]]` form is the first (the default), then each
    /// `[[site]]` in order. Each has its own names, certificate and routes.
    pub sites: Vec<Site>,
    /// Refuse handshakes whose SNI names no site (default: serve the default site's certificate).
    pub strict_sni: bool,
    pub listen: Listen,
    pub tls: Tls,
    pub upstreams: Vec<Upstream>,
    pub trusted_proxies: Vec<Cidr>,
    pub headers: SecurityHeaders,
    pub timeouts: Timeouts,
    pub log: Log,
    pub process: Process,
    pub limits: Limits,
    /// `[[rate_limit]]`, or the built-in `auth` limit when the file has none.
    pub rate_limits: Vec<RateLimit>,
    /// `[acme]`, with its defaults; `None` when no site has `acme = true`.
    pub acme: Option<Acme>,
    /// Things that work but deserve a second look (`check` prints them; they do not fail it).
    pub warnings: Vec<Problem>,
}

/// Bounds on what one client or request may cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub header_bytes: u64,
    pub headers: u64,
    pub uri_bytes: u64,
    /// Default request body limit (413); routes may override it.
    pub body: u64,
    pub max_requests_per_connection: u64,
    pub connections: u64,
    pub connections_per_ip: u64,
    pub h2_max_streams: u64,
}

/// Who the process becomes after binding its listeners (see the privilege-drop step in `main`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Process {
    /// The unprivileged user to switch to; required when started as root.
    pub user: Option<String>,
    /// Its group; `None` means the user's primary group.
    pub group: Option<String>,
}

/// One site: the host names it answers, its certificate, its routes (longest prefix first).
#[derive(Debug, Clone)]
pub struct Site {
    /// Lower-case; empty only for a default site that answers any host.
    pub names: Vec<String>,
    pub tls: CertSource,
    pub routes: Vec<Route>,
}

impl Site {
    /// The route a request path takes: longest matching prefix.
    pub fn route(&self, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| path.starts_with(&r.path))
    }
}

#[derive(Debug, Clone)]
pub struct Listen {
    pub https: Vec<SocketAddr>,
    pub http: Vec<SocketAddr>,
    /// Every connection starts with a PROXY protocol v1/v2 header, accepted only from `trusted_proxies`.
    pub proxy_protocol: bool,
}

#[derive(Debug, Clone)]
pub struct Tls {
    pub min_version: TlsVersion,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSource {
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
    /// Generated at start for the configured names (rcgen), kept in memory only.
    SelfSigned,
    /// Obtained and renewed from the `[acme]` CA. Until the first one exists, `files` (cert, key) are served
    /// when given, else a self-signed certificate.
    Acme {
        files: Option<(PathBuf, PathBuf)>,
    },
}

/// `[acme]`: where certificates for `acme = true` sites come from, and where they are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acme {
    /// Contact for the account (`mailto:`); optional.
    pub email: Option<String>,
    /// The CA's directory URL (https).
    pub directory: String,
    pub state_dir: PathBuf,
    pub challenge: AcmeChallenge,
    /// A PEM root trusted for the CA's API (Pebble, step-ca); `None`: the system's roots.
    pub ca_root: Option<PathBuf>,
    pub eab: Option<Eab>,
    /// Renew when this much validity is left; `None`: the CA's ARI window, else two thirds into the lifetime.
    pub renew_before: Option<Duration>,
    /// Before ordering, check that each name resolves to this instance and that it answers the challenge.
    pub self_check: bool,
    /// The port the CA validates on: `None` is the RFC's (80 for HTTP-01, 443 for TLS-ALPN-01). Only a test
    /// CA (Pebble's `httpPort`/`tlsPort`) uses others; the self-check probes it.
    pub validation_port: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcmeChallenge {
    /// RFC 8555 section 8.3: the :80 listener answers `/.well-known/acme-challenge/<token>`.
    Http01,
    /// RFC 8737: the :443 listener answers `acme-tls/1` handshakes.
    TlsAlpn01,
}

/// External account binding (RFC 8555 section 7.3.4): the key id and the base64url HMAC key the CA gave.
#[derive(Clone, PartialEq, Eq)]
pub struct Eab {
    pub kid: String,
    pub hmac_key: String,
}

impl fmt::Debug for Eab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Eab")
            .field("kid", &self.kid)
            .field("hmac_key", &"<secret>")
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3: Mozilla "intermediate".
    Tls12,
    /// TLS 1.3 only: Mozilla "modern".
    Tls13,
}

/// Whether a plain prefix reads like a path segment it does not stop at: not `/`, no trailing `/`, no `.` in
/// its last segment. `"/api"` also matches `"/apiary"`; `"/api/"`, `"/favicon.ico"` and `"/"` are fine.
pub(crate) fn segment_like_prefix(prefix: &str) -> bool {
    let last = prefix.rsplit('/').next().unwrap_or_default();
    !last.is_empty() && !last.contains('.')
}

#[derive(Debug, Clone)]
pub struct Route {
    pub path: String,
    /// Index into [`Config::upstreams`].
    pub upstream: usize,
    /// Request body limit for this route (413 past it).
    pub max_body: u64,
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub servers: Vec<ServerAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerAddr::Tcp(a) => write!(f, "{a}"),
            ServerAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// One security header: the value, and whether it replaces the app's own value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderRule {
    pub value: String,
    pub force: bool,
}

/// `None` means the header is turned off.
#[derive(Debug, Clone)]
pub struct SecurityHeaders {
    pub strict_transport_security: Option<HeaderRule>,
    pub x_frame_options: Option<HeaderRule>,
    pub x_content_type_options: Option<HeaderRule>,
    pub referrer_policy: Option<HeaderRule>,
}

#[derive(Debug, Clone)]
pub struct Timeouts {
    pub upstream_connect: Duration,
    pub upstream_response: Duration,
    pub client_idle: Duration,
    /// An upgraded connection (a tunnel) with no byte either way for this long is closed.
    pub tunnel_idle: Duration,
    pub client_header: Duration,
    pub client_body: Duration,
    pub shutdown: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct Log {
    pub access: bool,
    pub format: LogFormat,
    pub level: String,
}

/// One thing wrong with a config file, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.key,
            self.message
        )
    }
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read (the operator's fault: wrong path or permissions).
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file was read, and these keys are wrong (the operator's fault).
    #[error("{}", problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid { problems: Vec<Problem> },
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Checks config text; `path` names it in messages and anchors relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Config, Error> {
        let mut check = Checker {
            path,
            text,
            problems: Vec::new(),
            warnings: Vec::new(),
        };
        let file: file::File = match toml::from_str(text) {
            Ok(f) => f,
            Err(e) => {
                check.toml_error(&e);
                return Err(check.into_error());
            }
        };
        let mut config = check.build(file);
        config.warnings = std::mem::take(&mut check.warnings);
        if check.problems.is_empty() {
            Ok(config)
        } else {
            Err(check.into_error())
        }
    }
}

struct Checker<'a> {
    path: &'a Path,
    text: &'a str,
    problems: Vec<Problem>,
    warnings: Vec<Problem>,
}

impl Checker<'_> {
    fn into_error(self) -> Error {
        Error::Invalid {
            problems: self.problems,
        }
    }

    fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let col = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
        (line, col)
    }

    fn warning(&mut self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) {
        let (line, col) = self.line_col(span.start);
        self.warnings.push(Problem {
            file: self.path.to_owned(),
            line,
            col,
            key: key.into(),
            message: message.into(),
        });
    }

    fn problem(&mut self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) {
        let (line, col) = self.line_col(span.start);
        self.problems.push(Problem {
            file: self.path.to_owned(),
            line,
            col,
            key: key.into(),
            message: message.into(),
        });
    }

    fn toml_error(&mut self, e: &toml::de::Error) {
        let span = e.span().unwrap_or(0..0);
        // The key is what the error points at when that is a bare key, else the table it sits in.
        let at = self.text.get(span.clone()).unwrap_or("").trim();
        let key = if !at.is_empty()
            && at
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            at.to_owned()
        } else {
            self.enclosing_table(span.start)
        };
        let message = e.message().trim().replace('\n', " ");
        self.problem(span, key, message);
    }

    fn enclosing_table(&self, offset: usize) -> String {
        let before = &self.text[..offset.min(self.text.len())];
        before
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('['))
            .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned())
            .unwrap_or_else(|| "(top level)".to_owned())
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.path.parent().unwrap_or(Path::new("")).join(p)
        }
    }

    fn build(&mut self, f: file::File) -> Config {
        let names = self.names(f.names);
        let listen = self.listen(f.listen);
        // The top-level form is the default site unless only [[site]]s are given.
        let top_level = !f.route.is_empty() || f.site.is_empty();
        let (default_source, tls) = self.tls(f.tls, top_level);
        let upstreams = self.upstreams(&f.upstream);
        let limits = self.limits(f.limits);
        let routes = if top_level {
            self.routes("route", f.route, &f.upstream, limits.body)
        } else {
            Vec::new()
        };
        let mut sites = Vec::with_capacity(f.site.len() + 1);
        if top_level {
            sites.push(Site {
                names,
                tls: default_source,
                routes,
            });
        }
        for (i, s) in f.site.into_iter().enumerate() {
            sites.push(self.site(i, s, &f.upstream, limits.body));
        }
        self.distinct_site_names(&sites);
        let acme = self.acme(f.acme, &sites, usize::from(top_level), &listen);
        let strict_sni = f.strict_sni.is_some_and(|s| *s.get_ref());
        let trusted_proxies = f
            .trusted_proxies
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .filter_map(|(i, s)| match s.get_ref().parse::<Cidr>() {
                Ok(c) => {
                    if c.is_everything() {
                        self.warning(
                            s.span(),
                            format!("trusted_proxies[{i}]"),
                            format!("{c} trusts every address on the internet: any client can then claim any address in X-Forwarded-For"),
                        );
                    }
                    Some(c)
                }
                Err(why) => {
                    self.problem(s.span(), format!("trusted_proxies[{i}]"), why);
                    None
                }
            })
            .collect::<Vec<Cidr>>();
        if listen.proxy_protocol && trusted_proxies.is_empty() {
            self.problem(
                0..0,
                "listen.proxy_protocol",
                "needs trusted_proxies: PROXY headers are accepted only from them",
            );
        }
        let headers = self.headers(f.headers);
        let timeouts = self.timeouts(f.timeouts);
        let log = self.log(f.log);
        let process = self.process(f.process);
        let rate_limits = self.rate_limits(f.rate_limit);
        Config {
            source: self.path.to_owned(),
            sites,
            strict_sni,
            listen,
            tls,
            upstreams,
            trusted_proxies,
            headers,
            timeouts,
            log,
            process,
            limits,
            rate_limits,
            acme,
            warnings: Vec::new(),
        }
    }

    fn size(&mut self, key: &str, s: Option<S<file::Size>>, default: u64) -> u64 {
        let Some(s) = s else { return default };
        let parsed = match s.get_ref() {
            file::Size::Bytes(n) => Ok(*n),
            file::Size::Text(t) => size::parse(t),
        };
        match parsed {
            Ok(0) => {
                self.problem(s.span(), key, "must be more than zero");
                default
            }
            Ok(n) => n,
            Err(why) => {
                self.problem(s.span(), key, why);
                default
            }
        }
    }

    fn count(&mut self, key: &str, s: Option<S<u64>>, default: u64) -> u64 {
        match s {
            None => default,
            Some(s) if *s.get_ref() == 0 => {
                self.problem(s.span(), key, "must be more than zero");
                default
            }
            Some(s) => *s.get_ref(),
        }
    }

    fn limits(&mut self, l: Option<file::Limits>) -> Limits {
        let l = l.unwrap_or(file::Limits {
            header_bytes: None,
            headers: None,
            uri_bytes: None,
            body: None,
            max_requests_per_connection: None,
            connections: None,
            connections_per_ip: None,
            h2_max_streams: None,
        });
        let limits = Limits {
            header_bytes: self.size(
                "limits.header_bytes",
                l.header_bytes,
                defaults::HEADER_BYTES,
            ),
            headers: self.count("limits.headers", l.headers, defaults::HEADERS),
            uri_bytes: self.size("limits.uri_bytes", l.uri_bytes, defaults::URI_BYTES),
            body: self.size("limits.body", l.body, defaults::BODY),
            max_requests_per_connection: self.count(
                "limits.max_requests_per_connection",
                l.max_requests_per_connection,
                defaults::MAX_REQUESTS_PER_CONNECTION,
            ),
            connections: self.count("limits.connections", l.connections, defaults::CONNECTIONS),
            connections_per_ip: self.count(
                "limits.connections_per_ip",
                l.connections_per_ip,
                defaults::CONNECTIONS_PER_IP,
            ),
            h2_max_streams: self.count(
                "limits.h2_max_streams",
                l.h2_max_streams,
                defaults::H2_MAX_STREAMS,
            ),
        };
        if limits.header_bytes < 1024 {
            self.problem(0..0, "limits.header_bytes", "must be at least 1KiB");
        }
        limits
    }

    fn process(&mut self, p: Option<file::Process>) -> Process {
        let Some(p) = p else {
            return Process::default();
        };
        let mut name = |key: &str, v: Option<S<String>>| {
            let v = v?;
            let ok = !v.get_ref().is_empty()
                && v.get_ref().len() <= 32
                && v.get_ref()
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            if !ok {
                self.problem(
                    v.span(),
                    format!("process.{key}"),
                    format!("{:?} is not a user or group name", v.get_ref()),
                );
            }
            Some(v.into_inner())
        };
        Process {
            user: name("user", p.user),
            group: name("group", p.group),
        }
    }

    fn names(&mut self, names: Option<S<Vec<S<String>>>>) -> Vec<String> {
        match names {
            None => Vec::new(),
            Some(n) => self.host_names("names", n),
        }
    }

    fn host_names(&mut self, key: &str, names: S<Vec<S<String>>>) -> Vec<String> {
        let span = names.span();
        let names = names.into_inner();
        if names.is_empty() {
            self.problem(span, key, "is empty: list the host names served");
        }
        let mut out = Vec::with_capacity(names.len());
        for (i, n) in names.into_iter().enumerate() {
            let lower = n.get_ref().trim_end_matches('.').to_ascii_lowercase();
            if valid_host_name(&lower) {
                out.push(lower);
            } else {
                self.problem(
                    n.span(),
                    format!("{key}[{i}]"),
                    format!("{:?} is not a host name", n.get_ref()),
                );
            }
        }
        out
    }

    fn site(
        &mut self,
        i: usize,
        s: S<file::Site>,
        ups: &std::collections::BTreeMap<String, S<file::Upstream>>,
        default_body: u64,
    ) -> Site {
        let s = s.into_inner();
        let names = self.host_names(&format!("site[{i}].names"), s.names);
        let tls_span = s.tls.span();
        let t = s.tls.into_inner();
        if let Some(v) = &t.min_version {
            self.problem(
                v.span(),
                format!("site[{i}].tls.min_version"),
                "is set once, in the top-level [tls]",
            );
        }
        let self_signed = t.self_signed.as_ref().is_some_and(|s| *s.get_ref());
        let acme = t.acme.as_ref().is_some_and(|s| *s.get_ref());
        let tls = match (t.cert, t.key, self_signed) {
            (cert, key, false) if acme => {
                self.acme_source(&format!("site[{i}].tls"), tls_span, cert, key)
            }
            (Some(cert), Some(key), false) => CertSource::Files {
                cert: self.resolve(cert.get_ref()),
                key: self.resolve(key.get_ref()),
            },
            (None, None, true) if !acme => CertSource::SelfSigned,
            _ => {
                self.problem(
                    tls_span,
                    format!("site[{i}].tls"),
                    "give `cert` and `key`, `self_signed = true`, or `acme = true`",
                );
                CertSource::SelfSigned
            }
        };
        let routes = self.routes(&format!("site[{i}].route"), s.route, ups, default_body);
        Site { names, tls, routes }
    }

    /// A host name may belong to one site only, or SNI and Host could not pick one.
    fn distinct_site_names(&mut self, sites: &[Site]) {
        let mut seen: Vec<&str> = Vec::new();
        for s in sites {
            for n in &s.names {
                if seen.contains(&n.as_str()) {
                    self.problem(0..0, "site", format!("{n:?} is named by two sites"));
                }
                seen.push(n);
            }
        }
    }

    fn addrs(&mut self, key: &str, list: Vec<S<String>>) -> Vec<SocketAddr> {
        let mut out = Vec::with_capacity(list.len());
        for (i, a) in list.into_iter().enumerate() {
            match a.get_ref().parse::<SocketAddr>() {
                Ok(addr) => out.push(addr),
                Err(_) => self.problem(
                    a.span(),
                    format!("listen.{key}[{i}]"),
                    format!("{:?} is not an address with a port, like \"127.0.0.1:8443\" or \"[::]:443\"", a.get_ref()),
                ),
            }
        }
        out
    }

    fn listen(&mut self, l: Option<file::Listen>) -> Listen {
        let default = |d: &[&str]| {
            d.iter()
                .filter_map(|s| s.parse().ok())
                .collect::<Vec<SocketAddr>>()
        };
        let (https, http, proxy_protocol) = match l {
            None => (None, None, None),
            Some(l) => (l.https, l.http, l.proxy_protocol),
        };
        let https = match https {
            Some(list) => self.addrs("https", list),
            None => default(defaults::HTTPS),
        };
        let http = match http {
            Some(list) => self.addrs("http", list),
            None => default(defaults::HTTP),
        };
        Listen {
            https,
            http,
            proxy_protocol: proxy_protocol.is_some_and(|p| *p.get_ref()),
        }
    }

    /// The default site's certificate source, and the settings every site shares.
    fn tls(&mut self, t: Option<S<file::Tls>>, need_source: bool) -> (CertSource, Tls) {
        if !need_source {
            // Only [[site]]s: the top-level [tls] may still set min_version, and nothing else.
            let min_version = match t.map(S::into_inner) {
                Some(t) => {
                    for (k, v) in [
                        ("cert", t.cert.map(|s| s.span())),
                        ("key", t.key.map(|s| s.span())),
                        ("self_signed", t.self_signed.map(|s| s.span())),
                        ("acme", t.acme.map(|s| s.span())),
                    ] {
                        if let Some(span) = v {
                            self.problem(
                                span,
                                format!("tls.{k}"),
                                "only with top-level [[route]]s: each [[site]] has its own tls",
                            );
                        }
                    }
                    self.min_version(t.min_version)
                }
                None => TlsVersion::Tls12,
            };
            return (CertSource::SelfSigned, Tls { min_version });
        }
        let Some(t) = t else {
            self.problem(
                0..0,
                "tls",
                "missing: give `cert` and `key` files, or `self_signed = true`",
            );
            return (
                CertSource::SelfSigned,
                Tls {
                    min_version: TlsVersion::Tls12,
                },
            );
        };
        let span = t.span();
        let t = t.into_inner();
        let self_signed = t.self_signed.as_ref().is_some_and(|s| *s.get_ref());
        let acme = t.acme.as_ref().is_some_and(|s| *s.get_ref());
        let source = match (t.cert, t.key, self_signed) {
            (cert, key, false) if acme => self.acme_source("tls", span.clone(), cert, key),
            (_, _, true) if acme => {
                self.problem(
                    span.clone(),
                    "tls.acme",
                    "give either `acme = true` or `self_signed = true`, not both",
                );
                CertSource::SelfSigned
            }
            (Some(cert), Some(key), false) => CertSource::Files {
                cert: self.resolve(cert.get_ref()),
                key: self.resolve(key.get_ref()),
            },
            (None, None, true) => CertSource::SelfSigned,
            (Some(c), _, true) => {
                self.problem(
                    c.span(),
                    "tls.cert",
                    "give either `cert` and `key`, or `self_signed = true`, not both",
                );
                CertSource::SelfSigned
            }
            (_, Some(k), true) => {
                self.problem(
                    k.span(),
                    "tls.key",
                    "give either `cert` and `key`, or `self_signed = true`, not both",
                );
                CertSource::SelfSigned
            }
            (Some(_), None, false) => {
                self.problem(
                    span,
                    "tls.key",
                    "missing: `cert` needs its private key file",
                );
                CertSource::SelfSigned
            }
            (None, Some(_), false) => {
                self.problem(
                    span,
                    "tls.cert",
                    "missing: `key` needs its certificate chain file",
                );
                CertSource::SelfSigned
            }
            (None, None, false) => {
                self.problem(
                    span,
                    "tls",
                    "give `cert` and `key` files, or `self_signed = true`",
                );
                CertSource::SelfSigned
            }
        };
        let min_version = self.min_version(t.min_version);
        (source, Tls { min_version })
    }

    /// `acme = true`, with the `cert`/`key` files served until the first certificate when both are given.
    fn acme_source(
        &mut self,
        key: &str,
        span: Range<usize>,
        cert: Option<S<String>>,
        k: Option<S<String>>,
    ) -> CertSource {
        match (cert, k) {
            (Some(c), Some(k)) => CertSource::Acme {
                files: Some((self.resolve(c.get_ref()), self.resolve(k.get_ref()))),
            },
            (None, None) => CertSource::Acme { files: None },
            _ => {
                self.problem(span, key, "with `acme = true`, give both `cert` and `key` (served until the first certificate) or neither");
                CertSource::Acme { files: None }
            }
        }
    }

    /// `[acme]` and the sites that use it. `first_site` is the index of `[[site]]` 0 in `sites`.
    fn acme(
        &mut self,
        a: Option<S<file::Acme>>,
        sites: &[Site],
        first_site: usize,
        listen: &Listen,
    ) -> Option<Acme> {
        let users: Vec<usize> = (0..sites.len())
            .filter(|i| matches!(sites[*i].tls, CertSource::Acme { .. }))
            .collect();
        let (span, a) = match a {
            Some(a) => (a.span(), a.into_inner()),
            None if users.is_empty() => return None,
            None => (
                0..0,
                file::Acme {
                    email: None,
                    directory: None,
                    state_dir: None,
                    challenge: None,
                    ca_root: None,
                    eab: None,
                    renew_before: None,
                    self_check: None,
                    validation_port: None,
                },
            ),
        };
        if users.is_empty() {
            self.warning(
                span,
                "acme",
                "no site has `acme = true`: this section is not used",
            );
            return None;
        }
        for &i in &users {
            let key = if i < first_site {
                "names".to_owned()
            } else {
                format!("site[{}].names", i - first_site)
            };
            if sites[i].names.is_empty() {
                self.problem(0..0, key.clone(), "an `acme = true` site needs its host names: they are what the certificate is for");
            }
            for n in sites[i].names.iter().filter(|n| n.starts_with("*.")) {
                self.problem(0..0, key.clone(), format!("{n:?}: wildcard names need the DNS-01 challenge, which Portcullis does not do"));
            }
        }
        let email = a.email.and_then(|e| {
            let ok = e.get_ref().contains('@')
                && !e
                    .get_ref()
                    .contains(|c: char| c.is_whitespace() || c == ',' || c == '<' || c == '>');
            if !ok {
                self.problem(
                    e.span(),
                    "acme.email",
                    format!("{:?} is not an email address", e.get_ref()),
                );
            }
            ok.then(|| e.into_inner())
        });
        let directory = match a.directory {
            None => defaults::ACME_DIRECTORY.to_owned(),
            Some(d) => match d.get_ref().as_str() {
                "letsencrypt" => defaults::ACME_DIRECTORY.to_owned(),
                "letsencrypt-staging" => defaults::ACME_DIRECTORY_STAGING.to_owned(),
                url if url.starts_with("https://")
                    && url.len() > "https://".len()
                    && !url.contains(char::is_whitespace) =>
                {
                    url.to_owned()
                }
                other => {
                    self.problem(d.span(), "acme.directory", format!("{other:?}: give the CA's https:// directory URL, \"letsencrypt\" or \"letsencrypt-staging\""));
                    defaults::ACME_DIRECTORY.to_owned()
                }
            },
        };
        let state_dir = a.state_dir.map_or_else(
            || PathBuf::from(defaults::ACME_STATE_DIR),
            |d| self.resolve(d.get_ref()),
        );
        let default_challenge = if listen.http.is_empty() {
            AcmeChallenge::TlsAlpn01
        } else {
            AcmeChallenge::Http01
        };
        let challenge = match a.challenge {
            None => default_challenge,
            Some(c) => match c.get_ref().as_str() {
                "http-01" if listen.http.is_empty() => {
                    self.problem(c.span(), "acme.challenge", "http-01 needs the plain-HTTP listener (listen.http): use \"tls-alpn-01\" or add it");
                    AcmeChallenge::Http01
                }
                "http-01" => AcmeChallenge::Http01,
                "tls-alpn-01" if listen.https.is_empty() => {
                    self.problem(
                        c.span(),
                        "acme.challenge",
                        "tls-alpn-01 needs the HTTPS listener (listen.https)",
                    );
                    AcmeChallenge::TlsAlpn01
                }
                "tls-alpn-01" => AcmeChallenge::TlsAlpn01,
                other => {
                    self.problem(
                        c.span(),
                        "acme.challenge",
                        format!("{other:?}: use \"http-01\" or \"tls-alpn-01\""),
                    );
                    default_challenge
                }
            },
        };
        if challenge == AcmeChallenge::TlsAlpn01 {
            for &i in &users {
                for n in sites[i]
                    .names
                    .iter()
                    .filter(|n| n.parse::<IpAddr>().is_ok())
                {
                    self.problem(
                        0..0,
                        "acme.challenge",
                        format!("{n:?}: an IP address needs the http-01 challenge"),
                    );
                }
            }
        }
        let ca_root = a.ca_root.map(|p| self.resolve(p.get_ref()));
        let eab = a.eab.map(|e| {
            let e = e.into_inner();
            if e.kid.get_ref().is_empty() {
                self.problem(e.kid.span(), "acme.eab.kid", "is empty");
            }
            let key = e.hmac_key.get_ref();
            if key.is_empty()
                || !key
                    .trim_end_matches('=')
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                self.problem(
                    e.hmac_key.span(),
                    "acme.eab.hmac_key",
                    "must be the base64url key the CA gave",
                );
            }
            Eab {
                kid: e.kid.into_inner(),
                hmac_key: e.hmac_key.into_inner(),
            }
        });
        let renew_before = a.renew_before.and_then(|r| {
            let text = r.get_ref().trim();
            let parsed = match text.strip_suffix('d').map(str::trim).map(str::parse::<u64>) {
                Some(Ok(days)) if days > 0 => Ok(Duration::from_secs(days.saturating_mul(86_400))),
                Some(_) => Err(format!("{text:?} is not a number of days like \"30d\"")),
                None => duration::parse(text),
            };
            match parsed {
                Ok(d) => Some(d),
                Err(why) => {
                    self.problem(r.span(), "acme.renew_before", why);
                    None
                }
            }
        });
        let validation_port = a.validation_port.and_then(|p| {
            if *p.get_ref() == 0 {
                self.problem(
                    p.span(),
                    "acme.validation_port",
                    "must be a port number, 1-65535",
                );
                None
            } else {
                Some(*p.get_ref())
            }
        });
        Some(Acme {
            email,
            directory,
            state_dir,
            challenge,
            ca_root,
            eab,
            renew_before,
            self_check: a.self_check.is_none_or(|s| *s.get_ref()),
            validation_port,
        })
    }

    fn min_version(&mut self, v: Option<S<String>>) -> TlsVersion {
        match v {
            None => TlsVersion::Tls12,
            Some(v) => match v.get_ref().as_str() {
                "1.2" => TlsVersion::Tls12,
                "1.3" => TlsVersion::Tls13,
                other => {
                    self.problem(
                        v.span(),
                        "tls.min_version",
                        format!("{other:?}: use \"1.2\" or \"1.3\""),
                    );
                    TlsVersion::Tls12
                }
            },
        }
    }

    fn upstreams(
        &mut self,
        ups: &std::collections::BTreeMap<String, S<file::Upstream>>,
    ) -> Vec<Upstream> {
        let mut out = Vec::with_capacity(ups.len());
        for (name, u) in ups {
            let servers = u.get_ref().servers.get_ref();
            if servers.is_empty() {
                self.problem(
                    u.get_ref().servers.span(),
                    format!("upstream.{name}.servers"),
                    "is empty: list at least one server",
                );
            }
            let mut addrs = Vec::with_capacity(servers.len());
            for (i, s) in servers.iter().enumerate() {
                let key = format!("upstream.{name}.servers[{i}]");
                let text = s.get_ref();
                if let Some(path) = text.strip_prefix("unix:") {
                    if path.is_empty() {
                        self.problem(s.span(), key, "\"unix:\" needs a socket path");
                    } else {
                        addrs.push(ServerAddr::Unix(self.resolve(path)));
                    }
                } else {
                    match text.parse::<SocketAddr>() {
                        Ok(a) => addrs.push(ServerAddr::Tcp(a)),
                        Err(_) => self.problem(
                            s.span(),
                            key,
                            format!("{text:?} is not \"IP:PORT\" or \"unix:/path/to.sock\""),
                        ),
                    }
                }
            }
            out.push(Upstream {
                name: name.clone(),
                servers: addrs,
            });
        }
        out
    }

    fn routes(
        &mut self,
        key: &str,
        routes: Vec<S<file::Route>>,
        ups: &std::collections::BTreeMap<String, S<file::Upstream>>,
        default_body: u64,
    ) -> Vec<Route> {
        if routes.is_empty() {
            self.problem(
                0..0,
                key,
                "missing: add at least one [[route]] with a path and an upstream",
            );
        }
        let mut out: Vec<Route> = Vec::with_capacity(routes.len());
        for (i, r) in routes.into_iter().enumerate() {
            let r = r.into_inner();
            let path = r.path.get_ref();
            if !path.starts_with('/') {
                self.problem(
                    r.path.span(),
                    format!("{key}[{i}].path"),
                    format!("{path:?} must start with '/'"),
                );
                continue;
            }
            if out.iter().any(|o| o.path == *path) {
                self.problem(
                    r.path.span(),
                    format!("{key}[{i}].path"),
                    format!("{path:?} is routed twice"),
                );
                continue;
            }
            if segment_like_prefix(path) {
                self.warning(
                    r.path.span(),
                    format!("{key}[{i}].path"),
                    format!(
                        "{path:?} is a plain prefix: it also routes every path that starts with it, like {:?}; \
                         write \"{path}/\" to route only {path}/ and below",
                        format!("{path}-old")
                    ),
                );
            }
            let max_body = self.size(&format!("{key}[{i}].max_body"), r.max_body, default_body);
            // BTreeMap order is the order of Checker::upstreams' output.
            match ups.keys().position(|k| k == r.upstream.get_ref()) {
                Some(upstream) => out.push(Route {
                    path: path.clone(),
                    upstream,
                    max_body,
                }),
                None => self.problem(
                    r.upstream.span(),
                    format!("{key}[{i}].upstream"),
                    format!("no [upstream.{}] is defined", r.upstream.get_ref()),
                ),
            }
        }
        out.sort_by_key(|r| std::cmp::Reverse(r.path.len()));
        out
    }

    fn header(
        &mut self,
        key: &str,
        s: Option<S<file::HeaderSetting>>,
        default: &str,
        force: bool,
    ) -> Option<HeaderRule> {
        let value = match s {
            None => default.to_owned(),
            Some(s) => match s.get_ref() {
                file::HeaderSetting::On(false) => return None,
                file::HeaderSetting::On(true) => default.to_owned(),
                file::HeaderSetting::Value(v) => {
                    if v.is_empty() || !v.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b)) {
                        self.problem(
                            s.span(),
                            format!("headers.{key}"),
                            "must be non-empty visible ASCII (or false to turn it off)",
                        );
                    }
                    v.clone()
                }
            },
        };
        Some(HeaderRule { value, force })
    }

    fn headers(&mut self, h: Option<file::Headers>) -> SecurityHeaders {
        const KEYS: [&str; 4] = [
            "strict_transport_security",
            "x_frame_options",
            "x_content_type_options",
            "referrer_policy",
        ];
        let h = h.unwrap_or(file::Headers {
            strict_transport_security: None,
            x_frame_options: None,
            x_content_type_options: None,
            referrer_policy: None,
            force: None,
        });
        let mut forced = [false; 4];
        for (i, f) in h.force.unwrap_or_default().into_iter().enumerate() {
            match KEYS.iter().position(|k| k == f.get_ref()) {
                Some(k) => forced[k] = true,
                None => self.problem(
                    f.span(),
                    format!("headers.force[{i}]"),
                    format!("{:?} is not one of {}", f.get_ref(), KEYS.join(", ")),
                ),
            }
        }
        SecurityHeaders {
            strict_transport_security: self.header(
                KEYS[0],
                h.strict_transport_security,
                defaults::HSTS,
                forced[0],
            ),
            x_frame_options: self.header(
                KEYS[1],
                h.x_frame_options,
                defaults::X_FRAME_OPTIONS,
                forced[1],
            ),
            x_content_type_options: self.header(
                KEYS[2],
                h.x_content_type_options,
                defaults::X_CONTENT_TYPE_OPTIONS,
                forced[2],
            ),
            referrer_policy: self.header(
                KEYS[3],
                h.referrer_policy,
                defaults::REFERRER_POLICY,
                forced[3],
            ),
        }
    }

    fn duration(&mut self, key: &str, s: Option<S<String>>, default: Duration) -> Duration {
        match s {
            None => default,
            Some(s) => match duration::parse(s.get_ref()) {
                Ok(d) => d,
                Err(why) => {
                    self.problem(s.span(), format!("timeouts.{key}"), why);
                    default
                }
            },
        }
    }

    fn timeouts(&mut self, t: Option<file::Timeouts>) -> Timeouts {
        let t = t.unwrap_or(file::Timeouts {
            upstream_connect: None,
            upstream_response: None,
            client_idle: None,
            tunnel_idle: None,
            client_header: None,
            client_body: None,
            shutdown: None,
        });
        Timeouts {
            upstream_connect: self.duration(
                "upstream_connect",
                t.upstream_connect,
                defaults::UPSTREAM_CONNECT,
            ),
            upstream_response: self.duration(
                "upstream_response",
                t.upstream_response,
                defaults::UPSTREAM_RESPONSE,
            ),
            client_idle: self.duration("client_idle", t.client_idle, defaults::CLIENT_IDLE),
            tunnel_idle: self.duration("tunnel_idle", t.tunnel_idle, defaults::TUNNEL_IDLE),
            client_header: self.duration("client_header", t.client_header, defaults::CLIENT_HEADER),
            client_body: self.duration("client_body", t.client_body, defaults::CLIENT_BODY),
            shutdown: self.duration("shutdown", t.shutdown, defaults::SHUTDOWN),
        }
    }

    fn log(&mut self, l: Option<file::Log>) -> Log {
        let mut log = Log {
            access: true,
            format: LogFormat::Text,
            level: "info".to_owned(),
        };
        let Some(l) = l else { return log };
        if let Some(a) = l.access {
            log.access = *a.get_ref();
        }
        if let Some(f) = l.format {
            match f.get_ref().as_str() {
                "text" => log.format = LogFormat::Text,
                "json" => log.format = LogFormat::Json,
                other => self.problem(
                    f.span(),
                    "log.format",
                    format!("{other:?}: use \"text\" or \"json\""),
                ),
            }
        }
        if let Some(lv) = l.level {
            match lv.get_ref().as_str() {
                "error" | "warn" | "info" | "debug" | "trace" => log.level = lv.get_ref().clone(),
                other => self.problem(
                    lv.span(),
                    "log.level",
                    format!("{other:?}: use error, warn, info, debug or trace"),
                ),
            }
        }
        log
    }
}

/// RFC 1123 host name, lower-case, optionally a leading `*.` wildcard label.
fn valid_host_name(n: &str) -> bool {
    let n = n.strip_prefix("*.").unwrap_or(n);
    if n.parse::<IpAddr>().is_ok() {
        return true;
    }
    !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
names = ["localhost"]

[listen]
https = ["127.0.0.1:8443"]
http  = ["127.0.0.1:8080"]

[tls]
cert = "/etc/portcullis/fullchain.pem"
key  = "/etc/portcullis/privkey.pem"

[[route]]
path = "/"
upstream = "app"

[upstream.app]
servers = ["127.0.0.1:8000"]
"#;

    pub(crate) fn parse(text: &str) -> Result<Config, Error> {
        Config::parse(Path::new("/etc/portcullis/portcullis.toml"), text)
    }

    pub(crate) fn problems(text: &str) -> Vec<String> {
        match parse(text) {
            Ok(_) => Vec::new(),
            Err(Error::Invalid { problems }) => problems.iter().map(ToString::to_string).collect(),
            Err(e) => vec![e.to_string()],
        }
    }

    #[test]
    fn the_issue_example_parses_with_hardened_defaults() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.sites[0].names, ["localhost"]);
        assert_eq!(
            c.listen.https,
            ["127.0.0.1:8443".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(c.sites[0].routes[0].path, "/");
        assert_eq!(
            c.upstreams[0].servers,
            [ServerAddr::Tcp("127.0.0.1:8000".parse().unwrap())]
        );
        assert_eq!(c.tls.min_version, TlsVersion::Tls12);
        assert_eq!(
            c.headers.strict_transport_security.unwrap().value,
            defaults::HSTS
        );
        assert_eq!(c.timeouts.shutdown, Duration::from_secs(30));
        assert_eq!(c.timeouts.tunnel_idle, Duration::from_secs(600));
        assert!(c.trusted_proxies.is_empty());
        assert_eq!(c.process, Process::default());
    }

    #[test]
    fn limits_sizes_and_route_overrides() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.limits.body, 10 * 1024 * 1024);
        assert_eq!(c.sites[0].routes[0].max_body, 10 * 1024 * 1024);
        let text = EXAMPLE.replace(
            "upstream = \"app\"\n",
            "upstream = \"app\"\nmax_body = \"1GiB\"\n",
        );
        let c = parse(&format!(
            "{text}\n[limits]\nbody = 1000\nheader_bytes = \"16KiB\"\n"
        ))
        .unwrap();
        assert_eq!(c.sites[0].routes[0].max_body, 1 << 30);
        assert_eq!(c.limits.body, 1000);
        assert_eq!(c.limits.header_bytes, 16 * 1024);
        let p = problems(&format!(
            "{EXAMPLE}\n[limits]\nbody = \"lots\"\nheaders = 0\n"
        ));
        assert_eq!(p.len(), 2, "{p:?}");
    }

    #[test]
    fn sites_add_to_the_default_site_or_stand_alone() {
        let text = format!(
            "{EXAMPLE}\n[[site]]\nnames = [\"app.example.com\", \"*.example.com\"]\ntls = {{ self_signed = true }}\n  [[site.route]]\n  path = \"/\"\n  upstream = \"app\"\n"
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.sites.len(), 2);
        assert_eq!(c.sites[0].names, ["localhost"]);
        assert_eq!(c.sites[1].names, ["app.example.com", "*.example.com"]);
        assert_eq!(c.sites[1].tls, CertSource::SelfSigned);
        assert_eq!(c.sites[1].route("/x").unwrap().upstream, 0);

        let only = "[[site]]\nnames = [\"a.test\"]\ntls = { cert = \"a.pem\", key = \"a.key\" }\n[[site.route]]\npath = \"/\"\nupstream = \"app\"\n[upstream.app]\nservers = [\"127.0.0.1:1\"]\n[tls]\nmin_version = \"1.3\"\n";
        let c = parse(only).unwrap();
        assert_eq!(c.sites.len(), 1);
        assert_eq!(c.tls.min_version, TlsVersion::Tls13);
        assert_eq!(
            c.sites[0].tls,
            CertSource::Files {
                cert: "/etc/portcullis/a.pem".into(),
                key: "/etc/portcullis/a.key".into()
            }
        );

        let dup = format!(
            "{EXAMPLE}\n[[site]]\nnames = [\"localhost\"]\ntls = {{ self_signed = true }}\n[[site.route]]\npath = \"/\"\nupstream = \"nope\"\n"
        );
        let p = problems(&dup);
        assert!(
            p.iter()
                .any(|l| l.contains("site: \"localhost\" is named by two sites")),
            "{p:?}"
        );
        assert!(
            p.iter().any(|l| l.contains("site[0].route[0].upstream")),
            "{p:?}"
        );
    }

    #[test]
    fn acme_sites_and_the_acme_section() {
        let text = format!(
            "{EXAMPLE}\n[[site]]\nnames = [\"a.example.com\", \"b.example.com\"]\ntls = {{ acme = true }}\n[[site.route]]\npath = \"/\"\nupstream = \"app\"\n[acme]\nemail = \"ops@example.com\"\ndirectory = \"letsencrypt-staging\"\nstate_dir = \"acme\"\nrenew_before = \"30d\"\n"
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.sites[1].tls, CertSource::Acme { files: None });
        let a = c.acme.unwrap();
        assert_eq!(a.directory, defaults::ACME_DIRECTORY_STAGING);
        assert_eq!(a.state_dir, PathBuf::from("/etc/portcullis/acme"));
        assert_eq!(a.challenge, AcmeChallenge::Http01);
        assert_eq!(a.renew_before, Some(Duration::from_secs(30 * 86_400)));
        assert!(a.self_check && a.eab.is_none() && a.ca_root.is_none());

        let bad = text
            .replace("\"b.example.com\"", "\"*.example.com\"")
            .replace(
                "renew_before = \"30d\"",
                "challenge = \"dns-01\"\neab = { kid = \"k\", hmac_key = \"not base64!\" }",
            );
        let p = problems(&bad);
        assert!(
            p.iter()
                .any(|l| l.contains("site[0].names") && l.contains("DNS-01")),
            "{p:?}"
        );
        assert!(p.iter().any(|l| l.contains("acme.challenge")), "{p:?}");
        assert!(p.iter().any(|l| l.contains("acme.eab.hmac_key")), "{p:?}");

        // The top-level [tls]: its files serve until the first certificate; no [acme] means the defaults.
        let top = EXAMPLE.replace(
            "key  = \"/etc/portcullis/privkey.pem\"",
            "key  = \"/etc/portcullis/privkey.pem\"\nacme = true",
        );
        let c = parse(&top).unwrap();
        assert!(matches!(
            &c.sites[0].tls,
            CertSource::Acme { files: Some(_) }
        ));
        assert_eq!(c.acme.unwrap().directory, defaults::ACME_DIRECTORY);
        let no_http = top.replace("http  = [\"127.0.0.1:8080\"]", "http = []");
        assert_eq!(
            parse(&no_http).unwrap().acme.unwrap().challenge,
            AcmeChallenge::TlsAlpn01
        );
        assert!(
            problems(&format!("{no_http}\n[acme]\nchallenge = \"http-01\"\n"))[0]
                .contains("acme.challenge")
        );
    }

    #[test]
    fn trusting_everyone_is_a_warning() {
        let c = parse(&format!(
            "trusted_proxies = [\"10.0.0.0/8\", \"0.0.0.0/0\"]\n{EXAMPLE}"
        ))
        .unwrap();
        assert_eq!(c.warnings.len(), 1);
        assert!(
            c.warnings[0].to_string().contains(":1:") && c.warnings[0].key == "trusted_proxies[1]",
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn process_user_and_group() {
        let c = parse(&format!("{EXAMPLE}\n[process]\nuser = \"portcullis\"\n")).unwrap();
        assert_eq!(c.process.user.as_deref(), Some("portcullis"));
        assert_eq!(c.process.group, None);
        assert!(
            problems(&format!("{EXAMPLE}\n[process]\nuser = \"a b\"\n"))[0]
                .contains("process.user")
        );
    }

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let c = parse(
            &EXAMPLE
                .replace("/etc/portcullis/fullchain.pem", "certs/full.pem")
                .replace("127.0.0.1:8000", "unix:run/app.sock"),
        )
        .unwrap();
        assert_eq!(
            c.sites[0].tls,
            CertSource::Files {
                cert: "/etc/portcullis/certs/full.pem".into(),
                key: "/etc/portcullis/privkey.pem".into()
            }
        );
        assert_eq!(
            c.upstreams[0].servers,
            [ServerAddr::Unix("/etc/portcullis/run/app.sock".into())]
        );
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let p = problems(&EXAMPLE.replace("http  =", "htp ="));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("/etc/portcullis/portcullis.toml:6:1: htp: unknown field"),
            "{}",
            p[0]
        );
    }

    #[test]
    fn every_problem_is_reported_not_just_the_first() {
        let text = EXAMPLE
            .replace("127.0.0.1:8443", "nonsense")
            .replace("upstream = \"app\"", "upstream = \"nope\"")
            .replace("127.0.0.1:8000", "localhost");
        let p = problems(&text);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(
            p[0].contains(":5:") && p[0].contains("listen.https[0]"),
            "{}",
            p[0]
        );
        assert!(
            p.iter()
                .any(|l| l.contains("route[0].upstream: no [upstream.nope]"))
        );
        assert!(p.iter().any(|l| l.contains("upstream.app.servers[0]")));
    }

    /// Issue 10 (Also): `"/api"` also routes `/apiary`; `check` says so for a prefix that reads like a segment.
    #[test]
    fn a_route_that_reads_like_a_segment_but_is_a_plain_prefix_warns() {
        let text = format!(
            "{EXAMPLE}[[route]]\npath = \"/api\"\nupstream = \"app\"\n[[route]]\npath = \"/static/\"\nupstream = \"app\"\n[[route]]\npath = \"/favicon.ico\"\nupstream = \"app\"\n[[route]]\npath = \"/v1.2\"\nupstream = \"app\"\n[[site]]\nnames = [\"b.test\"]\ntls = {{ self_signed = true }}\n[[site.route]]\npath = \"/admin\"\nupstream = \"app\"\n"
        );
        let c = parse(&text).unwrap();
        let w: Vec<String> = c.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains(":19:8:")
                && w[0].contains(": route[1].path: ")
                && w[0].contains("\"/api/\""),
            "{w:?}"
        );
        assert!(w[1].contains(": site[0].route[0].path: "), "{w:?}");
        // Still a plain prefix: the warning changes nothing about how it routes.
        assert!(
            c.sites[0]
                .route("/apiary")
                .is_some_and(|r| r.path == "/api")
        );
        assert!(segment_like_prefix("/api/v1"));
        for fine in [
            "/",
            "/api/",
            "/favicon.ico",
            "/.well-known/",
            "/static/app.js",
        ] {
            assert!(!segment_like_prefix(fine), "{fine}");
        }
    }

    #[test]
    fn longest_prefix_wins() {
        let text = format!(
            "{EXAMPLE}\n[[route]]\npath = \"/api/\"\nupstream = \"api\"\n[upstream.api]\nservers = [\"127.0.0.1:9000\"]\n"
        );
        let c = parse(&text).unwrap();
        let api = c.sites[0].route("/api/x").unwrap();
        assert_eq!(c.upstreams[api.upstream].name, "api");
        assert_eq!(
            c.upstreams[c.sites[0].route("/x").unwrap().upstream].name,
            "app"
        );
    }

    #[test]
    fn headers_can_be_turned_off_changed_and_forced() {
        let text = format!(
            "{EXAMPLE}\n[headers]\nx_frame_options = false\nreferrer_policy = \"no-referrer\"\nforce = [\"referrer_policy\"]\n"
        );
        let c = parse(&text).unwrap();
        assert!(c.headers.x_frame_options.is_none());
        assert_eq!(
            c.headers.referrer_policy,
            Some(HeaderRule {
                value: "no-referrer".into(),
                force: true
            })
        );
        assert!(!c.headers.x_content_type_options.unwrap().force);
    }

    #[test]
    fn bad_durations_and_versions_are_named() {
        let text = format!("{EXAMPLE}\n[timeouts]\nshutdown = \"soon\"\n").replace(
            "key  = \"/etc/portcullis/privkey.pem\"",
            "key = \"k.pem\"\nmin_version = \"1.1\"",
        );
        let p = problems(&text);
        assert!(p.iter().any(|l| l.contains("timeouts.shutdown")), "{p:?}");
        assert!(p.iter().any(|l| l.contains("tls.min_version")), "{p:?}");
    }

    #[test]
    fn tunnel_idle_is_read_and_must_be_positive() {
        let c = parse(&format!("{EXAMPLE}\n[timeouts]\ntunnel_idle = \"90s\"\n")).unwrap();
        assert_eq!(c.timeouts.tunnel_idle, Duration::from_secs(90));
        let p = problems(&format!("{EXAMPLE}\n[timeouts]\ntunnel_idle = \"0s\"\n"));
        assert!(
            p.iter().any(|l| l.contains("timeouts.tunnel_idle")),
            "{p:?}"
        );
    }
}
