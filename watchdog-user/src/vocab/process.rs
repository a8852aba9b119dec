//! What names a process and an analysis everywhere: a pid with its start time (which
//! survives PID reuse), the kernel's 16-byte name, the small key the kernel map holds
//! for an analysis, and the boot clock that start times are read on.

use nix::time::{ClockId, clock_gettime};

/// Daemon-assigned analysis key: what the kernel map stores instead of the id string.
pub type AnalysisKey = u64;

/// A process by identity: the pid with its start time survives PID reuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProcRef {
    pub pid: u32,
    /// CLOCK_BOOTTIME ns.
    pub start_ns: u64,
}

/// A process name as the kernel keeps it (16 bytes, NUL-padded): copied, never
/// allocated, on the per-event path.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Comm(pub [u8; 16]);

impl Comm {
    pub fn new(name: &str) -> Self {
        let mut raw = [0u8; 16];
        let n = name.len().min(15);
        raw[..n].copy_from_slice(&name.as_bytes()[..n]);
        Self(raw)
    }

    pub fn as_str(&self) -> std::borrow::Cow<'_, str> {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(self.0.len());
        String::from_utf8_lossy(&self.0[..end])
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl From<&watchdog_common::ProcRecord> for ProcRef {
    fn from(record: &watchdog_common::ProcRecord) -> Self {
        Self {
            pid: record.pid,
            start_ns: record.start_ns,
        }
    }
}

impl From<&watchdog_common::RssSample> for ProcRef {
    fn from(sample: &watchdog_common::RssSample) -> Self {
        Self {
            pid: sample.pid,
            start_ns: sample.start_ns,
        }
    }
}

/// The precision of /proc's start times.
pub fn ns_per_tick() -> u64 {
    1_000_000_000 / procfs::ticks_per_second().max(1)
}

/// CLOCK_BOOTTIME now, ns: the clock of the kernel's event timestamps and start times.
pub fn boottime_ns() -> u64 {
    let ts = clock_gettime(ClockId::CLOCK_BOOTTIME).expect("CLOCK_BOOTTIME is always available");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// Whether two start times name the same process. /proc rounds to clock ticks, the
/// kernel's events carry ns, so compare at tick precision.
pub fn same_start(a_ns: u64, b_ns: u64) -> bool {
    a_ns / ns_per_tick() == b_ns / ns_per_tick()
}

/// A process' real, effective and saved uids (/proc/PID/status `Uid:`): a setuid
/// program run by a user has the user's real uid and its owner's effective one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Uids {
    pub real: u32,
    pub effective: u32,
    pub saved: u32,
}

impl Uids {
    pub fn all(uid: u32) -> Self {
        Self {
            real: uid,
            effective: uid,
            saved: uid,
        }
    }

    /// Whether every one of them is `uid`: the process is wholly that user's.
    pub fn only(&self, uid: u32) -> bool {
        [self.real, self.effective, self.saved] == [uid; 3]
    }
}

impl std::fmt::Display for Uids {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.effective == self.real && self.saved == self.real {
            write!(f, "uid {}", self.real)
        } else {
            write!(
                f,
                "uid {} (effective uid {}, saved uid {})",
                self.real, self.effective, self.saved
            )
        }
    }
}
