//! The control socket: accepts connections, parses request lines, hands each request to
//! the daemon loop and writes its response back.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use crate::{
    access::Peer,
    protocol::{Request, Response},
};

/// A request on its way to the daemon loop, with who sent it (the connection's peer
/// credentials, read at accept) and where to send the answer.
pub type Call = (Request, Peer, oneshot::Sender<Response>);

/// Binds the socket (mode 0660, parent directory created). A leftover socket file with
/// no daemon behind it is replaced; a live daemon's socket is not.
pub async fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the socket directory {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            bail!(
                "another watchdog daemon is already serving {}: stop it, or give this one \
                 its own --socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting mode 0660 on {}", path.display()))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, calls: mpsc::Sender<Call>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let peer = Peer::of(&stream);
                tokio::spawn(connection(stream, peer, calls.clone()));
            }
            Err(err) => tracing::warn!("control socket accept failed: {err}"),
        }
    }
}

async fn connection(stream: UnixStream, peer: Peer, calls: mpsc::Sender<Call>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let response = answer(&line, &peer, &calls).await;
        let mut out = serde_json::to_string(&response).expect("responses serialize");
        out.push('\n');
        if write.write_all(out.as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn answer(line: &str, peer: &Peer, calls: &mpsc::Sender<Call>) -> Response {
    let request: Request = match serde_json::from_str(line) {
        Ok(request) => request,
        Err(err) => {
            return Response::Error(format!(
                "malformed request ({err}): send one JSON object per line, e.g. {{\"op\":\"status\"}}"
            ));
        }
    };
    let (tx, rx) = oneshot::channel();
    if calls.send((request, peer.clone(), tx)).await.is_err() {
        return Response::Error("the daemon is shutting down".into());
    }
    rx.await
        .unwrap_or_else(|_| Response::Error("the daemon dropped the request".into()))
}

/// Removes the socket file when the daemon stops.
pub struct SocketGuard(pub PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
