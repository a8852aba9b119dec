//! `exec` as users run it from scripts: retried in a loop, joined with other limits,
//! and telling how the watchdog ended the command.

use std::os::unix::process::ExitStatusExt;

use anyhow::Result;
use watchdog_tests::{Daemon, Reason, alive, python};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_killed_analysis_retried_in_a_tight_loop_runs_every_time() -> Result<()> {
    let daemon = Daemon::start()?;
    for attempt in 0..20 {
        let out = daemon.cli(&[
            "exec",
            "--analysis-id",
            "retried",
            "--timeout",
            "300ms",
            "--grace",
            "1s",
            "--",
            "sh",
            "-c",
            &format!("echo ran {attempt}; exec sleep 30"),
        ]);
        let said = stderr(&out);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("ran {attempt}"),
            "attempt {attempt} ran its command: {said}"
        );
        assert_eq!(out.status.code(), Some(143), "attempt {attempt}: {said}");
        assert!(
            said.contains("killed the command (SIGTERM)") && said.contains("timeout"),
            "attempt {attempt}: {said}"
        );
    }
    let records = daemon.events_of("retried")?;
    assert_eq!(records.len(), 20, "one timeout per attempt: {records:#?}");
    assert!(
        records
            .iter()
            .all(|r| r.record.reason == Reason::Timeout && r.record.comm == "sleep"),
        "only the commands were killed, never the CLI before it released one: {records:#?}"
    );
    Ok(())
}

#[test]
fn exec_says_why_the_watchdog_killed_the_command_and_exits_128_plus_the_signal() -> Result<()> {
    let daemon = Daemon::start()?;
    let timeout = daemon.cli(&[
        "exec",
        "--analysis-id",
        "slow",
        "--timeout",
        "500ms",
        "--",
        "sleep",
        "30",
    ]);
    let said = stderr(&timeout);
    eprintln!(
        "timeout: status {:?}, stderr {said:?}",
        timeout.status.code()
    );
    assert_eq!(timeout.status.code(), Some(143), "{said}");
    assert!(
        said.contains("the watchdog killed the command (SIGTERM) of analysis \"slow\": timeout, its limit of 500ms passed"),
        "{said}"
    );
    // The record is there as soon as exec has returned.
    assert_eq!(daemon.events_of("slow")?.len(), 1);

    let memory = daemon.cli(&[
        "exec",
        "--analysis-id",
        "big",
        "--memory",
        "64MiB",
        "--",
        python(),
        "-c",
        "import time; x = bytearray(256 << 20); time.sleep(30)",
    ]);
    let said = stderr(&memory);
    eprintln!("memory: status {:?}, stderr {said:?}", memory.status.code());
    assert_eq!(memory.status.code(), Some(143), "{said}");
    assert!(
        said.contains("killed the command (SIGTERM) of analysis \"big\": memory, ")
            && said.contains("over its limit of 64 MiB per process"),
        "{said}"
    );
    assert_eq!(daemon.events_of("big")?[0].record.reason, Reason::Memory);

    // The command exits by itself and leaves a process behind: exec returns once that
    // one is killed as an orphan, with the command's own status.
    let orphan = daemon.cli(&[
        "exec",
        "--analysis-id",
        "leaver",
        "--",
        "sh",
        "-c",
        "sleep 30 & echo $!; exit 3",
    ]);
    let said = stderr(&orphan);
    eprintln!("orphan: status {:?}, stderr {said:?}", orphan.status.code());
    assert_eq!(
        orphan.status.code(),
        Some(3),
        "the command's own status: {said}"
    );
    assert!(
        said.contains("killed 1 process of analysis \"leaver\": orphan"),
        "{said}"
    );
    let left: u32 = String::from_utf8_lossy(&orphan.stdout).trim().parse()?;
    assert!(!alive(left), "the orphan {left} is gone when exec returns");
    let records = daemon.events_of("leaver")?;
    assert_eq!(
        (
            records.len(),
            records[0].record.reason,
            records[0].record.pid
        ),
        (1, Reason::Orphan, left)
    );

    // Nothing killed: nothing said, the command's status.
    let calm = daemon.cli(&["exec", "--analysis-id", "calm", "--", "sh", "-c", "exit 7"]);
    assert_eq!(calm.status.code(), Some(7));
    assert_eq!(stderr(&calm), "");
    Ok(())
}

#[test]
fn joining_a_running_analysis_with_other_limits_is_refused_and_the_command_never_runs() -> Result<()>
{
    let daemon = Daemon::start()?;
    let mut first = watchdog_tests::Workload::spawn("sleep", &["600"])?;
    daemon.register_with(first.pid(), "shared", &["--timeout", "4s"])?;
    let marker = daemon.dir.join("ran");
    let out = daemon.cli(&[
        "exec",
        "--analysis-id",
        "shared",
        "--timeout",
        "1h",
        "--memory",
        "100MiB",
        "--",
        "touch",
        marker.to_str().unwrap(),
    ]);
    let said = stderr(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("analysis \"shared\" is running with other limits: timeout 4s (asked: 1h), memory 2 GiB (asked: 100 MiB)"),
        "{said}"
    );
    assert!(!marker.exists(), "the command never ran");
    // dump-tree --json carries the analyses as the text view does.
    let json: serde_json::Value = serde_json::from_str(&daemon.cli_ok(&["dump-tree", "--json"])?)?;
    assert_eq!(json["analyses"][0]["analysis_id"], "shared");
    assert_eq!(json["analyses"][0]["limits"]["timeout_ms"], 4000);
    assert_eq!(json["processes"][0]["pid"], first.pid());
    // The same limits, or none: it joins, and returns once all of the analysis has
    // ended, telling what the watchdog killed in it; its command's status stands.
    let joined = daemon.cli(&["exec", "--analysis-id", "shared", "--", "true"]);
    let said = stderr(&joined);
    assert_eq!(joined.status.code(), Some(0), "{said}");
    assert!(
        said.contains("killed 1 process of analysis \"shared\": timeout, its limit of 4s passed"),
        "{said}"
    );
    assert!(
        first.wait()?.signal().is_some(),
        "the first member was killed"
    );
    Ok(())
}

/// A script that starts a daemon the way `ray start` does (the starter returns, the
/// daemon lives on with init as its parent), uses it, and stops it.
const DAEMON_STARTING_SCRIPT: &str = r#"
sh -c 'sleep 600 & echo $! > "$0"' "$1"
sleep 0.3
if [ -d /proc/$(cat "$1") ] && ! grep -q '^State:.*Z' /proc/$(cat "$1")/status; then
    echo "job: the daemon answers"
else
    echo "job: the daemon is gone"
fi
kill $(cat "$1")
"#;

#[test]
fn a_daemon_starting_tool_works_under_orphans_log_and_is_killed_at_once_by_default() -> Result<()> {
    let daemon = Daemon::start()?;
    let run = |id: &str, policy: &[&str]| -> Result<(String, String, Option<i32>)> {
        let pidfile = daemon.dir.join(format!("{id}.pid"));
        let mut args = vec!["exec", "--analysis-id", id, "--timeout", "60s"];
        args.extend(policy);
        args.extend(["--", "sh", "-c", DAEMON_STARTING_SCRIPT, "script"]);
        let pidfile = pidfile.to_str().unwrap().to_string();
        args.push(&pidfile);
        let out = daemon.cli(&args);
        Ok((
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            stderr(&out),
            out.status.code(),
        ))
    };
    // The default: the daemon is an orphan the moment its starter returns.
    let (said, warned, code) = run("ray-default", &[])?;
    assert_eq!(said, "job: the daemon is gone", "{warned}");
    assert!(warned.contains("orphan"), "{warned}");
    assert_eq!(code, Some(0));
    // Under --orphans log it is a member until the timeout: the job uses it, stops it,
    // and exec returns once it is gone; its record says it outlived its starter.
    let (said, warned, code) = run("ray-log", &["--orphans", "log"])?;
    assert_eq!(said, "job: the daemon answers", "{warned}");
    assert_eq!((warned.as_str(), code), ("", Some(0)), "nothing was killed");
    let records = daemon.events_of("ray-log")?;
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(
        (records[0].record.reason, records[0].record.outcome),
        (Reason::Orphan, watchdog_tests::Outcome::Logged)
    );
    Ok(())
}

/// Starts `sleep 600` for each line it reads, printing its pid: a driver whose children
/// a launch puts in an analysis.
const LAUNCHING_DRIVER: &str = r#"
import subprocess, sys
for _ in sys.stdin:
    print(subprocess.Popen(["sleep", "600"]).pid, flush=True)
"#;

#[test]
fn a_launch_survives_a_daemon_restart_and_its_children_die_with_the_launcher() -> Result<()> {
    let mut daemon = Daemon::start()?;
    let mut driver = watchdog_tests::Workload::python(LAUNCHING_DRIVER, &[])?;
    let answer = daemon.request(&format!(
        r#"{{"op":"launch","pid":{},"analysis_id":"launched"}}"#,
        driver.pid()
    ))?;
    assert_eq!(answer["ok"]["kind"], "registered", "{answer}");
    let member = |daemon: &Daemon, pid: u32| -> Result<bool> {
        Ok(watchdog_tests::all_nodes(&daemon.tree(Some("launched"))?)
            .iter()
            .any(|n| n.pid == pid))
    };
    driver.send("go")?;
    let before: u32 = driver.read_line()?.parse()?;
    watchdog_tests::await_state("the first child in the analysis", || {
        Ok(member(&daemon, before)?.then_some(()))
    })?;
    assert!(!member(&daemon, driver.pid())?, "the launcher is no member");
    daemon.restart()?;
    driver.send("go")?;
    let after: u32 = driver.read_line()?.parse()?;
    watchdog_tests::await_state("the child forked after the restart in the analysis", || {
        Ok(member(&daemon, after)?.then_some(()))
    })?;
    driver.kill()?;
    watchdog_tests::await_state("both children killed as orphans", || {
        Ok((!alive(before) && !alive(after)).then_some(()))
    })?;
    let records = daemon.events_of("launched")?;
    assert!(
        records.iter().all(|r| r.record.reason == Reason::Orphan),
        "{records:#?}"
    );
    assert_eq!(records.len(), 2);
    Ok(())
}

#[test]
fn a_record_keeps_at_most_4096_bytes_of_a_command_line_and_says_it_cut() -> Result<()> {
    let daemon = Daemon::start()?;
    // About 1 MiB of arguments (each under the kernel's 128 KiB per argument).
    let arg = "x".repeat(100 << 10);
    let mut argv = vec![
        "exec",
        "--analysis-id",
        "long-args",
        "--timeout",
        "300ms",
        "--",
    ];
    argv.extend(["sh", "-c", "sleep 30; :", "sh"]);
    argv.extend(std::iter::repeat_n(arg.as_str(), 10));
    let out = daemon.cli(&argv);
    assert_eq!(out.status.code(), Some(143), "{}", stderr(&out));
    let records = daemon.events_of("long-args")?;
    let shell = records
        .iter()
        .find(|r| r.record.comm == "sh")
        .expect("the shell's record");
    assert!(
        shell.record.cmdline.starts_with("sh -c sleep 30; : sh xxx"),
        "{}",
        &shell.record.cmdline[..80]
    );
    assert!(shell.record.cmdline.ends_with(" …[cut at 4096 bytes]"));
    assert!(
        shell.record.cmdline.len() < 4200,
        "{}",
        shell.record.cmdline.len()
    );
    Ok(())
}
