//! watchdog-user: the daemon (`run`) and the CLI that talks to it over the control socket.

use watchdog_user::{
    app::{config, daemon},
    cli, store,
    vocab::{limits as policy, units},
};

use std::{path::PathBuf, time::Duration};

use clap::{ArgGroup, Parser, Subcommand};
use policy::{LimitOverrides, Reason};

#[derive(Parser)]
#[command(version, about = "eBPF process watchdog: daemon and CLI")]
struct Args {
    /// Control socket of the daemon [default: /run/watchdog/watchdog.sock].
    #[arg(long, global = true, env = "WATCHDOG_SOCKET")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: load the kernel programs and serve the control socket (root).
    Run(Box<config::RunArgs>),
    /// Benchmark: kill-record inserts per second, single vs batched (prints figures).
    #[command(hide = true)]
    BenchStore {
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        #[arg(long, default_value_t = 2000)]
        rows: usize,
        #[arg(long, default_value_t = 100)]
        batch: usize,
    },
    /// Apply the database migrations and stop.
    Migrate {
        #[arg(
            long,
            env = "DATABASE_URL",
            default_value = "sqlite:///var/lib/watchdog/watchdog.db"
        )]
        database_url: String,
    },
    /// Watch PID, its existing descendants and everything it forks from now on.
    Register {
        #[arg(long)]
        pid: u32,
        #[arg(long)]
        analysis_id: String,
        #[command(flatten)]
        limits: LimitOverrides,
    },
    /// Stop watching a process (with its subtree) or a whole analysis.
    #[command(group(ArgGroup::new("what").required(true).args(["pid", "analysis_id"])))]
    Unregister {
        #[arg(long)]
        pid: Option<u32>,
        #[arg(long)]
        analysis_id: Option<String>,
    },
    /// Start CMD already watched (registered before it execs); exits with its code.
    Exec {
        #[arg(long)]
        analysis_id: String,
        #[command(flatten)]
        limits: LimitOverrides,
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Show the live tree of watched processes.
    DumpTree {
        #[arg(long)]
        json: bool,
        #[arg(long)]
        analysis_id: Option<String>,
    },
    /// The kill history from the database, newest first.
    Events {
        /// Only the last DUR, e.g. 1h, 7d.
        #[arg(long, value_parser = units::parse_duration)]
        since: Option<Duration>,
        #[arg(long)]
        analysis_id: Option<String>,
        #[arg(long, value_enum)]
        reason: Option<Reason>,
        #[arg(long)]
        host: Option<String>,
        /// At most this many (and at most 1,000), newest first.
        #[arg(long)]
        limit: Option<u32>,
        /// The page after a previous answer: the cursor it printed (`older records may
        /// follow: events --before …`).
        #[arg(long)]
        before: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show the daemon's counters.
    Status {
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let args = Args::parse();
    if prints_to_a_pipe(&args.command) {
        // Rust starts with SIGPIPE ignored, so a closed stdout (`dump-tree | head`) makes
        // println! panic; with the default action the CLI stops quietly, as `ls` does.
        // SAFETY: no thread runs yet, and the default action installs no handler.
        let _ = unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            )
        };
    }
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| config::DEFAULT_SOCKET.into());
    let result = match args.command {
        Command::Run(mut run) => {
            run.socket = args.socket;
            run.resolve().and_then(run_daemon)
        }
        Command::Register {
            pid,
            analysis_id,
            limits,
        } => cli::register(&socket, pid, analysis_id, limits),
        Command::Unregister { pid, analysis_id } => cli::unregister(&socket, pid, analysis_id),
        Command::Exec {
            analysis_id,
            limits,
            command,
        } => match cli::exec(&socket, analysis_id, limits, &command) {
            Ok(code) => std::process::exit(code),
            Err(err) => Err(err),
        },
        Command::DumpTree { json, analysis_id } => cli::dump_tree(&socket, json, analysis_id),
        Command::Status { json } => cli::status(&socket, json),
        Command::Events {
            since,
            analysis_id,
            reason,
            host,
            limit,
            before,
            json,
        } => {
            let filter = store::EventFilter {
                since: since.map(|d| {
                    humantime::format_rfc3339_millis(std::time::SystemTime::now() - d).to_string()
                }),
                analysis_id,
                reason: reason.map(|r| r.as_str().to_string()),
                host,
                limit,
                before,
            };
            cli::events(&socket, filter, json)
        }
        Command::Migrate { database_url } => migrate(&database_url),
        Command::BenchStore {
            database_url,
            rows,
            batch,
        } => bench_store(&database_url, rows, batch),
    };
    if let Err(err) = result {
        // A task that ended has been logged, as one line, when it did.
        if !err.is::<watchdog_user::os::tasks::Ended>() {
            eprintln!("watchdog-user: error: {err:#}");
        }
        std::process::exit(1);
    }
}

/// Whether `command` is one of the CLI's that only talk to the control socket (which
/// writes without raising SIGPIPE) and print. Not the daemon: a client that hangs up
/// must never stop it. Not the database commands: their driver's sockets may raise
/// SIGPIPE, and a write to a database that went away must be an error.
fn prints_to_a_pipe(command: &Command) -> bool {
    match command {
        Command::Run(_) | Command::Migrate { .. } | Command::BenchStore { .. } => false,
        Command::Register { .. }
        | Command::Unregister { .. }
        | Command::Exec { .. }
        | Command::DumpTree { .. }
        | Command::Events { .. }
        | Command::Status { .. } => true,
    }
}

fn migrate(database_url: &str) -> anyhow::Result<()> {
    let url = store::DatabaseUrl::parse(database_url).map_err(anyhow::Error::msg)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(store::migrate(&url))?;
    println!("migrations applied to {}", url.redacted());
    Ok(())
}

fn bench_store(database_url: &str, rows: usize, batch: usize) -> anyhow::Result<()> {
    let url = store::DatabaseUrl::parse(database_url).map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (single, batched) = runtime.block_on(store::bench_inserts(&url, rows, batch))?;
    println!("{single:.0} {batched:.0}");
    Ok(())
}

fn run_daemon(options: config::Options) -> anyhow::Result<()> {
    tune_malloc();
    raise_descriptor_limit();
    // A signal mask is inherited: a daemon started by a process that blocks SIGTERM
    // (to sigwait it) would never stop. Before the runtime starts, so every thread
    // it makes starts unblocked too.
    if let Err(errno) = nix::sys::signal::SigSet::empty().thread_set_mask() {
        eprintln!("watchdog-user: cannot clear the inherited signal mask ({errno})");
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WATCHDOG_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    watchdog_user::os::tasks::install_panic_hook();
    watchdog_user::os::host::outrank_the_analyses();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(daemon::run(options))
}

/// A kill holds one pidfd per target until it is over, and each launcher of a
/// registered root holds one: a large kill needs more than the usual soft limit of
/// 1,024. The soft limit goes up to the hard one (the unit sets `LimitNOFILE`); what
/// still cannot be opened is counted and said (`pidfd_failures`), never silent.
fn raise_descriptor_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let raised = getrlimit(Resource::RLIMIT_NOFILE)
        .and_then(|(_, hard)| setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map(|()| hard));
    match raised {
        Ok(limit) => tracing::debug!(limit, "descriptor limit raised to the hard limit"),
        Err(err) => tracing::warn!("could not raise the descriptor limit: {err}"),
    }
}

/// glibc malloc settings for a long-running daemon, set before any thread starts.
fn tune_malloc() {
    // SAFETY: mallopt only changes the allocator's parameters; no thread runs yet.
    #[cfg(target_env = "gnu")]
    unsafe {
        // Blocks of 128 KiB and more (the process table's rows with 10,000 watched,
        // BTF parsing) get their own mapping, returned to the kernel when freed. Left
        // dynamic, glibc raises this threshold to the largest block freed so far (up to
        // 32 MiB) and such blocks then stay resident in the heap after they are freed.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
        // One arena for all threads. By default each thread that allocates (2 tokio
        // workers, the blocking pool, SQLite's worker) gets its own, and each keeps its
        // own high-water mark of free memory; the daemon's threads never contend enough
        // for per-thread arenas to pay.
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
