-- The kill reasons are the daemon's: it adds each reason it knows to watchdog_reasons
-- when it connects, so a new reason needs no migration; a record's reason must be one
-- of them.
CREATE TABLE watchdog_reasons (
    name TEXT PRIMARY KEY
);
INSERT INTO watchdog_reasons (name)
    VALUES ('timeout'), ('memory'), ('tree_memory'), ('orphan'), ('max_processes'),
           ('map_full'), ('zombies'), ('warning');
ALTER TABLE watchdog_events DROP CONSTRAINT watchdog_events_reason_check;
ALTER TABLE watchdog_events ADD CONSTRAINT watchdog_events_reason_fkey
    FOREIGN KEY (reason) REFERENCES watchdog_reasons (name);
