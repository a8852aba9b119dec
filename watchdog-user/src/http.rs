//! `GET /status` (JSON) and `GET /metrics` (Prometheus text) over HTTP. Both ask the
//! daemon loop through the same typed requests as the control socket.

use std::{fmt::Write as _, net::SocketAddr};

use anyhow::{Context as _, Result};
use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response as HttpResponse},
    routing::get,
};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};

use crate::{
    access::Peer,
    control::Call,
    ingest::LATENCY,
    protocol::{Reply, Request, Response, Status},
};

/// Binds now, so a taken port fails the start instead of failing later, silently.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen for HTTP on {addr}: pass --http with a free HOST:PORT, or --http none"
        )
    })
}

/// Serves until the listener fails (the daemon's supervisor reports why). Read-only: two
/// GET routes (HEAD too), any other method is 405 and any other path 404; no handler
/// takes a body, so none is ever buffered.
pub async fn serve(listener: TcpListener, calls: mpsc::Sender<Call>) -> Result<()> {
    let app = Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(calls);
    axum::serve(listener, app)
        .await
        .context("the HTTP listener stopped")
}

async fn fetch_status(calls: &mpsc::Sender<Call>) -> Result<Status, String> {
    let (tx, rx) = oneshot::channel();
    calls
        .send((Request::Status, Peer::http(), tx))
        .await
        .map_err(|_| "the daemon is stopping".to_string())?;
    match rx.await {
        Ok(Response::Ok(Reply::Status(status))) => Ok(*status),
        Ok(Response::Error(err)) => Err(err),
        _ => Err("no status from the daemon".into()),
    }
}

async fn status(State(calls): State<mpsc::Sender<Call>>) -> HttpResponse {
    match fetch_status(&calls).await {
        Ok(status) => Json(status).into_response(),
        Err(err) => (StatusCode::SERVICE_UNAVAILABLE, err).into_response(),
    }
}

async fn metrics(State(calls): State<mpsc::Sender<Call>>) -> HttpResponse {
    match fetch_status(&calls).await {
        Ok(status) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            prometheus_text(&status),
        )
            .into_response(),
        Err(err) => (StatusCode::SERVICE_UNAVAILABLE, err).into_response(),
    }
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

fn one(value: impl Into<f64>) -> Vec<(String, f64)> {
    vec![(String::new(), value.into())]
}

/// The Prometheus text exposition format (version 0.0.4).
pub fn prometheus_text(s: &Status) -> String {
    let mut out = String::new();
    metric(
        &mut out,
        "watchdog_watched_processes",
        "gauge",
        "Processes watched now.",
        &one(s.monitored_count as f64),
    );
    metric(
        &mut out,
        "watchdog_analyses",
        "gauge",
        "Analyses watched now.",
        &one(s.analyses as f64),
    );
    metric(
        &mut out,
        "watchdog_processes_in_grace",
        "gauge",
        "Processes signalled and not yet gone.",
        &one(s.grace_count as f64),
    );
    let by_reason: Vec<(String, f64)> = s
        .kills_by_reason
        .iter()
        .map(|(reason, n)| (format!("{{reason=\"{reason}\"}}"), *n as f64))
        .collect();
    metric(
        &mut out,
        "watchdog_kills_total",
        "counter",
        "Processes killed (or recorded) since start, by reason.",
        &by_reason,
    );
    metric(
        &mut out,
        "watchdog_lost_events_total",
        "counter",
        "Kernel events lost: ring buffer full, or a child the watched map had no room for.",
        &one((s.lost_events + s.watch_map_full) as f64),
    );
    metric(
        &mut out,
        "watchdog_loop_longest_seconds",
        "gauge",
        "The longest the daemon loop spent on one input since start.",
        &one(s.loop_longest_ms / 1000.0),
    );
    metric(
        &mut out,
        "watchdog_ring_buffer_drops_total",
        "counter",
        "Events the kernel could not put in the ring buffer.",
        &one(s.lost_events as f64),
    );
    metric(
        &mut out,
        "watchdog_pinned_state_dropped_total",
        "counter",
        "Pinned state found untrustworthy at start (another layout, or not the maps the attached programs use), dropped and rebuilt.",
        &one(s.pinned_state_dropped as f64),
    );
    metric(
        &mut out,
        "watchdog_untracked_forks_total",
        "counter",
        "Children the kernel's watched map could not take; the daemon followed them itself.",
        &one(s.faults.untracked_forks as f64),
    );
    metric(
        &mut out,
        "watchdog_pidfd_failures_total",
        "counter",
        "Pidfds that could not be opened (e.g. out of descriptors).",
        &one(s.faults.pidfd_failures as f64),
    );
    metric(
        &mut out,
        "watchdog_launchers_watched",
        "gauge",
        "Launchers of registered roots watched now.",
        &one(s.faults.launchers_watched as f64),
    );
    let program_errors: Vec<(String, f64)> = s
        .faults
        .program_errors
        .iter()
        .filter_map(|(key, n)| {
            let (program, kind) = key.split_once('/')?;
            Some((
                format!("{{program=\"{program}\",kind=\"{kind}\"}}"),
                *n as f64,
            ))
        })
        .collect();
    metric(
        &mut out,
        "watchdog_kernel_program_errors_total",
        "counter",
        "Failures inside the kernel programs, by program and kind (read, map_update).",
        &program_errors,
    );
    metric(
        &mut out,
        "watchdog_resyncs_total",
        "counter",
        "Tree rebuilds after lost events.",
        &one(s.resyncs as f64),
    );
    metric(
        &mut out,
        "watchdog_db_spool_depth",
        "gauge",
        "Kill records waiting for the database.",
        &one(s.database.spool_depth as f64),
    );
    metric(
        &mut out,
        "watchdog_db_unspooled",
        "gauge",
        "Kill records held in memory because the spool could not be written (a full disk?); \
         tried again every second.",
        &one(s.database.unspooled as f64),
    );
    metric(
        &mut out,
        "watchdog_spool_records_total",
        "counter",
        "Kill records appended to the spool since start.",
        &one(s.database.spooled_total as f64),
    );
    metric(
        &mut out,
        "watchdog_spool_fsyncs_total",
        "counter",
        "Spool fsyncs since start (records arriving together share one).",
        &one(s.database.spool_fsyncs as f64),
    );
    metric(
        &mut out,
        "watchdog_records_unqueued_total",
        "counter",
        "Kill records the daemon loop could not hand to its store task (stopped); held and \
         spooled at shutdown.",
        &one(s.records_unqueued as f64),
    );
    metric(
        &mut out,
        "watchdog_db_rejected_total",
        "counter",
        "Kill records the database refused for good, set aside in <spool>.rejected.",
        &one(s.database.rejected as f64),
    );
    metric(
        &mut out,
        "watchdog_control_connections",
        "gauge",
        "Control socket connections open now.",
        &one(s.control.connections as f64),
    );
    metric(
        &mut out,
        "watchdog_control_connections_max",
        "gauge",
        "The most control socket connections served at once.",
        &one(s.control.max_connections as f64),
    );
    metric(
        &mut out,
        "watchdog_control_connections_evicted_total",
        "counter",
        "Idle control socket connections closed (with an error line) to make room for a new client.",
        &one(s.control.evicted as f64),
    );
    metric(
        &mut out,
        "watchdog_control_connections_refused_total",
        "counter",
        "Control socket clients refused (an error line, then closed): the most were open, all busy.",
        &one(s.control.refused as f64),
    );
    metric(
        &mut out,
        "watchdog_control_requests_oversized_total",
        "counter",
        "Control request lines over 64 KiB: answered with an error, the connection closed unread.",
        &one(s.control.oversized as f64),
    );
    metric(
        &mut out,
        "watchdog_control_connections_timed_out_total",
        "counter",
        "Control socket connections closed after 30 s without a complete request (or unread answer).",
        &one(s.control.timed_out as f64),
    );
    metric(
        &mut out,
        "watchdog_control_requests_not_utf8_total",
        "counter",
        "Control request lines that were not UTF-8 (answered with an error).",
        &one(s.control.not_utf8 as f64),
    );
    metric(
        &mut out,
        "watchdog_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
        &one(s.uptime_s as f64),
    );
    let _ = writeln!(
        out,
        "# HELP watchdog_event_latency_seconds From the kernel event to the daemon reading it."
    );
    let _ = writeln!(out, "# TYPE watchdog_event_latency_seconds histogram");
    let (buckets, count, sum) = LATENCY.snapshot();
    for (le, n) in buckets {
        let _ = writeln!(
            out,
            "watchdog_event_latency_seconds_bucket{{le=\"{le}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "watchdog_event_latency_seconds_bucket{{le=\"+Inf\"}} {count}"
    );
    let _ = writeln!(out, "watchdog_event_latency_seconds_sum {sum}");
    let _ = writeln!(out, "watchdog_event_latency_seconds_count {count}");
    out
}
