//! Benchmark (not a test): the daemon's main loop while it kills one analysis of 10,000
//! processes at its timeout. Every target's kill record needs what only a live process
//! has (its cmdline, uid and RSS, read from /proc before it is signalled): how long the
//! loop is taken by that, and what a client sees meanwhile, is what this measures.
//!
//! Three runs, each with a fresh daemon, tree and analysis: `loop_longest_ms` is the
//! longest since the daemon started, so a daemon kept across runs would report the
//! first run's kill in every later one. Prints Markdown (section 10) and records the
//! medians as figures. The daemon is `WATCHDOG_BIN`, so two builds can be compared.
//!
//! pid_max and threads-max are raised only when the host could not fit 10,000 more
//! processes, and written back at the end, on error, on panic, and on
//! SIGINT/SIGTERM/SIGHUP (see `bench::install_interrupt_cleanup`).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::Value;
use watchdog_bench::{self as bench, PauseTree, Sysctl, call_within, cpu_seconds, percentile};
use watchdog_tests::{Daemon, LimitOverrides, Reply, Request, sqlite_query, watchdog_bin};

/// The root, 99 children, 100 grandchildren under each: 1 + 99 + 9,900 = 10,000.
const SHAPE: [usize; 2] = [99, 100];
const PROCESSES: usize = 10_000;
const RUNS: usize = 3;
/// From registration: forking and watching 10,000 processes takes a second or two here,
/// and the tree must be watched whole well before the deadline.
const TIMEOUT: Duration = Duration::from_secs(10);
/// SIGTERM ends an idle tree process, but the daemon learns so only from exit events it
/// takes in after the kill's turn: a grace shorter than that turn (over a second for a
/// build that reads /proc on the loop) would add a SIGKILL to every target, and measure
/// a second pass.
const GRACE: Duration = Duration::from_secs(5);
/// How long before the deadline the whole tree must be watched: the run fails otherwise,
/// rather than measure a kill that overlaps the fork storm.
const SETTLED_BEFORE: Duration = Duration::from_secs(1);
/// How often the loop is probed with a `status` request.
const PROBE_EVERY: Duration = Duration::from_millis(10);
/// A request unanswered this long counts as a daemon that stopped.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// From the deadline to every target dead and every record written, at most.
const DONE_WITHIN: Duration = Duration::from_secs(120);
/// The deadline's kill is the only work measured: no reconcile poll (it reads /proc of
/// every watched process on the loop's behalf), no default that expires mid-run, and no
/// process or zombie limit that 10,000 processes, or a dying tree, would cross.
const DAEMON_ARGS: [(&str, &str); 4] = [
    ("--default-timeout", "1h"),
    ("--poll-interval", "1h"),
    ("--default-max-processes", "0"),
    ("--default-max-zombies", "0"),
];
const PID_MAX: &str = "/proc/sys/kernel/pid_max";
const THREADS_MAX: &str = "/proc/sys/kernel/threads-max";
/// Room left for what else forks on the host during a run (other benches, tests).
const HEADROOM: u64 = 10_000;
/// What pid_max is raised to when it must be.
const WANTED_PID_MAX: u64 = 4_194_304;

fn main() -> Result<()> {
    if let Some(helper) = bench::run_helper() {
        return helper;
    }
    bench::install_interrupt_cleanup()?;
    eprintln!("bench-kill: daemon {}", watchdog_bin().display());
    let limits = raise_limits()?;
    let raised: Vec<String> = limits
        .iter()
        .map(|l| {
            format!(
                "{} raised to {} (then {} again)",
                l.path, l.raised, l.original
            )
        })
        .collect();
    let kills = (1..=RUNS).map(kill_once).collect::<Result<Vec<_>>>();
    drop(limits);
    let kills = kills?;
    report(&kills, &raised);
    Ok(())
}

/// What one kill measured; durations from the deadline.
struct Kill {
    /// `loop_longest_ms` in the last answer sent before the deadline.
    loop_before_ms: f64,
    /// `loop_longest_ms` once every record is written.
    loop_after_ms: f64,
    /// The longest time between two `status` answers, from the last one before the
    /// deadline to the end of the kill.
    probe_gap_ms: f64,
    /// `status` answers during the kill.
    probes: usize,
    /// Every target dead and reaped.
    all_dead: Duration,
    reaped: usize,
    /// The daemon counting 10,000 timeout records, none of them waiting for the database.
    records_written: Duration,
    /// Daemon CPU (all its threads) from the deadline to the records written, s.
    cpu_s: f64,
    /// Timeout records of the analysis in the database, and the daemon's count of all
    /// other records (none expected).
    in_database: u64,
    other_records: u64,
}

fn kill_once(run: usize) -> Result<Kill> {
    let daemon = DAEMON_ARGS
        .iter()
        .fold(Daemon::builder(), |builder, (name, value)| {
            builder.arg(name, value)
        })
        .start()?;
    bench::on_interrupt_remove(&daemon);
    let kill = measure(&daemon, &format!("kill10k-{run}"));
    bench::on_interrupt_keep(&daemon);
    if kill.is_ok() {
        // The daemon's log, printed when it stops, is then 10,000 kill records that say
        // nothing the figures do not; a failed run keeps it.
        let _ = std::fs::write(daemon.dir.join("daemon.log"), "");
    }
    drop(daemon);
    let kill = kill.with_context(|| format!("run {run}"))?;
    eprintln!(
        "bench-kill run {run}: loop_longest {:.1} ms before the deadline, {:.1} ms after; \
         probe gap {:.1} ms ({} probes); all {} dead {:.0} ms after the deadline, records \
         written {:.0} ms after; daemon CPU {:.2} s; {} timeout records in the database, {} other",
        kill.loop_before_ms,
        kill.loop_after_ms,
        kill.probe_gap_ms,
        kill.probes,
        kill.reaped,
        ms(kill.all_dead),
        ms(kill.records_written),
        kill.cpu_s,
        kill.in_database,
        kill.other_records,
    );
    Ok(kill)
}

fn measure(daemon: &Daemon, analysis: &str) -> Result<Kill> {
    // Registered before it forks: every process is watched from its fork event, not by
    // a registration walk over 10,000 existing ones, which would be the loop's longest
    // turn before the kill and hide the kill's behind it.
    let mut tree = PauseTree::spawn(&SHAPE, true)?;
    let limits = LimitOverrides {
        timeout_ms: Some(TIMEOUT.as_millis() as u64),
        grace_ms: Some(GRACE.as_millis() as u64),
        ..LimitOverrides::default()
    };
    let register = Request::Register {
        pid: tree.pid(),
        analysis_id: analysis.into(),
        limits,
        fresh: false,
    };
    let sent = Instant::now();
    match call_within(&daemon.socket, &register, CALL_TIMEOUT)? {
        Reply::Registered { .. } => {}
        other => bail!("register answered with {other:?}"),
    }
    // The daemon starts the analysis' clock after the request was sent: an answer
    // received before this was made before the deadline.
    let deadline = sent + TIMEOUT;
    tree.go()?;
    let (forked, _) = tree.await_ready(TIMEOUT)?;
    if forked + 1 != PROCESSES {
        bail!("the tree forked {forked} of {} processes", PROCESSES - 1);
    }
    let probe = Probe::start(daemon.socket.clone());
    loop {
        let last = probe.last()?;
        if last
            .as_ref()
            .is_some_and(|s| s.watched >= PROCESSES as u64 && s.forks_seen >= forked as u64)
        {
            break;
        }
        if Instant::now() + SETTLED_BEFORE > deadline {
            bail!(
                "{} of {PROCESSES} watched {SETTLED_BEFORE:?} before the deadline: raise TIMEOUT",
                last.map_or(0, |s| s.watched)
            );
        }
        std::thread::sleep(PROBE_EVERY);
    }
    // Just before the deadline, so that little else than the kill is counted.
    sleep_until(deadline - Duration::from_millis(50));
    let cpu_before = cpu_seconds(daemon.pid())?;
    sleep_until(deadline);
    let mut reaped = 0;
    let all_dead = loop {
        let (now_reaped, none_left) = tree.reap_exited()?;
        reaped += now_reaped;
        if none_left {
            break deadline.elapsed();
        }
        if deadline.elapsed() > DONE_WITHIN {
            bail!("{reaped} of {PROCESSES} dead {DONE_WITHIN:?} after the deadline");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let (records_written, cpu_s) = loop {
        if let Some(s) = probe.last()?
            && s.answered > deadline
            && s.timeout_kills >= PROCESSES as u64
            && s.spool_depth == 0
        {
            break (
                s.answered - deadline,
                cpu_seconds(daemon.pid())? - cpu_before,
            );
        }
        if deadline.elapsed() > DONE_WITHIN {
            bail!("the records were not written {DONE_WITHIN:?} after the deadline");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let samples = probe.stop()?;
    let after = Sample::parse(&status(&daemon.socket)?, Instant::now())?;
    let before = samples
        .iter()
        .rposition(|s| s.answered < deadline)
        .context("no status answer before the deadline")?;
    let during: Vec<&Sample> = samples[before..]
        .iter()
        .take_while(|s| s.answered <= deadline + records_written)
        .collect();
    let probe_gap_ms = during
        .windows(2)
        .map(|w| ms(w[1].answered - w[0].answered))
        .fold(0.0, f64::max);
    let in_database = sqlite_query(
        &daemon.state_dir().join("watchdog.db"),
        &format!(
            "SELECT count(*) FROM watchdog_events WHERE analysis_id = '{analysis}' AND reason = 'timeout'"
        ),
    )?
    .parse()?;
    Ok(Kill {
        loop_before_ms: samples[before].loop_longest_ms,
        loop_after_ms: after.loop_longest_ms,
        probe_gap_ms,
        probes: during.len() - 1,
        all_dead,
        reaped,
        records_written,
        cpu_s,
        in_database,
        other_records: after.kills_total - after.timeout_kills,
    })
}

fn sleep_until(at: Instant) {
    std::thread::sleep(at.saturating_duration_since(Instant::now()));
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What the bench reads of one `status` answer, and when it arrived.
#[derive(Clone)]
struct Sample {
    answered: Instant,
    loop_longest_ms: f64,
    watched: u64,
    forks_seen: u64,
    kills_total: u64,
    timeout_kills: u64,
    spool_depth: u64,
}

impl Sample {
    /// From the answer as JSON, not the harness' `Status`: the bench runs against other
    /// builds of the daemon than its own, and needs only these fields to be there.
    fn parse(status: &Value, answered: Instant) -> Result<Self> {
        let number = |pointer: &str| {
            status
                .pointer(pointer)
                .and_then(Value::as_f64)
                .with_context(|| format!("status has no number at {pointer}"))
        };
        Ok(Self {
            answered,
            loop_longest_ms: number("/loop_longest_ms")?,
            watched: number("/monitored_count")? as u64,
            forks_seen: number("/forks_seen")? as u64,
            kills_total: number("/kills_total")? as u64,
            // No key until the first timeout record.
            timeout_kills: number("/kills_by_reason/timeout").unwrap_or(0.0) as u64,
            spool_depth: number("/database/spool_depth")? as u64,
        })
    }
}

/// One `status` request, its answer as JSON.
fn status(socket: &Path) -> Result<Value> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(CALL_TIMEOUT))?;
    stream.set_write_timeout(Some(CALL_TIMEOUT))?;
    let mut line = serde_json::to_string(&Request::Status)?;
    line.push('\n');
    (&stream).write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .with_context(|| format!("no answer within {CALL_TIMEOUT:?}"))?;
    let mut answer: Value = serde_json::from_str(&answer)?;
    match answer.get_mut("ok") {
        Some(status) => Ok(status.take()),
        None => Err(anyhow!("status failed: {answer}")),
    }
}

/// A thread asking `status` every PROBE_EVERY, keeping every answer; stopped (and
/// joined) on drop, so that a run ending in an error leaves no prober behind.
struct Probe {
    samples: Arc<Mutex<Vec<Sample>>>,
    failed: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Probe {
    fn start(socket: PathBuf) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (samples, failed, stop) = (samples.clone(), failed.clone(), stop.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let sample = status(&socket).and_then(|s| Sample::parse(&s, Instant::now()));
                    match sample {
                        Ok(sample) => lock(&samples).push(sample),
                        Err(err) => {
                            *lock(&failed) = Some(format!("{err:#}"));
                            return;
                        }
                    }
                    std::thread::sleep(PROBE_EVERY);
                }
            }
        });
        Self {
            samples,
            failed,
            stop,
            thread: Some(thread),
        }
    }

    /// The latest answer; an error once the daemon stopped answering.
    fn last(&self) -> Result<Option<Sample>> {
        if let Some(err) = lock(&self.failed).as_ref() {
            bail!("the status probe stopped: {err}");
        }
        Ok(lock(&self.samples).last().cloned())
    }

    /// Stops the thread; every answer it had.
    fn stop(mut self) -> Result<Vec<Sample>> {
        self.last()?;
        self.join();
        Ok(std::mem::take(&mut *lock(&self.samples)))
    }

    fn join(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.join();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Tasks (processes and threads) on the host now: the 4th field of /proc/loadavg,
/// "running/total".
fn tasks_now() -> Result<u64> {
    let loadavg = std::fs::read_to_string("/proc/loadavg")?;
    let total = loadavg
        .split_whitespace()
        .nth(3)
        .and_then(|f| f.split_once('/'))
        .context("no task count in /proc/loadavg")?
        .1;
    Ok(total.parse()?)
}

/// Raises pid_max and threads-max only where the host's tasks, the tree and some
/// headroom do not fit. Each original is known to the interrupt clean-up, and has its
/// guard, before it is written.
fn raise_limits() -> Result<Vec<Sysctl>> {
    let needed = tasks_now()? + PROCESSES as u64 + HEADROOM;
    bench::raise_sysctls(&[
        (PID_MAX, needed, WANTED_PID_MAX),
        (THREADS_MAX, needed, needed),
    ])
}

fn report(kills: &[Kill], raised: &[String]) {
    println!("## 10. Kill: one analysis of 10,000 processes at its timeout\n");
    println!(
        "A root is registered as one analysis (timeout {} s, grace {} s), then forks {} children of {} each: {PROCESSES} idle processes, root included, each watched from its fork. At the deadline the daemon kills all {PROCESSES} (the SIGTERM ends them) and writes one timeout record each; the bench reaps them (it is their subreaper). A `status` request every {} ms probes the daemon throughout. The reconcile poll is off (1 h), and no process or zombie limit applies. {RUNS} runs, each with a fresh daemon (`loop_longest_ms` is the longest since start), tree and analysis; the median is the middle run's. {}\n",
        TIMEOUT.as_secs(),
        GRACE.as_secs(),
        SHAPE[0],
        SHAPE[1],
        PROBE_EVERY.as_millis(),
        if raised.is_empty() {
            "pid_max and threads-max unchanged.".to_string()
        } else {
            format!("{}.", raised.join(", "))
        },
    );
    print!("| figure |");
    for run in 1..=kills.len() {
        print!(" run {run} |");
    }
    println!(" median |");
    println!("|---|{}---|", "---|".repeat(kills.len()));
    let row = |figure: &str, value: &dyn Fn(&Kill) -> f64, decimals: usize| -> f64 {
        let values: Vec<f64> = kills.iter().map(value).collect();
        let median = percentile(&values, 50.0);
        print!("| {figure} |");
        for v in &values {
            print!(" {v:.decimals$} |");
        }
        println!(" {median:.decimals$} |");
        median
    };
    row(
        "longest loop turn since start, last answer before the deadline (`loop_longest_ms`, ms)",
        &|k| k.loop_before_ms,
        1,
    );
    let loop_ms = row(
        "longest loop turn since start, once the records are written (`loop_longest_ms`, ms)",
        &|k| k.loop_after_ms,
        1,
    );
    print!("| … set during the kill (longer than before the deadline) |");
    for k in kills {
        print!(
            " {} |",
            if k.loop_after_ms > k.loop_before_ms {
                "yes"
            } else {
                "no"
            }
        );
    }
    println!(" |");
    let gap_ms = row(
        "longest gap between two `status` answers, from the last before the deadline to the records written (ms)",
        &|k| k.probe_gap_ms,
        1,
    );
    row("`status` answers in that time", &|k| k.probes as f64, 0);
    let dead_ms = row(
        "deadline → all dead and reaped (ms)",
        &|k| ms(k.all_dead),
        0,
    );
    row(
        "deadline → the daemon counts 10,000 timeout records, none waiting for the database (ms)",
        &|k| ms(k.records_written),
        0,
    );
    row(
        "daemon CPU (all its threads) in that time (s)",
        &|k| k.cpu_s,
        2,
    );
    row("processes reaped", &|k| k.reaped as f64, 0);
    row(
        "timeout records of the analysis in the database",
        &|k| k.in_database as f64,
        0,
    );
    row(
        "other records (any other reason)",
        &|k| k.other_records as f64,
        0,
    );
    println!(
        "\nWhat limits it: a kill record holds what only a live process has, its cmdline, \
         uid and RSS, so each target's are read from /proc before it is signalled: about 3 × \
         {PROCESSES} reads. They are made off the daemon's loop, by a blocking task that \
         reads each target and then sends its SIGTERM through its pidfd; the loop's \
         own turns are the deadline's (starting the kill of {PROCESSES} targets) and those \
         that take the descriptions and exits back. `loop_longest_ms` is the daemon's own \
         measure of the longest of them when the kill set it. The probe's gap also holds the \
         store's task, which answers the database part of `status` while it writes the \
         {PROCESSES} records."
    );
    bench::figure("kill10k_loop_longest_ms", format!("{loop_ms:.1}"));
    bench::figure("kill10k_probe_gap_ms", format!("{gap_ms:.1}"));
    bench::figure("kill10k_all_dead_ms", format!("{dead_ms:.0}"));
}
