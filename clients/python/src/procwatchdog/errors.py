"""The exceptions the client raises, each carrying the daemon's own message.

The daemon answers a request it will not carry out with ``{"error": "<one line>"}`` and
no code, so the class is chosen from the line's wording (``classify``); the line itself
is always the exception's message, unchanged.
"""

from __future__ import annotations

import re
from typing import Optional


class WatchdogError(Exception):
    """Anything the watchdog could not do. ``message`` is the daemon's line (or the
    client's, when the daemon never answered); ``socket`` the control socket asked; ``op``
    the request (``register``, ``unregister``, ...), when there was one.

    Raised as itself when the daemon failed on its side (it is shutting down, its
    database is unavailable for ``events``, it closed the connection without answering).
    """

    def __init__(self, message: str, *, socket: Optional[str] = None, op: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.socket = socket
        self.op = op


class NoDaemon(WatchdogError):
    """The control socket could not be reached: no file there, no daemon behind it, or
    no permission to connect (this user is not in the socket's group). The message
    names the socket and the cause."""


class Refused(WatchdogError):
    """The daemon said no: bad input (an empty or too long analysis id, a zero limit, a
    memory limit above the machine's memory, pid 1, a process already watched by another
    analysis, a malformed or over-long request) or a rule (a process or analysis that
    belongs to another user). Nothing was changed."""


class NotFound(WatchdogError, LookupError):
    """What the request named does not exist: a pid that is not watched, an analysis
    that is not watched, a process that does not exist (or exited while it was being
    registered)."""


# The daemon's lines that mean "no such thing" (watchdog-user/src/rules.rs).
_NOT_FOUND = [
    re.compile(r"^pid \d+ is not watched\b"),
    re.compile(r"^no analysis .* is watched\b"),
    re.compile(r"^no process with pid \d+\b"),
    re.compile(r"^pid \d+ exited while it was being registered\b"),
]

# Lines that say the daemon failed on its side: not the caller's fault, and not a "no".
_DAEMON_FAILURE = [
    re.compile(r"^the daemon is shutting down\b"),
    re.compile(r"^the daemon dropped the request\b"),
    re.compile(r"^the database is unavailable\b"),
    re.compile(r"^the database writer stopped\b"),
    re.compile(r"^reading watchdog_events failed\b"),
    re.compile(r"^internal:"),
]


def classify(message: str, *, socket: Optional[str] = None, op: Optional[str] = None) -> WatchdogError:
    """The exception for the daemon's error line ``message``: NotFound for "is not
    watched" / "no analysis" / "no process", WatchdogError for the daemon's own
    failures, Refused for every other refusal (bad input, an access rule)."""
    text = message.strip()
    if any(p.search(text) for p in _NOT_FOUND):
        cls = NotFound
    elif any(p.search(text) for p in _DAEMON_FAILURE):
        cls = WatchdogError
    else:
        cls = Refused
    return cls(message, socket=socket, op=op)
