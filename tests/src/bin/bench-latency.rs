//! Benchmark (not a test): detection latency, violation → SIGTERM seen by the victim,
//! for orphan, timeout and memory, side by side in one run against one daemon.
//! Both ends are read from the kernel's CLOCK_REALTIME: the moment of the violation
//! (the parent's SIGKILL sent, the deadline, the start of the allocation that crossed
//! the limit) and
//! the moment the victim's SIGTERM handler runs.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use nix::{sys::signal::{Signal, kill}, unistd::Pid};
use watchdog_tests::{Daemon, Workload};

const TRIALS: usize = 40;

/// Victims: print `term <ns> <violation ns>` from their SIGTERM handler. A memory
/// victim's violation time is the start of the 1 MiB allocation that crossed the limit
/// (so its latency is an upper bound); the others' come from the bench.
const VICTIM: &str = r#"
import os, signal, sys, time
violation = 0
def on_term(sig, frame):
    os.write(1, f"term {time.clock_gettime_ns(time.CLOCK_REALTIME)} {violation}\n".encode())
    os._exit(0)
mode, limit = sys.argv[1], int(sys.argv[2])
sys.stdin.readline()
if mode == "orphan":
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, on_term)
        os.write(1, b"ready\n")
        time.sleep(600)
    time.sleep(600)
signal.signal(signal.SIGTERM, on_term)
os.write(1, b"ready\n")
if mode == "memory":
    page = os.sysconf("SC_PAGE_SIZE")
    hold = []
    with open("/proc/self/statm", "rb") as statm:
        for _ in range(4096):
            # The crossing happens inside the step that starts here: counting from the
            # step's start overstates the latency by at most one 1 MiB allocation.
            violation = time.clock_gettime_ns(time.CLOCK_REALTIME)
            hold.append(b"x" * (1 << 20))
            statm.seek(0)
            if int(statm.read().split()[1]) * page > limit:
                break
time.sleep(600)
"#;

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_nanos() as u64
}

/// The victim's `term <handled ns> <violation ns>` line.
fn term(work: &mut Workload) -> Result<(u64, u64)> {
    loop {
        let line = work.read_line()?;
        if let Some(rest) = line.strip_prefix("term ") {
            let mut values = rest.split_whitespace().map(str::parse::<u64>);
            return Ok((values.next().context("no time")??, values.next().context("no violation")??));
        }
    }
}

fn victim(daemon: &Daemon, mode: &str, trial: usize, limits: &[&str], limit: u64) -> Result<Workload> {
    let mut work = Workload::python(VICTIM, &[mode, &limit.to_string()])?;
    let (id, pid) = (format!("{mode}-{trial}"), work.pid().to_string());
    let mut args = vec!["register", "--pid", &pid, "--analysis-id", &id];
    args.extend(limits);
    daemon.cli_ok(&args)?;
    work.send("go")?;
    assert_eq!(work.read_line()?, "ready");
    Ok(work)
}

fn orphan_trial(daemon: &Daemon, trial: usize) -> Result<u64> {
    let mut work = victim(daemon, "orphan", trial, &[], 0)?;
    let violated = now_ns();
    kill(Pid::from_raw(work.pid() as i32), Signal::SIGKILL)?;
    Ok(term(&mut work)?.0 - violated)
}

fn timeout_trial(daemon: &Daemon, trial: usize) -> Result<u64> {
    let mut work = victim(daemon, "timeout", trial, &["--timeout", "300ms"], 0)?;
    let answer = daemon.request(&format!(r#"{{"op":"dump_tree","analysis_id":"timeout-{trial}"}}"#))?;
    let deadline_ms = answer["ok"]["analyses"][0]["deadline_unix_ms"].as_u64().context("no deadline")?;
    Ok(term(&mut work)?.0.saturating_sub(deadline_ms * 1_000_000))
}

fn memory_trial(daemon: &Daemon, trial: usize) -> Result<u64> {
    const LIMIT: u64 = 100 << 20;
    let mut work = victim(daemon, "memory", trial, &["--memory", "100MiB"], LIMIT)?;
    let (handled, violation) = term(&mut work)?;
    Ok(handled - violation)
}

fn summary(name: &str, mut ns: Vec<u64>) {
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() - 1) as f64 * q).round() as usize];
    let ms = |v: u64| format!("{:.2}", v as f64 / 1e6);
    println!(
        "{name:<10} {:>10} {:>10} {:>10} {:>10} {:>6}",
        ms(at(0.5)),
        ms(at(0.99)),
        ms(ns[0]),
        ms(*ns.last().unwrap()),
        ns.len()
    );
}

fn main() -> Result<()> {
    // A 30 s poll, as the product runs: anything caught here was caught by events.
    let daemon = Daemon::start_with(&[], &["--grace", "10s", "--poll-interval", "30s"])?;
    let mut results: [(&str, Vec<u64>); 3] = [("orphan", vec![]), ("timeout", vec![]), ("memory", vec![])];
    for trial in 0..TRIALS {
        results[0].1.push(orphan_trial(&daemon, trial)?);
        results[1].1.push(timeout_trial(&daemon, trial)?);
        results[2].1.push(memory_trial(&daemon, trial)?);
    }
    println!("detection latency, violation -> SIGTERM handled by the victim (ms; CLOCK_REALTIME at both ends)");
    println!("{:<10} {:>10} {:>10} {:>10} {:>10} {:>6}", "scenario", "median", "p99", "min", "max", "runs");
    for (name, ns) in results {
        summary(name, ns);
    }
    Ok(())
}
