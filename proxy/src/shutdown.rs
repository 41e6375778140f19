//! Shutdown as a value passed down: every accept loop and connection holds a [`Shutdown`]; the [`Trigger`]
//! in `main` begins it and then waits until every holder has dropped its copy (all connections drained).

use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

impl Shutdown {
    /// Resolves once shutdown has begun (at once if it already has).
    pub async fn begun(&mut self) {
        // An error means the trigger is gone, which only happens when the process is ending anyway.
        let _ = self.rx.wait_for(|begun| *begun).await;
    }
}

#[derive(Debug)]
pub struct Trigger {
    tx: watch::Sender<bool>,
}

impl Trigger {
    pub fn new() -> (Trigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (Trigger { tx }, Shutdown { rx })
    }

    pub fn begin(&self) {
        self.tx.send_replace(true);
    }

    /// Resolves when every `Shutdown` (every listener and connection) has been dropped.
    pub async fn drained(&self) {
        self.tx.closed().await;
    }
}
