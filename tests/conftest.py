"""Shared fixtures for spoolq's tests.

* ``spool``: a fresh spool in ``tmp_path`` with ``durable=False`` (fsync off:
  tests about durability make their own with ``make_spool(durable=True)``),
  and type ``T`` registered (handler ``atp_demo.handler``).
* ``make_spool(**settings)``: more spools, e.g. with an injected clock.
* ``make_clock(start=None)``: a :class:`FakeClock` to pass as
  ``Spool(root, clock=...)``, so zombie and retention tests age tasks by
  calling ``clock.advance(seconds)`` instead of sleeping.
* ``wait_until(predicate, timeout=...)``: poll with a deadline (never a fixed
  sleep); fails the test with *what* when the deadline passes.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from spoolq import Spool

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # handler modules (atp_demo) for subprocesses too
    sys.path.insert(0, str(HERE))


class FakeClock:
    """A settable clock: ``clock()`` returns the current fake time (seconds
    since the epoch); ``advance(s)`` moves it on. Starts at the real time so
    mtimes written with it look plausible."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def pids_with_cmdline(*needles: bytes) -> set[int]:
    """Live processes whose command line holds every one of *needles*."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if all(needle in cmdline for needle in needles):
                found.add(int(entry))
    return found


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll *predicate* until it returns something truthy; fail after
    *timeout* seconds. Returns the truthy value."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


@pytest.fixture
def spool_root(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def make_spool(spool_root: Path) -> Callable[..., Spool]:
    """make_spool(clock=None, durable=False, max_queue=None, root=None)."""

    def make(
        *,
        clock: Callable[[], float] | None = None,
        durable: bool = False,
        max_queue: int | None = None,
        root: Path | None = None,
        register: bool = True,
    ) -> Spool:
        path = root or spool_root
        sp = Spool.init(path, durable=durable, max_queue=max_queue)
        if clock is not None:
            sp = Spool(path, clock=clock)
        if register and not os.path.exists(path / "types" / "T.json"):
            sp.register_type("T", "atp_demo.handler", timeout=60, retention=600, max_restarts=2)
        return sp

    return make


@pytest.fixture
def spool(make_spool: Callable[..., Spool]) -> Spool:
    return make_spool()


@pytest.fixture
def make_clock() -> Callable[..., FakeClock]:
    return FakeClock


@pytest.fixture(name="wait_until")
def wait_until_fixture() -> Callable[..., Any]:
    return wait_until
