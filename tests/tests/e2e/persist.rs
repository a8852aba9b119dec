//! Persistence, end to end: a real PostgreSQL server started by the test, and SQLite.

use std::process::Command;

use anyhow::Result;
use watchdog_tests::{
    Daemon, EventRecord, GROWER, Outcome, Reason, Workload, await_state, one_line_error,
    pg::TestPostgres, spooled_events, sqlite_query, watchdog_bin,
};

/// The SQL side of a backend under test.
enum Db {
    Postgres(TestPostgres),
    Sqlite(std::path::PathBuf),
}

impl Db {
    fn sqlite() -> Result<Self> {
        let dir = watchdog_tests::scratch_dir("sqlite")?;
        Ok(Self::Sqlite(dir.join("watchdog.db")))
    }

    fn url(&self) -> String {
        match self {
            Self::Postgres(pg) => pg.url(),
            Self::Sqlite(path) => format!("sqlite://{}", path.display()),
        }
    }

    /// One SQL query's rows, as text with `|` between columns.
    fn query(&self, sql: &str) -> Result<String> {
        match self {
            Self::Postgres(pg) => pg.query(sql),
            Self::Sqlite(path) => sqlite_query(path, sql),
        }
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        if let Self::Sqlite(path) = self {
            let _ = std::fs::remove_dir_all(path.parent().unwrap());
        }
    }
}

fn both() -> Result<Vec<(&'static str, Db)>> {
    Ok(vec![
        ("postgres", Db::Postgres(TestPostgres::start()?)),
        ("sqlite", Db::sqlite()?),
    ])
}

fn migrate(url: &str) -> std::process::Output {
    Command::new(watchdog_bin())
        .args(["migrate", "--database-url", url])
        .output()
        .unwrap()
}

#[test]
fn migrations_apply_to_an_empty_database_and_reapply_as_a_no_op() -> Result<()> {
    for (name, db) in both()? {
        for round in 0..2 {
            let out = migrate(&db.url());
            assert!(
                out.status.success(),
                "{name} round {round}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            // Every migration of the dialect, applied once.
            let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations/");
            let files = std::fs::read_dir(format!("{dir}{name}"))?.count();
            assert_eq!(
                db.query("select count(*) from _sqlx_migrations")?,
                files.to_string(),
                "{name}"
            );
        }
        let tables = db.query("select count(*) from watchdog_events")?
            + &db.query("select count(*) from watchdog_processes")?;
        assert_eq!(tables, "00", "{name}: both tables exist, empty");
    }
    Ok(())
}

const PARENT_AND_CHILD: &str = r#"
import os, sys, time
sys.stdin.readline()
if os.fork() == 0:
    time.sleep(600)
    os._exit(0)
os.write(1, b"forked\n")
time.sleep(600)
"#;

fn await_rows(db: &Db, sql: &str, expected: &str) -> Result<()> {
    let mut last = String::new();
    await_state(&format!("{sql} = {expected}"), || {
        // Until the daemon has applied the migrations, the table does not exist.
        last = db.query(sql).unwrap_or_else(|e| format!("{e:#}"));
        Ok((last == expected).then_some(()))
    })
    .map_err(|e| anyhow::anyhow!("{e} (last: {last})"))
}

#[test]
fn a_timeout_a_memory_and_an_orphan_kill_each_make_exactly_one_full_row() -> Result<()> {
    for (name, db) in both()? {
        let daemon = Daemon::builder().database_url(db.url()).start()?;
        let sleeper = Workload::spawn("sleep", &["600"])?;
        daemon.register_with(sleeper.pid(), "timeout", &["--timeout", "1s"])?;
        let mut grower = Workload::python(GROWER, &[])?;
        daemon.register_with(grower.pid(), "memory", &["--memory", "100MiB"])?;
        grower.send("go")?;
        let mut parent = Workload::python(PARENT_AND_CHILD, &[])?;
        daemon.register(parent.pid(), "orphan")?;
        parent.send("go")?;
        assert_eq!(parent.read_line()?, "forked");
        parent.signal(nix::sys::signal::Signal::SIGKILL)?;

        await_rows(&db, "select count(*) from watchdog_events", "3")?;
        let rows = db.query(
            "select reason, analysis_id, pid, ppid, host, time, rss_bytes, runtime_ms, signals, outcome, comm, \
             length(cmdline), uid, coalesce(limit_value, -1) from watchdog_events order by reason",
        )?;
        let rows: Vec<Vec<&str>> = rows.lines().map(|l| l.split('|').collect()).collect();
        let reasons: Vec<(&str, &str)> = rows.iter().map(|r| (r[0], r[1])).collect();
        assert_eq!(
            reasons,
            vec![
                ("memory", "memory"),
                ("orphan", "orphan"),
                ("timeout", "timeout")
            ],
            "{name}"
        );
        for row in &rows {
            assert_eq!(row.len(), 14, "{name}: {row:?}");
            assert!(
                row.iter()
                    .all(|field| !field.is_empty() && *field != "0" || *field == row[12]),
                "{name}: a context field is empty: {row:?}"
            );
            assert!(row[8].contains("SIGTERM"), "{name}: {row:?}");
        }
        assert_eq!(
            rows[0][13],
            (100u64 << 20).to_string(),
            "{name}: memory limit"
        );
        assert_eq!(rows[1][13], "-1", "{name}: an orphan crosses no limit");
        assert_eq!(rows[2][13], "1000", "{name}: timeout limit in ms");
        assert!(
            rows[0][6].parse::<u64>()? > 100 << 20,
            "{name}: RSS at kill recorded"
        );
    }
    Ok(())
}

#[test]
fn watchdog_processes_follows_register_unregister_and_exit() -> Result<()> {
    for (name, db) in both()? {
        let daemon = Daemon::builder().database_url(db.url()).start()?;
        let mut parent = Workload::python(PARENT_AND_CHILD, &[])?;
        daemon.register_with(parent.pid(), "family", &["--timeout", "1h"])?;
        parent.send("go")?;
        assert_eq!(parent.read_line()?, "forked");
        await_rows(
            &db,
            "select count(*) from watchdog_processes where analysis_id = 'family' and state = 'running'",
            "2",
        )?;
        let limits = db.query(&format!(
            "select timeout_ms, memory_bytes, orphans from watchdog_processes where pid = {}",
            parent.pid()
        ))?;
        assert_eq!(limits, format!("3600000|{}|kill", 2u64 << 30), "{name}");

        daemon.cli_ok(&["unregister", "--analysis-id", "family"])?;
        await_rows(&db, "select count(*) from watchdog_processes", "0")?;

        let mut short = Workload::spawn("sleep", &["600"])?;
        daemon.register(short.pid(), "short")?;
        await_rows(
            &db,
            &format!(
                "select count(*) from watchdog_processes where pid = {}",
                short.pid()
            ),
            "1",
        )?;
        short.kill()?;
        await_rows(&db, "select count(*) from watchdog_processes", "0")?;
    }
    Ok(())
}

#[test]
fn an_outage_with_a_restart_in_it_loses_nothing_and_duplicates_nothing() -> Result<()> {
    let pg = TestPostgres::start()?;
    let db = Db::Postgres(pg);
    let mut daemon = Daemon::builder().database_url(db.url()).start()?;
    await_state("the database connected", || {
        Ok((daemon.status()?.db == "ok").then_some(()))
    })?;
    let Db::Postgres(pg) = &db else {
        unreachable!()
    };
    pg.stop()?;

    let first = daemon.timeout_kill(&["sleep", "600"], "outage-1")?;
    let second = daemon.timeout_kill(&["sleep", "600"], "outage-2")?;
    daemon.await_spool(2)?;
    // Said once a write has found the database unreachable (records can be spooled a
    // moment before that).
    await_state("status saying spooling", || {
        let status = daemon.status()?;
        Ok((status.db == "spooling").then_some(()))
    })?;
    daemon.restart()?;
    assert_eq!(
        daemon.status()?.database.spool_depth,
        2,
        "the spool survived the restart"
    );
    let third = daemon.timeout_kill(&["sleep", "600"], "outage-3")?;
    daemon.await_spool(3)?;

    pg.restart()?;
    await_state("the spool replayed", || {
        Ok((daemon.status()?.database.spool_depth == 0).then_some(()))
    })?;
    let rows = db.query("select pid, analysis_id from watchdog_events order by id")?;
    assert_eq!(
        rows,
        format!("{first}|outage-1\n{second}|outage-2\n{third}|outage-3"),
        "in order, once each"
    );
    assert_eq!(
        db.query("select count(distinct event_uid) from watchdog_events")?,
        "3"
    );
    Ok(())
}

#[test]
fn events_filters_and_json_match_the_rows() -> Result<()> {
    let db = Db::sqlite()?;
    let daemon = Daemon::builder()
        .database_url(db.url())
        .arg("--orphans", "log")
        .start()?;
    let killed = daemon.timeout_kill(&["sleep", "600"], "alpha")?;
    let mut parent = Workload::python(PARENT_AND_CHILD, &[])?;
    daemon.register(parent.pid(), "beta")?;
    parent.send("go")?;
    assert_eq!(parent.read_line()?, "forked");
    parent.signal(nix::sys::signal::Signal::SIGKILL)?;
    await_rows(&db, "select count(*) from watchdog_events", "2")?;

    let events = |filters: &[&str]| daemon.events_with(filters);
    let all = events(&[])?;
    let rows = db.query("select pid, reason, analysis_id, outcome, time from watchdog_events order by time desc, event_uid desc")?;
    let from_json: Vec<String> = all
        .iter()
        .map(|e| {
            format!(
                "{}|{}|{}|{}|{}",
                e.record.pid,
                e.record.reason.as_str(),
                e.record.analysis_id.as_str(),
                e.record.outcome.as_str(),
                e.record.time.as_str()
            )
        })
        .collect();
    assert_eq!(
        from_json.join("\n"),
        rows,
        "newest first, the same as the rows"
    );
    assert_eq!(all[1].record.pid, killed);

    let only = |args: &[&str]| -> Result<Vec<String>> {
        Ok(events(args)?
            .iter()
            .map(|e| e.record.analysis_id.as_str().to_string())
            .collect())
    };
    assert_eq!(only(&["--analysis-id", "alpha"])?, vec!["alpha"]);
    assert_eq!(only(&["--reason", "orphan"])?, vec!["beta"]);
    assert_eq!(only(&["--reason", "memory"])?, Vec::<String>::new());
    assert_eq!(only(&["--host", "no-such-host"])?, Vec::<String>::new());
    let host = all[0].record.host.as_str().to_string();
    assert_eq!(only(&["--host", &host])?.len(), 2);
    assert_eq!(only(&["--since", "1h"])?.len(), 2);
    let text = daemon.cli_ok(&["events"])?;
    assert!(
        text.lines().count() == 3 && text.contains("alpha") && text.contains("orphan"),
        "{text}"
    );
    let out = daemon.cli(&["events", "--reason", "boredom"]);
    assert!(!out.status.success());
    Ok(())
}

#[test]
fn a_bad_url_a_wrong_password_or_a_refused_migration_is_one_line_and_the_daemon_enforces_and_spools()
-> Result<()> {
    let pg = TestPostgres::start()?;
    let cases = [
        ("not a url", "invalid database URL"),
        (
            &pg.url_as("watchdog", "wrong") as &str,
            "check the user and password",
        ),
        (&pg.url_as("readonly", "secret"), "refused the migrations"),
    ];
    for (url, expected) in cases {
        let error = one_line_error(&migrate(url));
        assert!(error.contains(expected), "{url}: {error}");
        assert!(
            !error.contains("wrong") && !error.contains(":secret@"),
            "no password in messages: {error}"
        );

        let daemon = Daemon::builder().database_url(url).start()?;
        let status = await_state("the database error in status", || {
            let status = daemon.status()?;
            Ok(status
                .database
                .error
                .as_deref()
                .unwrap_or_default()
                .contains(expected)
                .then_some(status))
        })?;
        assert_eq!(status.db, "spooling");
        daemon.timeout_kill(&["sleep", "600"], "still-enforced")?;
        daemon.await_spool(1)?;
        let spooled = spooled_events(&daemon)?;
        assert_eq!(spooled.len(), 1, "{spooled:?}");
        assert_eq!(spooled[0].record.analysis_id, "still-enforced");
    }
    Ok(())
}

/// `exec` returns once its command is dead; the kill's record must already be what
/// `events` answers, though the command's exit reaches the daemon without a wake-up
/// and its record may not be in the database yet. Asked once per round, never polled:
/// five rounds to catch the race.
#[test]
fn events_right_after_exec_returns_from_a_kill_shows_that_kill() -> Result<()> {
    let daemon = Daemon::start()?;
    for round in 0..5 {
        let id = format!("right-after-{round}");
        let out = daemon.cli(&[
            "exec",
            "--analysis-id",
            &id,
            "--timeout",
            "1s",
            "--",
            "sleep",
            "600",
        ]);
        assert_eq!(out.status.code(), Some(128 + 15), "killed by SIGTERM");
        let records = daemon.events()?;
        let kills: Vec<&EventRecord> = records
            .iter()
            .filter(|r| r.record.analysis_id == id)
            .collect();
        assert_eq!(kills.len(), 1, "round {round}: {records:?}");
        assert_eq!(kills[0].record.reason, Reason::Timeout);
        assert_eq!(kills[0].record.outcome, Outcome::ExitedAfterSigterm);
    }
    Ok(())
}

/// Forks argv[1] sleepers, prints "forked", then sleeps.
const SLEEPERS: &str = r#"
import os, sys, time
for _ in range(int(sys.argv[1])):
    if os.fork() == 0:
        time.sleep(600)
        os._exit(0)
print("forked", flush=True)
time.sleep(600)
"#;

/// One page of `events --json --limit N [--before CURSOR]`: its records and the
/// cursor of the next page, if it says one follows.
fn page(
    daemon: &Daemon,
    limit: &str,
    before: Option<&str>,
) -> Result<(Vec<EventRecord>, Option<String>)> {
    let mut args = vec!["events", "--json", "--limit", limit];
    if let Some(cursor) = before {
        args.extend(["--before", cursor]);
    }
    let out = daemon.cli(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let next = String::from_utf8_lossy(&out.stderr)
        .lines()
        .find_map(|l| l.split_once("events --before ").map(|(_, c)| c.to_string()));
    Ok((serde_json::from_slice(&out.stdout)?, next))
}

#[test]
fn events_come_in_pages_that_hold_every_record_once_in_order_on_both_databases() -> Result<()> {
    for (name, db) in both()? {
        let daemon = Daemon::builder().database_url(db.url()).start()?;
        let mut tree = Workload::python(SLEEPERS, &["7"])?;
        assert_eq!(tree.read_line()?, "forked");
        // One kill of eight processes: records made in the same millisecond, which only
        // the id tells apart.
        daemon.register_with(tree.pid(), "paged", &["--timeout", "1s"])?;
        await_rows(&db, "select count(*) from watchdog_events", "8")?;
        let (all, none) = page(&daemon, "1000", None)?;
        assert_eq!(
            (all.len(), none),
            (8, None),
            "{name}: one answer holds them all"
        );
        let mut paged = Vec::new();
        let mut cursor = None;
        let mut pages = 0;
        loop {
            let (records, next) = page(&daemon, "3", cursor.as_deref())?;
            pages += 1;
            assert!(pages <= 8, "{name}: a page never ends the listing");
            paged.extend(records);
            match next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        let ids = |records: &[EventRecord]| -> Vec<String> {
            records.iter().map(|r| r.event_uid.clone()).collect()
        };
        assert_eq!(pages, 3, "{name}: pages of 3, 3 and 2");
        assert_eq!(
            ids(&paged),
            ids(&all),
            "{name}: every record once, newest first"
        );
        let line = one_line_error(&daemon.cli(&["events", "--before", "yesterday"]));
        assert!(line.contains("--before takes the `next`"), "{name}: {line}");
    }
    Ok(())
}
