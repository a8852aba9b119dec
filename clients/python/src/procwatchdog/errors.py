"""The exceptions the client raises, each carrying the daemon's own message.

The daemon answers a request it will not carry out with
``{"error": "<one line>", "kind": "<kind>"}``. The kind chooses the class (``CLASSES``);
the line is the exception's message, unchanged, and the kind its ``kind`` attribute:

- ``not_found``: NotFound
- ``refused``, ``bad_request``: Refused
- ``unavailable``, ``internal``: WatchdogError
- ``no_daemon``: NoDaemon (the client's own, when it cannot connect)

An answer without a kind, or with one this client does not know, raises WatchdogError.
"""

from __future__ import annotations

from typing import Dict, Optional, Type


class WatchdogError(Exception):
    """Anything the watchdog could not do. ``message`` is the daemon's line (or the
    client's, when the daemon never answered); ``kind`` the daemon's kind for it (or the
    client's: ``no_daemon``, ``unavailable`` when the daemon did not answer, ``internal``
    when its answer could not be read); ``socket`` the control socket asked; ``op`` the
    request (``register``, ``unregister``, ...), when there was one.

    Raised as itself when the daemon failed on its side (kinds ``unavailable`` and
    ``internal``: it is shutting down, its database writer stopped, it closed the
    connection without answering).
    """

    def __init__(
        self,
        message: str,
        *,
        socket: Optional[str] = None,
        op: Optional[str] = None,
        kind: Optional[str] = None,
    ):
        super().__init__(message)
        self.message = message
        self.socket = socket
        self.op = op
        self.kind = kind


class NoDaemon(WatchdogError):
    """The control socket could not be reached: no file there, no daemon behind it, or
    no permission to connect (this user is not in the socket's group). The message
    names the socket and the cause. Kind ``no_daemon``."""


class Refused(WatchdogError):
    """The daemon said no. Kind ``bad_request``: the request is wrong (an empty or too
    long analysis id, a zero limit, a memory limit above the machine's memory, a
    malformed or over-long request). Kind ``refused``: a rule says no (a process or
    analysis that belongs to another user, pid 1, a process already watched by another
    analysis). Nothing was changed."""


class NotFound(WatchdogError, LookupError):
    """What the request named does not exist: a pid that is not watched, an analysis
    that is not watched, a process that does not exist (or exited while it was being
    registered). Kind ``not_found``."""


#: The exception class for each kind the daemon gives an error.
CLASSES: Dict[str, Type[WatchdogError]] = {
    "not_found": NotFound,
    "refused": Refused,
    "bad_request": Refused,
    "unavailable": WatchdogError,
    "internal": WatchdogError,
    "no_daemon": NoDaemon,
}


def from_response(
    message: str, kind: object, *, socket: Optional[str] = None, op: Optional[str] = None
) -> WatchdogError:
    """The exception for the daemon's error ``message`` of ``kind``: its class from
    ``CLASSES``, WatchdogError for a kind not there (or none)."""
    known = kind if isinstance(kind, str) else None
    cls = CLASSES.get(known, WatchdogError) if known is not None else WatchdogError
    return cls(message, socket=socket, op=op, kind=known)
