//! Surviving restarts: the kernel keeps following processes while the daemon is down
//! (maps and links pinned under bpffs), and a restarted daemon acts on the gap.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Result;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::Value;
use watchdog_tests::{Daemon, Workload, alive, all_nodes, await_state};

/// The root forks a middle child with a grandchild, then a new child every 100 ms.
const FORKS_CONTINUOUSLY: &str = r#"
import os, sys, time
sys.stdin.readline()
mid = os.fork()
if mid == 0:
    g = os.fork()
    if g == 0:
        time.sleep(600); os._exit(0)
    os.write(1, f"grandchild {g}\n".encode())
    time.sleep(600); os._exit(0)
os.write(1, f"middle {mid}\n".encode())
while True:
    pid = os.fork()
    if pid == 0:
        time.sleep(600); os._exit(0)
    os.write(1, f"child {pid}\n".encode())
    time.sleep(0.1)
"#;

fn record_for(daemon: &Daemon, pid: u32) -> Result<Value> {
    await_state(&format!("a record for {pid}"), || {
        let records: Vec<Value> = daemon.events()?;
        Ok(records.into_iter().find(|r| r["pid"] == pid))
    })
}

#[test]
fn a_crashed_daemon_restarts_with_every_gap_fork_watched_and_acts_on_the_gap() -> Result<()> {
    let mut daemon = Daemon::start()?;
    let mut work = Workload::python(FORKS_CONTINUOUSLY, &[])?;
    daemon.register(work.pid(), "recover")?;
    let sleeper = Workload::spawn("sleep", &["600"])?;
    daemon.cli_ok(&[
        "register",
        "--pid",
        &sleeper.pid().to_string(),
        "--analysis-id",
        "deadline",
        "--timeout",
        "2s",
    ])?;
    work.send("go")?;
    let (mut middle, mut grandchild) = (0u32, 0u32);
    while middle == 0 || grandchild == 0 {
        let line = work.read_line()?;
        let mut words = line.split_whitespace();
        match (words.next(), words.next().map(str::parse::<u32>)) {
            (Some("middle"), Some(Ok(pid))) => middle = pid,
            (Some("grandchild"), Some(Ok(pid))) => grandchild = pid,
            _ => {}
        }
    }
    await_state("middle and grandchild watched", || {
        let pids: BTreeSet<u32> = all_nodes(&daemon.tree(Some("recover"))?)
            .iter()
            .map(|n| n.pid)
            .collect();
        Ok((pids.contains(&middle) && pids.contains(&grandchild)).then_some(()))
    })?;

    daemon.crash()?;
    // While it is down: orphan the grandchild, let the root fork on, let a deadline pass.
    kill(Pid::from_raw(middle as i32), Signal::SIGKILL)?;
    let mut gap_children = Vec::new();
    let gap_end = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < gap_end {
        if let Some(pid) = work.read_line()?.strip_prefix("child ") {
            gap_children.push(pid.parse::<u32>()?);
        }
    }
    assert!(
        gap_children.len() >= 10,
        "the root forked during the gap: {gap_children:?}"
    );
    let restarted = SystemTime::now();
    daemon.start_again()?;

    let tree = await_state("every gap fork in the tree", || {
        let roots = daemon.tree(Some("recover"))?;
        let pids: BTreeSet<u32> = all_nodes(&roots).iter().map(|n| n.pid).collect();
        Ok(gap_children
            .iter()
            .all(|p| pids.contains(p))
            .then_some(roots))
    })?;
    assert!(all_nodes(&tree).iter().all(|n| n.analysis_id == "recover"));
    assert!(
        !all_nodes(&tree).iter().any(|n| n.pid == middle),
        "the dead middle is gone"
    );

    let orphan = record_for(&daemon, grandchild)?;
    assert_eq!(orphan["reason"], "orphan");
    await_state("the orphan killed", || {
        Ok((!alive(grandchild)).then_some(()))
    })?;

    let timeout = record_for(&daemon, sleeper.pid())?;
    assert_eq!(timeout["reason"], "timeout");
    let sigterm = humantime::parse_rfc3339(timeout["signals"][0]["at"].as_str().unwrap())?;
    assert!(
        sigterm.duration_since(restarted)? < Duration::from_secs(5),
        "the passed deadline is enforced at once"
    );
    assert!(alive(work.pid()), "the root itself broke no rule");
    Ok(())
}

#[test]
fn fresh_drops_the_pinned_state_deliberately() -> Result<()> {
    let mut daemon = Daemon::start()?;
    let work = Workload::spawn("sleep", &["600"])?;
    daemon.register(work.pid(), "kept-or-not")?;
    daemon.crash()?;
    assert!(
        daemon.pin_dir.join("WATCHED").exists(),
        "pinned state outlives the daemon"
    );
    daemon.start_again()?;
    assert_eq!(
        daemon.tree(Some("kept-or-not"))?.len(),
        1,
        "a restart picks it up"
    );
    daemon.crash()?;
    daemon.start_again_with(&["--fresh"])?;
    assert_eq!(
        daemon.status()?.monitored_count,
        0,
        "--fresh starts from nothing"
    );
    assert!(alive(work.pid()), "and touches no process");
    Ok(())
}

/// `--kernel-log`: the programs with their error reports pass the verifier and follow
/// forks; the reports' ring and switch are pinned with the other maps, and a restarted
/// daemon resuming the programs reads them. No program fails in normal work.
#[test]
fn with_kernel_log_the_programs_load_follow_forks_and_resume() -> Result<()> {
    let mut daemon = Daemon::start_with(&[], &["--kernel-log"])?;
    let mut work = Workload::python(FORKS_CONTINUOUSLY, &[])?;
    daemon.register(work.pid(), "logged")?;
    work.send("go")?;
    await_child_watched(&daemon, &mut work)?;
    for map in ["AYA_LOGS", "KERNEL_LOG"] {
        assert!(daemon.pin_dir.join(map).exists(), "{map} pinned");
    }
    daemon.restart()?;
    await_child_watched(&daemon, &mut work)?;
    let log = daemon.log();
    assert!(log.contains("resuming"), "{log}");
    assert_eq!(log.matches("kernel log on").count(), 2, "{log}");
    assert!(!log.contains("watchdog_ebpf"), "a program failed: {log}");
    Ok(())
}

/// The next child FORKS_CONTINUOUSLY reports, once the daemon has it in the tree.
fn await_child_watched(daemon: &Daemon, work: &mut Workload) -> Result<()> {
    let child = loop {
        if let Some(pid) = work.read_line()?.strip_prefix("child ") {
            break pid.parse::<u32>()?;
        }
    };
    await_state(&format!("child {child} watched"), || {
        let roots = daemon.tree(None)?;
        Ok(all_nodes(&roots)
            .iter()
            .any(|n| n.pid == child)
            .then_some(()))
    })
}
