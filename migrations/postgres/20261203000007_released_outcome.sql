-- Outcome `released`: the process was unregistered while it was being killed, and was
-- let go alive after the signals its record lists.
ALTER TABLE watchdog_events DROP CONSTRAINT watchdog_events_outcome_check;
ALTER TABLE watchdog_events ADD CONSTRAINT watchdog_events_outcome_check
    CHECK (outcome IN ('exited_after_sigterm', 'killed', 'already_gone', 'logged', 'dry_run',
                       'warned', 'released'));
