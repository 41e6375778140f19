//! The TOML file as written: serde structs that mirror it key for key (`deny_unknown_fields`), with spans
//! kept so that every later check can name the file, line and column. No defaults and no checks live here:
//! the defaults are in `defaults.rs`, the checks in each section's checker (`lib.rs` runs them in order),
//! which turn a `File` into a `Config` (`model.rs`).

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

pub type S<T> = Spanned<T>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub names: Option<S<Vec<S<String>>>>,
    pub listen: Option<Listen>,
    pub tls: Option<S<Tls>>,
    #[serde(default)]
    pub route: Vec<S<Route>>,
    /// More sites on the same listeners, each with its names, certificate and routes.
    #[serde(default)]
    pub site: Vec<S<Site>>,
    /// Refuse (TLS alert) a handshake whose SNI names no configured site, instead of serving the default.
    pub strict_sni: Option<S<bool>>,
    #[serde(default)]
    pub upstream: BTreeMap<String, S<Upstream>>,
    pub trusted_proxies: Option<Vec<S<String>>>,
    pub headers: Option<Headers>,
    pub timeouts: Option<Timeouts>,
    pub log: Option<Log>,
    pub process: Option<Process>,
    pub limits: Option<Limits>,
    /// Request and response buffering budgets.
    pub buffers: Option<Buffers>,
    pub maintenance: Option<S<Maintenance>>,
    /// Absent: the built-in `auth` limit; `[]`: no rate limiting; otherwise these replace it.
    pub rate_limit: Option<Vec<S<RateLimit>>>,
    /// How certificates are obtained for sites with `acme = true`.
    pub acme: Option<S<Acme>>,
    /// The admin listener (`/metrics`, `/health`); absent: none.
    pub admin: Option<S<Admin>>,
    /// Several nodes sharing state through Redis; absent: this node's state is its own.
    pub cluster: Option<S<Cluster>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// `"redis://HOST:PORT/DB"`, `"rediss://HOST:PORT/DB"` or `"unix:///path.sock"`.
    pub redis: Option<S<String>>,
    pub password_file: Option<S<String>>,
    /// The CA that signed a `rediss://` server's certificate (else the system's roots).
    pub ca_file: Option<S<String>>,
    pub prefix: Option<S<String>>,
    pub timeout: Option<S<String>>,
    /// The AES-256-GCM key ACME's account, certificates and keys are sealed with in Redis.
    pub key_file: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// `"HOST:PORT"`, or `"unix:/absolute/path"` for a unix socket.
    pub listen: Option<S<String>>,
    /// Allow a non-loopback address (the admin listener has no authentication).
    pub public: Option<S<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    pub https: Option<Vec<S<String>>>,
    pub http: Option<Vec<S<String>>>,
    pub proxy_protocol: Option<S<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub cert: Option<S<String>>,
    pub key: Option<S<String>>,
    pub self_signed: Option<S<bool>>,
    /// Obtained and renewed from the `[acme]` CA; `cert`/`key`, when also given, serve until then.
    pub acme: Option<S<bool>>,
    pub min_version: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Acme {
    pub email: Option<S<String>>,
    /// A directory URL, or "letsencrypt" / "letsencrypt-staging".
    pub directory: Option<S<String>>,
    pub state_dir: Option<S<String>>,
    /// "http-01" or "tls-alpn-01".
    pub challenge: Option<S<String>>,
    /// A PEM root trusted for the CA's API (a private ACME server).
    pub ca_root: Option<S<String>>,
    pub eab: Option<S<Eab>>,
    pub renew_before: Option<S<String>>,
    pub self_check: Option<S<bool>>,
    pub validation_port: Option<S<u16>>,
}

/// External account binding (RFC 8555 section 7.3.4).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Eab {
    pub kid: S<String>,
    /// base64url, as the CA hands it out.
    pub hmac_key: S<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub path: S<String>,
    /// Forward to this `[upstream.NAME]`; a route has this or `static`, not both.
    pub upstream: Option<S<String>>,
    /// Serve files from this folder (or this one file); a route has this or `upstream`, not both.
    pub r#static: Option<S<String>>,
    /// Static routes: `Cache-Control: public, max-age=N` on the files served ("365d", "1h", ...).
    pub cache: Option<S<String>>,
    /// Static folder routes: the file that answers a request for a folder (`index.html`).
    pub index: Option<S<String>>,
    /// Static folder routes: the file (relative to the folder) served for paths that match nothing (SPA).
    pub fallback: Option<S<String>>,
    /// Overrides `limits.body` for this route (upload endpoints).
    pub max_body: Option<S<Size>>,
    /// Read the whole request body before the app sees the request (default true).
    pub buffer_requests: Option<S<bool>>,
    /// Read the app's response as fast as it writes it, whatever the client's pace (default true).
    pub buffer_responses: Option<S<bool>>,
    /// gzip/br/zstd for text responses the client accepts them for (default false: BREACH).
    pub compress: Option<S<bool>>,
    /// 403 without a verified client certificate (the site needs `client_auth`).
    pub require_client_cert: Option<S<bool>>,
}

/// A site's `client_auth = { ca, crl, mode, crl_expired, forward_cert }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientAuth {
    /// PEM bundle of the CA certificates client certificates must chain to.
    pub ca: S<String>,
    /// A folder of CRLs (PEM or DER), every file in it read.
    pub crl: Option<S<String>>,
    /// "optional" or "required".
    pub mode: Option<S<String>>,
    /// "warn" or "refuse": what an expired CRL does.
    pub crl_expired: Option<S<String>>,
    /// Send the client's certificate (URL-encoded PEM) to the app.
    pub forward_cert: Option<S<bool>>,
}

/// A size: a whole number of bytes, or a string like "10MiB", "512KiB", "1GiB".
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Size {
    Bytes(u64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub header_bytes: Option<S<Size>>,
    pub headers: Option<S<u64>>,
    pub uri_bytes: Option<S<Size>>,
    pub body: Option<S<Size>>,
    pub max_requests_per_connection: Option<S<u64>>,
    pub connections: Option<S<u64>>,
    pub connections_per_ip: Option<S<u64>>,
    pub h2_max_streams: Option<S<u64>>,
    /// "1KiB/s": a request body slower than this on average (after the grace) is cut off; "off" for none.
    pub min_body_rate: Option<S<String>>,
    pub min_body_rate_grace: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub servers: S<Vec<S<ServerEntry>>>,
    /// "least_requests" (default), "round_robin", "random_two", "ip_hash".
    pub balance: Option<S<String>>,
    pub health: Option<S<Health>>,
    pub max_fails: Option<S<u64>>,
    pub fail_timeout: Option<S<String>>,
    pub retries: Option<S<u64>>,
}

/// `"IP:PORT"` / `"unix:/path"`, or `{ addr = "...", weight = 3 }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ServerEntry {
    Addr(String),
    Weighted(WeightedServer),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedServer {
    pub addr: String,
    pub weight: Option<u64>,
}

/// Active health checks: `GET path` every `interval`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    pub path: S<String>,
    pub interval: Option<S<String>>,
    pub timeout: Option<S<String>>,
    pub rise: Option<S<u64>>,
    pub fall: Option<S<u64>>,
}

/// The page shown when no server of a route's upstream is up, or while `flag` exists.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Maintenance {
    pub page: Option<S<String>>,
    pub retry_after: Option<S<String>>,
    pub flag: Option<S<String>>,
    pub allow: Option<Vec<S<String>>>,
}

/// A security header: a string sets the value, `false` turns it off, `true` keeps the default.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum HeaderSetting {
    On(bool),
    Value(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Headers {
    pub strict_transport_security: Option<S<HeaderSetting>>,
    pub x_frame_options: Option<S<HeaderSetting>>,
    pub x_content_type_options: Option<S<HeaderSetting>>,
    pub referrer_policy: Option<S<HeaderSetting>>,
    /// Header settings (by key name above) that replace the app's own value instead of yielding to it.
    pub force: Option<Vec<S<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    pub upstream_connect: Option<S<String>>,
    pub upstream_response: Option<S<String>>,
    pub client_idle: Option<S<String>>,
    pub tunnel_idle: Option<S<String>>,
    pub client_header: Option<S<String>>,
    pub client_body: Option<S<String>>,
    pub shutdown: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    pub access: Option<S<bool>>,
    pub format: Option<S<String>>,
    pub level: Option<S<String>>,
    /// The access log goes to this file (reopened on SIGUSR1) instead of standard error.
    pub file: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Process {
    pub user: Option<S<String>>,
    pub group: Option<S<String>>,
    /// Where buffered bodies spill (unlinked files in a private folder).
    pub temp_dir: Option<S<String>>,
    /// "best-effort" (default), "require" or "off".
    pub sandbox: Option<S<String>>,
    /// "errno" (default), "kill" or "off".
    pub seccomp: Option<S<String>>,
    /// TCP ports the sandbox lets the process connect to beyond those the config names at start: ports a
    /// reload may move an upstream to. Numbers, or `"8000-8099"` ranges.
    pub sandbox_connect_ports: Option<S<Vec<S<PortSpec>>>>,
}

/// A port (`8001`) or an inclusive range (`"8000-8099"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PortSpec {
    One(u16),
    Range(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Buffers {
    pub memory_per_request: Option<S<Size>>,
    pub memory: Option<S<Size>>,
    pub disk: Option<S<Size>>,
    pub max_response: Option<S<Size>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub name: S<String>,
    /// Exact paths, or prefixes written with a trailing `*`.
    pub paths: S<Vec<S<String>>>,
    pub methods: Option<S<Vec<S<String>>>>,
    /// "N/second", "N/minute", "N/hour" or "N/day".
    pub rate: S<String>,
    pub burst: Option<S<u64>>,
    pub per_account: Option<S<PerAccount>>,
    pub exempt: Option<Vec<S<String>>>,
    pub ipv6_prefix: Option<S<u64>>,
    pub max_keys: Option<S<u64>>,
    /// "client_addr" or "client_cert": what a client is counted by.
    pub key: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerAccount {
    pub field: S<String>,
    pub rate: Option<S<String>>,
    pub burst: Option<S<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    pub names: S<Vec<S<String>>>,
    pub tls: S<Tls>,
    /// Client certificates (mutual TLS): the CA they must chain to, the CRL folder, optional or required.
    pub client_auth: Option<S<ClientAuth>>,
    #[serde(default)]
    pub route: Vec<S<Route>>,
}
