"""Crash points for fault-injection tests.

``crashpoint("name")`` marks a step of the task lifecycle where a crash must
leave the spool recoverable. When the environment variable ``SPOOLQ_CRASH_AT``
names that point, the process kills itself with SIGKILL there (optionally only
on the N-th hit: ``SPOOLQ_CRASH_AT=name@N``). ``SPOOLQ_HANG_AT`` (same syntax)
makes the calling thread block forever there instead: how the systemd tests
prove that the watchdog pings come from the main loop, so a hung loop gets
the daemon restarted, and how the crash matrix freezes a worker mid-step.
``SPOOLQ_FAIL_AT`` (same syntax) makes the point raise ``OSError(EIO)`` on
that one hit and pass on every other: an I/O error the process lives
through, as a failing disk would give it.
Before it acts, a point raises the audit event ``spoolq.crashpoint`` (name,
"crash", "hang" or "fail"), so a test's audit hook can tell which process
reached it. Unarmed, a call costs one comparison against None.

The reliability tests find every point by scanning the source for
``crashpoint("…")`` calls, so a new step cannot be forgotten.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading

_target: str | None = None
_action = "crash"
_nth = 1
_hits = 0


def _configure() -> None:
    global _target, _action, _nth, _hits
    _action, spec = "crash", None
    for action in ("crash", "hang", "fail"):
        spec = os.environ.get(f"SPOOLQ_{action.upper()}_AT") or None
        if spec:
            _action = action
            break
    _hits = 0
    _nth = 1
    if spec and "@" in spec:
        spec, _, count = spec.partition("@")
        _nth = max(1, int(count))
    _target = spec


_configure()


def crashpoint(name: str) -> None:
    """Die with SIGKILL (or hang, or fail once) here if the environment
    names this point."""
    global _hits
    if _target is None or name != _target:
        return
    _hits += 1
    if _hits < _nth or (_action == "fail" and _hits > _nth):
        return
    sys.audit("spoolq.crashpoint", name, _action)
    if _action == "hang":
        threading.Event().wait()
    if _action == "fail":
        raise OSError(errno.EIO, f"{os.strerror(errno.EIO)} (injected at {name})")
    os.kill(os.getpid(), signal.SIGKILL)


def reconfigure() -> None:
    """Re-read the environment (for a forked child that changed it)."""
    _configure()
