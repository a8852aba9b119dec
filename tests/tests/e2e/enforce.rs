//! Enforcement, end to end: timeouts, memory, orphans, fork bombs, PID reuse, dry runs.

use std::{
    collections::BTreeSet,
    os::unix::process::ExitStatusExt,
    time::{Duration, SystemTime},
};

use anyhow::{Result, bail};
use watchdog_tests::{
    Daemon, EventRecord, GROWER, Outcome, Reason, Workload, alive, alive_in_group, await_state,
    one_line_error, python, signal_names, time_of,
};

/// Reports its own pid and the pid of a child that ignores SIGTERM, then sleeps.
const PARENT_AND_STUBBORN_CHILD: &str = r#"
import os, signal, sys, time
print("ready", flush=True)
sys.stdin.readline()
pid = os.fork()
if pid == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.write(1, f"{os.getpid()}\n".encode())
    time.sleep(600)
    os._exit(0)
time.sleep(600)
"#;

#[test]
fn a_timeout_sigterms_at_the_deadline_and_sigkills_what_ignores_it_after_the_grace() -> Result<()> {
    let daemon = Daemon::start()?;
    let mut work = Workload::python(PARENT_AND_STUBBORN_CHILD, &[])?;
    // Started before its deadline runs: a slow machine's interpreter start is no part
    // of the 2 s.
    assert_eq!(work.read_line()?, "ready");
    let registered_at = SystemTime::now();
    daemon.register_with(work.pid(), "t", &["--timeout", "2s", "--grace", "1s"])?;
    work.send("go")?;
    let child: u32 = work.read_line()?.parse()?;

    let records = daemon.await_records_for(&[work.pid(), child])?;
    // The record follows the exit tracepoint, which runs before the task is a
    // zombie: wait for the parent rather than peek at it.
    assert_eq!(
        work.wait()?.signal(),
        Some(libc::SIGTERM),
        "the parent ends by SIGTERM"
    );
    await_state("the stubborn child gone", || {
        Ok((!alive(child)).then_some(()))
    })?;
    for record in &records {
        assert_eq!(record.record.reason, Reason::Timeout);
        assert_eq!(record.record.limit, Some(2000));
        assert_eq!(record.record.analysis_id, "t");
        let sigterm = time_of(&record.record.signals[0].at);
        assert!(
            sigterm.duration_since(registered_at)? >= Duration::from_secs(2),
            "not before the deadline"
        );
    }
    let parent = records.iter().find(|r| r.record.pid == work.pid()).unwrap();
    assert_eq!(parent.record.outcome, Outcome::ExitedAfterSigterm);
    assert_eq!(signal_names(&parent.record), vec!["SIGTERM"]);
    let stubborn = records.iter().find(|r| r.record.pid == child).unwrap();
    assert_eq!(stubborn.record.outcome, Outcome::Killed);
    assert_eq!(signal_names(&stubborn.record), vec!["SIGTERM", "SIGKILL"]);
    let grace = time_of(&stubborn.record.signals[1].at)
        .duration_since(time_of(&stubborn.record.signals[0].at))?;
    assert!(
        grace >= Duration::from_secs(1),
        "SIGKILL only after the grace: {grace:?}"
    );
    // Every field an operator needs is on the wire: KillRecord has no defaults for
    // these, so `events()` fails to read a record that lacks one (or has it null).
    Ok(())
}

#[test]
fn a_process_over_its_memory_limit_is_killed_by_the_kernel_fast_path_not_the_poll() -> Result<()> {
    const LIMIT: u64 = 200 << 20;
    // The reconcile poll off: only the kernel's rss_stat reports can kill.
    let daemon = Daemon::builder().arg("--poll-interval", "1h").start()?;
    let mut work = Workload::python(GROWER, &[])?;
    daemon.register_with(work.pid(), "m", &["--memory", "200MiB"])?;
    let started = SystemTime::now();
    work.send("go")?;
    let record = daemon.await_records_for(&[work.pid()])?.remove(0);
    assert_eq!(record.record.reason, Reason::Memory);
    assert_eq!(record.record.limit, Some(LIMIT));
    let rss = record.record.rss_bytes;
    let sigterm = time_of(&record.record.signals[0].at);
    let status = daemon.status()?;
    eprintln!(
        "figures: kernel {}: SIGTERM {:?} after the growth began, RSS at kill {:.3}x the limit",
        status.kernel_release,
        sigterm.duration_since(started)?,
        rss as f64 / LIMIT as f64
    );
    // With the poll an hour away, only the kernel's report can have killed it; how
    // promptly shows in the RSS it had reached (it grows 10 MiB at a time).
    assert!(
        rss > LIMIT && rss < LIMIT + (32 << 20),
        "RSS at kill {rss} should be just over {LIMIT}"
    );
    assert!(
        sigterm.duration_since(started)? < Duration::from_secs(10),
        "the kernel path, not the hour-long poll"
    );
    assert!(status.rss_reports > 0);
    let memory = status.kernel_paths.iter().find(|p| p.path == "memory");
    assert_eq!(
        memory.map(|p| p.how.as_str()),
        Some("kernel_events"),
        "{memory:?}"
    );
    // Where the programs follow the RSS counters, they send the SIGTERM themselves.
    let first = status
        .kernel_paths
        .iter()
        .find(|p| p.path == "memory_first_signal");
    assert_eq!(first.map(|p| p.how.as_str()), Some("kernel"), "{first:?}");
    assert_eq!(record.record.signals[0].by.as_deref(), Some("kernel"));
    assert_eq!(status.kernel_signals, 1);
    Ok(())
}

/// Four workers, each holding 80 MiB of touched memory: ~360 MiB in all with the
/// parent, ~270 MiB with three.
const FOUR_WORKERS: &str = r#"
import os, sys, time
sys.stdin.readline()
for _ in range(4):
    if os.fork() == 0:
        os.write(1, f"{os.getpid()}\n".encode())
        hold = b"x" * (80 << 20)
        time.sleep(600)
        os._exit(0)
time.sleep(600)
"#;

#[test]
fn workers_under_the_process_limit_but_over_the_tree_limit_together_get_the_analysis_killed()
-> Result<()> {
    let daemon = Daemon::start()?;
    let mut work = Workload::python(FOUR_WORKERS, &[])?;
    daemon.register_with(
        work.pid(),
        "tm",
        &["--memory", "200MiB", "--tree-memory", "320MiB"],
    )?;
    work.send("go")?;
    let mut pids = vec![work.pid()];
    for _ in 0..4 {
        pids.push(work.read_line()?.parse()?);
    }
    let records = daemon.await_records_for(&pids)?;
    assert!(
        records
            .iter()
            .all(|r| r.record.reason == Reason::TreeMemory && r.record.limit == Some(320u64 << 20)),
        "{records:#?}"
    );
    // The kernel reports an exit when it begins: a process tearing down 80 MiB can
    // still be in /proc a moment after its record.
    await_state("every worker gone", || {
        Ok(pids.iter().all(|p| !alive(*p)).then_some(()))
    })?;
    Ok(())
}

/// A multiprocessing pool: the parent reports its workers' pids.
const POOL: &str = r#"
import multiprocessing, os, sys, time
def work(_):
    time.sleep(600)
if __name__ == "__main__":
    sys.stdin.readline()
    pool = multiprocessing.get_context("fork").Pool(3)
    pool.map_async(work, range(3))
    time.sleep(0.5)
    os.write(1, (" ".join(str(p.pid) for p in pool._pool) + "\n").encode())
    time.sleep(600)
"#;

#[test]
fn sigkilling_a_pool_parent_gets_every_worker_flagged_orphan_and_killed() -> Result<()> {
    let daemon = Daemon::start()?;
    let mut work = Workload::python(POOL, &[])?;
    daemon.register(work.pid(), "pool")?;
    work.send("go")?;
    let workers: Vec<u32> = work
        .read_line()?
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(workers.len(), 3);

    work.signal(nix::sys::signal::Signal::SIGKILL)?;
    let records = daemon.await_records_for(&workers)?;
    for record in &records {
        assert_eq!(record.record.reason, Reason::Orphan, "{record:?}");
        assert_eq!(
            record.record.ppid,
            work.pid(),
            "the record names the dead parent"
        );
        assert_eq!(record.record.outcome, Outcome::ExitedAfterSigterm);
    }
    let named: BTreeSet<u64> = records.iter().map(|r| u64::from(r.record.pid)).collect();
    assert_eq!(named, workers.iter().map(|p| *p as u64).collect());
    await_state("the workers gone", || {
        Ok(workers.iter().all(|p| !alive(*p)).then_some(()))
    })?;
    Ok(())
}

/// A launcher (sh) starts a Python root and reports its pid, then waits.
fn launcher() -> Result<Workload> {
    let script = format!(
        "{} -c 'import time; time.sleep(600)' & echo $!; wait",
        python()
    );
    Workload::spawn("sh", &["-c", &script])
}

#[test]
fn an_analysis_root_whose_launcher_dies_is_flagged_orphan_and_killed() -> Result<()> {
    let daemon = Daemon::start()?;
    let mut launcher = launcher()?;
    let root: u32 = launcher.read_line()?.parse()?;
    daemon.register(root, "launched")?;
    launcher.signal(nix::sys::signal::Signal::SIGKILL)?;
    let record = daemon.await_records_for(&[root])?.remove(0);
    assert_eq!(record.record.reason, Reason::Orphan);
    await_state(
        "the orphaned root gone",
        || Ok((!alive(root)).then_some(())),
    )?;
    Ok(())
}

#[test]
fn with_orphans_log_an_orphan_is_recorded_and_left_alone() -> Result<()> {
    let daemon = Daemon::start()?;
    let mut launcher = launcher()?;
    let root: u32 = launcher.read_line()?.parse()?;
    daemon.cli_ok(&[
        "register",
        "--pid",
        &root.to_string(),
        "--analysis-id",
        "logged",
        "--orphans",
        "log",
    ])?;
    launcher.signal(nix::sys::signal::Signal::SIGKILL)?;
    let record = daemon.await_records_for(&[root])?.remove(0);
    assert_eq!(
        (record.record.reason, record.record.outcome),
        (Reason::Orphan, Outcome::Logged)
    );
    assert!(record.record.signals.is_empty());
    assert!(alive(root));
    let tree = daemon.tree(Some("logged"))?;
    assert!(tree[0].orphan, "dump-tree marks it");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(root as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    Ok(())
}

/// Every process keeps three children alive, replacing any that die, and ignores
/// SIGTERM; depth-capped so the machine survives the test.
const FORK_BOMB: &str = r#"
import os, signal, sys, time
sys.stdin.readline()
signal.signal(signal.SIGTERM, signal.SIG_IGN)
depth = 0
children = set()
while True:
    while len(children) < 3 and depth < 5:
        pid = os.fork()
        if pid == 0:
            depth += 1
            children = set()
            break
        children.add(pid)
    else:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
            children.discard(pid)
        except ChildProcessError:
            pass
        time.sleep(0.01)
"#;

#[test]
fn a_fork_bomb_hitting_its_timeout_leaves_no_survivor() -> Result<()> {
    let daemon = Daemon::start()?;
    let mut work = Workload::python(FORK_BOMB, &[])?;
    daemon.register_with(work.pid(), "bomb", &["--timeout", "3s", "--grace", "1s"])?;
    work.send("go")?;
    await_state("the bomb to grow", || {
        Ok((alive_in_group(work.pid()).len() > 100).then_some(()))
    })?;
    await_state("nothing of the bomb left", || {
        Ok(alive_in_group(work.pid()).is_empty().then_some(()))
    })?;
    // Records reach the database one by one: await them, not just the first.
    let records = await_state("a record for every member", || {
        let records = daemon.events()?;
        Ok((records.len() > 100).then_some(records))
    })?;
    assert!(records.iter().all(|r| r.record.reason == Reason::Timeout));
    assert_eq!(daemon.tree(Some("bomb"))?.len(), 0);
    Ok(())
}

/// Makes the next fork system-wide likely to get `pid` (root may set ns_last_pid).
fn spawn_with_pid(pid: u32) -> Result<Workload> {
    // Other tests fork meanwhile (a fork bomb among them) and may take the pid first.
    for _ in 0..2000 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string())?;
        let candidate = Workload::spawn("sleep", &["600"])?;
        if candidate.pid() == pid {
            return Ok(candidate);
        }
    }
    bail!("could not get pid {pid} reused")
}

const PARENT_AND_SHORT_CHILD: &str = r#"
import os, sys, time
sys.stdin.readline()
pid = os.fork()
if pid == 0:
    sys.stdin.readline()
    os._exit(0)
os.write(1, f"{pid}\n".encode())
os.waitpid(pid, 0)
os.write(1, b"reaped\n")
time.sleep(600)
"#;

#[test]
fn a_recycled_pid_of_a_watched_process_is_never_signalled() -> Result<()> {
    let daemon = Daemon::builder().flag("--test-faults").start()?;
    let mut work = Workload::python(PARENT_AND_SHORT_CHILD, &[])?;
    daemon.register_with(work.pid(), "reuse", &["--timeout", "2s", "--grace", "1s"])?;
    work.send("go")?;
    let child: u32 = work.read_line()?.parse()?;
    await_state("the child watched", || {
        Ok((watchdog_tests::all_nodes(&daemon.tree(None)?).len() == 2).then_some(()))
    })?;
    // Hold the daemon's loop so the child's exit is still queued when the deadline
    // fires: the kill then targets a pid that now names an unrelated process.
    daemon.request(r#"{"op":"stall","ms":3000}"#)?;
    work.send("exit")?;
    assert_eq!(work.read_line()?, "reaped");
    let unrelated = spawn_with_pid(child)?;

    let parent = daemon.await_records_for(&[work.pid()])?.remove(0);
    assert_eq!(parent.record.reason, Reason::Timeout);
    assert!(
        alive(unrelated.pid()),
        "the process that reused the pid was signalled"
    );
    let records = daemon.events()?;
    let about_child: Vec<&EventRecord> = records.iter().filter(|r| r.record.pid == child).collect();
    assert!(
        about_child.iter().all(|r| r.record.signals.is_empty()),
        "{about_child:#?}"
    );
    Ok(())
}

#[test]
fn dry_run_records_the_kills_it_would_make_and_signals_nothing() -> Result<()> {
    let daemon = Daemon::builder().flag("--dry-run").start()?;
    let work = Workload::spawn("sleep", &["600"])?;
    daemon.register_with(work.pid(), "dry", &["--timeout", "1s"])?;
    let mut launcher = launcher()?;
    let root: u32 = launcher.read_line()?.parse()?;
    daemon.register(root, "dry-orphan")?;
    launcher.signal(nix::sys::signal::Signal::SIGKILL)?;

    let records = daemon.await_records_for(&[work.pid(), root])?;
    for record in &records {
        assert_eq!(record.record.outcome, Outcome::DryRun, "{record:?}");
        assert!(record.record.signals.is_empty());
    }
    assert!(alive(work.pid()) && alive(root));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(root as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    Ok(())
}

#[test]
fn bad_limits_are_refused_with_a_clear_error_and_nothing_is_registered() -> Result<()> {
    let daemon = Daemon::start()?;
    let work = Workload::spawn("sleep", &["600"])?;
    let pid = work.pid().to_string();
    for (flag, value, expected) in [
        ("--timeout", "-5s", "such as 90s"),
        ("--timeout", "0s", "more than 0"),
        ("--memory", "lots", "such as 512MiB"),
        ("--memory", "0", "more than 0"),
        // No process' RSS can pass the machine's memory (read with sysinfo at start).
        ("--memory", "1PiB", "more than this machine's"),
        ("--tree-memory", "0B", "more than 0"),
        ("--grace", "soon", "such as 90s"),
        ("--orphans", "maybe", "possible values: kill, log"),
    ] {
        let out = daemon.cli(&[
            "register",
            "--pid",
            &pid,
            "--analysis-id",
            "bad",
            &format!("{flag}={value}"),
        ]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{flag} {value}: {stderr}");
    }
    let answer = daemon.request(&format!(
        r#"{{"op":"register","pid":{pid},"analysis_id":"bad","limits":{{"memory_bytes":0}}}}"#
    ))?;
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("must be more than 0"),
        "{answer}"
    );
    let out = daemon.cli(&["register", "--pid", &pid, "--analysis-id", ""]);
    one_line_error(&out);
    assert_eq!(daemon.status()?.monitored_count, 0, "nothing registered");
    Ok(())
}

/// Says `term` on each SIGTERM and lives on.
const TRAPS_SIGTERM: &str = r#"
import signal, sys, time
# traps-sigterm: lives through its SIGTERM
signal.signal(signal.SIGTERM, lambda *_: print("term", flush=True))
print("ready", flush=True)
while True:
    time.sleep(600)
"#;

/// An analysis unregistered during its kill's grace is let go: never SIGKILLed, and
/// its record says `released` (stored so, the database's constraint included) with the
/// SIGTERM it had and its own command line.
#[test]
fn unregistering_during_the_grace_lets_the_process_go_and_its_record_says_released() -> Result<()> {
    let daemon = Daemon::start()?;
    let mut work = Workload::python(TRAPS_SIGTERM, &[])?;
    assert_eq!(work.read_line()?, "ready");
    daemon.register_with(work.pid(), "let-go", &["--timeout", "1s", "--grace", "60s"])?;
    assert_eq!(work.read_line()?, "term");
    daemon.cli_ok(&["unregister", "--analysis-id", "let-go"])?;
    let record = await_state("its record in the database", || {
        let events = daemon.events()?;
        Ok(events
            .into_iter()
            .find(|e| e.record.pid == work.pid() && !e.spooled))
    })?;
    assert_eq!(record.record.outcome, Outcome::Released, "{record:?}");
    assert_eq!(signal_names(&record.record), vec!["SIGTERM"]);
    assert!(
        record.record.cmdline.contains("traps-sigterm"),
        "{:?}",
        record.record.cmdline
    );
    assert!(work.alive_now(), "let go alive");
    Ok(())
}
