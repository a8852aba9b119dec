-- Outcome `refused`: reason `max_processes` with the kernel refusing the forks past the
-- limit (EAGAIN) instead of the analysis being killed; `refused_forks` is how many forks
-- one burst of refusals refused. SQLite cannot change a constraint in place: the table
-- is rebuilt, rows and ids kept.
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
                                   'dry_run', 'warned', 'released', 'refused')),
    comm        TEXT    NOT NULL,
    cmdline     TEXT    NOT NULL,
    uid         INTEGER NOT NULL,
    owner_uid   INTEGER,
    warned_of   TEXT    CHECK (warned_of IN ('timeout', 'memory', 'tree_memory')),
    zombies     INTEGER,
    tree_pss_bytes INTEGER,
    tree_rss_bytes INTEGER,
    shmem_bytes INTEGER,
    shm_left    TEXT,
    refused_forks INTEGER
);
INSERT INTO watchdog_events_new (id, event_uid, time, host, pid, ppid, analysis_id, reason,
                                 limit_value, rss_bytes, runtime_ms, signals, outcome, comm,
                                 cmdline, uid, owner_uid, warned_of, zombies, tree_pss_bytes,
                                 tree_rss_bytes, shmem_bytes, shm_left)
    SELECT id, event_uid, time, host, pid, ppid, analysis_id, reason, limit_value, rss_bytes,
           runtime_ms, signals, outcome, comm, cmdline, uid, owner_uid, warned_of, zombies,
           tree_pss_bytes, tree_rss_bytes, shmem_bytes, shm_left
    FROM watchdog_events;
DROP TABLE watchdog_events;
ALTER TABLE watchdog_events_new RENAME TO watchdog_events;
CREATE INDEX watchdog_events_time ON watchdog_events (time DESC);
CREATE INDEX watchdog_events_analysis_time ON watchdog_events (analysis_id, time DESC);
CREATE INDEX watchdog_events_reason_time ON watchdog_events (reason, time DESC);
CREATE INDEX watchdog_events_host_time ON watchdog_events (host, time DESC);
CREATE INDEX watchdog_events_owner_time ON watchdog_events (owner_uid, time DESC);
