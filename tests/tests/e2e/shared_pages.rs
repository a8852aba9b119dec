//! The tree limit counts a shared page once (PSS): a forked pool sharing its parent's
//! data lives under a limit its summed RSS crosses; workers that write their own copies
//! are killed.

use anyhow::Result;
use watchdog_tests::{Daemon, Reason, Workload, alive_in_group, await_state};

/// A parent touches 200 MiB, forks 3 workers that share it; with argv[1] == "write"
/// each worker then writes to every page (its own copy). Prints "ready" when the
/// workers are done.
const POOL: &str = r#"
import os, sys, time
SIZE = 200 << 20
data = bytearray(SIZE)
data[::4096] = b"\x01" * (SIZE // 4096)
sys.stdin.readline()
r, w = os.pipe()
for _ in range(3):
    if os.fork() == 0:
        if sys.argv[1] == "write":
            data[::4096] = b"\x02" * (SIZE // 4096)
        os.write(w, b".")
        time.sleep(600)
        os._exit(0)
os.read(r, 1); os.read(r, 1); os.read(r, 1)
print("ready", flush=True)
time.sleep(600)
"#;

fn pool(daemon: &Daemon, mode: &str) -> Result<Workload> {
    let mut work = Workload::python(POOL, &[mode])?;
    daemon.register_with(
        work.pid(),
        mode,
        &["--tree-memory", "500MiB", "--grace", "1s"],
    )?;
    work.send("go")?;
    Ok(work)
}

#[test]
fn a_pool_sharing_its_parents_data_lives_under_a_tree_limit_its_summed_rss_crosses() -> Result<()> {
    // Writes to shared pages change no RSS counter: the poll is what sees them.
    let daemon = Daemon::builder().arg("--poll-interval", "1s").start()?;
    let mut shared = pool(&daemon, "share")?;
    assert_eq!(shared.read_line()?, "ready");
    let rss_sum: u64 = await_state("the shared pool's RSS over 500 MiB", || {
        let tree = daemon.tree(Some("share"))?;
        let sum: u64 = watchdog_tests::all_nodes(&tree)
            .iter()
            .map(|n| n.rss_bytes)
            .sum();
        Ok((sum > 500 << 20).then_some(sum))
    })?;
    let writers = pool(&daemon, "write")?;
    let records = await_state("the writing pool killed", || {
        let records: Vec<_> = daemon
            .events()?
            .into_iter()
            .filter(|r| r.record.analysis_id == "write")
            .collect();
        Ok((records.len() == 4).then_some(records))
    })?;
    assert!(
        records
            .iter()
            .all(|r| r.record.reason == Reason::TreeMemory),
        "{records:?}"
    );
    await_state("nothing of the writing pool left", || {
        Ok(alive_in_group(writers.pid()).is_empty().then_some(()))
    })?;
    // The poll that killed the writers measured the sharing pool too.
    assert_eq!(
        alive_in_group(shared.pid()).len(),
        4,
        "the sharing pool lives"
    );
    assert!(
        daemon
            .events()?
            .iter()
            .all(|r| r.record.analysis_id != "share"),
        "no record for the sharing pool"
    );
    eprintln!(
        "sharing pool: RSS sum {} MiB under a 500 MiB tree limit",
        rss_sum >> 20
    );
    Ok(())
}
