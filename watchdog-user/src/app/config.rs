//! The daemon's settings: command-line flags, a TOML file with the same names
//! (`--config`), and the defaults, in that order of precedence. SIGHUP re-reads the
//! file; a file that does not parse is refused with its line and the reason, and the
//! running settings stay.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, anyhow};
use serde::Deserialize;

use crate::{
    store::DatabaseUrl,
    vocab::limits::{
        Bytes, Count, Humane, Kind, Limits, Millis, OptionalBytes, Orphans, Percent, WarnSignal,
    },
};

pub const DEFAULT_SOCKET: &str = "/run/watchdog/watchdog.sock";
pub const DEFAULT_SOCKET_GROUP: &str = "watchdog";
const DEFAULT_DATABASE: &str = "sqlite:///var/lib/watchdog/watchdog.db";

/// Adds to `RunArgs` a `--default-…` flag and config key for each limit of the limit
/// set (the limit's own name is an alias: `--grace`, `grace = "5s"`), and its merge and
/// resolution.
macro_rules! run_args {
    ({ $(#[$meta:meta])* pub struct RunArgs { $($fields:tt)* } } $(
        $field:ident: $kind:ident = $default:literal, flag $flag:literal, run $run:ident,
            noun $noun:literal, slot $slot:literal, help $help:literal;
    )+) => {
        $(#[$meta])*
        pub struct RunArgs {
            $($fields)*
            $(
                #[arg(long, alias = $flag, value_name = <$kind as Kind>::VALUE_NAME,
                      help = concat!($help, " [default: ", $default, "]"),
                      value_parser = Humane::<$kind>::parser)]
                #[serde(default, alias = $flag)]
                pub $run: Option<Humane<$kind>>,
            )+
        }

        impl RunArgs {
            /// Each limit's default not given here taken from `file`.
            fn merge_limits(&mut self, file: &RunArgs) {
                $( if self.$run.is_none() { self.$run = file.$run.clone(); } )+
            }

            /// The limits for analyses that set none: these settings over the built-in
            /// defaults.
            fn default_limits(&self) -> Result<Limits> {
                let builtin = Limits::default();
                Ok(Limits { $(
                    $field: match &self.$run {
                        Some(given) => <$kind as Kind>::take(&given.0, $noun)
                            .map_err(|e| anyhow!("{}: {e}", stringify!($run).replace('_', "-")))?,
                        None => builtin.$field,
                    },
                )+ })
            }
        }
    };
}

crate::vocab::limits::for_each_limit!(run_args! {
/// Every `run` setting; each unset one falls back to the file, then the default.
#[derive(clap::Args, Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RunArgs {
    /// TOML file with any of these settings by their long names (flags win).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Control socket [default: /run/watchdog/watchdog.sock].
    #[arg(skip)]
    pub socket: Option<PathBuf>,
    /// Group given the control socket (root:GROUP, mode 0660): its members may use the
    /// watchdog, for their own processes. Where it does not exist the socket stays
    /// root-only [default: watchdog].
    #[arg(long)]
    pub socket_group: Option<String>,
    /// Members of this group may do everything root may: watch and unregister anyone's
    /// processes and analyses [default: none].
    #[arg(long)]
    pub admin_group: Option<String>,
    /// postgres://USER:PASSWORD@HOST/DB or sqlite:///PATH [default: sqlite:///var/lib/watchdog/watchdog.db].
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Where the spool of records waiting for the database lives [default: /var/lib/watchdog].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// bpffs directory where the kernel maps and program links are pinned, so tracking
    /// survives daemon restarts [default: /sys/fs/bpf/watchdog].
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// Drop the pinned state and start afresh.
    #[arg(long)]
    #[serde(skip)]
    pub fresh: bool,
    /// HTTP listener for /status and /metrics, or `none` [default: 127.0.0.1:9477].
    #[arg(long)]
    pub http: Option<String>,
    /// Kernel BTF to read struct offsets from [default: /sys/kernel/btf/vmlinux].
    #[arg(long)]
    pub btf: Option<PathBuf>,
    /// Most analyses one user (not root, not the admin group) may own at once
    /// [default: 1024].
    #[arg(long)]
    pub user_max_analyses: Option<u64>,
    /// Most registered roots one user may have in its analyses at once [default: 4096].
    #[arg(long)]
    pub user_max_roots: Option<u64>,
    /// Watched processes one user's analyses may hold before its new registrations are
    /// refused [default: 16384].
    #[arg(long)]
    pub user_max_processes: Option<u64>,
    /// Kill records one user's analyses may make in a minute before its new
    /// registrations are refused [default: 10000].
    #[arg(long)]
    pub user_max_records_per_minute: Option<u64>,
    /// Reconcile poll interval [default: 30s].
    #[arg(long)]
    #[serde(default, deserialize_with = "duration_text")]
    pub poll_interval: Option<String>,
    /// Log every kill that would be made; signal nothing.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub dry_run: Option<bool>,
    /// Remove the files in tmpfs (/dev/shm) that a killed analysis' members were seen
    /// holding, owned by them and still there when its kill ends (its record lists
    /// them either way).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub remove_shm: Option<bool>,
    /// What the per-process memory limit compares: rss (resident pages, shared ones in
    /// full) or pss (a page shared by N processes counts 1/N) [default: rss]. The tree
    /// limit always counts PSS.
    #[arg(long, value_enum)]
    pub memory_metric: Option<crate::vocab::limits::MemoryMetric>,
    /// A fork past an analysis' --max-processes: refuse (the kernel fails it with
    /// EAGAIN, where the BPF LSM is active) or kill (the analysis is killed)
    /// [default: refuse].
    #[arg(long, value_enum)]
    pub on_max_processes: Option<crate::vocab::limits::OnMaxProcesses>,
    /// Log the kernel programs' error reports (read with aya-log; off: they write none).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub kernel_log: Option<bool>,
    /// Let the kernel programs send a memory kill's SIGTERM themselves, the moment a
    /// process crosses its limit in its own page fault, also while no daemon runs; the
    /// daemon then runs the grace and the SIGKILL. Off: the daemon sends it, a few ms
    /// later [default: true].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub kernel_signals: Option<bool>,
    /// Ring buffer size in bytes (tests use a tiny one to provoke losses).
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub ring_bytes: Option<u32>,
    /// Capacity of the kernel's watched map [default: the host's pid_max]; tests shrink
    /// it to fill it.
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub watched_capacity: Option<u32>,
    /// Accept test-only fault requests (e.g. stall the main loop).
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub test_faults: bool,
}
});

/// Checks a duration while the file is parsed, so its error names the line.
fn duration_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let text = String::deserialize(d)?;
    crate::vocab::units::parse_duration(&text).map_err(serde::de::Error::custom)?;
    Ok(Some(text))
}

/// Everything `run` needs, resolved from the flags and the config file.
pub struct Options {
    pub socket: PathBuf,
    /// Group whose members may connect to the socket.
    pub socket_group: String,
    /// Group whose members may do everything root may.
    pub admin_group: Option<String>,
    pub btf: PathBuf,
    pub ring_bytes: Option<u32>,
    /// Test-only: the watched map's capacity instead of pid_max.
    pub watched_capacity: Option<u32>,
    pub test_faults: bool,
    /// Limits for analyses that do not set their own.
    pub defaults: Limits,
    /// Reconcile poll: RSS of every watched process, and the safety net for the rest.
    pub poll_interval: Duration,
    /// What one user may hold at once.
    pub quotas: crate::core::world::Quotas,
    /// Log every kill that would be made, signal nothing.
    pub dry_run: bool,
    /// Remove what a killed analysis left in tmpfs.
    pub remove_shm: bool,
    /// What the per-process memory limit compares.
    pub memory_metric: crate::vocab::limits::MemoryMetric,
    /// What becomes of a fork past an analysis' process limit.
    pub on_max_processes: crate::vocab::limits::OnMaxProcesses,
    /// The database, or why its URL was refused (the daemon then runs, spooling).
    pub database: Result<DatabaseUrl, String>,
    /// Where the spool (and other state) lives.
    pub state_dir: PathBuf,
    /// bpffs directory of the pinned maps and links.
    pub pin_dir: PathBuf,
    /// Drop pinned state first.
    pub fresh: bool,
    /// Turn the kernel programs' error reports on and forward them to this log.
    pub kernel_log: bool,
    /// Let the programs send a memory kill's SIGTERM themselves.
    pub kernel_signals: bool,
    /// /status and /metrics listener.
    pub http: Option<std::net::SocketAddr>,
    /// What the options were resolved from, to resolve them again on SIGHUP.
    pub args: crate::app::config::RunArgs,
}

impl Options {
    /// Why the programs may not send a memory kill's SIGTERM themselves, if they may
    /// not: they compare RSS, and only signal.
    pub fn memory_strike_off(&self) -> Option<&'static str> {
        if !self.kernel_signals {
            Some("off (kernel-signals = false): the daemon sends it when it hears of the crossing")
        } else if self.dry_run {
            Some("off during a dry run: nothing is signalled")
        } else if self.memory_metric == crate::vocab::limits::MemoryMetric::Pss {
            Some(
                "off with --memory-metric pss: the kernel sees RSS only; the daemon reads PSS and signals",
            )
        } else {
            None
        }
    }

    /// Why the kernel may not refuse forks past an analysis' process limit, if it may
    /// not.
    pub fn fork_refusal_off(&self) -> Option<&'static str> {
        if self.on_max_processes == crate::vocab::limits::OnMaxProcesses::Kill {
            Some("off (on-max-processes = kill): an analysis past --max-processes is killed")
        } else if self.dry_run {
            Some("off during a dry run: no fork is refused")
        } else {
            None
        }
    }
}

impl RunArgs {
    /// The settings file named by --config, parsed; errors carry the line.
    pub fn read_file(&self) -> Result<RunArgs> {
        let Some(path) = &self.config else {
            return Ok(RunArgs::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the config file {}", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            let at = e
                .span()
                .map(|span| {
                    let line = text[..span.start].matches('\n').count() + 1;
                    format!(" at line {line}")
                })
                .unwrap_or_default();
            anyhow!("config file {}{at}: {}", path.display(), e.message())
        })
    }

    /// Flags first, then the file.
    fn merged(&self, file: RunArgs) -> RunArgs {
        let mut all = RunArgs {
            config: self.config.clone(),
            socket: self.socket.clone().or(file.socket.clone()),
            socket_group: self.socket_group.clone().or(file.socket_group.clone()),
            admin_group: self.admin_group.clone().or(file.admin_group.clone()),
            database_url: self.database_url.clone().or(file.database_url.clone()),
            state_dir: self.state_dir.clone().or(file.state_dir.clone()),
            pin_dir: self.pin_dir.clone().or(file.pin_dir.clone()),
            fresh: self.fresh,
            http: self.http.clone().or(file.http.clone()),
            btf: self.btf.clone().or(file.btf.clone()),
            poll_interval: self.poll_interval.clone().or(file.poll_interval.clone()),
            user_max_analyses: self.user_max_analyses.or(file.user_max_analyses),
            user_max_roots: self.user_max_roots.or(file.user_max_roots),
            user_max_processes: self.user_max_processes.or(file.user_max_processes),
            user_max_records_per_minute: self
                .user_max_records_per_minute
                .or(file.user_max_records_per_minute),
            dry_run: self.dry_run.or(file.dry_run),
            remove_shm: self.remove_shm.or(file.remove_shm),
            memory_metric: self.memory_metric.or(file.memory_metric),
            on_max_processes: self.on_max_processes.or(file.on_max_processes),
            kernel_log: self.kernel_log.or(file.kernel_log),
            kernel_signals: self.kernel_signals.or(file.kernel_signals),
            ring_bytes: self.ring_bytes,
            watched_capacity: self.watched_capacity,
            test_faults: self.test_faults,
            ..self.clone()
        };
        all.merge_limits(&file);
        all
    }

    /// The daemon's options: flags, then the file, then the defaults.
    pub fn resolve(&self) -> Result<Options> {
        let all = self.merged(self.read_file()?);
        let duration = |name: &str, value: &Option<String>, default: &str| -> Result<Duration> {
            crate::vocab::units::parse_duration(value.as_deref().unwrap_or(default))
                .map_err(|e| anyhow!("{name}: {e}"))
        };
        let defaults = all.default_limits()?;
        let database_url = all.database_url.as_deref().unwrap_or(DEFAULT_DATABASE);
        let http = match all.http.as_deref().unwrap_or("127.0.0.1:9477") {
            "none" => None,
            addr => Some(addr.parse().map_err(|e| {
                anyhow!("http: {addr:?} is not an address ({e}): use HOST:PORT or none")
            })?),
        };
        Ok(Options {
            socket: all.socket.unwrap_or_else(|| DEFAULT_SOCKET.into()),
            socket_group: all
                .socket_group
                .unwrap_or_else(|| DEFAULT_SOCKET_GROUP.into()),
            admin_group: all.admin_group,
            btf: all.btf.unwrap_or_else(|| "/sys/kernel/btf/vmlinux".into()),
            ring_bytes: all.ring_bytes,
            watched_capacity: all.watched_capacity,
            test_faults: all.test_faults,
            defaults,
            poll_interval: duration("poll-interval", &all.poll_interval, "30s")?,
            quotas: {
                let builtin = crate::core::world::Quotas::default();
                crate::core::world::Quotas {
                    analyses: all.user_max_analyses.unwrap_or(builtin.analyses),
                    roots: all.user_max_roots.unwrap_or(builtin.roots),
                    processes: all.user_max_processes.unwrap_or(builtin.processes),
                    records_per_minute: all
                        .user_max_records_per_minute
                        .unwrap_or(builtin.records_per_minute),
                }
            },
            dry_run: all.dry_run.unwrap_or(false),
            remove_shm: all.remove_shm.unwrap_or(false),
            memory_metric: all.memory_metric.unwrap_or_default(),
            on_max_processes: all.on_max_processes.unwrap_or_default(),
            database: DatabaseUrl::parse(database_url),
            state_dir: all.state_dir.unwrap_or_else(|| "/var/lib/watchdog".into()),
            pin_dir: all.pin_dir.unwrap_or_else(|| "/sys/fs/bpf/watchdog".into()),
            fresh: all.fresh,
            kernel_log: all.kernel_log.unwrap_or(false),
            kernel_signals: all.kernel_signals.unwrap_or(true),
            http,
            args: self.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example installed as /etc/watchdog/watchdog.toml must be valid.
    #[test]
    fn the_shipped_config_file_parses_and_resolves() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/watchdog.toml");
        let args = RunArgs {
            config: Some(path.into()),
            ..Default::default()
        };
        let options = args.resolve().unwrap();
        assert_eq!(options.defaults.grace_ms, 10_000);
        assert_eq!(options.http, Some("127.0.0.1:9477".parse().unwrap()));
        assert_eq!(options.pin_dir, PathBuf::from("/sys/fs/bpf/watchdog"));
        assert_eq!(options.socket_group, "watchdog");
        assert_eq!(options.admin_group, None);
        assert_eq!(options.defaults.max_zombies, 1000);
        assert_eq!(
            options.defaults.warn_at_percent, 0,
            "warnings are off by default"
        );
    }

    #[test]
    fn warnings_in_the_file_are_checked_with_their_line() {
        let dir = std::env::temp_dir().join(format!("watchdog-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("watchdog.toml");
        let resolve = |text: &str| {
            std::fs::write(&file, text).unwrap();
            RunArgs {
                config: Some(file.clone()),
                ..Default::default()
            }
            .resolve()
        };
        let options =
            resolve("default-warn-at = \"80%\"\ndefault-warn-signal = \"usr2\"\n").unwrap();
        assert_eq!(
            (
                options.defaults.warn_at_percent,
                options.defaults.warn_signal.as_str()
            ),
            (80, "SIGUSR2")
        );
        let Err(err) = resolve("grace = \"5s\"\ndefault-warn-at = \"120%\"\n") else {
            panic!("120% resolved");
        };
        assert!(format!("{err:#}").contains("at line 2"), "{err:#}");
        let Err(err) = resolve("default-warn-signal = \"SIGKILL\"\n") else {
            panic!("SIGKILL resolved");
        };
        assert!(format!("{err:#}").contains("cannot be caught"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
