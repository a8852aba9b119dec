//! Limits and rules: what an analysis may use, parsed from humane values, and the
//! reasons a process gets killed.

use crate::vocab::units::parse_warn_signal;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum OrphanPolicy {
    /// SIGTERM (then SIGKILL after the grace) the orphan and its subtree at once.
    Kill,
    /// Only record it.
    Log,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Reason {
    Timeout,
    Memory,
    TreeMemory,
    Orphan,
    /// More processes at once than `--max-processes`: a fork bomb.
    MaxProcesses,
    /// The kernel's watched map could not take a process, and this analysis held the
    /// most of it: killed so that no other analysis loses its tracking.
    MapFull,
    /// A process held more exited, unreaped children than `--max-zombies`: killed, so
    /// that init (or a subreaper) reaps them.
    Zombies,
    /// Not a kill: the analysis' root was sent the warning signal at `--warn-at` of a
    /// limit.
    Warning,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Memory => "memory",
            Self::TreeMemory => "tree_memory",
            Self::Orphan => "orphan",
            Self::MaxProcesses => "max_processes",
            Self::MapFull => "map_full",
            Self::Zombies => "zombies",
            Self::Warning => "warning",
        }
    }
}

/// What the per-process memory limit is compared with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum MemoryMetric {
    /// Resident pages, shared ones included (what `ps` and `top` show): read for free
    /// from the kernel's counters.
    #[default]
    Rss,
    /// Proportional set size: a page shared by N processes counts 1/N in each. Read
    /// from /proc/PID/smaps_rollup (a walk of the address space) when the RSS crosses.
    Pss,
}

/// The limits in force for one analysis.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub timeout_ms: u64,
    /// Per-process RSS limit.
    pub memory_bytes: u64,
    /// Limit on the sum of RSS over the analysis; none by default.
    pub tree_memory_bytes: Option<u64>,
    pub grace_ms: u64,
    pub orphans: OrphanPolicy,
    /// Most processes at once (like systemd's TasksMax); 0: no limit.
    #[serde(default)]
    pub max_processes: u64,
    /// Most exited, unreaped children one process may hold; 0: no limit.
    #[serde(default)]
    pub max_zombies: u64,
    /// Percent of the timeout and of each memory limit at which the analysis' root is
    /// sent `warn_signal`, once per limit; 0: no warning.
    #[serde(default)]
    pub warn_at_percent: u8,
    /// The warning signal, by name (`SIGUSR1`).
    #[serde(default = "default_warn_signal")]
    pub warn_signal: String,
}

/// Default of `--max-processes`: far above what a multiprocessing pool uses, far below
/// what a fork bomb reaches.
pub const DEFAULT_MAX_PROCESSES: u64 = 10_000;
/// Default of `--max-zombies`: far above what a parent that reaps late leaves for a
/// moment, far below what exhausts the pids of a host (pid_max is 32768 by default).
pub const DEFAULT_MAX_ZOMBIES: u64 = 1_000;
/// Default of `--warn-signal`.
pub const DEFAULT_WARN_SIGNAL: &str = "SIGUSR1";

fn default_warn_signal() -> String {
    DEFAULT_WARN_SIGNAL.into()
}

/// The RSS levels whose crossing the kernel reports at once (not only every step):
/// the per-process limit, and the warning's level (0: none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RssLevels {
    pub limit: u64,
    pub warn: u64,
}

/// What a register/exec request asks to change from the daemon's defaults: the one
/// definition of the per-analysis limits, from which the protocol's `limits` object
/// (serde) and the `register`/`exec` flags (clap, humane values parsed to ms and bytes)
/// both follow.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct LimitOverrides {
    /// Wall-clock limit, e.g. 90s, 30m, 2h.
    #[arg(long = "timeout", value_name = "DURATION", value_parser = duration_ms)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// RSS limit of each process, e.g. 512MiB, 2GiB.
    #[arg(long = "memory", value_name = "SIZE", value_parser = crate::vocab::units::parse_size)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Limit on the RSS summed over the analysis.
    #[arg(long = "tree-memory", value_name = "SIZE", value_parser = crate::vocab::units::parse_size)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree_memory_bytes: Option<u64>,
    /// Time between SIGTERM and SIGKILL.
    #[arg(long = "grace", value_name = "DURATION", value_parser = duration_ms)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_ms: Option<u64>,
    /// kill: SIGTERM orphans at once; log: only record them.
    #[arg(long, value_enum)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orphans: Option<OrphanPolicy>,
    /// Most processes at once, 0 for no limit (more: killed as a fork bomb).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_processes: Option<u64>,
    /// Most exited, unreaped children one process may hold, 0 for no limit (more: the
    /// process is killed, so that init reaps them).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_zombies: Option<u64>,
    /// Warn the analysis' root at this part of the timeout and of each memory limit,
    /// e.g. 80%, or off.
    #[arg(long = "warn-at", value_name = "PERCENT", value_parser = crate::vocab::units::parse_percent)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warn_at_percent: Option<u8>,
    /// The warning signal, e.g. SIGUSR1 (the default), SIGUSR2, SIGINT.
    #[arg(long, value_name = "SIGNAL", value_parser = parse_warn_signal)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warn_signal: Option<String>,
}

/// A humane duration as the protocol's milliseconds (clap value parser).
fn duration_ms(text: &str) -> Result<u64, String> {
    crate::vocab::units::parse_duration(text).map(crate::vocab::units::millis)
}

#[cfg(test)]
impl Limits {
    /// A timeout and a per-process memory limit, a 1 s grace, orphans killed, and
    /// nothing else limited or warned of: what the unit tests start from.
    pub fn for_tests(timeout_ms: u64, memory_bytes: u64) -> Self {
        Self {
            timeout_ms,
            memory_bytes,
            tree_memory_bytes: None,
            grace_ms: 1000,
            orphans: OrphanPolicy::Kill,
            max_processes: 0,
            max_zombies: 0,
            warn_at_percent: 0,
            warn_signal: DEFAULT_WARN_SIGNAL.into(),
        }
    }
}

impl Limits {
    /// The defaults with `overrides` applied; a zero limit is refused (it would kill at
    /// once, which nobody means).
    pub fn with(&self, overrides: &LimitOverrides) -> Result<Self, String> {
        let nonzero = |name: &str, v: Option<u64>| match v {
            Some(0) => Err(format!("{name} must be more than 0")),
            other => Ok(other),
        };
        Ok(Self {
            timeout_ms: nonzero("the timeout", overrides.timeout_ms)?.unwrap_or(self.timeout_ms),
            memory_bytes: nonzero("the memory limit", overrides.memory_bytes)?
                .unwrap_or(self.memory_bytes),
            tree_memory_bytes: nonzero("the tree memory limit", overrides.tree_memory_bytes)?
                .or(self.tree_memory_bytes),
            grace_ms: nonzero("the grace period", overrides.grace_ms)?.unwrap_or(self.grace_ms),
            orphans: overrides.orphans.unwrap_or(self.orphans),
            max_processes: overrides.max_processes.unwrap_or(self.max_processes),
            max_zombies: overrides.max_zombies.unwrap_or(self.max_zombies),
            warn_at_percent: match overrides.warn_at_percent {
                Some(p) if p >= 100 => {
                    return Err(format!(
                        "the warning at {p}% would come at or after the limit: use 1 to 99 (%), \
                         or 0 for none"
                    ));
                }
                Some(p) => p,
                None => self.warn_at_percent,
            },
            warn_signal: match &overrides.warn_signal {
                Some(name) => parse_warn_signal(name)?,
                None => self.warn_signal.clone(),
            },
        })
    }

    /// What the kernel reports at once of a process' RSS.
    pub fn rss_levels(&self) -> RssLevels {
        RssLevels {
            limit: self.memory_bytes,
            warn: self.warn_level(self.memory_bytes).unwrap_or(0),
        }
    }

    /// `limit` at the warning's percent (None: no warning).
    pub fn warn_level(&self, limit: u64) -> Option<u64> {
        (self.warn_at_percent != 0)
            .then(|| (u128::from(limit) * u128::from(self.warn_at_percent) / 100) as u64)
    }

    /// The warning signal (SIGUSR1 should the name not be one: names are checked when
    /// limits are made).
    pub fn warn_signal(&self) -> nix::sys::signal::Signal {
        parse_warn_signal(&self.warn_signal)
            .ok()
            .and_then(|name| name.parse().ok())
            .unwrap_or(nix::sys::signal::Signal::SIGUSR1)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn grace(&self) -> Duration {
        Duration::from_millis(self.grace_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::units::parse_percent;

    #[test]
    fn overrides_replace_defaults_and_zero_is_refused() {
        let defaults = Limits {
            timeout_ms: 1_800_000,
            memory_bytes: 2 << 30,
            tree_memory_bytes: None,
            grace_ms: 10_000,
            orphans: OrphanPolicy::Kill,
            max_processes: DEFAULT_MAX_PROCESSES,
            max_zombies: DEFAULT_MAX_ZOMBIES,
            warn_at_percent: 0,
            warn_signal: DEFAULT_WARN_SIGNAL.into(),
        };
        let limits = defaults
            .with(&LimitOverrides {
                timeout_ms: Some(2000),
                orphans: Some(OrphanPolicy::Log),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            (limits.timeout_ms, limits.grace_ms, limits.orphans),
            (2000, 10_000, OrphanPolicy::Log)
        );
        assert!(
            defaults
                .with(&LimitOverrides {
                    memory_bytes: Some(0),
                    ..Default::default()
                })
                .is_err()
        );
    }

    #[test]
    fn warnings_take_a_percent_under_100_and_a_signal_that_can_be_caught() {
        assert_eq!(parse_percent("80%"), Ok(80));
        assert_eq!(parse_percent(" 5 "), Ok(5));
        assert_eq!(parse_percent("off"), Ok(0));
        for bad in ["100%", "150", "-1%", "most"] {
            assert!(parse_percent(bad).unwrap_err().contains("80%"), "{bad}");
        }
        assert_eq!(parse_warn_signal("usr2").as_deref(), Ok("SIGUSR2"));
        assert_eq!(parse_warn_signal("SIGINT").as_deref(), Ok("SIGINT"));
        assert!(
            parse_warn_signal("SIGKILL")
                .unwrap_err()
                .contains("cannot be caught")
        );
        assert!(
            parse_warn_signal("SIGNOPE")
                .unwrap_err()
                .contains("SIGUSR1")
        );
        let limits = Limits {
            grace_ms: 1,
            ..Limits::for_tests(10_000, 100)
        };
        assert_eq!(limits.warn_level(10_000), None, "off by default");
        let warned = limits
            .with(&LimitOverrides {
                warn_at_percent: Some(80),
                warn_signal: Some("usr2".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(warned.warn_level(10_000), Some(8_000));
        assert_eq!(warned.warn_signal(), nix::sys::signal::Signal::SIGUSR2);
        let late = LimitOverrides {
            warn_at_percent: Some(100),
            ..Default::default()
        };
        assert!(limits.with(&late).unwrap_err().contains("1 to 99"));
    }
}
