//! Exited processes not yet reaped, by the watched process that holds them (their
//! parent): what the rules count against `--max-zombies` and what `dump-tree`, `status`
//! and /metrics show. The kernel says when a process exits, not when it is reaped, so an
//! entry is only what was true when last looked at: the rules look again in /proc
//! ([`crate::core::procs::Procs::unreaped`]) before acting on it and at every sweep.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::vocab::process::{AnalysisKey, Comm, ProcRef};

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
