//! The control socket: accepts connections, reads request lines, hands each request to
//! the daemon loop and writes its response back.
//!
//! Bounded, so that no client can make the daemon grow or wait: a request line is read
//! into a buffer of at most [`MAX_REQUEST_BYTES`] + 1 bytes, and a longer one is answered
//! with an error and its connection closed, the rest never read; a connection with no
//! complete request for [`IDLE_TIMEOUT`] is closed (with an error line); at most
//! [`MAX_CONNECTIONS`] are served at once: a newcomer takes the place of the connection
//! idle longest (which gets an error line and is closed), or, when every connection is
//! busy with a request, gets an error line at once and is closed. A line that is not
//! UTF-8 or not a request gets an error and the connection stays open for the next line
//! (the framing is intact). Every error line names the fix.

use std::{
    collections::BTreeMap,
    io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot},
};

use crate::{
    api::protocol::{
        BadRequest, ControlStats, MAX_REQUEST_BYTES, REQUEST_SHAPE, Request, Response,
    },
    vocab::{error::ErrorKind, peer::Peer},
};

/// Connections served at once. Each costs a descriptor and about 3 KiB while idle (its
/// task, socket registration and a 256-byte first read); the daemon's descriptor limit
/// is raised to the hard one, and kills need descriptors (pidfds) too.
pub const MAX_CONNECTIONS: usize = 1024;

/// A connection without a complete request for this long is closed; so is one that does
/// not take its answer in this time.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// After a failed accept (out of descriptors), the wait before the next one: the
/// connections in flight can end meanwhile, and the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What a connection waiting for a request has room for: most requests fit.
const FIRST_READ: usize = 256;
/// The least a request line's buffer grows by once the first read did not hold it.
const READ_CHUNK: usize = 4096;

/// A request on its way to the daemon loop, with who sent it (the connection's peer
/// credentials, read at accept) and where to send the answer.
pub type Call = (Request, Peer, oneshot::Sender<Response>);

/// Binds the socket (mode 0660, parent directory created) under a staging name beside
/// `path`, returned with the listener: clients find it at `path` only once [`publish`]
/// has moved it there, with its final mode and group, so none is ever refused by a
/// mode or group still being set. A leftover socket file with no daemon behind it is
/// replaced; a live daemon's socket is not.
pub async fn bind(path: &Path) -> Result<(UnixListener, PathBuf)> {
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
    let staged = staged_path(path);
    let _ = std::fs::remove_file(&staged);
    let listener = UnixListener::bind(&staged)
        .with_context(|| format!("binding the control socket {}", staged.display()))?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting mode 0660 on {}", staged.display()))?;
    Ok((listener, staged))
}

/// Where [`bind`] puts the socket until it is published: a hidden name of this daemon's
/// in the same directory (a rename within it is atomic).
fn staged_path(path: &Path) -> PathBuf {
    let name = path.file_name().map_or_else(
        || "watchdog.sock".into(),
        |n| n.to_string_lossy().into_owned(),
    );
    path.with_file_name(format!(".{name}.{}", std::process::id()))
}

/// Moves the staged socket to `path`: from now on clients reach it.
pub fn publish(staged: &Path, path: &Path) -> Result<()> {
    std::fs::rename(staged, path).with_context(|| {
        format!(
            "moving the control socket {} to {}",
            staged.display(),
            path.display()
        )
    })
}

/// The control socket's counters, for `status` and /metrics.
pub static STATS: Stats = Stats::new();

pub struct Stats {
    connections: AtomicU64,
    refused: AtomicU64,
    oversized: AtomicU64,
    timed_out: AtomicU64,
    not_utf8: AtomicU64,
    evicted: AtomicU64,
}

impl Stats {
    const fn new() -> Self {
        Self {
            connections: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            oversized: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            not_utf8: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        }
    }

    pub fn snapshot(&self) -> ControlStats {
        ControlStats {
            connections: self.connections.load(Relaxed),
            max_connections: MAX_CONNECTIONS as u64,
            refused: self.refused.load(Relaxed),
            oversized: self.oversized.load(Relaxed),
            timed_out: self.timed_out.load(Relaxed),
            not_utf8: self.not_utf8.load(Relaxed),
            evicted: self.evicted.load(Relaxed),
        }
    }
}

/// Counts a connection open for as long as it lives.
struct Open;

impl Open {
    fn new() -> Self {
        STATS.connections.fetch_add(1, Relaxed);
        Self
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        STATS.connections.fetch_sub(1, Relaxed);
    }
}

/// The places of the connections served at once. A connection waiting for its next
/// request parks its place here; when all are taken, a newcomer gets the place of the
/// one parked longest, which is told so and closed. Idle connections thus cannot lock
/// clients out: only when every place is in use (a request read, answered or written)
/// is a newcomer refused.
pub struct Places {
    free: Arc<Semaphore>,
    /// Parked places by when they were parked (a counter): the first is the longest idle.
    parked: Mutex<BTreeMap<u64, (OwnedSemaphorePermit, oneshot::Sender<()>)>>,
    next: AtomicU64,
}

/// A connection's place among the [`Places`]: parked from the start, since a new
/// connection is idle until its first request is read.
pub struct Place {
    places: Arc<Places>,
    /// Held while a request is read, answered and written.
    permit: Option<OwnedSemaphorePermit>,
    /// While parked: its key, and what fires when the place is given away.
    parked: Option<(u64, oneshot::Receiver<()>)>,
}

impl Drop for Place {
    /// A connection dropped while parked (its task cancelled) frees its place.
    fn drop(&mut self) {
        if let Some((key, _)) = self.parked.take() {
            self.places.parked().remove(&key);
        }
    }
}

impl Places {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            free: Arc::new(Semaphore::new(max)),
            parked: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(0),
        })
    }

    /// A place for a newcomer, parked: a free one, else the longest-parked one's; None
    /// when every place is in use.
    pub fn admit(self: &Arc<Self>) -> Option<Place> {
        let permit = match self.free.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // Its owner's receiver sees the sender dropped: it answers and closes.
                let (_, (permit, _evict)) = self.parked().pop_first()?;
                STATS.evicted.fetch_add(1, Relaxed);
                permit
            }
        };
        let mut place = Place {
            places: self.clone(),
            permit: Some(permit),
            parked: None,
        };
        place.park();
        Some(place)
    }

    fn parked(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<u64, (OwnedSemaphorePermit, oneshot::Sender<()>)>> {
        self.parked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Place {
    /// Parks the place while waiting for a request: it may be given to a newcomer.
    fn park(&mut self) {
        if let Some(permit) = self.permit.take() {
            let (tx, rx) = oneshot::channel();
            let key = self.places.next.fetch_add(1, Relaxed);
            self.places.parked().insert(key, (permit, tx));
            self.parked = Some((key, rx));
        }
    }

    /// Resolves when the parked place is given to a newcomer (never, when not parked).
    async fn given_away(&mut self) {
        match self.parked.as_mut() {
            Some((_, rx)) => {
                let _ = rx.await;
            }
            None => std::future::pending().await,
        }
    }

    /// Takes the place back for a request: false if it was given away.
    fn unpark(&mut self) -> bool {
        if let Some((key, _)) = self.parked.take() {
            self.permit = self.places.parked().remove(&key).map(|(permit, _)| permit);
        }
        self.permit.is_some()
    }
}

pub async fn serve(listener: UnixListener, calls: mpsc::Sender<Call>) {
    let places = Places::new(MAX_CONNECTIONS);
    // Said once each time every place is in use, not once per refused client.
    let mut full = false;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => match places.admit() {
                Some(place) => {
                    full = false;
                    let peer = crate::api::access::peer_of(&stream);
                    tokio::spawn(connection(stream, peer, calls.clone(), place));
                }
                None => {
                    if !std::mem::replace(&mut full, true) {
                        tracing::warn!(
                            "control socket: all {MAX_CONNECTIONS} connections are busy with \
                             requests; refusing more until one is done (counted in status: \
                             control.refused)"
                        );
                    }
                    refuse(&stream);
                }
            },
            Err(err) => {
                tracing::warn!("control socket accept failed: {err}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// A client over the cap: one error line, written without waiting (a fresh socket's
/// buffer has room for it), and the connection is closed.
fn refuse(stream: &UnixStream) {
    STATS.refused.fetch_add(1, Relaxed);
    let response = Response::error(
        ErrorKind::Unavailable,
        format!(
            "the daemon is busy with {MAX_CONNECTIONS} requests, its most at once: try again \
             shortly"
        ),
    );
    let _ = stream.try_write(response.to_line().as_bytes());
}

async fn connection(stream: UnixStream, peer: Peer, calls: mpsc::Sender<Call>, place: Place) {
    let _open = Open::new();
    let (read, write) = stream.into_split();
    converse(read, write, &peer, &calls, IDLE_TIMEOUT, place).await;
}

/// One connection: request lines in, one response line out for each, until the client
/// closes, a line is too long, `idle` passes without a complete request, or its place
/// is given to a newcomer while it waits. Generic over the streams so that the tests
/// drive this very code through in-memory pipes.
pub async fn converse<R, W>(
    mut read: R,
    mut write: W,
    peer: &Peer,
    calls: &mpsc::Sender<Call>,
    idle: Duration,
    mut place: Place,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut lines = LineReader::new(MAX_REQUEST_BYTES);
    loop {
        let frame = tokio::select! {
            frame = tokio::time::timeout(idle, lines.next(&mut read)) => Some(frame),
            () = place.given_away() => None,
        };
        let frame = if place.unpark() { frame } else { None };
        let (response, last) = match frame {
            Some(Ok(Ok(Frame::Line(line)))) => (answer(&line, peer, calls).await, false),
            Some(Ok(Ok(Frame::TooLong(seen)))) => {
                STATS.oversized.fetch_add(1, Relaxed);
                tracing::debug!(seen, "control socket: request line too long, closing");
                (BadRequest::TooLong(seen).response(), true)
            }
            Some(Ok(Ok(Frame::End) | Err(_))) => return,
            Some(Err(_)) => {
                STATS.timed_out.fetch_add(1, Relaxed);
                let message = format!(
                    "no complete request within {}s: the connection is closed; {REQUEST_SHAPE}, \
                     sent at once",
                    idle.as_secs_f64()
                );
                // Half a request, or none: the client's to fix by sending it at once.
                (Response::error(ErrorKind::BadRequest, message), true)
            }
            None => {
                let message = format!(
                    "closed while idle: the daemon serves {MAX_CONNECTIONS} connections at \
                     once and a new client took the place of this one, the longest idle; \
                     {REQUEST_SHAPE}, sent at once"
                );
                // Nothing wrong with the client: the daemon had no place left for it.
                (Response::error(ErrorKind::Unavailable, message), true)
            }
        };
        match tokio::time::timeout(idle, write.write_all(response.to_line().as_bytes())).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                STATS.timed_out.fetch_add(1, Relaxed);
                return;
            }
        }
        if last {
            let _ = tokio::time::timeout(idle, write.shutdown()).await;
            return;
        }
        place.park();
    }
}

async fn answer(line: &[u8], peer: &Peer, calls: &mpsc::Sender<Call>) -> Response {
    let request = match crate::api::protocol::parse_request(line) {
        Ok(request) => request,
        Err(err) => {
            if matches!(err, BadRequest::NotUtf8(_)) {
                STATS.not_utf8.fetch_add(1, Relaxed);
            }
            return err.response();
        }
    };
    let (tx, rx) = oneshot::channel();
    if calls.send((request, peer.clone(), tx)).await.is_err() {
        return Response::error(ErrorKind::Unavailable, "the daemon is shutting down");
    }
    // The loop drops the calls still queued when it stops: the daemon is going away,
    // the request may be sent again to the next one.
    rx.await.unwrap_or_else(|_| {
        Response::error(ErrorKind::Unavailable, "the daemon dropped the request")
    })
}

/// What [`LineReader::next`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A line, its newline taken off (or the last bytes before the end, unterminated).
    Line(Vec<u8>),
    /// More than the limit without a newline: this many bytes were read, the rest not.
    TooLong(usize),
    /// The client closed, nothing pending.
    End,
}

/// Splits a stream into lines of at most `max` bytes, holding at most `max` + 1 bytes:
/// a longer line is reported as soon as that many are in, and nothing more is read. No
/// buffer is held between lines (an idle connection costs no read buffer).
pub struct LineReader {
    pending: Vec<u8>,
    /// `pending[..scanned]` holds no newline.
    scanned: usize,
    max: usize,
}

impl LineReader {
    pub fn new(max: usize) -> Self {
        Self {
            pending: Vec::new(),
            scanned: 0,
            max,
        }
    }

    /// The bytes its buffer holds room for now (the tests check the bound).
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.pending.capacity()
    }

    pub async fn next<R: AsyncRead + Unpin>(&mut self, read: &mut R) -> io::Result<Frame> {
        loop {
            if let Some(at) = self.pending[self.scanned..]
                .iter()
                .position(|&b| b == b'\n')
            {
                let end = self.scanned + at;
                // Pipelined bytes after the newline stay for the next line.
                let rest = self.pending.split_off(end + 1);
                let mut line = std::mem::replace(&mut self.pending, rest);
                line.truncate(end);
                self.scanned = 0;
                return Ok(Frame::Line(line));
            }
            self.scanned = self.pending.len();
            if self.pending.len() > self.max {
                return Ok(Frame::TooLong(self.pending.len()));
            }
            // Never more than one byte past the limit: enough to know it was passed. A
            // line starts small (an idle connection waits on FIRST_READ bytes, not a
            // page), then the buffer doubles from READ_CHUNK, capped at the limit too.
            let room = self.max + 1 - self.pending.len();
            let want = room.min(match self.pending.len() {
                0 => FIRST_READ,
                len => READ_CHUNK.max(len),
            });
            self.pending.reserve_exact(want);
            let n = (&mut *read)
                .take(want as u64)
                .read_buf(&mut self.pending)
                .await?;
            if n == 0 {
                self.scanned = 0;
                return Ok(match std::mem::take(&mut self.pending) {
                    last if last.is_empty() => Frame::End,
                    last => Frame::Line(last),
                });
            }
        }
    }
}

/// Removes the socket file when the daemon stops.
pub struct SocketGuard(pub Vec<PathBuf>);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}
