//! Memory outside RSS: the tmpfs files (memfd, /dev/shm, SysV, shared anonymous) an
//! analysis' members hold, as the reconcile poll reads them. How they count:
//! - a process' memory is its RSS plus the bytes of the files it holds, less its
//!   tmpfs pages already in its RSS (`RssShmem`): a file held by several processes
//!   counts whole in each, as a shared page does in each RSS;
//! - an analysis' memory is its PSS (or RSS) sum plus the bytes of every distinct file
//!   its members hold, less their `RssShmem` sum; a file in /dev/shm that a member
//!   owns and was seen holding keeps counting after its holders let it go, until it
//!   is gone, since its pages stay in memory. The subtraction may take away more than
//!   the files' mapped part (shared anonymous pages, or one file mapped by several
//!   members): the sum is a lower bound, never more than the analysis holds.
//!
//! Those remembered files still there when the analysis' kill ends are listed in its
//! record (and removed, with `--remove-shm`).

use std::collections::{HashMap, HashSet};

use crate::{
    core::procs::{Held, Procs, ShmFile},
    vocab::process::{AnalysisKey, ProcRef, same_start},
};

/// Where POSIX shared memory (`shm_open`, joblib's memmapping, multiprocessing's
/// `SharedMemory`) lives: the only files remembered after their holders let go, listed
/// as left and removed. Other tmpfs files (/tmp, /run) hold user data: they count
/// while held and are never touched.
pub const SHM_DIR: &str = "/dev/shm/";

/// Whether `path` is in [`SHM_DIR`] (never `..` out of it).
pub fn in_shm_dir(path: &str) -> bool {
    path.starts_with(SHM_DIR) && !path.split('/').any(|part| part == "..")
}

/// Most named files remembered per analysis: beyond them a file counts only while
/// held, so that an analysis creating a million files costs a bounded state.
pub const FILES_PER_ANALYSIS: usize = 4096;

/// A file by device and inode.
type FileId = (u64, u64);

/// What one analysis holds outside RSS.
#[derive(Default)]
struct Outside {
    /// Files with a path that a member owning them was seen holding, with their bytes
    /// at the last poll.
    named: HashMap<FileId, (ShmFile, u64)>,
    /// Bytes outside RSS at the last poll.
    bytes: u64,
}

/// Memory outside RSS, per process and per analysis, as of the last poll.
#[derive(Default)]
pub struct ShmSeen {
    processes: HashMap<u32, (ProcRef, u64)>,
    analyses: HashMap<AnalysisKey, Outside>,
}

impl ShmSeen {
    /// What the poll read: the files each holding member (`analysis_of` says whose)
    /// holds now. The files remembered and not held are looked at through `procs`.
    pub fn polled(
        &mut self,
        held: &[(ProcRef, Held)],
        analysis_of: impl Fn(ProcRef) -> Option<AnalysisKey>,
        procs: &dyn Procs,
    ) {
        self.processes.clear();
        let mut now: HashMap<AnalysisKey, (HashMap<FileId, u64>, u64)> = HashMap::new();
        for (process, held) in held {
            let Some(key) = analysis_of(*process) else {
                continue;
            };
            let own: u64 = held.files.iter().map(|(_, bytes)| bytes).sum();
            self.processes
                .insert(process.pid, (*process, own.saturating_sub(held.rss_shmem)));
            let (files, rss_shmem) = now.entry(key).or_default();
            *rss_shmem += held.rss_shmem;
            let outside = self.analyses.entry(key).or_default();
            for (file, bytes) in &held.files {
                files.insert((file.dev, file.ino), *bytes);
                outside.remember(file, *bytes, held.uid);
            }
        }
        for (key, outside) in &mut self.analyses {
            let (files, rss_shmem) = now.remove(key).unwrap_or_default();
            outside.bytes = outside.sum(&files, procs).saturating_sub(rss_shmem);
        }
    }

    /// The bytes `process` held outside its RSS at the last poll.
    pub fn process_bytes(&self, process: ProcRef) -> u64 {
        self.processes
            .get(&process.pid)
            .filter(|(seen, _)| same_start(seen.start_ns, process.start_ns))
            .map_or(0, |(_, bytes)| *bytes)
    }

    /// The bytes the analysis held outside RSS at the last poll.
    pub fn analysis_bytes(&self, key: AnalysisKey) -> u64 {
        self.analyses.get(&key).map_or(0, |o| o.bytes)
    }

    /// The analysis' remembered files still at their paths now, with their bytes.
    pub fn left(&self, key: AnalysisKey, procs: &dyn Procs) -> Vec<(ShmFile, u64)> {
        let Some(outside) = self.analyses.get(&key) else {
            return Vec::new();
        };
        let mut left: Vec<(ShmFile, u64)> = outside
            .named
            .values()
            .filter_map(|(file, _)| Some((file.clone(), procs.shm_file_bytes(file)?)))
            .collect();
        left.sort_by(|a, b| a.0.path.cmp(&b.0.path));
        left
    }

    pub fn forget(&mut self, key: AnalysisKey) {
        self.analyses.remove(&key);
    }
}

impl Outside {
    /// Keeps `file` for after its holders let go: a file in /dev/shm, owned by the
    /// member (`holder_uid`) that holds it (never someone else's file it opened).
    fn remember(&mut self, file: &ShmFile, bytes: u64, holder_uid: u32) {
        let id = (file.dev, file.ino);
        if !file.path.as_deref().is_some_and(in_shm_dir) || file.uid != holder_uid {
            return;
        }
        if self.named.len() < FILES_PER_ANALYSIS || self.named.contains_key(&id) {
            self.named.insert(id, (file.clone(), bytes));
        }
    }

    /// Every distinct file: those held now (`held`), and the remembered ones still at
    /// their paths (the others are forgotten).
    fn sum(&mut self, held: &HashMap<FileId, u64>, procs: &dyn Procs) -> u64 {
        let mut counted: HashSet<FileId> = HashSet::new();
        let mut total: u64 = held.values().sum();
        counted.extend(held.keys());
        self.named.retain(|id, (file, bytes)| {
            if counted.contains(id) {
                return true;
            }
            let Some(now) = procs.shm_file_bytes(file) else {
                return false;
            };
            *bytes = now;
            total += now;
            true
        });
        total
    }
}
