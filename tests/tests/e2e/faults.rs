//! Failing closed, end to end: a fork bomb past its process limit, a kernel map with no
//! room left, and descriptors that must not grow with registrations. Every daemon here
//! has a bystander process it must never touch (checked when the daemon is dropped).

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use watchdog_tests::{
    Accounts, Daemon, Reason, Workload, alive, alive_in_group, all_nodes, await_state,
};

/// Forks children that sleep, as fast as it can, once told to.
const FORK_LOOP: &str = r#"
import os, sys, time
sys.stdin.readline()
while True:
    if os.fork() == 0:
        time.sleep(600)
        os._exit(0)
"#;

/// Forks two children that sleep, then sleeps.
const CALM: &str = r#"
import os, sys, time
for _ in range(2):
    if os.fork() == 0:
        time.sleep(600)
        os._exit(0)
os.write(1, b"ready\n")
time.sleep(600)
"#;

#[test]
fn with_on_max_processes_kill_an_analysis_forking_past_max_processes_is_killed_and_nothing_else_is()
-> Result<()> {
    let daemon = Daemon::builder()
        .arg("--on-max-processes", "kill")
        .start()?;
    let mut calm = Workload::python(CALM, &[])?;
    assert_eq!(calm.read_line()?, "ready");
    daemon.register(calm.pid(), "calm")?;
    let mut bomb = Workload::python(FORK_LOOP, &[])?;
    daemon.register_with(
        bomb.pid(),
        "bomb",
        &["--max-processes", "50", "--grace", "1s"],
    )?;
    bomb.send("go")?;
    await_state("nothing of the bomb left", || {
        Ok(alive_in_group(bomb.pid()).is_empty().then_some(()))
    })?;
    let records = await_state("the bomb's records", || {
        let records = daemon.events_of("bomb")?;
        let done = records.len() > 50 && daemon.tree(Some("bomb"))?.is_empty();
        Ok(done.then_some(records))
    })?;
    assert!(
        records
            .iter()
            .all(|r| r.record.reason == Reason::MaxProcesses && r.record.limit == Some(50)),
        "{records:?}"
    );
    let calm_tree = daemon.tree(Some("calm"))?;
    assert_eq!(
        all_nodes(&calm_tree).len(),
        3,
        "the other analysis keeps its 3 processes"
    );
    assert_eq!(alive_in_group(calm.pid()).len(), 3, "and they all live");
    assert!(daemon.events_of("calm")?.is_empty());
    let status = daemon.status()?;
    assert_eq!(
        status.kills_by_reason["max_processes"],
        records.len() as u64
    );
    Ok(())
}

/// Forks as many sleeping children as it is told, then says so.
const FILLER: &str = r#"
import os, sys, time
n = int(sys.stdin.readline())
for _ in range(n):
    if os.fork() == 0:
        time.sleep(600)
        os._exit(0)
os.write(1, b"filled\n")
time.sleep(600)
"#;

/// Once told: a child, which forks a grandchild, which prints both pids and, once the
/// file named by argv[1] exists, forks a great-grandchild and prints its pid.
const LINEAGE: &str = r#"
import os, sys, time
trigger = sys.argv[1]
sys.stdin.readline()
if os.fork() == 0:
    if os.fork() == 0:
        os.write(1, f"{os.getppid()} {os.getpid()}\n".encode())
        while not os.path.exists(trigger):
            time.sleep(0.02)
        if os.fork() == 0:
            os.write(1, f"{os.getpid()}\n".encode())
            time.sleep(600)
            os._exit(0)
        time.sleep(600)
        os._exit(0)
    time.sleep(600)
    os._exit(0)
time.sleep(600)
"#;

#[test]
fn a_full_kernel_map_costs_the_largest_analysis_and_the_others_keep_their_tracking() -> Result<()> {
    const CAPACITY: u32 = 64;
    let daemon = Daemon::builder()
        .arg("--watched-capacity", CAPACITY.to_string())
        .start()?;
    let trigger = daemon.dir.join("fork-again");
    let mut victim = Workload::python(LINEAGE, &[trigger.to_str().unwrap()])?;
    daemon.register(victim.pid(), "victim")?;
    let mut hog = Workload::python(FILLER, &[])?;
    daemon.register_with(hog.pid(), "hog", &["--grace", "1s"])?;
    // The victim's root and the hog's root hold 2 entries: 62 children fill the map.
    hog.send(&(CAPACITY - 2).to_string())?;
    assert_eq!(hog.read_line()?, "filled");
    await_state("the hog's 63 processes in the tree", || {
        Ok((all_nodes(&daemon.tree(Some("hog"))?).len() == 63).then_some(()))
    })?;
    assert_eq!(
        daemon.status()?.faults.untracked_forks,
        0,
        "the map is just full"
    );

    // The victim forks into the full map: its child is reported all the same, and the
    // grandchild that child forks (no kernel event: its parent is not in the map) is
    // found when the child goes back into the map.
    victim.send("go")?;
    let line = victim.read_line()?;
    let (child, grandchild) = line.split_once(' ').expect("two pids");
    let (child, grandchild): (u32, u32) = (child.parse()?, grandchild.parse()?);
    await_state("the hog killed and gone", || {
        Ok(alive_in_group(hog.pid()).is_empty().then_some(()))
    })?;
    let hog_records = await_state("the hog's records", || {
        let records = daemon.events_of("hog")?;
        Ok((records.len() == 63).then_some(records))
    })?;
    assert!(
        hog_records
            .iter()
            .all(|r| r.record.reason == Reason::MapFull),
        "{hog_records:?}"
    );
    await_state("the victim's child and grandchild tracked", || {
        let pids: Vec<u32> = all_nodes(&daemon.tree(Some("victim"))?)
            .iter()
            .map(|n| n.pid)
            .collect();
        let status = daemon.status()?;
        let back = status.faults.untracked_now == 0;
        Ok((back && pids.contains(&child) && pids.contains(&grandchild)).then_some(()))
    })?;
    // Back in the kernel map: the grandchild's fork is seen by the kernel itself.
    std::fs::write(&trigger, "")?;
    let great_grandchild: u32 = victim.read_line()?.parse()?;
    await_state("the great-grandchild tracked", || {
        let tree = daemon.tree(Some("victim"))?;
        Ok(all_nodes(&tree)
            .iter()
            .any(|n| n.pid == great_grandchild && n.ppid == grandchild)
            .then_some(()))
    })?;
    for pid in [victim.pid(), child, grandchild, great_grandchild] {
        assert!(alive(pid), "the victim's {pid} was never signalled");
    }
    assert!(daemon.events_of("victim")?.is_empty());
    let status = daemon.status()?;
    assert!(status.faults.untracked_forks >= 1);
    assert_eq!(status.faults.watched_capacity, CAPACITY);
    Ok(())
}

/// Sleeping processes started by this test (their launcher), killed when dropped.
struct Sleepers(Vec<Child>);

impl Drop for Sleepers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn open_descriptors(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

#[test]
fn two_thousand_roots_registered_and_unregistered_leave_no_descriptor_behind() -> Result<()> {
    const ROOTS: usize = 2000;
    let daemon = Daemon::start()?;
    let spawn = || {
        Command::new("sleep")
            .arg("600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
    };
    let register = |pid: u32, id: &str| -> Result<()> {
        let answer = daemon.request(&format!(
            r#"{{"op":"register","pid":{pid},"analysis_id":"{id}"}}"#
        ))?;
        anyhow::ensure!(answer.get("ok").is_some(), "register {pid}: {answer}");
        Ok(())
    };
    let unregister = |pid: u32| -> Result<()> {
        let answer = daemon.request(&format!(r#"{{"op":"unregister","pid":{pid}}}"#))?;
        anyhow::ensure!(answer.get("ok").is_some(), "unregister {pid}: {answer}");
        Ok(())
    };
    // One round first, and the database connected (it connects in the background), so
    // that whatever the daemon opens once is open before counting.
    let warm = Sleepers(vec![spawn()?]);
    register(warm.0[0].id(), "warm-up")?;
    unregister(warm.0[0].id())?;
    await_state("the database connected", || {
        Ok((daemon.status()?.db == "ok").then_some(()))
    })?;
    let before = open_descriptors(daemon.pid())?;

    let mut sleepers = Sleepers(Vec::with_capacity(ROOTS));
    for i in 0..ROOTS {
        sleepers.0.push(spawn()?);
        register(sleepers.0[i].id(), &format!("root-{i}"))?;
    }
    let status = daemon.status()?;
    assert_eq!(status.monitored_count, ROOTS);
    assert_eq!(
        status.faults.launchers_watched, 1,
        "one watch for the launcher of all the roots"
    );
    let during = open_descriptors(daemon.pid())?;
    for child in &sleepers.0 {
        unregister(child.id())?;
    }
    let after = await_state("the descriptors back to their count", || {
        let now = open_descriptors(daemon.pid())?;
        Ok((now <= before).then_some(now))
    })?;
    let status = daemon.status()?;
    assert_eq!(
        (status.monitored_count, status.faults.launchers_watched),
        (0, 0)
    );
    eprintln!("descriptors: {before} before, {during} with {ROOTS} roots, {after} after");
    assert!(
        during <= before + 2,
        "{during} descriptors with {ROOTS} roots"
    );
    Ok(())
}

/// Every process forks as fast as it can, forever, ignoring SIGTERM; once told.
const UNBOUNDED_FORK_BOMB: &str = r#"
import os, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
sys.stdin.readline()
while True:
    try:
        os.fork()
    except OSError:
        pass
"#;

/// RLIMIT_NPROC of the bomb's user: all that bounds it.
const BOMB_NPROC: &str = "600";

/// A fork bomb with no process limit, SIGTERM ignored, bounded only by its user's
/// RLIMIT_NPROC, under a 2 s timeout: once its grace is over the kernel kills each
/// member at its next fork, so the kill converges (one SIGKILL at a time never could),
/// and another analysis' timeout falling in the middle of it is still enforced.
#[test]
fn an_unbounded_fork_bomb_is_gone_soon_after_its_grace_and_a_bystander_timeout_holds() -> Result<()>
{
    let mut accounts = Accounts::new("bomb");
    let bomber = accounts.user("b", &[])?;
    let daemon = Daemon::start()?;
    let nproc = format!("--nproc={BOMB_NPROC}");
    let mut argv = vec!["prlimit", &nproc, "--", "setpriv"];
    argv.extend(bomber.argv(&["/usr/bin/python3", "-c", UNBOUNDED_FORK_BOMB]));
    let mut bomb = Workload::spawn(env!("CARGO_BIN_EXE_reaper"), &argv)?;
    let root: u32 = bomb
        .read_line()?
        .strip_prefix("root ")
        .context("the reaper names the root")?
        .parse()?;
    assert_eq!(bomb.read_line()?, "ready");
    let calm = Workload::spawn("sleep", &["600"])?;

    let bomb_registered = Instant::now();
    daemon.register_with(root, "unbounded", &["--timeout", "2s", "--grace", "1s"])?;
    bomb.send("go")?;
    await_state("the bomb at its user's process limit", || {
        Ok((alive_in_group(bomb.pid()).len() > 400).then_some(()))
    })?;
    // Its deadline falls after the bomb's SIGKILLs began.
    std::thread::sleep(Duration::from_millis(1500).saturating_sub(bomb_registered.elapsed()));
    let calm_registered = SystemTime::now();
    daemon.register_with(calm.pid(), "bystander", &["--timeout", "2s"])?;

    // The reaper ends with the last member.
    await_state("nothing of the bomb left", || {
        Ok((!bomb.alive_now()).then_some(()))
    })?;
    let gone_after = bomb_registered.elapsed();
    let record = daemon.await_records_for(&[calm.pid()])?.remove(0);
    let sigterm = watchdog_tests::time_of(&record.record.signals[0].at);
    let late = sigterm.duration_since(calm_registered + Duration::from_secs(2))?;
    eprintln!(
        "figures: the bomb ({BOMB_NPROC} processes at most) gone {:?} after deadline + grace; \
         the bystander's SIGTERM at most {late:?} after its deadline",
        gone_after.saturating_sub(Duration::from_secs(3))
    );
    assert!(
        gone_after < Duration::from_secs(20),
        "converged: gone {gone_after:?} after registration"
    );
    let records = daemon.events_of("unbounded")?;
    assert!(records.iter().all(|r| r.record.reason == Reason::Timeout));
    let sent = |name: &str| {
        let mut at: Vec<SystemTime> = records
            .iter()
            .flat_map(|r| &r.record.signals)
            .filter(|s| s.signal == name)
            .map(|s| watchdog_tests::time_of(&s.at))
            .collect();
        at.sort();
        at
    };
    let (terms, kills) = (sent("SIGTERM"), sent("SIGKILL"));
    if let (Some(first), Some(last_term), Some(last_kill)) =
        (terms.first(), terms.last(), kills.last())
    {
        eprintln!(
            "figures: {} records, {} SIGTERMs over {:?}, {} SIGKILLs, the first {:?} and the last {:?} after the first SIGTERM",
            records.len(),
            terms.len(),
            last_term.duration_since(*first)?,
            kills.len(),
            kills[0].duration_since(*first)?,
            last_kill.duration_since(*first)?
        );
    }
    Ok(())
}
