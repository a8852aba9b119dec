-- Outcome `refused`: reason `max_processes` with the kernel refusing the forks past the
-- limit (EAGAIN) instead of the analysis being killed; `refused_forks` is how many forks
-- one burst of refusals refused.
ALTER TABLE watchdog_events DROP CONSTRAINT watchdog_events_outcome_check;
ALTER TABLE watchdog_events ADD CONSTRAINT watchdog_events_outcome_check
    CHECK (outcome IN ('exited_after_sigterm', 'killed', 'already_gone', 'logged', 'dry_run',
                       'warned', 'released', 'refused'));
ALTER TABLE watchdog_events ADD COLUMN refused_forks BIGINT;
