//! What people see of the core: `dump-tree` and `status`, read from the rules' state.

use crate::vocab::units::signed_ms_until;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::ValueEnum as _;

use crate::{
    api::protocol::{AnalysisView, Reply, Status, TreeNode},
    core::{Clock, Core, procs::Procs, rules::zombies::Zombie, tree::Node},
    vocab::limits::Reason,
};

pub fn dump_tree(
    core: &Core,
    analysis_id: Option<&str>,
    procs: &dyn Procs,
    clock: &Clock,
) -> Result<Reply> {
    let registry = core.registry();
    let filter = match analysis_id {
        Some(id) => match registry.key(id) {
            Some(key) => Some(key),
            None => {
                return Ok(Reply::Tree {
                    processes: Vec::new(),
                    analyses: Vec::new(),
                });
            }
        },
        None => None,
    };
    let mut processes = Vec::new();
    for root in core.tree().roots() {
        if filter.is_none_or(|key| root.analysis == key) {
            subtree_views(core, root, procs, clock, &mut processes);
        }
    }
    let analyses = core
        .live_analyses()
        .filter(|(key, _)| filter.is_none_or(|f| f == *key))
        .map(|(key, a)| AnalysisView {
            analysis_id: a.id.clone(),
            owner_uid: a.owner,
            processes: core.tree().member_count(key),
            zombies: core.zombies().in_analysis(key),
            deadline_in_ms: signed_ms_until(a.deadline, clock.now),
            deadline_unix_ms: crate::vocab::units::unix_ms(a.deadline_wall),
            limits: a.limits.clone(),
        })
        .collect();
    Ok(Reply::Tree {
        processes,
        analyses,
    })
}

/// `root` and everything below it, depth first, each with its depth: iterative, so a
/// chain of any length costs heap, not stack.
fn subtree_views(
    core: &Core,
    root: &Node,
    procs: &dyn Procs,
    clock: &Clock,
    out: &mut Vec<TreeNode>,
) {
    enum Item<'a> {
        Process(&'a Node),
        Zombie(&'a Zombie, &'a Node),
    }
    let mut stack = vec![(Item::Process(root), 0u32)];
    while let Some((item, depth)) = stack.pop() {
        let node = match item {
            Item::Zombie(zombie, holder) => {
                out.push(zombie_view(core, zombie, holder, depth, clock));
                continue;
            }
            Item::Process(node) => node,
        };
        out.push(view(core, node, depth, procs, clock));
        let below: Vec<Item> = core
            .tree()
            .children_of(node.pid)
            .filter_map(|c| core.tree().get(c))
            .map(Item::Process)
            .chain(
                core.zombies()
                    .of_holder(node.pid)
                    .map(|z| Item::Zombie(z, node)),
            )
            .collect();
        // Reversed onto the stack, so they come off in their own order.
        stack.extend(below.into_iter().rev().map(|item| (item, depth + 1)));
    }
}

fn view(core: &Core, node: &Node, depth: u32, procs: &dyn Procs, clock: &Clock) -> TreeNode {
    let analysis = core.registry().get(node.analysis);
    TreeNode {
        pid: node.pid,
        ppid: node.ppid,
        analysis_id: analysis.map(|a| a.id.clone()).unwrap_or_default(),
        owner_uid: analysis.map_or(0, |a| a.owner),
        comm: node.comm.as_str().into_owned(),
        age_ms: clock.boot_ns.saturating_sub(node.start_ns) / 1_000_000,
        rss_bytes: procs.rss_bytes(node.pid),
        orphan: node.orphan,
        zombie: false,
        grace_left_ms: core
            .jobs()
            .iter()
            .find(|j| j.target_pending(node.pid))
            .and_then(|j| j.grace_left_ms(clock.now)),
        depth,
    }
}

/// A zombie, shown as a leaf under the process that holds it.
fn zombie_view(core: &Core, zombie: &Zombie, holder: &Node, depth: u32, clock: &Clock) -> TreeNode {
    let analysis = core.registry().get(zombie.analysis);
    TreeNode {
        pid: zombie.process.pid,
        ppid: holder.pid,
        analysis_id: analysis.map(|a| a.id.clone()).unwrap_or_default(),
        owner_uid: analysis.map_or(0, |a| a.owner),
        comm: zombie.comm.as_str().into_owned(),
        age_ms: clock.boot_ns.saturating_sub(zombie.process.start_ns) / 1_000_000,
        rss_bytes: 0,
        orphan: false,
        zombie: true,
        grace_left_ms: None,
        depth,
    }
}

/// What the status takes from beside the rules: the kernel's counters (what only
/// the maps know) and the loop's own bookkeeping.
pub struct KernelCounters {
    pub lost_events: u64,
    pub watch_map_full: u64,
    /// Untrusted pinned state dropped at start (0 or 1).
    pub pinned_state_dropped: u64,
    pub last_poll_us: u64,
    pub loop_longest_us: u64,
    pub faults: crate::api::protocol::Faults,
    /// Kill records the store did not take (its task had stopped).
    pub records_unqueued: u64,
    /// The control socket's connections and refusals.
    pub control: crate::api::protocol::ControlStats,
    /// How this kernel lets each part work.
    pub paths: Vec<crate::vocab::kernel::KernelPath>,
}

pub fn status(
    core: &Core,
    kernel: &KernelCounters,
    started: Instant,
    poll_interval: Duration,
    clock: &Clock,
) -> Status {
    let counters = core.counters();
    let settings = core.settings();
    let day_ago = crate::vocab::units::rfc3339(clock.wall - Duration::from_secs(86_400));
    let mut kills_by_reason: std::collections::BTreeMap<String, u64> = Reason::value_variants()
        .iter()
        .map(|r| (r.as_str().to_string(), 0))
        .collect();
    for (reason, count) in &counters.kills_by_reason {
        kills_by_reason.insert(reason.to_string(), *count);
    }
    Status {
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_s: clock.now.duration_since(started).as_secs(),
        monitored_count: core.tree().len(),
        analyses: core.live_analyses().count(),
        pinned_analyses: core.registry().len(),
        pinned_roots: core.registry().roots_total(),
        pinned_capacity: watchdog_common::MAX_ANALYSES as usize,
        zombies: core.zombies().len(),
        zombies_by_analysis: core
            .zombies()
            .by_analysis()
            .into_iter()
            .filter_map(|(key, n)| Some((core.registry().id(key)?.to_string(), n)))
            .collect(),
        forks_seen: counters.forks,
        exits_seen: counters.exits,
        execs_seen: counters.execs,
        lost_events: kernel.lost_events,
        watch_map_full: kernel.watch_map_full,
        pinned_state_dropped: kernel.pinned_state_dropped,
        resyncs: counters.resyncs,
        rss_reports: counters.rss_reports,
        kernel_signals: counters.kernel_strikes,
        forks_refused: counters.forks_refused,
        last_poll_ms: kernel.last_poll_us as f64 / 1000.0,
        loop_longest_ms: kernel.loop_longest_us as f64 / 1000.0,
        grace_count: core.jobs().iter().map(|j| j.pending_count()).sum(),
        kills_total: counters.kills,
        kills_by_reason,
        kills_last_24h: core
            .recent()
            .iter()
            .filter(|r| r.time >= day_ago && r.reason != Reason::Warning)
            .count(),
        recent_events: core.recent().iter().rev().take(20).cloned().collect(),
        dry_run: settings.dry_run,
        records_unqueued: kernel.records_unqueued,
        db: String::new(),
        database: Default::default(),
        settings: crate::api::protocol::Runtime {
            defaults: Some(settings.defaults.clone()),
            poll_interval_ms: crate::vocab::units::millis(poll_interval),
            dry_run: settings.dry_run,
        },
        faults: crate::api::protocol::Faults {
            untracked_forks: counters.untracked_forks,
            untracked_now: core.untracked().len(),
            ..kernel.faults.clone()
        },
        control: kernel.control.clone(),
        kernel_release: crate::kernel::release_name(),
        kernel_paths: kernel.paths.clone(),
    }
}

/// One line for systemd's STATUS=.
pub fn status_line(core: &Core, lost_events: u64) -> String {
    format!(
        "watching {} processes in {} analyses; {} kills; {} lost events",
        core.tree().len(),
        core.live_analyses().count(),
        core.counters().kills,
        lost_events
    )
}
