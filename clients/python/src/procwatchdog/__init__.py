"""procwatchdog: the Python client of the eBPF process watchdog (``watchdog-user``).

Standard library only. Named ``procwatchdog``, not ``watchdog``: ``watchdog`` on PyPI is
the popular filesystem-events package, and a module of the same name would shadow it
(or be shadowed by it) in any environment that has both.

    import procwatchdog as wd

    wd.register(pid, "run-42", timeout="2h", memory="8GiB")
    proc = wd.Popen(["python", "fit.py"], "run-43", timeout="30m")
    with wd.watch("run-44", timeout="1h"):
        subprocess.run(["./pipeline.sh"])        # registered before it runs anything
    wd.events(since="1h", reason="timeout")

The module-level functions use a ``Client()`` on ``$WATCHDOG_SOCKET`` (else
``/run/watchdog/watchdog.sock``); make a ``Client(socket=...)`` for another daemon.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from .client import DEFAULT_SOCKET, REASONS, Client, limits
from .errors import NoDaemon, NotFound, Refused, WatchdogError
from .spawn import Popen, Watch
from .units import parse_duration_ms, parse_size_bytes

__all__ = [
    "Client",
    "DEFAULT_SOCKET",
    "NoDaemon",
    "NotFound",
    "Popen",
    "REASONS",
    "Refused",
    "Watch",
    "WatchdogError",
    "events",
    "limits",
    "parse_duration_ms",
    "parse_size_bytes",
    "register",
    "status",
    "tree",
    "unregister",
    "watch",
]

__version__ = "0.1.0"


def register(pid: int, analysis_id: str, **limits_: Any) -> Dict[str, Any]:
    """``Client().register(...)``: watch ``pid`` and all it forks as ``analysis_id``.
    Limits: timeout, memory, tree_memory, grace, orphans, max_processes, max_zombies,
    warn_at, warn_signal."""
    return Client().register(pid, analysis_id, **limits_)


def unregister(pid: Optional[int] = None, analysis_id: Optional[str] = None) -> Dict[str, Any]:
    """``Client().unregister(...)``: exactly one of pid= or analysis_id=."""
    return Client().unregister(pid=pid, analysis_id=analysis_id)


def watch(analysis_id: str, **limits_: Any) -> Watch:
    """``with watch("run-1", timeout="1h"): ...``: every child this process starts in
    the block is watched as ``run-1`` from its first instruction (see ``Watch``)."""
    return Watch(analysis_id, **limits_)


def status() -> Dict[str, Any]:
    """``Client().status()``: the daemon's counters."""
    return Client().status()


def events(since: Any = None, analysis_id: Optional[str] = None, reason: Optional[str] = None,
           host: Optional[str] = None) -> List[Dict[str, Any]]:
    """``Client().events(...)``: the kill history, newest first."""
    return Client().events(since=since, analysis_id=analysis_id, reason=reason, host=host)


def tree(analysis_id: Optional[str] = None) -> Dict[str, Any]:
    """``Client().tree(...)``: the live tree of watched processes."""
    return Client().tree(analysis_id)
