//! Memory growth that no process' own report shows: many processes each growing by
//! less than the report step, and memory another process writes into a watched one.
//! Both are killed from the kernel's reports; the poll is set to an hour, so nothing
//! here can be the poll's doing.

use anyhow::Result;
use watchdog_tests::{
    Daemon, GROWERS, Reason, TARGET, WRITER, Workload, all_nodes, await_state, python,
};

#[test]
fn three_hundred_children_growing_by_less_than_a_report_step_pass_the_tree_limit_and_are_killed()
-> Result<()> {
    const LIMIT: u64 = 300 << 20;
    let daemon = Daemon::builder().arg("--poll-interval", "1h").start()?;
    let mut work = Workload::python(GROWERS, &["300", "1536"])?;
    daemon.register_with(
        work.pid(),
        "growers",
        &["--tree-memory", "300MiB", "--grace", "1s"],
    )?;
    let mut pids: Vec<u32> = work
        .read_line()?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    await_state("every child in the tree", || {
        Ok((all_nodes(&daemon.tree(Some("growers"))?).len() == 301).then_some(()))
    })?;
    // 301 processes sharing most of their pages: ~1.7 GiB of RSS summed, ~64 MiB of
    // PSS; alive.
    assert_eq!(
        daemon.status()?.kills_total,
        0,
        "nothing killed before the growth"
    );
    work.send("go")?;
    pids.push(work.pid());
    // Grown, the PSS sum is ~525 MiB, and no process has reported a change.
    let records = daemon.await_records_for(&pids)?;
    assert!(
        records
            .iter()
            .all(|r| r.record.reason == Reason::TreeMemory),
        "{:?}",
        records.iter().map(|r| r.record.reason).collect::<Vec<_>>()
    );
    let pss = records[0].record.tree_pss_bytes.unwrap_or(0);
    assert!(pss > LIMIT, "killed at a PSS sum over the limit: {pss}");
    Ok(())
}

#[test]
fn memory_another_process_writes_into_a_watched_one_counts_against_its_limit() -> Result<()> {
    const LIMIT: u64 = 200 << 20;
    let daemon = Daemon::builder().arg("--poll-interval", "1h").start()?;
    let mut target = Workload::python(TARGET, &["800"])?;
    let line = target.read_line()?;
    let (pid, address) = line.split_once(' ').unwrap_or_default();
    assert_eq!(pid, target.pid().to_string());
    daemon.register_with(target.pid(), "written", &["--memory", "200MiB"])?;
    // The writer is no member of any analysis: only the target's memory grows.
    let out = std::process::Command::new(python())
        .args(["-c", WRITER, pid, address, "800"])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let record = daemon.await_record_for(target.pid())?;
    assert_eq!(record.record.reason, Reason::Memory);
    assert!(
        record.record.rss_bytes > LIMIT,
        "RSS at the kill {} over {LIMIT}",
        record.record.rss_bytes
    );
    await_state("the writer's victim gone", || {
        Ok((!target.alive_now()).then_some(()))
    })?;
    Ok(())
}
