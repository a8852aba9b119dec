-- Who owns what (issue 11): the uid of the caller that created the analysis, on every
-- kill record and every watched process. A column without a constraint needs no table
-- rebuild in SQLite (unlike 20261121000002's CHECK change): ADD COLUMN keeps rows and
-- ids. NULL on the records written before this migration (their owner was not kept).
ALTER TABLE watchdog_events ADD COLUMN owner_uid INTEGER;
ALTER TABLE watchdog_processes ADD COLUMN owner_uid INTEGER;
CREATE INDEX watchdog_events_owner_time ON watchdog_events (owner_uid, time DESC);
