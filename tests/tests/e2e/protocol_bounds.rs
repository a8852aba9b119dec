//! The control socket is bounded (issue 11, item 2), against a real daemon: a 100 MiB
//! line, a line of invalid UTF-8 and 5,000 idle connections each get their error, the
//! daemon's RSS grows by less than 10 MiB over all of it, and `status` answers at once
//! with the idle connections open. When every connection is busy with a request, one
//! more is refused at once with an error line. The HTTP listener takes no writes.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    os::unix::net::UnixStream,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use watchdog_tests::{Daemon, MAX_CONNECTIONS, Status, free_port, http_get, watchdog_bin};

const MIB: usize = 1 << 20;
/// Idle connections opened at once: well over the daemon's 1,024.
const IDLE: usize = 5_000;
const CAP: usize = MAX_CONNECTIONS;
/// How long `status` may take before the test calls it a hang.
const STATUS_WITHIN: Duration = Duration::from_secs(5);

/// The daemon's resident memory, KiB (VmRSS of /proc/PID/status).
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// This test's own descriptors must hold thousands of connections. The limit is the
/// whole suite's process's: two tests raising it at once could each read the old soft
/// limit and the smaller need win, so the read and the raise are one step, and it only
/// ever goes up.
fn raise_nofile(need: u64) -> Result<()> {
    static RAISING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = RAISING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < need {
        if hard < need {
            bail!("RLIMIT_NOFILE hard limit {hard} is below the {need} this test needs");
        }
        setrlimit(Resource::RLIMIT_NOFILE, need, hard)?;
    }
    Ok(())
}

/// `status --json` through the CLI, with a deadline: a hang fails the test.
fn timed_status(daemon: &Daemon) -> Result<(Duration, Status)> {
    let started = Instant::now();
    let mut child = Command::new(watchdog_bin())
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["status", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if started.elapsed() > STATUS_WITHIN {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`status` did not answer within {STATUS_WITHIN:?}: the daemon hangs");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let took = started.elapsed();
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("`status` failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((took, serde_json::from_slice(&out.stdout)?))
}

/// The one line the daemon sends on `stream` within `within`, as its error message.
fn error_line(stream: &UnixStream, within: Duration) -> Result<String> {
    stream.set_read_timeout(Some(within))?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .context("reading the daemon's answer")?;
    let answer: serde_json::Value =
        serde_json::from_str(&line).with_context(|| format!("not one JSON line: {line:?}"))?;
    match answer["error"].as_str() {
        Some(message) => Ok(message.to_string()),
        None => bail!("not an error: {line}"),
    }
}

/// Whether the daemon has closed `stream` (end of file, or reset for unread bytes).
fn closed(stream: &UnixStream) -> Result<bool> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut byte = [0u8; 1];
    Ok(match (&*stream).read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    })
}

/// Streams a line of `total` bytes without a newline in 1 MiB chunks until the daemon
/// answers or closes: its answer, and how much was sent.
fn stream_huge_line(daemon: &Daemon, total: usize) -> Result<(String, usize)> {
    let stream = UnixStream::connect(&daemon.socket)?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let reader = stream.try_clone()?;
    let answered = Arc::new(AtomicBool::new(false));
    let answered_reader = answered.clone();
    let answer = std::thread::spawn(move || {
        let message = error_line(&reader, Duration::from_secs(60));
        answered_reader.store(true, Ordering::SeqCst);
        message.map(|m| (m, closed(&reader)))
    });
    let chunk = vec![b'x'; MIB];
    let mut sent = 0;
    while sent < total && !answered.load(Ordering::SeqCst) {
        match (&stream).write(&chunk[..(total - sent).min(MIB)]) {
            Ok(n) => sent += n,
            // The daemon closed: EPIPE, or a reset.
            Err(_) => break,
        }
    }
    let (message, closed) = answer.join().expect("the reader thread")?;
    assert!(
        closed?,
        "the connection stayed open after a line over the limit"
    );
    Ok((message, sent))
}

/// An HTTP request with a body (only its head and `body` bytes are sent, whatever the
/// Content-Length says): the status code.
fn http_write(port: u16, method: &str, path: &str, length: usize, body: usize) -> Result<u16> {
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        &stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {length}\r\n\
         Content-Type: application/json\r\nConnection: close\r\n\r\n"
    )?;
    let writer = stream.try_clone()?;
    let send = std::thread::spawn(move || {
        let chunk = vec![b'{'; MIB];
        let mut sent = 0;
        while sent < body {
            match (&writer).write(&chunk[..(body - sent).min(MIB)]) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
    });
    let mut head = [0u8; 64];
    let n = (&stream).read(&mut head)?;
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = send.join();
    let head = String::from_utf8_lossy(&head[..n]).to_string();
    head.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no HTTP status in {head:?}"))
}

#[test]
fn a_huge_line_invalid_utf8_and_5000_idle_connections_each_get_their_error_in_bounded_memory()
-> Result<()> {
    raise_nofile(IDLE as u64 + 1_000)?;
    let port = free_port()?;
    let daemon = Daemon::builder().http_port(port).start()?;
    let pid = daemon.pid();
    timed_status(&daemon)?;
    let rss_before = rss_kib(pid)?;
    let mut rss_peak = rss_before;

    // A 100 MiB line, streamed: answered once the first 64 KiB + 1 byte are in, closed.
    let started = Instant::now();
    let (message, sent) = stream_huge_line(&daemon, 100 * MIB)?;
    let huge_took = started.elapsed();
    assert!(message.contains("request too long"), "{message}");
    assert!(
        message.contains("one JSON object on one line of at most 64 KiB"),
        "{message}"
    );
    assert!(
        sent < 16 * MIB,
        "{sent} bytes of the line went in before the daemon closed"
    );
    let rss_line = rss_kib(pid)?;
    rss_peak = rss_peak.max(rss_line);

    // Invalid UTF-8: an error naming it; the connection answers the next line.
    let stream = UnixStream::connect(&daemon.socket)?;
    (&stream).write_all(b"{\"op\":\"status\",\"x\":\"\xff\xfe\"}\n")?;
    let message = error_line(&stream, STATUS_WITHIN)?;
    assert!(message.contains("invalid UTF-8 at byte 20"), "{message}");
    assert!(message.contains("at most 64 KiB, in UTF-8"), "{message}");
    (&stream).write_all(b"{\"op\":\"status\"}\n")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    assert!(line.contains("\"kind\":\"status\""), "{line}");
    drop(stream);

    // Writes to the HTTP listener: refused without the body being read.
    for (method, path) in [
        ("POST", "/status"),
        ("PUT", "/metrics"),
        ("DELETE", "/status"),
    ] {
        let code = http_write(port, method, path, 100 * MIB, 4 * MIB)?;
        assert_eq!(code, 405, "{method} {path}");
    }
    assert_eq!(http_write(port, "POST", "/register", 100, 100)?, 404);
    let rss_http = rss_kib(pid)?;
    rss_peak = rss_peak.max(rss_http);

    // 5,000 idle connections: the first 1,024 get places, each later one takes the
    // place of the one idle longest, which gets its error at once.
    let started = Instant::now();
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(UnixStream::connect(&daemon.socket)?);
    }
    let opened_in = started.elapsed();
    // `status` with them all open: it takes one more idle one's place, at once.
    let (status_took, status) = timed_status(&daemon)?;
    let rss_idle = rss_kib(pid)?;
    rss_peak = rss_peak.max(rss_idle);
    assert_eq!(status.control.max_connections, CAP as u64);
    let evicted_expected = IDLE - CAP + 1;
    assert_eq!(
        status.control.evicted, evicted_expected as u64,
        "{:?}",
        status.control
    );
    assert_eq!(status.control.refused, 0, "{:?}", status.control);
    assert_eq!(status.control.oversized, 1, "{:?}", status.control);
    assert_eq!(status.control.not_utf8, 1, "{:?}", status.control);

    // Each gets its error: the evicted ones have it now, the rest after the idle
    // timeout (30 s).
    let (mut evicted, mut timed_out) = (0, 0);
    let waiting = Instant::now();
    for stream in &idle {
        let message = error_line(stream, Duration::from_secs(60))?;
        if message.contains("closed while idle") {
            evicted += 1;
        } else if message.contains("no complete request within 30s") {
            timed_out += 1;
        } else {
            bail!("unexpected error for an idle connection: {message}");
        }
        assert!(message.contains("at most 64 KiB"), "{message}");
        assert!(
            closed(stream)?,
            "an idle connection left open after its error"
        );
    }
    let timeout_after = waiting.elapsed();
    assert_eq!(evicted, evicted_expected);
    assert_eq!(timed_out, IDLE - evicted_expected);
    assert!(
        timeout_after >= Duration::from_secs(25),
        "idle connections closed after {timeout_after:?}, before the 30 s timeout"
    );
    drop(idle);

    let (after_took, status) = timed_status(&daemon)?;
    assert_eq!(status.control.timed_out, timed_out as u64);
    let rss_after = rss_kib(pid)?;
    rss_peak = rss_peak.max(rss_after);
    let (code, metrics) = http_get(port, "/metrics")?;
    assert_eq!(code, 200);
    for counter in [
        format!("watchdog_control_connections_evicted_total {evicted}"),
        format!("watchdog_control_connections_timed_out_total {timed_out}"),
        "watchdog_control_requests_oversized_total 1".to_string(),
        "watchdog_control_requests_not_utf8_total 1".to_string(),
        "watchdog_control_connections_refused_total 0".to_string(),
    ] {
        assert!(metrics.contains(&counter), "/metrics lacks {counter:?}");
    }

    eprintln!(
        "figures: RSS before {rss_before} KiB, after the 100 MiB line {rss_line} KiB, after \
         HTTP writes {rss_http} KiB, with {IDLE} idle connections {rss_idle} KiB, after \
         {rss_after} KiB, peak {rss_peak} KiB; 100 MiB line: answered after {:.1} MiB sent, in {huge_took:?}; {IDLE} connections \
         opened in {opened_in:?}; status with them open: {status_took:?}; {evicted} evicted at \
         once, {timed_out} timed out after {timeout_after:?}; status after: {after_took:?}",
        sent as f64 / MIB as f64
    );
    assert!(
        status_took < Duration::from_secs(1),
        "status took {status_took:?} with {IDLE} idle connections"
    );
    assert!(
        rss_peak - rss_before < 10 * 1024,
        "the daemon's RSS grew from {rss_before} KiB to {rss_peak} KiB"
    );
    Ok(())
}

/// When all 1,024 connections are busy with requests (the daemon loop stalled), one
/// more client gets an error line at once and is closed; the busy ones are answered.
#[test]
fn with_every_connection_busy_a_new_client_is_refused_at_once() -> Result<()> {
    raise_nofile(CAP as u64 + 1_000)?;
    let daemon = Daemon::builder().flag("--test-faults").start()?;
    let stall = daemon.request(r#"{"op":"stall","ms":8000}"#)?;
    assert_eq!(stall["ok"]["kind"], "stalling", "{stall}");
    let mut busy = Vec::with_capacity(CAP);
    for _ in 0..CAP {
        let stream = UnixStream::connect(&daemon.socket)?;
        (&stream).write_all(b"{\"op\":\"status\"}\n")?;
        busy.push(stream);
    }
    // Give the daemon time to read every request (each connection then holds its place,
    // busy, until the loop answers); the loop stays stalled for seconds more.
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let newcomer = UnixStream::connect(&daemon.socket)?;
    let message = error_line(&newcomer, Duration::from_secs(2))?;
    let refused_in = started.elapsed();
    assert!(message.contains("busy with 1024 requests"), "{message}");
    assert!(closed(&newcomer)?);
    for stream in &busy {
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        assert!(line.contains("\"kind\":\"status\""), "{line}");
    }
    let (_, status) = timed_status(&daemon)?;
    assert!(status.control.refused >= 1, "{:?}", status.control);
    eprintln!("figures: refused in {refused_in:?} with {CAP} busy connections");
    Ok(())
}

#[test]
fn the_http_listener_serves_reads_only() -> Result<()> {
    let port = free_port()?;
    let daemon = Daemon::builder().http_port(port).start()?;
    for path in [
        "/status",
        "/metrics",
        "/",
        "/page.js",
        "/api/analyses",
        "/api/events",
    ] {
        assert_eq!(daemon.http_get(port, path)?.0, 200, "GET {path}");
        for method in ["POST", "PUT", "PATCH", "DELETE"] {
            assert_eq!(
                http_write(port, method, path, 10, 10)?,
                405,
                "{method} {path}"
            );
        }
    }
    assert_eq!(http_get(port, "/register")?.0, 404);
    for path in ["/status", "/api/analyses", "/api/events"] {
        assert_eq!(http_get(port, path)?.0, 401, "GET {path} without the token");
    }
    drop(daemon);
    Ok(())
}
