//! Ring buffer → typed events. Runs as its own task so that draining the kernel's ring
//! never waits on the daemon's other work; batches go to the daemon loop through a
//! bounded channel, so a stalled loop fills the ring and shows up as counted drops
//! rather than as unbounded memory.

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
};
use watchdog_common::{Event, EventKind};

use crate::{
    core::event::KernelEvent,
    vocab::process::{Comm, boottime_ns},
};

/// Kernel event → read by the daemon, in seconds: a histogram for /metrics.
pub struct Latency {
    counts: [AtomicU64; LATENCY_BOUNDS.len()],
    total: AtomicU64,
    sum_ns: AtomicU64,
}

const LATENCY_BOUNDS: [f64; 10] = [
    0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 1.0,
];

pub static LATENCY: Latency = Latency {
    counts: [const { AtomicU64::new(0) }; LATENCY_BOUNDS.len()],
    total: AtomicU64::new(0),
    sum_ns: AtomicU64::new(0),
};

/// Cumulative buckets (upper bound, count), total count, sum in seconds.
pub type LatencySnapshot = (Vec<(f64, u64)>, u64, f64);

impl Latency {
    fn observe(&self, ns: u64) {
        let seconds = ns as f64 / 1e9;
        for (bound, count) in LATENCY_BOUNDS.iter().zip(&self.counts) {
            if seconds <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> LatencySnapshot {
        let buckets = LATENCY_BOUNDS
            .iter()
            .zip(&self.counts)
            .map(|(b, c)| (*b, c.load(Ordering::Relaxed)))
            .collect();
        (
            buckets,
            self.total.load(Ordering::Relaxed),
            self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        )
    }
}

/// Events drained together, handed over at once to keep channel overhead off the
/// per-event cost during fork storms.
pub type Batch = Vec<KernelEvent>;

/// Most events in one batch. With the channel's capacity this bounds what userspace
/// buffers (64 × 256 events); beyond that the kernel ring fills and counts drops,
/// which the daemon repairs by resyncing, instead of growing without bound.
pub const BATCH_MAX: usize = 256;
pub const CHANNEL_BATCHES: usize = 64;

fn decode(bytes: &[u8], now_ns: u64) -> Option<KernelEvent> {
    if bytes.len() < size_of::<Event>() {
        return None;
    }
    // SAFETY: the kernel wrote an Event here (same #[repr(C)] type, watchdog-common);
    // the ring only guarantees 8-byte alignment, so read unaligned.
    let ev: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    LATENCY.observe(now_ns.saturating_sub(ev.ts_ns));
    Some(match EventKind::from_raw(ev.kind)? {
        EventKind::Fork => KernelEvent::Fork {
            pid: ev.pid,
            ppid: ev.ppid,
            analysis: ev.analysis,
            start_ns: ev.start_ns,
            comm: Comm(ev.comm),
            ts_ns: ev.ts_ns,
            untracked: ev.value & watchdog_common::FORK_UNTRACKED != 0,
            launched: ev.value & watchdog_common::FORK_LAUNCHED != 0,
        },
        EventKind::Exit => KernelEvent::Exit {
            pid: ev.pid,
            analysis: ev.analysis,
            start_ns: ev.start_ns,
            exit_status: ev.exit_status,
        },
        EventKind::Exec => KernelEvent::Exec {
            pid: ev.pid,
            comm: Comm(ev.comm),
        },
        EventKind::Rss => KernelEvent::Rss {
            pid: ev.pid,
            analysis: ev.analysis,
            rss_bytes: ev.value,
        },
        EventKind::TreeRss => KernelEvent::TreeRss {
            analysis: ev.analysis,
            rss_sum: ev.value,
        },
        EventKind::Struck => KernelEvent::Struck {
            process: crate::vocab::process::ProcRef {
                pid: ev.pid,
                start_ns: ev.start_ns,
            },
            analysis: ev.analysis,
            rss_bytes: ev.value,
            ts_ns: ev.ts_ns,
        },
        EventKind::Refused => KernelEvent::Refused {
            pid: ev.pid,
            analysis: ev.analysis,
            refused: ev.value,
        },
    })
}

/// How often the ring is drained without a wake-up from the kernel: events that can
/// wait (see the programs' `wake_flags`) are picked up within this.
pub const DRAIN_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

fn drain(ring: &mut RingBuf<MapData>) -> Batch {
    let mut batch = Batch::with_capacity(BATCH_MAX);
    // One clock read per batch: the latency histogram needs no finer "now".
    let now_ns = boottime_ns();
    while batch.len() < BATCH_MAX {
        let Some(item) = ring.next() else { break };
        match decode(&item, now_ns) {
            Some(event) => batch.push(event),
            None => tracing::warn!(len = item.len(), "undecodable record in the ring buffer"),
        }
    }
    batch
}

/// Hands every waiting event to the loop; false when the loop has gone.
async fn drain_all(ring: &mut RingBuf<MapData>, out: &mpsc::Sender<Batch>) -> bool {
    loop {
        let batch = drain(ring);
        if batch.is_empty() {
            return true;
        }
        if out.send(batch).await.is_err() {
            return false;
        }
    }
}

/// A request to drain the ring now: answered once every event the ring held is in the
/// loop's channel (an exit sent without a wake-up, say), so that the loop can take them
/// in before it answers what depends on them (`events` right after a kill).
pub type DrainRequest = tokio::sync::oneshot::Sender<()>;

/// Drains the ring buffer, when the kernel wakes us, every [`DRAIN_EVERY`] and when the
/// loop asks (`drains`), until the receiver goes away.
pub async fn run(
    ring: RingBuf<MapData>,
    out: mpsc::Sender<Batch>,
    mut drains: mpsc::UnboundedReceiver<DrainRequest>,
) -> Result<()> {
    // SAFETY: RingBuf owns its map fd and keeps it open, unchanged, for its whole life,
    // and the AsyncFd owns the RingBuf.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("registering the ring buffer with the reactor: {e}"))?;
    let mut tick = tokio::time::interval(DRAIN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let asked = tokio::select! {
            guard = ring.readable_mut() => {
                guard?.clear_ready();
                None
            }
            _ = tick.tick() => None,
            Some(asked) = drains.recv() => Some(asked),
        };
        // After clearing readiness: a record that comes in from here on wakes us again,
        // so none is left waiting for the next tick.
        if !drain_all(ring.get_mut(), &out).await {
            return Ok(());
        }
        if let Some(asked) = asked {
            let _ = asked.send(());
        }
    }
}
