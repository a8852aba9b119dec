"""What the client decides alone, without a daemon: durations and sizes as the CLI reads
them, the limits object, the ``since`` filter, and which exception each error kind gets."""

from __future__ import annotations

import datetime
import re
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import procwatchdog as wd  # noqa: E402
from procwatchdog.client import _since  # noqa: E402
from procwatchdog.errors import CLASSES, from_response  # noqa: E402


@pytest.mark.parametrize(
    "text, ms",
    [
        ("90s", 90_000),
        ("30m", 1_800_000),
        ("1h 30m", 5_400_000),
        ("1h30m", 5_400_000),
        ("1.5h", 5_400_000),
        ("2 hours", 7_200_000),
        ("500ms", 500),
        (" 7d ", 7 * 86_400_000),
        ("1min 1sec 1ms", 61_001),
        (90, 90_000),
        (0.25, 250),
        (datetime.timedelta(minutes=5), 300_000),
    ],
)
def test_durations_read_as_the_cli_reads_them(text, ms):
    assert wd.parse_duration_ms(text) == ms


@pytest.mark.parametrize(
    "text, says",
    [
        ("0s", "must be more than 0"),
        ("0", "must be more than 0"),
        (0, "must be more than 0"),
        (datetime.timedelta(0), "must be more than 0"),
        ("-5s", "expected number"),
        ("soon", "expected number"),
        ("90", "time unit needed, for example 90sec or 90ms"),
        ("5 fortnights", 'unknown time unit "fortnights"'),
        ("1.h", "invalid character"),
        ("", "value was empty"),
        ("500us", "less than a millisecond"),
        (-3, "must be more than 0"),
    ],
)
def test_bad_durations_are_refused_with_the_clis_advice(text, says):
    with pytest.raises(ValueError) as err:
        wd.parse_duration_ms(text, "timeout")
    assert says in str(err.value)
    assert "timeout" in str(err.value)
    assert "90s" in str(err.value)


@pytest.mark.parametrize(
    "text, size",
    [
        ("512MiB", 512 << 20),
        ("2GiB", 2 << 30),
        ("1.5G", 1_500_000_000),
        ("1.5GiB", 3 << 29),
        ("512 mib", 512 << 20),
        ("4096", 4096),
        ("10K", 10_000),
        ("1Ki", 1024),
        (1 << 30, 1 << 30),
    ],
)
def test_sizes_read_as_the_cli_reads_them(text, size):
    assert wd.parse_size_bytes(text) == size


@pytest.mark.parametrize(
    "text, says",
    [
        ("0", "must be more than 0"),
        ("0MiB", "must be more than 0"),
        (0, "must be more than 0"),
        ("lots", "couldn't parse"),
        ("-1MiB", "couldn't parse"),
        ("1.5", "known SI unit"),
        ("2 gibibytes", "known SI unit"),
        ("1.2.3G", "couldn't parse"),
    ],
)
def test_bad_sizes_are_refused_with_the_clis_advice(text, says):
    with pytest.raises(ValueError) as err:
        wd.parse_size_bytes(text, "memory limit")
    assert says in str(err.value) and "512MiB" in str(err.value)


def test_wrong_types_are_type_errors():
    for bad in (True, None, [1]):
        with pytest.raises((TypeError, ValueError)):
            wd.parse_duration_ms(bad)
    for bad in (1.5, True, None):
        with pytest.raises((TypeError, ValueError)):
            wd.parse_size_bytes(bad)


def test_limits_become_the_protocols_fields():
    assert wd.limits() == {}
    assert wd.limits(timeout="90s", memory="512MiB", tree_memory="2GiB", grace="10s", orphans="log",
                     max_processes=0) == {
        "timeout_ms": 90_000, "memory_bytes": 512 << 20, "tree_memory_bytes": 2 << 30,
        "grace_ms": 10_000, "orphans": "log", "max_processes": 0,
    }
    with pytest.raises(ValueError, match="kill"):
        wd.limits(orphans="ignore")
    with pytest.raises(ValueError, match="0 for no limit"):
        wd.limits(max_processes=-1)
    with pytest.raises(ValueError, match="grace"):
        wd.limits(grace="0s")
    with pytest.raises(TypeError, match="unknown limit 'timout': use one of timeout, memory"):
        wd.limits(timout="1h")


def test_warnings_and_zombie_limits_become_the_protocols_fields():
    assert wd.limits(max_zombies=100, warn_at="80%", warn_signal="usr2") == {
        "max_zombies": 100, "warn_at_percent": 80, "warn_signal": "SIGUSR2",
    }
    assert wd.limits(warn_at=75, warn_signal=signal.SIGINT) == {"warn_at_percent": 75, "warn_signal": "SIGINT"}
    assert wd.limits(warn_at="off") == {"warn_at_percent": 0}
    for bad in (100, "120%", "soon", -1, True):
        with pytest.raises(ValueError, match="80"):
            wd.limits(warn_at=bad)
    with pytest.raises(ValueError, match="cannot be caught"):
        wd.limits(warn_signal="SIGKILL")
    with pytest.raises(ValueError, match="SIGUSR1"):
        wd.limits(warn_signal="SIGNOPE")
    with pytest.raises(ValueError, match="0 for no limit"):
        wd.limits(max_zombies=-5)


def test_since_is_rfc3339_utc_milliseconds_as_the_daemon_writes_times():
    at = datetime.datetime(2026, 11, 21, 15, 0, 1, 234567, tzinfo=datetime.timezone.utc)
    assert _since(at) == "2026-11-21T15:00:01.234Z"
    paris = datetime.timezone(datetime.timedelta(hours=1))
    assert _since(at.astimezone(paris)) == "2026-11-21T15:00:01.234Z"
    recent = _since("1h")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", recent)
    hour_ago = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1)
    parsed = datetime.datetime.strptime(recent, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)
    assert abs((parsed - hour_ago).total_seconds()) < 60
    assert _since(None) is None
    with pytest.raises(ValueError, match="reason"):
        wd.Client("/nonexistent").events(reason="boredom")


@pytest.mark.parametrize(
    "kind, cls",
    [
        ("not_found", wd.NotFound),
        ("refused", wd.Refused),
        ("bad_request", wd.Refused),
        ("unavailable", wd.WatchdogError),
        ("internal", wd.WatchdogError),
        ("no_daemon", wd.NoDaemon),
    ],
)
def test_each_kind_gets_its_exception_with_the_line_as_message(kind, cls):
    # The wording says nothing: a line that reads like another kind keeps its own.
    line = "pid 4242 is not watched: see `watchdog-user dump-tree`"
    err = from_response(line, kind, socket="/s", op="register")
    assert type(err) is cls
    assert str(err) == err.message == line
    assert (err.socket, err.op, err.kind) == ("/s", "register", kind)
    assert isinstance(err, wd.WatchdogError)
    assert isinstance(err, LookupError) == (cls is wd.NotFound)


@pytest.mark.parametrize("kind", [None, "some_future_kind", 3])
def test_an_unknown_or_missing_kind_is_a_watchdog_error(kind):
    err = from_response("the daemon is shutting down", kind)
    assert type(err) is wd.WatchdogError
    assert str(err) == "the daemon is shutting down"
    assert err.kind == (kind if isinstance(kind, str) else None)


def test_every_kind_the_daemon_knows_has_a_class():
    vocab = Path(__file__).resolve().parents[3] / "watchdog-user" / "src" / "vocab" / "error.rs"
    kinds = set(re.findall(r'Self::\w+ => "(\w+)"', vocab.read_text()))
    assert kinds == set(CLASSES), kinds ^ set(CLASSES)


def _answering(tmp_path, answer: bytes):
    """A socket that answers one request with ``answer`` and closes."""
    import socket
    import threading

    path = tmp_path / "fake.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(answer)
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return path


def test_an_error_answer_raises_by_its_kind(tmp_path):
    path = _answering(tmp_path, b'{"error": "no analysis \\"x\\" is watched", "kind": "not_found"}\n')
    with pytest.raises(wd.NotFound) as err:
        wd.Client(path).unregister(analysis_id="x")
    assert str(err.value) == 'no analysis "x" is watched'
    assert (err.value.kind, err.value.op, err.value.socket) == ("not_found", "unregister", str(path))


def test_no_daemon_names_the_socket(tmp_path):
    path = tmp_path / "absent.sock"
    with pytest.raises(wd.NoDaemon) as err:
        wd.Client(path).status()
    assert str(path) in str(err.value) and "WATCHDOG_SOCKET" in str(err.value)
    assert err.value.socket == str(path)
    assert err.value.kind == "no_daemon"


def test_the_default_socket_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("WATCHDOG_SOCKET", "/tmp/elsewhere.sock")
    assert wd.Client().socket == "/tmp/elsewhere.sock"
    monkeypatch.delenv("WATCHDOG_SOCKET")
    assert wd.Client().socket == wd.DEFAULT_SOCKET == "/run/watchdog/watchdog.sock"


def test_iter_events_follows_each_full_answers_next_until_one_has_none(monkeypatch):
    pages = {None: ([{"pid": 3}, {"pid": 2}], "t2/b"), "t2/b": ([{"pid": 1}], None)}
    asked = []

    def call(self, request):
        asked.append(dict(request["filter"]))
        records, after = pages[request["filter"].get("before")]
        return {"records": records, **({"next": after} if after else {})}

    monkeypatch.setattr(wd.Client, "call", call)
    got = [r["pid"] for r in wd.Client("/nonexistent").iter_events(analysis_id="a", page=2)]
    assert got == [3, 2, 1]
    assert asked == [{"analysis_id": "a", "limit": 2}, {"analysis_id": "a", "limit": 2, "before": "t2/b"}]
