//! Benchmark (not a test): how long registering one process takes, measured as the
//! round trip of the `register` request on the control socket, on a quiet host and on
//! a host running 2,000 extra unrelated processes, for a process alone and for a root
//! that already has 20 descendants (the daemon must find and watch them too).
//! Prints Markdown (section 7) and records the figures.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use watchdog_bench::{self as bench, PauseTree, percentile};
use watchdog_tests::{Daemon, LimitOverrides, Reply, Request, client};

/// Unrelated idle processes added to the host.
const CROWD: usize = 2_000;
/// A root with 4 children of 4 children each: 20 descendants, two levels deep.
const TREE: [usize; 2] = [4, 4];
const QUIET_RUNS: usize = 100;
const PLAIN_RUNS: usize = 300;
const TREE_RUNS: usize = 100;
/// Forking even the crowd takes well under a second; this only bounds a broken run.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// Round trips of one kind of registration, µs, and the host it ran on.
struct Row {
    what: String,
    /// Median over the runs.
    host_processes: usize,
    micros: Vec<f64>,
}

fn main() -> Result<()> {
    if let Some(helper) = bench::run_helper() {
        return helper;
    }
    bench::install_interrupt_cleanup()?;
    // The reconcile poll must not land inside a measured round trip.
    let daemon = Daemon::builder().arg("--poll-interval", "1h").start()?;
    bench::on_interrupt_remove(&daemon);
    let quiet = measure(&daemon, &[], QUIET_RUNS, "quiet", "one process, quiet host")?;
    let crowd = PauseTree::ready(&[CROWD], READY_WITHIN)?;
    let plain = measure(
        &daemon,
        &[],
        PLAIN_RUNS,
        "plain",
        &format!("one process, {CROWD} extra idle processes"),
    )?;
    let tree = measure(
        &daemon,
        &TREE,
        TREE_RUNS,
        "tree",
        &format!("root with 20 descendants (4 × 4), {CROWD} extra idle processes"),
    )?;
    drop(crowd);
    report(&quiet, &plain, &tree);
    Ok(())
}

/// `runs` registrations of fresh trees of `shape` (`[]`: a lone process), each under a
/// new analysis id, unregistered and killed after its round trip was timed.
fn measure(daemon: &Daemon, shape: &[usize], runs: usize, tag: &str, what: &str) -> Result<Row> {
    let expected_watched = 1 + descendants(shape);
    let mut micros = Vec::with_capacity(runs);
    // Sampled at every run: other work on a shared machine changes it.
    let mut host_processes = Vec::with_capacity(runs);
    for i in 0..runs {
        let target = PauseTree::ready(shape, READY_WITHIN)?;
        host_processes.push(count_processes() as f64);
        let analysis_id = format!("{tag}-{i}");
        let register = Request::Register {
            pid: target.pid(),
            analysis_id: analysis_id.clone(),
            limits: LimitOverrides::default(),
            // As `register --pid` does: the daemon looks for existing descendants.
            fresh: false,
        };
        let started = Instant::now();
        let reply = client::call(&daemon.socket, &register)?;
        micros.push(started.elapsed().as_secs_f64() * 1e6);
        match reply {
            Reply::Registered { watched, .. } if watched == expected_watched => {}
            other => bail!(
                "registering {analysis_id}: expected {expected_watched} watched, got {other:?}"
            ),
        }
        // Unregistered before it dies: its exit must not become a kill or orphan record.
        let unregister = Request::Unregister {
            pid: None,
            analysis_id: Some(analysis_id),
        };
        client::call(&daemon.socket, &unregister)?;
        drop(target);
    }
    Ok(Row {
        what: what.to_string(),
        host_processes: percentile(&host_processes, 50.0) as usize,
        micros,
    })
}

/// Processes below the root of a tree of this shape.
fn descendants(shape: &[usize]) -> usize {
    let mut level = 1;
    shape
        .iter()
        .map(|n| {
            level *= n;
            level
        })
        .sum()
}

/// Processes on the host now (what a /proc scan has to read).
fn count_processes() -> usize {
    std::fs::read_dir("/proc").map_or(0, |d| {
        d.filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
            .count()
    })
}

fn report(quiet: &Row, plain: &Row, tree: &Row) {
    println!("## 7. Registration\n");
    println!(
        "Round trip of one `register` request on the control socket (connect, request, the daemon's answer), µs, for a process started just before; each a new analysis, unregistered and killed afterwards. The daemon's reconcile poll is off (1 h).\n"
    );
    println!("| process registered | host processes (median) | median | p99 | min | max | runs |");
    println!("|---|---|---|---|---|---|---|");
    for row in [quiet, plain, tree] {
        let p = |q| percentile(&row.micros, q);
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} |",
            row.what,
            row.host_processes,
            p(50.0),
            p(99.0),
            p(0.0),
            p(100.0),
            row.micros.len()
        );
    }
    let (q, m, t) = (
        percentile(&quiet.micros, 50.0),
        percentile(&plain.micros, 50.0),
        percentile(&tree.micros, 50.0),
    );
    let extra_hosts = plain
        .host_processes
        .saturating_sub(quiet.host_processes)
        .max(1);
    let per_host_process = (m - q) / extra_hosts as f64;
    let per_descendant = (t - m) / descendants(&TREE) as f64;
    println!(
        "\nWhat limits it: a registration is a socket round trip and JSON both ways, reading \
         the root's /proc entry, putting it in the kernel map with its analysis, and finding \
         and watching the descendants it already has. Measured here: each process elsewhere \
         on the host adds {per_host_process:.2} µs to a registration ({m:.0} µs with {CROWD} \
         extra, {q:.0} µs without), and each existing descendant {per_descendant:.0} µs \
         ({t:.0} µs for a root with 20). {}",
        if per_host_process > 1.0 {
            "The cost follows the host's process count, not the analysis: finding the \
             descendants reads every process on the host, once per level of the tree."
        } else {
            "The cost does not follow the host's process count: the daemon finds the \
             descendants without reading every process on the host."
        }
    );
    bench::figure("register_quiet_median_us", format!("{q:.0}"));
    bench::figure("register_median_us", format!("{m:.0}"));
    bench::figure(
        "register_p99_us",
        format!("{:.0}", percentile(&plain.micros, 99.0)),
    );
    bench::figure("register_tree_median_us", format!("{t:.0}"));
}
