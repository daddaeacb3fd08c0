"""Handlers for tests/test_hostile.py (run in the daemon's children)."""

from __future__ import annotations

import os
import time


def wait_for_file(ts, inp):
    """Run until the file inp["go"] exists (at most 60 s), then store a
    response: a task that is RUNNING for as long as a test needs."""
    open(inp["started"], "a").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(inp["go"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    ts.store_response("done " * 100, "text/plain")
