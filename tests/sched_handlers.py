"""Handlers for tests/test_scheduling.py. Each appends one line per event,
``<event> <type>:<id> <server> <pid> <time.time()>``, to the file named by
the input's "record" key (O_APPEND, one write each)."""

from __future__ import annotations

import os
import time

import spoolq


def _note(ts, inp, event: str) -> None:
    line = f"{event} {ts.type}:{ts.id} {os.environ.get('SPOOLQ_TEST_SERVER', '?')} {os.getpid()} {time.time():.6f}\n"
    fd = os.open(inp["record"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def run(ts, inp):
    """Records start and end; sleeps inp["seconds"] (default 0) between."""
    _note(ts, inp, "start")
    time.sleep(inp.get("seconds", 0))
    _note(ts, inp, "end")


def fail_until(ts, inp):
    """Fails (raises) until it has run inp["succeed_on"] times (a counter file)."""
    _note(ts, inp, "start")
    counter = inp["counter"]
    with open(counter, "a") as fh:
        fh.write("x")
    if os.path.getsize(counter) < inp["succeed_on"]:
        raise RuntimeError(f"attempt {os.path.getsize(counter)} fails")
    _note(ts, inp, "end")


def ask_retry(ts, inp):
    """Asks for a retry (raise spoolq.Retry) on its first run, with a delay."""
    _note(ts, inp, "start")
    marker = inp["marker"]
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise spoolq.Retry(delay=inp.get("delay", 0.5), message="come back later")
    _note(ts, inp, "end")


def short(ts, inp):
    """Sleeps a few milliseconds, then returns: a race partner for cancel."""
    _note(ts, inp, "start")
    time.sleep(inp.get("seconds", 0.01))
    _note(ts, inp, "end")


def set_failure_then(ts, inp):
    """Fails through set_failure (not by raising), then returns; with
    inp["then"] == "success", calls set_success after it too (refused)."""
    _note(ts, inp, "start")
    ts.set_failure("asked to fail")
    if inp.get("then") == "success":
        ts.set_success("too late")


def retry_then_raise(ts, inp):
    """On its first run asks for a retry, then raises; then succeeds."""
    _note(ts, inp, "start")
    marker = inp["marker"]
    if not os.path.exists(marker):
        open(marker, "w").close()
        ts.retry(0.1, "again soon")
        raise RuntimeError("after the retry")
    _note(ts, inp, "end")
