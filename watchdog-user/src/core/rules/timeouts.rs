//! Timeouts: an analysis past its deadline is killed whole; at `--warn-at` of its
//! timeout, its roots are warned. The deadlines are kept in order by the registry, so
//! the next one is found without looking at all.

use crate::{
    core::{
        procs::Procs,
        world::{Clock, World},
    },
    vocab::limits::Reason,
};

impl World {
    /// When the timeouts next need the clock: the soonest deadline or timeout warning.
    pub fn timeouts_wakeup(&self) -> Option<std::time::Instant> {
        self.registry
            .next_deadline()
            .into_iter()
            .chain(self.registry.next_warning())
            .min()
    }

    /// Kills the analyses whose deadline passed and warns those whose warning is due.
    pub fn timeouts_due(&mut self, procs: &dyn Procs, clock: &Clock) {
        for key in self.registry.due(clock.now) {
            let Some(timeout_ms) = self.registry.get(key).map(|a| a.limits.timeout_ms) else {
                continue;
            };
            self.kill_analysis(key, Reason::Timeout, Some(timeout_ms), clock);
        }
        for key in self.registry.warnings_due(clock.now) {
            let Some(timeout_ms) = self.registry.get(key).map(|a| a.limits.timeout_ms) else {
                continue;
            };
            self.warn(key, Reason::Timeout, timeout_ms, procs, clock);
        }
    }
}
