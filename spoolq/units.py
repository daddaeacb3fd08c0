"""Durations and sizes as the command line writes them (contract §10).

Pure functions, no spoolq imports, so every layer (and the CLI) can use them:

* a *duration* is a number of seconds (``90``, ``1.5``) or a number with a
  unit ``s``, ``m``, ``h`` or ``d`` (``30s``, ``5m``, ``2h``, ``1d``);
* a *size* is a number of bytes or a number with ``K``, ``M`` or ``G``,
  powers of 1024 (``64M`` is 67,108,864 bytes). A trailing ``B``/``iB``
  (``64MiB``, ``512KB``) is accepted and means the same.

Errors are ``ValueError`` with a one-line message that names the bad text.

Every span of time spoolq takes is at most :data:`MAX_DURATION`, 100 years.
"""

from __future__ import annotations

import math
import re

# The longest duration spoolq takes (a delay, a timeout, a retention, a retry
# backoff), 100 years of 365.25 days. Longer means "never" in every use, and
# now plus a duration must stay a time status.json holds (ISO 8601 with a
# four-digit year, contract §3.2): past 9999 it would be written but never read.
MAX_DURATION = 36525 * 86400.0
MAX_DURATION_TEXT = "100 years (36525d)"

_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_NUMBER = r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_DURATION_RE = re.compile(rf"\s*([+-]?){_NUMBER}\s*([smhd]?)\s*", re.IGNORECASE)
_SIZE_RE = re.compile(rf"\s*([+-]?){_NUMBER}\s*([kmg]?)(?:i?b)?\s*", re.IGNORECASE)


def parse_duration(text: str | float | int, *, allow_negative: bool = False) -> float:
    """Seconds in *text*: ``90``, ``1.5``, ``30s``, ``5m``, ``2h``, ``1d``.

    A negative value is refused unless *allow_negative* (``--timeout -1``
    style settings, where the sign has a meaning of its own); so is one
    longer than :data:`MAX_DURATION`."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        try:
            value = float(text)
        except OverflowError:  # an int past every float
            value = math.inf
    else:
        match = _DURATION_RE.fullmatch(str(text))
        if not match:
            raise ValueError(f"{text!r} is not a duration: use seconds or a number with s, m, h or d (30s, 5m, 2h, 1d)")
        sign, number, unit = match.groups()
        value = float(number) * _DURATION_UNITS[unit.lower()] * (-1 if sign == "-" else 1)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite duration")
    if value < 0 and not allow_negative:
        raise ValueError(f"{text!r}: a duration cannot be negative")
    if value > MAX_DURATION:
        raise ValueError(f"{text!r} is longer than {MAX_DURATION_TEXT}, the longest duration spoolq takes")
    return value


def parse_size(text: str | int) -> int:
    """Bytes in *text*: ``4096``, ``512K``, ``64M``, ``2G`` (powers of 1024).
    Fractions are allowed with a unit (``1.5G``) and rounded down to a byte."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = float(text)
    else:
        match = _SIZE_RE.fullmatch(str(text))
        if not match:
            raise ValueError(f"{text!r} is not a size: use bytes or a number with K, M or G (512K, 64M, 2G)")
        sign, number, unit = match.groups()
        value = float(number) * _SIZE_UNITS[unit.lower()] * (-1 if sign == "-" else 1)
    if value < 0:
        raise ValueError(f"{text!r}: a size cannot be negative")
    return int(value)


def format_size(size: int) -> str:
    """The shortest exact way to write *size* bytes: ``64M``, ``1536K``, ``1000``."""
    for unit, factor in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def format_duration(seconds: float) -> str:
    """``1 s``, ``1.5 s``, ``300 s``: seconds, as the log messages write them."""
    return f"{seconds:g} s"
