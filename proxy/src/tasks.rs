//! What serving starts once `Shared` exists, every task holding a [`Shutdown`]: one accept loop per listener
//! (`http::server::accept`), the admin listener (`admin::serve`, the one without a `Shutdown`), and the
//! control tasks: each site's (OCSP stapling, and ACME for an
//! `acme = true` site; started and ended with the site, see `sites.rs`), the certificate reloader (file
//! changes), the config reload (SIGHUP, which also re-reads the certificates, changes the sites and
//! re-plans the upstream health checks), the rate-limit purge, `[cluster]`'s Redis connection and ticket keys, the upstream pools' sweep and the systemd
//! watchdog.
//! `main` awaits the accept loops when shutdown begins (after them no listener is open); the others end on
//! their own then.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::http::pipeline::Listener;
use crate::reload::Reloader;
use crate::shutdown::Shutdown;
use crate::signals::Signals;
use crate::sites::{Prepared, SiteSet};
use crate::state::Shared;
use crate::{admin, http, listen, ratelimit, reconfigure, reload, sdnotify, upstream};

/// The bound sockets, registered with the runtime, each with what it serves, and the admin listener.
pub struct Listeners(Vec<(Listener, TcpListener)>, Option<admin::Listening>);

impl Listeners {
    /// Registers every bound socket with the runtime (HTTPS ones first, each list in its order).
    pub fn register(bound: listen::Bound) -> io::Result<Listeners> {
        let mut listeners = Vec::new();
        for (kind, list) in [(Listener::Https, bound.https), (Listener::Http, bound.http)] {
            for l in list {
                listeners.push((kind, TcpListener::from_std(l)?));
            }
        }
        let admin = bound.admin.map(admin::Listening::register).transpose()?;
        Ok(Listeners(listeners, admin))
    }

    /// The port HTTPS is served on (the first HTTPS listener's, 443 without one): what a redirect names.
    pub fn https_port(&self) -> u16 {
        self.0
            .iter()
            .find(|(k, _)| *k == Listener::Https)
            .and_then(|(_, l)| l.local_addr().ok())
            .map_or(443, |a| a.port())
    }
}

/// Starts every task; `shutdown` is handed out and dropped here, so that the drain waits only for them.
/// `sites` is the site set loaded at start (the first snapshot serves its `Sites`). `config_path` is the
/// file SIGHUP reads again (`None`: the demo's made-up config). Returns the accept loops.
pub fn spawn(
    state: &Arc<Shared>,
    listeners: Listeners,
    sites: Prepared,
    config_path: Option<PathBuf>,
    signals: &Signals,
    shutdown: Shutdown,
) -> Vec<JoinHandle<()>> {
    // `[cluster]`: the Redis connection (pinged each second) and the shared ticket keys, before the first
    // connection is accepted (neither is waited for: until Redis answers, the node's own state serves).
    if let Some(node) = &state.cluster {
        node.start(&shutdown);
    }
    let accepting = accept(state, listeners, &shutdown);
    // Per site: OCSP stapling for a certificate that names a responder, the file watch for one from files,
    // and for an `acme = true` site its order and renewal task. A config reload starts these for the sites
    // it adds and ends them for those it removes.
    let reloader = Arc::new(Reloader::default());
    let sites = SiteSet::start(
        &state.snapshot().config,
        sites,
        reloader.clone(),
        (
            state.challenges.clone(),
            state.cluster.as_ref().and_then(|n| n.acme.clone()),
        ),
        state.metrics.clone(),
        shutdown.clone(),
        signals.reloads(),
    );
    // Certificates: file changes reload them.
    tokio::spawn(reload::run(reloader, shutdown.clone()));
    // Client CAs and CRLs: those of the snapshot in force, reloaded when their files change.
    let live = state.clone();
    tokio::spawn(crate::client_auth::run(
        move || live.snapshot().client_auth.clone(),
        shutdown.clone(),
    ));
    // Active health checks: one task per server of an upstream with `health` (each server once); the config
    // reload re-plans them.
    let snapshot = state.snapshot();
    let checks =
        upstream::health::Checks::start(&snapshot.config, &snapshot.upstreams, shutdown.clone());
    // SIGHUP: the config, then every certificate, framed by RELOADING=1 / READY=1 to systemd.
    tokio::spawn(reconfigure::run(
        reconfigure::Reconfigure {
            state: state.clone(),
            path: config_path,
            sites,
            checks,
        },
        signals.reloads(),
        shutdown.clone(),
    ));
    // Rate limits: idle keys are dropped, from the limits in force at each purge.
    let limits = state.clone();
    tokio::spawn(ratelimit::purge(
        move || limits.snapshot().rate_limits.clone(),
        shutdown.clone(),
    ));
    // Upstream pools: idle connections expire, retired servers are forgotten; shutdown lets go of them all.
    tokio::spawn(upstream::sweep(state.servers.clone(), shutdown.clone()));
    if let Some(interval) = sdnotify::watchdog_interval() {
        tokio::spawn(sdnotify::watchdog(interval, shutdown));
    }
    accepting
}

/// One accept loop per listener, each logging `listening on SCHEME://ADDR` first.
/// The admin listener's loop is not among them: it holds no `Shutdown` and stays open through the drain.
fn accept(state: &Arc<Shared>, listeners: Listeners, shutdown: &Shutdown) -> Vec<JoinHandle<()>> {
    if let Some(a) = listeners.1 {
        tracing::info!("admin listener on {}", a.describe());
        tokio::spawn(admin::serve(a, state.clone()));
    }
    let mut accepting = Vec::new();
    for (kind, l) in listeners.0 {
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
    accepting
}
