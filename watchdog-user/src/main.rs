//! watchdog-user: the daemon (`run`) and the CLI that talks to it over the control socket.

mod btf;
mod cli;
mod control;
mod daemon;
mod ingest;
mod kernel;
mod procs;
mod protocol;
mod tree;

use std::path::PathBuf;

use clap::{ArgGroup, Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "eBPF process watchdog: daemon and CLI")]
struct Args {
    /// Control socket of the daemon.
    #[arg(long, global = true, env = "WATCHDOG_SOCKET", default_value = "/run/watchdog/watchdog.sock")]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: load the kernel programs and serve the control socket (root).
    Run {
        /// Kernel BTF to read struct offsets from.
        #[arg(long, default_value = "/sys/kernel/btf/vmlinux")]
        btf: PathBuf,
        /// Ring buffer size in bytes (tests use a tiny one to provoke losses).
        #[arg(long, hide = true)]
        ring_bytes: Option<u32>,
        /// Accept test-only fault requests (e.g. stall the main loop).
        #[arg(long, hide = true)]
        test_faults: bool,
    },
    /// Watch PID, its existing descendants and everything it forks from now on.
    Register {
        #[arg(long)]
        pid: u32,
        #[arg(long)]
        analysis_id: String,
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
    /// Show the daemon's counters.
    Status {
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let args = Args::parse();
    let result = match args.command {
        Command::Run { btf, ring_bytes, test_faults } => {
            run_daemon(daemon::Options { socket: args.socket, btf, ring_bytes, test_faults })
        }
        Command::Register { pid, analysis_id } => cli::register(&args.socket, pid, analysis_id),
        Command::Unregister { pid, analysis_id } => cli::unregister(&args.socket, pid, analysis_id),
        Command::Exec { analysis_id, command } => {
            match cli::exec(&args.socket, analysis_id, &command) {
                Ok(code) => std::process::exit(code),
                Err(err) => Err(err),
            }
        }
        Command::DumpTree { json, analysis_id } => cli::dump_tree(&args.socket, json, analysis_id),
        Command::Status { json } => cli::status(&args.socket, json),
    };
    if let Err(err) = result {
        eprintln!("watchdog-user: error: {err:#}");
        std::process::exit(1);
    }
}

fn run_daemon(options: daemon::Options) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WATCHDOG_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(daemon::run(options))
}
