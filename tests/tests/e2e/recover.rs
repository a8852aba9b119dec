//! Surviving restarts: the kernel keeps following processes while the daemon is down
//! (maps and links pinned under bpffs), and a restarted daemon acts on the gap.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::Value;
use watchdog_tests::{
    Daemon, Reason, Workload, alive, alive_in_group, all_nodes, await_state, bpf, free_port,
};

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

#[test]
fn a_crashed_daemon_restarts_with_every_gap_fork_watched_and_acts_on_the_gap() -> Result<()> {
    let mut daemon = Daemon::start()?;
    let mut work = Workload::python(FORKS_CONTINUOUSLY, &[])?;
    daemon.register(work.pid(), "recover")?;
    let sleeper = Workload::spawn("sleep", &["600"])?;
    daemon.register_with(sleeper.pid(), "deadline", &["--timeout", "2s"])?;
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
    let serving_after = restarted.elapsed()?;

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

    let orphan = daemon.await_record_for(grandchild)?;
    assert_eq!(orphan.record.reason, Reason::Orphan);
    await_state("the orphan killed", || {
        Ok((!alive(grandchild)).then_some(()))
    })?;

    let timeout = daemon.await_record_for(sleeper.pid())?;
    assert_eq!(timeout.record.reason, Reason::Timeout);
    let sigterm = humantime::parse_rfc3339(&timeout.record.signals[0].at)?;
    // The restart's own start (BTF, programs) aside: a slow machine takes seconds.
    assert!(
        sigterm.duration_since(restarted)? < serving_after + Duration::from_secs(2),
        "the passed deadline is enforced at once: SIGTERM {:?} after the restart began, serving after {serving_after:?}",
        sigterm.duration_since(restarted)?
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
    let mut daemon = Daemon::builder().flag("--kernel-log").start()?;
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

// ---- pinned state verified before it is trusted ------------------------------------

/// Forks a child (which sleeps) for each line read, and prints its pid.
const FORKS_ON_DEMAND: &str = r#"
import os, sys, time
while sys.stdin.readline():
    pid = os.fork()
    if pid == 0:
        time.sleep(600); os._exit(0)
    print(f"child {pid}", flush=True)
time.sleep(600)
"#;

/// Asks `work` (FORKS_ON_DEMAND) for a child and returns its pid.
fn fork_child(work: &mut Workload) -> Result<u32> {
    work.send("fork")?;
    let line = work.read_line()?;
    Ok(line
        .strip_prefix("child ")
        .with_context(|| format!("unexpected line {line:?}"))?
        .parse()?)
}

fn await_in_tree(daemon: &Daemon, analysis: &str, pids: &[u32]) -> Result<()> {
    await_state(&format!("{pids:?} watched in {analysis}"), || {
        let roots = daemon.tree(Some(analysis))?;
        let watched: BTreeSet<u32> = all_nodes(&roots).iter().map(|n| n.pid).collect();
        Ok(pids.iter().all(|p| watched.contains(p)).then_some(()))
    })
}

/// The analysis' deadline as the daemon has it (Unix ms).
fn deadline_ms(daemon: &Daemon, analysis: &str) -> Result<u64> {
    let answer = daemon.request(&format!(
        r#"{{"op":"dump_tree","analysis_id":"{analysis}"}}"#
    ))?;
    answer["ok"]["analyses"][0]["deadline_unix_ms"]
        .as_u64()
        .with_context(|| format!("no deadline for {analysis}: {answer}"))
}

/// The lines of the daemon's log that say pinned state was dropped: exactly one.
fn the_drop_line(daemon: &Daemon) -> String {
    let log = daemon.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("is not trusted"))
        .collect();
    assert_eq!(lines.len(), 1, "one line says why: {log}");
    lines[0].to_string()
}

/// The body of a GET to the daemon's --http listener, which must answer 200.
fn http_ok(daemon: &Daemon, port: u16, path: &str) -> Result<String> {
    let (code, body) = daemon.http_get(port, path)?;
    anyhow::ensure!(code == 200, "GET {path}: {code}");
    Ok(body)
}

/// A new analysis registered on the daemon that dropped the pins: the children it forks
/// after its registration are tracked, and its timeout kills them all.
fn new_analysis_is_enforced(daemon: &Daemon) -> Result<()> {
    let mut work = Workload::python(FORKS_ON_DEMAND, &[])?;
    daemon.register_with(work.pid(), "after", &["--timeout", "3s", "--grace", "1s"])?;
    let children = [fork_child(&mut work)?, fork_child(&mut work)?];
    await_in_tree(daemon, "after", &children)?;
    await_state("the timeout to kill the new analysis, children too", || {
        Ok(alive_in_group(work.pid()).is_empty().then_some(()))
    })?;
    for child in children {
        assert_eq!(
            daemon.await_record_for(child)?.record.reason,
            Reason::Timeout
        );
    }
    Ok(())
}

/// Pins another build's layout would have: the daemon reads none of it (it cannot know
/// what its bytes mean), says so in one line, counts it, and starts afresh.
#[test]
fn pins_of_another_layout_are_dropped_said_and_counted_and_nothing_is_read() -> Result<()> {
    let port = free_port()?;
    let mut daemon = Daemon::builder().http_port(port).start()?;
    let before = Workload::spawn("sleep", &["600"])?;
    daemon.register(before.pid(), "before")?;
    daemon.crash()?;
    let layout = bpf::open_pinned(&daemon.pin_dir.join("LAYOUT"))?;
    bpf::update(&layout, &0u32.to_ne_bytes(), &0x0bad_1a70_u64.to_ne_bytes())?;
    drop(layout);
    daemon.start_again()?;

    let line = the_drop_line(&daemon);
    assert!(
        line.contains("pinned LAYOUT is 0x000000000bad1a70"),
        "{line}"
    );
    assert!(line.contains("starting empty"), "{line}");
    let status = daemon.status()?;
    assert_eq!(status.pinned_state_dropped, 1);
    assert_eq!(status.analyses, 0, "nothing of another layout is read");
    let status: Value = serde_json::from_str(&http_ok(&daemon, port, "/status")?)?;
    assert_eq!(status["pinned_state_dropped"], 1, "{status}");
    let metrics = http_ok(&daemon, port, "/metrics")?;
    assert!(
        metrics
            .lines()
            .any(|l| l == "watchdog_pinned_state_dropped_total 1"),
        "{metrics}"
    );
    assert!(alive(before.pid()), "and no process is touched");
    new_analysis_is_enforced(&daemon)
}

/// A pinned map of another shape (value size) under pinned links of this build: said,
/// counted, dropped; the saved analyses (our layout) are still read and watched again.
#[test]
fn a_pinned_map_of_another_shape_is_dropped_and_the_saved_analyses_kept() -> Result<()> {
    let mut daemon = Daemon::start()?;
    let before = Workload::spawn("sleep", &["600"])?;
    daemon.register(before.pid(), "before")?;
    daemon.crash()?;
    let shape = bpf::Shape {
        map_type: bpf::BPF_MAP_TYPE_HASH,
        key_size: 4,
        value_size: 8,
        max_entries: 16,
        flags: 0,
    };
    bpf::replace_pinned_map(&daemon.pin_dir.join("WATCHED"), shape, "WATCHED")?;
    daemon.start_again()?;

    let line = the_drop_line(&daemon);
    assert!(
        line.contains("pinned WATCHED (map id")
            && line.contains("is a hash of 4-byte keys and 8-byte values, 16 entries"),
        "{line}"
    );
    assert!(
        line.contains("1 saved analyses and 1 roots were read first"),
        "{line}"
    );
    assert_eq!(daemon.status()?.pinned_state_dropped, 1);
    await_in_tree(&daemon, "before", &[before.pid()])?;
    new_analysis_is_enforced(&daemon)
}

/// The split brain: links kept, the WATCHED pin replaced by a new map of the very same
/// shape, which the attached programs never read. The daemon finds that the pinned map
/// is not the programs' own, says so, drops it all and rebuilds: an analysis registered
/// before, whose root survives, is watched again (its old and new children) and keeps
/// its deadline; a new analysis' children are tracked.
#[test]
fn a_map_swapped_under_pinned_links_is_caught_and_a_surviving_analysis_rewatched() -> Result<()> {
    let mut daemon = Daemon::start()?;
    let mut survivor = Workload::python(FORKS_ON_DEMAND, &[])?;
    daemon.register_with(
        survivor.pid(),
        "survivor",
        &["--timeout", "8s", "--grace", "1s"],
    )?;
    let old_child = fork_child(&mut survivor)?;
    await_in_tree(&daemon, "survivor", &[survivor.pid(), old_child])?;
    let deadline = deadline_ms(&daemon, "survivor")?;
    daemon.crash()?;
    // The same type, sizes, entries and flags, the same name: only its id differs.
    let watched = daemon.pin_dir.join("WATCHED");
    let (old_id, shape) = bpf::map_info(&watched)?;
    bpf::replace_pinned_map(&watched, shape, "WATCHED")?;
    let (new_id, new_shape) = bpf::map_info(&watched)?;
    assert_eq!(new_shape, shape);
    assert_ne!(new_id, old_id);
    daemon.start_again()?;

    let line = the_drop_line(&daemon);
    assert!(
        line.contains(&format!(
            "pinned WATCHED (map id {new_id}) is not the map the attached sched_process_"
        )) && line.contains(&format!("program uses (id {old_id})")),
        "{line}"
    );
    assert!(line.contains("roots were read first"), "{line}");
    assert_eq!(daemon.status()?.pinned_state_dropped, 1);

    await_in_tree(&daemon, "survivor", &[survivor.pid(), old_child])?;
    let new_child = fork_child(&mut survivor)?;
    await_in_tree(&daemon, "survivor", &[new_child])?;
    assert_eq!(
        deadline_ms(&daemon, "survivor")?,
        deadline,
        "the deadline is the one registered, not restarted"
    );
    new_analysis_is_enforced(&daemon)?;

    await_state("the survivor's timeout to kill it all", || {
        Ok(alive_in_group(survivor.pid()).is_empty().then_some(()))
    })?;
    let record = daemon.await_record_for(new_child)?;
    assert_eq!(record.record.reason, Reason::Timeout);
    let sigterm = humantime::parse_rfc3339(&record.record.signals[0].at)?;
    let sigterm_ms = sigterm.duration_since(SystemTime::UNIX_EPOCH)?.as_millis() as u64;
    assert!(
        sigterm_ms >= deadline && sigterm_ms < deadline + 2000,
        "killed at the deadline registered before the swap ({deadline}), not later: {sigterm_ms}"
    );
    for pid in [survivor.pid(), old_child] {
        assert_eq!(daemon.await_record_for(pid)?.record.reason, Reason::Timeout);
    }
    Ok(())
}

/// A plain restart over untouched pins resumes them: nothing is dropped.
#[test]
fn untouched_pins_are_resumed_not_dropped() -> Result<()> {
    let mut daemon = Daemon::start()?;
    let work = Workload::spawn("sleep", &["600"])?;
    daemon.register(work.pid(), "kept")?;
    daemon.crash()?;
    daemon.start_again()?;
    let log = daemon.log();
    assert!(log.contains("resuming"), "{log}");
    assert!(!log.contains("is not trusted"), "{log}");
    assert_eq!(daemon.status()?.pinned_state_dropped, 0);
    await_in_tree(&daemon, "kept", &[work.pid()])
}

/// Says `term UNIX_TIME` on each SIGTERM and lives on.
const SAYS_WHEN_SIGTERMED: &str = r#"
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: print(f"term {time.time()}", flush=True))
print("ready", flush=True)
while True:
    time.sleep(600)
"#;

/// A daemon SIGKILLed every second while an analysis that ignores SIGTERM is in its
/// kill's grace: each new daemon takes the kill up where it was, sends no second
/// SIGTERM, and the SIGKILL comes when the first SIGTERM's grace ends (the next daemon
/// up sends it, if none runs at that moment), never a grace later.
#[test]
fn a_daemon_killed_every_second_still_sigkills_at_the_end_of_the_first_grace() -> Result<()> {
    const GRACE: Duration = Duration::from_secs(4);
    let mut daemon = Daemon::start()?;
    let mut work = Workload::python(SAYS_WHEN_SIGTERMED, &[])?;
    assert_eq!(work.read_line()?, "ready");
    daemon.register_with(
        work.pid(),
        "restarts",
        &["--timeout", "1s", "--grace", "4s"],
    )?;
    let sigterm = sigterm_time(&work.read_line()?)?;
    let pid = work.pid();

    // The workload's end, as its parent sees it: when it died, how, after how many
    // more SIGTERMs.
    let (ended_tx, ended) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut more_sigterms = 0;
        while work.read_line().is_ok() {
            more_sigterms += 1;
        }
        let status = work.wait();
        let _ = ended_tx.send((SystemTime::now(), status, more_sigterms));
    });
    let mut restarts = 0;
    let (died, status, more_sigterms) = loop {
        if let Ok(end) = ended.try_recv() {
            break end;
        }
        assert!(
            restarts < 20,
            "still alive after {restarts} restarts, {:?} past its deadline + grace",
            SystemTime::now().duration_since(sigterm + GRACE)
        );
        let started = Instant::now();
        daemon.crash()?;
        daemon.start_again()?;
        restarts += 1;
        if let Ok(end) =
            ended.recv_timeout(Duration::from_secs(1).saturating_sub(started.elapsed()))
        {
            break end;
        }
    };
    use std::os::unix::process::ExitStatusExt as _;
    assert_eq!(status?.signal(), Some(libc::SIGKILL), "SIGKILLed");
    assert_eq!(more_sigterms, 0, "one SIGTERM across {restarts} daemons");
    // The workload stamps its SIGTERM when its handler runs, a little after the
    // daemon sent it: an end a few ms "before" stamp + grace is on time.
    let handler_latency = Duration::from_millis(100);
    let late = (died + handler_latency)
        .duration_since(sigterm + GRACE)
        .context("SIGKILLed before its grace ended")?
        .saturating_sub(handler_latency);
    eprintln!(
        "figures: SIGKILLed {late:?} after SIGTERM + grace, across {restarts} daemons each SIGKILLed within 1 s of its start"
    );
    assert!(late < Duration::from_secs(5), "SIGKILLed {late:?} late");
    // Its record, if the daemon that saw it die lived to write it, says the same.
    if let Some(record) = daemon
        .events_of("restarts")?
        .iter()
        .find(|r| r.record.pid == pid)
    {
        let signals: Vec<&str> = record
            .record
            .signals
            .iter()
            .map(|s| s.signal.as_str())
            .collect();
        assert_eq!(signals, ["SIGTERM", "SIGKILL"], "{record:?}");
    }
    Ok(())
}

fn sigterm_time(line: &str) -> Result<SystemTime> {
    let secs: f64 = line
        .strip_prefix("term ")
        .with_context(|| format!("a SIGTERM said: {line:?}"))?
        .parse()?;
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs))
}
