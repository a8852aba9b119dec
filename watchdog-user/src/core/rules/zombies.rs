//! Exited processes not yet reaped, by the watched process that holds them (their
//! parent): what the rules count against `--max-zombies` and what `dump-tree`, `status`
//! and /metrics show. The kernel says when a process exits, not when it is reaped, so an
//! entry is only what was true when last looked at: the rules look again in /proc
//! ([`crate::core::procs::Procs::unreaped`]) before acting on it and at every sweep.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::{Duration, Instant},
};

use crate::{
    core::{
        kill::Scope,
        procs::Procs,
        tree::Node,
        world::{Clock, World},
    },
    vocab::{
        limits::Reason,
        process::{AnalysisKey, Comm, ProcRef},
    },
};
/// One exited, unreaped process.
#[derive(Clone, Debug)]
pub struct Zombie {
    pub process: ProcRef,
    /// The watched process holding it (its parent, which has not waited for it).
    pub holder: u32,
    pub analysis: AnalysisKey,
    pub comm: Comm,
}

#[derive(Default)]
pub struct Zombies {
    by_pid: HashMap<u32, Zombie>,
    by_holder: HashMap<u32, BTreeSet<u32>>,
    by_analysis: HashMap<AnalysisKey, usize>,
}

impl Zombies {
    pub fn len(&self) -> usize {
        self.by_pid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_pid.is_empty()
    }

    /// Adds a zombie (replacing an entry of a recycled pid); returns how many its
    /// holder holds now.
    pub fn insert(&mut self, zombie: Zombie) -> usize {
        self.remove(zombie.process.pid);
        let holder = zombie.holder;
        *self.by_analysis.entry(zombie.analysis).or_default() += 1;
        self.by_holder
            .entry(holder)
            .or_default()
            .insert(zombie.process.pid);
        self.by_pid.insert(zombie.process.pid, zombie);
        self.held_by(holder)
    }

    pub fn remove(&mut self, pid: u32) -> Option<Zombie> {
        let zombie = self.by_pid.remove(&pid)?;
        if let Some(held) = self.by_holder.get_mut(&zombie.holder) {
            held.remove(&pid);
            if held.is_empty() {
                self.by_holder.remove(&zombie.holder);
            }
        }
        if let Some(count) = self.by_analysis.get_mut(&zombie.analysis) {
            *count -= 1;
            if *count == 0 {
                self.by_analysis.remove(&zombie.analysis);
            }
        }
        Some(zombie)
    }

    /// How many zombies `holder` holds.
    pub fn held_by(&self, holder: u32) -> usize {
        self.by_holder.get(&holder).map_or(0, BTreeSet::len)
    }

    /// The zombies `holder` holds, by pid.
    pub fn of_holder(&self, holder: u32) -> impl Iterator<Item = &Zombie> + '_ {
        self.by_holder
            .get(&holder)
            .into_iter()
            .flatten()
            .filter_map(|pid| self.by_pid.get(pid))
    }

    /// How many zombies the processes of an analysis hold.
    pub fn in_analysis(&self, analysis: AnalysisKey) -> usize {
        self.by_analysis.get(&analysis).copied().unwrap_or(0)
    }

    /// Zombie counts by analysis.
    pub fn by_analysis(&self) -> BTreeMap<AnalysisKey, usize> {
        self.by_analysis.iter().map(|(k, n)| (*k, *n)).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Zombie> + '_ {
        self.by_pid.values()
    }
}

/// How often the zombies known are looked at again in /proc while there are any: the
/// kernel says when a process exits, not when its parent reaps it.
pub(crate) const ZOMBIE_SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How long after an exit its parent is asked whether it reaped it: long enough for
/// the kernel to have made it a zombie (the exit event comes first) and for a parent
/// that waits at once to have reaped it.
pub(crate) const ZOMBIE_SETTLE: Duration = Duration::from_millis(20);

/// The zombie rule's state: the zombies known, the exits not yet looked at, and when
/// they are next looked at.
#[derive(Default)]
pub struct ZombieWatch {
    pub known: Zombies,
    /// Members that exited since the last sweep, their watched parent not yet asked
    /// whether it reaped them.
    exited_unchecked: Vec<Zombie>,
    /// When the zombies are next looked at again in /proc.
    sweep_at: Option<Instant>,
}

impl ZombieWatch {
    pub fn next_wakeup(&self) -> Option<Instant> {
        self.sweep_at
    }

    /// A member exited: while its pid still names it, the parent that has not reaped
    /// it holds a zombie. Only a watched parent's zombies are counted (one held outside
    /// the analysis, by the shell that registered a root, is nobody's here to act on).
    /// Looked at in /proc a moment later, with the other exits of the moment: most are
    /// reaped by then, and one read of each parent's children tells which are not,
    /// instead of a read per exit on the event path.
    pub(in crate::core) fn maybe_zombie(&mut self, w: &mut World, node: &Node, clock: &Clock) {
        let Some(analysis) = w.tree.get(node.ppid).map(|p| p.analysis) else {
            return;
        };
        self.exited_unchecked.push(Zombie {
            process: node.proc_ref(),
            holder: node.ppid,
            analysis,
            comm: node.comm,
        });
        self.sweep_zombies_at(clock.now + ZOMBIE_SETTLE);
    }

    /// Looks at the zombies again no later than `at`.
    pub(in crate::core) fn sweep_zombies_at(&mut self, at: Instant) {
        self.sweep_at = Some(self.sweep_at.map_or(at, |soonest| soonest.min(at)));
    }

    /// Looks at the exits of the moment and every zombie known in /proc: reaped ones
    /// are forgotten, those the kernel handed to another watched process (a subreaper
    /// of the analysis) move to it, those handed outside the analysis are forgotten
    /// (init's or another's to reap); then the holders' counts are checked.
    pub(in crate::core) fn sweep_zombies(
        &mut self,
        w: &mut World,
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        self.sweep_at = None;
        let known: Vec<Zombie> = self.known.iter().cloned().collect();
        let mut holders: BTreeSet<u32> = known
            .into_iter()
            .filter_map(|zombie| self.track(w, zombie, procs))
            .collect();
        let mut exits: BTreeMap<u32, Vec<Zombie>> = BTreeMap::new();
        for zombie in std::mem::take(&mut self.exited_unchecked) {
            exits.entry(zombie.holder).or_default().push(zombie);
        }
        for (parent, exited) in exits {
            // A living parent's children list names its unreaped ones (zombies stay
            // on it until reaped); a dead parent's were handed on: each is looked at.
            let unreaped = w
                .tree
                .contains(parent)
                .then(|| procs.children(parent))
                .flatten();
            for zombie in exited {
                if unreaped
                    .as_ref()
                    .is_some_and(|listed| !listed.contains(&zombie.process.pid))
                {
                    continue;
                }
                holders.extend(self.track(w, zombie, procs));
            }
        }
        for holder in holders {
            let held = self.known.held_by(holder);
            self.check_zombies(w, holder, held, procs, clock);
        }
        if !self.known.is_empty() {
            self.sweep_zombies_at(clock.now + ZOMBIE_SWEEP_EVERY);
        }
    }

    /// A zombie (known, or just exited) looked at in /proc: kept under whichever
    /// watched process holds it now, or forgotten (reaped, or held outside the
    /// analyses). Returns its holder.
    pub(in crate::core) fn track(
        &mut self,
        w: &mut World,
        zombie: Zombie,
        procs: &dyn Procs,
    ) -> Option<u32> {
        self.known.remove(zombie.process.pid);
        let holder = procs.unreaped(zombie.process)?;
        let analysis = w.tree.get(holder)?.analysis;
        self.known.insert(Zombie {
            holder,
            analysis,
            ..zombie
        });
        Some(holder)
    }

    /// A process holding more zombies than its analysis allows is killed alone (its
    /// zombies go to init, or a subreaper, which reaps them), once; the record says how
    /// many it held. Its zombies are looked at again first: it may have reaped some.
    pub(in crate::core) fn check_zombies(
        &mut self,
        w: &mut World,
        holder: u32,
        held: usize,
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        let Some(key) = w.tree.get(holder).map(|n| n.analysis) else {
            return;
        };
        let Some(max) = w.registry.get(key).map(|a| a.limits.max_zombies) else {
            return;
        };
        if max == 0
            || held as u64 <= max
            || w.registry.violation(key).is_some()
            || w.jobs.iter().any(|j| j.has_target(holder))
        {
            return;
        }
        let known: Vec<Zombie> = self.known.of_holder(holder).cloned().collect();
        for zombie in known {
            self.track(w, zombie, procs);
        }
        let held = self.known.held_by(holder) as u64;
        if held <= max {
            return;
        }
        let mode = w.kill_mode();
        let mut spec = w.job_spec(Scope::Process, Reason::Zombies, key, Some(max), mode);
        spec.zombies = Some(held);
        tracing::warn!(pid = holder, held, max, "a process holds too many zombies");
        w.start_job(spec, &[holder], clock);
    }

    /// The sweep, when it is due.
    pub fn sweep_due(&mut self, w: &mut World, procs: &dyn Procs, clock: &Clock) {
        if self.sweep_at.is_some_and(|at| at <= clock.now) {
            self.sweep_zombies(w, procs, clock);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zombie(pid: u32, holder: u32, analysis: AnalysisKey) -> Zombie {
        Zombie {
            process: ProcRef {
                pid,
                start_ns: u64::from(pid),
            },
            holder,
            analysis,
            comm: Comm::new("z"),
        }
    }

    #[test]
    fn counts_by_holder_and_analysis_follow_inserts_and_removals() {
        let mut zombies = Zombies::default();
        assert_eq!(zombies.insert(zombie(11, 10, 1)), 1);
        assert_eq!(zombies.insert(zombie(12, 10, 1)), 2);
        assert_eq!(zombies.insert(zombie(21, 20, 2)), 1);
        assert_eq!(zombies.in_analysis(1), 2);
        // A recycled pid's new zombie replaces the old entry, not adds to it.
        assert_eq!(zombies.insert(zombie(12, 10, 1)), 2);
        assert_eq!(zombies.len(), 3);
        zombies.remove(11);
        zombies.remove(12);
        assert_eq!((zombies.held_by(10), zombies.in_analysis(1)), (0, 0));
        assert_eq!(zombies.by_analysis(), BTreeMap::from([(2, 1)]));
    }
}
