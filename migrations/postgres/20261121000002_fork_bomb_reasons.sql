-- Two new kill reasons (issue 10): max_processes (an analysis forked past its process
-- limit) and map_full (the kernel's watched map had no room; the analysis holding the
-- most of it was killed so that no other lost its tracking).
ALTER TABLE watchdog_events DROP CONSTRAINT watchdog_events_reason_check;
ALTER TABLE watchdog_events ADD CONSTRAINT watchdog_events_reason_check
    CHECK (reason IN ('timeout', 'memory', 'tree_memory', 'orphan', 'max_processes', 'map_full'));
