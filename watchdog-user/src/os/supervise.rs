//! Talking to systemd (Type=notify): READY=1 once the programs are attached and the tree
//! is built, WATCHDOG=1 from the main loop (so a hung loop, not only a crash, gets the
//! daemon restarted), and STATUS= with counts. Without NOTIFY_SOCKET all are no-ops.

use std::time::Duration;

use std::os::{
    linux::net::SocketAddrExt as _,
    unix::{ffi::OsStrExt as _, net::UnixDatagram},
};

use sd_notify::NotifyState;

/// How often to send WATCHDOG=1: half of WatchdogSec, as systemd recommends.
pub fn heartbeat_every() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|limit| limit / 2)
}

/// Sends without ever blocking: sd-notify's own send blocks when the receiver's queue
/// is full, and this is called from the main loop, which must never hang on it. A
/// message that does not fit is dropped (the next heartbeat follows).
fn send(states: &[NotifyState]) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let message: String = states.iter().map(|s| format!("{s}\n")).collect();
    let sent = (|| -> std::io::Result<()> {
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        let bytes = path.as_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(message.as_bytes(), &addr)?;
        } else {
            socket.send_to(message.as_bytes(), &path)?;
        }
        Ok(())
    })();
    if let Err(err) = sent {
        tracing::debug!("sd_notify message dropped: {err}");
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
