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

import functools
import inspect
import os
import subprocess
import sys
import threading
from typing import Any, Callable, Dict, List, Optional

from .client import LIMIT_KEYWORDS, Client, limits as _limits
from .errors import NotFound

# Per thread: how many gated starts this thread is inside. Kept by a forked child for
# the thread that forked it, so the child of a gated start knows its parent registers it.
_local = threading.local()

# The watch blocks open now, innermost last (process-wide: every thread's children).
_active: List["Watch"] = []
_lock = threading.Lock()
_hooks_installed = False


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
    _local.gating = getattr(_local, "gating", 0) + 1
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
        _local.gating -= 1
        if hello_w >= 0:
            os.close(hello_w)
        thread.join()
        for fd in (hello_r, gate_r, gate_w):
            os.close(fd)
    return outcome.get("reply")


_original_init = subprocess.Popen.__init__
_init_signature = inspect.signature(_original_init)


class Popen(subprocess.Popen):
    """``subprocess.Popen`` whose child is registered with the daemon as analysis
    ``analysis_id`` before it runs anything: the command's first instruction, and all
    it forks, are watched. Limits as ``register`` takes them; every other keyword goes
    to ``subprocess.Popen``. ``registration`` holds the daemon's reply.

    Raises the daemon's error (Refused, NoDaemon, ...) when it would not watch the
    child, which then never runs the command.
    """

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
        wanted = _limits(**{k: popen_kwargs.pop(k) for k in list(popen_kwargs) if k in LIMIT_KEYWORDS})
        self.registration = _start_gated(
            super().__init__,
            args,
            popen_kwargs,
            lambda pid: self.client._register(pid, analysis_id, wanted, fresh=True),
        )


class Watch:
    """What ``watch()`` returns: a context manager. While the block runs, every child
    this process starts (from any thread) through ``subprocess`` (``Popen``, ``run``,
    ``check_output``, ``os.popen``, asyncio's subprocesses...) or ``os.fork``
    (``multiprocessing`` with its "fork" start method) is registered as analysis
    ``analysis_id`` before it runs anything, and so is all it forks. This process
    itself is not watched: it is never killed. At the end of the block the analysis is
    unregistered: what still runs from it is no longer watched.

    The timeout counts from the first process the block starts (the daemon makes the
    analysis then, and forgets it once all its processes have ended). What the block
    starts is, like any registered process, killed as an orphan (``orphans="kill"``) if
    this process dies while it runs.

    ``pids``: the subprocess children registered so far (a child of ``os.fork``
    registers itself, in its own copy). ``client``, ``analysis_id``, ``limits``.
    """

    def __init__(self, analysis_id: str, *, client: Optional[Client] = None, **limits: Any):
        if not isinstance(analysis_id, str):
            raise TypeError(f"the analysis id must be a str, not {type(analysis_id).__name__}")
        self.client = client if client is not None else Client()
        self.analysis_id = analysis_id
        self.limits = _limits(**limits)
        self.pids: List[int] = []
        self.forked = False  # an os.fork child (which registers itself) was started

    def __repr__(self) -> str:
        return f"Watch({self.analysis_id!r}, client={self.client!r})"

    def register(self, pid: int) -> Dict[str, Any]:
        """Registers ``pid`` (a child just started, held) into this block's analysis."""
        reply = self.client._register(pid, self.analysis_id, self.limits, fresh=True)
        self.pids.append(pid)
        return reply

    def __enter__(self) -> "Watch":
        _install_hooks()
        with _lock:
            _active.append(self)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        with _lock:
            _active.remove(self)
        if not (self.pids or self.forked):
            return  # nothing was started: the daemon never heard of this block
        try:
            self.client.unregister(analysis_id=self.analysis_id)
        except NotFound:
            pass  # everything it started has ended: the daemon forgot the analysis
        except Exception:
            if exc_type is None:
                raise


def _current() -> Optional[Watch]:
    return _active[-1] if _active else None


def _watched_init(self: subprocess.Popen, *args: Any, **kwargs: Any) -> None:
    """``subprocess.Popen.__init__`` while hooks are installed: held and registered
    when a watch block is open and no gated start is under way on this thread."""
    watch = _current()
    if watch is None or getattr(_local, "gating", 0):
        return _original_init(self, *args, **kwargs)
    bound = _init_signature.bind(self, *args, **kwargs)
    arguments = dict(bound.arguments)
    arguments.pop("self")
    extra = arguments.pop("kwargs", {})  # Popen's own **kwargs (none today)
    popen_args = arguments.pop("args")
    if arguments.get("preexec_fn") is None:
        arguments.pop("preexec_fn", None)
    _start_gated(functools.partial(_original_init, self), popen_args, {**arguments, **extra}, watch.register)


def _before_fork() -> None:
    watch = _current()
    if watch is not None and not getattr(_local, "gating", 0):
        watch.forked = True


def _after_fork_in_child() -> None:
    """``os.fork`` inside a watch block: the child registers itself before it returns
    from fork. A child that cannot be registered exits (125) rather than run unwatched."""
    global _lock
    if getattr(_local, "gating", 0):
        return  # a held subprocess child: its parent registers it
    watch = _current()
    _lock = threading.Lock()
    if watch is None:
        return
    # What this child forks is watched by the kernel from now on: no more registering.
    _active.clear()
    try:
        watch.client._register(os.getpid(), watch.analysis_id, watch.limits, fresh=True)
    except BaseException as err:
        try:
            sys.stderr.write(
                f"procwatchdog: a process forked inside watch({watch.analysis_id!r}) could not be "
                f"registered, so it exits instead of running unwatched: {err}\n"
            )
            sys.stderr.flush()
        finally:
            os._exit(125)


def _install_hooks() -> None:
    global _hooks_installed
    with _lock:
        if _hooks_installed:
            return
        subprocess.Popen.__init__ = _watched_init  # type: ignore[method-assign]
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _hooks_installed = True
