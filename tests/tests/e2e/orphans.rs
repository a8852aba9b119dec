//! Orphans are processes reparented outside their analysis: a grandchild adopted by a
//! subreaper the analysis runs itself is not one.

use anyhow::Result;
use watchdog_tests::{Daemon, Reason, Workload, alive, all_nodes, await_state};

/// Becomes a subreaper when argv[1] is "subreaper"; once told, forks a child that forks
/// a grandchild, prints the grandchild's pid and exits; reaps the child and sleeps.
const PARENT_OF_A_SHORT_LIVED_CHILD: &str = r#"
import ctypes, os, sys, time
if sys.argv[1] == "subreaper":
    PR_SET_CHILD_SUBREAPER = 36
    assert ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
sys.stdin.readline()
if os.fork() == 0:
    grandchild = os.fork()
    if grandchild == 0:
        time.sleep(600)
        os._exit(0)
    os.write(1, f"{grandchild}\n".encode())
    os._exit(0)
os.wait()
time.sleep(600)
"#;

fn start(daemon: &Daemon, mode: &str) -> Result<(Workload, u32)> {
    let mut work = Workload::python(PARENT_OF_A_SHORT_LIVED_CHILD, &[mode])?;
    daemon.register_with(work.pid(), mode, &["--grace", "1s"])?;
    work.send("go")?;
    let grandchild = work.read_line()?.parse()?;
    Ok((work, grandchild))
}

#[test]
fn a_grandchild_adopted_by_the_analysis_subreaper_lives_on_and_one_reparented_to_init_is_killed()
-> Result<()> {
    let daemon = Daemon::start()?;
    let (reaper, adopted) = start(&daemon, "subreaper")?;
    await_state("the grandchild under the subreaper in the tree", || {
        let tree = daemon.tree(Some("subreaper"))?;
        let node = all_nodes(&tree)
            .into_iter()
            .find(|n| n.pid == adopted)
            .cloned();
        Ok(node.filter(|n| n.ppid == reaper.pid() && !n.orphan))
    })?;
    let (_plain, orphan) = start(&daemon, "plain")?;
    let record = await_state("the orphan's kill record", || {
        let records = daemon.events()?;
        Ok(records.into_iter().find(|r| r.record.pid == orphan))
    })?;
    assert_eq!(record.record.reason, Reason::Orphan);
    await_state("the orphan gone", || Ok((!alive(orphan)).then_some(())))?;
    assert!(alive(adopted), "the adopted grandchild was never signalled");
    let records = daemon.events()?;
    assert!(
        records.iter().all(|r| r.record.analysis_id != "subreaper"),
        "no record for the subreaper's analysis: {records:?}"
    );
    Ok(())
}

/// A launcher (Python) starts a root that shares its stdin; once told, the root makes
/// a child with `clone(CLONE_PARENT)`, which has the launcher as its parent, and prints
/// its pid.
const LAUNCHER_OF_A_CLONE_PARENT_ROOT: &str = r#"
import subprocess, sys
ROOT = '''
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
sys.stdin.readline()
SYS_clone, CLONE_PARENT, SIGCHLD = 56, 0x8000, 17
zero = ctypes.c_long(0)
pid = libc.syscall(ctypes.c_long(SYS_clone), ctypes.c_long(CLONE_PARENT | SIGCHLD), zero, zero, zero, zero)
if pid == 0:
    os.execvp("sleep", ["sleep", "600"])
assert pid > 0, ctypes.get_errno()
print(pid, flush=True)
time.sleep(600)
'''
root = subprocess.Popen([sys.executable, "-c", ROOT])
print(root.pid, flush=True)
root.wait()
"#;

/// A child a registered root makes with `CLONE_PARENT` is the launcher's child, not
/// the root's: when the launcher dies, it is orphaned by the same exit and killed with
/// the root.
#[test]
fn a_clone_parent_sibling_of_a_root_is_killed_with_it_when_their_launcher_dies() -> Result<()> {
    let daemon = Daemon::start()?;
    let mut launcher = Workload::python(LAUNCHER_OF_A_CLONE_PARENT_ROOT, &[])?;
    let root: u32 = launcher.read_line()?.parse()?;
    daemon.register(root, "clone-parent")?;
    launcher.send("clone")?;
    let sibling: u32 = launcher.read_line()?.parse()?;
    assert_eq!(
        watchdog_tests::ppid_of(sibling),
        Some(launcher.pid()),
        "the launcher is its parent"
    );
    await_state("the sibling in the analysis", || {
        let tree = daemon.tree(Some("clone-parent"))?;
        Ok(all_nodes(&tree)
            .iter()
            .any(|n| n.pid == sibling)
            .then_some(()))
    })?;
    launcher.signal(nix::sys::signal::Signal::SIGKILL)?;
    let records = daemon.await_records_for(&[root, sibling])?;
    let mut named: Vec<u32> = records.iter().map(|r| r.record.pid).collect();
    named.sort();
    let mut expected = vec![root, sibling];
    expected.sort();
    assert_eq!(named, expected, "{records:?}");
    assert!(records.iter().all(|r| r.record.reason == Reason::Orphan));
    await_state("the root and its sibling gone", || {
        Ok((!alive(root) && !alive(sibling)).then_some(()))
    })?;
    Ok(())
}
