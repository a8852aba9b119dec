//! Benchmark (not a test): how many forks per second of watched processes the daemon
//! follows with zero lost events. Prints medians over several runs, and the same
//! forker's rate with no watchdog at all, for the ratio.
//!
//! `cargo xtask bench-forks` builds the release daemon and runs this as root.

use std::{
    io::{BufRead as _, Write as _},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::wait::waitpid,
    unistd::{ForkResult, fork},
};
use watchdog_tests::{Daemon, Workload, await_state};

const FORKS: u64 = 20_000;
const RUNS: usize = 5;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("forker") {
        return forker(args[2].parse()?, args[3].parse()?);
    }
    println!("watched fork storm: {FORKS} fork+exit per run, {RUNS} runs per row, median");
    println!("{:<22} {:>12} {:>12} {:>8} {:>12}", "forkers", "forks/s", "unwatched/s", "ratio", "lost events");
    for workers in [1u64, 2, 4] {
        let unwatched = median(&(0..RUNS).map(|_| run(None, workers)).collect::<Result<Vec<_>>>()?);
        let mut rates = Vec::new();
        let mut lost = 0;
        for _ in 0..RUNS {
            let daemon = Daemon::start()?;
            rates.push(run(Some(&daemon), workers)?);
            lost += daemon.status()?.lost_events;
        }
        let watched = median(&rates);
        println!(
            "{:<22} {:>12.0} {:>12.0} {:>8.3} {:>12}",
            format!("{workers} parallel"),
            watched,
            unwatched,
            watched / unwatched,
            lost
        );
    }
    Ok(())
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// One run: a forker with `workers` processes doing FORKS fork+exit in all. Watched by
/// `daemon` when given; then the run only counts once the daemon has seen every event.
fn run(daemon: Option<&Daemon>, workers: u64) -> Result<f64> {
    let exe = std::env::current_exe()?;
    let mut forker = Workload::spawn(
        exe.to_str().context("UTF-8 path")?,
        &["forker", &FORKS.to_string(), &workers.to_string()],
    )?;
    if let Some(daemon) = daemon {
        daemon.register(forker.pid(), "bench")?;
    }
    forker.send("go")?;
    let elapsed = Duration::from_nanos(forker.read_line()?.parse()?);
    if let Some(daemon) = daemon {
        // Every child plus the workers themselves: forked and exited.
        let expected = FORKS + workers;
        let status = await_state("the daemon to see every event", || {
            let s = daemon.status()?;
            Ok((s.forks_seen >= expected && s.exits_seen >= expected).then_some(s))
        })?;
        if status.forks_seen != expected || status.exits_seen != expected {
            bail!("expected {expected} forks and exits, saw {status:?}");
        }
    }
    Ok(FORKS as f64 / elapsed.as_secs_f64())
}

/// The forker: waits for "go", then `workers` processes fork and reap `forks` children
/// between them as fast as they can; prints the wall time in ns.
fn forker(forks: u64, workers: u64) -> Result<()> {
    std::io::stdin().lock().read_line(&mut String::new())?;
    let start = Instant::now();
    let mut pids = Vec::new();
    for _ in 0..workers {
        // SAFETY: single-threaded here; the child only forks, waits and exits.
        match unsafe { fork() }? {
            ForkResult::Child => {
                for _ in 0..forks / workers {
                    match unsafe { fork() } {
                        Ok(ForkResult::Child) => unsafe { libc::_exit(0) },
                        Ok(ForkResult::Parent { child }) => {
                            let _ = waitpid(child, None);
                        }
                        Err(_) => unsafe { libc::_exit(1) },
                    }
                }
                unsafe { libc::_exit(0) };
            }
            ForkResult::Parent { child } => pids.push(child),
        }
    }
    for pid in pids {
        waitpid(pid, None)?;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", start.elapsed().as_nanos())?;
    out.flush()?;
    std::io::stdin().lock().read_line(&mut String::new())?;
    Ok(())
}
