"""Crash points for fault-injection tests.

``crashpoint("name")`` marks a step of the task lifecycle where a crash must
leave the spool recoverable. When the environment variable ``SPOOLQ_CRASH_AT``
names that point, the process kills itself with SIGKILL there (optionally only
on the N-th hit: ``SPOOLQ_CRASH_AT=name@N``). Otherwise a call costs one
comparison against ``None``.

The reliability tests find every point by scanning the source for
``crashpoint("…")`` calls, so a new step cannot be forgotten.
"""

from __future__ import annotations

import os
import signal

_target: str | None = None
_nth = 1
_hits = 0


def _configure() -> None:
    global _target, _nth, _hits
    spec = os.environ.get("SPOOLQ_CRASH_AT") or None
    _hits = 0
    _nth = 1
    if spec and "@" in spec:
        spec, _, count = spec.partition("@")
        _nth = max(1, int(count))
    _target = spec


_configure()


def crashpoint(name: str) -> None:
    """Die with SIGKILL here if ``SPOOLQ_CRASH_AT`` names this point."""
    global _hits
    if _target is None or name != _target:
        return
    _hits += 1
    if _hits >= _nth:
        os.kill(os.getpid(), signal.SIGKILL)


def reconfigure() -> None:
    """Re-read ``SPOOLQ_CRASH_AT`` (for a forked child that changed it)."""
    _configure()
