//! Pinned state that could not be trusted was dropped and the programs loaded afresh:
//! the saved roots still running are watched again, so that the rules resume their
//! analyses as after any restart.

use std::collections::{BTreeSet, HashMap, HashSet};

use watchdog_common::AnalysisEntry;

use crate::{
    app::effects::Effects,
    core::{Clock, Registration, Watch as _, procs::Procs, registry},
    kernel::pins::Salvage,
    vocab::process::{AnalysisKey, same_start},
};

/// What [`rewatch`] put back.
#[derive(Debug, Default)]
pub struct Rewatched {
    pub analyses: usize,
    pub roots: usize,
    pub processes: usize,
}

/// After the pins were dropped and the programs loaded afresh: each saved root still
/// running (same pid, same start time) is watched again with its analysis' limits,
/// with its descendants (the registration walk), and the analysis and root are saved
/// in the fresh maps, so that the rules resume them as after any restart (the deadline
/// is the saved one; a launcher gone meanwhile makes the root an orphan).
pub fn rewatch(
    effects: &mut Effects,
    salvage: Salvage,
    procs: &dyn Procs,
    clock: &Clock,
) -> Rewatched {
    let analyses: HashMap<AnalysisKey, AnalysisEntry> = salvage.analyses.into_iter().collect();
    let mut roots = salvage.roots;
    // Youngest first: a root registered inside another analysis' tree is walked before
    // the older root above it, whose walk then leaves its processes alone.
    roots.sort_by_key(|(_, root)| std::cmp::Reverse(root.start_ns));
    let self_pid = std::process::id();
    let mut taken: HashSet<u32> = HashSet::new();
    let mut done = Rewatched::default();
    let mut kept = BTreeSet::new();
    for (pid, saved) in roots {
        let Some(entry) = analyses.get(&saved.analysis) else {
            continue;
        };
        let Some(info) = procs.read(pid) else {
            continue;
        };
        if pid == self_pid || info.kernel_thread || !same_start(info.start_ns, saved.start_ns) {
            continue;
        }
        let analysis = registry::analysis_from_entry(entry, clock.now, clock.wall);
        let registration = Registration {
            root: info,
            analysis_id: analysis.id,
            key: saved.analysis,
            new_analysis: false,
            limits: analysis.limits,
            launcher: None,
            owner: analysis.owner,
            // Watched again as it was registered: its owner's rights were checked then.
            confined_to: None,
        };
        let key = saved.analysis;
        let watched = effects.watch(
            &registration,
            false,
            &|pid| taken.contains(&pid).then_some(key),
            &|_| Ok(()),
        );
        let watched = match watched {
            Ok(watched) if !watched.is_empty() => watched,
            Ok(_) => continue, // It exited meanwhile.
            Err(err) => {
                tracing::error!(pid, "{err:#}: this root is not watched again");
                continue;
            }
        };
        taken.extend(watched.iter().map(|p| p.pid));
        done.processes += watched.len();
        if let Err(err) = effects.kernel.save_root(pid, &saved) {
            tracing::error!("{err:#}: a restarted daemon will not know root {pid}");
        }
        done.roots += 1;
        kept.insert(key);
    }
    for key in kept {
        if let Err(err) = effects.kernel.save_analysis(key, &analyses[&key]) {
            tracing::error!("{err:#}: a restarted daemon will not know this analysis");
        }
        done.analyses += 1;
    }
    done
}
