//! Zombies, end to end: a real process that forks children and never waits for them.
//! Past `--max-zombies` it is killed (reason zombies, the record says how many it held)
//! and its zombies are gone; under the limit nothing happens, and dump-tree, status and
//! /metrics show them. PID 1 here never reaps, so the workload runs under a subreaper
//! the test owns (`PR_SET_CHILD_SUBREAPER`, outside the analysis) that reaps whatever
//! comes to it: the killed holder's zombies go there, as they would go to a reaping init.

use anyhow::Result;
use watchdog_tests::{
    Daemon, EventRecord, Reason, TreeNode, Workload, alive, all_nodes, await_state, free_port,
    http_get, state_of,
};

/// The test's subreaper: forks the holder (printing its pid), then reaps every child
/// and every orphan handed to it until none is left. The holder reads a number N,
/// forks N children that exit at once, printing each one's pid, then "forked", and
/// never waits for them; a line "reap" later makes it wait for them all and say
/// "reaped".
const SUBREAPER: &str = r#"
import ctypes, os, sys, time
PR_SET_CHILD_SUBREAPER = 36
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
    sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")
holder = os.fork()
if holder == 0:
    kids = []
    for _ in range(int(sys.stdin.readline())):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        kids.append(pid)
        print(pid, flush=True)
    print("forked", flush=True)
    if sys.stdin.readline().strip() == "reap":
        for pid in kids:
            os.waitpid(pid, 0)
        print("reaped", flush=True)
    time.sleep(600)
    os._exit(0)
print(holder, flush=True)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"#;

/// Starts the subreaper and registers its holder as `id` with `--max-zombies max`, then
/// has it fork `children`; returns the workload, the holder's pid and the pids of the
/// children it forked (all of them, or those before it was killed).
fn holder_with_zombies(
    daemon: &Daemon,
    id: &str,
    max: u32,
    children: u32,
) -> Result<(Workload, u32, Vec<u32>)> {
    let mut work = Workload::python(SUBREAPER, &[])?;
    let holder: u32 = work.read_line()?.parse()?;
    daemon.cli_ok(&[
        "register",
        "--pid",
        &holder.to_string(),
        "--analysis-id",
        id,
        "--max-zombies",
        &max.to_string(),
    ])?;
    work.send(&children.to_string())?;
    let mut kids = Vec::new();
    // A holder killed midway prints no more: its stdout ends with the subreaper.
    while let Ok(line) = work.read_line() {
        if line == "forked" {
            break;
        }
        kids.push(line.parse()?);
    }
    Ok((work, holder, kids))
}

fn zombie_nodes(roots: &[TreeNode]) -> Vec<u32> {
    let mut pids: Vec<u32> = all_nodes(roots)
        .into_iter()
        .filter(|n| n.zombie)
        .map(|n| n.pid)
        .collect();
    pids.sort_unstable();
    pids
}

/// Until status and dump-tree show no zombie: the daemon saw them reaped.
fn await_no_zombie_shown(daemon: &Daemon) -> Result<()> {
    await_state("no zombie shown", || {
        let status = daemon.status()?;
        Ok((status.zombies == 0 && zombie_nodes(&daemon.tree(None)?).is_empty()).then_some(()))
    })
}

#[test]
fn a_process_holding_more_zombies_than_its_limit_is_killed_and_its_zombies_are_gone() -> Result<()>
{
    let daemon = Daemon::start()?;
    let (_work, holder, kids) = holder_with_zombies(&daemon, "zombie-pile", 5, 8)?;

    let record: EventRecord = await_state("the holder's kill record", || {
        Ok(daemon
            .events()?
            .into_iter()
            .find(|r| r.record.pid == holder && r.record.reason == Reason::Zombies))
    })?;
    let held = record.record.zombies.expect("a zombies record counts them");
    assert!(
        held > 5 && held <= kids.len() as u64 && kids.len() <= 8,
        "{record:?} with {} forked",
        kids.len()
    );
    assert_eq!(record.record.limit, Some(5));
    assert_eq!(record.record.analysis_id, "zombie-pile");
    assert_eq!(record.record.signals[0].signal, "SIGTERM");
    assert!(!alive(holder), "the holder is dead");
    // Handed to the subreaper, which reaps them: no zombie of it is left.
    await_state("its zombies reaped", || {
        Ok(kids
            .iter()
            .all(|&pid| state_of(pid) != Some('Z'))
            .then_some(()))
    })?;
    await_no_zombie_shown(&daemon)?;
    assert_eq!(daemon.status()?.kills_by_reason["zombies"], 1);
    eprintln!(
        "figures: killed holding {held} zombies (limit 5; {} of 8 forked before the kill)",
        kids.len()
    );
    Ok(())
}

#[test]
fn zombies_under_the_limit_are_shown_marked_and_nothing_is_killed() -> Result<()> {
    let port = free_port()?;
    let daemon = Daemon::builder().http_port(port).start()?;
    let (mut work, holder, mut kids) = holder_with_zombies(&daemon, "few-zombies", 5, 3)?;
    kids.sort_unstable();
    assert_eq!(kids.len(), 3, "all forked");

    let status = await_state("three zombies in status", || {
        let status = daemon.status()?;
        Ok((status.zombies == 3).then_some(status))
    })?;
    assert_eq!(status.zombies_by_analysis["few-zombies"], 3);
    assert!(
        kids.iter().all(|&pid| state_of(pid) == Some('Z')),
        "real zombies"
    );
    let roots = daemon.tree(Some("few-zombies"))?;
    assert_eq!(zombie_nodes(&roots), kids);
    assert!(
        roots[0].pid == holder
            && roots[1..]
                .iter()
                .all(|c| c.zombie && c.ppid == holder && c.depth == 1),
        "{roots:?}"
    );
    let text = daemon.cli_ok(&["dump-tree"])?;
    assert_eq!(text.matches("ZOMBIE").count(), 3, "{text}");
    assert!(text.contains("3 zombies, "), "{text}");
    assert!(text.contains("max-zombies 5"), "{text}");
    let (_, metrics) = http_get(port, "/metrics")?;
    assert!(metrics.contains("\nwatchdog_zombies 3\n"), "{metrics}");
    // Seen, counted, under the limit: nothing is done.
    assert!(alive(holder));
    assert!(
        daemon
            .events()?
            .iter()
            .all(|r| r.record.reason != Reason::Zombies)
    );

    // Once the holder waits for them, the daemon sees them go.
    work.send("reap")?;
    assert_eq!(work.read_line()?, "reaped");
    await_no_zombie_shown(&daemon)?;
    assert!(alive(holder));
    Ok(())
}
