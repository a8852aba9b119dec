//! The control socket's typed protocol: one JSON request per line, one JSON response
//! line back. The CLI and any other client speak only this.

use anyhow::Result;
use serde::{Deserialize, Serialize};

pub use crate::store::EventRecord;

use crate::{
    store::{DbStatus, EventFilter},
    vocab::{
        error::{Error, ErrorKind, kind_of},
        limits::{LimitOverrides, Limits},
        record::KillRecord,
    },
};

/// The longest request line the daemon reads, its newline not counted. A longer one is
/// answered with an error and its connection closed, without the daemon reading the rest.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// How a request must look: every framing error ends with it.
pub const REQUEST_SHAPE: &str = "a request is one JSON object on one line of at most 64 KiB, in UTF-8, e.g. {\"op\":\"status\"}";

/// Why a request line is not a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadRequest {
    /// Longer than [`MAX_REQUEST_BYTES`] (without its newline): the bytes seen so far.
    TooLong(usize),
    /// Not UTF-8: the offset of the first invalid byte.
    NotUtf8(usize),
    /// UTF-8, but not one of the requests: serde's reason.
    Malformed(String),
}

impl BadRequest {
    /// Its answer: a framing error is always the client's to fix.
    pub fn response(&self) -> Response {
        Response::error(ErrorKind::BadRequest, self.to_string())
    }
}

impl std::fmt::Display for BadRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooLong(seen) => write!(
                f,
                "request too long (over {MAX_REQUEST_BYTES} bytes without a newline, {seen} read): \
                 {REQUEST_SHAPE}; the connection is closed"
            ),
            Self::NotUtf8(at) => write!(
                f,
                "malformed request (invalid UTF-8 at byte {at}): {REQUEST_SHAPE}"
            ),
            Self::Malformed(reason) => write!(
                f,
                "malformed request ({reason}): send one JSON object per line, e.g. {{\"op\":\"status\"}}"
            ),
        }
    }
}

/// One request line (its newline taken off) to the request it holds. Pure: the control
/// socket and the fuzz tests go through this very function.
pub fn parse_request(line: &[u8]) -> Result<Request, BadRequest> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err(BadRequest::TooLong(line.len()));
    }
    let text = std::str::from_utf8(line).map_err(|e| BadRequest::NotUtf8(e.valid_up_to()))?;
    serde_json::from_str(text).map_err(|e| BadRequest::Malformed(e.to_string()))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Watch `pid`, its existing descendants, and all it forks from now on.
    Register {
        pid: u32,
        analysis_id: String,
        #[serde(default)]
        limits: LimitOverrides,
        /// The process was just started by the caller and has no descendants yet
        /// (`exec`): the daemon watches it without looking for any.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        fresh: bool,
    },
    /// Watch every child `pid` forks from now on (and all they fork) as analysis
    /// `analysis_id`, `pid` itself never a member, until `pid` exits or the analysis is
    /// unregistered; the analysis' clock runs from now. The Python client's `watch()`.
    Launch {
        pid: u32,
        analysis_id: String,
        #[serde(default)]
        limits: LimitOverrides,
    },
    /// Stop watching a process and its subtree, or a whole analysis.
    Unregister {
        #[serde(default)]
        pid: Option<u32>,
        #[serde(default)]
        analysis_id: Option<String>,
    },
    DumpTree {
        #[serde(default)]
        analysis_id: Option<String>,
    },
    Status,
    /// What the live page shows: every analysis' usage, RSS history and tree, bounded
    /// (`overview.rs`).
    Overview,
    /// Answered once run `run` (a `registered` reply's) has nothing left (every process
    /// gone or unwatched, every kill finished) and its records are stored: how it ended.
    Wait {
        run: u64,
    },
    /// Violations and kills from the database, newest first.
    Events {
        #[serde(default)]
        filter: EventFilter,
    },
    /// Test-only fault (daemon started with --test-faults): the main loop answers, then
    /// stops for `ms` milliseconds, as a hung loop would.
    Stall {
        ms: u64,
    },
    /// Test-only fault (daemon started with --test-faults): arms the fault `what`.
    Fault {
        what: TestFault,
    },
}

/// The faults `Request::Fault` can arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TestFault {
    /// The store's database task panics at its next write of kill records.
    StorePanic,
}

/// On the wire `{"ok": <reply>}`, or `{"error": "<one line>", "kind": "<kind>"}`: the
/// message for people, the kind ([`ErrorKind`]) for programs.
#[derive(Debug)]
pub enum Response {
    Ok(Reply),
    Error { error: String, kind: ErrorKind },
}

impl Response {
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self::Error {
            error: message.into(),
            kind,
        }
    }

    /// The response to a request that failed with `err`: its whole chain as the
    /// message, the kind of the first typed error in it, else `fallback`.
    pub fn failed(err: &anyhow::Error, fallback: ErrorKind) -> Self {
        Self::error(kind_of(err, fallback), format!("{err:#}"))
    }

    /// The reply, or the error as the CLI side returns it (its kind kept, for
    /// [`kind_of`]).
    pub fn into_result(self) -> Result<Reply> {
        match self {
            Self::Ok(reply) => Ok(reply),
            Self::Error { error, kind } => Err(Error::new(kind, error).into()),
        }
    }

    /// The response as its one wire line, newline included. An error message is made one
    /// line first (a control character, e.g. a newline inside an analysis id that a
    /// message quotes, is escaped), so that the CLI prints every error on one line.
    pub fn to_line(&self) -> String {
        let mut line = match self {
            Self::Error { error, kind } if error.chars().any(char::is_control) => {
                let flat: String = error
                    .chars()
                    .map(|c| {
                        if c.is_control() {
                            c.escape_default().to_string()
                        } else {
                            c.to_string()
                        }
                    })
                    .collect();
                serde_json::to_string(&Self::error(*kind, flat))
            }
            _ => serde_json::to_string(self),
        }
        .expect("responses serialize");
        line.push('\n');
        line
    }
}

/// The two shapes of a response line, as serde writes them.
#[derive(Serialize)]
#[serde(untagged)]
enum WireOut<'a> {
    Ok { ok: &'a Reply },
    Error { error: &'a str, kind: ErrorKind },
}

impl Serialize for Response {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Ok(ok) => WireOut::Ok { ok },
            Self::Error { error, kind } => WireOut::Error { error, kind: *kind },
        }
        .serialize(serializer)
    }
}

/// Read as one object with optional fields rather than an untagged enum, so that a
/// reply that does not parse is reported with serde's reason, not "no variant matched".
/// Fields it does not know are let through: a newer daemon may add some.
#[derive(Deserialize)]
struct WireIn {
    ok: Option<Reply>,
    error: Option<String>,
    kind: Option<ErrorKind>,
}

impl<'de> Deserialize<'de> for Response {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match WireIn::deserialize(deserializer)? {
            WireIn {
                ok: Some(reply),
                error: None,
                kind: None,
            } => Ok(Self::Ok(reply)),
            WireIn {
                ok: None,
                error: Some(error),
                kind: Some(kind),
            } => Ok(Self::Error { error, kind }),
            _ => Err(serde::de::Error::custom(
                "a response is {\"ok\": <reply>} or {\"error\": <message>, \"kind\": <kind>}",
            )),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    Registered {
        pid: u32,
        analysis_id: String,
        watched: usize,
        /// This run of the analysis (a retry of a killed one is a new run): what `wait`
        /// takes.
        #[serde(default)]
        run: u64,
    },
    /// Run `run` has nothing left: the kills the watchdog made in it, by reason (none:
    /// it ended by itself).
    Ended {
        run: u64,
        kills: Vec<crate::core::runs::RunKill>,
    },
    Unregistered {
        removed: usize,
    },
    Tree {
        /// Every process, depth first: a root, then each of its children with everything
        /// below it, then the next root. Flat, so no depth of tree is too deep to send.
        processes: Vec<TreeNode>,
        analyses: Vec<AnalysisView>,
    },
    Events {
        /// Newest first: those in the database, and those still waiting in the spool
        /// (marked `spooled`).
        records: Vec<EventRecord>,
        /// Why the database could not be read: then only the spooled records are shown.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        database_error: Option<String>,
        /// With a full answer: the `before` of the next page (older records may follow).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<String>,
    },
    Status(Box<Status>),
    Overview(Box<crate::api::overview::Overview>),
    Stalling {
        ms: u64,
    },
    FaultArmed {
        what: TestFault,
    },
}

/// One process of the live tree: the `dump-tree --json` shape.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TreeNode {
    pub pid: u32,
    pub ppid: u32,
    pub analysis_id: String,
    /// Uid of the caller that created its analysis.
    #[serde(default)]
    pub owner_uid: u32,
    pub comm: String,
    pub age_ms: u64,
    pub rss_bytes: u64,
    /// Its parent died while it lived on.
    pub orphan: bool,
    /// Exited, and its parent has not reaped it yet (a zombie: it holds its pid).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub zombie: bool,
    /// Being killed: time left before SIGKILL.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grace_left_ms: Option<u64>,
    /// How far below its root (a root is at 0).
    pub depth: u32,
}

/// An analysis as `dump-tree` shows it: its limits and time left.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AnalysisView {
    pub analysis_id: String,
    /// Uid of the caller that created it: only it, root and the admin group may add
    /// processes to it or unregister it.
    #[serde(default)]
    pub owner_uid: u32,
    pub processes: usize,
    /// Exited processes its members hold unreaped (zombies).
    #[serde(default)]
    pub zombies: usize,
    /// Negative once the deadline has passed.
    pub deadline_in_ms: i64,
    /// The deadline as Unix time, ms.
    pub deadline_unix_ms: u64,
    pub limits: Limits,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub uptime_s: u64,
    pub monitored_count: usize,
    pub analyses: usize,
    /// Entries of the pinned maps of analyses and of registered roots, each of
    /// `pinned_capacity`: a registration is refused once one is full.
    #[serde(default)]
    pub pinned_analyses: usize,
    #[serde(default)]
    pub pinned_roots: usize,
    #[serde(default)]
    pub pinned_capacity: usize,
    /// Exited processes of analyses their watched parents have not reaped yet.
    #[serde(default)]
    pub zombies: usize,
    /// The same, by analysis id (analyses holding none are left out).
    #[serde(default)]
    pub zombies_by_analysis: std::collections::BTreeMap<String, usize>,
    /// Fork, exit and exec events received from the kernel since start.
    pub forks_seen: u64,
    pub exits_seen: u64,
    pub execs_seen: u64,
    /// Events the kernel could not put in the ring buffer (full).
    pub lost_events: u64,
    /// Children the kernel could not add to its watched map (full).
    pub watch_map_full: u64,
    /// Pinned state found untrustworthy at start (not this build's layout, or not the
    /// maps the attached programs use), dropped and rebuilt: 0 or 1.
    #[serde(default)]
    pub pinned_state_dropped: u64,
    /// Times the tree was rebuilt from the kernel map and /proc after a loss.
    pub resyncs: u64,
    /// RSS reports from the kernel's memory fast path.
    pub rss_reports: u64,
    /// Memory kills whose SIGTERM the kernel programs sent themselves, at the crossing
    /// (`kernel_paths` says whether they may: `memory_first_signal`).
    #[serde(default)]
    pub kernel_signals: u64,
    /// Forks the kernel refused past analyses' process limits, as recorded
    /// (`kernel_paths` says whether it refuses: `fork_limit`).
    #[serde(default)]
    pub forks_refused: u64,
    /// Duration of the last reconcile poll (RSS of every watched process), ms.
    pub last_poll_ms: f64,
    /// The longest the daemon's loop spent on one input since start (a batch of kernel
    /// events, a request, a poll's results), ms: how late anything else could be.
    #[serde(default)]
    pub loop_longest_ms: f64,
    pub grace_count: usize,
    pub kills_total: u64,
    /// Processes killed (or recorded, for logged orphans and dry runs) by reason.
    pub kills_by_reason: std::collections::BTreeMap<String, u64>,
    /// Kills recorded in the last 24 hours (since the daemon started, at most).
    pub kills_last_24h: usize,
    /// The last 20 records, newest first.
    pub recent_events: Vec<KillRecord>,
    pub dry_run: bool,
    /// Kill records the daemon loop could not hand to the store (its task had stopped):
    /// held by the loop and spooled at shutdown, never dropped.
    #[serde(default)]
    pub records_unqueued: u64,
    /// "ok", or "spooling" while records wait for the database.
    pub db: String,
    /// The database's state in full: the error and the spool's depth.
    pub database: DbStatus,
    /// The settings that can change on SIGHUP, as in force now.
    pub settings: Runtime,
    /// Faults met and how they were handled: each one counted, none silent.
    #[serde(default)]
    pub faults: Faults,
    /// The control socket's connections and the requests it refused unread.
    #[serde(default)]
    pub control: ControlStats,
    /// The running kernel (`uname -r`) and how it lets each part work.
    #[serde(default)]
    pub kernel_release: String,
    #[serde(default)]
    pub kernel_paths: Vec<crate::vocab::kernel::KernelPath>,
}

/// What can change without a restart, as `status` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Runtime {
    pub defaults: Option<Limits>,
    pub poll_interval_ms: u64,
    pub dry_run: bool,
}

/// The control socket's bounds at work, for `status` and /metrics.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ControlStats {
    /// Connections open now.
    pub connections: u64,
    /// The most connections served at once.
    pub max_connections: u64,
    /// Idle connections closed since start to give their place to a new client, when
    /// `max_connections` were open.
    pub evicted: u64,
    /// New clients refused since start: `max_connections` were open, all busy with a
    /// request.
    pub refused: u64,
    /// Request lines over [`MAX_REQUEST_BYTES`]: answered, then the connection closed.
    pub oversized: u64,
    /// Connections closed after the idle timeout without a complete request (or with
    /// an answer not read in that time).
    pub timed_out: u64,
    /// Request lines that were not UTF-8 (answered; the connection stays open).
    pub not_utf8: u64,
}

/// The faults the daemon met, for `status` and /metrics.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Faults {
    /// How many processes the kernel's watched map can hold (the host's pid_max).
    pub watched_capacity: u32,
    /// Children the kernel map could not take (full or out of memory), since start;
    /// each was followed by the daemon and handed back to the map when it had room.
    pub untracked_forks: u64,
    /// Of those, how many the daemon follows without the kernel right now.
    pub untracked_now: usize,
    /// Pidfds that could not be opened (e.g. out of descriptors) for a signal or a
    /// launcher watch; launchers are then checked in /proc instead.
    pub pidfd_failures: u64,
    /// SIGTERMs whose time the pinned map could not keep: a daemon restarted during
    /// those kills gives them a grace of its own.
    #[serde(default)]
    pub kill_progress_unsaved: u64,
    /// Files left in tmpfs by killed analyses that `--remove-shm` could not remove.
    #[serde(default)]
    pub shm_unremoved: u64,
    /// Launchers of registered roots watched now (one pidfd each).
    pub launchers_watched: usize,
    /// Failures inside the kernel programs, by "program/kind" (kind: read, map_update, signal).
    pub program_errors: std::collections::BTreeMap<String, u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each framing error answers bad_request, its message unchanged beside the kind.
    #[test]
    fn every_framing_error_is_a_bad_request() {
        let too_long = vec![b'{'; MAX_REQUEST_BYTES + 1];
        let cases: [&[u8]; 4] = [&too_long, b"{\"op\":\"st\xffatus\"}", b"{\"op\":", b"[]"];
        let mut seen = Vec::new();
        for line in cases {
            let err = parse_request(line).expect_err("not a request");
            let json: serde_json::Value =
                serde_json::from_str(&err.response().to_line()).expect("one JSON line");
            assert_eq!(json["error"], err.to_string(), "{json}");
            assert_eq!(json["kind"], "bad_request", "{json}");
            seen.push(std::mem::discriminant(&err));
        }
        seen.dedup();
        // Too long, not UTF-8, malformed: every variant met.
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn an_error_line_carries_its_kind_and_its_message_on_one_line() {
        let line =
            Response::error(ErrorKind::NotFound, "no analysis \"a\nb\" is watched").to_line();
        assert_eq!(
            line,
            "{\"error\":\"no analysis \\\"a\\\\nb\\\" is watched\",\"kind\":\"not_found\"}\n"
        );
        let Response::Error { error, kind } = serde_json::from_str(&line).unwrap() else {
            panic!("{line}")
        };
        assert_eq!(
            (error.as_str(), kind),
            ("no analysis \"a\\nb\" is watched", ErrorKind::NotFound)
        );
        let ok = Response::Ok(Reply::Unregistered { removed: 2 }).to_line();
        assert_eq!(ok, "{\"ok\":{\"kind\":\"unregistered\",\"removed\":2}}\n");
        assert!(matches!(
            serde_json::from_str(&ok).unwrap(),
            Response::Ok(Reply::Unregistered { removed: 2 })
        ));
    }

    /// A response is one of the two shapes: an error without a kind is not one.
    #[test]
    fn an_error_without_a_kind_or_beside_a_reply_is_refused() {
        for line in [
            r#"{"error":"x"}"#,
            r#"{"kind":"refused"}"#,
            r#"{"error":"x","kind":"refused","ok":{"kind":"unregistered","removed":1}}"#,
            r#"{"error":"x","kind":"no_such_kind"}"#,
            "{}",
        ] {
            assert!(serde_json::from_str::<Response>(line).is_err(), "{line}");
        }
    }

    /// The CLI side's error keeps the kind and says the message as it came.
    #[test]
    fn an_error_response_becomes_an_error_of_its_kind() {
        let err = Response::error(ErrorKind::Unavailable, "the daemon is shutting down")
            .into_result()
            .unwrap_err();
        assert_eq!(kind_of(&err, ErrorKind::Internal), ErrorKind::Unavailable);
        assert_eq!(format!("{err:#}"), "the daemon is shutting down");
        let untyped = anyhow::anyhow!("pid 7 is not watched").context("unregistering");
        let Response::Error { error, kind } = Response::failed(&untyped, ErrorKind::Refused) else {
            panic!()
        };
        assert_eq!(
            (error.as_str(), kind),
            ("unregistering: pid 7 is not watched", ErrorKind::Refused)
        );
    }
}
