-- Reason `tree_memory`: what crossed the limit, the analysis' PSS summed over its
-- processes (from /proc/PID/smaps_rollup), measured once the sum of their RSS crossed
-- it; both sums, in bytes, on every record of that kill.
ALTER TABLE watchdog_events ADD COLUMN tree_pss_bytes INTEGER;
ALTER TABLE watchdog_events ADD COLUMN tree_rss_bytes INTEGER;
