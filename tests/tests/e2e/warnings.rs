//! A warning before the kill, end to end: `--warn-at` sends the warning signal to the
//! analysis' root once per limit, so that a script that traps it writes a checkpoint
//! before its SIGTERM comes. The script's own file proves the order (the warning's
//! handler writes first, the SIGTERM handler appends), and the records agree.

use std::path::Path;

use anyhow::Result;
use watchdog_tests::{Daemon, EventRecord, Outcome, Reason, await_state, python, time_of};

/// A bash script that checkpoints on SIGUSR1 and appends "sigterm" on SIGTERM.
const CHECKPOINTING_SHELL: &str = r#"
trap 'echo checkpoint >> "$0.out"' USR1
trap 'echo sigterm >> "$0.out"; exit 0' TERM
while :; do sleep 0.1; done
"#;

/// A Python program that grows by 8 MiB every 40 ms, checkpointing on SIGUSR2 and
/// appending "sigterm" on SIGTERM.
const CHECKPOINTING_GROWER: &str = r#"
import signal, sys, time
out = sys.argv[1]
def note(line):
    with open(out, "a") as f:
        f.write(line + "\n")
signal.signal(signal.SIGUSR2, lambda *_: note("checkpoint"))
def term(*_):
    note("sigterm")
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
hold = []
for _ in range(100):
    hold.append(b"x" * (8 << 20))
    time.sleep(0.04)
note("survived")
"#;

/// The records of analysis `id`: its one warning, and the kill of the process warned.
fn warning_and_kill(
    daemon: &Daemon,
    id: &str,
    kill_reason: Reason,
) -> Result<(EventRecord, EventRecord)> {
    let records = daemon.events_of(id)?;
    let warnings: Vec<&EventRecord> = records
        .iter()
        .filter(|r| r.record.reason == Reason::Warning)
        .collect();
    let [warning] = warnings[..] else {
        anyhow::bail!("not one warning: {records:?}");
    };
    let kill = records
        .iter()
        .find(|r| r.record.reason == kill_reason && r.record.pid == warning.record.pid)
        .ok_or_else(|| anyhow::anyhow!("no {kill_reason:?} kill of the root: {records:?}"))?;
    Ok((warning.clone(), kill.clone()))
}

fn lines(path: &Path) -> Result<Vec<String>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .map(str::to_string)
        .collect())
}

#[test]
fn a_script_trapping_the_warning_checkpoints_before_its_timeouts_sigterm() -> Result<()> {
    let daemon = Daemon::start()?;
    let script = daemon.dir.join("checkpointing.sh");
    std::fs::write(&script, CHECKPOINTING_SHELL)?;
    let out = daemon.cli(&[
        "exec",
        "--analysis-id",
        "warned-timeout",
        "--timeout",
        "3s",
        "--warn-at",
        "50%",
        "--",
        "bash",
        script.to_str().unwrap(),
    ]);
    // It exited from its TERM trap; exec says the watchdog killed it: 128 + SIGTERM.
    assert_eq!(
        out.status.code(),
        Some(143),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        lines(&script.with_extension("sh.out"))?,
        ["checkpoint", "sigterm"],
        "the checkpoint came first"
    );
    let (warning, kill) = warning_and_kill(&daemon, "warned-timeout", Reason::Timeout)?;
    assert_eq!(warning.record.outcome, Outcome::Warned);
    assert_eq!(warning.record.warned_of, Some(Reason::Timeout));
    assert_eq!(warning.record.limit, Some(3000));
    assert_eq!(warning.record.signals[0].signal, "SIGUSR1");
    let warned_at = time_of(&warning.record.signals[0].at);
    let sigterm_at = time_of(&kill.record.signals[0].at);
    let ahead = sigterm_at.duration_since(warned_at)?;
    assert!(ahead.as_millis() >= 1000, "warned {ahead:?} ahead");
    assert_eq!(daemon.status()?.kills_by_reason["warning"], 1);
    eprintln!("figures: warned {ahead:?} before the timeout's SIGTERM (50% of 3 s)");
    Ok(())
}

#[test]
fn a_script_trapping_the_warning_checkpoints_before_its_memory_kill() -> Result<()> {
    // The reconcile poll off: the warning and the kill come from the kernel's reports.
    let daemon = Daemon::builder().arg("--poll-interval", "1h").start()?;
    let out_file = daemon.dir.join("grower.out");
    let out = daemon.cli(&[
        "exec",
        "--analysis-id",
        "warned-memory",
        "--memory",
        "300MiB",
        "--warn-at",
        "50%",
        "--warn-signal",
        "SIGUSR2",
        "--",
        python(),
        "-c",
        CHECKPOINTING_GROWER,
        out_file.to_str().unwrap(),
    ]);
    // It exited from its TERM handler; exec says the watchdog killed it.
    assert_eq!(
        out.status.code(),
        Some(143),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lines(&out_file)?, ["checkpoint", "sigterm"]);
    let (warning, kill) = await_state("the warning and kill records", || {
        Ok(warning_and_kill(&daemon, "warned-memory", Reason::Memory).ok())
    })?;
    assert_eq!(warning.record.warned_of, Some(Reason::Memory));
    assert_eq!(warning.record.limit, Some(300u64 << 20));
    assert_eq!(warning.record.signals[0].signal, "SIGUSR2");
    let rss_warned = warning.record.rss_bytes;
    assert!(rss_warned >= 150 << 20, "warned at {rss_warned} bytes");
    assert!(time_of(&warning.record.signals[0].at) <= time_of(&kill.record.signals[0].at));
    eprintln!(
        "figures: warned at {} MiB, killed at {} MiB (limit 300 MiB, warning at 50%)",
        rss_warned >> 20,
        kill.record.rss_bytes >> 20
    );
    Ok(())
}
