//! The registry: analyses (id ↔ the small key the kernel map holds, limits, clock,
//! owner) and the roots registered into them with the processes that launched them.
//! Deadlines are kept in order, so the next one is found without looking at all.

use crate::vocab::units::unix_ms;
use std::{
    collections::{BTreeSet, HashMap},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use watchdog_common::{ANALYSIS_ID_MAX, AnalysisEntry, RootEntry};

use crate::vocab::{
    limits::{Limits, Reason},
    process::{AnalysisKey, ProcRef},
};

/// One analysis: its id, its limits and its clock.
#[derive(Clone, Debug)]
pub struct Analysis {
    pub id: String,
    pub limits: Limits,
    pub deadline: Instant,
    /// The same deadline on the wall clock, for people and for latency measurements.
    pub deadline_wall: SystemTime,
    pub registered_wall: SystemTime,
    /// A whole-analysis kill (timeout, tree memory) was started, for this reason and
    /// limit: the analysis is dying, and anything that appears in it later is killed on
    /// arrival.
    pub violation: Option<(Reason, Option<u64>)>,
    /// Uid of the caller that created it.
    pub owner: u32,
    /// Its registered roots.
    pub roots: Vec<u32>,
    /// When the timeout's warning is due (`--warn-at` of the timeout), if one is.
    pub warn_at: Option<Instant>,
    /// The limits whose warning was sent: each is warned of once.
    pub warned: Vec<Reason>,
}

impl Analysis {
    /// When the timeout's warning is due: `--warn-at` of the timeout before `deadline`.
    fn warn_time(limits: &Limits, deadline: Instant) -> Option<Instant> {
        let level = limits.warn_level(limits.timeout_ms)?;
        deadline.checked_sub(Duration::from_millis(limits.timeout_ms - level))
    }
}

/// A registered root and the process that launched it: when the launcher dies, the
/// root is an orphan (the launcher is not watched, so its exit sends no event).
#[derive(Clone, Copy, Debug)]
pub struct Root {
    pub process: ProcRef,
    pub analysis: AnalysisKey,
    pub launcher: Option<ProcRef>,
}

/// A process whose new children join an analysis, itself never a member (the Python
/// client's `watch()` block): what it starts is the analysis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub process: ProcRef,
    pub analysis: AnalysisKey,
}

#[derive(Default)]
pub struct Registry {
    /// Launchers, by pid.
    launches: HashMap<u32, Launch>,
    by_key: HashMap<AnalysisKey, Analysis>,
    by_id: HashMap<String, AnalysisKey>,
    /// Deadlines of analyses not yet violated, soonest first.
    deadlines: BTreeSet<(Instant, AnalysisKey)>,
    /// Timeout warnings not yet sent, of analyses not yet violated, soonest first.
    warnings: BTreeSet<(Instant, AnalysisKey)>,
    last_key: AnalysisKey,
}

impl Registry {
    /// The key a new analysis would get now.
    pub fn next_key(&self) -> AnalysisKey {
        self.last_key + 1
    }

    /// Creates analysis `id` with `limits`, its clock starting at `now`.
    pub fn create(
        &mut self,
        id: &str,
        limits: &Limits,
        owner: u32,
        now: Instant,
        now_wall: SystemTime,
    ) -> AnalysisKey {
        self.last_key += 1;
        let analysis = Analysis {
            id: id.to_string(),
            limits: limits.clone(),
            deadline: now + limits.timeout(),
            deadline_wall: now_wall + limits.timeout(),
            registered_wall: now_wall,
            violation: None,
            owner,
            roots: Vec::new(),
            warn_at: Analysis::warn_time(limits, now + limits.timeout()),
            warned: Vec::new(),
        };
        self.insert(self.last_key, analysis);
        self.last_key
    }

    /// Puts back an analysis a previous daemon saved (after a restart).
    pub fn restore(&mut self, key: AnalysisKey, analysis: Analysis) {
        self.last_key = self.last_key.max(key);
        self.insert(key, analysis);
    }

    fn insert(&mut self, key: AnalysisKey, analysis: Analysis) {
        if analysis.violation.is_none() {
            self.deadlines.insert((analysis.deadline, key));
            if let Some(at) = analysis.warn_at {
                self.warnings.insert((at, key));
            }
        }
        // Keys only grow: the newest run of an id is the one its name stands for.
        let newest = self
            .by_id
            .get(&analysis.id)
            .is_none_or(|&other| other < key);
        if newest {
            self.by_id.insert(analysis.id.clone(), key);
        }
        self.by_key.insert(key, analysis);
    }

    /// The newest run of analysis `id`, dying or not.
    pub fn key(&self, id: &str) -> Option<AnalysisKey> {
        self.by_id.get(id).copied()
    }

    /// The run of analysis `id` a registration joins: the newest, unless it is being
    /// killed (a retry then starts a run of its own, never inheriting a kill).
    pub fn joinable(&self, id: &str) -> Option<AnalysisKey> {
        self.key(id).filter(|&key| self.violation(key).is_none())
    }

    pub fn id(&self, key: AnalysisKey) -> Option<&str> {
        self.by_key.get(&key).map(|a| a.id.as_str())
    }

    pub fn get(&self, key: AnalysisKey) -> Option<&Analysis> {
        self.by_key.get(&key)
    }

    /// Marks a whole-analysis kill as started; false when one already was.
    pub fn mark_violated(&mut self, key: AnalysisKey, reason: Reason, limit: Option<u64>) -> bool {
        let Some(analysis) = self.by_key.get_mut(&key) else {
            return false;
        };
        if analysis.violation.is_some() {
            return false;
        }
        analysis.violation = Some((reason, limit));
        self.deadlines.remove(&(analysis.deadline, key));
        if let Some(at) = analysis.warn_at {
            self.warnings.remove(&(at, key));
        }
        true
    }

    /// Marks the warning of limit `of` as sent; false when it already was (or the
    /// analysis is dying: a warning then warns of nothing).
    pub fn mark_warned(&mut self, key: AnalysisKey, of: Reason) -> bool {
        let Some(analysis) = self.by_key.get_mut(&key) else {
            return false;
        };
        if analysis.violation.is_some() || analysis.warned.contains(&of) {
            return false;
        }
        analysis.warned.push(of);
        if of == Reason::Timeout
            && let Some(at) = analysis.warn_at
        {
            self.warnings.remove(&(at, key));
        }
        true
    }

    /// The soonest timeout warning still to send.
    pub fn next_warning(&self) -> Option<Instant> {
        self.warnings.first().map(|(at, _)| *at)
    }

    /// Analyses whose timeout warning is due at or before `now`.
    pub fn warnings_due(&self, now: Instant) -> Vec<AnalysisKey> {
        due_in(&self.warnings, now)
    }

    /// Why the analysis is dying, if it is.
    pub fn violation(&self, key: AnalysisKey) -> Option<(Reason, Option<u64>)> {
        self.by_key.get(&key).and_then(|a| a.violation)
    }

    /// The soonest deadline still to enforce.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(at, _)| *at)
    }

    /// Analyses whose deadline is at or before `now`, soonest first.
    pub fn due(&self, now: Instant) -> Vec<AnalysisKey> {
        due_in(&self.deadlines, now)
    }

    pub fn iter(&self) -> impl Iterator<Item = (AnalysisKey, &Analysis)> {
        self.by_key.iter().map(|(k, a)| (*k, a))
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Forgets an analysis and its roots; returns the roots' pids.
    pub fn forget(&mut self, key: AnalysisKey) -> Option<Vec<u32>> {
        let analysis = self.by_key.remove(&key)?;
        if self.by_id.get(&analysis.id) == Some(&key) {
            let older = self
                .by_key
                .iter()
                .filter(|(_, a)| a.id == analysis.id)
                .map(|(k, _)| *k)
                .max();
            match older {
                Some(older) => self.by_id.insert(analysis.id.clone(), older),
                None => self.by_id.remove(&analysis.id),
            };
        }
        self.deadlines.remove(&(analysis.deadline, key));
        if let Some(at) = analysis.warn_at {
            self.warnings.remove(&(at, key));
        }
        Some(analysis.roots)
    }

    pub fn add_launch(&mut self, launch: Launch) {
        self.launches.insert(launch.process.pid, launch);
    }

    /// The launch of `pid`, if it is a launcher.
    pub fn launch_of(&self, pid: u32) -> Option<Launch> {
        self.launches.get(&pid).copied()
    }

    /// Ends the launch of `process`; what it was, if it was one.
    pub fn end_launch(&mut self, process: ProcRef) -> Option<Launch> {
        let launch = self
            .launches
            .get(&process.pid)
            .filter(|l| l.process == process)?;
        let launch = *launch;
        self.launches.remove(&process.pid);
        Some(launch)
    }

    /// The launchers of analysis `key`.
    pub fn launchers_of(&self, key: AnalysisKey) -> Vec<ProcRef> {
        self.launches
            .values()
            .filter(|l| l.analysis == key)
            .map(|l| l.process)
            .collect()
    }

    /// The analyses `uid` owns, and the registered roots in them.
    pub fn owned_by(&self, uid: u32) -> (u64, u64) {
        self.by_key
            .values()
            .filter(|a| a.owner == uid)
            .fold((0, 0), |(analyses, roots), a| {
                (analyses + 1, roots + a.roots.len() as u64)
            })
    }

    /// The analyses `uid` owns, by key.
    pub fn keys_owned_by(&self, uid: u32) -> impl Iterator<Item = AnalysisKey> + '_ {
        self.by_key
            .iter()
            .filter(move |(_, a)| a.owner == uid)
            .map(|(&key, _)| key)
    }

    /// The registered roots of every analysis: as many entries as the pinned map of
    /// roots holds.
    pub fn roots_total(&self) -> usize {
        self.by_key.values().map(|a| a.roots.len()).sum()
    }

    /// `pid` is no longer a root of analysis `key` (it exited); false when it was none.
    pub fn drop_root(&mut self, key: AnalysisKey, pid: u32) -> bool {
        let Some(analysis) = self.by_key.get_mut(&key) else {
            return false;
        };
        let before = analysis.roots.len();
        analysis.roots.retain(|&r| r != pid);
        analysis.roots.len() != before
    }

    pub fn add_root(&mut self, root: Root) {
        if let Some(analysis) = self.by_key.get_mut(&root.analysis)
            && !analysis.roots.contains(&root.process.pid)
        {
            analysis.roots.push(root.process.pid);
        }
    }
}

/// The analyses of `times` (kept in time order) due at or before `now`, soonest first.
fn due_in(times: &BTreeSet<(Instant, AnalysisKey)>, now: Instant) -> Vec<AnalysisKey> {
    times
        .iter()
        .take_while(|(at, _)| *at <= now)
        .map(|(_, key)| *key)
        .collect()
}

/// The kernel map's form of an analysis (kept there for a restarted daemon).
pub fn entry_from_analysis(analysis: &Analysis) -> AnalysisEntry {
    let mut id = [0u8; ANALYSIS_ID_MAX];
    let bytes = analysis.id.as_bytes();
    id[..bytes.len()].copy_from_slice(bytes);
    AnalysisEntry {
        id,
        id_len: bytes.len() as u32,
        owner_uid: analysis.owner,
        registered_unix_ms: unix_ms(analysis.registered_wall),
        deadline_unix_ms: unix_ms(analysis.deadline_wall),
        limits: analysis.limits.to_slots(),
    }
}

/// An analysis as saved in the kernel map, back in the daemon's terms; its deadline
/// keeps its wall-clock time (one that passed while we were down is due at once).
pub fn analysis_from_entry(entry: &AnalysisEntry, now: Instant, now_wall: SystemTime) -> Analysis {
    let unix = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
    let deadline_wall = unix(entry.deadline_unix_ms);
    let left = deadline_wall.duration_since(now_wall).unwrap_or_default();
    let id_len = (entry.id_len as usize).min(ANALYSIS_ID_MAX);
    let limits = Limits::from_slots(&entry.limits);
    let deadline = now + left;
    Analysis {
        id: String::from_utf8_lossy(&entry.id[..id_len]).into_owned(),
        // A warning due while the daemon was down is sent at once (a second one, at
        // worst, rather than none).
        warn_at: Analysis::warn_time(&limits, deadline),
        warned: Vec::new(),
        limits,
        deadline,
        deadline_wall,
        registered_wall: unix(entry.registered_unix_ms),
        violation: None,
        owner: entry.owner_uid,
        roots: Vec::new(),
    }
}

/// The kernel map's form of a root.
pub fn entry_from_root(root: &Root) -> RootEntry {
    let launcher = root.launcher.unwrap_or(ProcRef {
        pid: 0,
        start_ns: 0,
    });
    RootEntry {
        analysis: root.analysis,
        start_ns: root.process.start_ns,
        parent_start_ns: launcher.start_ns,
        parent_pid: launcher.pid,
        _pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(timeout_ms: u64) -> Limits {
        Limits::for_tests(timeout_ms, 1 << 30)
    }

    #[test]
    fn deadlines_come_soonest_first_and_leave_once_violated_or_forgotten() {
        let mut registry = Registry::default();
        let now = Instant::now();
        let wall = SystemTime::now();
        let late = registry.create("late", &limits(5000), 0, now, wall);
        let soon = registry.create("soon", &limits(1000), 0, now, wall);
        assert_eq!(registry.next_deadline(), Some(now + Duration::from_secs(1)));
        assert_eq!(registry.due(now + Duration::from_secs(6)), vec![soon, late]);
        assert!(registry.mark_violated(soon, Reason::Timeout, Some(1000)));
        assert!(
            !registry.mark_violated(soon, Reason::Timeout, Some(1000)),
            "once"
        );
        assert_eq!(registry.next_deadline(), Some(now + Duration::from_secs(5)));
        registry.forget(late);
        assert_eq!(registry.next_deadline(), None);
        assert_eq!(registry.key("late"), None);
    }

    #[test]
    fn an_analysis_survives_the_kernel_map_round_trip() {
        let mut registry = Registry::default();
        let now = Instant::now();
        let wall = SystemTime::now();
        let key = registry.create("a/b", &limits(60_000), 1234, now, wall);
        let saved = entry_from_analysis(registry.get(key).unwrap());
        let back = analysis_from_entry(&saved, now, wall);
        assert_eq!(back.id, "a/b");
        assert_eq!(back.owner, 1234, "a restarted daemon keeps the owner");
        assert_eq!(back.limits, limits(60_000));
        let left = back.deadline - now;
        assert!(left <= Duration::from_secs(60) && left > Duration::from_secs(59));
    }
}
