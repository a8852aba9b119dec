//! Bad input gets a one-line error that names the fix, changes nothing, and leaves the
//! daemon serving.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    process::Command,
};

use anyhow::Result;
use watchdog_tests::{Daemon, Workload, one_line_error, watchdog_bin};

/// A pid no process has now.
fn unused_pid() -> u32 {
    let max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (300..max)
        .rev()
        .find(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        .unwrap()
}

fn assert_still_serving_unchanged(daemon: &Daemon, watched_before: usize) -> Result<()> {
    let status = daemon.status()?;
    assert_eq!(
        status.monitored_count, watched_before,
        "a refused request changed the watched set"
    );
    Ok(())
}

#[test]
fn registering_what_must_not_be_watched_is_refused_and_changes_nothing() -> Result<()> {
    let daemon = Daemon::start()?;
    let work = Workload::spawn("sleep", &["600"])?;
    daemon.register(work.pid(), "kept")?;

    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![unused_pid().to_string(), "a".into()],
            "no process with pid",
        ),
        (vec!["1".into(), "a".into()], "never touches"),
        (
            vec![daemon.pid().to_string(), "a".into()],
            "the watchdog daemon itself",
        ),
        (vec!["2".into(), "a".into()], "kernel thread"),
        (
            vec![std::process::id().to_string(), "".into()],
            "analysis id is empty",
        ),
        (
            vec![work.pid().to_string(), "other".into()],
            "already watched as part of analysis \"kept\"",
        ),
    ];
    for (args, expected) in cases {
        let out = daemon.cli(&["register", "--pid", &args[0], "--analysis-id", &args[1]]);
        let error = one_line_error(&out);
        assert!(
            error.contains(expected),
            "register {args:?}: {error:?} lacks {expected:?}"
        );
        assert_still_serving_unchanged(&daemon, 1)?;
    }
    let tree = daemon.tree(None)?;
    assert_eq!(tree.len(), 1);
    assert_eq!(tree[0].analysis_id, "kept");

    let out = daemon.cli(&["unregister", "--pid", &unused_pid().to_string()]);
    assert!(one_line_error(&out).contains("is not watched"));
    let out = daemon.cli(&["unregister", "--analysis-id", "nope"]);
    assert!(one_line_error(&out).contains("no analysis \"nope\""));
    assert_still_serving_unchanged(&daemon, 1)?;
    Ok(())
}

#[test]
fn a_malformed_request_gets_an_error_and_the_connection_and_daemon_keep_serving() -> Result<()> {
    let daemon = Daemon::start()?;
    let stream = UnixStream::connect(&daemon.socket)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut ask = |line: &str| -> Result<serde_json::Value> {
        (&stream).write_all(format!("{line}\n").as_bytes())?;
        let mut answer = String::new();
        reader.read_line(&mut answer)?;
        Ok(serde_json::from_str(&answer)?)
    };
    for garbage in [
        "not json",
        r#"{"op":"register","pid":"seven"}"#,
        r#"{"op":"launch_missiles"}"#,
    ] {
        let answer = ask(garbage)?;
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            error.starts_with("malformed request"),
            "{garbage}: {answer}"
        );
    }
    let answer = ask(r#"{"op":"status"}"#)?;
    assert_eq!(answer["ok"]["kind"], "status", "{answer}");
    assert_still_serving_unchanged(&daemon, 0)
}

#[test]
fn a_socket_with_no_daemon_behind_it_names_the_fix() {
    let out = Command::new(watchdog_bin())
        .args(["--socket", "/nonexistent/watchdog.sock", "dump-tree"])
        .output()
        .unwrap();
    let error = one_line_error(&out);
    assert!(
        error.contains("no watchdog daemon at /nonexistent/watchdog.sock"),
        "{error}"
    );
    assert!(error.contains("watchdog-user run"), "{error}");
}

#[test]
fn bpf_refused_without_privilege_or_btf_is_one_clear_line() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("watchdog-refused-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    let socket = dir.join("s.sock");

    let as_nobody = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(watchdog_bin())
        .arg("--socket")
        .arg(&socket)
        .arg("run")
        .output()?;
    let error = one_line_error(&as_nobody);
    assert!(
        error.contains("permission denied") && error.contains("run the daemon as root"),
        "{error}"
    );
    assert!(!socket.exists(), "a refused daemon leaves no socket behind");

    let no_btf = Command::new(watchdog_bin())
        .arg("--socket")
        .arg(&socket)
        .args(["run", "--btf", "/nonexistent/vmlinux"])
        .output()?;
    let error = one_line_error(&no_btf);
    assert!(error.contains("CONFIG_DEBUG_INFO_BTF"), "{error}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn a_second_daemon_on_the_same_socket_is_refused_and_the_first_keeps_serving() -> Result<()> {
    let daemon = Daemon::start()?;
    let out = Command::new(watchdog_bin())
        .arg("--socket")
        .arg(&daemon.socket)
        .arg("run")
        .output()?;
    assert!(one_line_error(&out).contains("already serving"));
    assert_still_serving_unchanged(&daemon, 0)
}

#[test]
fn a_warning_that_could_not_warn_is_refused_by_the_cli_and_by_the_daemon() -> Result<()> {
    let daemon = Daemon::start()?;
    let work = Workload::spawn("sleep", &["600"])?;
    let pid = work.pid().to_string();
    for (flags, expected) in [
        (["--warn-at", "120%"], "use 1% to 99%"),
        (["--warn-signal", "SIGKILL"], "cannot be caught"),
        (["--warn-signal", "SIGNOPE"], "such as SIGUSR1"),
    ] {
        let mut args = vec!["register", "--pid", &pid, "--analysis-id", "w"];
        args.extend(flags);
        // clap's own error: the line naming the fix, then its pointer to --help.
        let out = daemon.cli(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let error = stderr.lines().next().unwrap_or_default();
        assert!(
            !out.status.success() && error.contains(expected),
            "{flags:?}: {stderr}"
        );
    }
    // The daemon checks what other clients send as well.
    for (limits, expected) in [
        (r#"{"warn_at_percent":100}"#, "1 to 99"),
        (r#"{"warn_signal":"SIGSTOP"}"#, "cannot be caught"),
    ] {
        let answer = daemon.request(&format!(
            r#"{{"op":"register","pid":{pid},"analysis_id":"w","limits":{limits}}}"#
        ))?;
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(expected) && error.contains("nothing was registered"),
            "{answer}"
        );
    }
    assert_still_serving_unchanged(&daemon, 0)?;
    Ok(())
}
