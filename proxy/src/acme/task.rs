//! One task per `acme = true` site: order a certificate when there is none, renew at the CA's ARI window
//! (RFC 9773) or two thirds of the lifetime (`schedule`), swap each new one in through `Sites` exactly as a
//! file reload does, and back off on failure (persisted across restarts). Each attempt takes the site's lock
//! in `state_dir`, runs the self-check and loads the account, then orders. A reload request (SIGHUP) makes a
//! site waiting on a retry try at once. A site added by a config reload gets its task then; a site removed
//! ends its task (an attempt under way is dropped).
//!
//! With `[cluster]` (and its key_file) the certificate is the cluster's: an attempt first takes what Redis
//! holds when it is fresh, else the site's lease lock in Redis (one order for the whole cluster; a node that
//! does not get it waits and takes what the holder stores), orders, and stores the result under its fence
//! (refused when a newer holder took the lock meanwhile). Every node polls the stored certificate's fence
//! every [`PICKUP_EVERY`] and swaps a new one in. state_dir stays this node's cache: what it serves after a
//! restart while Redis is down. An order due while Redis is down is not made alone (N nodes would order N
//! times): it fails as `ClusterDown`, is retried with the usual backoff, and at once when Redis is back.
//! A holder whose attempt fails says so in Redis for the first backoff's length, so that the nodes that
//! waited on it back off too instead of each trying the same order in turn.

use crate::metrics::Metrics;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use portcullis_certs::acme::{self, Ari, Challenges, Retry, SiteStore, Store, schedule};
use portcullis_certs::inspect::format_time;
use portcullis_certs::{Loaded, SiteCert};
use portcullis_config::{AcmeChallenge, Config};

use super::account::AccountSlot;
use super::failure::{Failure, LOCK_POLL, LOCK_WAIT, blocking, describe};
use super::self_check;
use crate::cluster::acme::SharedAcme;
use crate::shutdown::{Retired, Shutdown};
use crate::signals::Reloads;

/// One whole attempt (lock, self-check, account, order, download) gives up after this.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(600);
/// Sleeps are cut into pieces this long, so that a changed wall clock (suspend, NTP) is noticed.
const MAX_SLEEP: Duration = Duration::from_secs(3600);
/// ARI is asked again at the CA's Retry-After, within these bounds.
const ARI_MIN: Duration = Duration::from_secs(60);
const ARI_MAX: Duration = Duration::from_secs(24 * 3600);
/// `[cluster]`: how often the fence of the stored certificate is asked (one small round trip per site).
/// Polling rather than pub/sub: nothing is missed across a Redis restart or a lost subscription, and a
/// few seconds is soon enough for a certificate renewed weeks before it expires.
pub const PICKUP_EVERY: Duration = Duration::from_secs(2);
/// `[cluster]`: how long an attempt waits for Redis to answer before it counts as down (at start the
/// connection is not made yet).
const FIRST_CONNECT: Duration = Duration::from_secs(5);

/// What starts the ACME site tasks: the `[acme]` settings in force (those of the first config that had an
/// ACME site; a change needs a restart), their store, the one account, and where validation answers go.
/// Without `[acme]` it starts nothing.
#[derive(Clone)]
pub struct Acme(Option<Arc<Ctx>>);

impl Acme {
    /// From the config the process started with (`[acme]` is not reloaded); `challenges` is where the
    /// listeners find the answers to validations, `metrics` where each attempt's outcome is counted.
    /// `cluster`: `[cluster]`'s shared ACME state, when there is one.
    pub fn new(
        config: &Config,
        challenges: Arc<Challenges>,
        cluster: Option<Arc<SharedAcme>>,
        metrics: Arc<Metrics>,
    ) -> Acme {
        Acme(config.acme.clone().map(|settings| {
            let store = Store::new(&settings);
            Arc::new(Ctx {
                ca: store.ca(),
                store,
                settings,
                challenges,
                cluster,
                metrics,
                account: AccountSlot::default(),
            })
        }))
    }

    /// Whether sites can have ACME certificates (`[acme]` was there at start).
    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Starts the task of one `acme = true` site (`site` names it in the log): it swaps its certificates
    /// into `cert`, runs until `shutdown` begins or the site leaves the config (`retired`), and takes
    /// `reloads` as "retry now". False (and nothing started) without `[acme]`.
    pub fn start(
        &self,
        site: String,
        names: Vec<String>,
        cert: Arc<SiteCert>,
        retired: Retired,
        shutdown: Shutdown,
        reloads: Reloads,
    ) -> bool {
        let Some(ctx) = &self.0 else {
            return false;
        };
        tokio::spawn(site_task(
            ctx.clone(),
            Site {
                label: site,
                names,
                cert,
            },
            shutdown,
            retired,
            reloads,
        ));
        true
    }
}

/// What every site's task shares: the settings, the store, where challenge answers go, and the one
/// account.
struct Ctx {
    settings: portcullis_config::Acme,
    store: Store,
    /// The CA's name in the store (and in the cluster's keys).
    ca: String,
    challenges: Arc<Challenges>,
    /// `[cluster]`: the account, certificates and locks shared by every node.
    cluster: Option<Arc<SharedAcme>>,
    /// Each attempt's outcome, timed (`/metrics`).
    metrics: Arc<Metrics>,
    account: AccountSlot,
}

/// One ACME site: how the log names it, the names ordered, and where its certificate is served from.
struct Site {
    label: String,
    names: Vec<String>,
    cert: Arc<SiteCert>,
}

/// One site: order when there is no certificate, renew when due, back off on failure, until shutdown.
async fn site_task(
    ctx: Arc<Ctx>,
    served: Site,
    mut shutdown: Shutdown,
    mut retired: Retired,
    mut reloads: Reloads,
) {
    let (site, names) = (served.label.as_str(), &served.names);
    let store = ctx.store.site(names);
    // What the self-check's connections hold (`shutdown` itself is waited on below).
    let probes = shutdown.clone();
    let mut current = {
        let s = store.clone();
        match blocking(move || s.load()).await {
            Ok(loaded) => loaded,
            Err(e) => {
                tracing::warn!(
                    site,
                    "stored ACME certificate unusable, ordering a new one: {e}"
                );
                None
            }
        }
    };
    // Another instance sharing state_dir may have stored a certificate since `bootstrap` chose what to
    // serve: serve what is stored now, so the schedule below and the certificate served agree.
    if let Some(c) = &current
        && served.cert.current().cert.first() != c.key.cert.first()
    {
        served.cert.swap(c.key.clone());
        tracing::info!(site, serial = %c.info.serial, "serving the stored ACME certificate");
    }
    let mut retry = {
        let s = store.clone();
        blocking(move || Ok(s.retry())).await.ok().flatten()
    };
    if let Some(r) = &retry {
        tracing::warn!(
            site,
            failures = r.failures,
            "ACME: earlier attempts failed ({}); next attempt at {} (SIGHUP retries now)",
            r.error,
            format_time(r.next_attempt())
        );
    }
    if let Some(c) = &current
        && schedule::renew_before_ignored(&c.info, ctx.settings.renew_before)
    {
        tracing::warn!(
            site,
            "acme.renew_before is not shorter than the certificate's lifetime: renewing at two thirds instead"
        );
    }
    // The CA's window for the current certificate and the point picked in it; when to ask again (`None`:
    // never, the CA has no ARI).
    let mut ari: Option<(Ari, SystemTime)> = None;
    let mut ari_next = Some(SystemTime::now());
    let mut planned: Option<SystemTime> = None;
    // `[cluster]`: the fence of the certificate last taken from (or stored in) Redis (0: none yet), and
    // whether the last attempt failed for Redis being down (then it is retried as soon as Redis is back).
    let mut fence = 0u64;
    let mut waiting_for_redis = false;
    loop {
        let now = SystemTime::now();
        if let Some(c) = &current
            && ari_next.is_some_and(|t| now >= t)
        {
            ari_next = Some(now + ARI_MAX);
            match ask_ari(&ctx, c).await {
                Ok(Some(a)) => {
                    let point = schedule::in_window(a.start, a.end, schedule::unit_random());
                    ari_next = Some(now + a.retry_after.clamp(ARI_MIN, ARI_MAX));
                    ari = Some((a, point));
                }
                // No ARI at this CA: two thirds (or renew_before) it is, for good.
                Ok(None) => ari_next = None,
                Err(e) => tracing::debug!(
                    site,
                    "ACME renewal info unavailable, using the certificate's lifetime: {}",
                    describe(&e)
                ),
            }
        }
        let due = match &current {
            None => now,
            Some(c) => ari.as_ref().map_or_else(
                || schedule::renewal_time(&c.info, ctx.settings.renew_before),
                |(_, p)| *p,
            ),
        };
        let when = retry.as_ref().map_or(due, |r| due.max(r.next_attempt()));
        if when > now {
            if planned != Some(when) {
                planned = Some(when);
                let reason = if retry.is_some() { "retry" } else { "renewal" };
                tracing::info!(site, at = %format_time(when), reason, "next ACME attempt scheduled");
            }
            // ARI is only asked about a certificate: without one, its time must not cut the sleep short
            // (a past `ari_next` would make this loop spin until the retry is due).
            let ari_wake = current.as_ref().and(ari_next);
            let wake = ari_wake
                .map_or(when, |a| when.min(a))
                .duration_since(now)
                .unwrap_or_default()
                .min(MAX_SLEEP);
            let poll = async {
                match &ctx.cluster {
                    Some(_) => tokio::time::sleep(PICKUP_EVERY).await,
                    None => std::future::pending().await,
                }
            };
            let woke = tokio::select! {
                () = tokio::time::sleep(wake) => Woke::Time,
                () = reloads.requested() => Woke::Forced,
                () = poll => Woke::Poll,
                () = shutdown.begun() => return,
                () = retired.wait() => return ended(site),
            };
            let forced = match woke {
                Woke::Time => false,
                Woke::Forced => true,
                Woke::Poll => {
                    let Some(shared) = &ctx.cluster else {
                        continue;
                    };
                    if waiting_for_redis && shared.is_up() {
                        tracing::info!(
                            site,
                            "the cluster's Redis is back: the ACME attempt is made now"
                        );
                        waiting_for_redis = false;
                        true
                    } else {
                        if let Some((loaded, f)) =
                            pick_up(&ctx, shared, names, &store, current.as_ref(), fence).await
                        {
                            fence = f;
                            if let Picked::New(loaded) = loaded {
                                served.cert.swap(loaded.key.clone());
                                tracing::info!(
                                    site,
                                    serial = %loaded.info.serial,
                                    not_after = %format_time(loaded.info.not_after),
                                    "ACME certificate from the cluster installed"
                                );
                                current = Some(loaded);
                                ari = None;
                                ari_next = Some(SystemTime::now());
                                planned = None;
                                forget_retry(&store, &mut retry).await;
                            }
                        }
                        continue;
                    }
                }
            };
            // SIGHUP means "retry now" to a site waiting on a retry only: a site whose certificate is
            // good until its renewal orders nothing (each config reload would otherwise renew every
            // certificate, against the CA's rate limits).
            if !(forced && retry.is_some()) && SystemTime::now() < when {
                continue;
            }
        }
        planned = None;
        let replaces = ari.as_ref().map(|(a, _)| a.id.clone());
        let outcome = tokio::select! {
            r = tokio::time::timeout(ATTEMPT_TIMEOUT, attempt(&ctx, site, names, &store, current.as_ref(), replaces, &probes)) => {
                r.unwrap_or(Err(Failure::Timeout(ATTEMPT_TIMEOUT)))
            }
            () = shutdown.begun() => return,
            // The site left the config: no certificate is wanted for it any more.
            () = retired.wait() => return ended(site),
        };
        // A reload request (SIGHUP) during the attempt asked for what just happened: it does not start another.
        reloads.seen();
        ctx.metrics
            .acme_attempt(&crate::metrics::site_label(names), outcome.is_ok());
        match outcome {
            Ok((loaded, f)) => {
                fence = fence.max(f);
                waiting_for_redis = false;
                served.cert.swap(loaded.key.clone());
                tracing::info!(
                    site,
                    names = ?names,
                    serial = %loaded.info.serial,
                    issuer = %loaded.info.issuer,
                    not_after = %format_time(loaded.info.not_after),
                    "ACME certificate installed"
                );
                if schedule::renew_before_ignored(&loaded.info, ctx.settings.renew_before) {
                    tracing::warn!(
                        site,
                        "acme.renew_before is not shorter than the certificate's lifetime: renewing at two thirds instead"
                    );
                }
                current = Some(loaded);
                ari = None;
                ari_next = Some(SystemTime::now());
                forget_retry(&store, &mut retry).await;
            }
            Err(e) => {
                waiting_for_redis = matches!(e, Failure::ClusterDown);
                let failures = retry.as_ref().map_or(0, |r| r.failures).saturating_add(1);
                let delay = schedule::retry_delay(failures, schedule::unit_random());
                let next = SystemTime::now() + delay;
                tracing::warn!(
                    site,
                    names = ?names,
                    failures,
                    "ACME attempt failed, retrying in {}s (at {}): {}",
                    delay.as_secs(),
                    format_time(next),
                    describe(&e)
                );
                let r = Retry {
                    failures,
                    next_attempt: next.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                    error: describe(&e),
                };
                let (s, saved) = (store.clone(), r.clone());
                if let Err(e) = blocking(move || s.save_retry(&saved)).await {
                    tracing::warn!(site, "cannot record the ACME failure in state_dir: {e}");
                }
                retry = Some(r);
            }
        }
    }
}

/// What ended a site task's wait.
enum Woke {
    Time,
    /// A reload request (SIGHUP), or Redis back for an attempt that waited on it.
    Forced,
    /// `[cluster]`: time to look for a certificate another node stored.
    Poll,
}

/// `[cluster]`: the certificate Redis holds for these names when its fence is not `known`, and that fence
/// (`None` when Redis has none or cannot be asked).
async fn pick_up(
    ctx: &Ctx,
    shared: &SharedAcme,
    names: &[String],
    store: &SiteStore,
    current: Option<&Loaded>,
    known: u64,
) -> Option<(Picked, u64)> {
    let first = names.first()?;
    let version = shared.version(&ctx.ca, first).await?;
    if version == known {
        return Some((Picked::Nothing, known));
    }
    let stored = match shared.cert(&ctx.ca, first).await? {
        Ok(s) => s,
        // Logged there; not fetched again until it changes.
        Err((_, fence)) => return Some((Picked::Foreign, fence)),
    };
    let s = store.clone();
    let saved = blocking(move || s.save(&stored.chain_pem, &stored.key_pem)).await;
    match saved {
        Ok(loaded) if current.is_some_and(|c| c.info.serial == loaded.info.serial) => {
            Some((Picked::Nothing, stored.fence))
        }
        Ok(loaded) => Some((Picked::New(loaded), stored.fence)),
        Err(e) => {
            tracing::warn!(
                names = ?names,
                "the cluster's certificate for these names is not served: {}",
                describe(&e)
            );
            Some((Picked::Nothing, stored.fence))
        }
    }
}

/// What [`pick_up`] found in Redis.
enum Picked {
    /// A certificate new here, checked and cached in state_dir.
    New(Loaded),
    /// Nothing new to serve (the one served, or unusable: logged).
    Nothing,
    /// One this node's key_file does not open (logged).
    Foreign,
}

/// A site task's end when a config reload removed its site.
fn ended(site: &str) {
    tracing::info!(
        site,
        "the site is no longer in the config: its ACME task ends"
    );
}

/// One attempt: state_dir writable, this site's lock (or another instance's fresh certificate),
/// the self-check and the account (together), the order, the files.
async fn attempt(
    ctx: &Ctx,
    site: &str,
    names: &[String],
    store: &SiteStore,
    current: Option<&Loaded>,
    replaces: Option<acme::CertificateId>,
    shutdown: &Shutdown,
) -> Result<(Loaded, u64), Failure> {
    let root = ctx.store.clone();
    blocking(move || root.prepare()).await?;
    let _lock = lock(site, store).await?;
    let lease = match &ctx.cluster {
        None => None,
        Some(shared) => match cluster_lock(ctx, shared, site, names, store, current).await? {
            Clustered::Found(loaded, fence) => return Ok((loaded, fence)),
            Clustered::Held(lease) => Some(lease),
        },
    };
    let ordered = order(ctx, site, names, store, current, replaces, shutdown).await;
    let (Some(shared), Some(lease)) = (&ctx.cluster, lease) else {
        return ordered.map(|(loaded, _)| (loaded, 0));
    };
    let first = names.first().map_or("", String::as_str);
    let fence = lease.fence;
    let result = match ordered {
        Ok((loaded, None)) => Ok((loaded, 0)),
        Ok((loaded, Some(issued))) => {
            if shared
                .save_cert(&ctx.ca, first, &lease, &issued.chain_pem, &issued.key_pem)
                .await
            {
                tracing::info!(site, fence, "ACME certificate stored in the cluster");
            } else {
                // Served here all the same (it is valid); the others keep theirs, and the poll swaps in
                // whatever a newer holder stores.
                tracing::warn!(
                    site,
                    fence,
                    "the ACME certificate could not be stored in the cluster (Redis down, or a newer \
                     holder of the lock): only this node serves it"
                );
            }
            Ok((loaded, fence))
        }
        Err(e) => {
            // The nodes waiting on this lock (and those whose retry comes first) back off too, rather
            // than each try the same failing order in turn.
            shared
                .mark_failed(&ctx.ca, first, &describe(&e), schedule::RETRY_FIRST)
                .await;
            Err(e)
        }
    };
    lease.release().await;
    result
}

/// The order itself, with the site's locks held: another instance's fresh certificate in state_dir, else
/// the self-check and the account, the order, the files. `Some(issued)`: ordered here (for the cluster).
async fn order(
    ctx: &Ctx,
    site: &str,
    names: &[String],
    store: &SiteStore,
    current: Option<&Loaded>,
    replaces: Option<acme::CertificateId>,
    shutdown: &Shutdown,
) -> Result<(Loaded, Option<acme::Issued>), Failure> {
    // Another instance sharing state_dir may have just renewed these names: take its certificate.
    let s = store.clone();
    if let Ok(Some(stored)) = blocking(move || s.load()).await
        && current.is_none_or(|c| c.info.serial != stored.info.serial)
        && SystemTime::now() < schedule::renewal_time(&stored.info, ctx.settings.renew_before)
    {
        tracing::info!(
            site,
            "another instance stored a newer certificate for these names: using it"
        );
        return Ok((stored, None));
    }
    let check = async {
        if ctx.settings.self_check {
            self_check::run(&ctx.settings, &ctx.challenges, names, shutdown).await
        } else {
            Ok(())
        }
    };
    let (checked, account) = tokio::join!(
        check,
        ctx.account
            .get(&ctx.settings, &ctx.store, ctx.cluster.as_ref())
    );
    checked?;
    let account = account?;
    let kind = match ctx.settings.challenge {
        AcmeChallenge::Http01 => "http-01",
        AcmeChallenge::TlsAlpn01 => "tls-alpn-01",
    };
    tracing::info!(site, names = ?names, challenge = kind, "ACME order");
    let issued = match acme::obtain(
        &account,
        names,
        ctx.settings.challenge,
        &ctx.challenges,
        replaces,
    )
    .await
    {
        Ok(i) => i,
        Err(e) => {
            ctx.account
                .forget_if_unknown(&ctx.store, ctx.cluster.as_ref(), &e)
                .await;
            return Err(e.into());
        }
    };
    let (s, chain, key) = (
        store.clone(),
        issued.chain_pem.clone(),
        issued.key_pem.clone(),
    );
    let loaded = blocking(move || s.save(&chain, &key)).await?;
    Ok((loaded, Some(issued)))
}

/// What the cluster's lock gave an attempt.
enum Clustered {
    /// Another node's fresh certificate (and its fence): nothing to order.
    Found(Loaded, u64),
    /// The lock: this node orders.
    Held(crate::cluster::acme::Lease),
}

/// `[cluster]`: a fresh certificate another node stored, else this site's lock in Redis, waiting while
/// another node holds it (it renews its lease while it orders; a dead holder's lease runs out). Redis down:
/// `ClusterDown` (nothing ordered alone).
async fn cluster_lock(
    ctx: &Ctx,
    shared: &Arc<SharedAcme>,
    site: &str,
    names: &[String],
    store: &SiteStore,
    current: Option<&Loaded>,
) -> Result<Clustered, Failure> {
    let first = names.first().map_or("", String::as_str);
    // At start Redis may not be connected yet (or it just came back): give it a moment before calling it
    // down.
    let started = tokio::time::Instant::now();
    while !shared.is_up() && started.elapsed() < FIRST_CONNECT {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut said = false;
    // The fence of the certificate already looked at: not fetched again while it stays.
    let mut seen = 0u64;
    loop {
        if let Some(why) = shared.failed_elsewhere(&ctx.ca, first).await {
            return Err(Failure::Cluster(format!(
                "another node's attempt for these names failed ({why}): not tried again before its backoff"
            )));
        }
        if let Some(found) = fresh(ctx, shared, names, store, current, &mut seen).await? {
            if said {
                tracing::info!(
                    site,
                    "another node stored the certificate for these names: using it"
                );
            }
            return Ok(found);
        }
        match shared.try_lock(&ctx.ca, first).await {
            Err(()) => return Err(Failure::ClusterDown),
            Ok(Some(lease)) => {
                // Stored just before the lock was ours?
                if let Some(found) = fresh(ctx, shared, names, store, current, &mut seen).await? {
                    lease.release().await;
                    return Ok(found);
                }
                tracing::info!(
                    site,
                    fence = lease.fence,
                    "holding the cluster's ACME lock for these names"
                );
                return Ok(Clustered::Held(lease));
            }
            Ok(None) => {
                if !said {
                    said = true;
                    tracing::info!(
                        site,
                        "another node is ordering these names (cluster lock): waiting for it"
                    );
                }
                tokio::time::sleep(LOCK_POLL).await;
            }
        }
    }
}

/// The cluster's certificate for these names when it is new here and not yet due for renewal (`seen`: the
/// fence last looked at, updated). `Err` when one is stored that this node cannot open: nothing is ordered
/// over it.
async fn fresh(
    ctx: &Ctx,
    shared: &SharedAcme,
    names: &[String],
    store: &SiteStore,
    current: Option<&Loaded>,
    seen: &mut u64,
) -> Result<Option<Clustered>, Failure> {
    let Some((picked, fence)) = pick_up(ctx, shared, names, store, current, *seen).await else {
        return Ok(None);
    };
    *seen = fence;
    let loaded = match picked {
        Picked::New(loaded) => loaded,
        Picked::Nothing => return Ok(None),
        Picked::Foreign => {
            return Err(Failure::Cluster(
                "the cluster's certificate for these names does not open with this node's \
                 cluster.key_file (the same file must be on every node): nothing is ordered over it"
                    .into(),
            ));
        }
    };
    Ok(
        (SystemTime::now() < schedule::renewal_time(&loaded.info, ctx.settings.renew_before))
            .then_some(Clustered::Found(loaded, fence)),
    )
}

/// This site's lock file, waiting (bounded) while another instance orders the same names.
async fn lock(site: &str, store: &SiteStore) -> Result<acme::Lock, Failure> {
    let started = tokio::time::Instant::now();
    let mut said = false;
    loop {
        let s = store.clone();
        if let Some(l) = blocking(move || s.lock()).await? {
            return Ok(l);
        }
        if !said {
            said = true;
            tracing::info!(
                site,
                "another instance is ordering these names (state_dir lock): waiting for it"
            );
        }
        if started.elapsed() >= LOCK_WAIT {
            return Err(Failure::Locked(LOCK_WAIT));
        }
        tokio::time::sleep(LOCK_POLL).await;
    }
}

async fn ask_ari(ctx: &Ctx, current: &Loaded) -> Result<Option<Ari>, Failure> {
    let Some(leaf) = current.key.cert.first() else {
        return Ok(None);
    };
    let account = ctx
        .account
        .get(&ctx.settings, &ctx.store, ctx.cluster.as_ref())
        .await?;
    Ok(acme::ari(&account, leaf.as_ref()).await?)
}

/// A certificate is in place: the failed attempts recorded for the site are forgotten, in memory and on disk.
async fn forget_retry(store: &SiteStore, retry: &mut Option<Retry>) {
    if retry.take().is_some() {
        let s = store.clone();
        let _ = blocking(move || {
            s.clear_retry();
            Ok(())
        })
        .await;
    }
}
