//! Supervision: the systemd unit, sd_notify, /status and /metrics, the config file.

use std::{
    os::unix::net::UnixDatagram,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::Signal;
use serde_json::Value;
use watchdog_tests::{
    Daemon, Workload, all_nodes, await_state, free_port, http_get, one_line_error, watchdog_bin,
};

#[test]
fn systemd_analyze_verify_accepts_the_unit() -> Result<()> {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/watchdog.service"
    ))?;
    assert!(
        unit.contains("Type=notify")
            && unit.contains("Restart=always")
            && unit.contains("WatchdogSec=")
    );
    // verify checks that ExecStart's binary exists: point it at the one just built.
    let dir = std::env::temp_dir().join(format!("watchdog-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("watchdog.service");
    std::fs::write(
        &path,
        unit.replace(
            "/usr/local/bin/watchdog-user",
            watchdog_bin().to_str().unwrap(),
        ),
    )?;
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    std::fs::remove_dir_all(&dir)?;
    assert!(
        out.status.success(),
        "systemd-analyze verify refused the unit: {stderr}"
    );
    assert!(
        !stderr.contains("watchdog.service"),
        "warnings about the unit: {stderr}"
    );
    Ok(())
}

/// Datagrams from the daemon's sd_notify, with when they arrived.
fn notifications(socket: &UnixDatagram, for_how_long: Duration) -> Result<Vec<(Instant, String)>> {
    let end = Instant::now() + for_how_long;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        socket.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        match socket.recv(&mut buf) {
            Ok(n) => got.push((
                Instant::now(),
                String::from_utf8_lossy(&buf[..n]).into_owned(),
            )),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(got)
}

fn heartbeat_times(messages: &[(Instant, String)]) -> Vec<Instant> {
    messages
        .iter()
        .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
        .map(|(t, _)| *t)
        .collect()
}

fn largest_gap(times: &[Instant]) -> Duration {
    times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

#[test]
fn sd_notify_ready_after_attach_then_heartbeats_that_stop_when_the_loop_hangs() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("watchdog-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&path)?;
    // WatchdogSec=400ms: heartbeats every 200 ms.
    let daemon = Daemon::builder()
        .flag("--test-faults")
        .env("NOTIFY_SOCKET", path.to_str().unwrap())
        .env("WATCHDOG_USEC", "400000")
        .start()?;
    socket.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf)?;
    let first = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        first.lines().any(|l| l == "READY=1"),
        "the first notification is READY=1: {first:?}"
    );
    assert!(
        first.lines().any(|l| l.starts_with("STATUS=watching ")),
        "{first:?}"
    );

    // READY meant attached: a fork right now is seen.
    let mut work = Workload::python(
        "import os, sys, time\nsys.stdin.readline()\nos.fork()\ntime.sleep(600)",
        &[],
    )?;
    daemon.register(work.pid(), "ready")?;
    work.send("go")?;
    await_state("the fork seen", || {
        Ok((all_nodes(&daemon.tree(None)?).len() == 2).then_some(()))
    })?;

    // Drop what queued meanwhile (the daemon drops what does not fit, never blocks).
    socket.set_nonblocking(true)?;
    while socket.recv(&mut buf).is_ok() {}
    socket.set_nonblocking(false)?;
    let beats = heartbeat_times(&notifications(&socket, Duration::from_secs(2))?);
    assert!(
        beats.len() >= 5,
        "about 10 heartbeats in 2 s at 200 ms, got {}",
        beats.len()
    );
    assert!(
        largest_gap(&beats) < Duration::from_millis(1000),
        "gap {:?}",
        largest_gap(&beats)
    );

    daemon.request(r#"{"op":"stall","ms":3000}"#)?;
    let stalled_at = Instant::now();
    let beats = heartbeat_times(&notifications(&socket, Duration::from_secs(5))?);
    let silent = beats
        .iter()
        .find(|t| **t > stalled_at + Duration::from_millis(100))
        .map(|t| *t - stalled_at);
    assert!(
        silent.is_some_and(|s| s >= Duration::from_millis(2500)),
        "no heartbeat while stalled: first after {silent:?}"
    );
    assert!(beats.len() >= 3, "heartbeats resume after the stall");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

const PARENT_AND_CHILD: &str = "import os, sys, time\nsys.stdin.readline()\nif os.fork() == 0:\n    time.sleep(600)\nos.write(1, b'forked\\n')\ntime.sleep(600)";

#[test]
fn status_and_metrics_count_a_scripted_scenario_and_the_metrics_parse() -> Result<()> {
    let port = free_port()?;
    let daemon = Daemon::builder().http_port(port).start()?;
    let mut sleepers = Vec::new();
    for i in 0..2 {
        let sleeper = Workload::spawn("sleep", &["600"])?;
        daemon.register_with(sleeper.pid(), &format!("t{i}"), &["--timeout", "1s"])?;
        sleepers.push(sleeper);
    }
    let mut parent = Workload::python(PARENT_AND_CHILD, &[])?;
    daemon.register(parent.pid(), "orphaned")?;
    parent.send("go")?;
    assert_eq!(parent.read_line()?, "forked");
    let kept = Workload::spawn("sleep", &["600"])?;
    daemon.register(kept.pid(), "kept")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(parent.pid() as i32),
        Signal::SIGKILL,
    )?;

    let status: Value = await_state("3 kills in /status", || {
        let (code, body) = daemon.http_get(port, "/status")?;
        assert_eq!(code, 200);
        let status: Value = serde_json::from_str(&body)?;
        // "ok" says the database is reachable; the records are in it once the spool
        // is empty.
        let settled = status["kills_last_24h"] == 3
            && status["monitored_count"] == 1
            && status["db"] == "ok"
            && status["database"]["spool_depth"] == 0;
        Ok(settled.then_some(status))
    })?;
    for field in [
        "monitored_count",
        "grace_count",
        "kills_last_24h",
        "recent_events",
        "lost_events",
        "uptime_s",
        "version",
        "db",
    ] {
        assert!(!status[field].is_null(), "/status lacks {field}: {status}");
    }
    assert_eq!(status["recent_events"].as_array().unwrap().len(), 3);
    assert_eq!(
        (
            status["grace_count"].as_u64(),
            status["lost_events"].as_u64()
        ),
        (Some(0), Some(0))
    );
    assert_eq!(status["db"], "ok");

    let (code, text) = http_get(port, "/metrics")?;
    assert_eq!(code, 200);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))?;
    let value = |name: &str, label: Option<(&str, &str)>| -> Result<f64> {
        let sample = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .with_context(|| format!("no sample {name} {label:?} in:\n{text}"))?;
        match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Ok(v),
            _ => bail!("{name} is not a plain number"),
        }
    };
    assert_eq!(
        value("watchdog_kills_total", Some(("reason", "timeout")))?,
        2.0
    );
    assert_eq!(
        value("watchdog_kills_total", Some(("reason", "orphan")))?,
        1.0
    );
    assert_eq!(
        value("watchdog_kills_total", Some(("reason", "memory")))?,
        0.0
    );
    assert_eq!(value("watchdog_watched_processes", None)?, 1.0);
    assert_eq!(value("watchdog_analyses", None)?, 1.0);
    assert_eq!(value("watchdog_lost_events_total", None)?, 0.0);
    assert_eq!(value("watchdog_ring_buffer_drops_total", None)?, 0.0);
    assert_eq!(value("watchdog_db_spool_depth", None)?, 0.0);
    assert_eq!(value("watchdog_pinned_state_dropped_total", None)?, 0.0);
    let histogram = scrape
        .samples
        .iter()
        .find(|s| s.metric == "watchdog_event_latency_seconds")
        .context("no histogram")?;
    assert!(
        matches!(histogram.value, prometheus_parse::Value::Histogram(_)),
        "{:?}",
        histogram.value
    );
    // Every sample belongs to a documented metric family.
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = line.split(['{', ' ']).next().unwrap();
        let family = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        assert!(
            text.contains(&format!("# TYPE {family} "))
                || text.contains(&format!("# TYPE {name} ")),
            "undeclared {name}"
        );
    }
    assert_eq!(http_get(port, "/nope")?.0, 404);
    Ok(())
}

fn write(path: &std::path::Path, text: &str) -> Result<()> {
    Ok(std::fs::write(path, text)?)
}

fn grace_ms(daemon: &Daemon) -> Result<u64> {
    Ok(daemon
        .status()?
        .settings
        .defaults
        .context("no defaults in status")?
        .grace_ms)
}

#[test]
fn a_bad_config_file_is_refused_on_start_and_on_sighup_with_its_line() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("watchdog-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("watchdog.toml");
    let bad = "grace = \"5s\"\npoll-interval = \"30s\"\ncolour = \"blue\"\n";

    write(&config, bad)?;
    let out = Command::new(watchdog_bin())
        .args([
            "--socket",
            dir.join("s.sock").to_str().unwrap(),
            "run",
            "--http",
            "none",
            "--config",
            config.to_str().unwrap(),
        ])
        .output()?;
    let error = one_line_error(&out);
    assert!(
        error.contains("line 3") && error.contains("colour"),
        "{error}"
    );

    write(&config, "grace = \"5s\"\ndefault-timeout = \"1h\"\n")?;
    let mut daemon = Daemon::builder()
        .arg("--config", config.to_str().unwrap())
        .start()?;
    assert_eq!(grace_ms(&daemon)?, 5000, "the file applies");
    assert_eq!(
        daemon.status()?.settings.defaults.map(|d| d.timeout_ms),
        Some(3_600_000)
    );

    write(&config, "grace = \"7s\"\ndefault-timeout = \"soon\"\n")?;
    daemon.signal(Signal::SIGHUP)?;
    await_state("the refusal logged", || {
        Ok(daemon
            .log()
            .contains("keeping the running settings")
            .then_some(()))
    })?;
    let refusal = daemon
        .log()
        .lines()
        .find(|l| l.contains("keeping the running settings"))
        .unwrap()
        .to_string();
    assert!(
        refusal.contains("line 2") && refusal.contains("soon"),
        "{refusal}"
    );
    assert_eq!(grace_ms(&daemon)?, 5000, "the running settings stay");

    write(&config, "# a comment\ngrace \"7s\"\n")?;
    daemon.signal(Signal::SIGHUP)?;
    await_state("the syntax error logged", || {
        Ok(daemon.log().contains("at line 2").then_some(()))
    })?;
    assert_eq!(grace_ms(&daemon)?, 5000);

    write(&config, "grace = \"7s\"\n")?;
    daemon.signal(Signal::SIGHUP)?;
    await_state("the new grace", || {
        Ok((grace_ms(&daemon)? == 7000).then_some(()))
    })?;
    drop(daemon);

    let flags_win = Daemon::builder()
        .arg("--config", config.to_str().unwrap())
        .arg("--grace", "3s")
        .start()?;
    assert_eq!(grace_ms(&flags_win)?, 3000, "flags win over the file");
    drop(flags_win);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
