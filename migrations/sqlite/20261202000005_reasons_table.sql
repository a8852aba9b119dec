-- The kill reasons are the daemon's: it adds each reason it knows to watchdog_reasons
-- when it connects, so a new reason needs no migration; a record's reason must be one
-- of them. SQLite cannot change a constraint in place: the table is rebuilt, rows and
-- ids kept.
CREATE TABLE watchdog_reasons (
    name TEXT PRIMARY KEY
);
INSERT INTO watchdog_reasons (name)
    VALUES ('timeout'), ('memory'), ('tree_memory'), ('orphan'), ('max_processes'),
           ('map_full'), ('zombies'), ('warning');
CREATE TABLE watchdog_events_new (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_uid   TEXT    NOT NULL UNIQUE,
    time        TEXT    NOT NULL,
    host        TEXT    NOT NULL,
    pid         INTEGER NOT NULL,
    ppid        INTEGER NOT NULL,
    analysis_id TEXT,
    reason      TEXT    NOT NULL REFERENCES watchdog_reasons (name),
    limit_value INTEGER,
    rss_bytes   INTEGER NOT NULL,
    runtime_ms  INTEGER NOT NULL,
    signals     TEXT    NOT NULL,
    outcome     TEXT    NOT NULL
                CHECK (outcome IN ('exited_after_sigterm', 'killed', 'already_gone', 'logged',
                                   'dry_run', 'warned')),
    comm        TEXT    NOT NULL,
    cmdline     TEXT    NOT NULL,
    uid         INTEGER NOT NULL,
    owner_uid   INTEGER,
    warned_of   TEXT    CHECK (warned_of IN ('timeout', 'memory', 'tree_memory')),
    zombies     INTEGER
);
INSERT INTO watchdog_events_new (id, event_uid, time, host, pid, ppid, analysis_id, reason,
                                 limit_value, rss_bytes, runtime_ms, signals, outcome, comm,
                                 cmdline, uid, owner_uid, warned_of, zombies)
    SELECT id, event_uid, time, host, pid, ppid, analysis_id, reason, limit_value, rss_bytes,
           runtime_ms, signals, outcome, comm, cmdline, uid, owner_uid, warned_of, zombies
    FROM watchdog_events;
DROP TABLE watchdog_events;
ALTER TABLE watchdog_events_new RENAME TO watchdog_events;
CREATE INDEX watchdog_events_time ON watchdog_events (time DESC);
CREATE INDEX watchdog_events_analysis_time ON watchdog_events (analysis_id, time DESC);
CREATE INDEX watchdog_events_reason_time ON watchdog_events (reason, time DESC);
CREATE INDEX watchdog_events_host_time ON watchdog_events (host, time DESC);
CREATE INDEX watchdog_events_owner_time ON watchdog_events (owner_uid, time DESC);
