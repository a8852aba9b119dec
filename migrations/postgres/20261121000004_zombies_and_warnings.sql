-- Zombies and warnings (issue 12). Reason `zombies`: a process held more unreaped
-- children than its analysis' --max-zombies and was killed so that init reaps them;
-- `zombies` is how many it held. Reason `warning` with outcome `warned`: the analysis'
-- root was sent the warning signal at --warn-at of a limit; `warned_of` names the limit
-- (timeout, memory, tree_memory) and `limit_value` is that limit.
ALTER TABLE watchdog_events DROP CONSTRAINT watchdog_events_reason_check;
ALTER TABLE watchdog_events ADD CONSTRAINT watchdog_events_reason_check
    CHECK (reason IN ('timeout', 'memory', 'tree_memory', 'orphan', 'max_processes', 'map_full',
                      'zombies', 'warning'));
ALTER TABLE watchdog_events DROP CONSTRAINT watchdog_events_outcome_check;
ALTER TABLE watchdog_events ADD CONSTRAINT watchdog_events_outcome_check
    CHECK (outcome IN ('exited_after_sigterm', 'killed', 'already_gone', 'logged', 'dry_run',
                       'warned'));
ALTER TABLE watchdog_events ADD COLUMN warned_of TEXT
    CHECK (warned_of IN ('timeout', 'memory', 'tree_memory'));
ALTER TABLE watchdog_events ADD COLUMN zombies BIGINT;
