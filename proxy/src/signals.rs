//! The one place signals are taken: SIGTERM and SIGINT end [`Signals::until_stop`] (then `main` begins the
//! drain), each SIGHUP goes to every [`Reloads`] handed out by [`Signals::reloads`] (the certificate reloader
//! re-reads every pair; ACME sites waiting on a retry try now), and each SIGUSR1 to those of
//! [`Signals::reopens`] (the access log file). No other module installs a handler. A new signal is one more
//! stream here and one more channel for the tasks that want it.

use std::io;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;

/// The process's signal handlers, installed once at start (on the runtime); dispatched by `until_stop`.
#[derive(Debug)]
pub struct Signals {
    terminate: Signal,
    interrupt: Signal,
    hangup: Signal,
    user1: Signal,
    /// How many SIGHUPs so far; each `Reloads` wakes when it changes.
    reload: watch::Sender<u64>,
    /// How many SIGUSR1s so far.
    reopen: watch::Sender<u64>,
}

/// Which signal asked the process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Terminate,
    Interrupt,
}

/// One task's view of the reload requests (SIGHUP), or of the reopen requests (SIGUSR1). Requests that come while the task is busy are not
/// lost: the next [`Reloads::requested`] returns at once, once for all of them.
#[derive(Debug, Clone)]
pub struct Reloads(watch::Receiver<u64>);

impl Signals {
    /// Installs the handlers for SIGTERM, SIGINT, SIGHUP and SIGUSR1 (from here on SIGHUP and SIGUSR1 no
    /// longer end the process).
    pub fn install() -> io::Result<Signals> {
        Ok(Signals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            hangup: signal(SignalKind::hangup())?,
            user1: signal(SignalKind::user_defined1())?,
            reload: watch::channel(0).0,
            reopen: watch::channel(0).0,
        })
    }

    /// Reload requests from now on, for one task.
    pub fn reloads(&self) -> Reloads {
        Reloads(self.reload.subscribe())
    }

    /// Reopen requests (SIGUSR1) from now on, for one task.
    pub fn reopens(&self) -> Reloads {
        Reloads(self.reopen.subscribe())
    }

    /// Dispatches signals until SIGTERM or SIGINT: each SIGHUP (SIGUSR1) meanwhile goes to every
    /// [`Reloads`] of `reloads` (`reopens`).
    pub async fn until_stop(&mut self) -> Stop {
        loop {
            tokio::select! {
                Some(()) = self.terminate.recv() => return Stop::Terminate,
                Some(()) = self.interrupt.recv() => return Stop::Interrupt,
                Some(()) = self.hangup.recv() => self.reload.send_modify(|n| *n += 1),
                Some(()) = self.user1.recv() => self.reopen.send_modify(|n| *n += 1),
                // No stream can deliver again (the runtime is going away): nothing left to wait for.
                else => return Stop::Terminate,
            }
        }
    }
}

impl Reloads {
    /// Resolves at the next reload request not yet seen (never once the handlers are gone, which happens
    /// only as the process ends).
    pub async fn requested(&mut self) {
        if self.0.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Marks every request so far as seen: one that came while the task was doing what it asks for does
    /// not start it again.
    pub fn seen(&mut self) {
        self.0.borrow_and_update();
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    #[tokio::test]
    async fn a_reload_request_wakes_every_holder_once() {
        let (tx, rx) = watch::channel(0u64);
        let (mut a, mut b) = (Reloads(rx.clone()), Reloads(rx));
        tx.send_modify(|n| *n += 1);
        tx.send_modify(|n| *n += 1);
        a.requested().await;
        b.requested().await;
        // Two requests, one wake-up: the next waits for a third.
        assert!(a.requested().now_or_never().is_none());
        tx.send_modify(|n| *n += 1);
        // Seen while busy: it does not wake the task again.
        b.seen();
        assert!(b.requested().now_or_never().is_none());
        assert!(a.requested().now_or_never().is_some());
    }
}
