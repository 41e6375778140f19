//! Shutdown as a value passed down: every accept loop, connection and tunnel holds a [`Shutdown`]; the
//! [`Trigger`] in `main` begins it, with a deadline, and then waits until every holder has dropped its copy
//! (all connections drained) or the deadline passes. A site's own end is a value too: its tasks (OCSP,
//! ACME) hold a [`Retired`] that resolves once a config reload has dropped the site's [`Retire`].

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct Shutdown {
    /// `None` while serving; the drain's deadline once shutdown has begun.
    rx: watch::Receiver<Option<Instant>>,
}

impl Shutdown {
    /// Resolves once shutdown has begun (at once if it already has).
    pub async fn begun(&mut self) {
        // An error means the trigger is gone, which only happens when the process is ending anyway.
        let _ = self.rx.wait_for(Option::is_some).await;
    }

    /// Resolves at the drain's deadline: what is still open then is closed (the process exits).
    pub async fn deadline(&mut self) {
        let deadline = match self.rx.wait_for(Option::is_some).await {
            Ok(d) => *d,
            // The trigger is gone: the process is ending.
            Err(_) => None,
        };
        if let Some(d) = deadline {
            tokio::time::sleep_until(d).await;
        }
    }
}

#[derive(Debug)]
pub struct Trigger {
    tx: watch::Sender<Option<Instant>>,
}

impl Trigger {
    pub fn new() -> (Trigger, Shutdown) {
        let (tx, rx) = watch::channel(None);
        (Trigger { tx }, Shutdown { rx })
    }

    /// Begins shutdown; the drain lasts until every holder is done or `grace` has passed. Returns the
    /// deadline, which every holder sees too.
    pub fn begin(&self, grace: Duration) -> Instant {
        let deadline = Instant::now() + grace;
        self.tx.send_replace(Some(deadline));
        deadline
    }

    /// Resolves when every `Shutdown` (every listener, connection and tunnel) has been dropped.
    pub async fn drained(&self) {
        self.tx.closed().await;
    }
}

/// Held by the served site set for one site; dropping it (the site left the set) ends that site's tasks.
#[derive(Debug)]
pub struct Retire {
    /// Never sent on: only its drop is seen.
    _alive: watch::Sender<()>,
}

/// One site task's view of its site's end.
#[derive(Debug, Clone)]
pub struct Retired(watch::Receiver<()>);

/// A site's end, and the view its tasks hold of it.
pub fn retire() -> (Retire, Retired) {
    let (tx, rx) = watch::channel(());
    (Retire { _alive: tx }, Retired(rx))
}

impl Retired {
    /// Resolves once the site's [`Retire`] is dropped (at once if it already is).
    pub async fn wait(&mut self) {
        while self.0.changed().await.is_ok() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holders_see_the_beginning_and_wake_at_the_deadline() {
        let (trigger, mut shutdown) = Trigger::new();
        let mut other = shutdown.clone();
        let waiter = tokio::spawn(async move {
            other.begun().await;
            other.deadline().await;
            Instant::now()
        });
        let deadline = trigger.begin(Duration::from_millis(50));
        shutdown.begun().await;
        assert!(waiter.await.unwrap() >= deadline);
        drop(shutdown);
        trigger.drained().await;
    }

    #[tokio::test]
    async fn a_site_task_ends_when_its_site_is_dropped() {
        use futures_util::FutureExt;
        let (retire, mut retired) = retire();
        let mut other = retired.clone();
        assert!(retired.wait().now_or_never().is_none());
        drop(retire);
        retired.wait().await;
        other.wait().await;
    }
}
