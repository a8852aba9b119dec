//! `GET /status` (JSON), `GET /metrics` (Prometheus text) and the live page (`GET /`,
//! its script, and the JSON it polls: `/api/analyses`, `/api/events`) over HTTP. All
//! ask the daemon loop through the same typed requests as the control socket.
//!
//! What names processes, users and analyses (`/status` and the page's JSON) is served
//! only to a request bearing the token in the state directory's root-only token file;
//! `/metrics` (aggregate series only) and the page's static HTML and script are served
//! to anyone who can connect.

use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::{Context as _, Result};
use axum::{
    Json, Router,
    extract::{Request as HttpRequest, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response as HttpResponse},
    routing::get,
};
use serde::Serialize;
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};

use crate::{
    api::{
        control::Call,
        overview::Overview,
        protocol::{Reply, Request, Response, Status},
    },
    kernel::ingest::{LATENCY, LatencySnapshot},
    os::private::same_secret,
    store::{EventFilter, EventRecord},
    vocab::peer::Peer,
};

/// The live page and its script, built into the binary: no build step, and nothing
/// fetched from anywhere but this listener.
const PAGE_HTML: &str = include_str!("page/index.html");
const PAGE_SCRIPT: &str = include_str!("page/page.js");

/// The page's own policy: its script and JSON from this listener only, nothing else
/// loaded, so a process name shown on it can never run or fetch anything.
const PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; connect-src 'self'; \
    style-src 'unsafe-inline'; img-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// Kill records `/api/events` passes to the page: the newest.
pub const PAGE_EVENTS: usize = 50;

/// Binds now, so a taken port fails the start instead of failing later, silently.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen for HTTP on {addr}: pass --http with a free HOST:PORT, or --http none"
        )
    })
}

/// Serves until the listener fails (the daemon's supervisor reports why). Read-only:
/// GET routes only (HEAD too), any other method is 405 and any other path 404; no
/// handler takes a body, so none is ever buffered.
pub async fn serve(
    listener: TcpListener,
    calls: mpsc::Sender<Call>,
    access: TokenCheck,
) -> Result<()> {
    // On each GET alone: a write to these paths is 405 like any other, token or not.
    let token = || middleware::from_fn_with_state(access.clone(), require_token);
    let app = Router::new()
        .route("/status", get(status).route_layer(token()))
        .route("/api/analyses", get(api_analyses).route_layer(token()))
        .route("/api/events", get(api_events).route_layer(token()))
        .route("/metrics", get(metrics))
        .route("/", get(page))
        .route("/page.js", get(page_script))
        .with_state(calls);
    axum::serve(listener, app)
        .await
        .context("the HTTP listener stopped")
}

/// The token a request must bear (`Authorization: Bearer TOKEN`) to be told about
/// processes, and the file it is read from (for the refusal's message).
#[derive(Clone)]
pub struct TokenCheck(Arc<(String, PathBuf)>);

impl TokenCheck {
    pub fn new(token: String, file: PathBuf) -> Self {
        Self(Arc::new((token, file)))
    }
}

/// Passes a request bearing the token on; any other gets 401 and the one line that
/// says how to get in.
async fn require_token(
    State(access): State<TokenCheck>,
    request: HttpRequest,
    next: Next,
) -> HttpResponse {
    let (token, file) = &*access.0;
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    if presented.is_some_and(|p| same_secret(p.trim().as_bytes(), token.as_bytes())) {
        return next.run(request).await;
    }
    let refusal = format!(
        "{} names processes and their command lines: send `Authorization: Bearer TOKEN`, \
         TOKEN being the contents of {} (readable by root only); /metrics needs none",
        request.uri().path(),
        file.display()
    );
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        refusal,
    )
        .into_response()
}

/// Asks the daemon loop, as a reader without credentials.
async fn ask(calls: &mpsc::Sender<Call>, request: Request) -> Result<Reply, String> {
    let (tx, rx) = oneshot::channel();
    calls
        .send((request, Peer::http(), tx))
        .await
        .map_err(|_| "the daemon is stopping".to_string())?;
    match rx.await {
        Ok(Response::Ok(reply)) => Ok(reply),
        // Every error these reads can meet is the daemon's state (unavailable, or
        // internal), all said as 503: the kind adds nothing a status code would.
        Ok(Response::Error { error, .. }) => Err(error),
        Err(_) => Err("the daemon is stopping".into()),
    }
}

async fn fetch_status(calls: &mpsc::Sender<Call>) -> Result<Status, String> {
    match ask(calls, Request::Status).await? {
        Reply::Status(status) => Ok(*status),
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

async fn page() -> HttpResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, PAGE_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        PAGE_HTML,
    )
        .into_response()
}

async fn page_script() -> HttpResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        PAGE_SCRIPT,
    )
        .into_response()
}

/// `/api/analyses`: the `overview` reply, with the names of the analyses' owners.
#[derive(Debug, Serialize)]
pub struct PageAnalyses {
    #[serde(flatten)]
    pub overview: Overview,
    /// Login names by uid, for the uids that have one.
    pub owners: BTreeMap<u32, String>,
}

/// `/api/events`: the newest kill records, as `events` answers them, at most
/// [`PAGE_EVENTS`], and whether older ones were left out.
#[derive(Debug, Serialize)]
pub struct PageEvents {
    /// Those still in the spool carry `"spooled": true`.
    pub records: Vec<EventRecord>,
    pub more: bool,
    /// Why the database could not be read (then only spooled records are shown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_error: Option<String>,
}

pub fn page_analyses(overview: Overview, name_of: impl Fn(u32) -> Option<String>) -> PageAnalyses {
    let owners = overview
        .analyses
        .iter()
        .map(|a| a.owner_uid)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter_map(|uid| Some((uid, name_of(uid)?)))
        .collect();
    PageAnalyses { overview, owners }
}

/// `records` newest first, as the store answers `events` asked for one more than
/// [`PAGE_EVENTS`] (that one only says there are more).
pub fn page_events(mut records: Vec<EventRecord>, database_error: Option<String>) -> PageEvents {
    let more = records.len() > PAGE_EVENTS;
    records.truncate(PAGE_EVENTS);
    PageEvents {
        records,
        more,
        database_error,
    }
}

fn user_name(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|user| user.name)
}

/// JSON the page polls: never cached, so each poll shows the daemon's state now.
fn fresh_json(body: impl Serialize) -> HttpResponse {
    ([(header::CACHE_CONTROL, "no-store")], Json(body)).into_response()
}

async fn api_analyses(State(calls): State<mpsc::Sender<Call>>) -> HttpResponse {
    match ask(&calls, Request::Overview).await {
        Ok(Reply::Overview(overview)) => fresh_json(page_analyses(*overview, user_name)),
        Ok(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no overview from the daemon",
        )
            .into_response(),
        Err(err) => (StatusCode::SERVICE_UNAVAILABLE, err).into_response(),
    }
}

/// The same request, answered by the same store function, as `watchdog-user events`;
/// only as many records as the page shows are read.
async fn api_events(State(calls): State<mpsc::Sender<Call>>) -> HttpResponse {
    let request = Request::Events {
        filter: EventFilter {
            limit: Some(PAGE_EVENTS as u32 + 1),
            ..EventFilter::default()
        },
    };
    match ask(&calls, request).await {
        Ok(Reply::Events {
            records,
            database_error,
            ..
        }) => fresh_json(page_events(records, database_error)),
        Ok(_) => (StatusCode::SERVICE_UNAVAILABLE, "no events from the daemon").into_response(),
        Err(err) => (StatusCode::SERVICE_UNAVAILABLE, err).into_response(),
    }
}

/// How a metric's samples are read from the status.
enum Samples {
    /// One sample, unlabelled.
    One(fn(&Status) -> f64),
    /// One sample per label set, the labels written as they go out (`{key="value"}`).
    Labelled(fn(&Status) -> Vec<(String, f64)>),
}

impl Samples {
    fn read(&self, s: &Status) -> Vec<(String, f64)> {
        match self {
            Self::One(value) => vec![(String::new(), value(s))],
            Self::Labelled(samples) => samples(s),
        }
    }
}

/// One metric family of `/metrics`, as its HELP and TYPE lines name it.
struct Metric {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: Samples,
}

const fn gauge(name: &'static str, help: &'static str, value: fn(&Status) -> f64) -> Metric {
    Metric {
        name,
        kind: "gauge",
        help,
        samples: Samples::One(value),
    }
}

const fn counter(name: &'static str, help: &'static str, value: fn(&Status) -> f64) -> Metric {
    Metric {
        name,
        kind: "counter",
        help,
        samples: Samples::One(value),
    }
}

const fn counters(
    name: &'static str,
    help: &'static str,
    samples: fn(&Status) -> Vec<(String, f64)>,
) -> Metric {
    Metric {
        name,
        kind: "counter",
        help,
        samples: Samples::Labelled(samples),
    }
}

/// Every metric read from the status, in the order scrapes show them (dashboards and
/// alerts name them: a name, type or label here is an interface).
const METRICS: &[Metric] = &[
    gauge(
        "watchdog_watched_processes",
        "Processes watched now.",
        |s| s.monitored_count as f64,
    ),
    gauge("watchdog_analyses", "Analyses watched now.", |s| {
        s.analyses as f64
    }),
    gauge(
        "watchdog_pinned_fill_ratio",
        "The fuller of the pinned maps of analyses and roots, 0 to 1: at 1 registrations are refused.",
        |s| s.pinned_analyses.max(s.pinned_roots) as f64 / s.pinned_capacity.max(1) as f64,
    ),
    gauge(
        "watchdog_processes_in_grace",
        "Processes signalled and not yet gone.",
        |s| s.grace_count as f64,
    ),
    gauge(
        "watchdog_zombies",
        "Exited processes of analyses that their watched parent has not reaped yet.",
        |s| s.zombies as f64,
    ),
    counters(
        "watchdog_kills_total",
        "Processes killed (or recorded) since start, by reason.",
        kills_by_reason,
    ),
    counter(
        "watchdog_lost_events_total",
        "Kernel events lost: ring buffer full, or a child the watched map had no room for.",
        |s| (s.lost_events + s.watch_map_full) as f64,
    ),
    gauge(
        "watchdog_loop_longest_seconds",
        "The longest the daemon loop spent on one input since start.",
        |s| s.loop_longest_ms / 1000.0,
    ),
    counter(
        "watchdog_ring_buffer_drops_total",
        "Events the kernel could not put in the ring buffer.",
        |s| s.lost_events as f64,
    ),
    counter(
        "watchdog_pinned_state_dropped_total",
        "Pinned state found untrustworthy at start (another layout, or not the maps the attached programs use), dropped and rebuilt.",
        |s| s.pinned_state_dropped as f64,
    ),
    counter(
        "watchdog_untracked_forks_total",
        "Children the kernel's watched map could not take; the daemon followed them itself.",
        |s| s.faults.untracked_forks as f64,
    ),
    counter(
        "watchdog_pidfd_failures_total",
        "Pidfds that could not be opened (e.g. out of descriptors).",
        |s| s.faults.pidfd_failures as f64,
    ),
    counter(
        "watchdog_kill_progress_unsaved_total",
        "SIGTERMs whose time the pinned map could not keep for a restarted daemon.",
        |s| s.faults.kill_progress_unsaved as f64,
    ),
    counter(
        "watchdog_shm_unremoved_total",
        "Files left in tmpfs by killed analyses that --remove-shm could not remove.",
        |s| s.faults.shm_unremoved as f64,
    ),
    gauge(
        "watchdog_launchers_watched",
        "Launchers of registered roots watched now.",
        |s| s.faults.launchers_watched as f64,
    ),
    counters(
        "watchdog_kernel_program_errors_total",
        "Failures inside the kernel programs, by program and kind (read, map_update, signal).",
        program_errors,
    ),
    counter(
        "watchdog_kernel_signals_total",
        "Memory kills whose SIGTERM the kernel programs sent themselves, at the crossing.",
        |s| s.kernel_signals as f64,
    ),
    counter(
        "watchdog_forks_refused_total",
        "Forks the kernel refused past analyses' process limits, as recorded.",
        |s| s.forks_refused as f64,
    ),
    counter(
        "watchdog_resyncs_total",
        "Tree rebuilds after lost events.",
        |s| s.resyncs as f64,
    ),
    gauge(
        "watchdog_db_spool_depth",
        "Kill records waiting for the database.",
        |s| s.database.spool_depth as f64,
    ),
    gauge(
        "watchdog_db_unspooled",
        "Kill records held in memory because the spool could not be written (a full disk?); \
         tried again every second.",
        |s| s.database.unspooled as f64,
    ),
    counter(
        "watchdog_spool_records_total",
        "Kill records appended to the spool since start.",
        |s| s.database.spooled_total as f64,
    ),
    counter(
        "watchdog_spool_fsyncs_total",
        "Spool fsyncs since start (records arriving together share one).",
        |s| s.database.spool_fsyncs as f64,
    ),
    counter(
        "watchdog_records_unqueued_total",
        "Kill records the daemon loop could not hand to its store task (stopped); held and \
         spooled at shutdown.",
        |s| s.records_unqueued as f64,
    ),
    counter(
        "watchdog_db_rejected_total",
        "Kill records the database refused for good, set aside in <spool>.rejected.",
        |s| s.database.rejected as f64,
    ),
    gauge(
        "watchdog_control_connections",
        "Control socket connections open now.",
        |s| s.control.connections as f64,
    ),
    gauge(
        "watchdog_control_connections_max",
        "The most control socket connections served at once.",
        |s| s.control.max_connections as f64,
    ),
    counter(
        "watchdog_control_connections_evicted_total",
        "Idle control socket connections closed (with an error line) to make room for a new client.",
        |s| s.control.evicted as f64,
    ),
    counter(
        "watchdog_control_connections_refused_total",
        "Control socket clients refused (an error line, then closed): the most were open, all busy.",
        |s| s.control.refused as f64,
    ),
    counter(
        "watchdog_control_requests_oversized_total",
        "Control request lines over 64 KiB: answered with an error, the connection closed unread.",
        |s| s.control.oversized as f64,
    ),
    counter(
        "watchdog_control_connections_timed_out_total",
        "Control socket connections closed after 30 s without a complete request (or unread answer).",
        |s| s.control.timed_out as f64,
    ),
    counter(
        "watchdog_control_requests_not_utf8_total",
        "Control request lines that were not UTF-8 (answered with an error).",
        |s| s.control.not_utf8 as f64,
    ),
    gauge(
        "watchdog_uptime_seconds",
        "Seconds since the daemon started.",
        |s| s.uptime_s as f64,
    ),
    Metric {
        name: "watchdog_kernel_path",
        kind: "gauge",
        help: "How this kernel lets each part work (memory, memory_from_others, memory_first_signal, rss_poll, registration_walk, exit, bpf_memory): 1 for the way in use.",
        samples: Samples::Labelled(kernel_paths),
    },
];

fn kernel_paths(s: &Status) -> Vec<(String, f64)> {
    s.kernel_paths
        .iter()
        .map(|p| (format!("{{path=\"{}\",how=\"{}\"}}", p.path, p.how), 1.0))
        .collect()
}

fn kills_by_reason(s: &Status) -> Vec<(String, f64)> {
    s.kills_by_reason
        .iter()
        .map(|(reason, n)| (format!("{{reason=\"{reason}\"}}"), *n as f64))
        .collect()
}

/// Keys are "program/kind"; one without the slash has no labels to go under, so it is
/// left out.
fn program_errors(s: &Status) -> Vec<(String, f64)> {
    s.faults
        .program_errors
        .iter()
        .filter_map(|(key, n)| {
            let (program, kind) = key.split_once('/')?;
            Some((
                format!("{{program=\"{program}\",kind=\"{kind}\"}}"),
                *n as f64,
            ))
        })
        .collect()
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

/// A histogram from [`crate::kernel::ingest::Latency::snapshot`]'s cumulative buckets, count and sum.
fn histogram(out: &mut String, name: &str, help: &str, (buckets, count, sum): LatencySnapshot) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (le, n) in buckets {
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum {sum}");
    let _ = writeln!(out, "{name}_count {count}");
}

/// The Prometheus text exposition format (version 0.0.4).
pub fn prometheus_text(s: &Status) -> String {
    render_metrics(s, LATENCY.snapshot())
}

/// The status's metrics, then the event latency histogram.
fn render_metrics(s: &Status, latency: LatencySnapshot) -> String {
    let mut out = String::new();
    for m in METRICS {
        metric(&mut out, m.name, m.kind, m.help, &m.samples.read(s));
    }
    histogram(
        &mut out,
        "watchdog_event_latency_seconds",
        "From the kernel event to the daemon reading it.",
        latency,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::overview::AnalysisOverview,
        vocab::{
            limits::{Limits, Reason},
            record::{KillRecord, Outcome, SignalSent},
        },
    };

    fn record(pid: u32, reason: Reason) -> KillRecord {
        KillRecord {
            time: "2026-11-21T17:00:00.000Z".into(),
            host: "h".into(),
            pid,
            ppid: 1,
            analysis_id: "a".into(),
            reason,
            limit: Some(1000),
            rss_bytes: 5 << 20,
            runtime_ms: 1000,
            signals: vec![SignalSent {
                signal: "SIGTERM".into(),
                at: "2026-11-21T17:00:00.000Z".into(),
                by: None,
            }],
            outcome: Outcome::ExitedAfterSigterm,
            comm: "<img src=x onerror=alert(1)>".into(),
            cmdline: "sleep 600".into(),
            uid: 0,
            owner_uid: Some(0),
            warned_of: None,
            zombies: None,
            tree_pss_bytes: None,
            tree_rss_bytes: None,
            shmem_bytes: None,
            shm_left: Vec::new(),
            refused_forks: None,
        }
    }

    fn analysis(id: &str, owner_uid: u32) -> AnalysisOverview {
        AnalysisOverview {
            analysis_id: id.into(),
            owner_uid,
            age_ms: 1,
            deadline_in_ms: 2,
            limits: Limits {
                grace_ms: 5,
                ..Limits::for_tests(3, 4)
            },
            processes: 0,
            zombies: 0,
            rss_bytes: 0,
            largest_rss_bytes: 0,
            largest_pid: None,
            dying: None,
            rss_samples: Vec::new(),
            tree: Vec::new(),
            tree_omitted: 0,
        }
    }

    /// Every field /metrics reads, non-zero and distinct, with several labels each.
    fn rich_status() -> Status {
        let mut s = Status {
            version: "1.2.3".into(),
            uptime_s: 86_461,
            monitored_count: 17,
            analyses: 3,
            pinned_analyses: 3,
            pinned_roots: 4096,
            pinned_capacity: 16_384,
            zombies: 2,
            lost_events: 5,
            watch_map_full: 7,
            pinned_state_dropped: 1,
            resyncs: 4,
            kernel_signals: 18,
            forks_refused: 9,
            loop_longest_ms: 12.5,
            grace_count: 6,
            records_unqueued: 8,
            ..Status::default()
        };
        s.zombies_by_analysis = [("a".to_string(), 1), ("b".to_string(), 1)].into();
        s.kills_by_reason = [
            ("memory".to_string(), 11),
            ("orphan".to_string(), 1),
            ("timeout".to_string(), 9),
            ("tree_memory".to_string(), 2),
        ]
        .into();
        s.faults.untracked_forks = 13;
        s.faults.pidfd_failures = 14;
        s.faults.kill_progress_unsaved = 16;
        s.faults.shm_unremoved = 17;
        s.faults.launchers_watched = 15;
        s.faults.program_errors = [
            ("exit/read".to_string(), 3),
            ("fork/map_update".to_string(), 21),
            ("fork/read".to_string(), 1),
            ("no kind".to_string(), 99),
        ]
        .into();
        s.database.spool_depth = 31;
        s.database.unspooled = 32;
        s.database.spooled_total = 33;
        s.database.spool_fsyncs = 34;
        s.database.rejected = 35;
        s.control.connections = 41;
        s.control.max_connections = 42;
        s.control.evicted = 43;
        s.control.refused = 44;
        s.control.oversized = 45;
        s.control.timed_out = 46;
        s.control.not_utf8 = 47;
        s.kernel_paths = vec![
            crate::vocab::kernel::KernelPath::new("memory", "kernel_events", "per-CPU"),
            crate::vocab::kernel::KernelPath::new("exit", "signal_live", "no group_dead"),
        ];
        s
    }

    #[test]
    fn metrics_keep_their_names_help_types_labels_order_and_values() {
        let latency = (
            vec![
                (1e-5, 1),
                (5e-5, 1),
                (0.0001, 1),
                (0.0005, 2),
                (0.001, 3),
                (0.005, 3),
                (0.01, 3),
                (0.05, 4),
                (0.1, 4),
                (1.0, 4),
            ],
            5,
            2.021005,
        );
        // Dashboards, alerts and scrapers read these names and labels: a change to the
        // text is a change to an interface, made here on purpose or not at all.
        assert_eq!(
            render_metrics(&rich_status(), latency),
            include_str!("testdata/metrics.txt")
        );
    }

    #[test]
    fn the_page_gets_the_newest_events_and_whether_there_are_more() {
        let records: Vec<_> = (0..PAGE_EVENTS as u32 + 1)
            .map(|pid| EventRecord {
                record: record(pid, Reason::Timeout),
                spooled: pid == 0,
                event_uid: format!("uid-{pid}"),
            })
            .collect();
        let page = serde_json::to_value(page_events(records, None)).expect("serializes");
        assert_eq!(page["more"], true);
        let shown = page["records"].as_array().expect("an array");
        assert_eq!(shown.len(), PAGE_EVENTS);
        assert_eq!(shown[0]["pid"], 0, "newest first, as the store answers");
        // Text goes out as JSON strings; the page puts it in text nodes only.
        assert_eq!(shown[0]["comm"], "<img src=x onerror=alert(1)>");
        assert_eq!(shown[0]["reason"], "timeout");
        assert_eq!(
            (&shown[0]["spooled"], &shown[1]["spooled"]),
            (&true.into(), &serde_json::Value::Null)
        );

        let down = Some("the database is unavailable".to_string());
        let none = serde_json::to_value(page_events(Vec::new(), down)).expect("serializes");
        assert_eq!(
            none,
            serde_json::json!({"records": [], "more": false,
                               "database_error": "the database is unavailable"})
        );
        let all = (0..PAGE_EVENTS as u32).map(|pid| EventRecord {
            record: record(pid, Reason::Memory),
            spooled: false,
            event_uid: format!("uid-{pid}"),
        });
        assert!(!page_events(all.collect(), None).more);
    }

    #[test]
    fn the_analyses_come_with_their_owners_names_once_per_uid() {
        let overview = Overview {
            now_unix_ms: 10,
            watched: 3,
            analyses: vec![analysis("a", 0), analysis("b", 1001), analysis("c", 0)],
        };
        let asked = std::cell::RefCell::new(Vec::new());
        let page = page_analyses(overview, |uid| {
            asked.borrow_mut().push(uid);
            (uid == 0).then(|| "root".to_string())
        });
        assert_eq!(*asked.borrow(), [0, 1001]);
        let json = serde_json::to_value(&page).expect("serializes");
        assert_eq!(json["owners"], serde_json::json!({"0": "root"}));
        assert_eq!(
            (json["now_unix_ms"].clone(), json["watched"].clone()),
            (10.into(), 3.into())
        );
        assert_eq!(json["analyses"][1]["analysis_id"], "b");
        assert_eq!(json["analyses"][1]["zombies"], 0);

        let empty = page_analyses(Overview::default(), |_| None);
        assert_eq!(
            serde_json::to_value(&empty).expect("serializes"),
            serde_json::json!({"now_unix_ms": 0, "watched": 0, "analyses": [], "owners": {}})
        );
    }
}
