//! What the bench clients (`handshake`, `idle`) share: their `main` (arguments, a single-thread runtime,
//! the exit status), flag parsing, and the TLS client. The harness itself is `benches/run`;
//! `bench-upstream` is a server and needs none of it.

#![forbid(unsafe_code)]

use std::fmt::Display;
use std::future::Future;
use std::path::Path;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A client's `main`: parses the command line (a bad one prints `usage` and exits 64), runs the client on a
/// current-thread runtime (`benches/run` pins each client to the load generator's core) and turns its result
/// into the exit status; errors go to stderr as `NAME: error`.
pub fn client_main<A, F>(
    name: &str,
    usage: &str,
    parse: impl FnOnce(std::env::Args) -> Result<A, String>,
    client: impl FnOnce(A) -> F,
) -> ExitCode
where
    F: Future<Output = Result<(), BoxError>>,
{
    let mut argv = std::env::args();
    argv.next();
    let args = match parse(argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{name}: {e}\n{usage}");
            return ExitCode::from(64);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(client(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// TLS client: aws-lc-rs, X25519 only, resumption off, trusting only the CA certificates in `ca`.
///
/// X25519: the same key exchange on every side of the comparison: nginx's and HAProxy's OpenSSL 3.0 have no
/// ML-KEM, so a hybrid group would make Portcullis do more work than them for the same request. Resumption
/// off: every connection is a full handshake, as a new client's is.
pub fn client_config(ca: &Path) -> Result<rustls::ClientConfig, BoxError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no certificate in it", ca.display()).into());
    }
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// The value of `flag`, parsed: `--flag VALUE: why not` if it does not parse.
pub fn parse_flag<T: FromStr>(flag: &str, value: &str) -> Result<T, String>
where
    T::Err: Display,
{
    value.parse().map_err(|e| format!("{flag} {value}: {e}"))
}

/// A count that must be at least 1 (connections, concurrency).
pub fn parse_count(flag: &str, value: &str) -> Result<usize, String> {
    match parse_flag(flag, value)? {
        0 => Err(format!("{flag} must be at least 1")),
        n => Ok(n),
    }
}

/// Seconds, fractions allowed.
pub fn parse_secs(flag: &str, value: &str) -> Result<Duration, String> {
    let secs: f64 = parse_flag(flag, value)?;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{flag} {value}: {e}"))
}
