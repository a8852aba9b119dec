//! Failing closed (issue 10): a spool left torn by a crash, cut inside a multi-byte
//! character, or refused by a full disk loses no record and duplicates none; a store
//! task that dies stops the daemon with one line, and its restart loses no record.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;
use watchdog_tests::{Daemon, Workload, await_state, spooled_events, sqlite_query};

/// A SQLite database the test can make unreachable: a file sits where its directory
/// must be, so the daemon can neither create nor open it (and spools) until the test
/// removes that file.
struct Sqlite {
    root: PathBuf,
}

impl Sqlite {
    fn blocked() -> Result<Self> {
        let root = watchdog_tests::scratch_dir("failclosed")?;
        std::fs::write(root.join("db"), "not a directory")?;
        Ok(Self { root })
    }

    fn url(&self) -> String {
        format!("sqlite://{}/db/watchdog.db", self.root.display())
    }

    fn unblock(&self) -> Result<()> {
        Ok(std::fs::remove_file(self.root.join("db"))?)
    }

    fn query(&self, sql: &str) -> Result<String> {
        sqlite_query(&self.root.join("db/watchdog.db"), sql)
    }
}

impl Drop for Sqlite {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn spool_path(daemon: &Daemon) -> PathBuf {
    daemon.state_dir().join("spool.jsonl")
}

/// The spool's single line, as a record of another analysis with its own id: what the
/// next append would have written.
fn another_record(spool: &Path, analysis: &str) -> Result<Vec<u8>> {
    let text = std::fs::read(spool)?;
    let line = text
        .split(|&b| b == b'\n')
        .next()
        .context("an empty spool")?;
    let mut record: Value = serde_json::from_slice(line)?;
    record["event_uid"] = "00000000-0000-4000-8000-000000000000".into();
    record["analysis_id"] = analysis.into();
    let mut bytes = serde_json::to_vec(&record)?;
    bytes.push(b'\n');
    Ok(bytes)
}

fn append(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = std::fs::OpenOptions::new().append(true).open(path)?;
    file.write_all(bytes)?;
    Ok(())
}

/// (analysis, pid) of every row, oldest first.
fn rows(db: &Sqlite) -> Result<String> {
    db.query("select analysis_id, pid from watchdog_events order by id")
}

/// The replay after the database is back: every record once, and nothing left.
fn await_replayed(daemon: &Daemon) -> Result<()> {
    await_state("the spool replayed", || {
        let status = daemon.status()?;
        Ok((status.db == "ok" && status.database.spool_depth == 0).then_some(()))
    })
}

#[test]
fn a_torn_last_spool_line_is_cut_and_every_later_record_reaches_the_database_once() -> Result<()> {
    let db = Sqlite::blocked()?;
    let mut daemon = Daemon::builder().database_url(db.url()).start()?;
    let first = daemon.timeout_kill(&["sleep", "600"], "before-crash")?;
    daemon.await_spool(1)?;
    daemon.crash()?;
    // A crash in the middle of the next append: half of a record after the whole one.
    let spool = spool_path(&daemon);
    let next = another_record(&spool, "torn")?;
    let torn = &next[..next.len() / 2];
    append(&spool, torn)?;

    daemon.start_again()?;
    let log = daemon.log();
    let cut = format!("cut {} bytes of a torn last record", torn.len());
    assert_eq!(log.matches(&cut).count(), 1, "{log}");
    assert_eq!(daemon.status()?.database.spool_depth, 1);
    let second = daemon.timeout_kill(&["sleep", "600"], "after-1")?;
    let third = daemon.timeout_kill(&["sleep", "600"], "after-2")?;
    daemon.await_spool(3)?;
    let lines = std::fs::read(&spool)?;
    for line in lines.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        serde_json::from_slice::<Value>(line).context("every spooled line parses")?;
    }

    db.unblock()?;
    await_replayed(&daemon)?;
    assert_eq!(
        rows(&db)?,
        format!("before-crash|{first}\nafter-1|{second}\nafter-2|{third}"),
        "in order, once each"
    );
    assert_eq!(
        db.query("select count(distinct event_uid) from watchdog_events")?,
        "3"
    );
    assert!(!PathBuf::from(format!("{}.corrupt", spool.display())).exists());
    eprintln!("{cut}; rows: 3 of 3, once each");
    Ok(())
}

#[test]
fn a_spool_cut_inside_a_multibyte_character_does_not_stop_the_daemon() -> Result<()> {
    // A program whose name (comm and cmdline) is not ASCII: sleep, under another name.
    let db = Sqlite::blocked()?;
    let sleeper = db.root.join("睡眠");
    let sleep = Command::new("sh")
        .args(["-c", "command -v sleep"])
        .output()?;
    std::os::unix::fs::symlink(String::from_utf8(sleep.stdout)?.trim(), &sleeper)?;
    let sleeper = sleeper.to_str().context("a UTF-8 path")?;

    let mut daemon = Daemon::builder().database_url(db.url()).start()?;
    let first = daemon.timeout_kill(&[sleeper, "600"], "before-crash")?;
    daemon.await_spool(1)?;
    daemon.crash()?;
    let spool = spool_path(&daemon);
    let next = another_record(&spool, "torn")?;
    // Cut after the first of the three bytes of '睡'.
    let at = next
        .windows(3)
        .position(|w| w == "睡".as_bytes())
        .context("the record names the program")?
        + 1;
    assert!(
        std::str::from_utf8(&next[..at]).is_err(),
        "cut mid-character"
    );
    append(&spool, &next[..at])?;

    daemon.start_again()?;
    let log = daemon.log();
    assert!(
        log.contains(&format!("cut {at} bytes of a torn last record")),
        "{log}"
    );
    let second = daemon.timeout_kill(&[sleeper, "600"], "after-1")?;
    let third = daemon.timeout_kill(&[sleeper, "600"], "after-2")?;
    daemon.await_spool(3)?;
    // Requests that read the spool and the database are answered (the records wait in
    // the spool, marked so, and a warning says why only they are shown); the daemon
    // lives on.
    let spooled = spooled_events(&daemon)?;
    assert_eq!(spooled.len(), 3, "{spooled:?}");
    assert!(daemon.alive());

    db.unblock()?;
    await_replayed(&daemon)?;
    assert_eq!(
        rows(&db)?,
        format!("before-crash|{first}\nafter-1|{second}\nafter-2|{third}")
    );
    assert_eq!(
        db.query("select distinct comm from watchdog_events")?,
        "睡眠"
    );
    let events = daemon.events()?;
    assert_eq!(events.len(), 3);
    assert!(
        events
            .iter()
            .all(|e| e.record.cmdline.as_str().contains("睡眠"))
    );
    assert!(daemon.alive(), "the daemon never exited");
    eprintln!("cut {at} bytes inside '睡'; rows: 3 of 3, once each");
    Ok(())
}

/// Starts `$1` children that sleep, prints their pids, waits.
const FAMILY: &str = r#"pids=""; i=0
while [ "$i" -lt "$1" ]; do sleep 600 & pids="$pids $!"; i=$((i + 1)); done
echo $pids; wait"#;

/// A family of `children` + 1 processes, registered with a 1 s timeout: all their pids.
fn doomed_family(daemon: &Daemon, children: usize, id: &str) -> Result<(Workload, Vec<u32>)> {
    let mut family = Workload::spawn("sh", &["-c", FAMILY, "family", &children.to_string()])?;
    let mut pids: Vec<u32> = family
        .read_line()?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    pids.push(family.pid());
    daemon.register_with(family.pid(), id, &["--timeout", "1s"])?;
    Ok((family, pids))
}

#[test]
fn a_store_task_that_dies_stops_the_daemon_with_one_line_and_the_restart_loses_no_record()
-> Result<()> {
    let mut daemon = Daemon::builder().flag("--test-faults").start()?;
    let db = daemon.state_dir().join("watchdog.db");
    await_state("the database connected", || {
        Ok((daemon.status()?.db == "ok").then_some(()))
    })?;
    let armed = daemon.request(r#"{"op":"fault","what":"store_panic"}"#)?;
    assert_eq!(armed["ok"]["kind"], "fault_armed", "{armed}");

    let (mut family, mut pids) = doomed_family(&daemon, 3, "family")?;
    let status = daemon.await_exit()?;
    family.wait()?;
    assert_eq!(
        status.code(),
        Some(1),
        "exits non-zero for systemd to restart it"
    );
    let log = daemon.log();
    let reasons: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(reasons.len(), 1, "one error line, naming the task:\n{log}");
    assert!(
        reasons[0].contains("the database writer task panicked at ")
            && reasons[0].contains("test fault: told to fail at its next write"),
        "{}",
        reasons[0]
    );
    assert!(
        !log.contains("watchdog-user: error") && !log.contains("thread '"),
        "no second report of it:\n{log}"
    );

    daemon.start_again()?;
    let mut rows = String::new();
    await_state("every kill in the database", || {
        rows = sqlite_query(&db, "select pid from watchdog_events order by pid")?;
        Ok((rows.lines().count() >= pids.len()).then_some(()))
    })?;
    pids.sort();
    let expected: Vec<String> = pids.iter().map(u32::to_string).collect();
    assert_eq!(
        rows,
        expected.join("\n"),
        "every killed process exactly once"
    );
    assert_eq!(daemon.status()?.database.spool_depth, 0);
    eprintln!(
        "{}; {} of {} rows after the restart",
        reasons[0],
        pids.len(),
        pids.len()
    );
    Ok(())
}

#[test]
fn the_store_fault_is_refused_without_test_faults() -> Result<()> {
    let daemon = Daemon::start()?;
    let refused = daemon.request(r#"{"op":"fault","what":"store_panic"}"#)?;
    let error = refused["error"].as_str().context("an error")?;
    assert_eq!(error.lines().count(), 1, "{error}");
    assert!(error.contains("--test-faults"), "{error}");
    Ok(())
}

#[test]
fn a_thousand_processes_killed_together_are_spooled_with_one_fsync_not_one_each() -> Result<()> {
    let db = Sqlite::blocked()?;
    let daemon = Daemon::builder().database_url(db.url()).start()?;
    let before = daemon.status()?.database;
    let (mut family, pids) = doomed_family(&daemon, 999, "crowd")?;
    family.wait()?;
    let status = daemon.await_spool(pids.len())?;
    let (records, fsyncs) = (
        status.database.spooled_total - before.spooled_total,
        status.database.spool_fsyncs - before.spool_fsyncs,
    );
    assert_eq!(records, pids.len() as u64);
    // Their records come from the loop as one message (the kill ends in one pass).
    assert!(fsyncs <= 2, "{fsyncs} fsyncs for {records} records");
    db.unblock()?;
    await_replayed(&daemon)?;
    assert_eq!(
        db.query("select count(*), count(distinct pid) from watchdog_events")?,
        format!("{0}|{0}", pids.len())
    );
    eprintln!("{records} records spooled with {fsyncs} fsyncs");
    Ok(())
}

/// A tmpfs of `size` mounted by the test (root), unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: PathBuf, size: &str) -> Result<Self> {
        std::fs::create_dir_all(&at)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .output()?;
        if !out.status.success() {
            bail!("mount tmpfs: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Self(at))
    }

    /// Fills it: a file grown until the disk is full.
    fn fill(&self) -> Result<()> {
        let mut filler = std::fs::File::create(self.0.join("filler"))?;
        let block = vec![b'x'; 4096];
        loop {
            if let Err(err) = filler.write_all(&block) {
                assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
                return Ok(());
            }
        }
    }

    fn free(&self) -> Result<()> {
        Ok(std::fs::remove_file(self.0.join("filler"))?)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: the daemon, stopped after this, still has the spool open.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_full_disk_leaves_no_partial_spool_line_and_holds_the_records_until_it_has_room() -> Result<()>
{
    let db = Sqlite::blocked()?;
    let mut daemon = Daemon::builder().database_url(db.url()).start()?;
    // The spool on a disk of its own: 64 KiB of tmpfs, through a link in the state dir.
    daemon.crash()?;
    let disk = Tmpfs::mount(db.root.join("disk"), "64k")?;
    let spool = spool_path(&daemon);
    std::fs::remove_file(&spool)?;
    std::os::unix::fs::symlink(disk.0.join("spool.jsonl"), &spool)?;
    daemon.start_again()?;
    let first = daemon.timeout_kill(&["sleep", "600"], "room")?;
    daemon.await_spool(1)?;
    let whole = std::fs::read(&spool)?;

    disk.fill()?;
    // A record longer than what is left of the spool's page: the write stops partway.
    let long = "x".repeat(6000);
    let python = watchdog_tests::python();
    let script = "import time; time.sleep(600)";
    let second = daemon.timeout_kill(&[python, "-c", script, &long], "no-room-1")?;
    let status = await_state("the record held", || {
        let status = daemon.status()?;
        Ok((status.database.unspooled == 1).then_some(status))
    })?;
    assert!(
        status
            .database
            .spool_error
            .as_deref()
            .is_some_and(|e| e.contains("No space left")),
        "{:?}",
        status.database
    );
    assert_eq!(std::fs::read(&spool)?, whole, "cut back: no partial line");
    let third = daemon.timeout_kill(&["sleep", "600"], "no-room-2")?;
    await_state("both records held", || {
        Ok((daemon.status()?.database.unspooled == 2).then_some(()))
    })?;
    assert_eq!(std::fs::read(&spool)?, whole, "still no partial line");

    disk.free()?;
    let status = await_state("the held records spooled", || {
        let status = daemon.status()?;
        Ok((status.database.unspooled == 0).then_some(status))
    })?;
    assert_eq!(status.database.spool_depth, 3);
    assert_eq!(status.database.spool_error, None);
    let log = daemon.log();
    assert_eq!(
        log.lines().filter(|l| l.contains("No space left")).count(),
        2,
        "one error line while it failed, one line when it worked again:\n{log}"
    );
    db.unblock()?;
    await_replayed(&daemon)?;
    assert_eq!(
        rows(&db)?,
        format!("room|{first}\nno-room-1|{second}\nno-room-2|{third}")
    );
    Ok(())
}

#[test]
fn a_record_the_database_refuses_for_good_is_set_aside_and_blocks_none_behind_it() -> Result<()> {
    let pg = watchdog_tests::pg::TestPostgres::start()?;
    let daemon = Daemon::builder().database_url(pg.url()).start()?;
    await_state("the database connected", || {
        Ok((daemon.status()?.database.state == "ok").then_some(()))
    })?;
    // An operator's rule the record breaks: no retry can ever insert it.
    pg.query(
        "ALTER TABLE watchdog_events ADD CONSTRAINT no_poison CHECK (analysis_id <> 'poison')",
    )?;
    let poisoned = daemon.timeout_kill(&["sleep", "600"], "poison")?;
    let fine = daemon.timeout_kill(&["sleep", "600"], "fine")?;
    let status = await_state("the spool drained past the refused record", || {
        let status = daemon.status()?;
        let drained = status.database.spool_depth == 0 && status.database.rejected == 1;
        Ok(drained.then_some(status))
    })?;
    assert_eq!(status.database.state, "ok");
    let rows = pg.query("SELECT pid, analysis_id FROM watchdog_events ORDER BY id")?;
    assert_eq!(
        rows,
        format!("{fine}|fine"),
        "the record behind it is in, once"
    );
    let rejected = std::fs::read_to_string(daemon.state_dir().join("spool.jsonl.rejected"))?;
    let kept: Value = serde_json::from_str(rejected.trim())?;
    assert_eq!(
        (kept["pid"].as_u64(), kept["analysis_id"].as_str()),
        (Some(u64::from(poisoned)), Some("poison"))
    );
    let log = daemon.log();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("refused the kill record"))
            .count(),
        1,
        "said once: {log}"
    );
    Ok(())
}
