//! Benchmark (not a test): what the bounds of a shared host cost and give.
//!
//! - Memory growth no process reports: 300 children each growing 1.5 MiB (never a
//!   report step) past a 300 MiB tree limit, and 800 MiB written into a process by
//!   another one (`process_vm_writev`) against its 200 MiB limit: from the start of
//!   the growth to the SIGTERM, with the poll set to an hour.
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
