//! The checked configuration the proxy runs on: [`Config`] and every type it holds. Only types and the
//! small methods that read them live here; how each one is checked from the file is in that section's
//! checker (`listen.rs`, `sites.rs`, `routes.rs`, ...), and its defaults in `defaults.rs`.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::cidr::Cidr;
use crate::error::Problem;

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
    pub buffers: Buffers,
    pub maintenance: Maintenance,
    /// `[[rate_limit]]`, or the built-in `auth` limit when the file has none.
    pub rate_limits: Vec<RateLimit>,
    /// `[acme]`, with its defaults; `None` when no site has `acme = true`.
    pub acme: Option<Acme>,
    /// `[acme]`'s `state_dir` and `ca_root` whenever the section is written, used by a site or not: the
    /// sandbox allows them from the start, since a reload may add the first `acme = true` site.
    pub acme_paths: Option<AcmePaths>,
    /// `[admin]`: the admin listener; `None` without the section (no admin listener).
    pub admin: Option<Admin>,
    /// `[cluster]`: the Redis several nodes share; `None` without the section (this node's state is its own).
    pub cluster: Option<Cluster>,
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
    /// A request body must average at least this many bytes per second of waiting for it, once
    /// `min_body_rate_grace` of waiting has passed (408 otherwise). `None`: no minimum.
    pub min_body_rate: Option<u64>,
    pub min_body_rate_grace: Duration,
}

/// How much request and response buffering may hold, in memory and in temporary files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buffers {
    /// Each request body, and each response body, is held in memory up to this; beyond it, in a file.
    pub memory_per_request: u64,
    /// All buffers in memory together; past it, bodies spill to files sooner.
    pub memory: u64,
    /// All temporary files together; past it, uploads that need a file get 503 and responses stream.
    pub disk: u64,
    /// One response's temporary file; past it, the rest of the response streams at the client's pace.
    pub max_response: u64,
}

/// Who the process becomes after binding its listeners (see the privilege-drop step in `main`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    /// The unprivileged user to switch to; required when started as root.
    pub user: Option<String>,
    /// Its group; `None` means the user's primary group.
    pub group: Option<String>,
    /// The private folder (0700) for buffered bodies that outgrow memory; files there are unlinked at creation.
    pub temp_dir: PathBuf,
    /// Whether the process confines itself after the drop (Landlock: only the files the config names).
    pub sandbox: Sandbox,
    /// What the seccomp filter set after the drop does to a system call outside its allow-list.
    pub seccomp: Seccomp,
    /// `sandbox_connect_ports`: TCP ports the sandbox allows connecting to beyond those the config names
    /// at start (where a reload may move an upstream), each once, sorted.
    pub sandbox_connect_ports: Vec<u16>,
}

/// The folders `[acme]` names (see [`Config::acme_paths`]), and what it connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmePaths {
    pub state_dir: PathBuf,
    pub ca_root: Option<PathBuf>,
    /// `directory` as written (a URL, or a named CA) and `validation_port`: the sandbox allows connecting
    /// to the CA's port and to the port the self-check asks this instance on.
    pub directory: Option<String>,
    pub validation_port: Option<u16>,
}

/// `[process] sandbox`: what to do about the Landlock filesystem sandbox applied after the privilege drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sandbox {
    /// Confine where the kernel can; a kernel without Landlock is warned about once, then serving goes on.
    BestEffort,
    /// Refuse to start (exit 64) on a kernel that cannot enforce the sandbox.
    Require,
    /// No sandbox at all: the process can read whatever its user can (a dangerous opt-out).
    Off,
}

/// `[process] seccomp`: the system-call filter set after the privilege drop (with the sandbox; `sandbox =
/// "off"` turns it off too), and what it does to a call outside its allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seccomp {
    /// The call fails with `EPERM` ("Operation not permitted"); the caller sees an error and goes on.
    Errno,
    /// The kernel kills the whole process (SIGSYS, logged by the audit subsystem): nothing goes on.
    Kill,
    /// No filter: every system call the kernel offers (a dangerous opt-out).
    Off,
}

/// One site: the host names it answers, its certificate, its routes (longest prefix first).
#[derive(Debug, Clone)]
pub struct Site {
    /// Lower-case; empty only for a default site that answers any host.
    pub names: Vec<String>,
    pub tls: CertSource,
    pub routes: Vec<Route>,
    /// Client certificates (mutual TLS) for this site; `None`: none asked for.
    pub client_auth: Option<ClientAuth>,
}

/// A site's `client_auth`: what a client certificate must chain to and not be revoked by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuth {
    /// PEM bundle of trust anchors (roots or intermediates; each one is trusted as it is).
    pub ca: PathBuf,
    /// Folder of CRLs, every file read (PEM or DER); `None`: no revocation checking.
    pub crl: Option<PathBuf>,
    pub mode: ClientAuthMode,
    pub crl_expired: CrlExpired,
    /// The client's certificate goes to the app as URL-encoded PEM (`X-Client-Cert`).
    pub forward_cert: bool,
}

/// Whether a handshake without a client certificate goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuthMode {
    /// A client without a certificate is served (`X-Client-Cert-Verified: NONE`); routes with
    /// `require_client_cert` answer it 403. A certificate that is sent must verify.
    Optional,
    /// A handshake without a valid certificate fails.
    Required,
}

/// What a CRL past its `nextUpdate` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrlExpired {
    /// Logged loudly (at load and hourly); certificates are still checked against it.
    Warn,
    /// Every client certificate of the site is refused until a current CRL is in the folder.
    Refuse,
}

impl Site {
    /// The route a request path takes: the longest one that matches it (see [`Route::matches`]).
    pub fn route(&self, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(path))
    }
}

impl Route {
    /// Whether `path` takes this route: it starts with the route's path, or, for a static route that serves
    /// one file, it is exactly that path (`/favicon.ico.map` goes on to a shorter route).
    pub fn matches(&self, path: &str) -> bool {
        match &self.action {
            Action::Static(Static {
                kind: StaticKind::File,
                ..
            }) => path == self.path,
            _ => path.starts_with(&self.path),
        }
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

#[derive(Debug, Clone)]
pub struct Route {
    pub path: String,
    /// What the route does with the requests it takes.
    pub action: Action,
    /// Request body limit for this route (413 past it).
    pub max_body: u64,
    /// The app sees a request only once its whole body has arrived.
    pub buffer_requests: bool,
    /// The app's response is read as fast as the app writes it, then fed to the client at its pace.
    pub buffer_responses: bool,
    /// Text responses are compressed (gzip, br or zstd, as the client accepts), within the rules of
    /// `proxy/src/http/compress.rs`.
    pub compress: bool,
    /// A request without a verified client certificate is answered 403 (the site has `client_auth`).
    pub require_client_cert: bool,
}

/// What a route does with a request: forward it to an upstream group, or serve a file. Later issues may add
/// `Maintenance` (a canned page) and `Redirect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Forward to this upstream group: an index into [`Config::upstreams`].
    Upstream(usize),
    /// Serve files from a folder, or one file (`static = "..."`).
    Static(Static),
}

/// A static route, checked: its folder (or file) existed when the config was loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Static {
    /// Absolute; what the route's path maps to.
    pub root: PathBuf,
    pub kind: StaticKind,
    /// `Cache-Control: public, max-age=N` on files answered by their own name; `None`: no such header.
    pub cache: Option<Duration>,
    /// A plain file name that answers a request for a folder (`.../` and the route's own path).
    pub index: Option<String>,
    /// A path relative to `root` (segments joined by `/`) served for paths that match nothing.
    pub fallback: Option<String>,
}

/// Whether a static route serves a folder or one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaticKind {
    /// The path below the route's prefix maps into the folder.
    Folder,
    /// Only the route's exact path is answered (nginx's `location = /favicon.ico { alias ...; }`).
    File,
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub servers: Vec<ServerAddr>,
    /// Each server's weight, in the order of `servers` (1 unless given).
    pub weights: Vec<u32>,
    pub balance: Balance,
    /// Active checks, when configured.
    pub health: Option<Health>,
    /// Consecutive connect/reset failures that take a server out (passive health); 0: never.
    pub max_fails: u32,
    /// How long a server taken out by `max_fails` stays out before it is tried again.
    pub fail_timeout: Duration,
    /// Other servers tried after a failure that is safe to retry.
    pub retries: u32,
}

/// How a request picks a server of its upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// The fewest requests in flight, relative to weight.
    LeastRequests,
    RoundRobin,
    /// The less loaded of two picked at random (power of two choices).
    RandomTwo,
    /// Sticky by client address, on a consistent-hash ring.
    IpHash,
}

/// Active health checks of every server of an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// `GET` this path; a `2xx` or `3xx` answer within `timeout` is a success.
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Successes in a row that bring a server that is out back in.
    pub rise: u32,
    /// Failures in a row that take a server out.
    pub fall: u32,
}

/// `[maintenance]`: a 503 page when no server of a route's upstream is up, or while `flag` exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Maintenance {
    /// An HTML file; a built-in page when absent.
    pub page: Option<PathBuf>,
    pub retry_after: Duration,
    /// While this file exists, everyone outside `allow` gets the page.
    pub flag: Option<PathBuf>,
    pub allow: Vec<Cidr>,
}

/// `[cluster]`: where several nodes share their rate-limit counts and TLS ticket keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// The URL as written: `redis://`, `rediss://` or `unix://` (no credentials in it).
    pub redis: String,
    /// The AUTH password's file (its content, trimmed of a final newline, is the password).
    pub password_file: Option<PathBuf>,
    /// The CA of a `rediss://` server; `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Every key this cluster writes starts with it.
    pub prefix: String,
    /// The most one Redis round trip may take before this node does without it.
    pub timeout: Duration,
    /// The file holding the key (32 bytes, base64 or hex) that ACME's account, certificates and keys are
    /// sealed with in Redis; required when a site has `acme = true`.
    pub key_file: Option<PathBuf>,
}

/// `[admin]`: where `/metrics` and `/health` are served (plain HTTP/1.1, no authentication).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    /// A TCP address (loopback unless `public`), or a unix socket (`unix:/path`, as an upstream server).
    pub listen: ServerAddr,
    /// The operator allowed a non-loopback address.
    pub public: bool,
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
    /// Absolute; the access lines go there instead of standard error. Its folder existed at load.
    pub file: Option<PathBuf>,
}

/// One named rate limit, checked: which requests it counts, and how many it lets through per client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    pub name: String,
    pub paths: Vec<PathMatch>,
    /// Upper-case method names; a request with any other method is not counted.
    pub methods: Vec<String>,
    /// Sustained rate per client key.
    pub rate: Rate,
    /// Requests a fresh client may make at once, before the sustained rate applies.
    pub burst: u32,
    /// Also limit per submitted account name, across all client addresses.
    pub per_account: Option<PerAccount>,
    /// Clients (after `trusted_proxies`) this limit never counts.
    pub exempt: Vec<Cidr>,
    /// IPv6 clients are keyed by this prefix of their address (one host usually holds a whole /64).
    pub ipv6_prefix: u8,
    /// Most client keys (and, separately, account keys) remembered; past it the nearest-to-fresh go first.
    pub max_keys: u64,
    /// What a client is counted by.
    pub key: RateKey,
}

/// What a rate limit counts a client by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateKey {
    /// Its address (after `trusted_proxies`), IPv6 cut to `ipv6_prefix`.
    ClientAddr,
    /// Its verified client certificate (mutual TLS, by SHA-256 fingerprint); its address without one.
    ClientCert,
}

/// A path pattern: exact, or a prefix (written with a trailing `*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
        }
    }
}

/// A sustained rate: `count` requests per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    /// The time one request's credit takes to come back.
    pub fn interval(&self) -> Duration {
        self.per / self.count.max(1)
    }
}

/// The account field read from login bodies (form, multipart or JSON), with its own rate and burst.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerAccount {
    pub field: String,
    pub rate: Rate,
    pub burst: u32,
}
