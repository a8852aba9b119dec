-- watchdog's tables in SQLite (the embedded default): the same tables as PostgreSQL's,
-- with SQLite's types. Times are RFC 3339 UTC text with milliseconds ('...Z'), which
-- sort in time order.

CREATE TABLE watchdog_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_uid   TEXT    NOT NULL UNIQUE,
    time        TEXT    NOT NULL,
    host        TEXT    NOT NULL,
    pid         INTEGER NOT NULL,
    ppid        INTEGER NOT NULL,
    analysis_id TEXT,
    reason      TEXT    NOT NULL CHECK (reason IN ('timeout', 'memory', 'tree_memory', 'orphan')),
    limit_value INTEGER,
    rss_bytes   INTEGER NOT NULL,
    runtime_ms  INTEGER NOT NULL,
    signals     TEXT    NOT NULL,
    outcome     TEXT    NOT NULL
                CHECK (outcome IN ('exited_after_sigterm', 'killed', 'already_gone', 'logged', 'dry_run')),
    comm        TEXT    NOT NULL,
    cmdline     TEXT    NOT NULL,
    uid         INTEGER NOT NULL
);

CREATE INDEX watchdog_events_time ON watchdog_events (time DESC);
CREATE INDEX watchdog_events_analysis_time ON watchdog_events (analysis_id, time DESC);
CREATE INDEX watchdog_events_reason_time ON watchdog_events (reason, time DESC);
CREATE INDEX watchdog_events_host_time ON watchdog_events (host, time DESC);

CREATE TABLE watchdog_processes (
    host              TEXT    NOT NULL,
    pid               INTEGER NOT NULL,
    ppid              INTEGER NOT NULL,
    start_time        TEXT    NOT NULL,
    analysis_id       TEXT,
    timeout_ms        INTEGER NOT NULL,
    memory_bytes      INTEGER NOT NULL,
    tree_memory_bytes INTEGER,
    grace_ms          INTEGER NOT NULL,
    orphans           TEXT    NOT NULL CHECK (orphans IN ('kill', 'log')),
    registered_at     TEXT    NOT NULL,
    state             TEXT    NOT NULL CHECK (state IN ('running', 'grace', 'orphan')),
    PRIMARY KEY (host, pid)
);

CREATE INDEX watchdog_processes_analysis ON watchdog_processes (analysis_id);
