//! Ring buffer → typed events. Runs as its own task so that draining the kernel's ring
//! never waits on the daemon's other work; batches go to the daemon loop through a
//! bounded channel, so a stalled loop fills the ring and shows up as counted drops
//! rather than as unbounded memory.

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
};
use watchdog_common::{Event, EventKind};

use crate::tree::AnalysisKey;

#[derive(Debug, Clone)]
pub enum KernelEvent {
    Fork { pid: u32, ppid: u32, analysis: AnalysisKey, start_ns: u64, comm: String },
    Exit { pid: u32, analysis: AnalysisKey, start_ns: u64, exit_status: i32 },
    Exec { pid: u32, comm: String },
}

/// Events drained in one wake-up, handed over together to keep channel overhead off
/// the per-event cost during fork storms.
pub type Batch = Vec<KernelEvent>;

fn comm(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

fn decode(bytes: &[u8]) -> Option<KernelEvent> {
    if bytes.len() < size_of::<Event>() {
        return None;
    }
    // SAFETY: the kernel wrote an Event here (same #[repr(C)] type, watchdog-common);
    // the ring only guarantees 8-byte alignment, so read unaligned.
    let ev: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    Some(match EventKind::from_raw(ev.kind)? {
        EventKind::Fork => KernelEvent::Fork {
            pid: ev.pid,
            ppid: ev.ppid,
            analysis: ev.analysis,
            start_ns: ev.start_ns,
            comm: comm(&ev.comm),
        },
        EventKind::Exit => KernelEvent::Exit {
            pid: ev.pid,
            analysis: ev.analysis,
            start_ns: ev.start_ns,
            exit_status: ev.exit_status,
        },
        EventKind::Exec => KernelEvent::Exec { pid: ev.pid, comm: comm(&ev.comm) },
    })
}

/// Drains the ring buffer until the receiver goes away.
pub async fn run(ring: RingBuf<MapData>, out: mpsc::Sender<Batch>) -> Result<()> {
    // SAFETY: RingBuf owns its map fd and keeps it open, unchanged, for its whole life,
    // and the AsyncFd owns the RingBuf.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("registering the ring buffer with the reactor: {e}"))?;
    loop {
        let mut guard = ring.readable_mut().await?;
        let mut batch = Batch::new();
        let inner = guard.get_inner_mut();
        while let Some(item) = inner.next() {
            match decode(&item) {
                Some(event) => batch.push(event),
                None => tracing::warn!(len = item.len(), "undecodable record in the ring buffer"),
            }
        }
        guard.clear_ready();
        if !batch.is_empty() && out.send(batch).await.is_err() {
            return Ok(());
        }
    }
}
