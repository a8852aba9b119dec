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

/// Metrics of one unlabelled sample each, written in the order given:
/// (name, type, help, value).
fn single(out: &mut String, metrics: &[(&str, &str, &str, f64)]) {
    for &(name, kind, help, value) in metrics {
        metric(out, name, kind, help, &one(value));
    }
}

/// The Prometheus text exposition format (version 0.0.4).
pub fn prometheus_text(s: &Status) -> String {
    let mut out = String::new();
    single(
        &mut out,
        &[
            (
                "watchdog_watched_processes",
                "gauge",
                "Processes watched now.",
                s.monitored_count as f64,
            ),
            (
                "watchdog_analyses",
                "gauge",
                "Analyses watched now.",
                s.analyses as f64,
            ),
            (
                "watchdog_processes_in_grace",
                "gauge",
                "Processes signalled and not yet gone.",
                s.grace_count as f64,
            ),
            (
                "watchdog_zombies",
                "gauge",
                "Exited processes of analyses that their watched parent has not reaped yet.",
                s.zombies as f64,
            ),
        ],
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
    single(
        &mut out,
        &[
            (
                "watchdog_lost_events_total",
                "counter",
                "Kernel events lost: ring buffer full, or a child the watched map had no room for.",
                (s.lost_events + s.watch_map_full) as f64,
            ),
            (
                "watchdog_loop_longest_seconds",
                "gauge",
                "The longest the daemon loop spent on one input since start.",
                s.loop_longest_ms / 1000.0,
            ),
            (
                "watchdog_ring_buffer_drops_total",
                "counter",
                "Events the kernel could not put in the ring buffer.",
                s.lost_events as f64,
            ),
            (
                "watchdog_pinned_state_dropped_total",
                "counter",
                "Pinned state found untrustworthy at start (another layout, or not the maps the attached programs use), dropped and rebuilt.",
                s.pinned_state_dropped as f64,
            ),
            (
                "watchdog_untracked_forks_total",
                "counter",
                "Children the kernel's watched map could not take; the daemon followed them itself.",
                s.faults.untracked_forks as f64,
            ),
            (
                "watchdog_pidfd_failures_total",
                "counter",
                "Pidfds that could not be opened (e.g. out of descriptors).",
                s.faults.pidfd_failures as f64,
            ),
            (
                "watchdog_launchers_watched",
                "gauge",
                "Launchers of registered roots watched now.",
                s.faults.launchers_watched as f64,
            ),
        ],
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
    single(
        &mut out,
        &[
            (
                "watchdog_resyncs_total",
                "counter",
                "Tree rebuilds after lost events.",
                s.resyncs as f64,
            ),
            (
                "watchdog_db_spool_depth",
                "gauge",
                "Kill records waiting for the database.",
                s.database.spool_depth as f64,
            ),
            (
                "watchdog_db_unspooled",
                "gauge",
                "Kill records held in memory because the spool could not be written (a full disk?); \
         tried again every second.",
                s.database.unspooled as f64,
            ),
            (
                "watchdog_spool_records_total",
                "counter",
                "Kill records appended to the spool since start.",
                s.database.spooled_total as f64,
            ),
            (
                "watchdog_spool_fsyncs_total",
                "counter",
                "Spool fsyncs since start (records arriving together share one).",
                s.database.spool_fsyncs as f64,
            ),
            (
                "watchdog_records_unqueued_total",
                "counter",
                "Kill records the daemon loop could not hand to its store task (stopped); held and \
         spooled at shutdown.",
                s.records_unqueued as f64,
            ),
            (
                "watchdog_db_rejected_total",
                "counter",
                "Kill records the database refused for good, set aside in <spool>.rejected.",
                s.database.rejected as f64,
            ),
            (
                "watchdog_control_connections",
                "gauge",
                "Control socket connections open now.",
                s.control.connections as f64,
            ),
            (
                "watchdog_control_connections_max",
                "gauge",
                "The most control socket connections served at once.",
                s.control.max_connections as f64,
            ),
            (
                "watchdog_control_connections_evicted_total",
                "counter",
                "Idle control socket connections closed (with an error line) to make room for a new client.",
                s.control.evicted as f64,
            ),
            (
                "watchdog_control_connections_refused_total",
                "counter",
                "Control socket clients refused (an error line, then closed): the most were open, all busy.",
                s.control.refused as f64,
            ),
            (
                "watchdog_control_requests_oversized_total",
                "counter",
                "Control request lines over 64 KiB: answered with an error, the connection closed unread.",
                s.control.oversized as f64,
            ),
            (
                "watchdog_control_connections_timed_out_total",
                "counter",
                "Control socket connections closed after 30 s without a complete request (or unread answer).",
                s.control.timed_out as f64,
            ),
            (
                "watchdog_control_requests_not_utf8_total",
                "counter",
                "Control request lines that were not UTF-8 (answered with an error).",
                s.control.not_utf8 as f64,
            ),
            (
                "watchdog_uptime_seconds",
                "gauge",
                "Seconds since the daemon started.",
                s.uptime_s as f64,
            ),
        ],
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
