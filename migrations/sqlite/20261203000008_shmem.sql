-- Reasons `memory` and `tree_memory`: the part of the memory measured that was in
-- tmpfs files (memfd, /dev/shm) and in no RSS, in bytes.
ALTER TABLE watchdog_events ADD COLUMN shmem_bytes INTEGER;
-- A whole analysis' kill, on its roots' records: the files its members left in tmpfs,
-- a JSON array of {"path", "bytes"}.
ALTER TABLE watchdog_events ADD COLUMN shm_left TEXT;
