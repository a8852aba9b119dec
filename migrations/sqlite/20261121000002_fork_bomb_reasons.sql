-- Two new kill reasons (issue 10): max_processes and map_full. SQLite cannot change a
-- CHECK constraint in place: the table is rebuilt, rows and ids kept.
CREATE TABLE watchdog_events_new (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_uid   TEXT    NOT NULL UNIQUE,
    time        TEXT    NOT NULL,
    host        TEXT    NOT NULL,
    pid         INTEGER NOT NULL,
    ppid        INTEGER NOT NULL,
    analysis_id TEXT,
    reason      TEXT    NOT NULL
                CHECK (reason IN ('timeout', 'memory', 'tree_memory', 'orphan', 'max_processes', 'map_full')),
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
INSERT INTO watchdog_events_new SELECT * FROM watchdog_events;
DROP TABLE watchdog_events;
ALTER TABLE watchdog_events_new RENAME TO watchdog_events;
CREATE INDEX watchdog_events_time ON watchdog_events (time DESC);
CREATE INDEX watchdog_events_analysis_time ON watchdog_events (analysis_id, time DESC);
CREATE INDEX watchdog_events_reason_time ON watchdog_events (reason, time DESC);
CREATE INDEX watchdog_events_host_time ON watchdog_events (host, time DESC);
