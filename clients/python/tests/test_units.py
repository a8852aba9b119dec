"""What the client decides alone, without a daemon: durations and sizes as the CLI reads
them, the limits object, the ``since`` filter, and which exception a daemon line gets."""

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
from procwatchdog.errors import classify  # noqa: E402


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
    "line, cls",
    [
        ("pid 4242 is not watched: see `watchdog-user dump-tree`", wd.NotFound),
        ('no analysis "x" is watched: see `watchdog-user dump-tree`', wd.NotFound),
        ("no process with pid 9: check the pid (the process may have exited)", wd.NotFound),
        ("pid 9 exited while it was being registered", wd.NotFound),
        ("the analysis id is empty: pass --analysis-id with a name for the analysis", wd.Refused),
        ("the timeout must be more than 0: nothing was registered", wd.Refused),
        ('pid 9 is already watched as part of analysis "a": unregister it first', wd.Refused),
        ("refusing to watch pid 1: it is the system's init/idle task", wd.Refused),
        ("malformed request (expected value): send one JSON object per line", wd.Refused),
        ("the daemon is shutting down", wd.WatchdogError),
        ("the database is unavailable (refused): 3 kill records wait in the spool", wd.WatchdogError),
    ],
)
def test_daemon_lines_get_their_exception_with_the_line_as_message(line, cls):
    err = classify(line, socket="/s", op="register")
    assert type(err) is cls
    assert str(err) == err.message == line
    assert (err.socket, err.op) == ("/s", "register")
    assert isinstance(err, wd.WatchdogError)


def test_no_daemon_names_the_socket(tmp_path):
    path = tmp_path / "absent.sock"
    with pytest.raises(wd.NoDaemon) as err:
        wd.Client(path).status()
    assert str(path) in str(err.value) and "WATCHDOG_SOCKET" in str(err.value)
    assert err.value.socket == str(path)


def test_the_default_socket_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("WATCHDOG_SOCKET", "/tmp/elsewhere.sock")
    assert wd.Client().socket == "/tmp/elsewhere.sock"
    monkeypatch.delenv("WATCHDOG_SOCKET")
    assert wd.Client().socket == wd.DEFAULT_SOCKET == "/run/watchdog/watchdog.sock"
