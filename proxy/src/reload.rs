//! Certificates that never cause an outage: every site's pair is loaded and checked at start (or when a
//! config reload adds the site, before the reload is applied: `sites.rs`), then re-read
//! when its files change (inotify through `notify`, backed by a 1 s poll of each file's identity) and on
//! SIGHUP (the config reload calls [`reload_all`]). A new pair is checked (parses, key fits, not expired,
//! covers the site) before one pointer is swapped; on any failure the last good pair keeps serving and the
//! log says why. A new chain seen with the old key (certbot replaces the two files one after the other) is
//! retried every 250 ms until the key matches, never served. Expiry is checked at start and daily.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use portcullis_certs::inspect::{Info, format_time};
use portcullis_certs::{Error, Loaded, SiteCert};
use portcullis_config::{CertSource, Config, Site};
use tokio::sync::{Notify, mpsc};

use crate::shutdown::Shutdown;

/// Warn when a certificate has less than this left.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);
const POLL: Duration = Duration::from_secs(1);
const MISMATCH_RETRY: Duration = Duration::from_millis(250);

/// A site whose certificate comes from files.
pub struct Watched {
    /// Its place in the site set now served (for the log; a reload that removes a site before it moves it).
    site: usize,
    cert_slot: Arc<SiteCert>,
    names: Vec<String>,
    cert: PathBuf,
    key: PathBuf,
    /// Identity of the files last served, and of the last pair refused (not retried until it changes).
    served: Option<Fingerprint>,
    refused: Option<Fingerprint>,
    info: Info,
}

/// Which bytes a path names now: the resolved target (through symlinks) and its inode, size and mtime.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint(Vec<(PathBuf, u64, u64, Option<SystemTime>)>);

fn fingerprint(paths: &[&Path]) -> Option<Fingerprint> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::with_capacity(paths.len());
    for p in paths {
        let target = std::fs::canonicalize(p).ok()?;
        let m = std::fs::metadata(&target).ok()?;
        out.push((target, m.ino(), m.len(), m.modified().ok()));
    }
    Some(Fingerprint(out))
}

/// The file-backed certificates of the site set in force, and what reloads them.
#[derive(Default)]
pub struct Reloader {
    watched: Mutex<Vec<Watched>>,
    /// The files followed changed (a config reload): `run` watches their folders again.
    refolder: Notify,
}

/// A site's certificate as loaded for the set about to be served (at start, or a site a config reload
/// adds), and, for files, what the reloader will follow once the set is in force.
pub struct Fresh {
    pub loaded: Loaded,
    files: Option<(PathBuf, PathBuf, Option<Fingerprint>)>,
}

impl Fresh {
    /// What the reloader follows for this site, now that it is served from `cert_slot` at place `site`.
    pub fn watched(
        &self,
        site: usize,
        names: &[String],
        cert_slot: &Arc<SiteCert>,
    ) -> Option<Watched> {
        let (cert, key, served) = self.files.clone()?;
        Some(Watched {
            site,
            cert_slot: cert_slot.clone(),
            names: names.to_vec(),
            cert,
            key,
            served,
            refused: None,
            info: self.loaded.info.clone(),
        })
    }
}

/// Loads site `i`'s certificate (files checked, self-signed generated, ACME bootstrapped), logging what it
/// serves. An error names the file and the reason: at start it is fatal, on a config reload it refuses the
/// reload whole.
pub fn load_site(config: &Config, i: usize, site: &Site) -> Result<Fresh, Error> {
    let mut files = None;
    let loaded = match &site.tls {
        CertSource::Files { cert, key } => {
            // Taken before the read: a change made while reading is seen by the next poll.
            let served = fingerprint(&[cert, key]);
            let loaded = portcullis_certs::load_checked(cert, key, &site.names)?;
            files = Some((cert.clone(), key.clone(), served));
            loaded
        }
        CertSource::SelfSigned => {
            let loaded = portcullis_certs::self_signed_loaded(&site.names)?;
            tracing::info!(site = i, names = ?site.names, "using a self-signed certificate generated at start or by the reload that added the site");
            loaded
        }
        // Stored from an earlier run, else its files, else self-signed: the ACME task takes it from here.
        CertSource::Acme { files } => {
            crate::acme::bootstrap(config, i, &site.names, files.as_ref())?
        }
    };
    report_expiry(i, &loaded.info, SystemTime::now());
    tracing::info!(
        site = i,
        serial = %loaded.info.serial,
        not_after = %format_time(loaded.info.not_after),
        key = %loaded.info.key_type,
        "certificate loaded"
    );
    Ok(Fresh { loaded, files })
}

fn report_expiry(site: usize, info: &Info, now: SystemTime) {
    if info.expired(now) {
        tracing::error!(site, not_after = %format_time(info.not_after), "certificate has EXPIRED");
    } else if info.remaining(now) < EXPIRY_WARNING {
        tracing::warn!(site, not_after = %format_time(info.not_after), "certificate expires within 14 days");
    }
}

/// What a reload pass found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub swapped: usize,
    pub refused: usize,
    /// A new chain waits for its key: look again soon.
    pub waiting: bool,
}

impl Reloader {
    /// Follows the file-backed sites of the set put in force: `kept` (each one's place in the new set and
    /// its certificate, the same as before) go on as they were, files' identities and all; `added` are new;
    /// any other is no longer followed.
    pub fn follow(&self, kept: &[(usize, Arc<SiteCert>)], added: Vec<Watched>) {
        let mut watched = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = Vec::with_capacity(kept.len() + added.len());
        for w in watched.drain(..) {
            if let Some((site, _)) = kept.iter().find(|(_, c)| Arc::ptr_eq(c, &w.cert_slot)) {
                next.push(Watched { site: *site, ..w });
            }
        }
        next.extend(added);
        next.sort_by_key(|w| w.site);
        *watched = next;
        drop(watched);
        self.refolder.notify_one();
    }

    /// Re-reads every file-backed site whose files changed (all of them when `force`), swapping in each new
    /// pair that passes the checks.
    pub fn reload(&self, force: bool) -> Outcome {
        let mut out = Outcome::default();
        // Poisoning only means a previous pass panicked; the list itself is still valid.
        let mut watched = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        for w in watched.iter_mut() {
            let fp = fingerprint(&[&w.cert, &w.key]);
            if !force && (fp.is_none() || fp == w.served || fp == w.refused) {
                continue;
            }
            match portcullis_certs::load_checked(&w.cert, &w.key, &w.names) {
                Ok(loaded) => {
                    w.cert_slot.swap(loaded.key);
                    tracing::info!(
                        site = w.site,
                        serial = %loaded.info.serial,
                        not_after = %format_time(loaded.info.not_after),
                        "certificate reloaded"
                    );
                    report_expiry(w.site, &loaded.info, SystemTime::now());
                    w.info = loaded.info;
                    w.served = fp;
                    w.refused = None;
                    out.swapped += 1;
                }
                Err(e @ Error::KeyMismatch { .. }) => {
                    // Most likely mid-renewal: the chain is new and the key not yet. Keep trying.
                    tracing::info!(
                        site = w.site,
                        "new certificate does not fit the key yet, waiting: {e}"
                    );
                    out.waiting = true;
                }
                Err(e) => {
                    tracing::warn!(
                        site = w.site,
                        "certificate reload refused, keeping the current one: {e}"
                    );
                    w.refused = fp;
                    out.refused += 1;
                }
            }
        }
        out
    }

    /// The daily expiry check.
    fn check_expiry(&self) {
        let now = SystemTime::now();
        let watched = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        for w in watched.iter() {
            report_expiry(w.site, &w.info, now);
        }
    }

    fn folders(&self) -> Vec<PathBuf> {
        let watched = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        let mut dirs: Vec<PathBuf> = watched
            .iter()
            .flat_map(|w| [&w.cert, &w.key])
            .filter_map(|p| p.parent().map(Path::to_path_buf))
            .collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }

    fn is_empty(&self) -> bool {
        self.watched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }
}

/// Runs until shutdown: file events, the poll, retries while a key is awaited, and the daily expiry check.
/// SIGHUP is the config reload's (`reconfigure.rs`), which then calls [`Reloader::reload`] with `force`.
pub async fn run(reloader: Arc<Reloader>, mut shutdown: Shutdown) {
    let (tx, mut events) = mpsc::channel::<()>(16);
    // Kept alive for as long as this task runs (replaced when the files followed change); None when inotify
    // is unavailable (the poll still works) or there is nothing to watch.
    let watching = |r: &Reloader| {
        if r.is_empty() {
            None
        } else {
            watch(&r.folders(), tx.clone())
        }
    };
    let mut _watcher = watching(&reloader);
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut daily = tokio::time::interval(Duration::from_secs(24 * 3600));
    daily.tick().await;
    let mut waiting = false;
    loop {
        tokio::select! {
            () = shutdown.begun() => return,
            () = reloader.refolder.notified() => {
                _watcher = watching(&reloader);
                continue;
            }
            Some(()) = events.recv() => {}
            _ = poll.tick(), if !reloader.is_empty() => {}
            () = tokio::time::sleep(MISMATCH_RETRY), if waiting => {}
            _ = daily.tick() => {
                reloader.check_expiry();
                continue;
            }
        }
        if !reloader.is_empty() {
            let r = reloader.clone();
            waiting = tokio::task::spawn_blocking(move || r.reload(false))
                .await
                .unwrap_or_default()
                .waiting;
        }
    }
}

/// SIGHUP's pass: every file-backed pair read again, changed or not, on the blocking pool; logged as
/// `reload on SIGHUP done`. A new chain still waiting for its key is retried by [`run`]'s poll.
pub async fn reload_all(reloader: &Arc<Reloader>) {
    let r = reloader.clone();
    let outcome = tokio::task::spawn_blocking(move || r.reload(true))
        .await
        .unwrap_or_default();
    tracing::info!(
        swapped = outcome.swapped,
        refused = outcome.refused,
        "reload on SIGHUP done"
    );
}

/// Watches the folders holding certificate files (a certbot renewal replaces symlinks in them).
fn watch(folders: &[PathBuf], tx: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            // A full channel already means "look again": dropping this one loses nothing.
            let _ = tx.try_send(());
        }
    })
    .map_err(|e| tracing::warn!("file watching unavailable, polling only: {e}"))
    .ok()?;
    for f in folders {
        if let Err(e) = watcher.watch(f, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(folder = %f.display(), "cannot watch, polling only: {e}");
        }
    }
    Some(watcher)
}
