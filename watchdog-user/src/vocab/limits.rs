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

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
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

/// What becomes of a fork that would take an analysis past its `max_processes`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum OnMaxProcesses {
    /// The kernel fails it with EAGAIN (the BPF LSM's task_alloc), as systemd's
    /// TasksMax does; the analysis runs on. Where the BPF LSM is not active: `kill`.
    #[default]
    Refuse,
    /// The analysis is killed once it has more processes than its limit.
    Kill,
}

/// The limit set: one row per limit, and every form of it follows from its row: the
/// `Limits` field the rules read, the `register`/`exec` flag and the request's
/// `limits` field ([`LimitOverrides`]), the `run --default-…` flag and config key (the
/// limit's own name is their alias), its slot in the pinned analysis entry, the words
/// `dump-tree` shows, and the Python client's keyword (`python_table`). A row:
/// `field: Kind = "default", flag "name", run run_field, noun "in refusals", slot N
/// (its place in the pinned entry, never reused), help "one line"`.
macro_rules! for_each_limit {
    ($callback:ident! { $($extra:tt)* }) => {
        $callback! { { $($extra)* }
            timeout_ms: Millis = "30m", flag "timeout", run default_timeout,
                noun "the timeout", slot 0,
                help "Wall-clock limit of the analysis, from its registration, e.g. 90s, 30m, 2h.";
            memory_bytes: Bytes = "2GiB", flag "memory", run default_memory,
                noun "the memory limit", slot 1,
                help "RSS limit of each process, e.g. 512MiB, 2GiB.";
            tree_memory_bytes: OptionalBytes = "none", flag "tree-memory", run default_tree_memory,
                noun "the tree memory limit", slot 2,
                help "Limit on the memory summed over the analysis (PSS), e.g. 8GiB.";
            grace_ms: Millis = "10s", flag "grace", run default_grace,
                noun "the grace period", slot 3,
                help "Time between SIGTERM and SIGKILL.";
            orphans: Orphans = "kill", flag "orphans", run default_orphans,
                noun "the orphan policy", slot 4,
                help "kill: SIGTERM orphans and their subtrees at once; log: only record them.";
            // Far above what a multiprocessing pool uses, far below what a fork bomb
            // reaches.
            max_processes: Count = "10000", flag "max-processes", run default_max_processes,
                noun "the process limit", slot 5,
                help "Most processes at once, 0 for no limit (more: killed as a fork bomb).";
            // Far above what a parent that reaps late leaves for a moment, far below what
            // exhausts the pids of a host (pid_max is 32768 by default).
            max_zombies: Count = "1000", flag "max-zombies", run default_max_zombies,
                noun "the zombie limit", slot 6,
                help "Most exited, unreaped children one process may hold, 0 for no limit (more: the process is killed, so that init reaps them).";
            warn_at_percent: Percent = "off", flag "warn-at", run default_warn_at,
                noun "the warning", slot 7,
                help "Warn the analysis' root at this part of the timeout and of each memory limit, once per limit, e.g. 80%, or off.";
            warn_signal: WarnSignal = "SIGUSR1", flag "warn-signal", run default_warn_signal,
                noun "the warning signal", slot 8,
                help "The warning signal, e.g. SIGUSR1, SIGUSR2, SIGINT.";
        }
    };
}
pub(crate) use for_each_limit;

macro_rules! define_limits {
    ({} $(
        $field:ident: $kind:ident = $default:literal, flag $flag:literal, run $run:ident,
            noun $noun:literal, slot $slot:literal, help $help:literal;
    )+) => {
        /// The limits in force for one analysis.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(default)]
        pub struct Limits {
            $( #[doc = $help] pub $field: <$kind as Kind>::Value, )+
        }

        /// The built-in defaults (a daemon's `run --default-…` replace them).
        impl Default for Limits {
            fn default() -> Self {
                Self { $( $field: $kind::value_of($default), )+ }
            }
        }

        /// What a register/exec request asks to change from the daemon's defaults: the
        /// protocol's `limits` object (serde) and the `register`/`exec` flags (clap,
        /// humane values parsed to ms and bytes).
        #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, clap::Args)]
        #[serde(deny_unknown_fields)]
        pub struct LimitOverrides {
            $(
                #[doc = $help]
                #[arg(long = $flag, value_name = $kind::VALUE_NAME, value_parser = $kind::parse)]
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub $field: Option<<$kind as Kind>::Given>,
            )+
        }

        impl Limits {
            /// These limits with `overrides` applied; a value that is no limit (a zero
            /// timeout would kill at once, which nobody means) is refused.
            pub fn with(&self, overrides: &LimitOverrides) -> Result<Self, String> {
                Ok(Self { $(
                    $field: match &overrides.$field {
                        Some(given) => $kind::take(given, $noun)?,
                        None => self.$field.clone(),
                    },
                )+ })
            }

            /// The pinned entry's form: each limit in its slot.
            pub fn to_slots(&self) -> [u64; LIMIT_SLOTS] {
                let mut slots = [0; LIMIT_SLOTS];
                $( slots[$slot] = $kind::to_slot(&self.$field); )+
                slots
            }

            /// Back from the pinned entry; a slot that holds no valid value (one a
            /// build before this limit left 0) takes the built-in default.
            pub fn from_slots(slots: &[u64; LIMIT_SLOTS]) -> Self {
                let defaults = Self::default();
                Self { $( $field: $kind::from_slot(slots[$slot]).unwrap_or(defaults.$field), )+ }
            }

            /// Each limit by its flag's name, with its value as people write it.
            pub fn shown(&self) -> Vec<(&'static str, String)> {
                vec![ $( ($flag, $kind::show(&self.$field)), )+ ]
            }
        }

        /// The Python client's table of the limits (its `_limits.py`): keyword, the
        /// request's field, the kind of value, the noun its refusals use, the default.
        pub fn python_table() -> String {
            let mut out = String::from(PYTHON_TABLE_HEAD);
            $(
                out += &format!(
                    "    ({:?}, {:?}, {:?}, {:?}, {:?}),\n",
                    $flag.replace('-', "_"), stringify!($field), $kind::PYTHON, $noun, $default
                );
            )+
            out + ")\n"
        }

        #[cfg(test)]
        const SLOTS: &[usize] = &[$($slot),+];
    };
}

for_each_limit!(define_limits! {});

/// Slots in the pinned analysis entry; more than there are limits, so that a new limit
/// takes a free one and the pinned layout stays.
pub use watchdog_common::LIMIT_SLOTS;

const PYTHON_TABLE_HEAD: &str = "\"\"\"The daemon's limit set, one row per limit: the keyword, the request's field, the kind
of value, the noun its refusals use, the daemon's built-in default.

Generated from watchdog-user/src/vocab/limits.rs (its test `the_python_client_has_this_builds_limit_set`
writes it with WATCHDOG_BLESS=1): do not edit.
\"\"\"

LIMITS = (
";

/// One kind of limit value: how people write it, what it is once checked, how it is
/// pinned and shown.
pub trait Kind {
    /// What [`Limits`] holds.
    type Value: Clone + std::fmt::Debug + PartialEq + Serialize + serde::de::DeserializeOwned;
    /// What a request or a flag gives.
    type Given: Clone
        + std::fmt::Debug
        + PartialEq
        + Send
        + Sync
        + Serialize
        + serde::de::DeserializeOwned
        + 'static;
    /// The flag's value name in `--help`.
    const VALUE_NAME: &'static str;
    /// The kind's name in the Python client's table.
    const PYTHON: &'static str;
    /// Humane text (a flag, the config file) to a given value.
    fn parse(text: &str) -> Result<Self::Given, String>;
    /// A given value checked as a limit; `noun` names it in the refusal.
    fn take(given: &Self::Given, noun: &str) -> Result<Self::Value, String>;
    fn show(value: &Self::Value) -> String;
    fn to_slot(value: &Self::Value) -> u64;
    fn from_slot(raw: u64) -> Option<Self::Value>;
    /// A row's default.
    fn value_of(default: &str) -> Self::Value {
        Self::parse(default)
            .and_then(|given| Self::take(&given, "a default"))
            .expect("the limit set's defaults are valid")
    }
}

fn positive(value: u64, noun: &str) -> Result<u64, String> {
    match value {
        0 => Err(format!("{noun} must be more than 0")),
        v => Ok(v),
    }
}

/// A duration, in milliseconds; more than 0.
pub struct Millis;
impl Kind for Millis {
    type Value = u64;
    type Given = u64;
    const VALUE_NAME: &'static str = "DURATION";
    const PYTHON: &'static str = "duration";
    fn parse(text: &str) -> Result<u64, String> {
        crate::vocab::units::parse_duration(text).map(crate::vocab::units::millis)
    }
    fn take(given: &u64, noun: &str) -> Result<u64, String> {
        positive(*given, noun)
    }
    fn show(value: &u64) -> String {
        humantime::format_duration(Duration::from_millis(*value)).to_string()
    }
    fn to_slot(value: &u64) -> u64 {
        *value
    }
    fn from_slot(raw: u64) -> Option<u64> {
        (raw != 0).then_some(raw)
    }
}

/// A size in bytes; more than 0.
pub struct Bytes;
impl Kind for Bytes {
    type Value = u64;
    type Given = u64;
    const VALUE_NAME: &'static str = "SIZE";
    const PYTHON: &'static str = "size";
    fn parse(text: &str) -> Result<u64, String> {
        crate::vocab::units::parse_size(text)
    }
    fn take(given: &u64, noun: &str) -> Result<u64, String> {
        positive(*given, noun)
    }
    fn show(value: &u64) -> String {
        crate::vocab::units::size_rounded(*value, false)
    }
    fn to_slot(value: &u64) -> u64 {
        *value
    }
    fn from_slot(raw: u64) -> Option<u64> {
        (raw != 0).then_some(raw)
    }
}

/// A size in bytes, or none (`none`, or 0 in the pinned entry).
pub struct OptionalBytes;
impl Kind for OptionalBytes {
    type Value = Option<u64>;
    type Given = u64;
    const VALUE_NAME: &'static str = "SIZE";
    const PYTHON: &'static str = "size";
    fn parse(text: &str) -> Result<u64, String> {
        Bytes::parse(text)
    }
    fn take(given: &u64, noun: &str) -> Result<Option<u64>, String> {
        positive(*given, noun).map(Some)
    }
    fn show(value: &Option<u64>) -> String {
        value.as_ref().map_or_else(|| "none".into(), Bytes::show)
    }
    fn to_slot(value: &Option<u64>) -> u64 {
        value.unwrap_or(0)
    }
    fn from_slot(raw: u64) -> Option<Option<u64>> {
        Some((raw != 0).then_some(raw))
    }
    fn value_of(default: &str) -> Option<u64> {
        (default != "none").then(|| Bytes::value_of(default))
    }
}

/// A number of things; 0 is no limit.
pub struct Count;
impl Kind for Count {
    type Value = u64;
    type Given = u64;
    const VALUE_NAME: &'static str = "COUNT";
    const PYTHON: &'static str = "count";
    fn parse(text: &str) -> Result<u64, String> {
        text.trim().parse().map_err(|_| {
            format!("invalid count {text:?}: use a whole number such as 500, or 0 for no limit")
        })
    }
    fn take(given: &u64, _noun: &str) -> Result<u64, String> {
        Ok(*given)
    }
    fn show(value: &u64) -> String {
        match value {
            0 => "none".into(),
            n => n.to_string(),
        }
    }
    fn to_slot(value: &u64) -> u64 {
        *value
    }
    fn from_slot(raw: u64) -> Option<u64> {
        Some(raw)
    }
}

/// A percent of a limit, 1 to 99; 0 (`off`) is none.
pub struct Percent;
impl Kind for Percent {
    type Value = u8;
    type Given = u8;
    const VALUE_NAME: &'static str = "PERCENT";
    const PYTHON: &'static str = "percent";
    fn parse(text: &str) -> Result<u8, String> {
        crate::vocab::units::parse_percent(text)
    }
    fn take(given: &u8, _noun: &str) -> Result<u8, String> {
        match *given {
            p if p >= 100 => Err(format!(
                "the warning at {p}% would come at or after the limit: use 1 to 99 (%), or 0 \
                 for none"
            )),
            p => Ok(p),
        }
    }
    fn show(value: &u8) -> String {
        match value {
            0 => "off".into(),
            p => format!("{p}%"),
        }
    }
    fn to_slot(value: &u8) -> u64 {
        u64::from(*value)
    }
    fn from_slot(raw: u64) -> Option<u8> {
        u8::try_from(raw).ok().filter(|p| *p < 100)
    }
}

/// A signal a process can catch, by its full name; pinned as its number.
pub struct WarnSignal;
impl Kind for WarnSignal {
    type Value = String;
    type Given = String;
    const VALUE_NAME: &'static str = "SIGNAL";
    const PYTHON: &'static str = "signal";
    fn parse(text: &str) -> Result<String, String> {
        parse_warn_signal(text)
    }
    fn take(given: &String, _noun: &str) -> Result<String, String> {
        parse_warn_signal(given)
    }
    fn show(value: &String) -> String {
        value.clone()
    }
    fn to_slot(value: &String) -> u64 {
        value
            .parse::<nix::sys::signal::Signal>()
            .map_or(0, |s| s as u64)
    }
    fn from_slot(raw: u64) -> Option<String> {
        let signal = nix::sys::signal::Signal::try_from(i32::try_from(raw).ok()?).ok()?;
        parse_warn_signal(signal.as_str()).ok()
    }
}

/// What becomes of an orphan: `kill` or `log`.
pub struct Orphans;
impl Kind for Orphans {
    type Value = OrphanPolicy;
    type Given = OrphanPolicy;
    const VALUE_NAME: &'static str = "POLICY";
    const PYTHON: &'static str = "orphans";
    fn parse(text: &str) -> Result<OrphanPolicy, String> {
        <OrphanPolicy as clap::ValueEnum>::from_str(text.trim(), true).map_err(|_| {
            format!(
                "invalid orphan policy {text:?} (possible values: kill, log): kill SIGTERMs \
                 orphans at once, log only records them"
            )
        })
    }
    fn take(given: &OrphanPolicy, _noun: &str) -> Result<OrphanPolicy, String> {
        Ok(*given)
    }
    fn show(value: &OrphanPolicy) -> String {
        match value {
            OrphanPolicy::Kill => "kill".into(),
            OrphanPolicy::Log => "log".into(),
        }
    }
    fn to_slot(value: &OrphanPolicy) -> u64 {
        u64::from(*value == OrphanPolicy::Log)
    }
    fn from_slot(raw: u64) -> Option<OrphanPolicy> {
        match raw {
            0 => Some(OrphanPolicy::Kill),
            1 => Some(OrphanPolicy::Log),
            _ => None,
        }
    }
}

/// A limit as people write it (`30m`, `2GiB`, `80%`, or a bare number), checked as it
/// is read: the form of the `run --default-…` flags and of the config file, whose
/// errors then name their line.
pub struct Humane<K: Kind>(pub K::Given);

impl<K: Kind> Humane<K> {
    /// clap's value parser.
    pub fn parser(text: &str) -> Result<Self, String> {
        K::parse(text).map(Self)
    }
}

impl<K: Kind> Clone for Humane<K> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<K: Kind> std::fmt::Debug for Humane<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de, K: Kind> Deserialize<'de> for Humane<K> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Text(String),
            Number(u64),
        }
        let text = match Written::deserialize(d)? {
            Written::Text(text) => text,
            Written::Number(n) => n.to_string(),
        };
        K::parse(&text).map(Self).map_err(serde::de::Error::custom)
    }
}

/// The RSS levels whose crossing the kernel reports at once (not only every step):
/// the per-process limit, and the warning's level (0: none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RssLevels {
    pub limit: u64,
    pub warn: u64,
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
            warn_signal: "SIGUSR1".into(),
        }
    }
}

impl Limits {
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
    fn every_limit_has_its_own_slot_and_survives_the_pinned_entry() {
        let mut slots = SLOTS.to_vec();
        slots.sort_unstable();
        slots.dedup();
        assert_eq!(slots.len(), SLOTS.len(), "a slot is used twice");
        assert!(
            slots.iter().all(|s| *s < LIMIT_SLOTS),
            "a slot past the entry"
        );
        let limits = Limits::default()
            .with(&LimitOverrides {
                tree_memory_bytes: Some(3 << 30),
                orphans: Some(OrphanPolicy::Log),
                warn_at_percent: Some(80),
                warn_signal: Some("SIGUSR2".into()),
                max_processes: Some(0),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(Limits::from_slots(&limits.to_slots()), limits);
        assert_eq!(
            Limits::from_slots(&[0; LIMIT_SLOTS]).timeout_ms,
            Limits::default().timeout_ms,
            "an empty slot takes the default"
        );
    }

    #[test]
    fn the_defaults_are_the_documented_ones() {
        let d = Limits::default();
        assert_eq!(
            (
                d.timeout_ms,
                d.memory_bytes,
                d.tree_memory_bytes,
                d.grace_ms,
                d.orphans
            ),
            (1_800_000, 2 << 30, None, 10_000, OrphanPolicy::Kill)
        );
        assert_eq!(
            (
                d.max_processes,
                d.max_zombies,
                d.warn_at_percent,
                d.warn_signal.as_str()
            ),
            (10_000, 1_000, 0, "SIGUSR1")
        );
        let shown = d.shown();
        assert!(shown.contains(&("tree-memory", "none".into())), "{shown:?}");
        assert!(shown.contains(&("orphans", "kill".into())), "{shown:?}");
    }

    /// The Python client takes its keywords from this file: it must say what this build
    /// says (WATCHDOG_BLESS=1 writes it).
    #[test]
    fn the_python_client_has_this_builds_limit_set() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../clients/python/src/procwatchdog/_limits.py"
        );
        let table = python_table();
        if std::env::var_os("WATCHDOG_BLESS").is_some() {
            std::fs::write(path, &table).unwrap();
        }
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == table,
            "{path} is not this build's limit set: run WATCHDOG_BLESS=1 cargo test -p \
             watchdog-user limit_set"
        );
    }

    #[test]
    fn overrides_replace_defaults_and_zero_is_refused() {
        let defaults = Limits {
            timeout_ms: 1_800_000,
            grace_ms: 10_000,
            ..Limits::default()
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
