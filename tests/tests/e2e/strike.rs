//! The kernel strikes first: a memory kill's SIGTERM sent by the programs themselves,
//! at the crossing, also while no daemon runs, and recorded exactly once.

use std::{os::unix::process::ExitStatusExt, time::Duration};

use anyhow::{Result, bail};
use nix::sys::signal::Signal;
use watchdog_tests::{
    Daemon, EventRecord, GROWER, Outcome, Reason, Workload, signal_names, time_of,
};

const LIMIT: u64 = 200 << 20;

/// Grows 1 MiB at a time until its SIGTERM, which it notes with its RSS then (from
/// /proc/self/statm, in its handler) and otherwise ignores.
const HOG_NOTING_SIGTERM: &str = r#"
import os, signal, sys, time
termed = False
def noted(signum, frame):
    global termed
    termed = True
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    print(f"sigterm {rss}", flush=True)
signal.signal(signal.SIGTERM, noted)
sys.stdin.readline()
hold = []
while not termed:
    hold.append(b"x" * (1 << 20))
time.sleep(600)
"#;

/// The one record of `pid`, once the daemon has it, checked to be the kernel's memory
/// kill.
fn the_kernels_memory_kill(daemon: &Daemon, pid: u32) -> Result<EventRecord> {
    let records = daemon.await_records_for(&[pid])?;
    let [record] = records.as_slice() else {
        bail!("one record for {pid}: {records:#?}");
    };
    let r = &record.record;
    assert_eq!((r.reason, r.limit), (Reason::Memory, Some(LIMIT)), "{r:#?}");
    assert_eq!(r.signals[0].signal, "SIGTERM");
    assert_eq!(r.signals[0].by.as_deref(), Some("kernel"), "{r:#?}");
    assert!(
        r.rss_bytes > LIMIT && (r.rss_bytes as f64) <= LIMIT as f64 * 1.01,
        "the kernel's SIGTERM at the crossing: RSS {} for a limit of {LIMIT}",
        r.rss_bytes
    );
    assert!(
        r.cmdline.contains("python"),
        "its command line, read by the kernel if need be: {r:#?}"
    );
    Ok(record.clone())
}

#[test]
fn a_memory_hog_gets_its_sigterm_from_the_kernel_at_the_crossing_and_its_sigkill_after_the_grace()
-> Result<()> {
    // The poll an hour away: what signals is the kernel, or the daemon hearing of it.
    let daemon = Daemon::builder().arg("--poll-interval", "1h").start()?;
    let mut hog = Workload::python(HOG_NOTING_SIGTERM, &[])?;
    daemon.register_with(hog.pid(), "hog", &["--memory", "200MiB", "--grace", "1s"])?;
    hog.send("go")?;
    let noted = hog.read_line()?;
    let handled_rss: u64 = noted
        .strip_prefix("sigterm ")
        .unwrap_or_else(|| panic!("the hog's note of its SIGTERM: {noted:?}"))
        .parse()?;
    assert_eq!(
        hog.await_death()?.signal(),
        Some(libc::SIGKILL),
        "SIGKILLed after the grace"
    );
    let record = the_kernels_memory_kill(&daemon, hog.pid())?.record;
    assert_eq!(signal_names(&record), ["SIGTERM", "SIGKILL"]);
    assert_eq!(record.outcome, Outcome::Killed);
    assert_eq!(record.signals[1].by, None, "the SIGKILL is the daemon's");
    let grace = time_of(&record.signals[1].at).duration_since(time_of(&record.signals[0].at))?;
    assert!(
        grace >= Duration::from_secs(1),
        "the grace runs from the kernel's SIGTERM: {grace:?}"
    );
    let status = daemon.status()?;
    eprintln!(
        "figures: kernel SIGTERM at {:.4}x the limit, handled at {:.4}x, SIGKILL {grace:?} later",
        record.rss_bytes as f64 / LIMIT as f64,
        handled_rss as f64 / LIMIT as f64
    );
    assert_eq!(status.kernel_signals, 1);
    let path = status
        .kernel_paths
        .iter()
        .find(|p| p.path == "memory_first_signal");
    assert_eq!(path.map(|p| p.how.as_str()), Some("kernel"), "{path:?}");
    Ok(())
}

#[test]
fn with_kernel_signals_off_the_daemon_sends_the_sigterm() -> Result<()> {
    let daemon = Daemon::builder().arg("--kernel-signals", "false").start()?;
    let mut work = Workload::python(GROWER, &[])?;
    daemon.register_with(work.pid(), "m", &["--memory", "200MiB"])?;
    work.send("go")?;
    assert_eq!(work.await_death()?.signal(), Some(libc::SIGTERM));
    let record = daemon.await_record_for(work.pid())?.record;
    assert_eq!(record.reason, Reason::Memory);
    assert_eq!(record.signals[0].by, None, "{record:#?}");
    let status = daemon.status()?;
    assert_eq!(status.kernel_signals, 0);
    let path = status
        .kernel_paths
        .iter()
        .find(|p| p.path == "memory_first_signal");
    assert_eq!(path.map(|p| p.how.as_str()), Some("daemon"), "{path:?}");
    Ok(())
}

/// A hog that dies of its SIGTERM while `pause` holds the daemon (stopped or dead),
/// and whose kill the daemon then records exactly once, also across a restart after.
fn a_hog_dies_of_the_kernels_sigterm_while(
    daemon: &mut Daemon,
    pause: impl FnOnce(&mut Daemon) -> Result<()>,
    resume: impl FnOnce(&mut Daemon) -> Result<()>,
) -> Result<()> {
    let mut work = Workload::python(GROWER, &[])?;
    daemon.register_with(work.pid(), "away", &["--memory", "200MiB"])?;
    pause(daemon)?;
    let died = work.send("go").and_then(|()| work.await_death());
    resume(daemon)?;
    assert_eq!(
        died?.signal(),
        Some(libc::SIGTERM),
        "stopped by the kernel while no daemon could act"
    );
    let record = the_kernels_memory_kill(daemon, work.pid())?.record;
    assert_eq!(record.outcome, Outcome::ExitedAfterSigterm);
    assert_eq!(signal_names(&record), ["SIGTERM"]);
    daemon.restart()?;
    let again = daemon.events_of("away")?;
    assert_eq!(
        again.len(),
        1,
        "recorded once, also after a restart: {again:#?}"
    );
    Ok(())
}

#[test]
fn with_the_daemon_stopped_a_memory_hog_is_stopped_by_the_kernel_and_recorded_once_after_sigcont()
-> Result<()> {
    let mut daemon = Daemon::start()?;
    a_hog_dies_of_the_kernels_sigterm_while(
        &mut daemon,
        |d| d.signal(Signal::SIGSTOP),
        |d| d.signal(Signal::SIGCONT),
    )
}

#[test]
fn with_the_daemon_dead_a_memory_hog_is_stopped_by_the_kernel_and_recorded_once_by_the_next()
-> Result<()> {
    let mut daemon = Daemon::start()?;
    a_hog_dies_of_the_kernels_sigterm_while(&mut daemon, Daemon::crash, Daemon::start_again)
}
