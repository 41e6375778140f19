//! Config reload on SIGHUP (`systemctl reload`): the config file is read and checked again; a config that
//! fails its check changes nothing (every problem logged as `FILE:LINE:COL: key: message`, as `check` prints
//! it). A good one becomes the next `Snapshot`, swapped in at once for new connections and requests (routes,
//! upstream groups, timeouts, limits, headers, rate limits, maintenance, the TLS versions); those in flight,
//! tunnels included, finish on the one they took. Upstream servers named again keep their pools and health,
//! new ones are added, the active checks are re-planned, unchanged rate limits keep their counts. What is
//! fixed at start (listener addresses, `[process]`, `[buffers]`, `[acme]`, the connection caps, the log's
//! level and format) is not applied: each changed key is logged as needing a restart and the running value
//! stays in the snapshot. A change to the sites themselves (their number, names, certificate source,
//! `strict_sni`) is refused whole. Then every certificate pair is read again, and systemd hears
//! `RELOADING=1` before and `READY=1` after.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use portcullis_config::Config;

use crate::reload::{self, Reloader};
use crate::sdnotify;
use crate::shutdown::Shutdown;
use crate::signals::Reloads;
use crate::state::Shared;
use crate::upstream::health::Checks;
use crate::{http, tls};

/// What a reload works on: the process state, the file to read, the certificate reloader and the running
/// health checks (this task owns them).
pub struct Reconfigure {
    pub state: Arc<Shared>,
    /// `None` for the demo, whose config is made at start: SIGHUP re-reads its certificates only.
    pub path: Option<PathBuf>,
    pub reloader: Arc<Reloader>,
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
            r.reload(&path).await;
        }
        reload::reload_all(&r.reloader).await;
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
            Err(e) => {
                tracing::error!("config reload failed: {e}: the running config is unchanged");
                return;
            }
        };
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        let old = self.state.snapshot();
        if let Some(why) = sites_changed(&old.config, &config) {
            tracing::error!(
                "config reload failed: {why}: changing the sites needs a restart; the running config is \
                 unchanged"
            );
            return;
        }
        let pinned = pin(&old.config, &mut config);
        // What can fail comes first, before anything is changed.
        let page_path = config.maintenance.page.clone();
        let page = tokio::task::spawn_blocking(move || {
            http::action::maintenance::load(page_path.as_deref())
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        let page = match page {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(
                    "config reload failed: {}: [maintenance] page: {e}: the running config is unchanged",
                    path.display()
                );
                return;
            }
        };
        let tls = if config.tls.min_version == old.config.tls.min_version {
            // The same one: its session ticket keys and cache go on, resumption keeps working.
            old.tls.clone()
        } else {
            match tls::server_config(self.state.sites.clone(), config.tls.min_version) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(
                        "config reload failed: TLS setup: {e}: the running config is unchanged"
                    );
                    return;
                }
            }
        };
        for key in &pinned {
            tracing::warn!("{key} changed: restart to apply");
        }
        let servers = self.state.servers.learn(&config);
        let (rate_limits, limits) = old.rate_limits.renew(&config.rate_limits);
        let next = self.state.next(config, tls, page, Arc::new(rate_limits));
        let checks = self.checks.replan(&next.config, &next.upstreams);
        let sites = next.config.sites.len();
        let routes: usize = next.config.sites.iter().map(|s| s.routes.len()).sum();
        let upstreams = next.upstreams.len();
        let rate_limits = next.rate_limits.count();
        self.state.install(next);
        drop(old);
        tracing::info!(
            sites,
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

/// Why the sites of `new` are not those of `old` (their certificates, names and the SNI rule are fixed at
/// start: `Sites`, the certificate reloader, OCSP and ACME tasks are per site), if they are not.
fn sites_changed(old: &Config, new: &Config) -> Option<String> {
    if old.sites.len() != new.sites.len() {
        return Some(format!(
            "the number of sites changed ({} to {})",
            old.sites.len(),
            new.sites.len()
        ));
    }
    if old.strict_sni != new.strict_sni {
        return Some("strict_sni changed".into());
    }
    for (i, (a, b)) in old.sites.iter().zip(&new.sites).enumerate() {
        if a.names != b.names {
            return Some(format!("site {i}: names changed"));
        }
        if a.tls != b.tls {
            return Some(format!("site {i}: its certificate source changed"));
        }
    }
    None
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
        "buffers.memory_per_request" => buffers.memory_per_request;
        "buffers.memory" => buffers.memory;
        "buffers.disk" => buffers.disk;
        "buffers.max_response" => buffers.max_response;
        "acme" => acme;
        "limits.connections" => limits.connections;
        "limits.connections_per_ip" => limits.connections_per_ip;
        "log.level" => log.level;
        "log.format" => log.format;
        "log.file" => log.file;
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
    fn a_change_of_sites_is_found() {
        let old = parse("");
        assert_eq!(sites_changed(&old, &parse("")), None);
        let named = parse(r#"names = ["app.test"]"#);
        assert_eq!(
            sites_changed(&old, &named).as_deref(),
            Some("site 0: names changed")
        );
    }
}
