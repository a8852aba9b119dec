"""The daemon's limit set, one row per limit: the keyword, the request's field, the kind
of value, the noun its refusals use, the daemon's built-in default.

Generated from watchdog-user/src/vocab/limits.rs (its test `the_python_client_has_this_builds_limit_set`
writes it with WATCHDOG_BLESS=1): do not edit.
"""

LIMITS = (
    ("timeout", "timeout_ms", "duration", "the timeout", "30m"),
    ("memory", "memory_bytes", "size", "the memory limit", "2GiB"),
    ("tree_memory", "tree_memory_bytes", "size", "the tree memory limit", "none"),
    ("grace", "grace_ms", "duration", "the grace period", "10s"),
    ("orphans", "orphans", "orphans", "the orphan policy", "kill"),
    ("max_processes", "max_processes", "count", "the process limit", "10000"),
    ("max_zombies", "max_zombies", "count", "the zombie limit", "1000"),
    ("warn_at", "warn_at_percent", "percent", "the warning", "off"),
    ("warn_signal", "warn_signal", "signal", "the warning signal", "SIGUSR1"),
)
