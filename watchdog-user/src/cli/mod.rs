//! The CLI commands: each is one request over the control socket, printed for people
//! (or as JSON for scripts).

mod exec;
pub use exec::exec;

use std::{path::Path, time::Duration};

use anyhow::{Result, bail};

use crate::{
    api::{
        client::call,
        protocol::{AnalysisView, Reply, Request, TreeNode},
    },
    store::{EventFilter, EventRecord},
    vocab::limits::LimitOverrides,
};

pub fn register(
    socket: &Path,
    pid: u32,
    analysis_id: String,
    limits: LimitOverrides,
) -> Result<()> {
    match call(
        socket,
        &Request::Register {
            pid,
            analysis_id,
            limits,
            fresh: false,
        },
    )? {
        Reply::Registered {
            pid,
            analysis_id,
            watched,
            ..
        } => {
            println!(
                "registered pid {pid} as analysis {analysis_id:?} ({watched} processes watched)"
            );
            Ok(())
        }
        other => unexpected(other),
    }
}

pub fn unregister(socket: &Path, pid: Option<u32>, analysis_id: Option<String>) -> Result<()> {
    match call(socket, &Request::Unregister { pid, analysis_id })? {
        Reply::Unregistered { removed } => {
            println!("unregistered {removed} processes");
            Ok(())
        }
        other => unexpected(other),
    }
}

fn unexpected(reply: Reply) -> Result<()> {
    bail!("the daemon sent an unexpected reply: {reply:?}")
}

pub fn dump_tree(socket: &Path, json: bool, analysis_id: Option<String>) -> Result<()> {
    let Reply::Tree {
        processes,
        analyses,
    } = call(socket, &Request::DumpTree { analysis_id })?
    else {
        bail!("the daemon sent an unexpected reply to dump-tree");
    };
    if json {
        let tree = serde_json::json!({ "analyses": analyses, "processes": processes });
        println!("{}", serde_json::to_string_pretty(&tree)?);
        return Ok(());
    }
    if processes.is_empty() {
        println!("no watched processes");
    }
    for analysis in &analyses {
        print_analysis(analysis);
    }
    for node in &processes {
        print_node(node);
    }
    Ok(())
}

fn size(bytes: u64) -> String {
    bytesize::ByteSize(bytes).display().iec().to_string()
}

fn print_analysis(a: &AnalysisView) {
    let deadline = if a.deadline_in_ms >= 0 {
        format!(
            "deadline in {}",
            humantime::format_duration(Duration::from_secs(a.deadline_in_ms as u64 / 1000))
        )
    } else {
        "deadline passed".to_string()
    };
    let limits: Vec<String> = a
        .limits
        .shown()
        .into_iter()
        .map(|(name, value)| format!("{name} {value}"))
        .collect();
    println!(
        "analysis {} (owner {}): {} processes, {} zombies, {deadline}; limits: {}",
        a.analysis_id,
        user(a.owner_uid),
        a.processes,
        a.zombies,
        limits.join(", "),
    );
}

/// A uid with its user's name, when it has one: `uid 1001 (alice)`.
fn user(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(user)) => format!("uid {uid} ({})", user.name),
        _ => format!("uid {uid}"),
    }
}

/// Indentation stops growing here, so a deep chain stays readable; the depth is then
/// written out.
const MAX_INDENT_DEPTH: u32 = 32;

fn print_node(node: &TreeNode) {
    let age = humantime::format_duration(Duration::from_secs(node.age_ms / 1000));
    let mut marks = String::new();
    if node.orphan {
        marks.push_str("  ORPHAN");
    }
    if node.zombie {
        marks.push_str("  ZOMBIE (exited, not reaped)");
    }
    if let Some(left) = node.grace_left_ms {
        marks.push_str(&format!("  IN GRACE ({}s left)", left.div_ceil(1000)));
    }
    let deeper = if node.depth > MAX_INDENT_DEPTH {
        format!("[depth {}] ", node.depth)
    } else {
        String::new()
    };
    println!(
        "{:indent$}{deeper}{} {}  analysis={}  owner={}  age={}  rss={}{marks}",
        "",
        node.pid,
        node.comm,
        node.analysis_id,
        node.owner_uid,
        age,
        size(node.rss_bytes),
        indent = node.depth.min(MAX_INDENT_DEPTH) as usize * 2
    );
}

pub fn events(socket: &Path, filter: EventFilter, json: bool) -> Result<()> {
    let Reply::Events {
        records,
        database_error,
        next,
    } = call(socket, &Request::Events { filter })?
    else {
        bail!("the daemon sent an unexpected reply to events");
    };
    if let Some(err) = &database_error {
        eprintln!("watchdog-user: warning: {err}; showing only the records in the spool");
    }
    if let Some(next) = &next {
        eprintln!("watchdog-user: older records may follow: events --before {next}");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&records)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<12} {:>7} {:<16} {:<13} {:<20} {:>10} {:>9} {:<16} {:<7}",
        "TIME", "HOST", "PID", "ANALYSIS", "REASON", "OUTCOME", "RSS", "RUNTIME", "COMM", "STORED"
    );
    for EventRecord {
        record: r, spooled, ..
    } in &records
    {
        println!(
            "{:<24} {:<12} {:>7} {:<16} {:<13} {:<20} {:>10} {:>9} {:<16} {:<7}",
            r.time,
            r.host,
            r.pid,
            r.analysis_id,
            r.reason.as_str(),
            r.outcome.as_str(),
            size(r.rss_bytes),
            humantime::format_duration(Duration::from_secs(r.runtime_ms / 1000)).to_string(),
            r.comm,
            if *spooled { "SPOOLED" } else { "db" }
        );
    }
    Ok(())
}

pub fn status(socket: &Path, json: bool) -> Result<()> {
    let Reply::Status(status) = call(socket, &Request::Status)? else {
        bail!("the daemon sent an unexpected reply to status");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    println!("watchdog {} up {}s", status.version, status.uptime_s);
    println!(
        "watched processes: {} in {} analyses",
        status.monitored_count, status.analyses
    );
    let fill =
        status.pinned_analyses.max(status.pinned_roots) * 100 / status.pinned_capacity.max(1);
    println!(
        "pinned state: {} analyses, {} roots of {} each ({fill}% full{})",
        status.pinned_analyses,
        status.pinned_roots,
        status.pinned_capacity,
        if fill >= 80 {
            "; registrations are refused at 100%"
        } else {
            ""
        }
    );
    println!("zombies (exited, not reaped): {}", status.zombies);
    for (analysis_id, zombies) in &status.zombies_by_analysis {
        println!("  {analysis_id}: {zombies}");
    }
    match &status.database.error {
        None => println!(
            "database: {} (spool {} records)",
            status.database.state, status.database.spool_depth
        ),
        Some(err) => println!(
            "database: {}: {err} ({} records spooled in {})",
            status.database.state, status.database.spool_depth, status.database.spool_path
        ),
    }
    if status.database.unspooled > 0 {
        println!(
            "spool: {} records held in memory, not yet spooled: {}",
            status.database.unspooled,
            status
                .database
                .spool_error
                .as_deref()
                .unwrap_or("(no error)")
        );
    }
    if status.records_unqueued > 0 {
        println!(
            "store: {} records the daemon could not hand to its store task (spooled at shutdown)",
            status.records_unqueued
        );
    }
    println!(
        "kernel events: {} forks, {} exits, {} execs; lost {}; watch map full {}; resyncs {}",
        status.forks_seen,
        status.exits_seen,
        status.execs_seen,
        status.lost_events,
        status.watch_map_full,
        status.resyncs
    );
    if !status.kernel_release.is_empty() {
        println!("kernel {}:", status.kernel_release);
    }
    for path in &status.kernel_paths {
        println!("  {}: {} ({})", path.path, path.how, path.detail);
    }
    if status.pinned_state_dropped > 0 {
        println!("pinned state: dropped at start, not trusted (the daemon's log says why)");
    }
    Ok(())
}
