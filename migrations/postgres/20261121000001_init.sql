-- watchdog's tables in PostgreSQL. Many hosts may share one database: every row names
-- its host. No foreign keys into tables we do not own (analysis_id is free text).

CREATE TABLE watchdog_events (
    id          BIGSERIAL PRIMARY KEY,
    -- Unique per record: spool replays after an outage insert each record exactly once.
    event_uid   TEXT        NOT NULL UNIQUE,
    time        TIMESTAMPTZ NOT NULL,
    host        TEXT        NOT NULL,
    pid         BIGINT      NOT NULL,
    ppid        BIGINT      NOT NULL,
    analysis_id TEXT,
    reason      TEXT        NOT NULL CHECK (reason IN ('timeout', 'memory', 'tree_memory', 'orphan')),
    -- The limit crossed: ms for timeout, bytes for memory and tree_memory, none for orphan.
    limit_value BIGINT,
    rss_bytes   BIGINT      NOT NULL,
    runtime_ms  BIGINT      NOT NULL,
    -- [{"signal": "SIGTERM", "at": "<RFC 3339>"}, ...]
    signals     JSONB       NOT NULL,
    outcome     TEXT        NOT NULL
                CHECK (outcome IN ('exited_after_sigterm', 'killed', 'already_gone', 'logged', 'dry_run')),
    comm        TEXT        NOT NULL,
    cmdline     TEXT        NOT NULL,
    uid         BIGINT      NOT NULL
);

-- `events` filters: newest first, optionally by analysis, reason or host.
CREATE INDEX watchdog_events_time ON watchdog_events (time DESC);
CREATE INDEX watchdog_events_analysis_time ON watchdog_events (analysis_id, time DESC);
CREATE INDEX watchdog_events_reason_time ON watchdog_events (reason, time DESC);
CREATE INDEX watchdog_events_host_time ON watchdog_events (host, time DESC);

CREATE TABLE watchdog_processes (
    host              TEXT        NOT NULL,
    pid               BIGINT      NOT NULL,
    ppid              BIGINT      NOT NULL,
    start_time        TIMESTAMPTZ NOT NULL,
    analysis_id       TEXT,
    timeout_ms        BIGINT      NOT NULL,
    memory_bytes      BIGINT      NOT NULL,
    tree_memory_bytes BIGINT,
    grace_ms          BIGINT      NOT NULL,
    orphans           TEXT        NOT NULL CHECK (orphans IN ('kill', 'log')),
    registered_at     TIMESTAMPTZ NOT NULL,
    state             TEXT        NOT NULL CHECK (state IN ('running', 'grace', 'orphan')),
    PRIMARY KEY (host, pid)
);

CREATE INDEX watchdog_processes_analysis ON watchdog_processes (analysis_id);
