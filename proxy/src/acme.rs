//! The ACME task and the listeners' side of the challenges. At start each `acme = true` site serves its
//! stored certificate, else its `cert`/`key` files, else a self-signed one ([`bootstrap`]); then one task per
//! site orders a certificate when there is none and renews when [`schedule`] says, swapping each new one
//! in through `Sites` exactly as a file reload does. Before an order: `state_dir` must be writable, and each
//! name must resolve to an address where this instance answers the challenge (the self-check), so that a
//! misconfiguration costs the CA nothing. Failures back off (persisted across restarts); SIGHUP retries at
//! once. The order loop, persistence and scheduling are `portcullis_certs::acme`'s; sockets are here.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use portcullis_certs::Loaded;
use portcullis_certs::acme::{
    self, ACME_TLS_ALPN, Account, Ari, Challenges, Retry, SiteStore, Store, schedule,
};
use portcullis_certs::inspect::format_time;
use portcullis_config::{AcmeChallenge, CertSource, Config};
use rustls::pki_types::pem::PemObject;
use rustls::server::ClientHello;
use tokio::net::TcpStream;
use tokio::sync::{Mutex, watch};

use crate::body::Body;
use crate::shutdown::Shutdown;
use crate::state::Shared;

const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";
/// One whole attempt (lock, self-check, account, order, download) gives up after this.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(600);
/// Waiting for another instance that holds a site's lock: look every second, for up to five minutes.
const LOCK_POLL: Duration = Duration::from_secs(1);
const LOCK_WAIT: Duration = Duration::from_secs(300);
/// Connecting to the CA's API.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// One self-check connection (resolve, connect, answer).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Sleeps are cut into pieces this long, so that a changed wall clock (suspend, NTP) is noticed.
const MAX_SLEEP: Duration = Duration::from_secs(3600);
/// ARI is asked again at the CA's Retry-After, within these bounds.
const ARI_MIN: Duration = Duration::from_secs(60);
const ARI_MAX: Duration = Duration::from_secs(24 * 3600);

/// HTTP-01 (RFC 8555 section 8.3): the key authorization for a pending token, as `text/plain`. `None`
/// for every other request (which the caller redirects as usual).
pub fn http01<B>(challenges: &Challenges, req: &Request<B>) -> Option<Response<Body>> {
    let token = req.uri().path().strip_prefix(CHALLENGE_PREFIX)?;
    let answer = challenges.http01(token)?;
    let mut res = Response::new(Body::full(answer));
    *res.status_mut() = StatusCode::OK;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Some(res)
}

/// TLS-ALPN-01 (RFC 8737): the config that answers this handshake, when it offers `acme-tls/1` for a name
/// with a pending validation.
pub fn tls_alpn01(
    challenges: &Challenges,
    hello: &ClientHello<'_>,
) -> Option<Arc<rustls::ServerConfig>> {
    let offered = hello.alpn()?.any(|p| p == ACME_TLS_ALPN);
    if !offered {
        return None;
    }
    challenges.tls_alpn01(hello.server_name()?)
}

/// The certificate an ACME site serves at start: the stored one when it is usable, else the configured
/// `files`, else a self-signed one for its names. Only the last can fail (and then start fails).
pub fn bootstrap(
    config: &Config,
    site: usize,
    names: &[String],
    files: Option<&(PathBuf, PathBuf)>,
) -> Result<Loaded, portcullis_certs::Error> {
    if let Some(settings) = &config.acme {
        let store = Store::new(settings).site(names);
        match store.load() {
            Ok(Some(loaded)) => {
                tracing::info!(site, names = ?names, "serving the stored ACME certificate");
                return Ok(loaded);
            }
            Ok(None) => {}
            Err(e) => {
                // Stored for fewer names (one was added): it still serves those until the new one arrives.
                if let Ok(loaded) =
                    portcullis_certs::load_checked(&store.cert_path(), &store.key_path(), &[])
                {
                    tracing::warn!(
                        site,
                        "serving the stored ACME certificate until a new one is ordered: {e}"
                    );
                    return Ok(loaded);
                }
                tracing::warn!(
                    site,
                    "stored ACME certificate not served, a new one will be ordered: {e}"
                );
            }
        }
    }
    if let Some((cert, key)) = files {
        match portcullis_certs::load_checked(cert, key, names) {
            Ok(loaded) => {
                tracing::info!(
                    site,
                    "serving the configured cert/key files until the first ACME certificate"
                );
                return Ok(loaded);
            }
            Err(e) => tracing::warn!(site, "configured cert/key not served: {e}"),
        }
    }
    let loaded = portcullis_certs::self_signed_loaded(names)?;
    tracing::info!(site, names = ?names, "serving a self-signed certificate until the first ACME certificate");
    Ok(loaded)
}

/// `portcullis check`, for one site: the account, the stored certificate's expiry and the next renewal.
pub fn report_site(config: &Config, site: &portcullis_config::Site) -> Vec<String> {
    match (&config.acme, &site.tls) {
        (Some(settings), CertSource::Acme { .. }) => acme::report(settings, &site.names),
        _ => Vec::new(),
    }
}

/// Runs every ACME site's task until shutdown. SIGHUP asks every site that waits on a retry to try now.
pub async fn run(state: Arc<Shared>, mut shutdown: Shutdown) {
    let snap = state.snapshot();
    let Some(settings) = snap.config.acme.clone() else {
        return;
    };
    let sites: Vec<(usize, Vec<String>)> = snap
        .config
        .sites
        .iter()
        .enumerate()
        .filter(|(_, s)| matches!(s.tls, CertSource::Acme { .. }))
        .map(|(i, s)| (i, s.names.clone()))
        .collect();
    if sites.is_empty() {
        return;
    }
    let (hup_tx, hup_rx) = watch::channel(0u64);
    let ctx = Arc::new(Ctx {
        store: Store::new(&settings),
        settings,
        state,
        account: Mutex::new(None),
    });
    for (site, names) in sites {
        tokio::spawn(site_task(
            ctx.clone(),
            site,
            names,
            shutdown.clone(),
            hup_rx.clone(),
        ));
    }
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("ACME: no SIGHUP retries: {e}");
            return;
        }
    };
    loop {
        tokio::select! {
            Some(()) = hup.recv() => hup_tx.send_modify(|n| *n += 1),
            () = shutdown.begun() => return,
        }
    }
}

/// What every site's task shares: the settings, the store, the proxy's state, and the one account.
struct Ctx {
    settings: portcullis_config::Acme,
    store: Store,
    state: Arc<Shared>,
    /// Loaded or created on first use; cleared when the CA no longer knows it.
    account: Mutex<Option<Account>>,
}

/// Why one attempt failed; logged, then retried with backoff.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Acme(#[from] acme::Error),
    /// A name does not lead to this instance (the operator's: DNS, firewall, another server).
    #[error("self-check failed, nothing ordered: {0}")]
    SelfCheck(String),
    #[error("gave up after {}s", .0.as_secs())]
    Timeout(Duration),
    /// Another instance sharing state_dir has been ordering these names for too long.
    #[error("another instance has held the lock for these names for {}s", .0.as_secs())]
    Locked(Duration),
    /// A blocking file task did not finish (ours).
    #[error("file task failed: {0}")]
    Task(String),
}

/// One site: order when there is no certificate, renew when due, back off on failure, until shutdown.
async fn site_task(
    ctx: Arc<Ctx>,
    site: usize,
    names: Vec<String>,
    mut shutdown: Shutdown,
    mut hup: watch::Receiver<u64>,
) {
    let store = ctx.store.site(&names);
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
        && ctx
            .state
            .sites
            .current(site)
            .is_none_or(|served| served.cert.first() != c.key.cert.first())
    {
        ctx.state.sites.swap(site, c.key.clone());
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
            let wake = ari_next
                .map_or(when, |a| when.min(a))
                .duration_since(now)
                .unwrap_or_default()
                .min(MAX_SLEEP);
            let forced = tokio::select! {
                () = tokio::time::sleep(wake) => false,
                r = hup.changed() => r.is_ok(),
                () = shutdown.begun() => return,
            };
            if !forced && SystemTime::now() < when {
                continue;
            }
        }
        planned = None;
        let replaces = ari.as_ref().map(|(a, _)| a.id.clone());
        let outcome = tokio::select! {
            r = tokio::time::timeout(ATTEMPT_TIMEOUT, attempt(&ctx, site, &names, &store, current.as_ref(), replaces)) => {
                r.unwrap_or(Err(Failure::Timeout(ATTEMPT_TIMEOUT)))
            }
            () = shutdown.begun() => return,
        };
        // A SIGHUP during the attempt asked for what just happened: it does not start another.
        hup.borrow_and_update();
        match outcome {
            Ok(loaded) => {
                ctx.state.sites.swap(site, loaded.key.clone());
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
                if retry.take().is_some() {
                    let s = store.clone();
                    let _ = blocking(move || {
                        s.clear_retry();
                        Ok(())
                    })
                    .await;
                }
            }
            Err(e) => {
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

/// One attempt: state_dir writable, this site's lock (or another instance's fresh certificate),
/// the self-check and the account (together), the order, the files.
async fn attempt(
    ctx: &Ctx,
    site: usize,
    names: &[String],
    store: &SiteStore,
    current: Option<&Loaded>,
    replaces: Option<acme::CertificateId>,
) -> Result<Loaded, Failure> {
    let root = ctx.store.clone();
    blocking(move || root.prepare()).await?;
    let _lock = lock(site, store).await?;
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
        return Ok(stored);
    }
    let check = async {
        if ctx.settings.self_check {
            self_check(ctx, names).await
        } else {
            Ok(())
        }
    };
    let (checked, account) = tokio::join!(check, account(ctx));
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
        &ctx.state.challenges,
        replaces,
    )
    .await
    {
        Ok(i) => i,
        Err(e) => {
            forget_unknown_account(ctx, &e).await;
            return Err(e.into());
        }
    };
    let s = store.clone();
    blocking(move || s.save(&issued.chain_pem, &issued.key_pem)).await
}

/// This site's lock file, waiting (bounded) while another instance orders the same names.
async fn lock(site: usize, store: &SiteStore) -> Result<acme::Lock, Failure> {
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

/// The account: loaded from state_dir, else created (under the account lock, so once across instances).
async fn account(ctx: &Ctx) -> Result<Account, Failure> {
    let mut slot = ctx.account.lock().await;
    if let Some(a) = slot.as_ref() {
        return Ok(a.clone());
    }
    let started = tokio::time::Instant::now();
    let _lock = loop {
        let root = ctx.store.clone();
        if let Some(l) = blocking(move || root.lock_account()).await? {
            break l;
        }
        if started.elapsed() >= LOCK_WAIT {
            return Err(Failure::Locked(LOCK_WAIT));
        }
        tokio::time::sleep(LOCK_POLL).await;
    };
    let root = ctx.store.clone();
    let stored = match blocking(move || root.account()).await {
        Ok(s) => s,
        Err(Failure::Acme(e @ acme::Error::Corrupt { .. })) => {
            tracing::warn!("ACME account file unusable, creating a new account: {e}");
            None
        }
        Err(e) => return Err(e),
    };
    let ca_root = ctx.settings.ca_root.clone();
    let http = blocking(move || http_client(ca_root.as_deref())).await?;
    let account = match stored {
        Some(stored) => {
            let id = stored.id.clone();
            let a = acme::restore_account(stored, http).await?;
            tracing::info!(account = %id, "ACME account restored from state_dir");
            a
        }
        None => {
            let (a, stored) = acme::create_account(&ctx.settings, http).await?;
            let root = ctx.store.clone();
            blocking(move || root.save_account(&stored)).await?;
            tracing::info!(account = %a.id(), directory = %ctx.settings.directory, "ACME account created");
            a
        }
    };
    *slot = Some(account.clone());
    Ok(account)
}

/// The client instant-acme talks to the CA through: our crypto provider, `ca_root` (every certificate in
/// it) or the system's roots, TCP_NODELAY (small JWS POSTs must not wait on delayed ACKs), a connect timeout.
fn http_client(
    ca_root: Option<&std::path::Path>,
) -> Result<Box<dyn acme::HttpClient>, acme::Error> {
    let provider = portcullis_certs::provider();
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let builder = match ca_root {
        Some(path) => {
            let bad = |why: String| acme::Error::Corrupt {
                path: path.to_owned(),
                why,
            };
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls::pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| bad(format!("acme.ca_root: {e}")))?
            {
                roots
                    .add(c.map_err(|e| bad(format!("acme.ca_root: {e}")))?)
                    .map_err(|e| bad(format!("acme.ca_root: {e}")))?;
            }
            if roots.is_empty() {
                return Err(bad("acme.ca_root: no PEM certificate in it".into()));
            }
            let tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| acme::Error::Generate(format!("a TLS client config: {e}")))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            builder.with_tls_config(tls)
        }
        None => builder
            .with_provider_and_platform_verifier(provider)
            .map_err(|e| {
                acme::Error::Generate(format!("a TLS client config with the system's roots: {e}"))
            })?,
    };
    let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let connector = builder.https_only().enable_http1().wrap_connector(tcp);
    let client: hyper_util::client::legacy::Client<_, acme::BodyWrapper<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(connector);
    Ok(Box::new(client))
}

/// The CA forgot the account (a test CA restarted, or it was deactivated): the next attempt makes a new one.
async fn forget_unknown_account(ctx: &Ctx, e: &acme::Error) {
    if e.is_unknown_account() {
        tracing::warn!(
            "the CA does not know the stored ACME account: a new one is created at the next attempt"
        );
        *ctx.account.lock().await = None;
        let root = ctx.store.clone();
        let _ = blocking(move || root.forget_account()).await;
    }
}

async fn ask_ari(ctx: &Ctx, current: &Loaded) -> Result<Option<Ari>, Failure> {
    let Some(leaf) = current.key.cert.first() else {
        return Ok(None);
    };
    let account = account(ctx).await?;
    Ok(acme::ari(&account, leaf.as_ref()).await?)
}

/// Every name must resolve, and every address it resolves to that accepts a connection on the validation
/// port must be this instance answering a probe challenge: the CA would reach the same place.
async fn self_check(ctx: &Ctx, names: &[String]) -> Result<(), Failure> {
    let port = ctx
        .settings
        .validation_port
        .unwrap_or(match ctx.settings.challenge {
            AcmeChallenge::Http01 => 80,
            AcmeChallenge::TlsAlpn01 => 443,
        });
    let results =
        futures_util::future::join_all(names.iter().map(|n| check_name(ctx, n, port))).await;
    let problems: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Failure::SelfCheck(problems.join("; ")))
    }
}

async fn check_name(ctx: &Ctx, name: &str, port: u16) -> Result<(), String> {
    let mut addrs: Vec<SocketAddr> = match name.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => {
            match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::lookup_host((name, port))).await {
                Ok(Ok(a)) => a.collect(),
                Ok(Err(e)) => return Err(format!("{name} does not resolve: {e}")),
                Err(_) => return Err(format!("{name} does not resolve: timed out")),
            }
        }
    };
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(format!("{name} does not resolve to any address"));
    }
    let mut answered = false;
    let mut unreachable = Vec::new();
    for addr in addrs {
        let probe = match ctx.settings.challenge {
            AcmeChallenge::Http01 => probe_http01(ctx, name, addr).await,
            AcmeChallenge::TlsAlpn01 => probe_tls_alpn01(ctx, name, addr).await,
        };
        match probe {
            Ok(true) => answered = true,
            Ok(false) => {
                return Err(format!(
                    "{name} at {addr} is answered by another server, not this one"
                ));
            }
            Err(e) => unreachable.push(format!("{addr}: {e}")),
        }
    }
    if answered {
        if !unreachable.is_empty() {
            tracing::warn!(
                name,
                "self-check: some addresses do not answer ({}); the CA may try them",
                unreachable.join(", ")
            );
        }
        Ok(())
    } else {
        Err(format!(
            "{name}: no address answers on port {port} ({})",
            unreachable.join(", ")
        ))
    }
}

/// GETs a fresh probe token from `addr` as the CA would; true when this instance answered it.
async fn probe_http01(ctx: &Ctx, name: &str, addr: SocketAddr) -> Result<bool, String> {
    let token = random_hex();
    let answer = random_hex();
    let _pending = ctx.state.challenges.answer_http01(&token, &answer);
    let host = match name.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
        _ => name.to_owned(),
    };
    let exchange = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::get(format!("{CHALLENGE_PREFIX}{token}"))
            .header(header::HOST, host)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let res = send.send_request(req).await.map_err(|e| e.to_string())?;
        let status = res.status();
        let body = Limited::new(res.into_body(), 4096)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(status == StatusCode::OK && body == answer.as_bytes())
    };
    tokio::time::timeout(PROBE_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err("timed out".to_owned()))
}

/// An `acme-tls/1` handshake with a fresh probe certificate installed; true when this instance showed it.
async fn probe_tls_alpn01(ctx: &Ctx, name: &str, addr: SocketAddr) -> Result<bool, String> {
    let mut pending = ctx.state.challenges.pending();
    let mut digest = [0u8; 32];
    let _ = portcullis_certs::provider().secure_random.fill(&mut digest);
    let ours = pending
        .add_tls_alpn01(name, &digest)
        .map_err(|e| e.to_string())?;
    let verifier = Arc::new(CompareOnly {
        provider: portcullis_certs::provider(),
        expected: ours.clone(),
        shown: std::sync::Mutex::new(None),
    });
    // TLS 1.3 only: its signature can be checked against the raw key of the certificate we installed.
    let mut config = rustls::ClientConfig::builder_with_provider(portcullis_certs::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    let server_name =
        rustls::pki_types::ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
    let exchange = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(server_name, tcp)
            .await
            .map_err(|e| e.to_string())
    };
    let handshake = tokio::time::timeout(PROBE_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err("timed out".to_owned()));
    let shown = verifier
        .shown
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    match (handshake, shown) {
        (Ok(_), Some(leaf)) => Ok(leaf == ours.der),
        (Err(_), Some(leaf)) if leaf != ours.der => Ok(false),
        (Err(e), _) => Err(e),
        (Ok(_), None) => Err("no certificate shown".to_owned()),
    }
}

/// Not verification: the self-check trusts nothing it is shown, it only records the certificate and
/// compares it with the one it installed a moment before. The handshake signature is still checked, with
/// that certificate's key.
#[derive(Debug)]
struct CompareOnly {
    provider: Arc<rustls::crypto::CryptoProvider>,
    expected: acme::ChallengeCert,
    shown: std::sync::Mutex<Option<Vec<u8>>>,
}

impl rustls::client::danger::ServerCertVerifier for CompareOnly {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.shown.lock().unwrap_or_else(|p| p.into_inner()) = Some(end_entity.to_vec());
        if end_entity.as_ref() == self.expected.der.as_slice() {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("not the probe certificate".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "the self-check speaks TLS 1.3 only".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        // Only reached once `verify_server_cert` has accepted the certificate we installed.
        let spki = rustls::pki_types::SubjectPublicKeyInfoDer::from(self.expected.spki.as_slice());
        rustls::crypto::verify_tls13_signature_with_raw_key(
            message,
            &spki,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// An error and its sources, each said once ("client error (Connect): tcp connect error: Connection refused").
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = s.source();
    }
    out
}

fn random_hex() -> String {
    let mut b = [0u8; 16];
    // A failing system RNG leaves zeros: a guessable probe token, which only a self-check ever uses.
    let _ = portcullis_certs::provider().secure_random.fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs a file operation of the store off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, acme::Error> + Send + 'static,
) -> Result<T, Failure> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Failure::Acme),
        Err(e) => Err(Failure::Task(e.to_string())),
    }
}
