//! The one ACME account every site orders with: loaded from `state_dir`, else created once (under a lock
//! shared with other instances), forgotten when the CA no longer knows it. With `[cluster]` it is the
//! cluster's: taken from Redis (and kept in `state_dir` too), else made once under the cluster's account
//! lock (a node's existing local account is the one shared). And the HTTPS client that talks to the CA (our
//! crypto provider, `ca_root` or the system's roots).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use portcullis_certs::acme::{self, Account, Store};
use rustls::pki_types::pem::PemObject;
use tokio::sync::Mutex;

use super::failure::{Failure, LOCK_POLL, LOCK_WAIT, blocking};
use crate::cluster::acme::SharedAcme;

/// Connecting to the CA's API.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The account, once loaded or created; empty again when the CA no longer knows it.
#[derive(Default)]
pub(super) struct AccountSlot(Mutex<Option<Account>>);

impl AccountSlot {
    /// The account: loaded from state_dir, else created (under the account lock, so once across instances).
    pub(super) async fn get(
        &self,
        settings: &portcullis_config::Acme,
        store: &Store,
        cluster: Option<&Arc<SharedAcme>>,
    ) -> Result<Account, Failure> {
        let mut slot = self.0.lock().await;
        if let Some(a) = slot.as_ref() {
            return Ok(a.clone());
        }
        let account = match cluster {
            Some(shared) => from_cluster(settings, store, shared).await?,
            None => local(settings, store).await?,
        };
        *slot = Some(account.clone());
        Ok(account)
    }

    /// The CA forgot the account (a test CA restarted, or it was deactivated): the next attempt makes a new one.
    pub(super) async fn forget_if_unknown(
        &self,
        store: &Store,
        cluster: Option<&Arc<SharedAcme>>,
        e: &acme::Error,
    ) {
        if e.is_unknown_account() {
            tracing::warn!(
                "the CA does not know the stored ACME account: a new one is created at the next attempt"
            );
            *self.0.lock().await = None;
            if let Some(shared) = cluster {
                shared.forget_account(&store.ca()).await;
            }
            let root = store.clone();
            let _ = blocking(move || root.forget_account()).await;
        }
    }
}

/// The cluster's account: from Redis, else (under the cluster's account lock) this node's local one or a
/// new one, written to Redis for the others. Redis down: `Failure::ClusterDown` (no order meanwhile).
async fn from_cluster(
    settings: &portcullis_config::Acme,
    store: &Store,
    shared: &Arc<SharedAcme>,
) -> Result<Account, Failure> {
    let ca = store.ca();
    let started = tokio::time::Instant::now();
    loop {
        if let Some(opened) = shared.account(&ca).await {
            let json = opened.map_err(|_| {
                Failure::Cluster(
                    "the shared ACME account does not open with this node's cluster.key_file (the same \
                     file must be on every node): nothing is ordered over it"
                        .into(),
                )
            })?;
            let stored: acme::StoredAccount = serde_json::from_slice(&json)
                .map_err(|e| Failure::Cluster(format!("the shared account: {e}")))?;
            let id = stored.id.clone();
            // This node's copy: what it restarts with while Redis is down.
            let copy: acme::StoredAccount = serde_json::from_slice(&json)
                .map_err(|e| Failure::Cluster(format!("the shared account: {e}")))?;
            let root = store.clone();
            blocking(move || root.prepare().and_then(|()| root.save_account(&copy))).await?;
            let ca_root = settings.ca_root.clone();
            let http = blocking(move || http_client(ca_root.as_deref())).await?;
            let a = acme::restore_account(stored, http).await?;
            tracing::info!(account = %id, "ACME account taken from the cluster");
            return Ok(a);
        }
        if !shared.is_up() {
            return Err(Failure::ClusterDown);
        }
        match shared.try_lock(&ca, "account").await {
            Err(()) => return Err(Failure::ClusterDown),
            Ok(Some(lease)) => {
                // Stored by another node just before the lock was ours?
                if shared.account(&ca).await.is_some() {
                    lease.release().await;
                    continue;
                }
                let result = async {
                    let account = local(settings, store).await?;
                    let root = store.clone();
                    let stored = blocking(move || root.account()).await?;
                    let json = stored
                        .map(|s| serde_json::to_vec(&s))
                        .transpose()
                        .map_err(|e| Failure::Cluster(e.to_string()))?;
                    match json {
                        Some(j) if shared.save_account(&ca, &j).await => {
                            tracing::info!(account = %account.id(), "ACME account shared with the cluster");
                            Ok(account)
                        }
                        _ => Err(Failure::ClusterDown),
                    }
                }
                .await;
                lease.release().await;
                return result;
            }
            Ok(None) => {
                if started.elapsed() >= LOCK_WAIT {
                    return Err(Failure::Locked(LOCK_WAIT));
                }
                tokio::time::sleep(LOCK_POLL).await;
            }
        }
    }
}

/// This node's account: loaded from state_dir, else created (under the account lock, so once across
/// instances sharing it).
async fn local(settings: &portcullis_config::Acme, store: &Store) -> Result<Account, Failure> {
    let started = tokio::time::Instant::now();
    let _lock = loop {
        let root = store.clone();
        if let Some(l) = blocking(move || root.lock_account()).await? {
            break l;
        }
        if started.elapsed() >= LOCK_WAIT {
            return Err(Failure::Locked(LOCK_WAIT));
        }
        tokio::time::sleep(LOCK_POLL).await;
    };
    let root = store.clone();
    let stored = match blocking(move || root.account()).await {
        Ok(s) => s,
        Err(Failure::Acme(e @ acme::Error::Corrupt { .. })) => {
            tracing::warn!("ACME account file unusable, creating a new account: {e}");
            None
        }
        Err(e) => return Err(e),
    };
    let ca_root = settings.ca_root.clone();
    let http = blocking(move || http_client(ca_root.as_deref())).await?;
    let account = match stored {
        Some(stored) => {
            let id = stored.id.clone();
            let a = acme::restore_account(stored, http).await?;
            tracing::info!(account = %id, "ACME account restored from state_dir");
            a
        }
        None => {
            let (a, stored) = acme::create_account(settings, http).await?;
            let root = store.clone();
            blocking(move || root.save_account(&stored)).await?;
            tracing::info!(account = %a.id(), directory = %settings.directory, "ACME account created");
            a
        }
    };
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
