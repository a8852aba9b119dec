//! Benchmark (not a test): what the bounds of a shared host cost and give.
//!
//! - Memory growth no process reports: 300 children each growing 1.5 MiB (never a
//!   report step) past a 300 MiB tree limit, and 800 MiB written into a process by
//!   another one (`process_vm_writev`) against its 200 MiB limit: from the start of
//!   the growth to the SIGTERM, with the poll set to an hour.
//! - A record flood: processes with 1 MiB command lines killed by the thousand; the
//!   daemon's peak RSS and the database's growth per record.
//! - A bystander's deadline under a watched fork storm: the lateness of its SIGTERM
//!   with the daemon at the analyses' CPU weight, and at the unit's (`CPUWeight=1000`,
//!   ten times the default; on a cgroup v1 host, `cpu.shares` 10240 against 1024).
//!
//! Prints Markdown.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::wait::waitpid,
    unistd::{ForkResult, fork},
};
use watchdog_tests::{Daemon, GROWERS, TARGET, WRITER, Workload, python, time_of};

const RUNS: usize = 5;
const BYSTANDERS: usize = 10;
const STORM_FORKERS: usize = 16;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("storm") {
        storm();
    }
    watchdog_bench::install_interrupt_cleanup()?;
    println!("## Bounds: memory no report shows, and the daemon's priority\n");
    memory_reach()?;
    record_flood()?;
    bystander_lateness()?;
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The SIGTERM of the kill record of `pid`, as a time.
fn sigterm_of(daemon: &Daemon, pid: u32) -> Result<SystemTime> {
    let record = daemon.await_record_for(pid)?;
    let first = record
        .record
        .signals
        .first()
        .context("a record without signals")?;
    Ok(time_of(&first.at))
}

fn growers_run(daemon: &Daemon, run: usize) -> Result<f64> {
    let mut work = Workload::python(GROWERS, &["300", "1536"])?;
    let id = format!("growers-{run}");
    daemon.register_with(
        work.pid(),
        &id,
        &["--tree-memory", "300MiB", "--grace", "1s"],
    )?;
    work.read_line()?;
    let started = SystemTime::now();
    work.send("go")?;
    Ok(ms(sigterm_of(daemon, work.pid())?.duration_since(started)?))
}

fn writer_run(daemon: &Daemon, run: usize) -> Result<f64> {
    let mut target = Workload::python(TARGET, &["800"])?;
    let line = target.read_line()?;
    let (pid, address) = line.split_once(' ').context("no address")?;
    daemon.register_with(
        target.pid(),
        &format!("written-{run}"),
        &["--memory", "200MiB"],
    )?;
    let started = SystemTime::now();
    let out = Command::new(python())
        .args(["-c", WRITER, pid, address, "800"])
        .output()?;
    if !out.status.success() {
        bail!(
            "the writer failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(ms(
        sigterm_of(daemon, target.pid())?.duration_since(started)?
    ))
}

fn memory_reach() -> Result<()> {
    let daemon = Daemon::builder().arg("--poll-interval", "1h").start()?;
    let mut growers = (0..RUNS)
        .map(|r| growers_run(&daemon, r))
        .collect::<Result<Vec<_>>>()?;
    let mut written = (0..RUNS)
        .map(|r| writer_run(&daemon, r))
        .collect::<Result<Vec<_>>>()?;
    let (g, w) = (median(&mut growers), median(&mut written));
    watchdog_bench::figure("small_growers_ms", format!("{g:.0}"));
    watchdog_bench::figure("written_into_ms", format!("{w:.0}"));
    println!(
        "Start of the growth → SIGTERM sent, ms, median of {RUNS} (poll every hour: only the kernel's reports can act).\n"
    );
    println!("| growth | limit | median | min | max | before (no report: the next poll) |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| 300 children, each +1.5 MiB (never a report step); the PSS sum ~64 → ~525 MiB | tree 300 MiB | {g:.0} | {:.0} | {:.0} | up to the poll interval (30 s) |",
        growers[0],
        growers[RUNS - 1]
    );
    println!(
        "| 800 MiB written into an idle process by another (`process_vm_writev`, 8 MiB a call) | process 200 MiB | {w:.0} | {:.0} | {:.0} | up to the poll interval (30 s) |",
        written[0],
        written[RUNS - 1]
    );
    println!(
        "\nWhat limits it: the growers' figure includes 300 children faulting in their pages and the PSS measure (one `smaps_rollup` read a process) the crossing of the kernel's RSS sum asks for; the written figure, the writer's 100 calls up to the limit and the signal.\n"
    );
    Ok(())
}

const FLOOD: usize = 1000;
const ARG_BYTES: usize = 128 * 1024 - 1;

/// Starts argv[1] shells, each with eight arguments of argv[2] bytes and a `sleep`
/// child; prints "ready" once all run.
const FLOOD_ROOT: &str = r#"
import subprocess, sys, time
n, size = int(sys.argv[1]), int(sys.argv[2])
arg = "x" * size
shells = [subprocess.Popen(["sh", "-c", "sleep 600; :", "sh"] + [arg] * 8) for _ in range(n)]
print("ready", flush=True)
time.sleep(600)
"#;

/// FLOOD shells, each with eight 128 KiB arguments (1 MiB of command line) and a
/// `sleep` child, in one analysis killed at its 1 s timeout: 2 × FLOOD records.
fn record_flood() -> Result<()> {
    let daemon = Daemon::builder().start()?;
    let db = daemon.state_dir().join("watchdog.db");
    let (rss_before, db_before) = (
        watchdog_bench::peak_rss_mib(daemon.pid())?,
        std::fs::metadata(&db)?.len(),
    );
    let mut root = Workload::python(FLOOD_ROOT, &[&FLOOD.to_string(), &ARG_BYTES.to_string()])?;
    root.read_line()?;
    daemon.register_with(
        root.pid(),
        "flood",
        &["--timeout", "1s", "--max-processes", "5000"],
    )?;
    // The shells at least, and every record the daemon made stored.
    let records = watchdog_tests::await_state("every flood record stored", || {
        let stored = watchdog_tests::sqlite_query(&db, "SELECT count(*) FROM watchdog_events")?;
        let stored: u64 = stored.trim().parse().unwrap_or(0);
        let made = daemon.status()?.kills_total;
        Ok((stored > FLOOD as u64 && stored == made).then_some(stored))
    })?;
    let _ = root.kill();
    let rss_peak = watchdog_bench::peak_rss_mib(daemon.pid())?;
    let db_growth = std::fs::metadata(&db)?.len().saturating_sub(db_before) as f64;
    let longest =
        watchdog_tests::sqlite_query(&db, "SELECT max(length(cmdline)) FROM watchdog_events")?;
    let per_record_kib = db_growth / records as f64 / 1024.0;
    watchdog_bench::figure("flood_peak_rss_mib", format!("{rss_peak:.1}"));
    watchdog_bench::figure("flood_db_kib_per_record", format!("{per_record_kib:.1}"));
    println!(
        "A record flood: {FLOOD} processes with 1 MiB command lines (8 arguments of 128 KiB) and their {FLOOD} children, one analysis killed at its timeout: {records} records.\n"
    );
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| the longest command line stored | {} bytes |",
        longest.trim()
    );
    println!("| database growth per record (SQLite) | {per_record_kib:.1} KiB |");
    println!("| daemon peak RSS before → after | {rss_before:.1} → {rss_peak:.1} MiB |");
    println!(
        "\nWhat bounds it: a command line is cut at 4,096 bytes (marked so) when it is read, so no record holds more; the records kept in memory for `status` and the page are bounded at 8 MiB and 10,000, whichever is reached first; an `events` answer holds at most 1,000 records. The daemon's worst case for a flood is therefore its idle RSS, the kept records (8 MiB) and one answer (1,000 × ~5 KiB).\n"
    );
    Ok(())
}

/// Forks and reaps children as fast as it can, until killed.
fn storm() -> ! {
    loop {
        // SAFETY: single-threaded; the child exits at once.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => unsafe { libc::_exit(0) },
            Ok(ForkResult::Parent { child }) => {
                let _ = waitpid(child, None);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// A cgroup v1 `cpu` group of the bench's own, removed (its tasks moved back to the
/// root group) when dropped.
struct CpuGroup(PathBuf);

const CPU_ROOT: &str = "/sys/fs/cgroup/cpu";

impl CpuGroup {
    fn new(name: &str, shares: u64) -> Result<Self> {
        let path = Path::new(CPU_ROOT).join(name);
        std::fs::create_dir_all(&path)
            .with_context(|| format!("creating {} (a cgroup v1 cpu hierarchy)", path.display()))?;
        std::fs::write(path.join("cpu.shares"), shares.to_string())?;
        Ok(Self(path))
    }

    fn add(&self, pid: u32) -> Result<()> {
        Ok(std::fs::write(
            self.0.join("cgroup.procs"),
            pid.to_string(),
        )?)
    }
}

impl Drop for CpuGroup {
    fn drop(&mut self) {
        if let Ok(procs) = std::fs::read_to_string(self.0.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write(Path::new(CPU_ROOT).join("cgroup.procs"), pid);
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Sleeps; its SIGTERM handler prints the CLOCK_REALTIME ns it ran at.
const BYSTANDER: &str = r#"
import os, signal, sys, time
def on_term(sig, frame):
    os.write(1, f"{time.clock_gettime_ns(time.CLOCK_REALTIME)}\n".encode())
    os._exit(0)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
time.sleep(600)
"#;

/// A bystander analysis with a 1 s timeout: its SIGTERM's lateness past the deadline.
fn bystander(daemon: &Daemon, id: &str) -> Result<f64> {
    let mut work = Workload::python(BYSTANDER, &[])?;
    work.read_line()?;
    daemon.register_with(work.pid(), id, &["--timeout", "1s"])?;
    let answer = daemon.request(&format!(r#"{{"op":"dump_tree","analysis_id":"{id}"}}"#))?;
    let deadline_ms = answer["ok"]["analyses"][0]["deadline_unix_ms"]
        .as_u64()
        .context("no deadline")?;
    let handled_ns: u64 = work.read_line()?.parse()?;
    let deadline = UNIX_EPOCH + Duration::from_millis(deadline_ms);
    let handled = UNIX_EPOCH + Duration::from_nanos(handled_ns);
    Ok(ms(handled.duration_since(deadline).unwrap_or_default()))
}

fn bystander_lateness() -> Result<()> {
    let daemon = Daemon::builder().start()?;
    let daemon_group = CpuGroup::new("watchdog-bench-daemon", 10240)?;
    let storm_group = CpuGroup::new("watchdog-bench-storm", 1024)?;
    let me = std::env::current_exe()?;
    // The storm is one watched analysis of STORM_FORKERS forkers.
    let mut forkers = Vec::new();
    for _ in 0..STORM_FORKERS {
        let child = Command::new(&me)
            .arg("storm")
            .stdin(Stdio::null())
            .spawn()?;
        storm_group.add(child.id())?;
        daemon.register_with(child.id(), "storm", &["--timeout", "1h"])?;
        forkers.push(child);
    }
    let mut rows = Vec::new();
    let placements = [
        (
            "in the storm's cgroup, one task among the forkers",
            &storm_group,
            1024,
        ),
        (
            "a cgroup of its own at the unit's CPUWeight=1000 (cpu.shares 10240)",
            &daemon_group,
            10240,
        ),
    ];
    for (label, group, shares) in placements {
        group.add(daemon.pid())?;
        let mut late = (0..BYSTANDERS)
            .map(|i| bystander(&daemon, &format!("bystander-{shares}-{i}")))
            .collect::<Result<Vec<_>>>()?;
        let m = median(&mut late);
        watchdog_bench::figure(&format!("bystander_late_ms_{shares}"), format!("{m:.1}"));
        rows.push(format!(
            "| {label} | {m:.1} | {:.1} | {:.1} | {BYSTANDERS} |",
            late[(late.len() * 9) / 10 - 1],
            late[late.len() - 1]
        ));
    }
    let forks = daemon.status()?.forks_seen;
    for mut child in forkers {
        let _ = child.kill();
        let _ = child.wait();
    }
    println!(
        "A bystander analysis' 1 s timeout during a watched fork storm ({STORM_FORKERS} forkers, {forks} forks seen in all), {BYSTANDERS} bystanders one after the other: deadline → the bystander's SIGTERM handler, ms.\n"
    );
    println!("| daemon | median | p90 | max | runs |");
    println!("|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
    println!(
        "\nWhat limits it: in the storm's cgroup the daemon is one task among the forkers and their children on two cores; in its own, weighted ten times the storm's, it runs as soon as it wakes. The bystander's own handler (in the root cgroup) competes with the storm either way.\n"
    );
    std::io::stdout().flush()?;
    Ok(())
}
