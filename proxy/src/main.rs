//! `portcullis`: the numbered steps from the command line to the exit code. Each step is a call into a
//! module of its own: `check` is `portcullis check`'s report, `demo` the demo's start-up, `tasks` what
//! serving starts, `signals` what ends it, `privdrop`, `sandbox` and `seccomp` what the process gives up.

#![forbid(unsafe_code)]

mod acme;
mod admin;
mod admission;
mod body;
mod check;
mod cli;
mod client_auth;
mod cluster;
mod demo;
mod http;
mod listen;
mod logfile;
mod metrics;
mod ocsp;
mod pace;
mod privdrop;
#[cfg(debug_assertions)]
mod probe;
mod ratelimit;
mod reconfigure;
mod reload;
mod sandbox;
mod scrape;
mod sdnotify;
mod seccomp;
mod shutdown;
mod signals;
mod sites;
mod state;
mod tasks;
mod telemetry;
mod tls;
mod upstream;

use std::fmt::Display;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use portcullis_config::{Config, LogFormat};
use tokio::task::JoinHandle;

use crate::state::Shared;

/// benches/allocs' build: every allocation counted, with its call site.
#[cfg(feature = "dhat-heap")]
#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// The allocators benches compare with glibc's (`--features mimalloc` / `jemalloc`).
#[cfg(all(feature = "mimalloc", not(feature = "dhat-heap")))]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
#[cfg(all(
    feature = "jemalloc",
    not(feature = "mimalloc"),
    not(feature = "dhat-heap")
))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    // Written when main returns (a clean exit: SIGTERM, then the drain).
    #[cfg(feature = "dhat-heap")]
    let _profiler = dhat::Profiler::builder()
        .file_name(std::env::var_os("PORTCULLIS_DHAT").unwrap_or_else(|| "dhat-heap.json".into()))
        .build();
    // 1. Parse the command line.
    let cli = cli::Cli::parse();
    // 2. Load and check the config (exit 64 on a bad one). `check` reports on it and ends here; `demo` makes
    //    its own around its built-in upstream.
    let (config, log_format, insecure_keep_root, demo_upstream) = match cli.command {
        cli::Command::Check { config, live } => {
            return if live {
                check::live::run(&config)
            } else {
                check::run(&config)
            };
        }
        cli::Command::Run {
            config,
            log_format,
            insecure_keep_root,
        } => match Config::load(&config) {
            Ok(c) => (c, log_format, insecure_keep_root, None),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(cli::EXIT_CONFIG);
            }
        },
        cli::Command::Demo { https, log_format } => match demo::prepare(https) {
            Ok((c, upstream)) => (c, log_format, false, Some(upstream)),
            Err(code) => return code,
        },
    };
    let log_format = log_format.map_or(config.log.format, Into::into);
    run(config, log_format, demo_upstream, insecure_keep_root).unwrap_or_else(|code| code)
}

/// Steps 3 to 8, for `run` and `demo`; `Err` is the exit code of a step that failed (and logged why).
fn run(
    config: Config,
    log_format: LogFormat,
    demo_upstream: Option<std::net::TcpListener>,
    insecure_keep_root: bool,
) -> Result<ExitCode, ExitCode> {
    // The access log file, opened now with the privileges we start with (root can open a log in a folder
    // the service user cannot write); its writer thread starts after the drop.
    let access_file = match config.log.file.as_deref().map(logfile::AccessFile::open) {
        None => None,
        Some(Ok(f)) => Some(f),
        Some(Err(e)) => {
            telemetry::init(log_format, &config.log.level, None);
            let path = config
                .log
                .file
                .as_deref()
                .unwrap_or(std::path::Path::new(""));
            return Err(bad_config(
                &config,
                format_args!("log.file: cannot open {}: {e}", path.display()),
            ));
        }
    };
    telemetry::init(log_format, &config.log.level, access_file.as_ref());

    // 3. Certificates, loaded and checked before anything listens, and the rustls config around them.
    let sites = sites::load(&config).map_err(|e| bad_config(&config, format_args!("tls: {e}")))?;
    //    `[cluster]`: its password and CA read now (as root); it connects once the runtime runs.
    let cluster = config
        .cluster
        .as_ref()
        .map(cluster::Node::open)
        .transpose()
        .map_err(|e| bad_config(&config, e))?;
    let tickets = cluster
        .as_ref()
        .map(|n| n.tickets.clone() as Arc<dyn rustls::server::ProducesTickets>);
    let tls = tls::server_config(sites.sites.clone(), config.tls.min_version, tickets)
        .map_err(|e| failed(format_args!("TLS setup failed: {e}")))?;
    //    Client certificates (mutual TLS): each `client_auth` site's CA and CRLs, and its own config.
    let client_auth = client_auth::ClientAuths::load(&config, &sites.sites)
        .map_err(|e| bad_config(&config, e))?;
    //    The maintenance page, read once now (as root, like the certificates); unreadable is the config's fault.
    let maintenance_page = http::action::maintenance::load(config.maintenance.page.as_deref())
        .map_err(|e| bad_config(&config, e))?;

    // 4. Who to become, decided before anything listens: a bad [process] costs no socket. Files read again
    //    after the drop (reload) that the service user cannot read, or an exposed key: `portcullis check`
    //    refuses these; here they are warnings.
    let plan =
        privdrop::plan(&config.process, insecure_keep_root).map_err(|e| bad_config(&config, e))?;
    for p in privdrop::access::problems(&config, plan.identity()) {
        tracing::warn!("{p}");
    }
    //    The private folder for buffered bodies, made (or checked) now and handed to that user: after the
    //    drop, the service user may not be able to create it where it belongs.
    let who = plan.identity();
    body::prepare(&config.process.temp_dir, who.uid.as_raw(), who.gid.as_raw())
        .map_err(|e| failed(format_args!("[process] temp_dir: {e}")))?;

    // 5. Bind every listener (privileged ports need root or CAP_NET_BIND_SERVICE here), or adopt the
    //    sockets systemd passed (socket activation: no privilege needed at all). Every connection needs a
    //    descriptor (two with its upstream): `[limits] connections` must fit.
    let mut bound = listen::bind_or_adopt(&config.listen).map_err(failed)?;
    if let Some(admin) = &config.admin {
        bound.admin = Some(listen::bind_admin(&admin.listen, (who.uid, who.gid)).map_err(failed)?);
    }
    listen::raise_open_file_limit(config.limits.connections);

    // 6. Drop privileges while still single-threaded (groups, gid, uid, every capability set, NoNewPrivs),
    //    then start the runtime, whose threads are born unprivileged, and prove the drop on every one.
    let dropped =
        privdrop::apply(&plan).map_err(|e| failed(format_args!("cannot drop privileges: {e}")))?;
    //    Then the sandbox, still single-threaded: every thread made from now on is confined to the files the
    //    config names (Landlock). `require` on a kernel without it is the operator's to fix: exit 64.
    let served: Vec<_> = (0..sites.sites.len())
        .filter_map(|i| sites.sites.current(i))
        .collect();
    let responders = sandbox::responders(served.iter().map(|k| k.cert.as_slice()));
    let sandbox = sandbox::apply(&config, &responders).map_err(|e| match e {
        sandbox::Error::Required => bad_config(&config, e),
        e => failed(e),
    })?;
    match &sandbox {
        sandbox::State::Unsupported => tracing::warn!(
            "this kernel does not enforce Landlock: running without the filesystem sandbox; [process] \
             sandbox = \"require\" refuses to start instead"
        ),
        sandbox::State::Off => tracing::warn!(
            "INSECURE: [process] sandbox = \"off\": the process can read and write whatever its user can, \
             and make any system call"
        ),
        sandbox::State::Enforced { .. } => {}
    }
    //    Then the system-call filter (seccomp), last: no program can be run from here on, and a call
    //    outside the allow-list fails with EPERM (or kills the process, `[process] seccomp = "kill"`).
    let seccomp = seccomp::apply(&config).map_err(|e| match e {
        seccomp::Error::Required(_) => bad_config(&config, e),
        e => failed(e),
    })?;
    match &seccomp {
        seccomp::State::Unsupported(why) => tracing::warn!(
            "running without the seccomp filter: {why}; [process] sandbox = \"require\" refuses to start \
             instead"
        ),
        seccomp::State::Off if config.process.sandbox != portcullis_config::Sandbox::Off => {
            tracing::warn!(
                "INSECURE: [process] seccomp = \"off\": the process may make any system call, run \
                 programs included"
            )
        }
        _ => {}
    }
    //    The access log's writer thread, born with the credentials every thread has from now on.
    let _access_log = access_file.as_ref().and_then(logfile::AccessFile::start);
    if dropped.is_none() {
        tracing::warn!(
            "INSECURE: --insecure-keep-root: serving every request as root with every capability; set \
             [process] user to an unprivileged account instead"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| failed(format_args!("cannot start the runtime: {e}")))?;
    if let Some(d) = dropped {
        let threads = privdrop::verify(d).map_err(failed)?;
        tracing::info!(
            "privileges dropped: running as {}, no capabilities, no new privileges ({threads} threads checked); {sandbox}; {seccomp}",
            plan.identity()
        );
    } else {
        tracing::info!("{sandbox}; {seccomp}");
    }

    // 7. and 8.
    runtime.block_on(serve(
        config,
        (tls, client_auth),
        cluster,
        sites,
        maintenance_page,
        bound,
        demo_upstream,
        access_file,
        sandbox,
    ))
}

/// 7. Serve: the signal handlers, the listeners on the runtime, `Shared`, every task, `READY=1`.
/// 8. Wait for SIGTERM or SIGINT (SIGHUP meanwhile reloads the config), then drain within the shutdown
///    deadline.
#[allow(clippy::too_many_arguments)] // each is one thing steps 3 to 6 made for step 7, used once here
async fn serve(
    config: Config,
    (tls, client_auth): (Arc<rustls::ServerConfig>, client_auth::ClientAuths),
    cluster: Option<cluster::Node>,
    sites: sites::Prepared,
    maintenance_page: Option<bytes::Bytes>,
    bound: listen::Bound,
    demo_upstream: Option<std::net::TcpListener>,
    access_file: Option<logfile::AccessFile>,
    sandbox: sandbox::State,
) -> Result<ExitCode, ExitCode> {
    // SIGHUP reads the config file again; the demo's config is made at start and has none.
    let config_path = demo_upstream.is_none().then(|| config.source.clone());
    let mut signals =
        signals::Signals::install().map_err(|_| failed("cannot install signal handlers"))?;
    let listeners = tasks::Listeners::register(bound)
        .map_err(|e| failed(format_args!("cannot register a listener: {e}")))?;
    let state = Arc::new(Shared::new(
        config,
        tls,
        sites.sites.clone(),
        Arc::new(client_auth),
        maintenance_page,
        listeners.https_port(),
        cluster,
        sandbox,
    ));
    let (trigger, shutdown) = shutdown::Trigger::new();
    if let Some(up) = demo_upstream {
        demo::start(up, &shutdown)
            .map_err(|e| failed(format_args!("cannot start the demo upstream: {e}")))?;
    }
    let accepting = tasks::spawn(&state, listeners, sites, config_path, &signals, shutdown);
    if let Some(f) = access_file {
        tokio::spawn(logfile::reopen_on(f, signals.reopens()));
    }
    tracing::info!("ready");
    sdnotify::ready();
    #[cfg(debug_assertions)]
    probe::start();

    signals.until_stop().await;
    // The deadline of the config in force now (a reload may have changed it).
    let grace = state.snapshot().config.timeouts.shutdown;
    // The admin listener stays open through the drain: `/health` answers 503 from now on.
    state
        .draining
        .store(true, std::sync::atomic::Ordering::Relaxed);
    drain(&trigger, grace, accepting).await;
    Ok(ExitCode::SUCCESS)
}

/// Every `Shutdown` sees the deadline, the accept loops end at once (after them no listener is open), and
/// the process waits for every connection, tunnel and task to let go until the deadline.
async fn drain(trigger: &shutdown::Trigger, grace: Duration, accepting: Vec<JoinHandle<()>>) {
    let deadline = trigger.begin(grace);
    sdnotify::stopping();
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
}

/// Logs what is wrong with the config (`FILE: what`) and gives exit code 64.
fn bad_config(config: &Config, what: impl Display) -> ExitCode {
    tracing::error!("{}: {what}", config.source.display());
    ExitCode::from(cli::EXIT_CONFIG)
}

/// Logs why serving cannot go on (not the config's fault) and gives exit code 1.
fn failed(what: impl Display) -> ExitCode {
    tracing::error!("{what}");
    ExitCode::FAILURE
}
