//! PostgreSQL or SQLite through sqlx: kill records (`watchdog_events`) and what is
//! watched now (`watchdog_processes`). Two tasks: the daemon loop only sends messages
//! to the front one, which spools records and answers status at once; the database
//! task writes, and may wait on the network. No kill and no status waits on the
//! database.

pub mod spool;

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};
use serde::{Deserialize, Serialize};
use sqlx::{
    Any, AnyPool, AssertSqlSafe, Row as _,
    any::{AnyArguments, AnyPoolOptions, AnyRow},
    migrate::Migrator,
    query::Query,
};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::{
    core::snapshot::ProcessSnapshot,
    os::tasks::{self, Tasks},
    store::spool::{Spool, StoredRecord},
    vocab::{limits::Reason, record::KillRecord},
};

static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/postgres");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/sqlite");

/// How often a down database, or a spool that could not be written, is retried.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// Most messages the front task takes in one go (one spool write, one fsync for all the
/// records among them): bounds how long a status waits behind a burst.
const BATCH_MAX: usize = 4096;
/// The store's tasks, as the supervisor names them.
pub const FRONT_TASK: &str = "store front";
pub const WRITER_TASK: &str = "database writer";
/// Most rows `events` returns.
const EVENTS_LIMIT: i64 = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Sqlite,
}

/// A validated `--database-url`.
#[derive(Clone, Debug)]
pub struct DatabaseUrl {
    pub url: String,
    pub dialect: Dialect,
}

impl DatabaseUrl {
    pub fn parse(text: &str) -> Result<Self, String> {
        let fix = "use postgres://USER:PASSWORD@HOST:PORT/DB or sqlite:///PATH/TO/FILE.db";
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            let rest = text.split_once("://").map(|(_, r)| r).unwrap_or_default();
            if rest.is_empty() || rest.starts_with('/') {
                return Err(format!("invalid database URL {text:?}: no host: {fix}"));
            }
            return Ok(Self {
                url: text.to_string(),
                dialect: Dialect::Postgres,
            });
        }
        if let Some(path) = text
            .strip_prefix("sqlite://")
            .or_else(|| text.strip_prefix("sqlite:"))
        {
            let path = path.split('?').next().unwrap_or_default();
            if path.is_empty() {
                return Err(format!("invalid database URL {text:?}: no file: {fix}"));
            }
            // Create the file (and its directory) when missing: the embedded default must
            // work out of the box.
            let url = if text.contains('?') {
                text.to_string()
            } else {
                format!("{text}?mode=rwc")
            };
            return Ok(Self {
                url,
                dialect: Dialect::Sqlite,
            });
        }
        Err(format!("invalid database URL {text:?}: {fix}"))
    }

    fn sqlite_path(&self) -> Option<PathBuf> {
        let rest = self
            .url
            .strip_prefix("sqlite://")
            .or_else(|| self.url.strip_prefix("sqlite:"))?;
        Some(PathBuf::from(rest.split('?').next()?))
    }

    /// The URL with any password hidden, for messages.
    pub fn redacted(&self) -> String {
        match self.url.split_once("://") {
            Some((scheme, rest)) => match rest.split_once('@') {
                Some((auth, host)) => {
                    let user = auth.split(':').next().unwrap_or_default();
                    format!("{scheme}://{user}:***@{host}")
                }
                None => self.url.clone(),
            },
            None => self.url.clone(),
        }
    }
}

/// A kill record as `events` shows it: the record, and whether it is still waiting in
/// the spool for the database (it is durable there, and written once the database
/// takes it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventRecord {
    #[serde(flatten)]
    pub record: KillRecord,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub spooled: bool,
    /// The record's id, stable from the spool to the database.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub event_uid: String,
}

impl EventRecord {
    /// Where the page after this record starts: `events --before` takes it.
    pub fn cursor(&self) -> String {
        format!("{}/{}", self.record.time, self.event_uid)
    }

    /// Newest first: by time, then by id, the order pages follow.
    fn order_key(&self) -> (&str, &str) {
        (&self.record.time, &self.event_uid)
    }
}

/// A page's end, from [`EventRecord::cursor`]: the time and the id of its last record.
pub fn parse_cursor(cursor: &str) -> Option<(&str, &str)> {
    let (time, uid) = cursor.rsplit_once('/')?;
    (humantime::parse_rfc3339_weak(time).is_ok() && !uid.is_empty()).then_some((time, uid))
}

/// One row of `watchdog_processes`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessRow {
    pub pid: u32,
    pub ppid: u32,
    pub start_time: String,
    pub analysis_id: String,
    pub timeout_ms: u64,
    pub memory_bytes: u64,
    pub tree_memory_bytes: Option<u64>,
    pub grace_ms: u64,
    pub orphans: String,
    pub registered_at: String,
    pub state: String,
    /// Uid of the caller that created the analysis.
    pub owner_uid: u32,
}

impl ProcessSnapshot {
    pub fn rows(&self) -> Vec<ProcessRow> {
        let rfc3339 = crate::vocab::units::rfc3339;
        self.processes
            .iter()
            .filter_map(|p| {
                let analysis = self.analyses.get(&p.analysis)?;
                let age = Duration::from_nanos(self.boot_ns.saturating_sub(p.start_ns));
                Some(ProcessRow {
                    pid: p.pid,
                    ppid: p.ppid,
                    start_time: rfc3339(self.wall - age),
                    analysis_id: analysis.id.clone(),
                    timeout_ms: analysis.limits.timeout_ms,
                    memory_bytes: analysis.limits.memory_bytes,
                    tree_memory_bytes: analysis.limits.tree_memory_bytes,
                    grace_ms: analysis.limits.grace_ms,
                    orphans: format!("{:?}", analysis.limits.orphans).to_lowercase(),
                    registered_at: rfc3339(analysis.registered_wall),
                    state: p.state.into(),
                    owner_uid: analysis.owner_uid,
                })
            })
            .collect()
    }
}

/// A snapshot of the process table, shared by the channel and the database task.
type Rows = Arc<Vec<ProcessRow>>;

/// The `events` filters.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct EventFilter {
    /// RFC 3339: only records at or after this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The newest this many at most; unset (and at most): 1,000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Only records older than this cursor (a previous answer's `next`): the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<String>,
}

impl EventFilter {
    /// How many records an answer holds at most: the filter's limit, capped at 1,000.
    pub fn max_records(&self) -> i64 {
        self.limit
            .map_or(EVENTS_LIMIT, |n| i64::from(n).min(EVENTS_LIMIT))
    }

    /// Whether a record not in the database yet passes what the database's query
    /// checks (a time that does not parse is not filtered out: better shown than lost).
    pub fn admits_stored(&self, stored: &StoredRecord) -> bool {
        let older = |cursor: &str| {
            parse_cursor(cursor)
                .is_none_or(|at| (stored.record.time.as_str(), stored.event_uid.as_str()) < at)
        };
        self.admits(&stored.record) && self.before.as_deref().is_none_or(older)
    }

    pub fn admits(&self, record: &KillRecord) -> bool {
        let at_or_after = |since: &str| {
            let parse = |t: &str| humantime::parse_rfc3339_weak(t).ok();
            match (parse(&record.time), parse(since)) {
                (Some(time), Some(since)) => time >= since,
                _ => true,
            }
        };
        self.since.as_deref().is_none_or(at_or_after)
            && self
                .analysis_id
                .as_ref()
                .is_none_or(|a| *a == record.analysis_id)
            && self
                .reason
                .as_deref()
                .is_none_or(|r| r == record.reason.as_str())
            && self.host.as_ref().is_none_or(|h| *h == record.host)
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DbStatus {
    /// "ok", or "spooling" while the database cannot be reached (records in flight to
    /// a reachable one show in `spool_depth` only).
    pub state: String,
    pub error: Option<String>,
    pub spool_depth: usize,
    pub spool_path: String,
    /// Kill records held in memory because appending them to the spool failed (a full
    /// disk): tried again every second and with the next record, never dropped.
    #[serde(default)]
    pub unspooled: usize,
    /// Why the spool could not be written, while records are held because of it.
    #[serde(default)]
    pub spool_error: Option<String>,
    /// Records appended to the spool since start, and the fsyncs that made them
    /// durable (records arriving together share one).
    #[serde(default)]
    pub spooled_total: u64,
    #[serde(default)]
    pub spool_fsyncs: u64,
    /// Records the database refused for good (a constraint they break), moved to
    /// `<spool>.rejected` so that they block nothing behind them.
    #[serde(default)]
    pub rejected: u64,
}

pub enum StoreMsg {
    /// Kill records, in order: those of one pass of the daemon loop (a tree killed at
    /// once comes as one message).
    Records(Vec<KillRecord>),
    /// What is watched now on this host (the store writes the difference).
    Processes(ProcessSnapshot),
    Query(EventFilter, QueryReply),
    Status(oneshot::Sender<DbStatus>),
    /// Answered once every record sent before it is in the spool (and so in `events`).
    Spooled(oneshot::Sender<()>),
    /// Test fault (`--test-faults` only): the database task panics at its next write.
    FailNextWrite,
}

/// Connects and applies the migrations; the error is one line naming the fix.
pub async fn connect(url: &DatabaseUrl) -> Result<AnyPool> {
    sqlx::any::install_default_drivers();
    let sqlite = url.sqlite_path();
    if let Some(dir) = sqlite.as_deref().and_then(Path::parent) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the database directory {}", dir.display()))?;
    }
    if let Some(db) = &sqlite {
        // A database outside the state directory is kept from other users too.
        if let Some(tightened) = crate::os::private::own_file(db)? {
            tracing::warn!("{tightened}");
        }
    }
    let pool = AnyPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(3))
        .connect(&url.url)
        .await
        .map_err(|e| anyhow!("cannot connect to {}: {}", url.redacted(), explain(&e)))?;
    let migrator = match url.dialect {
        Dialect::Postgres => &POSTGRES_MIGRATIONS,
        Dialect::Sqlite => &SQLITE_MIGRATIONS,
    };
    migrator.run(&pool).await.map_err(|e| {
        anyhow!(
            "the database {} refused the migrations ({e}): give the user the right to create \
             tables in it, or run `watchdog-user migrate` as one who can",
            url.redacted()
        )
    })?;
    add_reasons(&pool).await.map_err(|e| {
        anyhow!(
            "the database {} refused the kill reasons ({e}): give the user the right to \
             write to watchdog_reasons",
            url.redacted()
        )
    })?;
    Ok(pool)
}

/// Every reason this build records, in the table a record's reason must be in (the
/// migrations hold those known when they were written; a newer reason comes from here).
async fn add_reasons(pool: &AnyPool) -> Result<(), sqlx::Error> {
    for reason in <Reason as clap::ValueEnum>::value_variants() {
        sqlx::query(
            "INSERT INTO watchdog_reasons (name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
        )
        .bind(reason.as_str())
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// The cause of a connection error, with what to do about it.
fn explain(err: &sqlx::Error) -> String {
    let text = err.to_string();
    if text.contains("password authentication failed") || text.contains("authentication") {
        format!("{text}: check the user and password in --database-url / DATABASE_URL")
    } else if text.contains("Connection refused") || text.contains("timed out") {
        format!("{text}: is the database server running and reachable?")
    } else {
        text
    }
}

/// SQL in each dialect; the same statements otherwise, bound the same way.
struct Sql {
    insert_event_text: String,
    select_events_text: String,
    upsert_process_text: String,
    delete_process: &'static str,
    delete_host_processes: &'static str,
}

impl Sql {
    fn new(dialect: Dialect) -> Self {
        let (ts, json, time_out, signals_out, text) = match dialect {
            Dialect::Postgres => (
                "::timestamptz",
                "::jsonb",
                r#"to_char(time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"#,
                "signals::text",
                "::text",
            ),
            Dialect::Sqlite => ("", "", "time", "signals", ""),
        };
        Self {
            insert_event_text: format!(
                "INSERT INTO watchdog_events (event_uid, time, host, pid, ppid, analysis_id, reason, \
                 limit_value, rss_bytes, runtime_ms, signals, outcome, comm, cmdline, uid, owner_uid, \
                 warned_of, zombies, tree_pss_bytes, tree_rss_bytes, shmem_bytes, shm_left, refused_forks) \
                 VALUES ($1, $2{ts}, $3, $4, $5, $6, $7, $8, $9, $10, $11{json}, $12, $13, $14, $15, $16, \
                 $17, $18, $19, $20, $21, $22, $23) \
                 ON CONFLICT (event_uid) DO NOTHING"
            ),
            select_events_text: format!(
                "SELECT {time_out} AS time, host, pid, ppid, analysis_id, reason, limit_value, rss_bytes, \
                 runtime_ms, {signals_out} AS signals, outcome, comm, cmdline, uid, owner_uid, warned_of, \
                 zombies, tree_pss_bytes, tree_rss_bytes, shmem_bytes, shm_left, refused_forks, event_uid \
                 FROM watchdog_events \
                 WHERE ($1{text} IS NULL OR time >= $1{ts}) AND ($2{text} IS NULL OR analysis_id = $2) \
                 AND ($3{text} IS NULL OR reason = $3) AND ($4{text} IS NULL OR host = $4) \
                 AND ($6{text} IS NULL OR time < $6{ts} OR (time = $6{ts} AND event_uid < $7)) \
                 ORDER BY time DESC, event_uid DESC LIMIT $5"
            ),
            upsert_process_text: format!(
                "INSERT INTO watchdog_processes (host, pid, ppid, start_time, analysis_id, timeout_ms, \
                 memory_bytes, tree_memory_bytes, grace_ms, orphans, registered_at, state, owner_uid) \
                 VALUES ($1, $2, $3, $4{ts}, $5, $6, $7, $8, $9, $10, $11{ts}, $12, $13) \
                 ON CONFLICT (host, pid) DO UPDATE SET ppid = excluded.ppid, start_time = excluded.start_time, \
                 analysis_id = excluded.analysis_id, timeout_ms = excluded.timeout_ms, \
                 memory_bytes = excluded.memory_bytes, tree_memory_bytes = excluded.tree_memory_bytes, \
                 grace_ms = excluded.grace_ms, orphans = excluded.orphans, \
                 registered_at = excluded.registered_at, state = excluded.state, \
                 owner_uid = excluded.owner_uid"
            ),
            delete_process: "DELETE FROM watchdog_processes WHERE host = $1 AND pid = $2",
            delete_host_processes: "DELETE FROM watchdog_processes WHERE host = $1",
        }
    }
}

// The dialect's statements are put together from constants only, never from input.
impl Sql {
    /// The insert of one record (idempotent: a record already there is skipped).
    fn insert(&self, stored: &StoredRecord) -> Query<'static, Any, AnyArguments> {
        let r = &stored.record;
        sqlx::query(self.insert_event())
            .bind(stored.event_uid.clone())
            .bind(r.time.clone())
            .bind(r.host.clone())
            .bind(i64::from(r.pid))
            .bind(i64::from(r.ppid))
            .bind(Some(r.analysis_id.clone()).filter(|a| !a.is_empty()))
            .bind(r.reason.as_str().to_string())
            .bind(r.limit.map(i64_of))
            .bind(i64_of(r.rss_bytes))
            .bind(i64_of(r.runtime_ms))
            .bind(serde_json::to_string(&r.signals).expect("signals serialize"))
            .bind(r.outcome.as_str().to_string())
            .bind(r.comm.clone())
            .bind(r.cmdline.clone())
            .bind(i64::from(r.uid))
            .bind(r.owner_uid.map(i64::from))
            .bind(r.warned_of.map(|w| w.as_str().to_string()))
            .bind(r.zombies.map(i64_of))
            .bind(r.tree_pss_bytes.map(i64_of))
            .bind(r.tree_rss_bytes.map(i64_of))
            .bind(r.shmem_bytes.map(i64_of))
            .bind(
                Some(&r.shm_left)
                    .filter(|left| !left.is_empty())
                    .map(|left| serde_json::to_string(left).expect("paths serialize")),
            )
            .bind(r.refused_forks.map(i64_of))
    }

    fn insert_event(&self) -> AssertSqlSafe<String> {
        AssertSqlSafe(self.insert_event_text.clone())
    }

    fn select_events(&self) -> AssertSqlSafe<String> {
        AssertSqlSafe(self.select_events_text.clone())
    }

    fn upsert_process(&self) -> AssertSqlSafe<String> {
        AssertSqlSafe(self.upsert_process_text.clone())
    }
}

/// Whether the database refused a record for what it is (a constraint it breaks), so
/// that trying again can never succeed; anything else (the connection, a timeout) is
/// worth another try.
fn refused_for_good(err: &sqlx::Error) -> bool {
    use sqlx::error::ErrorKind;
    let sqlx::Error::Database(db) = err else {
        return false;
    };
    matches!(
        db.kind(),
        ErrorKind::CheckViolation | ErrorKind::NotNullViolation | ErrorKind::ForeignKeyViolation
    )
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// What both store tasks share: the spool, and whether the database is in use.
struct Shared {
    spool: Mutex<Spool>,
    /// None while connected; else why the database is not in use.
    down: Mutex<Option<String>>,
    /// Test fault: the database task panics at its next write.
    fail_next_write: AtomicBool,
    /// Records the database refused for good, set aside in `<spool>.rejected`.
    rejected: AtomicU64,
}

impl Shared {
    /// The spool, also after a task panicked holding it: what it holds must still be
    /// written at shutdown.
    fn spool(&self) -> MutexGuard<'_, Spool> {
        self.spool.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn status(&self) -> DbStatus {
        let spool = self.spool();
        let down = self
            .down
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        DbStatus {
            // A record merely in flight to a reachable database is no outage: only
            // an unreachable one makes the daemon spool (the depth says the rest).
            state: if down.is_none() { "ok" } else { "spooling" }.into(),
            error: down,
            spool_depth: spool.depth(),
            spool_path: spool.path().display().to_string(),
            unspooled: spool.held(),
            spool_error: spool.error().map(str::to_owned),
            spooled_total: spool.appended(),
            spool_fsyncs: spool.syncs(),
            rejected: self.rejected.load(Ordering::Relaxed),
        }
    }

    /// Appends every record the spool holds: one write, one fsync. One error line when
    /// appending starts failing (or fails differently), one line when it works again;
    /// returns whether nothing is held any more.
    fn spool_held(spool: &mut Spool) -> bool {
        let failing = spool.error().map(str::to_owned);
        match spool.flush() {
            Ok(n) => {
                if let Some(error) = failing {
                    tracing::info!(
                        "the spool {} takes records again ({error} before): {n} held kill records \
                         written",
                        spool.path().display()
                    );
                }
                true
            }
            Err(err) => {
                if failing.as_deref() != spool.error() {
                    tracing::error!(
                        "{err:#}: {} kill records are held in memory and tried again every second \
                         (status: unspooled)",
                        spool.held()
                    );
                }
                false
            }
        }
    }
}

/// Records newest first, and why the database could not be read (then only the spooled
/// ones are there).
pub type EventsFound = (Vec<EventRecord>, Option<String>);

type QueryReply = oneshot::Sender<EventsFound>;

/// Inbox of the front task. Shared, so that records still queued when the front task
/// died are not dropped with it: the daemon spools them at shutdown.
type Inbox = Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<StoreMsg>>>;

/// What the daemon keeps of the store besides its sender: what it needs to spool what
/// is left at shutdown, whatever became of the store's tasks.
pub struct StoreHandle {
    shared: Arc<Shared>,
    inbox: Inbox,
}

impl StoreHandle {
    /// At shutdown, once the front task has ended (or died): appends whatever is still
    /// held: records the spool could not take yet, records left in the inbox, and
    /// `unqueued`, the records the daemon could not hand to the store. One line says
    /// what became of them.
    pub fn last_flush(&self, unqueued: Vec<KillRecord>) {
        let mut spool = self.shared.spool();
        if let Ok(mut inbox) = self.inbox.try_lock() {
            while let Ok(msg) = inbox.try_recv() {
                if let StoreMsg::Records(records) = msg {
                    spool.extend(records.into_iter().map(stored));
                }
            }
        }
        spool.extend(unqueued.into_iter().map(stored));
        let held = spool.held();
        if held == 0 {
            return;
        }
        match spool.flush() {
            Ok(n) => tracing::info!(
                "{n} kill records still held at shutdown written to the spool {}",
                spool.path().display()
            ),
            Err(err) => tracing::error!(
                "{err:#}: {held} kill records held at shutdown could not be spooled; their \
                 kill_event log lines are their only copy"
            ),
        }
    }
}

fn stored(record: KillRecord) -> StoredRecord {
    StoredRecord {
        event_uid: uuid::Uuid::new_v4().to_string(),
        record,
    }
}

/// Starts the store, its two tasks supervised: a front task that answers at once
/// (records are spooled, status read from memory) and a database task that may wait on
/// the network. `url` is None when it did not parse: the daemon then runs and spools.
pub fn start(
    url: Option<DatabaseUrl>,
    url_error: Option<String>,
    spool_path: &Path,
    host: String,
    tasks: &mut Tasks,
) -> Result<(mpsc::UnboundedSender<StoreMsg>, StoreHandle)> {
    let shared = Arc::new(Shared {
        spool: Mutex::new(Spool::open(spool_path)?),
        down: Mutex::new(Some(
            url_error.unwrap_or_else(|| "not connected yet".into()),
        )),
        fail_next_write: AtomicBool::new(false),
        rejected: AtomicU64::new(0),
    });
    let wake = Arc::new(Notify::new());
    let (inbox_tx, inbox) = mpsc::unbounded_channel();
    let inbox: Inbox = Arc::new(tokio::sync::Mutex::new(inbox));
    let (query_tx, queries) = mpsc::unbounded_channel();
    let (processes_tx, processes) = watch::channel(Rows::default());
    tasks.spawn(
        FRONT_TASK,
        front(
            inbox.clone(),
            shared.clone(),
            wake.clone(),
            query_tx,
            processes_tx,
        ),
    );
    let dialect = url.as_ref().map_or(Dialect::Sqlite, |u| u.dialect);
    let store = Store {
        url,
        sql: Sql::new(dialect),
        host,
        pool: None,
        shared: shared.clone(),
        written: None,
        written_at: Instant::now(),
    };
    tasks.spawn(WRITER_TASK, store.run(wake, queries, processes));
    Ok((inbox_tx, StoreHandle { shared, inbox }))
}

/// The single writer of the spool. It takes every message already queued at once:
/// their records are appended in one write with one fsync (a tree of 1,000 killed at
/// once, which the loop sends as one message, costs one fsync, not 1,000), and the
/// statuses and queries among them are answered after, so they see those records.
/// Returns when the daemon closes the inbox.
async fn front(
    inbox: Inbox,
    shared: Arc<Shared>,
    wake: Arc<Notify>,
    queries: mpsc::UnboundedSender<(EventFilter, QueryReply)>,
    processes: watch::Sender<Rows>,
) -> Result<()> {
    // Held for the task's life; released if it dies, so the daemon can drain the rest.
    let mut inbox = inbox.lock_owned().await;
    // When records are held because the spool could not take them: the next try.
    let mut retry_at: Option<Instant> = None;
    loop {
        let first = tokio::select! {
            msg = inbox.recv() => match msg {
                Some(msg) => msg,
                None => return Ok(()),
            },
            _ = tasks::sleep_until(retry_at) => {
                let mut spool = shared.spool();
                retry_at = (!Shared::spool_held(&mut spool)).then(|| Instant::now() + RETRY_EVERY);
                if spool.held() == 0 {
                    wake.notify_one();
                }
                continue;
            }
        };
        let mut batch = vec![first];
        while batch.len() < BATCH_MAX
            && let Ok(msg) = inbox.try_recv()
        {
            batch.push(msg);
        }
        let mut records = Vec::new();
        let mut answers = Vec::new();
        for msg in batch {
            match msg {
                StoreMsg::Records(batch) => records.extend(batch.into_iter().map(stored)),
                StoreMsg::Processes(snapshot) => {
                    processes.send_replace(Arc::new(snapshot.rows()));
                    wake.notify_one();
                }
                StoreMsg::FailNextWrite => {
                    tracing::warn!("test fault: the database task panics at its next write");
                    shared.fail_next_write.store(true, Ordering::SeqCst);
                }
                other => answers.push(other),
            }
        }
        if !records.is_empty() {
            let mut spool = shared.spool();
            spool.extend(records);
            let all_spooled = Shared::spool_held(&mut spool);
            retry_at = (!all_spooled).then(|| Instant::now() + RETRY_EVERY);
            drop(spool);
            wake.notify_one();
        }
        for msg in answers {
            match msg {
                StoreMsg::Query(filter, reply) => {
                    let _ = queries.send((filter, reply));
                }
                StoreMsg::Status(reply) => {
                    let _ = reply.send(shared.status());
                }
                StoreMsg::Spooled(reply) => {
                    let _ = reply.send(());
                }
                _ => unreachable!("only queries and statuses are answered after"),
            }
        }
    }
}

/// The database task.
struct Store {
    url: Option<DatabaseUrl>,
    sql: Sql,
    host: String,
    pool: Option<AnyPool>,
    shared: Arc<Shared>,
    /// `watchdog_processes` rows as last written; None until written since connecting.
    /// The very snapshot the channel holds (shared, not copied): with 10,000 watched a
    /// copy of the table is ~4.5 MiB.
    written: Option<Rows>,
    /// When `written` was last written or found unchanged by a transaction.
    written_at: Instant,
}

impl Store {
    async fn run(
        mut self,
        wake: Arc<Notify>,
        mut queries: mpsc::UnboundedReceiver<(EventFilter, QueryReply)>,
        mut processes: watch::Receiver<Rows>,
    ) -> Result<()> {
        loop {
            if self.pool.is_none() {
                self.reconnect().await;
            }
            let wanted = processes.borrow_and_update().clone();
            self.sync(wanted).await;
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(RETRY_EVERY) => {}
                query = queries.recv() => match query {
                    Some((filter, reply)) => {
                        let _ = reply.send(self.query(&filter).await);
                    }
                    // The front task is gone: the daemon is stopping (or it died).
                    None => return Ok(()),
                },
            }
        }
    }

    async fn reconnect(&mut self) {
        let Some(url) = self.url.clone() else { return };
        match connect(&url).await {
            Ok(pool) => {
                tracing::info!(
                    database = url.redacted(),
                    "database connected, migrations applied"
                );
                self.pool = Some(pool);
                *self
                    .shared
                    .down
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = None;
                self.written = None;
            }
            Err(err) => self.went_down(format!("{err:#}")),
        }
    }

    fn went_down(&mut self, error: String) {
        let mut down = self
            .shared
            .down
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if down.as_ref() != Some(&error) {
            tracing::error!("{error}; kill records are spooled until it is back");
        }
        *down = Some(error);
        self.pool = None;
    }

    /// Writes the spool, then the process table's difference; on failure the database
    /// is marked down and everything stays for the next try.
    async fn sync(&mut self, wanted: Rows) {
        let Some(pool) = self.pool.clone() else {
            return;
        };
        if let Err(err) = self.flush_spool(&pool).await {
            return self.went_down(format!("writing to the database failed: {err:#}"));
        }
        if let Err(err) = self.write_processes(&pool, wanted).await {
            self.went_down(format!("writing to the database failed: {err:#}"));
        }
    }

    async fn flush_spool(&mut self, pool: &AnyPool) -> Result<()> {
        let (records, bytes) = {
            let mut spool = self.shared.spool();
            if spool.depth() == 0 {
                return Ok(());
            }
            spool.snapshot()?
        };
        if self.shared.fail_next_write.swap(false, Ordering::SeqCst) {
            panic!(
                "test fault: told to fail at its next write ({} records in the spool)",
                records.len()
            );
        }
        // A record the database refuses for good (it breaks a constraint) would block
        // every record behind it forever: it is set aside, said, and the rest go in.
        let mut refused: HashSet<&str> = HashSet::new();
        loop {
            let mut tx = pool.begin().await?;
            let mut rejected = None;
            for stored in records
                .iter()
                .filter(|r| !refused.contains(r.event_uid.as_str()))
            {
                match self.sql.insert(stored).execute(&mut *tx).await {
                    Ok(_) => {}
                    Err(err) if refused_for_good(&err) => {
                        rejected = Some((stored, err));
                        break;
                    }
                    Err(err) => return Err(err.into()),
                }
            }
            let Some((stored, err)) = rejected else {
                tx.commit().await?;
                break;
            };
            tx.rollback().await?;
            let side = self.shared.spool().set_aside(stored)?;
            self.shared.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                "the database refused the kill record of pid {} for good ({err}): kept in {}",
                stored.record.pid,
                side.display()
            );
            refused.insert(&stored.event_uid);
        }
        self.shared.spool().consume(bytes, records.len())?;
        tracing::debug!(rows = records.len(), "kill records written");
        Ok(())
    }

    async fn write_processes(&mut self, pool: &AnyPool, wanted: Rows) -> Result<()> {
        // The very snapshot written less than RETRY_EVERY ago: no transaction and no
        // 10,000-row diff after every query this task answers. Once a second the
        // (empty) transaction still runs, and still finds a database gone meanwhile.
        let unchanged = self
            .written
            .as_ref()
            .is_some_and(|written| Arc::ptr_eq(written, &wanted));
        if unchanged && self.written_at.elapsed() < RETRY_EVERY {
            return Ok(());
        }
        let mut tx = pool.begin().await?;
        let written = match self.written.take() {
            Some(written) => written,
            None => {
                // Rows of an earlier run on this host describe processes we no longer know.
                sqlx::query(self.sql.delete_host_processes)
                    .bind(self.host.clone())
                    .execute(&mut *tx)
                    .await?;
                Rows::default()
            }
        };
        fn by_pid(rows: &[ProcessRow]) -> HashMap<u32, &ProcessRow> {
            rows.iter().map(|r| (r.pid, r)).collect()
        }
        let (was, now) = (by_pid(&written), by_pid(&wanted));
        for pid in was.keys().filter(|p| !now.contains_key(p)) {
            sqlx::query(self.sql.delete_process)
                .bind(self.host.clone())
                .bind(i64::from(*pid))
                .execute(&mut *tx)
                .await?;
        }
        for row in now.values().filter(|r| was.get(&r.pid) != Some(*r)) {
            sqlx::query(self.sql.upsert_process())
                .bind(self.host.clone())
                .bind(i64::from(row.pid))
                .bind(i64::from(row.ppid))
                .bind(row.start_time.clone())
                .bind(Some(row.analysis_id.clone()).filter(|a| !a.is_empty()))
                .bind(i64_of(row.timeout_ms))
                .bind(i64_of(row.memory_bytes))
                .bind(row.tree_memory_bytes.map(i64_of))
                .bind(i64_of(row.grace_ms))
                .bind(row.orphans.clone())
                .bind(row.registered_at.clone())
                .bind(row.state.clone())
                .bind(i64::from(row.owner_uid))
                .execute(&mut *tx)
                .await?;
        }
        drop((was, now));
        match tx.commit().await {
            Ok(()) => {
                self.written = Some(wanted);
                self.written_at = Instant::now();
                Ok(())
            }
            Err(err) => {
                self.written = Some(written);
                Err(err.into())
            }
        }
    }

    /// The records the filter admits: the database's, and those still waiting in the
    /// spool (held or in the file). This task alone writes the spool to the database and
    /// takes committed records out of it in the same step, so none is in both.
    async fn query(&mut self, filter: &EventFilter) -> EventsFound {
        let spooled = self.spooled(filter);
        let (stored, database_error) = match self.query_database(filter).await {
            Ok(stored) => (stored, None),
            Err(err) => (Vec::new(), Some(err)),
        };
        let mut records: Vec<EventRecord> = spooled
            .into_iter()
            .map(|stored| EventRecord {
                record: stored.record,
                spooled: true,
                event_uid: stored.event_uid,
            })
            .chain(stored)
            .collect();
        // Newest first (RFC 3339 UTC, same precision: text order is time order).
        records.sort_by(|a, b| b.order_key().cmp(&a.order_key()));
        // The spooled ones and the database's each fit the limit; together they may not.
        records.truncate(usize::try_from(filter.max_records()).unwrap_or(usize::MAX));
        (records, database_error)
    }

    /// The spool's records the filter admits, newest first.
    fn spooled(&self, filter: &EventFilter) -> Vec<StoredRecord> {
        let waiting = self.shared.spool().waiting();
        match waiting {
            Ok(records) => records
                .into_iter()
                .rev()
                .filter(|r| filter.admits_stored(r))
                .collect(),
            Err(err) => {
                tracing::error!("{err:#}: events shows no spooled records this time");
                Vec::new()
            }
        }
    }

    async fn query_database(&mut self, filter: &EventFilter) -> Result<Vec<EventRecord>, String> {
        let Some(pool) = self.pool.clone() else {
            let status = self.shared.status();
            return Err(format!(
                "the database is unavailable ({}): {} kill records wait in the spool {} and will be \
                 written when it is back",
                status.error.as_deref().unwrap_or("not connected"),
                status.spool_depth,
                status.spool_path
            ));
        };
        let cursor = filter.before.as_deref().and_then(parse_cursor);
        let rows = sqlx::query(self.sql.select_events())
            .bind(filter.since.clone())
            .bind(filter.analysis_id.clone())
            .bind(filter.reason.clone())
            .bind(filter.host.clone())
            .bind(filter.max_records())
            .bind(cursor.map(|(time, _)| time.to_string()))
            .bind(cursor.map(|(_, uid)| uid.to_string()))
            .fetch_all(&pool)
            .await
            .map_err(|e| format!("reading watchdog_events failed: {e}"))?;
        rows.iter()
            .map(|row| {
                Ok(EventRecord {
                    record: record_from_row(row)?,
                    spooled: false,
                    event_uid: row.try_get("event_uid")?,
                })
            })
            .collect::<Result<_>>()
            .map_err(|e| format!("{e:#}"))
    }
}

fn record_from_row(row: &AnyRow) -> Result<KillRecord> {
    let reason: String = row.try_get("reason")?;
    let outcome: String = row.try_get("outcome")?;
    let signals: String = row.try_get("signals")?;
    let u32_of = |name: &str| -> Result<u32> { Ok(u32::try_from(row.try_get::<i64, _>(name)?)?) };
    Ok(KillRecord {
        time: row.try_get("time")?,
        host: row.try_get("host")?,
        pid: u32_of("pid")?,
        ppid: u32_of("ppid")?,
        analysis_id: row
            .try_get::<Option<String>, _>("analysis_id")?
            .unwrap_or_default(),
        reason: serde_json::from_value(serde_json::Value::String(reason))?,
        limit: row
            .try_get::<Option<i64>, _>("limit_value")?
            .map(|v| v as u64),
        rss_bytes: row.try_get::<i64, _>("rss_bytes")? as u64,
        runtime_ms: row.try_get::<i64, _>("runtime_ms")? as u64,
        signals: serde_json::from_str(&signals)?,
        outcome: serde_json::from_value(serde_json::Value::String(outcome))?,
        comm: row.try_get("comm")?,
        cmdline: row.try_get("cmdline")?,
        uid: u32_of("uid")?,
        owner_uid: row
            .try_get::<Option<i64>, _>("owner_uid")?
            .and_then(|v| u32::try_from(v).ok()),
        warned_of: row
            .try_get::<Option<String>, _>("warned_of")?
            .map(|w| serde_json::from_value(serde_json::Value::String(w)))
            .transpose()?,
        zombies: row.try_get::<Option<i64>, _>("zombies")?.map(|v| v as u64),
        tree_pss_bytes: row
            .try_get::<Option<i64>, _>("tree_pss_bytes")?
            .map(|v| v as u64),
        tree_rss_bytes: row
            .try_get::<Option<i64>, _>("tree_rss_bytes")?
            .map(|v| v as u64),
        shmem_bytes: row
            .try_get::<Option<i64>, _>("shmem_bytes")?
            .map(|v| v as u64),
        shm_left: row
            .try_get::<Option<String>, _>("shm_left")?
            .map(|left| serde_json::from_str(&left))
            .transpose()?
            .unwrap_or_default(),
        refused_forks: row
            .try_get::<Option<i64>, _>("refused_forks")?
            .map(|v| v as u64),
    })
}

/// `watchdog-user bench-store`: insert throughput of kill records, one transaction per
/// record (what a daemon does for an isolated kill) against one per `batch` records (a
/// spool flush after an outage, or a kill of a whole tree). Returns rows/s for each.
pub async fn bench_inserts(url: &DatabaseUrl, rows: usize, batch: usize) -> Result<(f64, f64)> {
    let pool = connect(url).await?;
    let sql = Sql::new(url.dialect);
    let record = |i: usize| StoredRecord {
        event_uid: uuid::Uuid::new_v4().to_string(),
        record: KillRecord {
            time: crate::vocab::units::rfc3339(std::time::SystemTime::now()),
            host: "bench".into(),
            pid: 1000 + i as u32,
            ppid: 999,
            analysis_id: "bench".into(),
            reason: crate::vocab::limits::Reason::Timeout,
            limit: Some(1_800_000),
            rss_bytes: 123 << 20,
            runtime_ms: 1_800_000,
            signals: vec![crate::vocab::record::SignalSent {
                signal: "SIGTERM".into(),
                at: crate::vocab::units::rfc3339(std::time::SystemTime::now()),
                by: None,
            }],
            outcome: crate::vocab::record::Outcome::ExitedAfterSigterm,
            comm: "python3".into(),
            cmdline: "python3 analysis.py --input data.h5".into(),
            uid: 1000,
            owner_uid: Some(1000),
            warned_of: None,
            zombies: None,
            tree_pss_bytes: None,
            tree_rss_bytes: None,
            shmem_bytes: None,
            shm_left: Vec::new(),
            refused_forks: None,
        },
    };
    let started = std::time::Instant::now();
    for i in 0..rows {
        sql.insert(&record(i)).execute(&pool).await?;
    }
    let single = rows as f64 / started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    for chunk in (0..rows).collect::<Vec<_>>().chunks(batch.max(1)) {
        let mut tx = pool.begin().await?;
        for &i in chunk {
            sql.insert(&record(i)).execute(&mut *tx).await?;
        }
        tx.commit().await?;
    }
    let batched = rows as f64 / started.elapsed().as_secs_f64();
    sqlx::query("DELETE FROM watchdog_events WHERE host = 'bench'")
        .execute(&pool)
        .await?;
    Ok((single, batched))
}

/// `watchdog-user migrate`: apply the migrations and stop.
pub async fn migrate(url: &DatabaseUrl) -> Result<()> {
    connect(url).await.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spooled_records_are_filtered_as_the_database_filters_rows() {
        let record = |time: &str, reason| KillRecord {
            time: time.into(),
            host: "h".into(),
            pid: 7,
            ppid: 1,
            analysis_id: "a".into(),
            reason,
            limit: None,
            rss_bytes: 0,
            runtime_ms: 0,
            signals: Vec::new(),
            outcome: crate::vocab::record::Outcome::Killed,
            comm: "c".into(),
            cmdline: String::new(),
            uid: 0,
            owner_uid: None,
            warned_of: None,
            zombies: None,
            tree_pss_bytes: None,
            tree_rss_bytes: None,
            shmem_bytes: None,
            shm_left: Vec::new(),
            refused_forks: None,
        };
        let late = record(
            "2026-11-21T12:00:00.500Z",
            crate::vocab::limits::Reason::Timeout,
        );
        let filter =
            |since: Option<&str>, analysis: Option<&str>, reason: Option<&str>| EventFilter {
                since: since.map(Into::into),
                analysis_id: analysis.map(Into::into),
                reason: reason.map(Into::into),
                host: None,
                limit: None,
                before: None,
            };
        assert!(filter(None, None, None).admits(&late));
        assert!(filter(Some("2026-11-21T12:00:00.500Z"), Some("a"), Some("timeout")).admits(&late));
        assert!(!filter(Some("2026-11-21T12:00:01.000Z"), None, None).admits(&late));
        assert!(!filter(None, Some("b"), None).admits(&late));
        assert!(!filter(None, None, Some("memory")).admits(&late));
    }

    #[test]
    fn urls_are_checked_and_passwords_never_shown() {
        let pg = DatabaseUrl::parse("postgres://w:secret@db:5432/watchdog").unwrap();
        assert_eq!(pg.dialect, Dialect::Postgres);
        assert_eq!(pg.redacted(), "postgres://w:***@db:5432/watchdog");
        let lite = DatabaseUrl::parse("sqlite:///var/lib/watchdog/watchdog.db").unwrap();
        assert_eq!(
            lite.sqlite_path().unwrap(),
            PathBuf::from("/var/lib/watchdog/watchdog.db")
        );
        for bad in ["mysql://x", "localhost", "postgres://", "sqlite://"] {
            assert!(
                DatabaseUrl::parse(bad)
                    .unwrap_err()
                    .contains("postgres://USER"),
                "{bad}"
            );
        }
    }
}
