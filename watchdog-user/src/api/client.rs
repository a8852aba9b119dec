//! The client side of the control socket: one request, one response, and the one-line
//! reasons a client cannot reach the daemon.

use std::{
    io::{BufRead as _, BufReader},
    os::unix::net::UnixStream,
    path::Path,
};

use anyhow::{Result, anyhow};

use crate::{
    api::protocol::{Reply, Request, Response},
    vocab::error::{Error, ErrorKind},
};

/// Why the CLI cannot reach the daemon, in one line naming the fix; of kind
/// [`ErrorKind::NoDaemon`].
fn cannot_connect(socket: &Path, err: &std::io::Error) -> anyhow::Error {
    Error::new(ErrorKind::NoDaemon, unreachable_reason(socket, err)).into()
}

fn unreachable_reason(socket: &Path, err: &std::io::Error) -> String {
    if err.kind() != std::io::ErrorKind::PermissionDenied {
        return format!(
            "no watchdog daemon at {} ({err}): start one with `watchdog-user run` \
             (or `cargo xtask run`), or point --socket / WATCHDOG_SOCKET at a running one",
            socket.display()
        );
    }
    use std::os::unix::fs::MetadataExt as _;
    let gid = std::fs::metadata(socket).map(|m| m.gid()).ok();
    match gid {
        Some(0) | None => format!(
            "permission denied on the watchdog socket {}: it is root-only (the daemon found \
             no socket group; its log says which): run as root, or ask an admin to create the \
             group (`groupadd --system watchdog`), restart the daemon and add you to it",
            socket.display()
        ),
        Some(gid) => {
            let group = crate::api::access::group_name(gid).unwrap_or_else(|| gid.to_string());
            format!(
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
    // A daemon that goes away mid-request is one that cannot answer now.
    let unavailable = |what: String| move |err| failed(ErrorKind::Unavailable, what, err);
    send_all(&stream, line.as_bytes())
        .map_err(unavailable(format!("sending to {}", socket.display())))?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(unavailable(format!(
            "reading the answer from {}",
            socket.display()
        )))?;
    if answer.is_empty() {
        return Err(Error::unavailable(format!(
            "the daemon at {} closed the connection without answering",
            socket.display()
        ))
        .into());
    }
    serde_json::from_str::<Response>(&answer)
        .map_err(|err| {
            failed(
                ErrorKind::Internal,
                "the daemon sent an answer this CLI cannot read".into(),
                err,
            )
        })?
        .into_result()
}

/// `err` after `what`, as `.context(what)` would say it, of kind `kind`.
fn failed(
    kind: ErrorKind,
    what: String,
    err: impl std::error::Error + Send + Sync + 'static,
) -> anyhow::Error {
    Error::new(kind, format!("{:#}", anyhow!(err).context(what))).into()
}

/// Writes all of `bytes` without raising SIGPIPE: the CLI runs with SIGPIPE's default
/// action (so that it stops quietly when its output pipe is closed), and a daemon that
/// closed the connection must give an error, not kill the CLI silently.
fn send_all(stream: &UnixStream, mut bytes: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    while !bytes.is_empty() {
        // SAFETY: the pointer and length are those of a live slice, only read.
        let sent = unsafe {
            libc::send(
                stream.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        match usize::try_from(sent) {
            Ok(n) => bytes = &bytes[n..],
            Err(_) => {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
    Ok(())
}
