//! `portcullis check`: the report on a config without serving it. The config's problems (exit 64), then per
//! site what its certificate is (names, issuer, expiry, key, chain order) or, for ACME, what is stored and
//! when it renews, the maintenance page, then whether the service user can still read every file after the
//! privilege drop.
//! Nothing here binds a socket or starts a runtime. `check --live` (`live.rs`) asks the running instance
//! instead, through its admin listener.

use std::path::Path;
use std::process::ExitCode;

use portcullis_certs::inspect::{Info, format_time};
use portcullis_config::{CertSource, Config, Site};

use crate::{cli, http, privdrop, sandbox, seccomp};

pub mod live;

/// `portcullis check`: the config, then the certificates it names, then whether the service user can still
/// read them after dropping privileges (and whether the private key is closed to other users).
pub fn run(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    for w in &config.warnings {
        eprintln!("warning: {w}");
    }
    let mut bad = false;
    for (i, site) in config.sites.iter().enumerate() {
        bad |= !report_site(path, i, site);
        bad |= !client_auth_report(path, i, site);
        for line in acme_report(&config, site) {
            println!("  acme         {line}");
        }
    }
    // Read as `run` reads it, before the drop: one that cannot be read stops `run` too.
    let page = config.maintenance.page.as_deref();
    match http::action::maintenance::load(page) {
        Ok(Some(bytes)) => println!(
            "maintenance: page {} ({} bytes)",
            page.map_or_else(String::new, |p| p.display().to_string()),
            bytes.len()
        ),
        Ok(None) => {}
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            bad = true;
        }
    }
    if bad {
        return ExitCode::from(cli::EXIT_CONFIG);
    }
    let who = match privdrop::service_identity(&config.process) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return ExitCode::from(cli::EXIT_CONFIG);
        }
    };
    if who.uid.is_root() {
        eprintln!(
            "{}: note: no [process] user, so file access was checked for {who}; started as root, `run` \
             refuses to serve without one",
            path.display()
        );
    }
    let problems = privdrop::access::problems(&config, &who);
    for p in &problems {
        eprintln!("{p}");
    }
    if !problems.is_empty() {
        return ExitCode::from(cli::EXIT_CONFIG);
    }
    sandbox_report(&config);
    seccomp_report(&config);
    println!("{}: ok", path.display());
    ExitCode::SUCCESS
}

/// A `client_auth` site's CA and CRLs as `run` would load them: each CA's subject and expiry, the CRL
/// count, each CRL's issuer and next update (expired ones said so); false when `run` would refuse them.
fn client_auth_report(path: &Path, i: usize, site: &Site) -> bool {
    let Some(auth) = &site.client_auth else {
        return true;
    };
    let mode = match auth.mode {
        portcullis_config::ClientAuthMode::Optional => "optional",
        portcullis_config::ClientAuthMode::Required => "required",
    };
    println!(
        "  client_auth  mode {mode}, CA bundle {}",
        auth.ca.display()
    );
    let trust = match portcullis_certs::client_auth::load(auth) {
        Ok(t) => t.info,
        Err(e) => {
            eprintln!("{}: site {i}: client_auth: {e}", path.display());
            return false;
        }
    };
    let now = std::time::SystemTime::now();
    for (subject, not_after) in trust.ca_subjects.iter().zip(&trust.ca_not_after) {
        let expired = if *not_after < now { " EXPIRED" } else { "" };
        println!(
            "  client CA    {subject} (expires {}{expired})",
            format_time(*not_after)
        );
    }
    match &auth.crl {
        None => println!("  CRLs         none (no revocation checking)"),
        Some(dir) => println!(
            "  CRLs         {} in {}, next update {}",
            trust.crls.len(),
            dir.display(),
            trust
                .next_update()
                .map_or_else(|| "none".to_owned(), format_time)
        ),
    }
    for c in &trust.crls {
        let next = c.next_update.map_or_else(|| "none".to_owned(), format_time);
        let expired = if c.next_update.is_some_and(|n| n < now) {
            match auth.crl_expired {
                portcullis_config::CrlExpired::Warn => " EXPIRED (logged, still used)",
                portcullis_config::CrlExpired::Refuse => {
                    " EXPIRED (every client certificate refused)"
                }
            }
        } else {
            ""
        };
        println!(
            "  CRL          {}: issuer {}, {} revoked, next update {next}{expired}",
            c.path.display(),
            c.issuer,
            c.revoked
        );
    }
    true
}

/// What the sandbox `run` sets up after the drop will allow (Landlock; nothing else is reachable, and
/// nothing can be executed).
fn sandbox_report(config: &Config) {
    if config.process.sandbox == portcullis_config::Sandbox::Off {
        println!("sandbox: off ([process] sandbox = \"off\"): the service user's own access only");
        return;
    }
    let mode = match config.process.sandbox {
        portcullis_config::Sandbox::Require => "required",
        _ => "best effort",
    };
    println!("sandbox: Landlock ({mode}), no execute; allowed:");
    for rule in sandbox::rules(config) {
        println!("  {rule}");
    }
    // The OCSP responders of the certificates on disk now (ACME's are allowed by the default ports).
    let chains: Vec<_> = config
        .sites
        .iter()
        .filter_map(|s| match &s.tls {
            CertSource::Files { cert, .. } => portcullis_certs::read_chain(cert).ok(),
            _ => None,
        })
        .collect();
    let responders = sandbox::responders(chains.iter().map(Vec::as_slice));
    for port in sandbox::ports(config, &responders) {
        println!("  {port}");
    }
}

/// The system calls `run`'s seccomp filter will allow after the drop, by group (`seccomp.rs`).
fn seccomp_report(config: &Config) {
    use portcullis_config::{Sandbox, Seccomp};
    let action = config.process.seccomp;
    if action == Seccomp::Off || config.process.sandbox == Sandbox::Off {
        println!("seccomp: off: any system call, running programs included");
        return;
    }
    let groups = seccomp::allow_list(std::process::id());
    let allowed: usize = groups.iter().map(|g| g.calls.len()).sum();
    println!(
        "seccomp: {allowed} syscalls allowed, others {}; no program can be run; allowed:",
        seccomp::others(action)
    );
    for g in groups {
        let calls: Vec<String> = g
            .calls
            .iter()
            .map(|c| match c.limit {
                Some(limit) => format!("{} ({limit})", c.name),
                None => c.name.to_owned(),
            })
            .collect();
        println!("  {}: {}", g.what, calls.join(", "));
    }
}

/// The config, or its problems printed and exit code 64.
fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(cli::EXIT_CONFIG)
    })
}

/// Prints what `check` knows about one site's certificate; false when it would not be served.
fn report_site(path: &Path, i: usize, site: &Site) -> bool {
    let names = if site.names.is_empty() {
        "any host".to_owned()
    } else {
        site.names.join(", ")
    };
    println!("site {i}: {names}");
    let CertSource::Files { cert, key } = &site.tls else {
        // ACME sites: `acme_report` says what is stored and when it renews.
        if !matches!(site.tls, CertSource::Acme { .. }) {
            println!("  certificate  self-signed, generated at start (ECDSA P-256)");
        }
        return true;
    };
    println!("  certificate  {}", cert.display());
    let info = match portcullis_certs::read_chain(cert)
        .map_err(|e| e.to_string())
        .and_then(|c| Info::read(&c))
    {
        Ok(info) => info,
        Err(e) => {
            eprintln!("{}: site {i}: tls: {e}", path.display());
            return false;
        }
    };
    let mut ok = true;
    let now = std::time::SystemTime::now();
    let missing = info.uncovered(&site.names);
    println!(
        "  names        {} (covers the site: {})",
        info.names.join(", "),
        if missing.is_empty() {
            "yes".to_owned()
        } else {
            format!("NO, missing {}", missing.join(", "))
        }
    );
    println!("  subject      {}", info.subject);
    println!("  issuer       {}", info.issuer);
    let days = info.remaining(now).as_secs() / 86_400;
    println!(
        "  expires      {} ({})",
        format_time(info.not_after),
        if info.expired(now) {
            "EXPIRED".to_owned()
        } else {
            format!("in {days} days")
        }
    );
    let fits = portcullis_certs::load_files(cert, key);
    println!(
        "  key          {} {}, matches the certificate: {}",
        key.display(),
        info.key_type,
        if fits.is_ok() { "yes" } else { "NO" }
    );
    println!(
        "  chain        {} certificate(s), in order: {}",
        info.chain_len,
        if info.chain_in_order { "yes" } else { "NO" }
    );
    if let Err(e) = fits {
        eprintln!("{}: site {i}: tls: {e}", path.display());
        ok = false;
    }
    if info.expired(now) {
        eprintln!(
            "{}: site {i}: tls: {} expired on {}",
            path.display(),
            cert.display(),
            format_time(info.not_after)
        );
        ok = false;
    }
    if !missing.is_empty() {
        eprintln!(
            "{}: site {i}: tls: {} does not cover {}",
            path.display(),
            cert.display(),
            missing.join(", ")
        );
        ok = false;
    }
    if !info.chain_in_order {
        eprintln!(
            "warning: {}: site {i}: {} is not in order (leaf first, each certificate followed by its issuer)",
            path.display(),
            cert.display()
        );
    }
    ok
}

/// For an ACME site: the account, the stored certificate's expiry and the next renewal.
fn acme_report(config: &Config, site: &Site) -> Vec<String> {
    match (&config.acme, &site.tls) {
        (Some(settings), CertSource::Acme { .. }) => {
            portcullis_certs::acme::report(settings, &site.names)
        }
        _ => Vec::new(),
    }
}
