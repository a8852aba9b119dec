"""Starting processes already watched: ``Popen`` and the ``watch`` block.

A process started and registered afterwards could fork before the daemon hears of it,
and what it forked then would not be watched. So, as ``watchdog-user exec`` does, the
child is held before it runs anything of its own: ``subprocess`` forks it, the child
(in a ``preexec_fn``) writes its pid into one pipe and waits on another; a thread of the
parent reads the pid, registers it with ``fresh=True`` and only then lets it go on to
``exec``. If the daemon refuses (or cannot be reached), the child is told so through the
pipe and exits without running the command, and ``Popen`` raises the daemon's error.
The parent's own thread waits meanwhile in ``subprocess`` (which reads a pipe of its own
until the child has exec'd): that is why the registration runs on a thread.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Any, Callable, Dict, List, Optional

from .client import LIMIT_KEYWORDS, Client, limits as _limits
from .errors import NotFound

# The watch block open now in this process, if any.
_active: List["Watch"] = []
_lock = threading.Lock()


class _NotRegistered(Exception):
    """Raised in a held child its parent could not register: it does not run."""


def _start_gated(init: Callable[..., None], args: Any, kwargs: Dict[str, Any], register: Callable[[int], Any]) -> Any:
    """Calls ``init(args, **kwargs)`` (a Popen's __init__) with the child held until
    ``register(pid)`` returned; returns what it returned, or raises what it raised."""
    user_preexec = kwargs.pop("preexec_fn", None)
    hello_r, hello_w = os.pipe()
    gate_r, gate_w = os.pipe()

    def preexec() -> None:
        # In the child, between fork and exec: only system calls until it is released.
        os.close(hello_r)
        os.close(gate_w)
        os.write(hello_w, b"%d\n" % os.getpid())
        os.close(hello_w)
        answer = os.read(gate_r, 1)
        os.close(gate_r)
        if answer != b"y":
            raise _NotRegistered()
        if user_preexec is not None:
            user_preexec()

    outcome: Dict[str, Any] = {}

    def registrar() -> None:
        data = b""
        while not data.endswith(b"\n"):
            chunk = os.read(hello_r, 32)
            if not chunk:
                return  # no child came: the fork failed or never happened
            data += chunk
        try:
            outcome["reply"] = register(int(data))
            go = b"y"
        except BaseException as err:  # the child must hear either way
            outcome["error"] = err
            go = b"n"
        try:
            os.write(gate_w, go)
        except OSError:
            pass

    thread = threading.Thread(target=registrar, name="procwatchdog-register", daemon=True)
    thread.start()
    try:
        init(args, preexec_fn=preexec, **kwargs)
    except BaseException:
        os.close(hello_w)  # so the registrar sees EOF if no child was forked
        hello_w = -1
        thread.join()
        if "error" in outcome:
            raise outcome["error"] from None
        raise
    finally:
        if hello_w >= 0:
            os.close(hello_w)
        thread.join()
        for fd in (hello_r, gate_r, gate_w):
            os.close(fd)
    return outcome.get("reply")


class Popen(subprocess.Popen):
    """``subprocess.Popen`` whose child is registered with the daemon as analysis
    ``analysis_id`` before it runs anything: the command's first instruction, and all
    it forks, are watched. Limits as ``register`` takes them; every other keyword goes
    to ``subprocess.Popen``. ``registration`` holds the daemon's reply.

    Raises the daemon's error (Refused, NoDaemon, ...) when it would not watch the
    child, which then never runs the command. Inside a ``watch()`` block its child is
    the block's already: use ``subprocess.Popen`` there.

    Once the command has exited, ``wait()`` (and so ``communicate()``, ``with`` and
    ``subprocess.run``) returns when all of its analysis has ended and the records are
    stored, and sets ``kills``: what the watchdog killed in it, one dict per reason
    (``reason``, ``limit``, ``processes``, ``roots``, ``measured_bytes``), and
    ``killed_by``: the one that killed this command itself, or None. A command the
    watchdog killed returns ``-signal``, as any killed command does.
    """

    kills: Optional[List[Dict[str, Any]]] = None
    killed_by: Optional[Dict[str, Any]] = None

    def __init__(
        self,
        args: Any,
        analysis_id: str,
        *,
        client: Optional[Client] = None,
        **popen_kwargs: Any,
    ):
        self.client = client if client is not None else Client()
        self.analysis_id = analysis_id
        if _active:
            raise ValueError(
                f"Popen inside watch({_active[-1].analysis_id!r}): its child is in that block's "
                "analysis from its first instruction already; use subprocess.Popen in the block, "
                "or this Popen outside it"
            )
        wanted = _limits(**{k: popen_kwargs.pop(k) for k in list(popen_kwargs) if k in LIMIT_KEYWORDS})
        self.registration = _start_gated(
            super().__init__,
            args,
            popen_kwargs,
            lambda pid: self.client._register(pid, analysis_id, wanted, fresh=True),
        )

    def wait(self, timeout: Optional[float] = None) -> int:
        code = super().wait(timeout)
        if self.kills is None and self.registration is not None:
            ended = self.client.call({"op": "wait", "run": self.registration.get("run", 0)})
            self.kills = ended.get("kills", [])
            self.killed_by = next(
                (k for k in self.kills if any(r["pid"] == self.pid for r in k.get("roots", []))),
                None,
            )
        return code


class Watch:
    """What ``watch()`` returns: a context manager. While the block runs, every process
    this process starts, from any thread and by any means (``subprocess``, ``os.fork``,
    ``os.system``, ``os.posix_spawn``, multiprocessing's fork, spawn and forkserver
    start methods, joblib's loky workers...), is in analysis ``analysis_id`` from its
    first instruction, and so is all it starts: the kernel puts each new child of this
    process in the analysis as it is forked. This process itself is never a member: it
    is never killed.

    The limits are the block's: its timeout is one budget for everything the block
    starts, counted from the block's start (four 3 s steps one after the other under
    ``timeout="5s"`` are killed at 5 s), and a process started once the budget is spent
    is killed at once. For a limit per command, use ``Popen`` outside the block. What
    the block started is killed as an orphan (``orphans="kill"``) when this process dies
    while it runs: a SIGKILLed driver leaves no worker behind.

    At the end of the block the analysis is unregistered: what still runs from it is no
    longer watched. One block at a time per process: another one (nested, or from
    another thread) is refused with ``Refused``.

    ``registration``: the daemon's reply (its ``run`` names this run of the analysis).
    ``client``, ``analysis_id``, ``limits``.
    """

    def __init__(self, analysis_id: str, *, client: Optional[Client] = None, **limits: Any):
        if not isinstance(analysis_id, str):
            raise TypeError(f"the analysis id must be a str, not {type(analysis_id).__name__}")
        self.client = client if client is not None else Client()
        self.analysis_id = analysis_id
        self.limits = _limits(**limits)
        self.registration: Optional[Dict[str, Any]] = None

    def __repr__(self) -> str:
        return f"Watch({self.analysis_id!r}, client={self.client!r})"

    def __enter__(self) -> "Watch":
        self.registration = self.client._launch(os.getpid(), self.analysis_id, self.limits)
        # A forkserver started earlier forks the block's workers: it launches them too.
        server = _forkserver_pid()
        if server is not None:
            try:
                self.client._launch(server, self.analysis_id, self.limits)
            except NotFound:
                pass  # it exited: multiprocessing starts another, in the block
            except BaseException:
                self.__exit__(None, None, None)
                raise
        with _lock:
            _active.append(self)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        with _lock:
            if self in _active:
                _active.remove(self)
        try:
            self.client.unregister(analysis_id=self.analysis_id)
        except NotFound:
            pass  # the daemon forgot the analysis already
        except Exception:
            if exc_type is None:
                raise


def _forkserver_pid() -> Optional[int]:
    """The pid of multiprocessing's forkserver, if this process started one."""
    module = sys.modules.get("multiprocessing.forkserver")
    server = getattr(module, "_forkserver", None)
    pid = getattr(server, "_forkserver_pid", None)
    return pid if isinstance(pid, int) and pid > 0 else None
