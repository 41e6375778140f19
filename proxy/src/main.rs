//! `portcullis`: parse the command line, load and check the config, load certificates, bind the listeners,
//! start the runtime, serve until SIGTERM/SIGINT, drain, exit. Each step is numbered below; everything it
//! calls lives in a module of its own.

#![forbid(unsafe_code)]

mod body;
mod cli;
mod demo;
mod http;
mod listen;
mod shutdown;
mod state;
mod telemetry;
mod tls;
mod upstream;

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use portcullis_certs::CertStore;
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
            insecure_keep_root: _,
        } => match Config::load(&config) {
            // 2. Load and check the config (exit 64 on a bad one).
            Ok(c) => run(c, log_format.map(Into::into), None),
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
                Ok(c) => {
                    println!(
                        "Portcullis demo: try\n    curl -k https://{https}/\n(self-signed certificate; Ctrl-C stops it)"
                    );
                    run(c, log_format.map(Into::into), Some(upstream))
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
    }
}

/// `portcullis check`: the config, then the certificates it names.
fn check(path: &Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let CertSource::Files { cert, key } = &config.tls.source {
        if let Err(e) = portcullis_certs::load_files(cert, key) {
            eprintln!("{}: tls: {e}", path.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    println!("{}: ok", path.display());
    ExitCode::SUCCESS
}

fn run(
    config: Config,
    log_format: Option<LogFormat>,
    demo_upstream: Option<std::net::TcpListener>,
) -> ExitCode {
    telemetry::init(log_format.unwrap_or(config.log.format), &config.log.level);

    // 3. Certificates: loaded and checked before anything listens.
    let cert = match &config.tls.source {
        CertSource::Files { cert, key } => portcullis_certs::load_files(cert, key),
        CertSource::SelfSigned => {
            tracing::info!(names = ?config.names, "using a self-signed certificate generated at start");
            portcullis_certs::self_signed(&config.names)
        }
    };
    let cert = match cert {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{}: tls: {e}", config.source.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let certs = Arc::new(CertStore::new(cert));
    let tls = match tls::server_config(certs, config.tls.min_version) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("TLS setup failed: {e}");
            return ExitCode::FAILURE;
        }
    };

    // 4. Bind every listener (privileged ports need root or CAP_NET_BIND_SERVICE here).
    let bound = match listen::bind(&config.listen) {
        Ok(b) => b,
        Err((addr, e)) => {
            tracing::error!("cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };

    // 5. Start the runtime; every thread it makes is born after the sockets exist.
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
    runtime.block_on(serve(config, tls, bound, demo_upstream))
}

/// 6. Serve until a signal, then drain within the shutdown deadline.
async fn serve(
    config: Config,
    tls: Arc<rustls::ServerConfig>,
    bound: listen::Bound,
    demo_upstream: Option<std::net::TcpListener>,
) -> ExitCode {
    let grace = config.timeouts.shutdown;
    let (mut sigterm, mut sigint) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
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
    let state = Arc::new(State::new(config, tls, https_port));
    let (trigger, shutdown) = shutdown::Trigger::new();
    for (kind, l) in listeners {
        if let Ok(addr) = l.local_addr() {
            let scheme = if kind == Listener::Https {
                "https"
            } else {
                "http"
            };
            tracing::info!("listening on {scheme}://{addr}");
        }
        tokio::spawn(http::server::accept(
            l,
            kind,
            state.clone(),
            shutdown.clone(),
        ));
    }
    drop(shutdown);
    tracing::info!("ready");

    tokio::select! {
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
    }
    tracing::info!(
        "stopping: no new connections; draining for up to {}s",
        grace.as_secs_f64()
    );
    trigger.begin();
    if tokio::time::timeout(grace, trigger.drained())
        .await
        .is_err()
    {
        tracing::warn!("shutdown deadline passed with connections still open; closing them");
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}
