//! What the live page (`GET /` on the HTTP listener) shows of the analyses: each one's
//! usage against its limits, its recent RSS, and its tree, bounded. Built by the daemon
//! loop from the rules' state for the typed `overview` request, like `dump-tree`, but
//! from what the tree already knows (no /proc read per process): the page polls it, so
//! its cost must not grow with reads of thousands of /proc files.
//!
//! Bounds, so that neither the daemon nor the page grows with the host:
//! - RSS history: [`RSS_SAMPLES`] samples per live analysis (16 bytes each), one per
//!   reconcile poll, in a ring; an analysis' ring is dropped at the first poll after it
//!   ends.
//! - Tree: at most [`TREE_ROWS`] processes per analysis, depth first from its roots in
//!   pid order; the rest are counted in `tree_omitted`.

use std::{
    collections::{HashMap, VecDeque},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

use crate::{
    core::{
        Clock, Core,
        kill::KillJob,
        registry::Analysis,
        rules::zombies::Zombies,
        tree::{Node, Tree},
    },
    vocab::{
        limits::Limits,
        process::AnalysisKey,
        units::{signed_ms_until, unix_ms},
    },
};

/// RSS samples kept per analysis: an hour at the default 30 s poll.
pub const RSS_SAMPLES: usize = 120;

/// Processes of one analysis listed in its tree; the rest are only counted.
pub const TREE_ROWS: usize = 200;

/// The `overview` reply.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Overview {
    /// When it was built (Unix ms): the page's ages and samples are relative to it.
    pub now_unix_ms: u64,
    /// Processes watched now, in all analyses.
    pub watched: usize,
    /// By analysis id.
    pub analyses: Vec<AnalysisOverview>,
}

/// One analysis as the page shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AnalysisOverview {
    pub analysis_id: String,
    /// Uid of the caller that created it.
    pub owner_uid: u32,
    /// Since its registration.
    pub age_ms: u64,
    /// Time left before its timeout; negative once the deadline has passed.
    pub deadline_in_ms: i64,
    pub limits: Limits,
    pub processes: usize,
    /// Exited children its processes have not reaped yet (what `--max-zombies` counts).
    pub zombies: usize,
    /// RSS summed over its processes, as last known (kernel reports and polls).
    pub rss_bytes: u64,
    /// The largest RSS of one of its processes (the per-process limit's measure), and
    /// which process it is.
    pub largest_rss_bytes: u64,
    pub largest_pid: Option<u32>,
    /// Being killed as a whole, for this reason (timeout, tree memory, ...).
    pub dying: Option<String>,
    /// (Unix ms, RSS sum) oldest first, at most [`RSS_SAMPLES`].
    pub rss_samples: Vec<(u64, u64)>,
    /// Its processes depth first, at most [`TREE_ROWS`].
    pub tree: Vec<ProcessRow>,
    /// Its processes not in `tree`.
    pub tree_omitted: usize,
}

/// One process of an analysis' tree; `depth` 0 is a root of the analysis.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProcessRow {
    pub pid: u32,
    pub ppid: u32,
    pub depth: u32,
    pub comm: String,
    pub rss_bytes: u64,
    pub age_ms: u64,
    /// Its parent died while it lived on.
    pub orphan: bool,
    /// Being killed: time left before SIGKILL.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grace_left_ms: Option<u64>,
}

/// The RSS sum of each live analysis over time: a ring of [`RSS_SAMPLES`] each.
#[derive(Default)]
pub struct RssHistory {
    rings: HashMap<AnalysisKey, VecDeque<(u64, u64)>>,
}

impl RssHistory {
    /// Adds one sample per analysis in `sums` (the live ones) and forgets the rest.
    pub fn record(&mut self, at: SystemTime, sums: impl IntoIterator<Item = (AnalysisKey, u64)>) {
        let at_ms = unix_ms(at);
        let mut rings = HashMap::new();
        for (key, rss) in sums {
            let mut ring = self
                .rings
                .remove(&key)
                .unwrap_or_else(|| VecDeque::with_capacity(RSS_SAMPLES));
            if ring.len() == RSS_SAMPLES {
                ring.pop_front();
            }
            ring.push_back((at_ms, rss));
            rings.insert(key, ring);
        }
        self.rings = rings;
    }

    pub fn samples(&self, key: AnalysisKey) -> Vec<(u64, u64)> {
        self.rings
            .get(&key)
            .map(|ring| ring.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Analyses with samples.
    pub fn len(&self) -> usize {
        self.rings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rings.is_empty()
    }
}

/// The RSS sum of every live analysis, for [`RssHistory::record`].
pub fn rss_sums(core: &Core) -> Vec<(AnalysisKey, u64)> {
    core.live_analyses()
        .map(|(key, _)| (key, core.tree().rss_sum(key)))
        .collect()
}

/// The page's view of every live analysis.
pub fn overview(core: &Core, history: &RssHistory, clock: &Clock) -> Overview {
    let seen = Seen {
        tree: core.tree(),
        jobs: core.jobs(),
        zombies: core.zombies(),
        clock,
    };
    let mut analyses: Vec<AnalysisOverview> = core
        .live_analyses()
        .map(|(key, analysis)| analysis_overview(key, analysis, &seen, history.samples(key)))
        .collect();
    analyses.sort_by(|a, b| a.analysis_id.cmp(&b.analysis_id));
    Overview {
        now_unix_ms: unix_ms(clock.wall),
        watched: core.tree().len(),
        analyses,
    }
}

/// What an analysis' view is read from.
struct Seen<'a> {
    tree: &'a Tree,
    jobs: &'a [KillJob],
    zombies: &'a Zombies,
    clock: &'a Clock,
}

fn analysis_overview(
    key: AnalysisKey,
    analysis: &Analysis,
    seen: &Seen,
    rss_samples: Vec<(u64, u64)>,
) -> AnalysisOverview {
    let members = seen.tree.members(key);
    let largest = members
        .iter()
        .filter_map(|&pid| seen.tree.get(pid))
        .max_by_key(|n| (n.rss_bytes(), std::cmp::Reverse(n.pid)));
    let (tree, tree_omitted) = tree_rows(key, &members, seen);
    AnalysisOverview {
        analysis_id: analysis.id.clone(),
        owner_uid: analysis.owner,
        age_ms: millis_between(analysis.registered_wall, seen.clock.wall),
        deadline_in_ms: signed_ms_until(analysis.deadline, seen.clock.now),
        limits: analysis.limits.clone(),
        processes: members.len(),
        zombies: seen.zombies.in_analysis(key),
        rss_bytes: seen.tree.rss_sum(key),
        largest_rss_bytes: largest.map_or(0, Node::rss_bytes),
        largest_pid: largest.map(|n| n.pid),
        dying: analysis
            .violation
            .map(|(reason, _)| reason.as_str().to_string()),
        rss_samples,
        tree,
        tree_omitted,
    }
}

/// Up to [`TREE_ROWS`] of the analysis' processes, depth first from its roots (members
/// whose parent is not a member), children in pid order; and how many were left out.
fn tree_rows(key: AnalysisKey, members: &[u32], seen: &Seen) -> (Vec<ProcessRow>, usize) {
    let in_analysis = |pid: u32| seen.tree.get(pid).is_some_and(|n| n.analysis == key);
    let mut roots: Vec<u32> = members
        .iter()
        .copied()
        .filter(|&pid| seen.tree.get(pid).is_some_and(|n| !in_analysis(n.ppid)))
        .collect();
    roots.sort_unstable();
    // An explicit stack: a chain thousands deep costs no recursion.
    let mut stack: Vec<(u32, u32)> = roots.into_iter().rev().map(|pid| (pid, 0)).collect();
    let mut rows = Vec::new();
    while rows.len() < TREE_ROWS {
        let Some((pid, depth)) = stack.pop() else {
            break;
        };
        let Some(node) = seen.tree.get(pid) else {
            continue;
        };
        rows.push(process_row(node, depth, seen));
        let children: Vec<u32> = seen
            .tree
            .children_of(pid)
            .filter(|&c| in_analysis(c))
            .collect();
        stack.extend(children.into_iter().rev().map(|c| (c, depth + 1)));
    }
    let omitted = members.len().saturating_sub(rows.len());
    (rows, omitted)
}

fn process_row(node: &Node, depth: u32, seen: &Seen) -> ProcessRow {
    ProcessRow {
        pid: node.pid,
        ppid: node.ppid,
        depth,
        comm: node.comm.as_str().into_owned(),
        rss_bytes: node.rss_bytes(),
        age_ms: seen.clock.boot_ns.saturating_sub(node.start_ns) / 1_000_000,
        orphan: node.orphan,
        grace_left_ms: seen
            .jobs
            .iter()
            .find(|j| j.target_pending(node.pid))
            .and_then(|j| j.grace_left_ms(seen.clock.now)),
    }
}

fn millis_between(from: SystemTime, to: SystemTime) -> u64 {
    to.duration_since(from)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::vocab::{limits::Reason, process::Comm};

    const MIB: u64 = 1 << 20;

    fn clock() -> Clock {
        Clock {
            now: Instant::now(),
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            boot_ns: 100_000_000_000,
        }
    }

    fn analysis(id: &str, clock: &Clock) -> Analysis {
        Analysis {
            id: id.into(),
            limits: Limits {
                tree_memory_bytes: Some(300 * MIB),
                ..Limits::for_tests(60_000, 100 * MIB)
            },
            deadline: clock.now + Duration::from_secs(45),
            deadline_wall: clock.wall + Duration::from_secs(45),
            registered_wall: clock.wall - Duration::from_secs(15),
            violation: None,
            owner: 1001,
            roots: Vec::new(),
            warn_at: None,
            warned: Vec::new(),
        }
    }

    /// `(pid, ppid, analysis, rss)`: each started `pid` seconds after boot.
    fn tree(nodes: &[(u32, u32, AnalysisKey, u64)]) -> Tree {
        let mut tree = Tree::default();
        for &(pid, ppid, key, rss) in nodes {
            let start_ns = u64::from(pid) * 1_000_000_000;
            tree.insert(Node::new(
                pid,
                ppid,
                start_ns,
                Comm::new(&format!("p{pid}")),
                key,
            ));
            tree.set_rss(pid, rss);
        }
        tree
    }

    fn view(key: AnalysisKey, analysis: &Analysis, tree: &Tree, clock: &Clock) -> AnalysisOverview {
        let seen = Seen {
            tree,
            jobs: &[],
            zombies: &Zombies::default(),
            clock,
        };
        analysis_overview(key, analysis, &seen, Vec::new())
    }

    fn shape(rows: &[ProcessRow]) -> Vec<(u32, u32)> {
        rows.iter().map(|r| (r.pid, r.depth)).collect()
    }

    #[test]
    fn the_tree_is_depth_first_from_the_analysis_roots_in_pid_order() {
        let clock = clock();
        // 10 → {30 → 31, 20}; 40 (child of an unwatched 5) is a second root; 50 belongs
        // to another analysis though its parent is 10's; 60 (key 2) has a parent in 1.
        let tree = tree(&[
            (10, 5, 1, MIB),
            (20, 10, 1, 2 * MIB),
            (30, 10, 1, 3 * MIB),
            (31, 30, 1, 7 * MIB),
            (40, 5, 1, MIB),
            (50, 10, 2, 50 * MIB),
        ]);
        let a = view(1, &analysis("a", &clock), &tree, &clock);
        assert_eq!(
            shape(&a.tree),
            [(10, 0), (20, 1), (30, 1), (31, 2), (40, 0)]
        );
        assert_eq!((a.processes, a.tree_omitted, a.zombies), (5, 0, 0));
        assert_eq!(a.rss_bytes, 14 * MIB);
        assert_eq!((a.largest_rss_bytes, a.largest_pid), (7 * MIB, Some(31)));
        assert_eq!((a.age_ms, a.deadline_in_ms), (15_000, 45_000));
        let row = &a.tree[3];
        assert_eq!(
            (row.ppid, row.comm.as_str(), row.rss_bytes),
            (30, "p31", 7 * MIB)
        );
        assert_eq!(row.age_ms, 100_000 - 31_000);
        let b = view(2, &analysis("b", &clock), &tree, &clock);
        assert_eq!(shape(&b.tree), [(50, 0)]);
    }

    #[test]
    fn thousands_of_processes_are_listed_up_to_the_bound_and_counted() {
        let clock = clock();
        // A chain 3,000 deep and a root with 3,000 children: no recursion, and the
        // rows stop at the bound.
        let chain: Vec<_> = (1..=3000).map(|pid| (pid, pid - 1, 1, 0)).collect();
        let fan: Vec<_> = (5001..=8000)
            .map(|pid| (pid, 5000, 2, u64::from(pid)))
            .chain([(5000, 1, 2, 0)])
            .collect();
        let tree = tree(&[chain, fan].concat());
        let deep = view(1, &analysis("deep", &clock), &tree, &clock);
        assert_eq!(deep.tree.len(), TREE_ROWS);
        assert_eq!(deep.tree_omitted, 3000 - TREE_ROWS);
        assert_eq!(
            deep.tree.last().map(|r| r.depth),
            Some(TREE_ROWS as u32 - 1)
        );
        let wide = view(2, &analysis("wide", &clock), &tree, &clock);
        assert_eq!(wide.processes, 3001);
        assert_eq!(
            (wide.tree.len(), wide.tree_omitted),
            (TREE_ROWS, 3001 - TREE_ROWS)
        );
        assert_eq!(shape(&wide.tree[..3]), [(5000, 0), (5001, 1), (5002, 1)]);
        assert_eq!(wide.largest_pid, Some(8000));
    }

    #[test]
    fn an_analysis_without_processes_or_past_its_deadline_still_shows() {
        let clock = clock();
        let mut dying = analysis("late", &clock);
        dying.deadline = clock.now - Duration::from_secs(2);
        dying.violation = Some((Reason::Timeout, Some(60_000)));
        let a = view(9, &dying, &Tree::default(), &clock);
        assert_eq!((a.processes, a.tree.len(), a.tree_omitted), (0, 0, 0));
        assert_eq!((a.largest_rss_bytes, a.largest_pid), (0, None));
        assert_eq!(a.deadline_in_ms, -2000);
        assert_eq!(a.dying.as_deref(), Some("timeout"));
    }

    #[test]
    fn the_json_has_what_the_page_reads() {
        let clock = clock();
        let long_id = "x".repeat(200);
        let tree = tree(&[(10, 1, 1, MIB)]);
        let seen = Seen {
            tree: &tree,
            jobs: &[],
            zombies: &Zombies::default(),
            clock: &clock,
        };
        let a = analysis_overview(1, &analysis(&long_id, &clock), &seen, vec![(1, MIB)]);
        let json = serde_json::to_value(&a).expect("serializes");
        for field in [
            "analysis_id",
            "owner_uid",
            "age_ms",
            "deadline_in_ms",
            "processes",
            "zombies",
            "rss_bytes",
            "largest_rss_bytes",
            "rss_samples",
            "tree",
            "tree_omitted",
        ] {
            assert!(!json[field].is_null(), "no {field} in {json}");
        }
        assert_eq!(json["analysis_id"], long_id.as_str());
        assert_eq!(json["zombies"], 0);
        assert_eq!(json["limits"]["memory_bytes"], 100 * MIB);
        assert_eq!(json["limits"]["tree_memory_bytes"], 300 * MIB);
        assert_eq!(json["rss_samples"], serde_json::json!([[1, MIB]]));
        assert_eq!(json["tree"][0]["comm"], "p10");
        assert!(json["tree"][0].get("grace_left_ms").is_none());
        let back: AnalysisOverview = serde_json::from_value(json).expect("reads back");
        assert_eq!(back, a);
    }

    #[test]
    fn the_history_keeps_a_bounded_ring_per_live_analysis() {
        let mut history = RssHistory::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        for i in 0..(RSS_SAMPLES as u64 + 30) {
            history.record(t0 + Duration::from_secs(i), [(1, i * MIB), (2, 7)]);
        }
        let samples = history.samples(1);
        assert_eq!(samples.len(), RSS_SAMPLES);
        assert_eq!(samples.first(), Some(&(1_030_000, 30 * MIB)));
        assert_eq!(
            samples.last().map(|s| s.1),
            Some((RSS_SAMPLES as u64 + 29) * MIB)
        );
        // Analysis 2 ended: its ring goes at the next sample.
        history.record(t0 + Duration::from_secs(500), [(1, 0)]);
        assert!(history.samples(2).is_empty());
        assert_eq!(history.len(), 1);
        history.record(t0, []);
        assert!(history.is_empty());
    }
}
