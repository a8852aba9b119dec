"""Durations and sizes as the CLI takes them, turned into what the protocol wants.

The CLI parses ``--timeout 90s`` with Rust's ``humantime`` and ``--memory 512MiB`` with
``bytesize`` (``watchdog-user/src/vocab/units.rs``); these functions accept the same texts and
refuse the same nonsense, with the same advice, so a value that works on the command
line works here and the other way round. Python numbers are taken too: an ``int`` or
``float`` is seconds (durations) and an ``int`` is bytes (sizes); a
``datetime.timedelta`` is a duration. Zero is refused, as the CLI and daemon refuse it:
a zero limit would kill at once, which nobody means.
"""

from __future__ import annotations

import datetime
import re
from fractions import Fraction
from typing import Union

Duration = Union[str, int, float, datetime.timedelta]
Size = Union[str, int]

_NS = 1
_US = 1_000
_MS = 1_000_000
_S = 1_000_000_000

# humantime's units, each with its length in nanoseconds (a month is 30.44 days and a
# year 365.25 days there, and so here).
_DURATION_UNITS = {
    **dict.fromkeys(("nanos", "nsec", "ns"), _NS),
    **dict.fromkeys(("usec", "us", "µs"), _US),
    **dict.fromkeys(("millis", "msec", "ms"), _MS),
    **dict.fromkeys(("seconds", "second", "secs", "sec", "s"), _S),
    **dict.fromkeys(("minutes", "minute", "min", "mins", "m"), 60 * _S),
    **dict.fromkeys(("hours", "hour", "hr", "hrs", "h"), 3600 * _S),
    **dict.fromkeys(("days", "day", "d"), 86400 * _S),
    **dict.fromkeys(("weeks", "week", "wk", "wks", "w"), 7 * 86400 * _S),
    **dict.fromkeys(("months", "month", "M"), 2_630_016 * _S),
    **dict.fromkeys(("years", "year", "yr", "yrs", "y"), 31_557_600 * _S),
}

# One span: a number (maybe with a fraction), maybe spaces, a unit.
_SPAN = re.compile(r"\s*([0-9]+)(?:\.([0-9]+))?\s*([A-Za-zµ]*)")

# bytesize's units (case-insensitive), each with its factor.
_SIZE_UNITS = {
    "b": 1,
    **dict.fromkeys(("k", "kb"), 10**3),
    **dict.fromkeys(("m", "mb"), 10**6),
    **dict.fromkeys(("g", "gb"), 10**9),
    **dict.fromkeys(("t", "tb"), 10**12),
    **dict.fromkeys(("p", "pb"), 10**15),
    **dict.fromkeys(("e", "eb"), 10**18),
    **dict.fromkeys(("ki", "kib"), 1 << 10),
    **dict.fromkeys(("mi", "mib"), 1 << 20),
    **dict.fromkeys(("gi", "gib"), 1 << 30),
    **dict.fromkeys(("ti", "tib"), 1 << 40),
    **dict.fromkeys(("pi", "pib"), 1 << 50),
    **dict.fromkeys(("ei", "eib"), 1 << 60),
}

_U64_MAX = (1 << 64) - 1

_DURATION_ADVICE = "use a positive duration such as 90s, 30m or 2h"
_SIZE_ADVICE = "use a size such as 512MiB or 2GiB"


def _quoted(text: str) -> str:
    # As Rust's {:?} shows a string: double quotes, so messages match the CLI's.
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _duration_ns(text: str) -> int:
    """Nanoseconds in ``text`` (``1h 30m``, ``90s``, ``1.5h``), as humantime reads it;
    ValueError with humantime's reason otherwise."""
    if text == "0":
        return 0
    if not text:
        raise ValueError("value was empty")
    total = 0
    at = 0
    while at < len(text):
        match = _SPAN.match(text, at)
        if match is None:
            raise ValueError(f"expected number at {at}")
        whole, fraction, unit = match.groups()
        if not unit:
            if match.end() < len(text):
                raise ValueError(f"invalid character at {match.end()}")
            raise ValueError(f"time unit needed, for example {whole}sec or {whole}ms")
        if unit not in _DURATION_UNITS:
            raise ValueError(
                f"unknown time unit {_quoted(unit)}, supported units: ns, us/µs, ms, sec, "
                "min, hours, days, weeks, months, years (and few variations)"
            )
        value = Fraction(int(whole))
        if fraction:
            value += Fraction(int(fraction), 10 ** len(fraction))
        ns = value * _DURATION_UNITS[unit]
        if ns.denominator != 1:
            raise ValueError(
                "number is too large or cannot be represented without a lack of precision "
                "(values below 1ns are not supported)"
            )
        total += int(ns)
        at = match.end()
    return total


def parse_duration_ms(value: Duration, what: str = "duration") -> int:
    """``90s``, ``30m``, ``1h 30m``, ``1.5h``, ``timedelta(minutes=5)``, or a number of
    seconds: the duration in whole milliseconds (the protocol's unit), more than 0.

    >>> parse_duration_ms("1h 30m")
    5400000
    >>> parse_duration_ms(90)
    90000
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid {what} {value!r}: {_DURATION_ADVICE}, or a number of seconds")
    if isinstance(value, datetime.timedelta):
        ns = (value.days * 86400 + value.seconds) * _S + value.microseconds * _US
        shown = str(value)
    elif isinstance(value, (int, float)):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"invalid {what} {value!r}: {_DURATION_ADVICE}, or a number of seconds")
        ns = int(Fraction(value) * _S)
        shown = repr(value)
    elif isinstance(value, str):
        try:
            ns = _duration_ns(value.strip())
        except ValueError as err:
            raise ValueError(f"invalid {what} {_quoted(value)} ({err}): {_DURATION_ADVICE}") from None
        shown = _quoted(value)
    else:
        raise TypeError(
            f"the {what} must be a str such as '90s', a number of seconds or a timedelta, "
            f"not {type(value).__name__}"
        )
    if ns < 0:
        raise ValueError(f"invalid {what} {shown}: it must be more than 0, such as 90s or 30m")
    if ns == 0:
        raise ValueError(f"invalid {what} {shown}: it must be more than 0, such as 90s or 30m")
    ms = ns // _MS
    if ms == 0:
        raise ValueError(
            f"invalid {what} {shown}: it is less than a millisecond, the smallest unit the "
            "daemon counts: use at least 1ms, such as 90s or 30m"
        )
    if ms > _U64_MAX:
        raise ValueError(f"invalid {what} {shown}: it is too long")
    return ms


def parse_size_bytes(value: Size, what: str = "size") -> int:
    """``512MiB``, ``2GiB``, ``1.5G`` (decimal: 1,500,000,000), ``4096``, or an int of
    bytes: the size in bytes, more than 0. Units as the CLI reads them: B, K/KB, M/MB,
    G/GB, T/TB, P/PB, E/EB (powers of 1000) and Ki/KiB ... Ei/EiB (powers of 1024), any
    case.

    >>> parse_size_bytes("512MiB")
    536870912
    >>> parse_size_bytes("1.5G")
    1500000000
    """
    if isinstance(value, bool) or (not isinstance(value, (int, str))):
        if isinstance(value, float):
            raise TypeError(
                f"the {what} must be an int of bytes or a str such as '512MiB', not a float ({value!r})"
            )
        raise TypeError(f"the {what} must be an int of bytes or a str such as '512MiB', not {type(value).__name__}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"invalid {what} {value}: it must be more than 0, such as 512MiB or 2GiB")
        if value > _U64_MAX:
            raise ValueError(f"invalid {what} {value}: it is too large")
        return value
    text = value.strip()
    if text.isascii() and text.isdigit():
        size = int(text)
    else:
        number = re.match(r"[0-9.]*", text).group(0)
        suffix = text[len(number):].lstrip()
        try:
            if not number or number.count(".") > 1 or number == ".":
                raise ValueError(f"couldn't parse {_quoted(text)} into a ByteSize, invalid float literal")
            if suffix.lower() not in _SIZE_UNITS:
                shown = suffix if len(suffix) <= 3 else suffix[:3] + "..."
                raise ValueError(
                    f"couldn't parse {_quoted(suffix)} into a known SI unit, "
                    f"Failed to parse unit {_quoted(shown)}"
                )
        except ValueError as err:
            raise ValueError(f"invalid {what} {_quoted(value)} ({err}): {_SIZE_ADVICE}") from None
        size = int(Fraction(number) * _SIZE_UNITS[suffix.lower()])
    if size == 0:
        raise ValueError(f"invalid {what} {_quoted(value)}: it must be more than 0, such as 512MiB or 2GiB")
    return min(size, _U64_MAX)
