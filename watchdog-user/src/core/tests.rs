//! The rules, tested without a kernel: a fake /proc, a fake clock, events fed by hand,
//! and the actions the core returns checked one by one.

use std::{cell::RefCell, collections::HashMap, time::Duration};

use nix::sys::signal::Signal;
use watchdog_common::{AnalysisEntry, KillProgress, RootEntry};

use std::time::SystemTime;

use super::*;
use crate::{
    core::event::KernelEvent,
    core::{
        kill::SignalOrder,
        procs::{Details, Held, ShmFile},
        runs::RunState,
    },
    vocab::peer::Peer,
};
use crate::{
    core::rules::forks::RefusalBurst,
    core::rules::zombies::{ZOMBIE_SETTLE, ZOMBIE_SWEEP_EVERY},
    vocab::{
        limits::{Limits, OrphanPolicy, Reason},
        process::{Comm, Uids, same_start},
        record::{Outcome, ShmLeft},
    },
};

const SELF_PID: u32 = 999;
const MIB: u64 = 1 << 20;

/// /proc as the test says it is: living processes by pid, the PSS of those that have
/// one, the real uids of those that do not run as root, and the exited processes their
/// parent has not reaped yet, and the tmpfs files still at their paths (by device and
/// inode) with their bytes.
#[derive(Default)]
pub(crate) struct FakeProcs(
    RefCell<HashMap<u32, ProcInfo>>,
    RefCell<HashMap<u32, u64>>,
    RefCell<HashMap<u32, Uids>>,
    RefCell<HashMap<u32, ProcInfo>>,
    RefCell<HashMap<(u64, u64), u64>>,
);

impl FakeProcs {
    pub(crate) fn spawn(&self, pid: u32, ppid: u32, start_ns: u64) -> ProcInfo {
        let info = ProcInfo {
            pid,
            ppid,
            start_ns,
            comm: format!("p{pid}"),
            kernel_thread: false,
            exited: false,
        };
        self.0.borrow_mut().insert(pid, info.clone());
        info
    }

    /// A process that runs as `uid`.
    pub(crate) fn spawn_as(&self, pid: u32, ppid: u32, uid: u32) -> ProcInfo {
        self.2.borrow_mut().insert(pid, Uids::all(uid));
        self.spawn(pid, ppid, start(pid))
    }

    /// A setuid program: run by `real`, as `effective`.
    pub(crate) fn spawn_setuid(&self, pid: u32, ppid: u32, real: u32, effective: u32) -> ProcInfo {
        let uids = Uids {
            real,
            effective,
            saved: effective,
        };
        self.2.borrow_mut().insert(pid, uids);
        self.spawn(pid, ppid, start(pid))
    }

    fn die(&self, pid: u32) {
        self.0.borrow_mut().remove(&pid);
    }

    /// `pid` exits and its parent does not reap it: a zombie until [`Self::reap`].
    fn die_unreaped(&self, pid: u32) {
        if let Some(info) = self.0.borrow_mut().remove(&pid) {
            self.3.borrow_mut().insert(pid, info);
        }
    }

    fn reap(&self, pid: u32) {
        self.3.borrow_mut().remove(&pid);
    }

    fn reparent(&self, pid: u32, ppid: u32) {
        if let Some(p) = self.0.borrow_mut().get_mut(&pid) {
            p.ppid = ppid;
        }
    }
}

impl Procs for FakeProcs {
    fn read(&self, pid: u32) -> Option<ProcInfo> {
        self.0.borrow().get(&pid).cloned()
    }

    fn details(&self, process: ProcRef) -> Details {
        let same = self
            .read(process.pid)
            .is_some_and(|p| same_start(p.start_ns, process.start_ns));
        if !same {
            return Details::default();
        }
        Details {
            cmdline: format!("cmd {}", process.pid),
            uid: 1000,
            rss_bytes: 0,
        }
    }

    fn rss_bytes(&self, _pid: u32) -> u64 {
        0
    }

    fn pss_bytes(&self, pid: u32) -> Option<u64> {
        self.1.borrow().get(&pid).copied()
    }

    fn children(&self, pid: u32) -> Option<std::collections::HashSet<u32>> {
        let living = self.0.borrow();
        let zombies = self.3.borrow();
        Some(
            living
                .values()
                .chain(zombies.values())
                .filter(|p| p.ppid == pid)
                .map(|p| p.pid)
                .collect(),
        )
    }

    fn shm_file_bytes(&self, file: &ShmFile) -> Option<u64> {
        self.4.borrow().get(&(file.dev, file.ino)).copied()
    }

    fn unreaped(&self, process: ProcRef) -> Option<u32> {
        let zombies = self.3.borrow();
        let info = zombies.get(&process.pid)?;
        same_start(info.start_ns, process.start_ns).then_some(info.ppid)
    }

    fn uids(&self, process: ProcRef) -> Option<Uids> {
        let info = self.read(process.pid)?;
        same_start(info.start_ns, process.start_ns).then(|| {
            self.2
                .borrow()
                .get(&process.pid)
                .copied()
                .unwrap_or(Uids::all(0))
        })
    }
}

fn limits() -> Limits {
    Limits::for_tests(60_000, 100 * MIB)
}

struct World {
    core: Core,
    procs: FakeProcs,
    clock: Clock,
}

/// Start times are the pid times 1,000 ns, kept under the clock's boot time.
fn start(pid: u32) -> u64 {
    u64::from(pid) * 1000
}

/// A kernel map entry: the process as it started, in its analysis.
fn mapped(pid: u32, key: AnalysisKey) -> (ProcRef, AnalysisKey) {
    let process = ProcRef {
        pid,
        start_ns: start(pid),
    };
    (process, key)
}

impl World {
    /// What the core asked for, with the effects' descriptions of kill targets
    /// answered the way the daemon answers them (read from the fake /proc, handed back
    /// as an input), until the core asks nothing more.
    fn take(&mut self) -> Vec<Action> {
        let mut all = Vec::new();
        loop {
            let actions = self.core.take_actions();
            let looks: Vec<(ProcRef, Details)> = actions
                .iter()
                .filter_map(|action| match action {
                    Action::Signal(order) if order.describe => Some(order.target),
                    Action::Describe(process) => Some(*process),
                    _ => None,
                })
                .map(|process| (process, self.procs.details(process)))
                .collect();
            all.extend(actions);
            if looks.is_empty() {
                return all;
            }
            self.core
                .on_described(&looks, &[], &self.procs, &self.clock);
        }
    }

    fn new() -> Self {
        Self::with(limits(), false)
    }

    fn with(defaults: Limits, dry_run: bool) -> Self {
        let procs = FakeProcs::default();
        procs.spawn(1, 0, 0);
        Self {
            core: Core::new(
                Settings {
                    defaults,
                    dry_run,
                    remove_shm: false,
                    machine_memory: None,
                    admin_gid: None,
                    memory_metric: crate::vocab::limits::MemoryMetric::Rss,
                    quotas: Default::default(),
                    kernel_refuses_forks: false,
                },
                "host".into(),
                SELF_PID,
            ),
            procs,
            clock: Clock {
                now: Instant::now(),
                wall: SystemTime::now(),
                boot_ns: 10_000_000_000,
            },
        }
    }

    /// A launcher (pid 50) starts `root`, which is registered as `id`.
    fn register(&mut self, root: u32, id: &str, overrides: LimitOverrides) -> Vec<Action> {
        self.procs.spawn(50, 1, start(50));
        let info = self.procs.spawn(root, 50, start(root));
        let registration = self
            .core
            .check_register(root, id, &overrides, &Peer::root(), &self.procs)
            .expect("registrable");
        self.core
            .adopt(registration, &[info], &self.clock)
            .expect("adopted");
        self.take()
    }

    fn key(&self, id: &str) -> AnalysisKey {
        self.core.registry().key(id).expect("registered")
    }

    fn fork(&mut self, pid: u32, ppid: u32) -> Vec<Action> {
        self.fork_flagged(pid, ppid, false)
    }

    /// `ppid` forks `pid`, which the kernel map could not take.
    fn fork_untracked(&mut self, pid: u32, ppid: u32) -> Vec<Action> {
        self.fork_flagged(pid, ppid, true)
    }

    fn fork_flagged(&mut self, pid: u32, ppid: u32, untracked: bool) -> Vec<Action> {
        self.procs.spawn(pid, ppid, start(pid));
        let analysis = self.core.tree().get(ppid).expect("watched parent").analysis;
        self.event(KernelEvent::Fork {
            pid,
            ppid,
            analysis,
            start_ns: start(pid),
            comm: Comm::new("child"),
            ts_ns: self.clock.boot_ns,
            untracked,
            launched: false,
        })
    }

    /// Member `by` makes `pid` with `clone(CLONE_PARENT)`: `by`'s parent is its parent.
    fn fork_clone_parent(&mut self, pid: u32, by: u32) -> Vec<Action> {
        let ppid = self.procs.read(by).expect("living").ppid;
        self.procs.spawn(pid, ppid, start(pid));
        let analysis = self.core.tree().get(by).expect("a member").analysis;
        self.event(KernelEvent::Fork {
            pid,
            ppid,
            analysis,
            start_ns: start(pid),
            comm: Comm::new("sibling"),
            ts_ns: self.clock.boot_ns,
            untracked: false,
            launched: false,
        })
    }

    /// Root 100, registered with a 1 s timeout, at its deadline: its SIGTERM asked for,
    /// its description not yet read (the actions are not taken through [`Self::take`]).
    fn timed_out_undescribed(&mut self) -> ProcRef {
        self.register(100, "a", timeout(1000));
        self.clock = self.clock.advanced(Duration::from_secs(1));
        self.core.on_tick(&self.procs, &self.clock);
        let actions = self.core.take_actions();
        let order = &only_signal(&actions);
        order.target
    }

    /// A restarted daemon resumes analysis `key` (saved as `entry`) with its root 100,
    /// launched by 50, and `members` in the kernel map.
    fn resume_root_100(&mut self, key: AnalysisKey, entry: AnalysisEntry, members: &[u32]) {
        self.resume_root_100_killed(key, entry, members, &[]);
    }

    /// [`Self::resume_root_100`] with the SIGTERMs of kills in progress the pinned map
    /// kept.
    fn resume_root_100_killed(
        &mut self,
        key: AnalysisKey,
        entry: AnalysisEntry,
        members: &[u32],
        kills: &[(u32, KillProgress)],
    ) {
        let roots = [(
            100,
            RootEntry {
                analysis: key,
                start_ns: start(100),
                parent_start_ns: start(50),
                parent_pid: 50,
                _pad: 0,
            },
        )];
        let in_map: Vec<_> = members.iter().map(|&pid| mapped(pid, key)).collect();
        let saved = crate::core::Saved {
            analyses: vec![(key, entry)],
            roots: roots.to_vec(),
            kills: kills.to_vec(),
            ..Default::default()
        };
        self.core.resume(&saved, &in_map, &self.procs, &self.clock);
    }

    /// `pid` exits; its living children are reparented to init, as the kernel does.
    fn exit(&mut self, pid: u32) -> Vec<Action> {
        self.exit_to(pid, Some(1))
    }

    /// `pid` exits; its living children go to `adopter` (a subreaper), or stay with
    /// the dead parent in /proc for now (None: the kernel has not reparented them yet).
    fn exit_to(&mut self, pid: u32, adopter: Option<u32>) -> Vec<Action> {
        let analysis = self.core.tree().get(pid).map_or(0, |n| n.analysis);
        self.procs.die(pid);
        let children: Vec<u32> = self
            .procs
            .0
            .borrow()
            .values()
            .filter(|p| p.ppid == pid)
            .map(|p| p.pid)
            .collect();
        for child in children.iter().filter(|_| adopter.is_some()) {
            self.procs.reparent(*child, adopter.unwrap_or(1));
        }
        self.exit_event(pid, analysis)
    }

    /// The kernel reports `pid`'s exit.
    fn exit_event(&mut self, pid: u32, analysis: AnalysisKey) -> Vec<Action> {
        self.event(KernelEvent::Exit {
            pid,
            analysis,
            start_ns: start(pid),
            exit_status: 0,
        })
    }

    /// The kernel reports `pid`'s RSS; its pages are its own (PSS = RSS) unless the
    /// test says otherwise with [`Self::pss`].
    fn rss(&mut self, pid: u32, rss_bytes: u64) -> Vec<Action> {
        self.pss(pid, rss_bytes);
        self.rss_shared(pid, rss_bytes)
    }

    /// What /proc/PID/smaps_rollup says of `pid`.
    fn pss(&mut self, pid: u32, pss_bytes: u64) {
        self.procs.1.borrow_mut().insert(pid, pss_bytes);
    }

    /// The kernel reports `pid`'s RSS; its PSS stays what the test set.
    fn rss_shared(&mut self, pid: u32, rss_bytes: u64) -> Vec<Action> {
        let analysis = self.core.tree().get(pid).map_or(0, |n| n.analysis);
        self.event(KernelEvent::Rss {
            pid,
            analysis,
            rss_bytes,
        })
    }

    fn event(&mut self, event: KernelEvent) -> Vec<Action> {
        self.core.on_event(event, &self.procs, &self.clock);
        self.take()
    }

    fn advance(&mut self, by: Duration) -> Vec<Action> {
        self.clock = self.clock.advanced(by);
        self.core.on_tick(&self.procs, &self.clock);
        self.take()
    }
}

fn signals(actions: &[Action]) -> Vec<(u32, Signal)> {
    let mut out: Vec<(u32, Signal)> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Signal(order) => Some((order.target.pid, order.signal)),
            _ => None,
        })
        .collect();
    out.sort_by_key(|(pid, _)| *pid);
    out
}

fn records(actions: &[Action]) -> Vec<KillRecord> {
    let mut out: Vec<KillRecord> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Record(r) => Some(r.as_ref().clone()),
            _ => None,
        })
        .collect();
    out.sort_by_key(|r| r.pid);
    out
}

fn timeout(ms: u64) -> LimitOverrides {
    LimitOverrides {
        timeout_ms: Some(ms),
        ..Default::default()
    }
}

#[test]
fn a_timeout_sigterms_the_analysis_at_its_deadline_and_sigkills_what_ignores_it_after_the_grace() {
    let mut w = World::new();
    let actions = w.register(100, "a", timeout(2000));
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::SaveAnalysis(..)))
    );
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::WatchLauncher { launcher, .. } if launcher.pid == 50))
    );
    w.fork(101, 100);
    assert_eq!(
        w.core.next_wakeup(),
        Some(w.clock.now + Duration::from_secs(2))
    );
    assert!(
        signals(&w.advance(Duration::from_millis(1999))).is_empty(),
        "not before"
    );
    let actions = w.advance(Duration::from_millis(1));
    assert_eq!(
        signals(&actions),
        [(100, Signal::SIGTERM), (101, Signal::SIGTERM)]
    );
    // The root obeys; the child ignores SIGTERM.
    w.exit(100);
    let actions = w.advance(Duration::from_millis(999));
    assert!(signals(&actions).is_empty(), "the grace is not over");
    let actions = w.advance(Duration::from_millis(1));
    assert_eq!(signals(&actions), [(101, Signal::SIGKILL)]);
    let actions = w.exit(101);
    let records = records(&actions);
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].outcome, Outcome::ExitedAfterSigterm);
    assert_eq!(records[1].outcome, Outcome::Killed);
    assert!(
        records
            .iter()
            .all(|r| r.reason == Reason::Timeout && r.limit == Some(2000))
    );
    assert_eq!(records[1].signals.len(), 2);
    assert!(
        !w.core.registry().is_empty(),
        "a killed analysis lingers a moment"
    );
    let actions = w.advance(DYING_LINGER);
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::ForgetAnalysis(..))),
        "the analysis is over"
    );
    assert!(w.core.registry().is_empty());
}

#[test]
fn a_process_over_its_memory_limit_is_killed_alone_and_once() {
    let mut w = World::new();
    w.register(100, "a", LimitOverrides::default());
    w.fork(101, 100);
    assert!(
        signals(&w.rss(101, 100 * MIB)).is_empty(),
        "at the limit is not over it"
    );
    let actions = w.rss(101, 101 * MIB);
    assert_eq!(signals(&actions), [(101, Signal::SIGTERM)]);
    assert!(
        signals(&w.rss(101, 150 * MIB)).is_empty(),
        "one kill per violation"
    );
    let records = records(&w.exit(101));
    assert_eq!(records.len(), 1);
    assert_eq!(
        (records[0].reason, records[0].limit),
        (Reason::Memory, Some(100 * MIB))
    );
    assert_eq!(
        records[0].rss_bytes,
        101 * MIB,
        "the RSS when the kill started"
    );
    assert!(
        w.core.tree().contains(100),
        "the rest of the analysis lives on"
    );
}

#[test]
fn processes_under_their_own_limit_but_over_the_tree_limit_get_the_analysis_killed() {
    let mut w = World::new();
    w.register(
        100,
        "a",
        LimitOverrides {
            tree_memory_bytes: Some(250 * MIB),
            ..Default::default()
        },
    );
    w.fork(101, 100);
    w.fork(102, 100);
    w.rss(100, 80 * MIB);
    w.rss(101, 80 * MIB);
    assert!(signals(&w.rss(102, 80 * MIB)).is_empty(), "240 MiB: under");
    let actions = w.rss(101, 95 * MIB);
    assert_eq!(
        signals(&actions),
        [
            (100, Signal::SIGTERM),
            (101, Signal::SIGTERM),
            (102, Signal::SIGTERM)
        ]
    );
    assert_eq!(w.core.tree().rss_sum(w.key("a")), 255 * MIB);
    assert!(
        signals(&w.rss(102, 90 * MIB)).is_empty(),
        "one kill per analysis"
    );
    w.exit(101);
    w.exit(102);
    let records = records(&w.exit(100));
    assert_eq!(records.len(), 3);
    assert!(
        records.iter().all(|r| r.reason == Reason::TreeMemory
            && r.tree_pss_bytes == Some(255 * MIB)
            && r.tree_rss_bytes == Some(255 * MIB)),
        "each record says what crossed the limit: {records:?}"
    );
}

#[test]
fn the_poll_updates_rss_and_ignores_samples_of_recycled_pids() {
    let mut w = World::new();
    w.register(100, "a", LimitOverrides::default());
    let stranger = ProcRef {
        pid: 100,
        start_ns: start(100) + 10_000_000_000,
    };
    w.core
        .on_poll(&[(stranger, 500 * MIB)], &[], &w.procs, &w.clock);
    assert!(signals(&w.take()).is_empty());
    let root = ProcRef {
        pid: 100,
        start_ns: start(100),
    };
    w.core
        .on_poll(&[(root, 500 * MIB)], &[], &w.procs, &w.clock);
    assert_eq!(signals(&w.take()), [(100, Signal::SIGTERM)]);
}

#[test]
fn a_child_whose_parent_dies_is_an_orphan_killed_with_its_subtree() {
    let mut w = World::new();
    w.register(100, "a", LimitOverrides::default());
    w.fork(101, 100);
    w.fork(102, 101);
    w.fork(103, 102);
    let actions = w.exit(101);
    assert_eq!(
        signals(&actions),
        [(102, Signal::SIGTERM), (103, Signal::SIGTERM)]
    );
    let node = w.core.tree().get(102).unwrap();
    assert!(node.orphan);
    assert_eq!(node.ppid, 1, "the tree follows the kernel's reparenting");
    assert!(!w.core.tree().get(103).unwrap().orphan, "its parent lives");
    w.exit(103);
    let records = records(&w.exit(102));
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].ppid, 101, "recorded with the parent that died");
    assert!(
        records
            .iter()
            .all(|r| r.reason == Reason::Orphan && r.limit.is_none())
    );
}

#[test]
fn a_child_already_dead_when_its_parents_exit_arrives_is_no_orphan() {
    let mut w = World::new();
    w.register(100, "a", LimitOverrides::default());
    w.fork(101, 100);
    w.fork(102, 101);
    w.procs.die(102); // Its own exit is still queued behind its parent's.
    let actions = w.exit(101);
    assert!(signals(&actions).is_empty() && records(&actions).is_empty());
    assert!(!w.core.tree().get(102).unwrap().orphan);
}

#[test]
fn with_orphans_log_an_orphan_is_recorded_and_never_signalled() {
    let mut w = World::new();
    w.register(
        100,
        "a",
        LimitOverrides {
            orphans: Some(OrphanPolicy::Log),
            ..Default::default()
        },
    );
    w.fork(101, 100);
    w.fork(102, 101);
    let actions = w.exit(101);
    assert!(signals(&actions).is_empty());
    let records = records(&actions);
    assert_eq!(records.len(), 1);
    assert_eq!((records[0].pid, records[0].outcome), (102, Outcome::Logged));
    assert!(w.core.tree().get(102).unwrap().orphan);
    assert_eq!(w.core.counters().kills, 0, "a logged orphan is no kill");
}

#[test]
fn a_root_whose_launcher_dies_is_an_orphan() {
    let mut w = World::new();
    w.register(100, "a", LimitOverrides::default());
    w.procs.die(50);
    w.procs.reparent(100, 1);
    let root = ProcRef {
        pid: 100,
        start_ns: start(100),
    };
    w.core.on_launcher_exit(root, &w.procs, &w.clock);
    assert_eq!(signals(&w.take()), [(100, Signal::SIGTERM)]);
}

fn proc_ref(pid: u32) -> ProcRef {
    ProcRef {
        pid,
        start_ns: start(pid),
    }
}

fn watches_parent(actions: &[Action], child: u32, parent: u32) -> bool {
    actions.iter().any(|a| {
        matches!(a, Action::WatchLauncher { root, launcher }
            if *root == proc_ref(child) && *launcher == proc_ref(parent))
    })
}

#[test]
fn a_clone_parent_sibling_of_a_root_is_orphaned_with_it_when_the_launcher_dies() {
    let mut w = World::new();
    w.register(100, "a", LimitOverrides::default());
    let actions = w.fork_clone_parent(101, 100);
    assert!(watches_parent(&actions, 101, 50), "{actions:?}");
    let actions = w.fork_clone_parent(102, 101);
    assert!(watches_parent(&actions, 102, 50), "{actions:?}");
    w.procs.die(50);
    for pid in [100, 101, 102] {
        w.procs.reparent(pid, 1);
        w.core.on_launcher_exit(proc_ref(pid), &w.procs, &w.clock);
    }
    let actions = w.take();
    assert_eq!(
        signals(&actions),
        [
            (100, Signal::SIGTERM),
            (101, Signal::SIGTERM),
            (102, Signal::SIGTERM)
        ]
    );
    assert!(records(&actions).iter().all(|r| r.reason == Reason::Orphan));
}

#[test]
fn a_clone_parent_child_whose_parent_is_gone_when_its_fork_is_read_is_judged_at_once() {
    let mut w = World::new();
    w.register(100, "a", LimitOverrides::default());
    w.procs.spawn(101, 1, start(101));
    w.procs.die(50);
    let key = w.key("a");
    let actions = w.event(KernelEvent::Fork {
        pid: 101,
        ppid: 50,
        analysis: key,
        start_ns: start(101),
        comm: Comm::new("sibling"),
        ts_ns: w.clock.boot_ns,
        untracked: false,
        launched: false,
    });
    assert_eq!(signals(&actions), [(101, Signal::SIGTERM)]);
    assert!(w.core.tree().get(101).unwrap().orphan);
}

#[test]
fn children_of_members_and_of_init_watch_no_parent_and_an_exit_ends_a_parent_watch() {
    let mut w = World::new();
    w.register(100, "a", LimitOverrides::default());
    let actions = w.fork(101, 100);
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::WatchLauncher { .. })),
        "its parent is a member: {actions:?}"
    );
    w.procs.reparent(100, 1);
    let actions = w.fork_clone_parent(102, 100);
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::WatchLauncher { .. })),
        "init never exits: {actions:?}"
    );
    let actions = w.exit(102);
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::ForgetParentWatch(p) if *p == proc_ref(102))),
        "{actions:?}"
    );
    let actions = w.exit(101);
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::ForgetParentWatch(_))),
        "its parent was a member: {actions:?}"
    );
}

#[test]
fn after_a_restart_a_clone_parent_sibling_watches_the_launcher_instead_of_being_judged() {
    let mut before = World::new();
    before.register(100, "a", LimitOverrides::default());
    let key = before.key("a");
    let entry = registry::entry_from_analysis(before.core.registry().get(key).unwrap());
    let mut w = World::new();
    w.clock = before.clock.advanced(Duration::from_secs(1));
    w.procs.spawn(50, 1, start(50));
    w.procs.spawn(100, 50, start(100));
    w.procs.spawn(101, 50, start(101));
    // Orphaned while no daemon ran: its parent died, a subreaper outside took it.
    w.procs.spawn(60, 1, start(60));
    w.procs.spawn(102, 60, start(102));
    w.resume_root_100(key, entry, &[100, 101, 102]);
    let actions = w.take();
    assert!(watches_parent(&actions, 100, 50), "{actions:?}");
    assert!(watches_parent(&actions, 101, 50), "{actions:?}");
    assert_eq!(signals(&actions), [(102, Signal::SIGTERM)]);
    assert!(!w.core.tree().get(101).unwrap().orphan);
}

#[test]
fn a_dry_run_records_what_it_would_kill_and_signals_nothing() {
    let mut w = World::with(limits(), true);
    w.register(100, "a", timeout(1000));
    w.fork(101, 100);
    let actions = w.advance(Duration::from_secs(1));
    assert!(signals(&actions).is_empty());
    let records = records(&actions);
    assert_eq!(records.len(), 2);
    assert!(
        records
            .iter()
            .all(|r| r.outcome == Outcome::DryRun && r.signals.is_empty())
    );
    assert!(
        w.core.tree().contains(100) && w.core.tree().contains(101),
        "both live on"
    );
}

#[test]
fn a_process_gone_before_its_signal_is_recorded_as_already_gone() {
    let mut w = World::new();
    w.register(100, "a", timeout(1000));
    let actions = w.advance(Duration::from_secs(1));
    let order = &only_signal(&actions);
    w.core.on_signal_failed(*order, &w.procs, &w.clock);
    let records = records(&w.take());
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].outcome, Outcome::AlreadyGone);
    assert!(records[0].signals.is_empty());
}

#[test]
fn forks_into_a_dying_analysis_join_the_kill_and_after_the_grace_get_sigkill_at_once() {
    let mut w = World::new();
    w.register(100, "a", timeout(1000));
    w.advance(Duration::from_secs(1));
    assert_eq!(signals(&w.fork(101, 100)), [(101, Signal::SIGTERM)]);
    w.advance(Duration::from_secs(1));
    assert_eq!(signals(&w.fork(102, 100)), [(102, Signal::SIGKILL)]);
}

#[test]
fn a_registration_under_a_dying_analysis_starts_a_new_run_and_its_members_stay_in_the_kill() {
    let mut w = World::new();
    w.register(100, "a", timeout(1000));
    let dying = w.key("a");
    assert_eq!(
        signals(&w.advance(Duration::from_secs(1))),
        [(100, Signal::SIGTERM)]
    );
    // A process started anew under the same id: a run of its own, not killed.
    let info = w.procs.spawn(200, 1, start(200));
    let registration = w
        .core
        .check_register(
            200,
            "a",
            &LimitOverrides::default(),
            &Peer::root(),
            &w.procs,
        )
        .expect("registrable");
    assert!(registration.new_analysis);
    w.core
        .adopt(registration, &[info], &w.clock)
        .expect("adopted");
    assert!(signals(&w.take()).is_empty());
    assert_ne!(w.key("a"), dying);
    // What the dying run forked cannot leave its kill by registering itself, whether
    // its fork event was taken in or is still queued.
    w.fork(101, 100);
    w.procs.spawn(102, 100, start(102));
    for pid in [101, 102] {
        let err = w
            .core
            .check_register(
                pid,
                "a",
                &LimitOverrides::default(),
                &Peer::root(),
                &w.procs,
            )
            .unwrap_err();
        assert!(format!("{err}").contains("being killed"), "{pid}: {err}");
    }
    w.exit(100);
    let records = records(&w.exit(101));
    assert!(
        records
            .iter()
            .all(|r| r.reason == Reason::Timeout && r.pid != 200),
        "{records:?}"
    );
}

#[test]
fn a_member_that_appears_after_the_analysis_kill_ended_is_killed_on_arrival() {
    let mut w = World::new();
    w.register(100, "a", timeout(1000));
    w.fork(101, 100);
    w.advance(Duration::from_secs(1));
    w.exit(100);
    // 101's kill is over when it exits; its child's fork event was lost, and the
    // resync after the loss brings the child back from the kernel map.
    let key = w.key("a");
    w.procs.spawn(102, 101, start(102));
    w.exit(101);
    assert!(w.core.jobs().is_empty());
    w.core
        .resync(&[mapped(102, key)], &w.procs, &w.clock, Resync::LostEvents);
    assert_eq!(signals(&w.take()), [(102, Signal::SIGTERM)]);
}

#[test]
fn an_exit_of_a_recycled_pid_leaves_the_watched_process_alone() {
    let mut w = World::new();
    w.register(100, "a", LimitOverrides::default());
    w.fork(101, 100);
    w.event(KernelEvent::Exit {
        pid: 101,
        analysis: w.key("a"),
        start_ns: start(101) + 50_000_000,
        exit_status: 0,
    });
    assert!(w.core.tree().contains(101));
}

#[test]
fn a_kill_signals_the_process_it_saw_by_pid_and_start_time() {
    let mut w = World::new();
    w.register(100, "a", timeout(1000));
    let actions = w.advance(Duration::from_secs(1));
    assert_eq!(
        only_signal(&actions).target,
        ProcRef {
            pid: 100,
            start_ns: start(100)
        }
    );
}

#[test]
fn what_must_never_be_watched_is_refused_and_nothing_changes() {
    let mut w = World::new();
    w.register(100, "a", LimitOverrides::default());
    w.procs.spawn(SELF_PID, 1, 0);
    let mut kthread = w.procs.spawn(2, 0, 0);
    kthread.kernel_thread = true;
    w.procs.0.borrow_mut().insert(2, kthread);
    w.procs.spawn(200, 1, start(200));
    let refused = |w: &World, pid: u32, id: &str, overrides: LimitOverrides| {
        w.core
            .check_register(pid, id, &overrides, &Peer::root(), &w.procs)
            .unwrap_err()
            .to_string()
    };
    assert!(refused(&w, 1, "x", Default::default()).contains("init"));
    assert!(refused(&w, SELF_PID, "x", Default::default()).contains("daemon itself"));
    assert!(refused(&w, 2, "x", Default::default()).contains("kernel thread"));
    assert!(refused(&w, 4242, "x", Default::default()).contains("no process"));
    assert!(refused(&w, 100, "b", Default::default()).contains("already watched"));
    assert!(refused(&w, 200, " ", Default::default()).contains("empty"));
    assert!(refused(&w, 200, &"x".repeat(300), Default::default()).contains("at most"));
    let zero = LimitOverrides {
        memory_bytes: Some(0),
        ..Default::default()
    };
    assert!(refused(&w, 200, "x", zero).contains("nothing was registered"));
    assert_eq!((w.core.registry().len(), w.core.tree().len()), (1, 1));
    assert!(w.take().is_empty());
}

#[test]
fn a_memory_limit_above_the_machines_memory_is_refused_and_nothing_changes() {
    const GIB: u64 = 1 << 30;
    let machine = 25_163_055_104; // 23.43 GiB
    let mut w = World::new();
    w.core.set_settings(Settings {
        machine_memory: Some(machine),
        ..w.core.settings().clone()
    });
    w.procs.spawn(50, 1, start(50));
    w.procs.spawn(200, 50, start(200));
    let memory = |bytes| LimitOverrides {
        memory_bytes: Some(bytes),
        ..Default::default()
    };
    let refused = w
        .core
        .check_register(200, "big", &memory(64 * GIB), &Peer::root(), &w.procs)
        .unwrap_err()
        .to_string();
    assert_eq!(
        refused,
        "the memory limit 64 GiB is more than this machine's 23.4 GiB: it could never be \
         reached; use at most 23.4 GiB (nothing was registered)"
    );
    assert!(w.core.registry().is_empty() && w.core.tree().is_empty());
    assert!(w.take().is_empty());
    // What the refusal proposes, and the machine's whole memory, are accepted.
    let proposed = crate::vocab::units::parse_size("23.4 GiB").unwrap();
    for fits in [proposed, machine] {
        assert!(
            w.core
                .check_register(200, "big", &memory(fits), &Peer::root(), &w.procs)
                .is_ok()
        );
    }
    // A tree limit above it is reachable (shared pages count once per process).
    let tree = LimitOverrides {
        tree_memory_bytes: Some(64 * GIB),
        ..Default::default()
    };
    assert!(
        w.core
            .check_register(200, "big", &tree, &Peer::root(), &w.procs)
            .is_ok()
    );
}

#[test]
fn a_default_memory_limit_above_the_machines_memory_is_warned_of_not_refused() {
    let mut w = World::new(); // 100 MiB per process by default
    let small = Settings {
        machine_memory: Some(64 * MIB),
        ..w.core.settings().clone()
    };
    let warning = small.unreachable_default().expect("a warning");
    assert!(warning.contains("at most 64 MiB"), "{warning}");
    w.core.set_settings(small);
    w.register(100, "a", LimitOverrides::default());
    assert_eq!(w.core.registry().len(), 1);
    let unknown = Settings {
        machine_memory: None,
        ..w.core.settings().clone()
    };
    assert!(unknown.unreachable_default().is_none());
}

#[test]
fn once_an_analysis_kill_reaches_sigkill_the_kernel_is_told_to_kill_its_forkers() {
    let stops = |actions: &[Action]| {
        actions
            .iter()
            .filter(|a| matches!(a, Action::StopForks(_)))
            .count()
    };
    let mut w = World::new();
    w.register(100, "a", timeout(1000));
    let key = w.key("a");
    let actions = w.advance(Duration::from_secs(1));
    assert_eq!(stops(&actions), 0, "not during the grace");
    let actions = w.advance(Duration::from_secs(60));
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::StopForks(k) if *k == key)),
        "{actions:?}"
    );
    assert_eq!(stops(&w.advance(Duration::from_secs(60))), 0, "once");

    let mut w = World::new();
    w.register(100, "b", LimitOverrides::default());
    w.fork(101, 100);
    w.exit(100);
    assert!(w.core.tree().get(101).unwrap().orphan);
    let actions = w.advance(Duration::from_secs(60));
    assert_eq!(
        stops(&actions),
        0,
        "an orphan's subtree kill leaves the analysis alone"
    );
}

#[test]
fn unregistering_during_a_kills_grace_lets_its_processes_go_and_records_them_released() {
    let mut w = World::new();
    w.register(100, "a", timeout(1000));
    w.fork(101, 100);
    let actions = w.advance(Duration::from_secs(1));
    assert_eq!(
        signals(&actions),
        [(100, Signal::SIGTERM), (101, Signal::SIGTERM)]
    );
    w.core
        .unregister(Some(101), None, &Peer::root(), &w.procs, &w.clock)
        .unwrap();
    let actions = w.take();
    assert!(
        records(&actions).is_empty(),
        "the kill of 100 goes on: {actions:?}"
    );
    let actions = w.advance(Duration::from_secs(60));
    assert_eq!(
        signals(&actions),
        [(100, Signal::SIGKILL)],
        "101 was let go"
    );
    let actions = w.exit(100);
    let records = records(&actions);
    let outcomes: Vec<(u32, Outcome)> = records.iter().map(|r| (r.pid, r.outcome)).collect();
    assert_eq!(outcomes, [(100, Outcome::Killed), (101, Outcome::Released)]);
    assert_eq!(records[1].signals.len(), 1, "its SIGTERM is told");
}

#[test]
fn a_target_whose_pid_names_another_process_when_it_is_described_keeps_no_command_line() {
    let mut w = World::new();
    let target = w.timed_out_undescribed();
    // The root exited and a stranger took its pid before the description was read.
    w.procs.die(100);
    w.procs.spawn(100, 1, start(100) + 5_000_000_000);
    w.core.on_described(
        &[(target, w.procs.details(target))],
        &[],
        &w.procs,
        &w.clock,
    );
    let actions = w.exit_event(100, w.key("a"));
    let records = records(&actions);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].cmdline, "", "never the stranger's");
}

#[test]
fn unregistering_stops_watching_and_ends_the_analysis() {
    let mut w = World::new();
    w.register(100, "a", LimitOverrides::default());
    w.fork(101, 100);
    w.core
        .unregister(None, Some("a"), &Peer::root(), &w.procs, &w.clock)
        .unwrap();
    let actions = w.take();
    let unwatched: Vec<u32> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Unwatch(process) => Some(process.pid),
            _ => None,
        })
        .collect();
    assert_eq!(unwatched.len(), 2);
    assert!(w.core.tree().is_empty() && w.core.registry().is_empty());
    assert!(
        w.core
            .unregister(Some(100), None, &Peer::root(), &w.procs, &w.clock)
            .is_err(),
        "not watched any more"
    );
}

#[test]
fn after_a_restart_passed_deadlines_are_enforced_and_processes_orphaned_in_the_gap_are_killed() {
    let mut before = World::new();
    before.register(100, "a", timeout(5000));
    let key = before.key("a");
    let entry = registry::entry_from_analysis(before.core.registry().get(key).unwrap());
    // The daemon was down for 10 s: the deadline passed, 101's parent (102) died, and
    // the root's launcher (50) too.
    let mut w = World::new();
    w.clock = before.clock.advanced(Duration::from_secs(10));
    w.procs.spawn(100, 1, start(100));
    w.procs.spawn(101, 1, start(101));
    w.resume_root_100(key, entry, &[100, 101]);
    let actions = w.take();
    assert_eq!(
        signals(&actions),
        [(100, Signal::SIGTERM), (101, Signal::SIGTERM)]
    );
    assert!(w.core.tree().get(100).unwrap().orphan && w.core.tree().get(101).unwrap().orphan);
    assert!(
        w.core.next_wakeup().is_some_and(|at| at <= w.clock.now),
        "the deadline is due"
    );
    let actions = w.advance(Duration::ZERO);
    assert!(
        signals(&actions).is_empty(),
        "already being killed: no second kill"
    );
    assert!(w.core.registry().get(key).unwrap().violation.is_some());
}

#[test]
fn a_resync_drops_what_the_kernel_map_lost_and_adds_what_it_has() {
    let mut w = World::new();
    w.register(100, "a", LimitOverrides::default());
    w.fork(101, 100);
    let key = w.key("a");
    w.procs.spawn(102, 100, start(102));
    w.core.resync(
        &[mapped(100, key), mapped(102, key), mapped(7, 999)],
        &w.procs,
        &w.clock,
        Resync::LostEvents,
    );
    let actions = w.take();
    assert!(!w.core.tree().contains(101) && w.core.tree().contains(102));
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Unwatch(p) if p.pid == 7)),
        "an unknown analysis' entry"
    );
    assert_eq!(w.core.counters().resyncs, 1);
}

#[test]
fn the_process_table_is_sent_only_when_it_changed() {
    let mut w = World::new();
    w.register(100, "a", LimitOverrides::default());
    let rows = w.core.process_snapshot(&w.clock).unwrap().rows();
    assert_eq!((rows.len(), rows[0].state.as_str()), (1, "running"));
    assert!(w.core.process_snapshot(&w.clock).is_none());
    w.rss(100, MIB);
    assert!(
        w.core.process_snapshot(&w.clock).is_none(),
        "RSS reports change no row"
    );
    w.fork(101, 100);
    assert_eq!(w.core.process_snapshot(&w.clock).unwrap().rows().len(), 2);
}

fn reasons(actions: &[Action]) -> Vec<&'static str> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Record(r) => Some(r.reason.as_str()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_fork_bomb_past_max_processes_kills_its_analysis_and_no_other() {
    let mut w = World::new();
    let cap = LimitOverrides {
        max_processes: Some(3),
        ..Default::default()
    };
    w.register(100, "bomb", cap);
    w.register(200, "calm", LimitOverrides::default());
    w.fork(101, 100);
    w.fork(102, 100);
    assert!(
        signals(&w.fork(201, 200)).is_empty(),
        "another analysis forks freely"
    );
    let actions = w.fork(103, 100);
    assert_eq!(
        signals(&actions),
        [
            (100, Signal::SIGTERM),
            (101, Signal::SIGTERM),
            (102, Signal::SIGTERM),
            (103, Signal::SIGTERM)
        ],
        "the fourth process is one too many: the whole analysis goes"
    );
    let bomb = w.key("bomb");
    assert_eq!(
        w.core.registry().get(bomb).unwrap().violation,
        Some((Reason::MaxProcesses, Some(3)))
    );
    assert_eq!(
        signals(&w.fork(104, 103)),
        [(104, Signal::SIGTERM)],
        "forks while dying join the kill"
    );
    let mut records = Vec::new();
    for pid in [100, 101, 102, 103, 104] {
        records.extend(reasons(&w.exit(pid)));
    }
    assert_eq!(
        records, ["max_processes"; 5],
        "one record per killed process"
    );
    assert!(w.core.tree().contains(200) && w.core.tree().contains(201));
}

#[test]
fn where_the_kernel_refuses_forks_a_burst_is_one_record_and_the_trees_count_kills_nothing() {
    let mut w = World::new();
    w.core.set_settings(Settings {
        kernel_refuses_forks: true,
        ..w.core.settings().clone()
    });
    let cap = LimitOverrides {
        max_processes: Some(3),
        ..Default::default()
    };
    w.register(100, "bomb", cap);
    w.fork(101, 100);
    w.fork(102, 100);
    // A fork read before the exit that made room for it: the tree counts 4 for a
    // moment, which kills nothing here.
    assert!(signals(&w.fork(103, 100)).is_empty());
    assert!(signals(&w.exit(101)).is_empty());
    let bomb = w.key("bomb");
    let burst = RefusalBurst {
        analysis: bomb,
        refused: 250,
        pid: 102,
        first_ns: w.clock.boot_ns - 2_000_000_000,
        total: 250,
    };
    w.core.forks_refused(&[burst], &w.procs, &w.clock);
    let actions = w.take();
    assert!(signals(&actions).is_empty(), "nothing signalled");
    let records = records(&actions);
    let [record] = records.as_slice() else {
        panic!("one record for the burst: {records:#?}");
    };
    assert_eq!(
        (record.reason, record.outcome),
        (Reason::MaxProcesses, Outcome::Refused)
    );
    assert_eq!((record.pid, record.ppid), (102, 100));
    assert_eq!((record.limit, record.refused_forks), (Some(3), Some(250)));
    assert!(
        actions.iter().any(
            |a| matches!(a, Action::RefusalsRecorded { analysis, total: 250 } if *analysis == bomb)
        ),
        "marked recorded, so no daemon records it again"
    );
    assert_eq!(w.core.registry().get(bomb).unwrap().violation, None);
}

#[test]
fn a_child_the_full_map_could_not_take_is_followed_and_the_largest_analysis_pays_for_it() {
    let mut w = World::new();
    w.register(100, "hog", LimitOverrides::default());
    for pid in 101..110 {
        w.fork(pid, 100);
    }
    w.register(200, "victim", LimitOverrides::default());
    let actions = w.fork_untracked(201, 200);
    let killed: Vec<u32> = signals(&actions).iter().map(|(pid, _)| *pid).collect();
    assert_eq!(
        killed,
        (100..110).collect::<Vec<_>>(),
        "the hog is killed, the victim is not"
    );
    assert!(
        w.core.tree().contains(201),
        "the untracked child is in the tree"
    );
    let victim = w.key("victim");
    assert_eq!(
        w.core.untracked(),
        [(
            ProcRef {
                pid: 201,
                start_ns: start(201)
            },
            victim,
            crate::vocab::limits::RssLevels {
                limit: 100 * MIB,
                warn: 0
            }
        )]
    );
    assert_eq!(w.core.counters().untracked_forks, 1);
    // A second child that cannot be put in the map: the hog is dying already.
    assert!(signals(&w.fork_untracked(202, 200)).is_empty());
    // Room again: 201 goes back into the map with the grandchild it forked meanwhile.
    w.procs.spawn(203, 201, start(203));
    let grandchild = w.procs.0.borrow()[&203].clone();
    let process = ProcRef {
        pid: 201,
        start_ns: start(201),
    };
    w.core.retracked(
        process,
        Retrack::Watched(vec![grandchild]),
        &w.procs,
        &w.clock,
    );
    assert_eq!(w.core.tree().get(203).map(|n| n.analysis), Some(victim));
    // 202 exited before it could be put back: no exit event comes, the rules end it.
    w.procs.die(202);
    let process = ProcRef {
        pid: 202,
        start_ns: start(202),
    };
    w.core.retracked(process, Retrack::Gone, &w.procs, &w.clock);
    assert!(!w.core.tree().contains(202) && w.core.untracked().is_empty());
    assert!(w.core.registry().get(victim).unwrap().violation.is_none());
}

#[test]
fn a_map_entry_whose_pid_now_names_another_process_is_dropped_not_adopted() {
    let mut w = World::new();
    w.register(100, "a", LimitOverrides::default());
    let key = w.key("a");
    // The map remembers pid 300 as started at 1 s; pid 300 is now a process started
    // at 5 s, nobody's.
    w.procs.spawn(300, 1, 5_000_000_000);
    let stale = ProcRef {
        pid: 300,
        start_ns: 1_000_000_000,
    };
    w.core.resync(
        &[mapped(100, key), (stale, key)],
        &w.procs,
        &w.clock,
        Resync::LostEvents,
    );
    assert!(
        !w.core.tree().contains(300),
        "the new owner of the pid is not adopted"
    );
    assert!(
        w.core
            .take_actions()
            .iter()
            .any(|a| matches!(a, Action::Unwatch(p) if *p == stale))
    );
}

// ---- who may do what (issue 11) ---------------------------------------------------------

const ALICE: u32 = 1001;
const BOB: u32 = 1002;
const ADMIN_GID: u32 = 600;

impl World {
    /// Registers `root` as `caller` would: the rules' checks, the descendants checked
    /// as the daemon does before anything is put in the kernel map, then adoption of
    /// the root and every living descendant (what the walk would watch).
    fn register_as(&mut self, caller: &Peer, root: u32, id: &str) -> Result<Registered> {
        let registration =
            self.core
                .check_register(root, id, &LimitOverrides::default(), caller, &self.procs)?;
        let below = self.descendants_of(root);
        let refs: Vec<ProcRef> = below.iter().map(ProcInfo::proc_ref).collect();
        self.core
            .check_descendants(&registration, &refs, &self.procs)?;
        let mut watched = vec![registration.root.clone()];
        watched.extend(below);
        self.core.adopt(registration, &watched, &self.clock)
    }

    fn descendants_of(&self, root: u32) -> Vec<ProcInfo> {
        let all: Vec<ProcInfo> = self.procs.0.borrow().values().cloned().collect();
        let mut out = Vec::new();
        let mut stack = vec![root];
        while let Some(pid) = stack.pop() {
            for child in all.iter().filter(|p| p.ppid == pid && p.pid != pid) {
                stack.push(child.pid);
                out.push(child.clone());
            }
        }
        out
    }

    fn unregister_as(
        &mut self,
        caller: &Peer,
        pid: Option<u32>,
        id: Option<&str>,
    ) -> Result<usize> {
        self.core
            .unregister(pid, id, caller, &self.procs, &self.clock)
    }

    /// (analyses, watched processes): what a refusal must leave as it was.
    fn sizes(&self) -> (usize, usize) {
        (self.core.registry().len(), self.core.tree().len())
    }

    fn owner(&self, id: &str) -> u32 {
        self.core.registry().get(self.key(id)).expect("known").owner
    }
}

#[test]
fn a_user_may_register_only_processes_that_run_as_themselves() {
    let mut w = World::new();
    let (alice, bob) = (Peer::user(ALICE, &[]), Peer::user(BOB, &[]));
    w.procs.spawn_as(100, 1, ALICE);
    w.procs.spawn_as(101, 100, ALICE);
    w.procs.spawn_as(200, 1, BOB);
    w.procs.spawn(300, 1, start(300)); // root's
    let Registered { watched, .. } = w.register_as(&alice, 100, "a").unwrap();
    assert_eq!(watched, 2, "the root and its descendant");
    assert_eq!(w.owner("a"), ALICE);
    w.take();
    for (victim, runs_as) in [(200, BOB), (300, 0)] {
        let refused = w.register_as(&alice, victim, "b").unwrap_err().to_string();
        assert_eq!(
            refused,
            format!(
                "refused by rule own-processes: pid {victim} (p{victim}) runs as uid {runs_as}, \
                 and you are uid {ALICE}: only root or a member of the admin group may watch \
                 another user's processes (a setuid program is its owner's); register a \
                 process of your own (nothing was registered)"
            )
        );
        assert!(!refused.contains('\n'), "one line");
        assert_eq!(w.sizes(), (1, 2), "nothing changed");
        assert!(w.take().is_empty(), "nothing asked of the kernel");
    }
    // Her setuid program (real uid hers, effective root's) is not hers.
    w.procs.spawn_setuid(400, 1, ALICE, 0);
    let refused = w.register_as(&alice, 400, "s").unwrap_err().to_string();
    assert!(
        refused.contains(&format!(
            "runs as uid {ALICE} (effective uid 0, saved uid 0)"
        )),
        "{refused}"
    );
    // Bob registers his own, into an analysis of his own.
    w.register_as(&bob, 200, "b").unwrap();
    assert_eq!(w.owner("b"), BOB);
}

#[test]
fn one_descendant_of_another_user_refuses_the_whole_registration() {
    let mut w = World::new();
    let alice = Peer::user(ALICE, &[]);
    w.procs.spawn_as(100, 1, ALICE);
    w.procs.spawn_as(101, 100, ALICE);
    w.procs.spawn(102, 101, start(102)); // e.g. under sudo: root's
    let refused = w.register_as(&alice, 100, "a").unwrap_err().to_string();
    assert!(
        refused.starts_with(
            "refused by rule own-processes: pid 102 (p102), a descendant of pid 100, runs as \
             uid 0, and you are uid 1001"
        ),
        "{refused}"
    );
    assert!(refused.ends_with("(nothing was registered)"), "{refused}");
    assert_eq!(w.sizes(), (0, 0));
    assert!(w.take().is_empty());
    // Root may register the same tree.
    w.register_as(&Peer::root(), 100, "a").unwrap();
    assert_eq!(w.sizes(), (1, 3));
    assert_eq!(w.owner("a"), 0, "owned by who created it");
}

#[test]
fn a_user_cannot_join_unregister_or_strip_another_users_analysis() {
    let mut w = World::new();
    let (alice, bob) = (Peer::user(ALICE, &[]), Peer::user(BOB, &[]));
    w.procs.spawn_as(100, 1, ALICE);
    w.procs.spawn_as(200, 1, BOB);
    w.register_as(&alice, 100, "a").unwrap();
    w.take();
    let joined = w.register_as(&bob, 200, "a").unwrap_err().to_string();
    assert_eq!(
        joined,
        "refused by rule own-analyses: analysis \"a\" was created by uid 1001, and you are \
         uid 1002: only its owner, root or a member of the admin group may add processes to \
         it; pick another --analysis-id (nothing was registered)"
    );
    let by_id = w
        .unregister_as(&bob, None, Some("a"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        by_id,
        "refused by rule own-analyses: analysis \"a\" was created by uid 1001, and you are \
         uid 1002: only its owner, root or a member of the admin group may unregister it \
         (nothing was unregistered)"
    );
    let by_pid = w
        .unregister_as(&bob, Some(100), None)
        .unwrap_err()
        .to_string();
    assert!(
        by_pid.starts_with("refused by rule own-processes: pid 100 (p100) runs as uid 1001"),
        "{by_pid}"
    );
    assert_eq!(w.sizes(), (1, 1), "alice's analysis is untouched");
    assert!(w.take().is_empty());
    // A process of bob's that root put in alice's analysis is alice's to unregister
    // only if it runs as alice: it does not.
    w.procs.spawn_as(201, 1, BOB);
    w.register_as(&Peer::root(), 201, "a").unwrap();
    let theirs = w
        .unregister_as(&alice, Some(201), None)
        .unwrap_err()
        .to_string();
    assert!(theirs.contains("rule own-processes"), "{theirs}");
    // Alice unregisters her own process, then her analysis.
    assert_eq!(w.unregister_as(&alice, Some(100), None).unwrap(), 1);
    w.unregister_as(&alice, None, Some("a")).unwrap();
    assert_eq!(w.sizes(), (0, 0));
}

#[test]
fn unregistering_a_process_cannot_reach_into_another_users_analysis_below_it() {
    let mut w = World::new();
    let alice = Peer::user(ALICE, &[]);
    w.procs.spawn_as(100, 1, ALICE);
    w.register_as(&alice, 100, "a").unwrap();
    // A child of alice's process that bob owns, registered (by root) in bob's analysis
    // before its parent was: the tree holds it below 100.
    w.procs.spawn_as(101, 100, BOB);
    let (key_b, info) = (w.core.registry().next_key(), w.procs.read(101).unwrap());
    let registration = w
        .core
        .check_register(
            101,
            "b",
            &LimitOverrides::default(),
            &Peer::root(),
            &w.procs,
        )
        .unwrap();
    w.core.adopt(registration, &[info], &w.clock).unwrap();
    w.take();
    let refused = w
        .unregister_as(&alice, Some(100), None)
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("rule own-analyses") && refused.contains("analysis \"b\""),
        "{refused}"
    );
    assert_eq!(w.sizes(), (2, 2));
    assert!(w.core.tree().get(101).is_some_and(|n| n.analysis == key_b));
}

#[test]
fn root_and_the_admin_group_may_do_everything() {
    let mut w = World::new();
    w.core.set_settings(Settings {
        admin_gid: Some(ADMIN_GID),
        ..w.core.settings().clone()
    });
    let (alice, bob) = (Peer::user(ALICE, &[]), Peer::user(BOB, &[]));
    let admin = Peer::user(1003, &[100, ADMIN_GID]);
    let admin_by_primary_group = Peer {
        gid: ADMIN_GID,
        ..Peer::user(1004, &[])
    };
    for peer in [&Peer::root(), &admin, &admin_by_primary_group] {
        assert!(w.core.is_admin(peer), "{peer:?}");
    }
    for peer in [&alice, &bob, &Peer::http()] {
        assert!(!w.core.is_admin(peer), "{peer:?}");
    }
    w.procs.spawn_as(100, 1, ALICE);
    w.procs.spawn_as(200, 1, BOB);
    w.procs.spawn(300, 1, start(300));
    w.register_as(&alice, 100, "a").unwrap();
    // The admin adds bob's and root's processes to alice's analysis.
    w.register_as(&admin, 200, "a").unwrap();
    w.register_as(&admin, 300, "a").unwrap();
    assert_eq!(w.owner("a"), ALICE, "joining does not change the owner");
    assert_eq!(w.sizes(), (1, 3));
    w.unregister_as(&admin_by_primary_group, Some(200), None)
        .unwrap();
    w.unregister_as(&Peer::root(), None, Some("a")).unwrap();
    assert_eq!(w.sizes(), (0, 0));
    // Test faults are theirs alone.
    let refused = crate::core::admin_only(&alice, "a test fault").to_string();
    assert_eq!(
        refused,
        "refused by rule admin-only: a test fault is for root and members of the admin group \
         (--admin-group), and you are uid 1001"
    );
}

#[test]
fn the_owner_is_in_dump_tree_kill_records_and_the_process_table() {
    let mut w = World::new();
    let alice = Peer::user(ALICE, &[]);
    w.procs.spawn_as(100, 1, ALICE);
    w.register_as(&alice, 100, "a").unwrap();
    let crate::api::protocol::Reply::Tree {
        processes,
        analyses,
    } = crate::api::report::dump_tree(&w.core, None, &w.procs, &w.clock).unwrap()
    else {
        panic!("a tree")
    };
    assert_eq!(
        (processes[0].owner_uid, analyses[0].owner_uid),
        (ALICE, ALICE)
    );
    let snapshot = w.core.process_snapshot(&w.clock).expect("changed");
    assert_eq!(snapshot.rows()[0].owner_uid, ALICE);
    w.take();
    w.advance(Duration::from_secs(61)); // past the 60 s timeout
    let actions = w.exit(100);
    let killed = records(&actions);
    assert_eq!(killed.len(), 1);
    assert_eq!(killed[0].owner_uid, Some(ALICE));
}

#[test]
fn a_chain_ten_thousand_deep_is_dumped_depth_first_and_crosses_the_socket() {
    let mut w = World::new();
    w.register(100, "deep", LimitOverrides::default());
    for pid in 101..=10_100 {
        w.fork(pid, pid - 1);
    }
    w.fork(20_000, 100); // a second child of the root, after the whole chain
    let reply = crate::api::report::dump_tree(&w.core, None, &w.procs, &w.clock).unwrap();
    let text = serde_json::to_string(&reply).unwrap();
    let crate::api::protocol::Reply::Tree { processes, .. } = serde_json::from_str(&text).unwrap()
    else {
        panic!("a tree")
    };
    assert_eq!(processes.len(), 10_002);
    for (i, node) in processes[..10_001].iter().enumerate() {
        assert_eq!((node.pid, node.depth), (100 + i as u32, i as u32));
    }
    assert_eq!(
        (processes[10_001].pid, processes[10_001].depth),
        (20_000, 1)
    );
}

#[test]
fn a_grandchild_adopted_by_a_subreaper_of_its_own_analysis_is_no_orphan() {
    let mut w = World::new();
    w.register(100, "a", LimitOverrides::default());
    w.fork(101, 100);
    w.fork(102, 101);
    // 100 is a subreaper: when 101 dies, 102 is 100's.
    let actions = w.exit_to(101, Some(100));
    assert!(signals(&actions).is_empty(), "adopted, not orphaned");
    assert_eq!(
        w.core.tree().get(102).map(|n| (n.ppid, n.orphan)),
        Some((100, false))
    );
    // Reparented to init instead, it is an orphan as before.
    w.fork(103, 100);
    w.fork(104, 103);
    assert_eq!(signals(&w.exit(103)), [(104, Signal::SIGTERM)]);
}

#[test]
fn children_not_yet_reparented_are_looked_at_again_before_anything_is_decided() {
    let mut w = World::new();
    w.register(100, "a", LimitOverrides::default());
    w.fork(101, 100);
    w.fork(102, 101);
    let actions = w.exit_to(101, None);
    assert!(
        signals(&actions).is_empty(),
        "nothing decided while /proc names the dead parent"
    );
    assert_eq!(
        w.core.next_wakeup(),
        Some(w.clock.now + Duration::from_millis(1)),
        "the first look again comes a millisecond later"
    );
    // Still not reparented at the next looks: still nothing decided.
    for _ in 0..3 {
        assert!(signals(&w.advance(Duration::from_millis(8))).is_empty());
        assert_eq!(w.core.tree().get(102).map(|n| n.ppid), Some(101));
    }
    // Then the kernel gives it to the analysis' subreaper: adopted, nobody signalled.
    w.procs.reparent(102, 100);
    let actions = w.advance(Duration::from_millis(16));
    assert!(signals(&actions).is_empty());
    assert_eq!(w.core.tree().get(102).map(|n| n.ppid), Some(100));
    // The same, reparented to init: an orphan at the next look.
    w.fork(103, 100);
    w.fork(104, 103);
    w.exit_to(103, None);
    w.procs.reparent(104, 1);
    assert_eq!(
        signals(&w.advance(Duration::from_millis(1))),
        [(104, Signal::SIGTERM)]
    );
}

#[test]
fn a_child_never_shown_reparented_is_judged_after_the_last_look() {
    let mut w = World::new();
    w.register(100, "a", LimitOverrides::default());
    w.fork(101, 100);
    w.fork(102, 101);
    w.exit_to(101, None);
    // /proc names the dead parent at every look (1, 3, 7 and 15 ms after the exit):
    // nothing decided for 30 ms.
    for _ in 0..30 {
        assert!(signals(&w.advance(Duration::from_millis(1))).is_empty());
    }
    // The last look (31 ms after the exit) judges it as it stands: its parent is dead,
    // outside the analysis, so it is an orphan.
    assert_eq!(
        signals(&w.advance(Duration::from_millis(1))),
        [(102, Signal::SIGTERM)]
    );
}

/// A 1 GiB tree limit, and per-process limits out of the way.
fn pool_limits() -> LimitOverrides {
    LimitOverrides {
        tree_memory_bytes: Some(1024 * MIB),
        memory_bytes: Some(4096 * MIB),
        ..Default::default()
    }
}

#[test]
fn a_pool_sharing_its_parents_pages_is_measured_by_pss_and_lives_under_the_tree_limit() {
    let mut w = World::new();
    w.register(100, "pool", pool_limits());
    // A parent holding 600 MiB forks 3 workers sharing it: RSS 4 x 600, PSS 4 x 150.
    for pid in 101..104 {
        w.fork(pid, 100);
    }
    for pid in 100..104 {
        w.pss(pid, 150 * MIB);
    }
    for pid in 100..104 {
        assert!(
            signals(&w.rss_shared(pid, 600 * MIB)).is_empty(),
            "2.4 GiB of RSS, 600 MiB of PSS"
        );
    }
    // Each worker writes its own 300 MiB copy: the PSS sum passes 1 GiB.
    for pid in 101..104 {
        w.pss(pid, 450 * MIB);
    }
    // Measured a moment ago: the next measure waits its turn, then kills.
    assert!(signals(&w.rss_shared(101, 900 * MIB)).is_empty());
    assert!(w.core.next_wakeup().is_some(), "a measure is due");
    let actions = w.advance(Duration::from_millis(200));
    assert_eq!(
        signals(&actions).len(),
        4,
        "the analysis is killed once its PSS crosses"
    );
    assert_eq!(
        w.core.registry().get(w.key("pool")).unwrap().violation,
        Some((Reason::TreeMemory, Some(1024 * MIB)))
    );
}

#[test]
fn growth_below_every_process_report_is_seen_in_the_kernels_sum_of_the_tree() {
    let mut w = World::new();
    w.register(100, "growers", pool_limits());
    for pid in 101..=200 {
        w.fork(pid, 100);
    }
    // Each process reported 20 MiB, then grew by 7 MiB (below the report step): the
    // daemon's own sum stays at 2 GiB of RSS while the PSS climbs past the limit.
    for pid in 100..=200 {
        w.pss(pid, 2 * MIB);
        assert!(signals(&w.rss_shared(pid, 20 * MIB)).is_empty());
    }
    // The measures these reports asked for find the PSS under the limit.
    assert!(signals(&w.advance(Duration::from_millis(200))).is_empty());
    for pid in 100..=200 {
        w.pss(pid, 12 * MIB);
    }
    let key = w.key("growers");
    assert!(
        signals(&w.advance(Duration::from_secs(1))).is_empty(),
        "no report, no measure"
    );
    let actions = w.event(KernelEvent::TreeRss {
        analysis: key,
        rss_sum: 101 * 27 * MIB,
    });
    assert_eq!(signals(&actions).len(), 101, "the tree is killed");
    assert_eq!(
        w.core.registry().get(key).unwrap().violation,
        Some((Reason::TreeMemory, Some(1024 * MIB)))
    );
}

#[test]
fn copy_on_write_raises_pss_without_rss_and_the_poll_measures_it_again() {
    let mut w = World::new();
    w.register(100, "pool", pool_limits());
    w.fork(101, 100);
    w.pss(100, 300 * MIB);
    w.pss(101, 300 * MIB);
    w.rss_shared(100, 600 * MIB);
    assert!(signals(&w.rss_shared(101, 600 * MIB)).is_empty());
    // 101 writes to the shared pages: same RSS, its PSS grows; no kernel report.
    w.pss(101, 800 * MIB);
    let key = w.key("pool");
    let samples = [
        (
            ProcRef {
                pid: 100,
                start_ns: start(100),
            },
            600 * MIB,
        ),
        (
            ProcRef {
                pid: 101,
                start_ns: start(101),
            },
            600 * MIB,
        ),
    ];
    w.core.on_poll(&samples, &[], &w.procs, &w.clock);
    assert_eq!(signals(&w.take()).len(), 2);
    assert!(w.core.registry().get(key).unwrap().violation.is_some());
}

#[test]
fn with_the_pss_metric_a_process_over_its_limit_by_shared_pages_only_lives() {
    let mut w = World::new(); // 100 MiB per process
    w.core.set_settings(Settings {
        memory_metric: crate::vocab::limits::MemoryMetric::Pss,
        quotas: Default::default(),
        ..w.core.settings().clone()
    });
    w.register(100, "a", LimitOverrides::default());
    w.pss(100, 60 * MIB);
    assert!(
        signals(&w.rss_shared(100, 150 * MIB)).is_empty(),
        "PSS 60 MiB"
    );
    w.pss(100, 120 * MIB);
    assert_eq!(
        signals(&w.rss_shared(100, 160 * MIB)),
        [(100, Signal::SIGTERM)]
    );
}

// ---- zombies and warnings (issue 12) ------------------------------------------------------

impl World {
    /// `pid` exits and its parent does not wait for it.
    fn exit_unreaped(&mut self, pid: u32) -> Vec<Action> {
        let analysis = self.core.tree().get(pid).map_or(0, |n| n.analysis);
        self.procs.die_unreaped(pid);
        self.exit_event(pid, analysis)
    }
}

fn zombie_limit(max: u64) -> LimitOverrides {
    LimitOverrides {
        max_zombies: Some(max),
        ..Default::default()
    }
}

#[test]
fn a_process_holding_more_zombies_than_its_limit_is_killed_alone_and_the_record_says_how_many() {
    let mut w = World::new();
    w.register(100, "a", zombie_limit(2));
    w.fork(101, 100);
    for child in 102..=104 {
        w.fork(child, 101);
    }
    w.exit_unreaped(102);
    w.exit_unreaped(103);
    assert!(
        signals(&w.advance(ZOMBIE_SETTLE)).is_empty(),
        "at the limit"
    );
    let key = w.key("a");
    assert_eq!(w.core.zombies().in_analysis(key), 2);
    assert_eq!(w.core.zombies().held_by(101), 2);
    assert!(
        signals(&w.exit_unreaped(104)).is_empty(),
        "asked a moment later"
    );
    assert_eq!(
        signals(&w.advance(ZOMBIE_SETTLE)),
        [(101, Signal::SIGTERM)],
        "past it, the holder alone"
    );
    // The holder dies; its zombies go to init (which reaps them here).
    for zombie in 102..=104 {
        w.procs.reap(zombie);
    }
    let records = records(&w.exit(101));
    assert_eq!(records.len(), 1);
    assert_eq!(
        (
            records[0].pid,
            records[0].reason,
            records[0].limit,
            records[0].zombies
        ),
        (101, Reason::Zombies, Some(2), Some(3))
    );
    assert!(
        w.core.tree().contains(100),
        "the rest of the analysis lives on"
    );
    w.advance(REPARENT_WINDOW);
    assert_eq!(w.core.zombies().len(), 0, "reaped zombies are forgotten");
}

#[test]
fn zombies_under_the_limit_or_reaped_in_time_cost_nothing() {
    let mut w = World::new();
    w.register(100, "a", zombie_limit(2));
    for child in 101..=104 {
        w.fork(child, 100);
    }
    w.exit_unreaped(101);
    w.exit_unreaped(102);
    w.advance(ZOMBIE_SETTLE);
    assert_eq!(w.core.zombies().held_by(100), 2);
    // The parent reaps both before the next one exits: looked at again, not killed.
    w.procs.reap(101);
    w.procs.reap(102);
    w.exit_unreaped(103);
    assert!(signals(&w.advance(ZOMBIE_SETTLE)).is_empty());
    assert_eq!(w.core.zombies().held_by(100), 1);
    w.procs.reap(103);
    w.advance(ZOMBIE_SWEEP_EVERY);
    assert_eq!(
        w.core.zombies().len(),
        0,
        "the sweep forgets what was reaped"
    );
    // Exits reaped at once (the common case) are never zombies.
    w.exit(104);
    w.advance(ZOMBIE_SETTLE);
    assert_eq!(w.core.zombies().len(), 0);
}

#[test]
fn zombies_handed_to_a_subreaper_of_the_analysis_move_to_it_and_others_are_forgotten() {
    let mut w = World::new();
    w.register(100, "a", zombie_limit(5));
    w.fork(101, 100);
    w.fork(102, 101);
    w.fork(103, 101);
    w.exit_unreaped(102);
    w.exit_unreaped(103);
    w.advance(ZOMBIE_SETTLE);
    assert_eq!(w.core.zombies().held_by(101), 2);
    // 101 dies; the kernel hands its zombies to 100, a subreaper of the analysis.
    w.procs.0.borrow_mut().remove(&101);
    for zombie in [102, 103] {
        if let Some(z) = w.procs.3.borrow_mut().get_mut(&zombie) {
            z.ppid = 100;
        }
    }
    w.exit_event(101, w.key("a"));
    w.advance(REPARENT_WINDOW);
    assert_eq!(
        (w.core.zombies().held_by(101), w.core.zombies().held_by(100)),
        (0, 2)
    );
    // Handed outside the analysis (to init), they are not its zombies any more.
    for zombie in [102, 103] {
        if let Some(z) = w.procs.3.borrow_mut().get_mut(&zombie) {
            z.ppid = 1;
        }
    }
    w.advance(ZOMBIE_SWEEP_EVERY);
    assert_eq!(w.core.zombies().len(), 0);
}

#[test]
fn zombies_of_a_parent_outside_the_analysis_are_not_counted() {
    let mut w = World::new();
    w.register(100, "a", zombie_limit(1));
    // The root's parent (the launcher, pid 50) is not watched.
    w.exit_unreaped(100);
    w.advance(ZOMBIE_SETTLE);
    assert_eq!(w.core.zombies().len(), 0);
}

fn warn_at(percent: u8, more: LimitOverrides) -> LimitOverrides {
    LimitOverrides {
        warn_at_percent: Some(percent),
        ..more
    }
}

fn warnings(actions: &[Action]) -> Vec<(u32, Option<Reason>, Option<u64>)> {
    records(actions)
        .into_iter()
        .filter(|r| r.reason == Reason::Warning)
        .map(|r| {
            assert_eq!(r.outcome, Outcome::Warned);
            (r.pid, r.warned_of, r.limit)
        })
        .collect()
}

#[test]
fn the_root_is_warned_once_at_the_timeouts_warning_level_then_killed_at_the_deadline() {
    let mut w = World::new();
    w.register(100, "a", warn_at(80, timeout(10_000)));
    w.fork(101, 100);
    assert_eq!(
        w.core.next_wakeup(),
        Some(w.clock.now + Duration::from_secs(8))
    );
    assert!(signals(&w.advance(Duration::from_millis(7999))).is_empty());
    let actions = w.advance(Duration::from_millis(1));
    assert_eq!(signals(&actions), [(100, Signal::SIGUSR1)], "the root only");
    assert_eq!(
        warnings(&actions),
        [(100, Some(Reason::Timeout), Some(10_000))]
    );
    assert!(
        signals(&w.advance(Duration::from_millis(1000))).is_empty(),
        "once"
    );
    let actions = w.advance(Duration::from_millis(1000));
    assert_eq!(
        signals(&actions),
        [(100, Signal::SIGTERM), (101, Signal::SIGTERM)]
    );
    assert_eq!(w.core.counters().kills, 0, "a warning is no kill");
}

#[test]
fn memory_warnings_come_once_per_limit_with_the_chosen_signal() {
    let mut w = World::new();
    let overrides = LimitOverrides {
        warn_signal: Some("SIGUSR2".into()),
        tree_memory_bytes: Some(150 * MIB),
        ..warn_at(80, LimitOverrides::default())
    };
    w.register(100, "a", overrides);
    w.fork(101, 100);
    assert!(signals(&w.rss(101, 79 * MIB)).is_empty());
    let actions = w.rss(101, 80 * MIB);
    assert_eq!(signals(&actions), [(100, Signal::SIGUSR2)]);
    assert_eq!(
        warnings(&actions),
        [(100, Some(Reason::Memory), Some(100 * MIB))]
    );
    assert!(signals(&w.rss(101, 90 * MIB)).is_empty(), "once per limit");
    // The tree's own level: 80% of 150 MiB, counted by PSS.
    let actions = w.rss(100, 30 * MIB);
    assert_eq!(
        warnings(&actions),
        [(100, Some(Reason::TreeMemory), Some(150 * MIB))]
    );
    // Then the limit itself, as ever.
    assert_eq!(signals(&w.rss(101, 101 * MIB)), [(101, Signal::SIGTERM)]);
}

#[test]
fn without_warn_at_nobody_is_warned() {
    let mut w = World::new();
    w.register(100, "a", timeout(1000));
    w.rss(100, 99 * MIB);
    assert!(signals(&w.advance(Duration::from_millis(999))).is_empty());
}

#[test]
fn a_kill_record_waits_for_what_the_effects_read_before_the_first_signal() {
    let mut w = World::new();
    w.register(100, "a", timeout(1000));
    w.clock = w.clock.advanced(Duration::from_secs(1));
    w.core.on_tick(&w.procs, &w.clock);
    // Taken raw: the description is not answered yet.
    let actions = w.core.take_actions();
    let order = &only_signal(&actions);
    assert!(
        order.describe,
        "the first signal asks for the target's description"
    );
    let target = order.target;
    // It exits before its description is back: the kill is not over, no record yet.
    assert!(records(&w.exit(100)).is_empty());
    let described = Details {
        cmdline: "python fit.py".into(),
        uid: 1234,
        rss_bytes: 7 * MIB,
    };
    w.core
        .on_described(&[(target, described)], &[], &w.procs, &w.clock);
    let records = records(&w.take());
    assert_eq!(records.len(), 1);
    assert_eq!(
        (
            records[0].cmdline.as_str(),
            records[0].uid,
            records[0].rss_bytes
        ),
        ("python fit.py", 1234, 7 * MIB)
    );
}

#[test]
fn a_target_described_after_its_grace_gets_its_sigkill_with_the_description() {
    let mut w = World::new();
    let target = w.timed_out_undescribed();
    // The grace ends before its first signal went out: no SIGKILL ahead of it.
    w.clock = w.clock.advanced(Duration::from_secs(2));
    w.core.on_tick(&w.procs, &w.clock);
    assert!(signals(&w.core.take_actions()).is_empty());
    w.core.on_described(
        &[(target, w.procs.details(target))],
        &[],
        &w.procs,
        &w.clock,
    );
    assert_eq!(signals(&w.take()), vec![(100, Signal::SIGKILL)]);
}

#[test]
fn the_cores_refusals_carry_the_kind_a_client_branches_on() {
    use crate::vocab::error::{ErrorKind, kind_of};
    let mut w = World::new();
    let alice = Peer::user(ALICE, &[]);
    let kind = |err: anyhow::Error| kind_of(&err, ErrorKind::Internal);
    let unknown = w
        .unregister_as(&Peer::root(), Some(4242), None)
        .unwrap_err();
    assert_eq!(kind(unknown), ErrorKind::NotFound);
    let no_analysis = w
        .unregister_as(&Peer::root(), None, Some("nope"))
        .unwrap_err();
    assert_eq!(kind(no_analysis), ErrorKind::NotFound);
    w.procs.spawn_as(200, 1, BOB);
    let theirs = w.register_as(&alice, 200, "a").unwrap_err();
    assert_eq!(kind(theirs), ErrorKind::Refused);
    let init = w.register_as(&Peer::root(), 1, "a").unwrap_err();
    assert_eq!(kind(init), ErrorKind::Refused);
    let empty = w.register_as(&Peer::root(), 200, " ").unwrap_err();
    assert_eq!(kind(empty), ErrorKind::BadRequest);
    let gone = w.register_as(&Peer::root(), 4242, "a").unwrap_err();
    assert_eq!(kind(gone), ErrorKind::NotFound);
}

#[test]
fn a_first_signal_that_could_not_be_sent_is_not_in_the_record_even_when_the_target_exited_first() {
    let mut w = World::new();
    w.register(100, "a", timeout(1000));
    w.clock = w.clock.advanced(Duration::from_secs(1));
    w.core.on_tick(&w.procs, &w.clock);
    let actions = w.core.take_actions();
    let order = &only_signal(&actions);
    let order = *order;
    // Its exit was queued before the effects found its pid naming another process.
    assert!(records(&w.exit(100)).is_empty());
    w.core.on_described(
        &[(order.target, Details::default())],
        &[order],
        &w.procs,
        &w.clock,
    );
    let records = records(&w.take());
    assert_eq!(records.len(), 1);
    assert!(records[0].signals.is_empty(), "{:?}", records[0].signals);
    assert_eq!(records[0].outcome, Outcome::AlreadyGone);
}

#[test]
fn a_retry_under_a_killed_analysis_id_is_a_new_run_that_inherits_nothing() {
    let mut w = World::new();
    let timeout = LimitOverrides {
        timeout_ms: Some(2000),
        ..Default::default()
    };
    w.register(100, "fit", timeout.clone());
    let first = w.key("fit");
    w.fork(101, 100);
    let actions = w.advance(Duration::from_secs(2));
    assert_eq!(signals(&actions).len(), 2, "the first run is killed");
    w.exit(100);
    w.exit(101);
    assert!(
        w.core.registry().get(first).is_some(),
        "the killed run lingers"
    );
    // The retry, within the linger: its own run, its own clock.
    let actions = w.register(200, "fit", timeout);
    assert!(signals(&actions).is_empty(), "never killed on arrival");
    let second = w.key("fit");
    assert_ne!(second, first);
    assert!(w.core.registry().violation(second).is_none());
    // A fork event of the first run still queued is killed, and joins nothing new.
    w.procs.spawn(102, 1, start(102));
    let late = w.event(KernelEvent::Fork {
        pid: 102,
        ppid: 101,
        analysis: first,
        start_ns: start(102),
        comm: Comm::new("late"),
        ts_ns: w.clock.boot_ns,
        untracked: false,
        launched: false,
    });
    assert_eq!(signals(&late), [(102, Signal::SIGTERM)]);
    assert_eq!(w.core.tree().get(102).map(|n| n.analysis), Some(first));
    assert_eq!(w.core.run_state(second), RunState::Running);
    w.exit(102);
    assert!(
        signals(&w.advance(Duration::from_millis(1999))).is_empty(),
        "its deadline counts from its own registration"
    );
    assert_eq!(
        signals(&w.advance(Duration::from_millis(1))),
        [(200, Signal::SIGTERM)]
    );
}

#[test]
fn joining_a_running_analysis_with_other_limits_is_refused_naming_its_limits() {
    let mut w = World::new();
    w.register(
        100,
        "shared",
        LimitOverrides {
            timeout_ms: Some(4000),
            ..Default::default()
        },
    );
    w.procs.spawn(200, 50, start(200));
    let other = LimitOverrides {
        timeout_ms: Some(3_600_000),
        memory_bytes: Some(50 * MIB),
        ..Default::default()
    };
    let err = w
        .core
        .check_register(200, "shared", &other, &Peer::root(), &w.procs)
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("timeout 4s (asked: 1h)"), "{text}");
    assert!(text.contains("memory 100 MiB (asked: 50 MiB)"), "{text}");
    assert_eq!(
        crate::vocab::error::kind_of(&err, crate::vocab::error::ErrorKind::Internal),
        crate::vocab::error::ErrorKind::Refused
    );
    let same = LimitOverrides {
        timeout_ms: Some(4000),
        ..Default::default()
    };
    for overrides in [LimitOverrides::default(), same] {
        let joined = w
            .core
            .check_register(200, "shared", &overrides, &Peer::root(), &w.procs)
            .expect("the same limits, or none asked: it joins");
        assert!(!joined.new_analysis);
        assert_eq!(joined.limits.timeout_ms, 4000);
    }
}

#[test]
fn a_run_ends_with_the_kills_made_in_it_and_a_root_killed_is_said() {
    let mut w = World::new();
    w.register(
        100,
        "r",
        LimitOverrides {
            timeout_ms: Some(1000),
            ..Default::default()
        },
    );
    let run = w.key("r");
    w.fork(101, 100);
    w.advance(Duration::from_secs(1));
    w.exit(101);
    assert_eq!(w.core.run_state(run), RunState::Running, "the root lives");
    w.exit(100);
    let RunState::Ended(kills) = w.core.run_state(run) else {
        panic!("ended once all is gone");
    };
    assert_eq!(kills.len(), 1);
    assert_eq!(
        (kills[0].reason, kills[0].limit, kills[0].processes),
        (Reason::Timeout, Some(1000), 2)
    );
    assert_eq!(
        kills[0].roots,
        [crate::core::runs::RootKilled {
            pid: 100,
            signal: "SIGTERM".into()
        }]
    );
    w.advance(DYING_LINGER);
    assert!(w.core.registry().get(run).is_none(), "forgotten");
    assert!(
        matches!(w.core.run_state(run), RunState::Ended(_)),
        "still told after it is forgotten"
    );
    assert_eq!(w.core.run_state(run + 100), RunState::Unknown);
    // A run that ends by itself ends with no kills.
    w.register(300, "calm", LimitOverrides::default());
    let calm = w.key("calm");
    w.exit(300);
    assert_eq!(w.core.run_state(calm), RunState::Ended(Vec::new()));
}

impl World {
    /// Launcher `launcher` (started by pid 40) launches analysis `id`.
    fn launch(&mut self, launcher: u32, id: &str, overrides: LimitOverrides) -> Vec<Action> {
        self.procs.spawn(40, 1, start(40));
        self.procs.spawn(launcher, 40, start(launcher));
        let registration = self
            .core
            .check_launch(launcher, id, &overrides, &Peer::root(), &self.procs)
            .expect("launchable");
        self.core.launch(registration, &self.clock);
        self.take()
    }

    /// The kernel puts `pid`, forked by launcher `launcher`, in its analysis.
    fn launched(&mut self, pid: u32, launcher: u32, id: &str) -> Vec<Action> {
        self.procs.spawn(pid, launcher, start(pid));
        let analysis = self.key(id);
        self.event(KernelEvent::Fork {
            pid,
            ppid: launcher,
            analysis,
            start_ns: start(pid),
            comm: Comm::new("python"),
            ts_ns: self.clock.boot_ns,
            untracked: false,
            launched: true,
        })
    }
}

#[test]
fn a_launchers_children_are_the_analysis_on_one_clock_and_the_launcher_is_never_touched() {
    let mut w = World::new();
    let actions = w.launch(
        50,
        "block",
        LimitOverrides {
            timeout_ms: Some(5000),
            ..Default::default()
        },
    );
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::WatchLauncher { root, launcher } if root == launcher && launcher.pid == 50)),
        "its exit is watched: {actions:?}"
    );
    assert!(!w.core.tree().contains(50), "the launcher is no member");
    // Steps run one after the other: each ends before the next starts, all on the
    // block's one clock.
    for (step, pid) in [60, 61, 62].into_iter().enumerate() {
        let actions = w.launched(pid, 50, "block");
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::SaveRoot(p, _) if *p == pid)),
            "a root of the analysis"
        );
        w.advance(Duration::from_millis(1500));
        if step < 2 {
            w.exit(pid);
        }
    }
    let actions = w.advance(Duration::from_millis(500));
    assert_eq!(
        signals(&actions),
        [(62, Signal::SIGTERM)],
        "the block's budget is spent at 5 s, the launcher untouched"
    );
    w.exit(62);
    // After the deadline, a new child is killed on arrival; the launch goes on.
    assert_eq!(
        signals(&w.launched(63, 50, "block")),
        [(63, Signal::SIGTERM)]
    );
    w.exit(63);
    // Unregistering the analysis ends the launch.
    w.core
        .unregister(None, Some("block"), &Peer::root(), &w.procs, &w.clock)
        .ok();
    let actions = w.take();
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Unlaunch(l) if l.pid == 50)),
        "{actions:?}"
    );
}

#[test]
fn when_a_launcher_dies_its_children_are_orphans_and_its_launch_ends() {
    let mut w = World::new();
    w.launch(50, "driver", LimitOverrides::default());
    w.launched(60, 50, "driver");
    w.launched(61, 50, "driver");
    let launcher = ProcRef {
        pid: 50,
        start_ns: start(50),
    };
    w.procs.die(50);
    for pid in [50, 60, 61] {
        let root = ProcRef {
            pid,
            start_ns: start(pid),
        };
        w.core.on_launcher_exit(root, &w.procs, &w.clock);
    }
    let actions = w.take();
    let mut signalled = signals(&actions);
    signalled.sort();
    assert_eq!(signalled, [(60, Signal::SIGTERM), (61, Signal::SIGTERM)]);
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Unlaunch(l) if *l == launcher))
    );
    let err = w
        .core
        .check_launch(
            60,
            "other",
            &LimitOverrides::default(),
            &Peer::root(),
            &w.procs,
        )
        .unwrap_err();
    assert!(
        format!("{err}").contains("watched as part of analysis"),
        "{err}"
    );
}

#[test]
fn an_exited_root_leaves_the_pinned_roots_and_a_registration_past_the_pinned_room_is_refused() {
    let mut w = World::new();
    w.register(100, "long", LimitOverrides::default());
    w.fork(101, 100);
    let actions = w.exit(100);
    assert!(
        actions.iter().any(|a| matches!(a, Action::ForgetRoot(100))),
        "{actions:?}"
    );
    assert_eq!(w.core.registry().roots_total(), 0);
    // Fill the pinned maps: one analysis and one root each.
    let cap = watchdog_common::MAX_ANALYSES;
    for pid in 1000..1000 + cap - 1 {
        w.register(pid, &format!("a{pid}"), LimitOverrides::default());
    }
    assert_eq!(w.core.registry().len(), cap as usize);
    let root = w.procs.spawn(90_000, 50, start(90_000));
    let err = w
        .core
        .check_register(
            root.pid,
            "one-too-many",
            &LimitOverrides::default(),
            &Peer::root(),
            &w.procs,
        )
        .unwrap_err();
    assert!(
        format!("{err}").contains("as many as its pinned state keeps"),
        "{err}"
    );
    assert_eq!(
        crate::vocab::error::kind_of(&err, crate::vocab::error::ErrorKind::Internal),
        crate::vocab::error::ErrorKind::Unavailable
    );
    // One ends: there is room again.
    w.exit(1000);
    w.core
        .check_register(
            root.pid,
            "one-too-many",
            &LimitOverrides::default(),
            &Peer::root(),
            &w.procs,
        )
        .expect("room again");
}

#[test]
fn a_user_is_refused_past_their_quotas_and_root_is_not_counted() {
    let mut w = World::new();
    let mut settings = w.core.settings().clone();
    settings.quotas = crate::core::world::Quotas {
        analyses: 3,
        roots: 4,
        ..Default::default()
    };
    w.core.set_settings(settings);
    let alice = Peer::user(ALICE, &[]);
    for pid in 100..103 {
        w.procs.spawn_as(pid, 1, ALICE);
        w.register_as(&alice, pid, &format!("a{pid}")).unwrap();
    }
    w.procs.spawn_as(103, 1, ALICE);
    let refused = w.register_as(&alice, 103, "a103").unwrap_err().to_string();
    assert!(
        refused.starts_with(&format!(
            "refused by quota analyses-per-user: you (uid {ALICE}) hold 3 analyses"
        )) && refused.contains("--user-max-analyses"),
        "{refused}"
    );
    // Into one of hers: one more root is within the roots quota, the next is not.
    w.register_as(&alice, 103, "a100").unwrap();
    w.procs.spawn_as(104, 1, ALICE);
    let refused = w.register_as(&alice, 104, "a100").unwrap_err().to_string();
    assert!(refused.contains("quota roots-per-user"), "{refused}");
    // Root's registrations are not counted against anyone.
    w.procs.spawn(300, 1, start(300));
    w.register_as(&Peer::root(), 300, "root-job").unwrap();
}

#[test]
fn a_user_whose_analyses_made_a_minutes_worth_of_records_registers_again_after_it() {
    let mut w = World::new();
    let mut settings = w.core.settings().clone();
    settings.quotas.records_per_minute = 3;
    w.core.set_settings(settings);
    let alice = Peer::user(ALICE, &[]);
    w.procs.spawn_as(100, 1, ALICE);
    for pid in 101..104 {
        w.procs.spawn_as(pid, 100, ALICE);
    }
    w.register_as(&alice, 100, "burst").unwrap();
    // Its deadline: four records, all kept.
    let signalled = signals(&w.advance(Duration::from_secs(1801)));
    assert_eq!(signalled.len(), 4);
    for pid in [101, 102, 103, 100] {
        w.exit(pid);
    }
    assert_eq!(w.core.recent().len(), 4, "every record kept");
    w.procs.spawn_as(200, 1, ALICE);
    let refused = w.register_as(&alice, 200, "next").unwrap_err().to_string();
    assert!(
        refused.starts_with(&format!(
            "refused by quota records-per-minute: your (uid {ALICE}) analyses made 4 kill records"
        )) && refused.contains("--user-max-records-per-minute"),
        "{refused}"
    );
    // Root is never refused by it; the minute over, she is not either.
    w.procs.spawn(300, 1, start(300));
    w.register_as(&Peer::root(), 300, "root-job").unwrap();
    assert!(w.core.next_wakeup().is_some());
    w.advance(Duration::from_secs(60));
    w.register_as(&alice, 200, "next").unwrap();
}

#[test]
fn a_user_whose_analyses_hold_their_quota_of_processes_is_refused_more() {
    let mut w = World::new();
    let mut settings = w.core.settings().clone();
    settings.quotas.processes = 5;
    w.core.set_settings(settings);
    let alice = Peer::user(ALICE, &[]);
    w.procs.spawn_as(100, 1, ALICE);
    for pid in 101..104 {
        w.procs.spawn_as(pid, 100, ALICE);
    }
    w.register_as(&alice, 100, "four").unwrap();
    w.procs.spawn_as(200, 1, ALICE);
    w.register_as(&alice, 200, "fifth").unwrap();
    w.procs.spawn_as(300, 1, ALICE);
    let refused = w.register_as(&alice, 300, "sixth").unwrap_err().to_string();
    assert!(
        refused.starts_with(&format!(
            "refused by quota processes-per-user: your (uid {ALICE}) analyses hold 5 watched processes"
        )) && refused.contains("--user-max-processes"),
        "{refused}"
    );
    // One of hers ends: room again.
    w.exit(200);
    w.register_as(&alice, 300, "sixth").unwrap();
}

/// The SIGTERMs pinned by `actions`, by pid.
fn saved_sigterms(actions: &[Action]) -> Vec<(u32, KillProgress)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SaveKillProgress(process, progress) => Some((process.pid, **progress)),
            _ => None,
        })
        .collect()
}

fn forgets_sigterm_of(actions: &[Action], pid: u32) -> bool {
    actions
        .iter()
        .any(|a| matches!(a, Action::ForgetKillProgress(p) if p.pid == pid))
}

/// Root 100 (grace 10 s) is sent its timeout's SIGTERM by a daemon that then stops:
/// what that daemon pinned, the analysis as saved, and the clock at the SIGTERM.
fn sigtermed_before_a_restart() -> (AnalysisKey, AnalysisEntry, Vec<(u32, KillProgress)>, Clock) {
    let mut before = World::new();
    let grace = LimitOverrides {
        grace_ms: Some(10_000),
        ..timeout(1000)
    };
    before.register(100, "a", grace);
    let key = before.key("a");
    let entry = registry::entry_from_analysis(before.core.registry().get(key).unwrap());
    let actions = before.advance(Duration::from_secs(1));
    assert_eq!(signals(&actions), [(100, Signal::SIGTERM)]);
    (key, entry, saved_sigterms(&actions), before.clock)
}

/// The restarted daemon's world at `later` after the SIGTERM, root 100 still running.
fn restarted(after_sigterm: &Clock, later: Duration) -> World {
    let mut w = World::new();
    w.clock = after_sigterm.advanced(later);
    w.procs.spawn(50, 1, start(50));
    w.procs.spawn(100, 50, start(100));
    w
}

#[test]
fn a_sigterm_is_pinned_with_the_end_of_its_grace_and_forgotten_with_its_kill() {
    let (key, _, saved, clock) = sigtermed_before_a_restart();
    let [(100, progress)] = saved.as_slice() else {
        panic!("one SIGTERM pinned: {saved:?}");
    };
    assert_eq!(progress.analysis, key);
    assert_eq!(progress.start_ns, start(100));
    assert_eq!(progress.escalate_boot_ns, clock.boot_ns + 10_000_000_000);
    assert_eq!(
        progress.sigterm_unix_ms,
        crate::vocab::units::unix_ms(clock.wall)
    );

    let mut w = World::new();
    w.register(100, "a", timeout(1000));
    w.advance(Duration::from_secs(1));
    let actions = w.exit(100);
    assert!(forgets_sigterm_of(&actions, 100), "{actions:?}");
}

#[test]
fn a_restarted_daemon_sends_no_second_sigterm_and_sigkills_when_the_first_grace_ends() {
    let (key, entry, saved, at_sigterm) = sigtermed_before_a_restart();
    let mut w = restarted(&at_sigterm, Duration::from_secs(3));
    w.resume_root_100_killed(key, entry, &[100], &saved);
    let mut actions = w.take();
    actions.extend(w.advance(Duration::ZERO));
    assert!(
        signals(&actions).is_empty(),
        "no second SIGTERM: {actions:?}"
    );
    assert!(saved_sigterms(&actions).is_empty(), "already pinned");
    // 9.9 s after the SIGTERM, not 10 s after the restart.
    let actions = w.advance(Duration::from_millis(6_900));
    assert!(signals(&actions).is_empty(), "{actions:?}");
    let actions = w.advance(Duration::from_millis(100));
    assert_eq!(signals(&actions), [(100, Signal::SIGKILL)]);

    let actions = w.exit(100);
    let [record] = records(&actions).try_into().expect("one record");
    assert_eq!(record.outcome, Outcome::Killed);
    let names: Vec<&str> = record.signals.iter().map(|s| s.signal.as_str()).collect();
    assert_eq!(names, ["SIGTERM", "SIGKILL"]);
    assert_eq!(
        record.signals[0].at,
        crate::vocab::units::rfc3339(at_sigterm.wall),
        "the earlier daemon's SIGTERM, at its time"
    );
    assert!(forgets_sigterm_of(&actions, 100), "{actions:?}");
}

#[test]
fn a_daemon_restarted_after_the_grace_ended_sigkills_at_once() {
    let (key, entry, saved, at_sigterm) = sigtermed_before_a_restart();
    let mut w = restarted(&at_sigterm, Duration::from_secs(12));
    w.resume_root_100_killed(key, entry, &[100], &saved);
    let mut actions = w.take();
    actions.extend(w.advance(Duration::ZERO));
    assert_eq!(signals(&actions), [(100, Signal::SIGKILL)]);
}

#[test]
fn a_pinned_sigterm_of_a_process_gone_meanwhile_is_forgotten_at_resume() {
    let (key, entry, saved, at_sigterm) = sigtermed_before_a_restart();
    let mut w = restarted(&at_sigterm, Duration::from_secs(3));
    // Pid 100 now names a process started later.
    w.procs.spawn(100, 50, start(100) + 1_000_000_000);
    w.resume_root_100_killed(key, entry, &[], &saved);
    let actions = w.take();
    assert!(forgets_sigterm_of(&actions, 100), "{actions:?}");
}

/// The one signal among `actions` (beside the bookkeeping that comes with it).
fn only_signal(actions: &[Action]) -> SignalOrder {
    let orders: Vec<SignalOrder> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Signal(order) => Some(*order),
            _ => None,
        })
        .collect();
    let [order] = orders.as_slice() else {
        panic!("one signal: {actions:?}");
    };
    *order
}

/// A tmpfs file owned by `uid`, at `path` (None: a memfd).
fn shm_file(ino: u64, path: Option<&str>, uid: u32) -> ShmFile {
    ShmFile {
        dev: 42,
        ino,
        path: path.map(str::to_string),
        uid,
    }
}

/// What a process running as uid 1000 holds in tmpfs: `files`, of which `rss_shmem`
/// bytes are mapped and resident.
fn holding(files: &[(&ShmFile, u64)], rss_shmem: u64) -> Held {
    Held {
        files: files.iter().map(|(f, b)| ((*f).clone(), *b)).collect(),
        rss_shmem,
        uid: 1000,
    }
}

impl World {
    /// Turns on `--remove-shm`.
    fn remove_shm(&mut self) {
        self.core.set_settings(Settings {
            remove_shm: true,
            ..self.core.settings().clone()
        });
    }

    /// A reconcile poll that reads `rss` of each process and what `held` says they
    /// hold in tmpfs.
    fn poll(&mut self, rss: &[(u32, u64)], held: &[(u32, Held)]) -> Vec<Action> {
        let at = |pid: u32| ProcRef {
            pid,
            start_ns: start(pid),
        };
        let samples: Vec<(ProcRef, u64)> = rss.iter().map(|&(pid, b)| (at(pid), b)).collect();
        let held: Vec<(ProcRef, Held)> =
            held.iter().map(|(pid, h)| (at(*pid), h.clone())).collect();
        self.core.on_poll(&samples, &held, &self.procs, &self.clock);
        self.take()
    }

    /// `file` is at its path in tmpfs with `bytes`, or (None) gone.
    fn shm_at_path(&mut self, file: &ShmFile, bytes: Option<u64>) {
        let mut files = self.procs.4.borrow_mut();
        match bytes {
            Some(bytes) => files.insert((file.dev, file.ino), bytes),
            None => files.remove(&(file.dev, file.ino)),
        };
    }

    /// Every member in `pids` exits, deepest first.
    fn exit_all(&mut self, pids: &[u32]) -> Vec<Action> {
        pids.iter().rev().flat_map(|&pid| self.exit(pid)).collect()
    }
}

#[test]
fn a_memfd_outside_the_rss_counts_toward_the_process_limit_at_the_poll() {
    let mut w = World::new(); // 100 MiB per process
    w.register(100, "a", LimitOverrides::default());
    assert!(signals(&w.rss(100, 10 * MIB)).is_empty());
    let memfd = shm_file(1, None, 1000);
    let actions = w.poll(
        &[(100, 10 * MIB)],
        &[(100, holding(&[(&memfd, 400 * MIB)], 0))],
    );
    assert_eq!(signals(&actions), [(100, Signal::SIGTERM)]);
    let record = records(&w.exit(100)).pop().expect("its record");
    assert_eq!(record.reason, Reason::Memory);
    assert_eq!(record.shmem_bytes, Some(400 * MIB));
    assert!(record.shm_left.is_empty(), "a memfd goes with its holders");
}

#[test]
fn tmpfs_pages_already_in_the_rss_are_not_counted_twice() {
    let mut w = World::new(); // 100 MiB per process
    w.register(100, "a", LimitOverrides::default());
    let file = shm_file(1, Some("/dev/shm/x"), 1000);
    // 90 MiB of RSS, 80 of them the file's pages, mapped and touched.
    w.rss(100, 90 * MIB);
    let mapped = holding(&[(&file, 80 * MIB)], 80 * MIB);
    assert!(signals(&w.poll(&[(100, 90 * MIB)], &[(100, mapped)])).is_empty());
    // The file grows by 40 MiB through write(): 130 MiB in all.
    let grown = holding(&[(&file, 120 * MIB)], 80 * MIB);
    let actions = w.poll(&[(100, 90 * MIB)], &[(100, grown)]);
    assert_eq!(signals(&actions), [(100, Signal::SIGTERM)]);
}

#[test]
fn a_file_the_tree_shares_counts_once_and_what_it_left_is_on_the_roots_record_and_removed() {
    let mut w = World::new();
    w.remove_shm();
    let limits = LimitOverrides {
        tree_memory_bytes: Some(200 * MIB),
        memory_bytes: Some(4096 * MIB),
        ..Default::default()
    };
    w.register(100, "pool", limits);
    w.fork(101, 100);
    w.fork(102, 100);
    let rss = [(100, 10 * MIB), (101, 10 * MIB), (102, 10 * MIB)];
    for (pid, bytes) in rss {
        w.rss(pid, bytes);
    }
    let data = shm_file(7, Some("/dev/shm/data"), 1000);
    w.shm_at_path(&data, Some(150 * MIB));
    let held = [
        (101, holding(&[(&data, 150 * MIB)], 0)),
        (102, holding(&[(&data, 150 * MIB)], 0)),
    ];
    assert!(
        signals(&w.poll(&rss, &held)).is_empty(),
        "30 MiB of RSS and one 150 MiB file"
    );
    // The workers let go of the file, which grew: it still holds memory.
    w.shm_at_path(&data, Some(190 * MIB));
    let actions = w.poll(&rss, &[]);
    assert_eq!(signals(&actions).len(), 3, "220 MiB: the tree is killed");
    let mut finished = w.exit_all(&[100, 101, 102]);
    finished.extend(w.take());
    let records = records(&finished);
    assert_eq!(records.len(), 3);
    let left = ShmLeft {
        path: "/dev/shm/data".into(),
        bytes: 190 * MIB,
    };
    assert_eq!(records[0].pid, 100);
    assert_eq!(records[0].shm_left, [left]);
    assert!(records[1..].iter().all(|r| r.shm_left.is_empty()));
    assert!(records.iter().all(|r| r.shmem_bytes == Some(190 * MIB)));
    let removed: Vec<&ShmFile> = finished
        .iter()
        .filter_map(|a| match a {
            Action::RemoveShm(file) => Some(file),
            _ => None,
        })
        .collect();
    assert_eq!(removed, [&data]);
}

#[test]
fn a_file_gone_stops_counting_and_anothers_file_or_one_out_of_dev_shm_is_never_left_or_removed() {
    let mut w = World::new();
    w.remove_shm();
    let limits = LimitOverrides {
        tree_memory_bytes: Some(200 * MIB),
        timeout_ms: Some(60_000),
        ..Default::default()
    };
    w.register(100, "a", limits);
    w.rss(100, 10 * MIB);
    let own = shm_file(1, Some("/dev/shm/own"), 1000);
    let roots = shm_file(2, Some("/dev/shm/roots"), 0);
    w.shm_at_path(&own, Some(50 * MIB));
    w.shm_at_path(&roots, Some(50 * MIB));
    let held = holding(&[(&own, 50 * MIB), (&roots, 50 * MIB)], 0);
    w.poll(&[(100, 10 * MIB)], &[(100, held)]);
    let key = w.key("a");
    assert_eq!(w.core.world.shm.analysis_bytes(key), 100 * MIB);
    // Let go of both: root's file no longer counts; the own file, once removed, neither.
    w.poll(&[(100, 10 * MIB)], &[]);
    assert_eq!(w.core.world.shm.analysis_bytes(key), 50 * MIB);
    w.shm_at_path(&own, None);
    w.poll(&[(100, 10 * MIB)], &[]);
    assert_eq!(w.core.world.shm.analysis_bytes(key), 0);
    // A results file in /tmp (a tmpfs) counts while held, and is never remembered.
    let results = shm_file(3, Some("/tmp/results.csv"), 1000);
    w.shm_at_path(&results, Some(30 * MIB));
    let held = holding(&[(&results, 30 * MIB)], 0);
    w.poll(&[(100, 10 * MIB)], &[(100, held)]);
    assert_eq!(w.core.world.shm.analysis_bytes(key), 30 * MIB);
    w.poll(&[(100, 10 * MIB)], &[]);
    assert_eq!(w.core.world.shm.analysis_bytes(key), 0);
    // Held again at the deadline: the kill leaves root's file alone.
    let held = holding(&[(&roots, 50 * MIB)], 0);
    w.poll(&[(100, 10 * MIB)], &[(100, held)]);
    assert_eq!(signals(&w.advance(Duration::from_secs(60))).len(), 1);
    let finished = w.exit(100);
    assert!(records(&finished)[0].shm_left.is_empty());
    assert!(!finished.iter().any(|a| matches!(a, Action::RemoveShm(_))));
}

/// Root 100 (grace 4 s) with member 101, which the kernel sent SIGTERM at its memory
/// crossing 1 s before the daemon reads of it: what the kernel's entry holds.
fn struck_a_second_ago() -> (World, KillProgress) {
    let mut w = World::new();
    let grace = LimitOverrides {
        grace_ms: Some(4000),
        ..LimitOverrides::default()
    };
    w.register(100, "a", grace);
    w.fork(101, 100);
    let mut cmdline = [0u8; watchdog_common::KILL_CMDLINE];
    cmdline[..15].copy_from_slice(b"python3\0fit.py\0");
    let kept = KillProgress {
        start_ns: start(101),
        analysis: w.key("a"),
        struck_boot_ns: w.clock.boot_ns - 1_000_000_000,
        struck_rss: 101 * MIB,
        comm: *b"python3\0\0\0\0\0\0\0\0\0",
        uid: 1000,
        cmdline_len: 15,
        cmdline,
        ..KillProgress::default()
    };
    (w, kept)
}

#[test]
fn a_memory_sigterm_the_kernel_sent_is_not_sent_again_and_its_grace_runs_from_it() {
    let (mut w, kept) = struck_a_second_ago();
    w.core.take_up_strikes(&[(101, kept)], &w.procs, &w.clock);
    let actions = w.take();
    assert!(
        signals(&actions).is_empty(),
        "no second SIGTERM: {actions:?}"
    );
    let [(101, pinned)] = saved_sigterms(&actions)[..] else {
        panic!("the kernel's entry taken up: {actions:?}");
    };
    assert_eq!(pinned.escalate_boot_ns, kept.struck_boot_ns + 4_000_000_000);
    assert_eq!(pinned.cmdline_len, 15, "what the kernel read is kept");
    assert!(signals(&w.advance(Duration::from_millis(2900))).is_empty());
    assert_eq!(
        signals(&w.advance(Duration::from_millis(100))),
        [(101, Signal::SIGKILL)],
        "the grace ends 4 s after the kernel's SIGTERM, not the daemon's reading"
    );
    // The kernel's event, read after the kill took its entry up, changes nothing.
    let late = w.event(KernelEvent::Struck {
        process: proc_ref(101),
        analysis: w.key("a"),
        rss_bytes: 101 * MIB,
        ts_ns: kept.struck_boot_ns,
    });
    assert!(signals(&late).is_empty() && records(&late).is_empty());
    let records = records(&w.exit(101));
    let [record] = records.as_slice() else {
        panic!("one record: {records:?}");
    };
    assert_eq!(
        (record.reason, record.limit),
        (Reason::Memory, Some(100 * MIB))
    );
    assert_eq!(record.signals[0].by.as_deref(), Some("kernel"));
    assert_eq!(record.signals[1].signal, "SIGKILL");
    assert_eq!(record.signals[1].by, None);
    assert_eq!(
        record.signals[0].at,
        crate::vocab::units::rfc3339(w.clock.wall - Duration::from_secs(4)),
        "the SIGTERM at the kernel's time"
    );
    assert!(
        w.core.tree().contains(100),
        "the rest of the analysis lives on"
    );
}

#[test]
fn a_kernel_sigterm_of_a_process_gone_before_a_daemon_read_of_it_is_recorded_once_from_its_entry() {
    let (mut w, kept) = struck_a_second_ago();
    let key = w.key("a");
    // It handled its SIGTERM and exited, and both events were lost: the resync drops it.
    w.procs.die(101);
    w.core
        .resync(&[mapped(100, key)], &w.procs, &w.clock, Resync::LostEvents);
    w.core.take_up_strikes(&[(101, kept)], &w.procs, &w.clock);
    let actions = w.take();
    assert!(forgets_sigterm_of(&actions, 101), "{actions:?}");
    let found = records(&actions);
    let [record] = found.as_slice() else {
        panic!("one record: {found:?}");
    };
    assert_eq!(
        (record.pid, record.reason, record.outcome),
        (101, Reason::Memory, Outcome::ExitedAfterSigterm)
    );
    assert_eq!(
        (record.cmdline.as_str(), record.comm.as_str(), record.uid),
        ("python3 fit.py", "python3", 1000)
    );
    assert_eq!(record.rss_bytes, 101 * MIB);
    assert_eq!(record.signals.len(), 1);
    assert_eq!(record.signals[0].by.as_deref(), Some("kernel"));
    assert_eq!(w.core.counters().kernel_strikes, 1);
    // Its event, read now, makes no second record.
    let late = w.event(KernelEvent::Struck {
        process: proc_ref(101),
        analysis: key,
        rss_bytes: 101 * MIB,
        ts_ns: kept.struck_boot_ns,
    });
    assert!(records(&late).is_empty(), "{late:?}");
}
