//! Why an ACME attempt failed (logged, then retried with backoff), how an error is described in the log,
//! and the store's file operations run off the async threads, their errors turned into a [`Failure`].

use std::time::Duration;

use portcullis_certs::acme;

/// Waiting for another instance that holds a lock (a site's, or the account's): look every second, for up
/// to five minutes.
pub(super) const LOCK_POLL: Duration = Duration::from_secs(1);
pub(super) const LOCK_WAIT: Duration = Duration::from_secs(300);

/// Why one attempt failed; logged, then retried with backoff.
#[derive(Debug, thiserror::Error)]
pub(super) enum Failure {
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
    /// `[cluster]`: Redis cannot be asked now; orders wait for it (the node serves its last certificate).
    #[error(
        "the cluster's Redis is down: ordering waits for it, the last certificate is served meanwhile"
    )]
    ClusterDown,
    /// `[cluster]`: what Redis holds is not usable (another key_file, or not ours).
    #[error("cluster: {0}")]
    Cluster(String),
    /// A blocking file task did not finish (ours).
    #[error("file task failed: {0}")]
    Task(String),
}

/// An error and its sources, each said once ("client error (Connect): tcp connect error: Connection refused").
pub(super) fn describe(e: &(dyn std::error::Error + 'static)) -> String {
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

/// Runs a file operation of the store off the async threads.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, acme::Error> + Send + 'static,
) -> Result<T, Failure> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Failure::Acme),
        Err(e) => Err(Failure::Task(e.to_string())),
    }
}
