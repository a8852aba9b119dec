//! How each run of an analysis ended: the kills the watchdog made in it, kept from the
//! moment nothing of the run is left until a bounded number of later runs have ended,
//! so that a client that started it (`exec`, the Python client's `Popen`) can learn why
//! its command died even when it asks after the run was forgotten.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::vocab::{
    limits::Reason,
    process::AnalysisKey,
    record::{KillRecord, Outcome},
};

/// Ended runs remembered, oldest dropped first: far more than clients waiting at once.
const ENDED_KEPT: usize = 4096;

/// The kills of one reason in a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunKill {
    pub reason: Reason,
    /// The limit crossed, in its unit (ms or bytes); none for orphans.
    pub limit: Option<u64>,
    /// Processes signalled for it.
    pub processes: u64,
    /// The registered roots of the run it signalled (the commands a client started),
    /// each with the last signal it got (`SIGTERM`, `SIGKILL`).
    pub roots: Vec<RootKilled>,
    /// The largest memory figure of its records, bytes: a process' RSS, or for
    /// `tree_memory` the analysis' PSS sum, each with what was in tmpfs files.
    pub measured_bytes: u64,
    /// Of `measured_bytes`, what was in tmpfs files (memfd, /dev/shm) and in no RSS.
    #[serde(default)]
    pub shmem_bytes: u64,
}

/// A registered root the watchdog killed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootKilled {
    pub pid: u32,
    pub signal: String,
}

/// Whether a run is still going, how it ended, or not known (never made, or ended so
/// long ago that it was dropped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    Ended(Vec<RunKill>),
    Unknown,
}

#[derive(Default)]
pub struct Runs {
    /// Kills of runs still going, by reason.
    kills: HashMap<AnalysisKey, BTreeMap<Reason, RunKill>>,
    ended: HashMap<AnalysisKey, Vec<RunKill>>,
    ended_order: VecDeque<AnalysisKey>,
}

impl Runs {
    /// Counts a kill record of run `key`; `root`: the record's process is one of the
    /// run's registered roots. One let go alive by an unregister was not killed.
    pub fn killed(&mut self, key: AnalysisKey, record: &KillRecord, root: bool) {
        if record.signals.is_empty() || record.outcome == Outcome::Released {
            return;
        }
        let kill = self
            .kills
            .entry(key)
            .or_default()
            .entry(record.reason)
            .or_insert_with(|| RunKill {
                reason: record.reason,
                limit: record.limit,
                processes: 0,
                roots: Vec::new(),
                measured_bytes: 0,
                shmem_bytes: 0,
            });
        kill.processes += 1;
        let shmem = record.shmem_bytes.unwrap_or(0);
        let measured = record.tree_pss_bytes.unwrap_or(record.rss_bytes) + shmem;
        if measured > kill.measured_bytes {
            kill.measured_bytes = measured;
            kill.shmem_bytes = shmem;
        }
        if root && let Some(last) = record.signals.last() {
            kill.roots.push(RootKilled {
                pid: record.pid,
                signal: last.signal.clone(),
            });
        }
    }

    /// Run `key` has nothing left: its kills are final.
    pub fn ended(&mut self, key: AnalysisKey) {
        if self.ended.contains_key(&key) {
            return;
        }
        let kills = self.kills.remove(&key).unwrap_or_default();
        self.ended.insert(key, kills.into_values().collect());
        self.ended_order.push_back(key);
        if self.ended_order.len() > ENDED_KEPT
            && let Some(oldest) = self.ended_order.pop_front()
        {
            self.ended.remove(&oldest);
        }
    }

    /// A process appeared in a run that had ended (a fork event still queued when its
    /// kill finished): it is going again until that one is gone too.
    pub fn resumed(&mut self, key: AnalysisKey) {
        if let Some(kills) = self.ended.remove(&key) {
            self.ended_order.retain(|k| *k != key);
            let by_reason = kills.into_iter().map(|k| (k.reason, k)).collect();
            self.kills.insert(key, by_reason);
        }
    }

    /// How run `key` stands; `live`: the registry still has it.
    pub fn state(&self, key: AnalysisKey, live: bool) -> RunState {
        match self.ended.get(&key) {
            Some(kills) => RunState::Ended(kills.clone()),
            None if live => RunState::Running,
            None => RunState::Unknown,
        }
    }
}
