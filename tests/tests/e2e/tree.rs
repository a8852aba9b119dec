//! The live process tree, end to end: real kernel programs, real daemon, real processes.

use std::collections::BTreeSet;

use anyhow::{Result, bail};
use watchdog_tests::{
    Daemon, Workload, all_nodes, await_state, children_of, roots_of, thread_count,
};

/// Waits for "go" on stdin, forks 3 children (the first forks a grandchild), reports
/// their pids and keeps them all alive.
const THREE_CHILDREN_ONE_GRANDCHILD: &str = r#"
import os, sys, time
sys.stdin.readline()
children = []
for i in range(3):
    pid = os.fork()
    if pid == 0:
        if i == 0:
            g = os.fork()
            if g == 0:
                time.sleep(600); os._exit(0)
            os.write(1, f"grandchild {g}\n".encode())  # one write: lines must not interleave
        time.sleep(600); os._exit(0)
    children.append(pid)
os.write(1, ("children " + " ".join(map(str, children)) + "\n").encode())
time.sleep(600)
"#;

#[test]
fn a_registered_process_children_and_grandchild_form_exactly_the_tree() -> Result<()> {
    let daemon = Daemon::start()?;
    let mut work = Workload::python(THREE_CHILDREN_ONE_GRANDCHILD, &[])?;
    daemon.register(work.pid(), "tree-5")?;
    work.send("go")?;
    let (mut children, mut grandchild) = (Vec::new(), 0u32);
    while children.is_empty() || grandchild == 0 {
        let line = work.read_line()?;
        let mut words = line.split_whitespace();
        match words.next() {
            Some("children") => children = words.map(|w| w.parse().unwrap()).collect(),
            Some("grandchild") => grandchild = words.next().unwrap().parse()?,
            _ => {}
        }
    }

    let roots = await_state("5 nodes in the tree", || {
        let roots = daemon.tree(Some("tree-5"))?;
        Ok((all_nodes(&roots).len() == 5).then_some(roots))
    })?;

    let root = roots_of(&roots);
    assert_eq!(root.len(), 1, "one root: {roots:#?}");
    assert_eq!(root[0].pid, work.pid());
    let got: BTreeSet<u32> = children_of(&roots, work.pid())
        .iter()
        .map(|c| c.pid)
        .collect();
    assert_eq!(got, children.iter().copied().collect());
    let below_first = children_of(&roots, children[0]);
    assert_eq!(
        below_first
            .iter()
            .map(|c| (c.pid, c.depth))
            .collect::<Vec<_>>(),
        vec![(grandchild, 2)]
    );
    for node in all_nodes(&roots) {
        assert_eq!(node.analysis_id, "tree-5");
        assert!(node.rss_bytes > 0, "{node:?} has no RSS");
    }
    Ok(())
}

const EIGHT_THREADS: &str = r#"
import sys, threading
sys.stdin.readline()
stop = threading.Event()
threads = [threading.Thread(target=stop.wait) for _ in range(8)]
for t in threads: t.start()
print("threads", flush=True)
sys.stdin.readline()
stop.set()
for t in threads: t.join()
"#;

#[test]
fn a_process_with_eight_threads_is_one_node_and_its_exit_removes_it() -> Result<()> {
    let daemon = Daemon::start()?;
    let mut work = Workload::python(EIGHT_THREADS, &[])?;
    daemon.register(work.pid(), "threads")?;
    work.send("go")?;
    assert_eq!(work.read_line()?, "threads");
    assert_eq!(thread_count(work.pid()), 9, "the main thread and 8 more");

    let roots = daemon.tree(Some("threads"))?;
    assert_eq!(all_nodes(&roots).len(), 1, "{roots:#?}");
    assert_eq!(roots[0].pid, work.pid());
    assert_eq!(daemon.status()?.forks_seen, 0, "threads are not forks");

    work.send("exit")?;
    assert!(work.wait()?.success());
    await_state("the exited process to leave the tree", || {
        Ok(daemon.tree(None)?.is_empty().then_some(()))
    })?;
    let status = daemon.status()?;
    assert_eq!((status.exits_seen, status.monitored_count), (1, 0));
    Ok(())
}

const FORK_LOOP: &str = r#"
import os, sys
n = int(sys.argv[1])
sys.stdin.readline()
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
print("done", flush=True)
sys.stdin.readline()
"#;

#[test]
fn five_thousand_short_lived_children_are_all_seen_and_gone() -> Result<()> {
    const CHILDREN: u64 = 5000;
    let daemon = Daemon::start()?;
    let mut work = Workload::python(FORK_LOOP, &[&CHILDREN.to_string()])?;
    daemon.register(work.pid(), "storm")?;
    work.send("go")?;
    assert_eq!(work.read_line()?, "done");

    let status = await_state("every fork and exit event", || {
        let s = daemon.status()?;
        Ok((s.forks_seen >= CHILDREN && s.exits_seen >= CHILDREN).then_some(s))
    })?;
    assert_eq!(status.forks_seen, CHILDREN);
    assert_eq!(status.exits_seen, CHILDREN);
    assert_eq!(status.lost_events, 0);
    assert_eq!(status.resyncs, 0);
    let roots = daemon.tree(Some("storm"))?;
    assert_eq!(
        all_nodes(&roots).len(),
        1,
        "only the forking parent is left"
    );
    assert_eq!(roots[0].pid, work.pid());
    Ok(())
}

#[test]
fn exec_watches_a_forking_pipeline_and_passes_its_exit_code_through() -> Result<()> {
    let daemon = Daemon::start()?;
    let script = "sleep 300 | sleep 301 & echo started; read go; exit 7";
    let mut exec = Workload::spawn(
        watchdog_tests::watchdog_bin().to_str().unwrap(),
        &[
            "--socket",
            daemon.socket.to_str().unwrap(),
            "exec",
            "--analysis-id",
            "pipe",
            "--",
            "sh",
            "-c",
            script,
        ],
    )?;
    assert_eq!(exec.read_line()?, "started");

    // Forked first, exec'd a moment later: wait for both events, not only the forks.
    let roots = await_state("the shell and both sleeps, exec'd", || {
        let roots = daemon.tree(Some("pipe"))?;
        let comms: Vec<&str> = all_nodes(&roots).iter().map(|n| n.comm.as_str()).collect();
        Ok(
            (comms.len() == 3 && comms.iter().filter(|c| **c == "sleep").count() == 2)
                .then_some(roots),
        )
    })?;
    assert_eq!(roots_of(&roots).len(), 1);
    let shell = &roots[0];
    assert_eq!(shell.ppid, exec.pid(), "the command is exec's own child");
    assert_eq!(shell.comm, "sh");
    let sleeps: Vec<&str> = children_of(&roots, shell.pid)
        .iter()
        .map(|c| c.comm.as_str())
        .collect();
    assert_eq!(sleeps, vec!["sleep", "sleep"], "exec'd names are tracked");

    exec.send("go")?;
    assert_eq!(exec.wait()?.code(), Some(7));
    Ok(())
}

#[test]
fn the_programs_load_in_a_mount_namespace_without_tracefs() -> Result<()> {
    let hide_tracefs = "umount -l /sys/kernel/tracing 2>/dev/null; umount -l /sys/kernel/debug 2>/dev/null; \
        if grep -qw tracefs /proc/self/mounts; then echo 'tracefs still mounted' >&2; exit 99; fi; exec \"$@\"";
    let daemon = Daemon::builder()
        .wrapper(&[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            hide_tracefs,
            "sh",
        ])
        .start()?;
    let mounts = std::fs::read_to_string(format!("/proc/{}/mounts", daemon_pid_of(&daemon)?))?;
    assert!(
        !mounts.contains("tracefs"),
        "tracefs visible to the daemon:\n{mounts}"
    );

    let mut work = Workload::python(THREE_CHILDREN_ONE_GRANDCHILD, &[])?;
    daemon.register(work.pid(), "no-tracefs")?;
    work.send("go")?;
    await_state("forks seen without tracefs", || {
        Ok((all_nodes(&daemon.tree(None)?).len() == 5).then_some(()))
    })?;
    Ok(())
}

/// The daemon's pid when it runs behind a wrapper that execs it: the wrapper's pid.
fn daemon_pid_of(daemon: &Daemon) -> Result<u32> {
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", daemon.pid()))?;
    assert_eq!(
        comm.trim(),
        "watchdog-user",
        "the wrapper exec'd the daemon"
    );
    Ok(daemon.pid())
}

/// A fork storm while the daemon's loop is stalled: 5,000 forks make 10,000 events,
/// more than the 4 KiB ring plus the daemon's bounded buffer hold, so events are lost
/// for certain. Two children forked mid-storm stay alive.
const STORM_KEEPING_TWO: &str = r#"
import os, sys, time
sys.stdin.readline()
kept = []
for i in range(5000):
    keep = i % 2000 == 1000
    pid = os.fork()
    if pid == 0:
        if keep:
            time.sleep(600)
        os._exit(0)
    if keep:
        kept.append(pid)
    else:
        os.waitpid(pid, 0)
print(" ".join(map(str, kept)), flush=True)
sys.stdin.readline()
"#;

#[test]
fn lost_events_are_counted_and_the_tree_is_repaired_from_the_kernel_map() -> Result<()> {
    let daemon = Daemon::builder()
        .arg("--ring-bytes", "4096")
        .flag("--test-faults")
        .start()?;
    let mut work = Workload::python(STORM_KEEPING_TWO, &[])?;
    daemon.register(work.pid(), "lossy")?;
    let stall = daemon.request(r#"{"op":"stall","ms":3000}"#)?;
    assert_eq!(stall["ok"]["kind"], "stalling", "{stall}");
    work.send("go")?;
    let kept: BTreeSet<u32> = work
        .read_line()?
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(kept.len(), 2);

    let status = await_state("a resync after the losses", || {
        let s = daemon.status()?;
        Ok((s.resyncs >= 1).then_some(s))
    })?;
    assert!(
        status.lost_events > 0,
        "the scenario must overflow the ring: {status:?}"
    );
    let roots = await_state(
        "the repaired tree: the parent and the two kept children",
        || {
            let roots = daemon.tree(Some("lossy"))?;
            Ok((all_nodes(&roots).len() == 3).then_some(roots))
        },
    )?;
    assert_eq!(roots_of(&roots).len(), 1);
    assert_eq!(roots[0].pid, work.pid());
    let children: BTreeSet<u32> = children_of(&roots, work.pid())
        .iter()
        .map(|c| c.pid)
        .collect();
    assert_eq!(children, kept, "nothing escaped, nothing stale");
    Ok(())
}

/// Four threads; the main one leaves first (`pthread_exit`), and the others serve the
/// test on stdin: `fork` (a child that sleeps, its pid printed) and `exit` (the child
/// killed and reaped, then the whole process gone).
const LEADER_EXITS_FIRST: &str = r#"
import ctypes, os, signal, sys, threading
def serve():
    child = None
    for line in sys.stdin:
        if line.strip() == "fork":
            child = os.fork()
            if child == 0:
                signal.pthread_sigmask(signal.SIG_SETMASK, [])
                os.execvp("sleep", ["sleep", "600"])
            print(child, flush=True)
        elif line.strip() == "exit":
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            os._exit(0)
idle = threading.Event()
threads = [threading.Thread(target=serve)] + [threading.Thread(target=idle.wait) for _ in range(3)]
for t in threads:
    t.start()
print("up", flush=True)
ctypes.CDLL(None).pthread_exit(None)
"#;

/// A process whose main thread exits before the others is one process still: the
/// kernel's exit of its first thread must not end it in the tree (the path every
/// kernel without `group_dead` takes reads `signal->live`), its last thread's must.
#[test]
fn a_process_whose_main_thread_exits_first_leaves_the_tree_only_with_its_last_thread() -> Result<()>
{
    let daemon = Daemon::start()?;
    let mut work = Workload::python(LEADER_EXITS_FIRST, &[])?;
    daemon.register(work.pid(), "leader-first")?;
    assert_eq!(work.read_line()?, "up");
    await_state("the main thread to exit, the others running", || {
        Ok(
            (watchdog_tests::state_of(work.pid()) == Some('Z') && thread_count(work.pid()) >= 4)
                .then_some(()),
        )
    })?;
    // A fork after the leader's exit: once the tree shows the child, the daemon has read
    // every event before it, the leader's exit included.
    work.send("fork")?;
    let child: u32 = work.read_line()?.parse()?;
    let roots = await_state("the child forked after the leader's exit", || {
        let roots = daemon.tree(Some("leader-first"))?;
        Ok(all_nodes(&roots)
            .iter()
            .any(|n| n.pid == child)
            .then_some(roots))
    })?;
    let root = roots_of(&roots);
    assert_eq!(root.len(), 1, "one root: {roots:#?}");
    assert_eq!(
        root[0].pid,
        work.pid(),
        "the process is still in the tree: {roots:#?}"
    );
    assert_eq!(
        daemon.status()?.exits_seen,
        0,
        "no thread's exit is a process' exit"
    );

    work.send("exit")?;
    assert!(work.wait()?.success());
    await_state("the process and its child to leave the tree", || {
        Ok(daemon.tree(None)?.is_empty().then_some(()))
    })?;
    assert_eq!(
        daemon.status()?.exits_seen,
        2,
        "the child and the process, once each"
    );
    Ok(())
}

/// SIGTERMs a process when dropped.
struct StopOnDrop(u32);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0 as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}

/// The daemon in a PID namespace of its own (a container without hostPID): the
/// programs number processes as the daemon sees them, and a timeout kills a tree
/// started inside it.
#[test]
fn a_daemon_in_its_own_pid_namespace_kills_a_timed_out_tree_started_there() -> Result<()> {
    let daemon = Daemon::builder()
        .wrapper(&["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"])
        .start()?;
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", daemon.pid()))?;
    let inner: u32 = children.split_whitespace().next().unwrap_or("0").parse()?;
    // unshare ignores SIGTERM while it waits for its child: the daemon itself is
    // stopped (before the harness reaps unshare), pass or fail.
    let _stop_inner = StopOnDrop(inner);
    let socket = daemon.socket.display().to_string();
    let bin = watchdog_tests::watchdog_bin().display().to_string();
    let out = std::process::Command::new("nsenter")
        .args([
            "--target",
            &inner.to_string(),
            "--pid",
            "--mount",
            "--",
            &bin,
        ])
        .args([
            "exec",
            "--socket",
            &socket,
            "--analysis-id",
            "in-ns",
            "--timeout",
            "2s",
        ])
        .args(["--", "sh", "-c", "sleep 60 & sleep 60"])
        .output()?;
    assert_eq!(
        out.status.code(),
        Some(143),
        "the shell SIGTERMed at its deadline: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records = await_state("the three timeout records", || {
        let records = daemon.events_of("in-ns")?;
        Ok((records.len() == 3).then_some(records))
    })?;
    for record in &records {
        assert_eq!(record.record.reason, watchdog_tests::Reason::Timeout);
        assert!(
            record.record.pid < 1000,
            "pids as the daemon's namespace numbers them: {records:?}"
        );
    }
    let status = daemon.status()?;
    assert_eq!(status.monitored_count, 0, "all three gone");
    Ok(())
}

#[test]
fn a_chain_past_every_nesting_limit_is_watched_whole_dumped_and_killed_on_its_timeout() -> Result<()>
{
    // Past the old walk's 64 levels and serde_json's nesting limit of 128; a chain grows
    // at tens of forks a second on a nested VM, so 10,000 is the unit test's.
    const DEPTH: u32 = 300;
    let daemon = Daemon::start()?;
    let mut chain = Workload::spawn(env!("CARGO_BIN_EXE_chain"), &[&DEPTH.to_string()])?;
    let (mut root, mut deepest) = (0u32, 0u32);
    while root == 0 || deepest == 0 {
        let line = chain.read_line()?;
        match line.split_once(' ') {
            Some(("root", pid)) => root = pid.parse()?,
            Some(("ready", pid)) => deepest = pid.parse()?,
            _ => bail!("chain said {line:?}"),
        }
    }
    // Registered once the chain stands: the walk alone must find all of it.
    daemon.register_with(
        root,
        "deep",
        &["--timeout", "4s", "--max-processes", "20000"],
    )?;

    let processes = daemon.tree(Some("deep"))?;
    assert_eq!(processes.len(), DEPTH as usize + 1);
    let last = processes.last().unwrap();
    assert_eq!((last.pid, last.depth), (deepest, DEPTH));
    assert!(
        processes
            .windows(2)
            .all(|w| w[1].ppid == w[0].pid && w[1].depth == w[0].depth + 1),
        "one chain, parents first"
    );
    let text = daemon.cli_ok(&["dump-tree", "--analysis-id", "deep"])?;
    assert!(
        text.contains(&format!("[depth {DEPTH}] {deepest} chain")),
        "deepest line"
    );
    let indent = |l: &str| l.len() - l.trim_start().len();
    assert_eq!(
        text.lines().map(indent).max(),
        Some(32 * 2),
        "indentation stops growing at 32 levels"
    );
    // The Python client reads it too.
    let client = concat!(env!("CARGO_MANIFEST_DIR"), "/../clients/python/src");
    let python = std::process::Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); \
            from procwatchdog.client import Client; \
            t = Client(sys.argv[2]).tree('deep')['processes']; \
            print(len(t), max(n['depth'] for n in t))",
        ])
        .arg(client)
        .arg(&daemon.socket)
        .output()?;
    assert_eq!(
        String::from_utf8_lossy(&python.stdout).trim(),
        format!("{} {DEPTH}", DEPTH + 1),
        "{}",
        String::from_utf8_lossy(&python.stderr)
    );

    // The chain's own reaper ends once no member is left.
    chain.wait()?;
    let status = await_state("every member's kill record", || {
        let s = daemon.status()?;
        Ok((s.kills_by_reason.get("timeout") == Some(&(DEPTH as u64 + 1))).then_some(s))
    })?;
    assert_eq!(status.monitored_count, 0);
    Ok(())
}
