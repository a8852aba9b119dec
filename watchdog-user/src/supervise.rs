//! Talking to systemd (Type=notify): READY=1 once the programs are attached and the tree
//! is built, WATCHDOG=1 from the main loop (so a hung loop, not only a crash, gets the
//! daemon restarted), and STATUS= with counts. Without NOTIFY_SOCKET all are no-ops.

use std::time::Duration;

use sd_notify::NotifyState;

/// How often to send WATCHDOG=1: half of WatchdogSec, as systemd recommends.
pub fn heartbeat_every() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|limit| limit / 2)
}

fn send(states: &[NotifyState]) {
    if let Err(err) = sd_notify::notify(states) {
        tracing::warn!("sd_notify failed: {err}");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn heartbeat(status: &str) {
    send(&[NotifyState::Watchdog, NotifyState::Status(status)]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}
