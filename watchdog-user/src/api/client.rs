//! The client side of the control socket: one request, one response, and the one-line
//! reasons a client cannot reach the daemon.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
};

use anyhow::{Context as _, Result, anyhow};

use crate::api::protocol::{Reply, Request, Response};

/// Why the CLI cannot reach the daemon, in one line naming the fix.
fn cannot_connect(socket: &Path, err: &std::io::Error) -> anyhow::Error {
    if err.kind() != std::io::ErrorKind::PermissionDenied {
        return anyhow!(
            "no watchdog daemon at {} ({err}): start one with `watchdog-user run` \
             (or `cargo xtask run`), or point --socket / WATCHDOG_SOCKET at a running one",
            socket.display()
        );
    }
    use std::os::unix::fs::MetadataExt as _;
    let gid = std::fs::metadata(socket).map(|m| m.gid()).ok();
    match gid {
        Some(0) | None => anyhow!(
            "permission denied on the watchdog socket {}: it is root-only (the daemon found \
             no socket group; its log says which): run as root, or ask an admin to create the \
             group (`groupadd --system watchdog`), restart the daemon and add you to it",
            socket.display()
        ),
        Some(gid) => {
            let group = crate::api::access::group_name(gid).unwrap_or_else(|| gid.to_string());
            anyhow!(
                "permission denied on the watchdog socket {}: only root and members of group \
                 {group:?} may use it, and you are not one: ask an admin to add you \
                 (`usermod -aG {group} $USER`, then log in again)",
                socket.display()
            )
        }
    }
}

/// Sends one request and waits for its response (the CLI side).
pub fn call(socket: &Path, request: &Request) -> Result<Reply> {
    let stream = UnixStream::connect(socket).map_err(|e| cannot_connect(socket, &e))?;
    let mut line = serde_json::to_string(request).expect("requests serialize");
    line.push('\n');
    (&stream)
        .write_all(line.as_bytes())
        .with_context(|| format!("sending to {}", socket.display()))?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .with_context(|| format!("reading the answer from {}", socket.display()))?;
    if answer.is_empty() {
        return Err(anyhow!(
            "the daemon at {} closed the connection without answering",
            socket.display()
        ));
    }
    match serde_json::from_str(&answer).context("the daemon sent an answer this CLI cannot read")? {
        Response::Ok(reply) => Ok(reply),
        Response::Error(message) => Err(anyhow!(message)),
    }
}
