//! Memory outside RSS: a memfd and files in /dev/shm count toward the limits (read at
//! the reconcile poll), and a killed analysis' record lists the files it left in
//! /dev/shm, which `--remove-shm` removes.

use std::os::unix::process::ExitStatusExt as _;

use anyhow::Result;
use watchdog_tests::{Daemon, Reason, Workload, alive_in_group, await_state};

const MIB: u64 = 1 << 20;

/// Writes argv[1] MiB into a memfd with write(2), never mapping it: its RSS stays
/// Python's own. Prints "written" when done.
const MEMFD_HOG: &str = r#"
import os, sys
sys.stdin.readline()
fd = os.memfd_create("hog")
chunk = b"\x01" * (1 << 20)
for _ in range(int(sys.argv[1])):
    os.write(fd, chunk)
print("written", flush=True)
sys.stdin.readline()
"#;

#[test]
fn a_memfd_hog_is_killed_at_its_process_limit_and_its_record_says_what_was_outside_rss()
-> Result<()> {
    let daemon = Daemon::builder().arg("--poll-interval", "1s").start()?;
    let mut hog = Workload::python(MEMFD_HOG, &["400"])?;
    daemon.register_with(hog.pid(), "memfd", &["--memory", "100MiB", "--grace", "1s"])?;
    hog.send("go")?;
    assert_eq!(hog.read_line()?, "written");
    let record = daemon.await_record_for(hog.pid())?.record;
    assert_eq!(record.reason, Reason::Memory, "{record:?}");
    let outside = record.shmem_bytes.unwrap_or(0);
    assert!(outside >= 400 * MIB, "the memfd counted: {outside}");
    assert!(
        record.rss_bytes < 100 * MIB,
        "killed for what no RSS shows: {record:?}"
    );
    assert!(record.shm_left.is_empty(), "a memfd goes with its holder");
    let status = hog.wait()?;
    assert_eq!(
        status.signal(),
        Some(15),
        "ended by its SIGTERM: {status:?}"
    );
    eprintln!(
        "memfd hog: RSS {} MiB, memfd {} MiB, limit 100 MiB: killed ({:?})",
        record.rss_bytes / MIB,
        outside / MIB,
        record.outcome
    );
    Ok(())
}

/// As joblib's memmapping does: the parent writes argv[2] files of argv[3] MiB each
/// under the prefix argv[1] (in /dev/shm) and closes them; two workers map them all,
/// read-only and untouched. Prints "ready" once both workers hold their mappings.
const SHM_POOL: &str = r#"
import mmap, os, sys, time
sys.stdin.readline()
paths = [f"{sys.argv[1]}-{i}" for i in range(int(sys.argv[2]))]
chunk = b"\x01" * (1 << 20)
for path in paths:
    with open(path, "wb") as f:
        for _ in range(int(sys.argv[3])):
            f.write(chunk)
r, w = os.pipe()
for _ in range(2):
    if os.fork() == 0:
        maps = []
        for path in paths:
            with open(path, "rb") as f:
                maps.append(mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ))
        os.write(w, b".")
        time.sleep(600)
        os._exit(0)
os.read(r, 1); os.read(r, 1)
print("ready", flush=True)
time.sleep(600)
"#;

/// The files a pool made in /dev/shm, removed at the end of the test whatever
/// happened.
struct ShmFiles(Vec<String>);

impl Drop for ShmFiles {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A pool holding two 150 MiB files in /dev/shm under a 200 MiB tree limit, killed:
/// its records, and the files it made.
fn shm_pool_killed(
    daemon: &Daemon,
    id: &str,
) -> Result<(Vec<watchdog_tests::EventRecord>, ShmFiles)> {
    let prefix = format!("/dev/shm/watchdog-e2e-{id}-{}", std::process::id());
    let files = ShmFiles((0..2).map(|i| format!("{prefix}-{i}")).collect());
    let mut pool = Workload::python(SHM_POOL, &[&prefix, "2", "150"])?;
    daemon.register_with(
        pool.pid(),
        id,
        &[
            "--tree-memory",
            "200MiB",
            "--memory",
            "1GiB",
            "--grace",
            "1s",
        ],
    )?;
    pool.send("go")?;
    assert_eq!(pool.read_line()?, "ready");
    let records = await_state("the pool killed and recorded", || {
        let records = daemon.events_of(id)?;
        Ok((records.len() == 3).then_some(records))
    })?;
    await_state("nothing of the pool left", || {
        Ok(alive_in_group(pool.pid()).is_empty().then_some(()))
    })?;
    assert!(
        records
            .iter()
            .all(|r| r.record.reason == Reason::TreeMemory),
        "{records:?}"
    );
    let outside = records[0].record.shmem_bytes.unwrap_or(0);
    assert!(outside >= 300 * MIB, "both files counted, once: {outside}");
    let root = records
        .iter()
        .find(|r| r.record.pid == pool.pid())
        .expect("the root's record");
    let mut left: Vec<(String, u64)> = root
        .record
        .shm_left
        .iter()
        .map(|l| (l.path.clone(), l.bytes))
        .collect();
    left.sort();
    let expected: Vec<(String, u64)> = files.0.iter().map(|p| (p.clone(), 150 * MIB)).collect();
    assert_eq!(left, expected, "the root's record lists what the pool left");
    eprintln!(
        "/dev/shm pool: {} MiB outside RSS, tree PSS {} MiB, limit 200 MiB: killed; left {left:?}",
        outside / MIB,
        records[0].record.tree_pss_bytes.unwrap_or(0) / MIB
    );
    Ok((records, files))
}

#[test]
fn a_dev_shm_pool_is_killed_at_its_tree_limit_and_its_record_lists_the_files_it_left() -> Result<()>
{
    let daemon = Daemon::builder().arg("--poll-interval", "1s").start()?;
    let (_, files) = shm_pool_killed(&daemon, "shm-kept")?;
    for path in &files.0 {
        let bytes = std::fs::metadata(path)?.len();
        assert_eq!(
            bytes,
            150 * MIB,
            "{path} is left in place without --remove-shm"
        );
    }
    Ok(())
}

#[test]
fn with_remove_shm_what_a_killed_pool_left_in_dev_shm_is_removed() -> Result<()> {
    let daemon = Daemon::builder()
        .arg("--poll-interval", "1s")
        .flag("--remove-shm")
        .start()?;
    let (_, files) = shm_pool_killed(&daemon, "shm-removed")?;
    await_state("the files removed", || {
        Ok(files
            .0
            .iter()
            .all(|p| !std::path::Path::new(p).exists())
            .then_some(()))
    })?;
    Ok(())
}
