//! sd_notify(3): tells systemd (`Type=notify`) that we are ready, reloading or stopping, and pings its
//! watchdog. Without `NOTIFY_SOCKET` in the environment every call does nothing. A failed notification is
//! logged, never fatal: serving matters more than telling. (Not to be confused with the `notify` crate,
//! which watches certificate files for `reload`.)

use std::time::Duration;

use sd_notify::NotifyState;

use crate::shutdown::Shutdown;

/// `READY=1`: every listener accepts. Also sent after a reload, following [`reloading`].
pub fn ready() {
    send(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

/// `RELOADING=1`, with the `MONOTONIC_USEC` systemd 253 and later require; follow it with [`ready`].
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[
            NotifyState::Reloading,
            now,
            NotifyState::Status("reloading"),
        ]),
        Err(e) => {
            tracing::warn!("sd_notify: cannot read the monotonic clock: {e}");
            send(&[NotifyState::Reloading, NotifyState::Status("reloading")]);
        }
    }
}

/// `STOPPING=1`: no new connections; draining.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

/// The watchdog interval systemd expects pings within (`WATCHDOG_USEC`, for this process).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// Pings the watchdog at half its interval until the process exits: a wedged runtime stops the pings and
/// systemd restarts the service. When shutdown begins it lets go of its `shutdown` (the drain does not wait
/// for it) and keeps pinging through the drain, which may last longer than the watchdog's interval.
pub async fn watchdog(interval: Duration, mut shutdown: Shutdown) {
    let mut tick = tokio::time::interval(interval / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => send(&[NotifyState::Watchdog]),
            () = shutdown.begun() => break,
        }
    }
    drop(shutdown);
    loop {
        tick.tick().await;
        send(&[NotifyState::Watchdog]);
    }
}

fn send(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("sd_notify: {e}");
    }
}
