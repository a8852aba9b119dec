//! Benchmark (not a test): 100,000 watched processes. A registered root forks a tree of
//! 100,000 idle descendants as fast as the machine allows; meanwhile a `status` request
//! every 10 ms measures how long the daemon's main loop goes without answering. Then:
//! lost events, whether the daemon's tree holds every live descendant (escapes), the
//! time to reach 100,000 watched and the daemon's RSS. Prints Markdown (section 8) and
//! records the figures.
//!
//! 100,000 processes do not fit in the default pid_max (32,768): it is raised for the
//! run and written back at the end, on error, on panic, and on SIGINT/SIGTERM/SIGHUP
//! (see `bench::install_interrupt_cleanup`).

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use watchdog_bench::{
    self as bench, PauseTree, Sysctl, call_within, cpu_seconds, percentile, read_sysctl, rss_mib,
};
use watchdog_tests::{Daemon, LimitOverrides, Reply, Request, Status, client};

/// 100 children of the root, each forking 999: 100 + 99,900 = 100,000 descendants.
/// A tree forks on both cores at once, and no process has more than 999 children.
const SHAPE: [usize; 2] = [100, 999];
const DESCENDANTS: usize = 100_000;
const ANALYSIS: &str = "scale";
const PID_MAX: &str = "/proc/sys/kernel/pid_max";
const THREADS_MAX: &str = "/proc/sys/kernel/threads-max";
/// Room for 100,000 more pids than the machine already uses, whatever else runs.
const WANTED_PID_MAX: u64 = 4_194_304;
/// The tree plus what else runs on the host (other benches, tests).
const WANTED_THREADS_MAX: u64 = DESCENDANTS as u64 + 50_000;
/// How long the daemon gets to watch all 100,000 (the whole bench stays under ~3 min).
const REACH_WITHIN: Duration = Duration::from_secs(90);
/// How often the main loop is probed with a `status` request.
const PROBE_EVERY: Duration = Duration::from_millis(10);
/// A request unanswered this long counts as a daemon that stopped; the bench goes on.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

fn main() -> Result<()> {
    if let Some(helper) = bench::run_helper() {
        return helper;
    }
    bench::install_interrupt_cleanup()?;
    let limits = raise_limits()?;
    let run = run();
    let raised_pid_max = limits.iter().find(|l| l.path == PID_MAX).map(|l| l.raised);
    drop(limits);
    let restored = read_sysctl(PID_MAX)?;
    let run = run?;
    report(&run, raised_pid_max, restored);
    Ok(())
}

/// What one run measured.
struct Run {
    forked: Option<(usize, Duration)>,
    storm: Storm,
    /// Daemon status once the storm is over.
    status: Status,
    idle_rss_mib: f64,
    rss_mib: f64,
    /// Daemon CPU from "go" to the end of the storm, s.
    storm_cpu_s: f64,
    live_descendants: usize,
    /// Unknown when the daemon could not show its tree.
    escapes: Option<usize>,
    dump_tree: Result<Duration, String>,
    killed: usize,
    kill_time: Duration,
}

fn run() -> Result<Run> {
    // No reconcile poll during the run: the figures are the event path's. One analysis
    // of 100,000 processes is far past the default process limit: none here.
    let daemon = Daemon::builder()
        .arg("--poll-interval", "1h")
        .arg("--default-max-processes", "0")
        .start()?;
    bench::on_interrupt_remove(&daemon);
    let idle_rss_mib = rss_mib(daemon.pid())?;
    let mut tree = PauseTree::spawn(&SHAPE, true)?;
    client::call(
        &daemon.socket,
        &Request::Register {
            pid: tree.pid(),
            analysis_id: ANALYSIS.into(),
            limits: LimitOverrides::default(),
            fresh: false,
        },
    )?;
    let cpu_before = cpu_seconds(daemon.pid())?;
    let go = Instant::now();
    tree.go()?;
    let storm = watch_storm(&daemon, &mut tree, go)?;
    let storm_cpu_s = cpu_seconds(daemon.pid())? - cpu_before;
    let forked = match storm.forked {
        Some(forked) => Some(forked),
        // Not forked within the storm's time: a last bounded wait, then report what is.
        None => tree.await_ready(Duration::from_secs(10)).ok(),
    };
    // A daemon that stopped answering is reported with what it last said.
    let status = match status(&daemon) {
        Ok(status) => status,
        Err(err) => storm
            .last
            .clone()
            .with_context(|| format!("no status at all: {err:#}"))?,
    };
    let rss_mib = rss_mib(daemon.pid())?;
    let live = live_descendants(tree.pid())?;
    let (escapes, dump_tree) = match watched_pids(&daemon) {
        Ok((in_tree, took)) => (
            Some(live.iter().filter(|pid| !in_tree.contains(pid)).count()),
            Ok(took),
        ),
        Err(err) => (None, Err(format!("{err:#}"))),
    };
    // The daemon goes first: 100,000 exits are the kernel's and this bench's to handle,
    // not a flood of orphan kills and records for a daemon being measured no more.
    bench::on_interrupt_keep(&daemon);
    drop(daemon);
    let started = Instant::now();
    let killed = tree.kill_and_reap()?;
    let kill_time = started.elapsed();
    Ok(Run {
        forked,
        storm,
        status,
        idle_rss_mib,
        rss_mib,
        storm_cpu_s,
        live_descendants: live.len(),
        escapes,
        dump_tree,
        killed,
        kill_time,
    })
}

/// The storm as the probe saw it.
#[derive(Default)]
struct Storm {
    /// The tree's report: descendants forked, and how long forking took.
    forked: Option<(usize, Duration)>,
    /// From "go" to the daemon's count of watched processes covering the whole tree.
    reached: Option<Duration>,
    /// Round trips of the `status` probes, ms.
    round_trips: Vec<f64>,
    /// When the longest round trip began (after "go") and how many were watched then:
    /// where in the storm the daemon stalled.
    longest_at: (Duration, usize),
    /// Watched processes at the last answered probe.
    last_watched: usize,
    /// The last answer.
    last: Option<Status>,
    /// Why probing stopped early, if the daemon stopped answering.
    unanswered: Option<String>,
}

/// Probes the daemon every 10 ms from "go" until it watches the whole tree and has
/// taken in every fork event, or REACH_WITHIN has passed.
fn watch_storm(daemon: &Daemon, tree: &mut PauseTree, go: Instant) -> Result<Storm> {
    let mut storm = Storm::default();
    loop {
        if storm.forked.is_none() {
            storm.forked = tree.poll_ready()?;
        }
        let asked = Instant::now();
        let status = match call_within(&daemon.socket, &Request::Status, CALL_TIMEOUT) {
            Ok(Reply::Status(status)) => *status,
            Ok(other) => bail!("status answered with {other:?}"),
            Err(err) => {
                storm.unanswered = Some(format!("{err:#}"));
                return Ok(storm);
            }
        };
        let round_trip = asked.elapsed().as_secs_f64() * 1000.0;
        if storm.round_trips.iter().all(|&r| r < round_trip) {
            storm.longest_at = (asked - go, storm.last_watched);
        }
        storm.round_trips.push(round_trip);
        storm.last_watched = status.monitored_count;
        // Until the tree reports, assume it forked all it was asked to.
        let descendants = storm.forked.map_or(DESCENDANTS, |(n, _)| n);
        if storm.reached.is_none() && status.monitored_count > descendants {
            storm.reached = Some(go.elapsed());
        }
        let all_events = status.forks_seen >= descendants as u64;
        storm.last = Some(status);
        if (storm.reached.is_some() && storm.forked.is_some() && all_events)
            || go.elapsed() > REACH_WITHIN
        {
            return Ok(storm);
        }
        std::thread::sleep(PROBE_EVERY);
    }
}

fn status(daemon: &Daemon) -> Result<Status> {
    match call_within(&daemon.socket, &Request::Status, CALL_TIMEOUT)? {
        Reply::Status(status) => Ok(*status),
        other => bail!("status answered with {other:?}"),
    }
}

/// The pids in the daemon's tree of the analysis, and how long `dump-tree` took.
fn watched_pids(daemon: &Daemon) -> Result<(HashSet<u32>, Duration)> {
    let request = Request::DumpTree {
        analysis_id: Some(ANALYSIS.into()),
    };
    let asked = Instant::now();
    let Reply::Tree { processes, .. } = call_within(&daemon.socket, &request, CALL_TIMEOUT)? else {
        bail!("dump-tree answered with something else than a tree");
    };
    let took = asked.elapsed();
    let pids = processes.iter().map(|n| n.pid).collect();
    Ok((pids, took))
}

/// The living descendants of `root` as the kernel has them: every process's parent
/// from /proc, followed down from the root. Zombies are not alive.
fn live_descendants(root: u32) -> Result<HashSet<u32>> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in std::fs::read_dir("/proc").context("/proc is readable")? {
        let Some(pid) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        // A process that exits mid-walk is simply not there.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let mut fields = stat.rsplit(')').next().unwrap_or("").split_whitespace();
        let state = fields.next().unwrap_or("Z");
        let ppid: u32 = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if !matches!(state, "Z" | "X") {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut found = HashSet::new();
    let mut next = vec![root];
    while let Some(pid) = next.pop() {
        for &child in children.get(&pid).into_iter().flatten() {
            if found.insert(child) {
                next.push(child);
            }
        }
    }
    Ok(found)
}

/// Raises pid_max and threads-max where they are below what the run needs. Each
/// original is known to the interrupt clean-up, and has its guard, before it is written.
fn raise_limits() -> Result<Vec<Sysctl>> {
    bench::raise_sysctls(&[
        (PID_MAX, WANTED_PID_MAX, WANTED_PID_MAX),
        (THREADS_MAX, WANTED_THREADS_MAX, WANTED_THREADS_MAX),
    ])
}

fn report(run: &Run, raised_pid_max: Option<u64>, restored_pid_max: u64) {
    let s = &run.status;
    let storm = &run.storm;
    println!("## 8. Scale: 100,000 watched processes\n");
    println!(
        "A registered root forks {} children that fork {} each ({DESCENDANTS} idle descendants, forked as fast as two cores allow) while a `status` request every {} ms probes the daemon's main loop; the reconcile poll is off (1 h). pid_max {} for the run, then {restored_pid_max} again.\n",
        SHAPE[0],
        SHAPE[1],
        PROBE_EVERY.as_millis(),
        raised_pid_max.map_or("unchanged".to_string(), |v| format!("raised to {v}")),
    );
    println!("| figure | value |");
    println!("|---|---|");
    let forked = match run.forked {
        Some((n, took)) => format!("{n} in {:.1} s", took.as_secs_f64()),
        None => "the tree did not report".to_string(),
    };
    println!("| descendants forked | {forked} |");
    let target = run.forked.map_or(DESCENDANTS, |(n, _)| n) + 1;
    let reached = match storm.reached {
        Some(t) => format!("{:.1} s after the first fork", t.as_secs_f64()),
        None => format!(
            "did not reach {target} in {} s ({} watched)",
            REACH_WITHIN.as_secs(),
            storm.last_watched
        ),
    };
    println!("| all {target} watched (root included), by the daemon's count | {reached} |");
    println!(
        "| kernel events taken in: forks, exits, RSS reports | {}, {}, {} |",
        s.forks_seen, s.exits_seen, s.rss_reports
    );
    let events = s.forks_seen + s.exits_seen + s.execs_seen + s.rss_reports;
    println!(
        "| daemon CPU (user + system) during the storm, probes included | {:.1} s ({:.1} µs per kernel event) |",
        run.storm_cpu_s,
        run.storm_cpu_s * 1e6 / events.max(1) as f64
    );
    println!("| lost events (ring buffer full) | {} |", s.lost_events);
    println!(
        "| children the kernel map could not take (map full) | {} |",
        s.watch_map_full
    );
    println!("| resyncs | {} |", s.resyncs);
    let escapes = run
        .escapes
        .map_or("unknown (no tree from the daemon)".into(), |e| {
            e.to_string()
        });
    println!(
        "| live descendants (from /proc) missing from the daemon's tree (escapes) | {escapes} of {} |",
        run.live_descendants
    );
    println!(
        "| daemon RSS idle → with the tree watched | {:.1} → {:.1} MiB |",
        run.idle_rss_mib, run.rss_mib
    );
    let stall = percentile(&storm.round_trips, 100.0);
    println!(
        "| longest the daemon's main loop spent on one input (its own measure, `loop_longest_ms`) | {:.1} ms |",
        s.loop_longest_ms
    );
    println!(
        "| longest `status` round trip during the storm (the loop, then the store's task, which answers the database part) | {stall:.1} ms, asked {:.1} s in with {} watched (median {:.2} ms, {} probes{}) |",
        storm.longest_at.0.as_secs_f64(),
        storm.longest_at.1,
        percentile(&storm.round_trips, 50.0),
        storm.round_trips.len(),
        storm
            .unanswered
            .as_ref()
            .map_or(String::new(), |e| format!("; then no answer: {e}"))
    );
    let dump = match &run.dump_tree {
        Ok(took) => format!("{:.0} ms", took.as_secs_f64() * 1000.0),
        Err(err) => format!("failed: {err}"),
    };
    println!("| one `dump-tree` of the analysis | {dump} |");
    println!(
        "| SIGKILL to the tree's group until all {} are reaped (daemon stopped first) | {:.1} s |",
        run.killed,
        run.kill_time.as_secs_f64()
    );
    println!(
        "\nWhat limits it: the kernel map holds {} entries and the ring buffer {} MiB (about \
         {} events of 64 bytes), so 100,000 forks fit both if the daemon drains the ring as \
         fast as the two cores fork; a slower daemon loses events (counted) and must resync \
         from the map. The daemon times every input its main loop handles: that longest is how \
         late a kill deadline could have been. A `status` probe also waits for the store's \
         task, which formats and writes the process table (100,000 rows) while the tree \
         grows, so its round trip is longer than any loop stall.",
        watchdog_common::MAX_WATCHED,
        watchdog_common::RING_BYTES >> 20,
        watchdog_common::RING_BYTES / 64,
    );
    bench::figure("scale_descendants", run.forked.map_or(0, |(n, _)| n));
    bench::figure("scale_reached", storm.reached.is_some());
    bench::figure("scale_watched", storm.last_watched);
    bench::figure("scale_lost_events", s.lost_events);
    bench::figure("scale_watch_map_full", s.watch_map_full);
    if let Some(escapes) = run.escapes {
        bench::figure("scale_escapes", escapes);
    }
    bench::figure("scale_rss_mib", format!("{:.1}", run.rss_mib));
    bench::figure("scale_stall_ms", format!("{stall:.1}"));
    bench::figure("scale_loop_longest_ms", format!("{:.1}", s.loop_longest_ms));
}
