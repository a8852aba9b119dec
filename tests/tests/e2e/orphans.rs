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
