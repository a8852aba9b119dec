-- Who owns what (issue 11): the uid of the caller that created the analysis, on every
-- kill record and every watched process. Callers other than root may watch only their
-- own processes, so an operator can answer "whose analysis was this" from the rows.
-- NULL on the records written before this migration (their owner was not kept).
ALTER TABLE watchdog_events ADD COLUMN owner_uid BIGINT;
ALTER TABLE watchdog_processes ADD COLUMN owner_uid BIGINT;
CREATE INDEX watchdog_events_owner_time ON watchdog_events (owner_uid, time DESC);
