//! `portcullis`: parse the command line, load and check the config, load certificates, bind the listeners
//! (or adopt systemd's), drop privileges, start the runtime, serve until SIGTERM/SIGINT, drain, exit. Each
//! step is numbered below; everything it calls lives in a module of its own.

#![forbid(unsafe_code)]

mod acme;
mod body;
mod cli;
mod demo;
mod http;
mod listen;
mod sdnotify;
mod ocsp;
mod privdrop;
mod ratelimit;
mod reload;
mod shutdown;
mod state;
mod telemetry;
mod tls;
mod upstream;

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use portcullis_config::{CertSource, Config, LogFormat};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::http::proxy::Listener;
use crate::state::State;

/// sysexits.h EX_USAGE: the config (or the command line) is wrong.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    // 1. Parse the command line.
    let cli = cli::Cli::parse();
    match cli.command {
        cli::Command::Check { config } => check(&config),
        cli::Command::Run {
            config,
            log_format,
            insecure_keep_root,
        } => match Config::load(&config) {
            // 2. Load and check the config (exit 64 on a bad one).
            Ok(c) => run(c, log_format.map(Into::into), None, insecure_keep_root),
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        cli::Command::Demo { https, log_format } => {
            let upstream = match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| {
                l.set_nonblocking(true)?;
                Ok(l)
            }) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("portcullis demo: cannot bind the built-in upstream: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let upstream_addr = match upstream.local_addr() {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("portcullis demo: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match demo::config(https, upstream_addr) {
                Ok(mut c) => {
                    println!(
                        "Portcullis demo: try\n    curl -k https://{https}/\n(self-signed certificate; Ctrl-C stops it)"
                    );
                    // The demo never serves as root: started as root, it becomes `nobody` (it has no files).
                    if privdrop::started_as_root() && c.process.user.is_none() {
                        c.process.user = Some("nobody".into());
                    }
                    run(c, log_format.map(Into::into), Some(upstream), false)
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
    }
}

/// Prints what `check` knows about one site's certificate; false when it would not be served.
fn report_site(path: &Path, i: usize, site: &portcullis_config::Site) -> bool {
    use portcullis_certs::inspect::{Info, format_time};
    let names = if site.names.is_empty() {
        "any host".to_owned()
    } else {
        site.names.join(", ")
    };
    println!("site {i}: {names}");
    let CertSource::Files { cert, key } = &site.tls else {
        // ACME sites: `acme::report_site` says what is stored and when it renews.
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

/// `portcullis check`: the config, then the certificates it names, then whether the service user can still
/// read them after dropping privileges (and whether the private key is closed to other users).
fn check(path: &Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    for w in &config.warnings {
        eprintln!("warning: {w}");
    }
    let mut bad = false;
    for (i, site) in config.sites.iter().enumerate() {
        bad |= !report_site(path, i, site);
        for line in acme::report_site(&config, site) {
            println!("  acme         {line}");
        }
    }
    if bad {
        return ExitCode::from(EXIT_CONFIG);
    }
    let who = match privdrop::service_identity(&config.process) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return ExitCode::from(EXIT_CONFIG);
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
        return ExitCode::from(EXIT_CONFIG);
    }
    println!("{}: ok", path.display());
    ExitCode::SUCCESS
}

fn run(
    config: Config,
    log_format: Option<LogFormat>,
    demo_upstream: Option<std::net::TcpListener>,
    insecure_keep_root: bool,
) -> ExitCode {
    telemetry::init(log_format.unwrap_or(config.log.format), &config.log.level);

    // 3. Certificates: loaded and checked before anything listens.
    let (sites, reloader) = match reload::load(&config) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::error!("{}: tls: {e}", config.source.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let tls = match tls::server_config(sites.clone(), config.tls.min_version) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("TLS setup failed: {e}");
            return ExitCode::FAILURE;
        }
    };

    // Who we become at step 5, decided before anything listens: a bad [process] costs no socket.
    let plan = match privdrop::plan(&config.process, insecure_keep_root) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("{}: {e}", config.source.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Files read again after the drop (reload) that the service user cannot read, or an exposed key:
    // `portcullis check` refuses these; here they are warnings.
    for p in privdrop::access::problems(&config, plan.identity()) {
        tracing::warn!("{p}");
    }

    // 4. Bind every listener (privileged ports need root or CAP_NET_BIND_SERVICE here), or adopt the
    //    sockets systemd passed (socket activation: no privilege needed at all).
    let bound = match listen::bind_or_adopt(&config.listen) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };

    // Every connection needs a descriptor (two with its upstream): `[limits] connections` must fit.
    match listen::raise_open_file_limit() {
        Ok(n) if n < config.limits.connections.saturating_mul(2) => tracing::warn!(
            "the open-file limit ({n}) is below two per connection for [limits] connections = {}: \
             connections past it fail at accept; raise LimitNOFILE (systemd) or ulimit -n",
            config.limits.connections
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot raise the open-file limit: {e}"),
    }

    // 5. Drop privileges while still single-threaded: groups, gid, uid, every capability set, NoNewPrivs.
    let dropped = match privdrop::apply(&plan) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!("cannot drop privileges: {e}");
            return ExitCode::FAILURE;
        }
    };
    if dropped.is_none() {
        tracing::warn!(
            "INSECURE: --insecure-keep-root: serving every request as root with every capability; set \
             [process] user to an unprivileged account instead"
        );
    }

    // 6. Start the runtime; every thread it makes is born unprivileged, after the sockets exist.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Prove the drop on every thread, the runtime's workers included (they exist once `build` returns).
    if let Some(d) = dropped {
        match privdrop::verify(d) {
            Ok(threads) => tracing::info!(
                "privileges dropped: running as {}, no capabilities, no new privileges ({threads} threads checked)",
                plan.identity()
            ),
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
        }
    }
    runtime.block_on(serve(config, tls, sites, reloader, bound, demo_upstream))
}

/// 7. Serve until a signal, then drain within the shutdown deadline.
async fn serve(
    config: Config,
    tls: Arc<rustls::ServerConfig>,
    sites: Arc<portcullis_certs::Sites>,
    reloader: Arc<reload::Reloader>,
    bound: listen::Bound,
    demo_upstream: Option<std::net::TcpListener>,
) -> ExitCode {
    let grace = config.timeouts.shutdown;
    let (mut sigterm, mut sigint, sighup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(t), Ok(i), Ok(h)) => (t, i, h),
        _ => {
            tracing::error!("cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let mut listeners = Vec::new();
    for (kind, list) in [(Listener::Https, bound.https), (Listener::Http, bound.http)] {
        for l in list {
            match TcpListener::from_std(l) {
                Ok(l) => listeners.push((kind, l)),
                Err(e) => {
                    tracing::error!("cannot register a listener: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    if let Some(up) = demo_upstream {
        match TcpListener::from_std(up) {
            Ok(up) => drop(tokio::spawn(demo::upstream(up))),
            Err(e) => {
                tracing::error!("cannot start the demo upstream: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let https_port = listeners
        .iter()
        .find(|(k, _)| *k == Listener::Https)
        .and_then(|(_, l)| l.local_addr().ok())
        .map_or(443, |a| a.port());
    let state = Arc::new(State::new(config, tls, sites, https_port));
    let (trigger, shutdown) = shutdown::Trigger::new();
    let mut accepting = Vec::new();
    for (kind, l) in listeners {
        if let Ok(addr) = l.local_addr() {
            let scheme = if kind == Listener::Https {
                "https"
            } else {
                "http"
            };
            tracing::info!("listening on {scheme}://{addr}");
        }
        accepting.push(tokio::spawn(http::server::accept(
            l,
            kind,
            state.clone(),
            shutdown.clone(),
        )));
    }
    // OCSP: each site whose certificate names a responder gets its response stapled and refreshed.
    for site in 0..state.sites.len() {
        tokio::spawn(ocsp::run(state.sites.clone(), site, shutdown.clone()));
    }
    // Certificates: file changes and SIGHUP reload them; systemd hears RELOADING=1 / READY=1 around SIGHUP.
    tokio::spawn(reload::run(
        reloader,
        sighup,
        shutdown.clone(),
        |reloading| {
            if reloading {
                sdnotify::reloading();
            } else {
                sdnotify::ready();
            }
        },
    ));
    // ACME: each `acme = true` site gets its certificate ordered, renewed and swapped in.
    tokio::spawn(acme::run(state.clone(), shutdown.clone()));
    drop(shutdown);
    tokio::spawn(ratelimit::purge(state.rate_limits.clone()));
    if let Some(interval) = sdnotify::watchdog_interval() {
        tokio::spawn(sdnotify::watchdog(interval));
    }
    tracing::info!("ready");
    sdnotify::ready();

    tokio::select! {
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
    }
    let deadline = trigger.begin(grace);
    sdnotify::stopping();
    // The accept loops end at once; after them, no listener is open.
    for a in accepting {
        let _ = a.await;
    }
    tracing::info!(
        "stopping: listeners closed; draining for up to {}s",
        grace.as_secs_f64()
    );
    // Tunnels (upgraded connections) stay open until this deadline, as nginx's upgraded connections do
    // until `worker_shutdown_timeout`; they close themselves at it, and the exit closes what is left.
    if tokio::time::timeout_at(deadline, trigger.drained())
        .await
        .is_err()
    {
        tracing::warn!("shutdown deadline passed with connections still open; closing them");
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}
