"""The client: one JSON request per line over the daemon's Unix socket, one JSON answer.

The protocol is ``watchdog-user/src/protocol.rs``: a request is an object tagged by
``"op"``; the answer is ``{"ok": {...}}`` (the reply, tagged by ``"kind"``) or
``{"error": "<one line>"}``. Each call opens its own connection, as the CLI does, so a
``Client`` holds no connection and can be shared between threads.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import signal as _signal
import socket as _socket
from typing import Any, Dict, Iterator, List, Optional, Union

from .errors import NoDaemon, WatchdogError, from_response
from ._limits import LIMITS
from .units import Duration, parse_duration_ms, parse_size_bytes

DEFAULT_SOCKET = "/run/watchdog/watchdog.sock"

# The daemon's kill reasons (`Reason` in watchdog-user/src/vocab/limits.rs), for `events(reason=...)`.
REASONS = ("timeout", "memory", "tree_memory", "orphan", "max_processes", "map_full", "zombies", "warning")

PathLike = Union[str, "os.PathLike[str]"]


# The keywords of the limits, by name: (the request's field, kind, noun, default).
LIMIT_KEYWORDS = {keyword: row for keyword, *row in LIMITS}


def limits(**given: Any) -> Dict[str, Any]:
    """The protocol's ``limits`` object for these keywords, one per limit of the
    daemon's limit set (``LIMIT_KEYWORDS``, from ``_limits.py``): ``timeout``,
    ``memory``, ``tree_memory``, ``grace``, ``orphans``, ``max_processes``,
    ``max_zombies``, ``warn_at``, ``warn_signal``. Each left out (or None) takes the
    daemon's default (the built-in ones are in ``LIMIT_KEYWORDS``; a host's daemon may
    be configured otherwise). Durations are texts such as ``"90s"``, seconds or
    ``timedelta``; sizes texts such as ``"2GiB"`` or bytes; counts ints, 0 for no
    limit; ``warn_at`` the part of the timeout and of each memory limit at which the
    analysis' root gets ``warn_signal`` (``80`` or ``"80%"``; ``0`` or ``"off"``: none);
    ``warn_signal`` a name (``"SIGUSR2"``) or a ``signal.Signals``; ``orphans``
    ``"kill"`` or ``"log"``. TypeError for an unknown keyword, ValueError/TypeError for
    a bad value, before anything is sent."""
    out: Dict[str, Any] = {}
    for keyword, value in given.items():
        if keyword not in LIMIT_KEYWORDS:
            raise TypeError(f"unknown limit {keyword!r}: use one of {', '.join(LIMIT_KEYWORDS)}")
        if value is None:
            continue
        field, kind, noun, _default = LIMIT_KEYWORDS[keyword]
        out[field] = _CONVERT[kind](value, keyword, noun[4:] if noun.startswith("the ") else noun)
    return out


def _count(value: Any, keyword: str, _noun: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"invalid {keyword} {value!r}: use a whole number such as 500, or 0 for no limit")
    return value


def _orphans(value: Any, _keyword: str, _noun: str) -> str:
    if value not in ("kill", "log"):
        raise ValueError(f"invalid orphans {value!r}: use 'kill' (SIGTERM them at once) or 'log' (only record them)")
    return value


def _percent(value: Union[int, str], _keyword: str = "warn_at", _noun: str = "") -> int:
    """``80``, ``"80%"``: 1 to 99; ``0``, ``"off"``: no warning."""
    text = value.strip() if isinstance(value, str) else value
    if text == "off":
        return 0
    if isinstance(text, str) and text.endswith("%"):
        text = text[:-1].strip()
    try:
        percent = int(text) if not isinstance(text, bool) else -1
    except (TypeError, ValueError):
        percent = -1
    if not 0 <= percent <= 99:
        raise ValueError(f"invalid warn_at {value!r}: use 1% to 99% of the limit, such as 80 or '80%', or 'off'")
    return percent


def _signal_name(value: Union[int, str], _keyword: str = "warn_signal", _noun: str = "") -> str:
    """``"SIGUSR1"``, ``"usr1"``, ``signal.SIGUSR1``: the signal's full name, one a
    process can catch."""
    try:
        if isinstance(value, str):
            name = value.strip().upper()
            sig = _signal.Signals[name if name.startswith("SIG") else "SIG" + name]
        elif isinstance(value, int) and not isinstance(value, bool):
            sig = _signal.Signals(value)
        else:
            raise TypeError(f"the warning signal must be a name or a signal, not {type(value).__name__}")
    except (KeyError, ValueError):
        raise ValueError(f"invalid warn_signal {value!r}: use a signal name such as 'SIGUSR1', 'SIGUSR2' or 'SIGINT'") from None
    if sig in (_signal.SIGKILL, _signal.SIGSTOP):
        raise ValueError(f"the warning signal {sig.name} cannot be caught, so it warns nobody: use one such as SIGUSR1")
    return sig.name


# How each kind of limit value is checked and turned into the request's form.
_CONVERT = {
    "duration": lambda value, _keyword, noun: parse_duration_ms(value, noun),
    "size": lambda value, _keyword, noun: parse_size_bytes(value, noun),
    "count": _count,
    "orphans": _orphans,
    "percent": _percent,
    "signal": _signal_name,
}


def _pid(pid: Any) -> int:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0 or pid > 0xFFFFFFFF:
        raise ValueError(f"invalid pid {pid!r}: a process id is a positive int")
    return pid


def _since(since: Union[None, Duration, datetime.datetime]) -> Optional[str]:
    """The protocol's ``since`` (RFC 3339, UTC, milliseconds, as the daemon writes
    record times) for a datetime, or for a duration meaning "the last ...". """
    if since is None:
        return None
    if isinstance(since, datetime.datetime):
        at = since.astimezone(datetime.timezone.utc)  # a naive datetime is local time
    else:
        back = parse_duration_ms(since, "since")
        at = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(milliseconds=back)
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


class Client:
    """A client of the watchdog daemon at ``socket`` (default: ``$WATCHDOG_SOCKET``,
    else ``/run/watchdog/watchdog.sock``). ``timeout``: seconds to wait for an answer."""

    def __init__(self, socket: Optional[PathLike] = None, *, timeout: float = 30.0):
        if socket is None:
            socket = os.environ.get("WATCHDOG_SOCKET") or DEFAULT_SOCKET
        self.socket = os.fspath(socket)
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"Client(socket={self.socket!r})"

    # --- the requests -------------------------------------------------------------

    def register(
        self,
        pid: int,
        analysis_id: str,
        **limits_: Any,
) -> Dict[str, Any]:
        """Watch ``pid``, its existing descendants and all it forks from now on, as
        analysis ``analysis_id``. Returns the daemon's reply:
        ``{"kind": "registered", "pid": ..., "analysis_id": ..., "watched": N}``."""
        return self._register(
            _pid(pid),
            analysis_id,
            limits(**limits_),
            fresh=False,
        )

    def _register(self, pid: int, analysis_id: str, limits_: Dict[str, Any], *, fresh: bool) -> Dict[str, Any]:
        if not isinstance(analysis_id, str):
            raise TypeError(f"the analysis id must be a str, not {type(analysis_id).__name__}")
        request: Dict[str, Any] = {"op": "register", "pid": pid, "analysis_id": analysis_id, "limits": limits_}
        if fresh:
            request["fresh"] = True
        return self.call(request)

    def _launch(self, pid: int, analysis_id: str, limits_: Dict[str, Any]) -> Dict[str, Any]:
        """Every child ``pid`` forks from now on is in analysis ``analysis_id`` (``pid``
        never is), until it exits or the analysis is unregistered."""
        if not isinstance(analysis_id, str):
            raise TypeError(f"the analysis id must be a str, not {type(analysis_id).__name__}")
        return self.call({"op": "launch", "pid": _pid(pid), "analysis_id": analysis_id, "limits": limits_})

    def unregister(self, pid: Optional[int] = None, analysis_id: Optional[str] = None) -> Dict[str, Any]:
        """Stop watching ``pid`` with its subtree, or the whole analysis ``analysis_id``
        (exactly one of them). Returns ``{"kind": "unregistered", "removed": N}``."""
        if (pid is None) == (analysis_id is None):
            raise ValueError("unregister takes exactly one of pid= or analysis_id=")
        request: Dict[str, Any] = {"op": "unregister"}
        if pid is not None:
            request["pid"] = _pid(pid)
        else:
            request["analysis_id"] = analysis_id
        return self.call(request)

    def tree(self, analysis_id: Optional[str] = None) -> Dict[str, Any]:
        """The live tree: ``{"processes": [node, ...], "analyses": [analysis, ...]}``.
        The processes are flat and depth first (a root, everything below it, the next
        root), so any depth fits; a node has pid, ppid, depth (0 for a root),
        analysis_id, comm, age_ms, rss_bytes, orphan, zombie (true for an exited child
        its parent has not reaped: a leaf under that parent) and grace_left_ms (while
        being killed); an analysis has analysis_id, processes, zombies, deadline_in_ms,
        deadline_unix_ms and limits."""
        request: Dict[str, Any] = {"op": "dump_tree"}
        if analysis_id is not None:
            request["analysis_id"] = analysis_id
        return self.call(request)

    def status(self) -> Dict[str, Any]:
        """The daemon's counters, as ``watchdog-user status --json`` shows them."""
        return self.call({"op": "status"})

    def events(
        self,
        since: Union[None, Duration, datetime.datetime] = None,
        analysis_id: Optional[str] = None,
        reason: Optional[str] = None,
        host: Optional[str] = None,
    ) -> List[Dict[str, Any]]:
        """The kill history, newest first: one dict per killed (or logged, or warned)
        process, with time, host, pid, ppid, analysis_id, reason, limit, rss_bytes,
        runtime_ms, signals, outcome, comm, cmdline, uid; ``warned_of`` (reason
        ``warning``: the limit warned of), ``zombies`` (reason ``zombies``: how many it
        held) and ``"spooled": True`` for a record still waiting in the daemon's spool
        for the database. While the database cannot be read only the spooled records
        are returned. ``since``: a duration (``"1h"``: the last hour) or a datetime;
        ``reason``: one of ``REASONS``."""
        reply = self.call({"op": "events", "filter": _event_filter(since, analysis_id, reason, host)})
        return reply["records"]

    def iter_events(
        self,
        since: Union[None, Duration, datetime.datetime] = None,
        analysis_id: Optional[str] = None,
        reason: Optional[str] = None,
        host: Optional[str] = None,
        page: int = 1000,
    ) -> Iterator[Dict[str, Any]]:
        """Every record ``events`` would give with no cap on their number, newest first,
        read ``page`` records (at most 1,000) an answer: each answer that is full names
        where the next one starts."""
        wanted = _event_filter(since, analysis_id, reason, host)
        wanted["limit"] = page
        while True:
            reply = self.call({"op": "events", "filter": wanted})
            yield from reply["records"]
            if not reply.get("next"):
                return
            wanted["before"] = reply["next"]

    # --- starting processes already watched -----------------------------------------

    def Popen(self, args: Any, analysis_id: str, **kwargs: Any) -> "Popen":  # noqa: N802
        """``procwatchdog.Popen`` through this client."""
        from .spawn import Popen

        return Popen(args, analysis_id, client=self, **kwargs)

    def watch(self, analysis_id: str, **limits_: Any) -> "Watch":
        """``procwatchdog.watch`` through this client."""
        from .spawn import Watch

        return Watch(analysis_id, client=self, **limits_)

    # --- the wire -------------------------------------------------------------------

    def call(self, request: Dict[str, Any]) -> Dict[str, Any]:
        """Sends one request (a dict with "op") and returns the reply's object; raises
        the typed error for ``{"error": ...}``."""
        op = request.get("op")
        line = (json.dumps(request) + "\n").encode()
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.socket)
            except OSError as err:
                raise NoDaemon(self._no_daemon(err), socket=self.socket, op=op, kind="no_daemon") from err
            try:
                sock.sendall(line)
                answer = _read_line(sock)
            except _socket.timeout:
                raise WatchdogError(
                    f"the daemon at {self.socket} did not answer {op} within {self.timeout:g}s",
                    socket=self.socket,
                    op=op,
                    kind="unavailable",
                ) from None
            except OSError as err:
                raise WatchdogError(
                    f"talking to the daemon at {self.socket} failed ({err.strerror or err})",
                    socket=self.socket,
                    op=op,
                    kind="unavailable",
                ) from err
        finally:
            sock.close()
        if not answer:
            raise WatchdogError(
                f"the daemon at {self.socket} closed the connection without answering {op}",
                socket=self.socket,
                op=op,
                kind="unavailable",
            )
        try:
            response = json.loads(answer)
        except ValueError:
            raise WatchdogError(
                f"the daemon at {self.socket} sent an answer this client cannot read: {answer[:200]!r}",
                socket=self.socket,
                op=op,
                kind="internal",
            ) from None
        if isinstance(response, dict) and "ok" in response:
            return response["ok"]
        if isinstance(response, dict) and isinstance(response.get("error"), str):
            raise from_response(response["error"], response.get("kind"), socket=self.socket, op=op)
        raise WatchdogError(
            f"the daemon at {self.socket} sent an answer this client cannot read: {answer[:200]!r}",
            socket=self.socket,
            op=op,
            kind="internal",
        )

    def _no_daemon(self, err: OSError) -> str:
        path = self.socket
        if err.errno in (errno.EACCES, errno.EPERM):
            group = _group_of(path)
            who = f" (group {group!r})" if group else ""
            return (
                f"cannot connect to the watchdog daemon at {path}: permission denied. The socket "
                f"is open to root and its group{who} only: ask an administrator to add this user "
                "to that group (then log in again)"
            )
        reason = {
            errno.ENOENT: "no such socket",
            errno.ECONNREFUSED: "connection refused: the socket is left from a daemon that stopped",
            errno.ENOTSOCK: "not a socket",
        }.get(err.errno, err.strerror or str(err))
        return (
            f"no watchdog daemon at {path} ({reason}): start one with `watchdog-user run` "
            "(or `cargo xtask run`), or pass socket= / set WATCHDOG_SOCKET to a running one's"
        )


def _read_line(sock: _socket.socket) -> str:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        end = chunk.find(b"\n")
        if end >= 0:
            chunks.append(chunk[:end])
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def _group_of(path: str) -> Optional[str]:
    try:
        import grp

        return grp.getgrgid(os.stat(path).st_gid).gr_name
    except (OSError, KeyError, ImportError):
        return None


def _event_filter(since: Any, analysis_id: Optional[str], reason: Optional[str],
                  host: Optional[str]) -> Dict[str, Any]:
    """The ``events`` request's filter object: the fields given, checked."""
    if reason is not None and reason not in REASONS:
        raise ValueError(f"invalid reason {reason!r}: use one of {', '.join(REASONS)}")
    wanted = {"since": _since(since), "analysis_id": analysis_id, "reason": reason, "host": host}
    return {k: v for k, v in wanted.items() if v is not None}
