//! Config reload on SIGHUP (`systemctl reload`): the config file is read and checked again; a config that
//! fails its check changes nothing (every problem logged as `FILE:LINE:COL: key: message`, as `check` prints
//! it). A good one becomes the next `Snapshot`, swapped in at once for new connections and requests (routes,
//! upstream groups, timeouts, limits, headers, rate limits, maintenance, the TLS versions); those in flight,
//! tunnels included, finish on the one they took. Upstream servers named again keep their pools and health,
//! new ones are added, the active checks are re-planned, unchanged rate limits keep their counts. What is
//! fixed at start (listener addresses, `[admin]`, `[cluster]`, `[process]`, `[buffers]`, a changed `[acme]`, the connection caps,
//! the log's level and format) is not applied: each changed key is logged as needing a restart and the
//! running value stays in the snapshot. The sites change live too (`sites.rs`): added, removed, renamed,
//! another certificate source, `strict_sni`; an unchanged site keeps its certificate and tasks, a new
//! one's certificate is loaded before anything is swapped (one that fails refuses the reload whole), and
//! the new `Sites` is in the same snapshot as the routes. Then every certificate pair is read again, and
//! systemd hears `RELOADING=1` before and `READY=1` after. A config naming a path outside the sandbox set
//! at start (`sandbox.rs`) is refused whole as needing a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use portcullis_config::Config;

use crate::client_auth::ClientAuths;
use crate::reload;
use crate::sdnotify;
use crate::shutdown::Shutdown;
use crate::signals::Reloads;
use crate::sites::SiteSet;
use crate::state::Shared;
use crate::upstream::health::Checks;
use crate::{http, tls};

/// What a reload works on: the process state, the file to read, the site set served (with the certificate
/// reloader) and the running health checks (this task owns them).
pub struct Reconfigure {
    pub state: Arc<Shared>,
    /// `None` for the demo, whose config is made at start: SIGHUP re-reads its certificates only.
    pub path: Option<PathBuf>,
    pub sites: SiteSet,
    pub checks: Checks,
}

/// Runs until shutdown: each SIGHUP (several while one is being handled: once more after it) reloads the
/// config, then the certificates, framed by `RELOADING=1` / `READY=1`.
pub async fn run(mut r: Reconfigure, mut reloads: Reloads, mut shutdown: Shutdown) {
    loop {
        tokio::select! {
            () = shutdown.begun() => return,
            () = reloads.requested() => {}
        }
        sdnotify::reloading();
        if let Some(path) = r.path.clone() {
            // A reload that took installs a new snapshot; one that failed changes nothing.
            let before = r.state.snapshot();
            r.reload(&path).await;
            let took = !Arc::ptr_eq(&before, &r.state.snapshot());
            drop(before);
            r.state.metrics.reloaded(took);
        }
        reload::reload_all(r.sites.reloader()).await;
        sdnotify::ready();
    }
}

impl Reconfigure {
    /// One config reload: the new snapshot in force, or nothing changed and the log says why.
    async fn reload(&mut self, path: &Path) {
        let owned = path.to_owned();
        let loaded = tokio::task::spawn_blocking(move || Config::load(&owned)).await;
        let mut config = match loaded {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                // One problem per line, each `FILE:LINE:COL: key: message` (or `FILE: cannot read: ...`).
                let text = e.to_string();
                for line in text.lines() {
                    tracing::error!("{line}");
                }
                tracing::error!(
                    problems = text.lines().count(),
                    "config reload failed: {}: the running config is unchanged",
                    path.display()
                );
                return;
            }
            Err(e) => return refuse(e),
        };
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        let old = self.state.snapshot();
        let pinned = pin(&old.config, &mut config);
        // A path the sandbox set at start does not allow (a new certificate or static folder, ...) cannot
        // be read from now on: refused whole, before anything is read from it.
        let outside = crate::sandbox::uncovered(&self.state.sandbox, &config);
        if !outside.is_empty() {
            let paths: Vec<String> = outside.iter().map(|r| r.to_string()).collect();
            return refuse(format_args!(
                "{}: needs a restart: the sandbox set at start does not allow {}",
                path.display(),
                paths.join("; ")
            ));
        }
        // What can fail comes first, before anything is changed.
        let page_path = config.maintenance.page.clone();
        let page = tokio::task::spawn_blocking(move || {
            http::action::maintenance::load(page_path.as_deref())
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        let page = match page {
            Ok(p) => p,
            Err(e) => return refuse(format_args!("{}: [maintenance] page: {e}", path.display())),
        };
        // The sites: those unchanged as they are, every other one's certificate loaded now, off the async
        // threads; a certificate that fails (its file missing, unreadable, not covering the names, ...)
        // fails the reload.
        let current = self.sites.current();
        let (config, prepared) = match tokio::task::spawn_blocking(move || {
            let prepared = current.prepare(&config);
            (config, prepared)
        })
        .await
        {
            Ok((config, Ok(p))) => (config, p),
            Ok((_, Err(e))) => return refuse(format_args!("{}: {e}", path.display())),
            Err(e) => return refuse(e),
        };
        let same_versions = config.tls.min_version == old.config.tls.min_version;
        let tls = if prepared.unchanged && same_versions {
            // The same one: its session ticket keys and cache go on, resumption keeps working.
            Ok(old.tls.clone())
        } else if same_versions {
            // Other sites, the same ticket keys and cache.
            tls::with_sites(&old.tls, prepared.sites.clone(), config.tls.min_version)
        } else {
            tls::server_config(
                prepared.sites.clone(),
                config.tls.min_version,
                self.state.tickets(),
            )
        };
        let tls = match tls {
            Ok(t) => t,
            Err(e) => return refuse(format_args!("TLS setup: {e}")),
        };
        // Client certificates: every `client_auth` site's CA and CRLs read again, around the new sites.
        let (config, client_auth) = match tokio::task::spawn_blocking({
            let sites = prepared.sites.clone();
            move || {
                let auths = ClientAuths::load(&config, &sites);
                (config, auths)
            }
        })
        .await
        {
            Ok((config, Ok(a))) => (config, Arc::new(a)),
            Ok((_, Err(e))) => return refuse(format_args!("{}: {e}", path.display())),
            Err(e) => return refuse(e),
        };
        for key in &pinned {
            tracing::warn!("{key} changed: restart to apply");
        }
        let servers = self.state.servers.learn(&config);
        let (rate_limits, limits) = old.rate_limits.renew(&config.rate_limits);
        let next = self.state.next(
            config,
            prepared.sites.clone(),
            (tls, client_auth),
            page,
            Arc::new(rate_limits),
        );
        let checks = self.checks.replan(&next.config, &next.upstreams);
        let sites = next.config.sites.len();
        let routes: usize = next.config.sites.iter().map(|s| s.routes.len()).sum();
        let upstreams = next.upstreams.len();
        let rate_limits = next.rate_limits.count();
        let (sites_kept, sites_added, sites_removed) =
            (prepared.kept(), prepared.added(), prepared.removed);
        self.state.install(next);
        drop(old);
        // In force: the new sites' tasks start, those of the sites that left end.
        self.sites.commit(&self.state.snapshot().config, prepared);
        tracing::info!(
            sites,
            sites_kept,
            sites_added,
            sites_removed,
            routes,
            upstreams,
            servers_added = servers.added,
            servers_kept = servers.kept,
            servers_retired = servers.retired,
            rate_limits,
            rate_limits_kept = limits.kept,
            rate_limits_new = limits.built,
            checks_kept = checks.kept,
            checks_started = checks.started,
            checks_stopped = checks.stopped,
            not_applied = %pinned.join(","),
            "config reloaded"
        );
    }
}

/// Logs why a reload changes nothing (after any problems of its own, one per line).
fn refuse(why: impl std::fmt::Display) {
    tracing::error!("config reload failed: {why}: the running config is unchanged");
}

/// Puts back into `new` the values fixed at start that it changed, and names each such key: the snapshot
/// then says what runs, and nothing is half-applied.
fn pin(old: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    macro_rules! fixed {
        ($($key:literal => $($field:ident).+;)*) => {$(
            if new.$($field).+ != old.$($field).+ {
                keys.push($key);
                new.$($field).+ = old.$($field).+.clone();
            }
        )*};
    }
    fixed! {
        "listen.https" => listen.https;
        "listen.http" => listen.http;
        "process.user" => process.user;
        "process.group" => process.group;
        "process.temp_dir" => process.temp_dir;
        "process.sandbox" => process.sandbox;
        "process.seccomp" => process.seccomp;
        "buffers.memory_per_request" => buffers.memory_per_request;
        "buffers.memory" => buffers.memory;
        "buffers.disk" => buffers.disk;
        "buffers.max_response" => buffers.max_response;
        "admin" => admin;
        "cluster" => cluster;
        "limits.connections" => limits.connections;
        "limits.connections_per_ip" => limits.connections_per_ip;
        "log.level" => log.level;
        "log.format" => log.format;
        "log.file" => log.file;
    }
    // `[acme]` (the CA, the account, state_dir) is read at start, and a config without an ACME site has
    // none: a section that appears (the first ACME site) starts ACME on commit, one that goes (the last
    // ACME site went) leaves the running one unused; only a change between two needs a restart.
    match (&old.acme, &new.acme) {
        (Some(a), Some(b)) if a != b => {
            keys.push("acme");
            new.acme = old.acme.clone();
        }
        (Some(_), None) => new.acme = old.acme.clone(),
        _ => {}
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> Config {
        let text = format!(
            r#"{extra}
[listen]
https = ["127.0.0.1:8443"]
[tls]
self_signed = true
[[route]]
path = "/"
upstream = "app"
[upstream.app]
servers = ["127.0.0.1:5001"]
"#
        );
        Config::parse(Path::new("/etc/portcullis/portcullis.toml"), &text).unwrap()
    }

    #[test]
    fn keys_fixed_at_start_are_named_and_kept() {
        let old = parse("");
        let mut new = Config::parse(
            Path::new("/etc/portcullis/portcullis.toml"),
            r#"
[listen]
https = ["127.0.0.1:9443"]
[tls]
self_signed = true
[[route]]
path = "/"
upstream = "app"
[upstream.app]
servers = ["127.0.0.1:5002"]
[buffers]
memory = "1MiB"
[log]
level = "debug"
"#,
        )
        .unwrap();
        let keys = pin(&old, &mut new);
        assert_eq!(keys, ["listen.https", "buffers.memory", "log.level"]);
        assert_eq!(new.listen.https, old.listen.https);
        assert_eq!(new.buffers, old.buffers);
        // What may change live is left as the new config says.
        assert_ne!(new.upstreams[0].servers, old.upstreams[0].servers);
        assert!(pin(&old, &mut old.clone()).is_empty());
    }

    #[test]
    fn an_admin_change_needs_a_restart() {
        let old = parse("");
        let mut new = parse("[admin]\nlisten = \"127.0.0.1:9180\"\n");
        assert_eq!(pin(&old, &mut new), ["admin"]);
        assert_eq!(new.admin, None);
    }
}
