"""Handlers for the daemon tests. Each records what it does with O_APPEND
writes to the file named by the task input's "record" key, one line each:
"<event> <type>:<id> <server> <pid>"."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def _record(inp: dict, event: str, ts) -> None:
    path = inp.get("record") if isinstance(inp, dict) else None
    if not path:
        return
    line = f"{event} {ts.type}:{ts.id} {os.environ.get('SPOOLQ_TEST_SERVER', '?')} {os.getpid()}\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def noop(ts, inp):
    _record(inp, "start", ts)
    _record(inp, "end", ts)


def add(ts, inp):
    ts.store_response(str(sum(inp)), "text/plain")


def sleep(ts, inp):
    _record(inp, "start", ts)
    time.sleep(inp.get("seconds", 0.3))
    _record(inp, "end", ts)


def boom(ts, inp):
    raise ValueError("boom")


def abort(ts, inp):
    os.abort()


def exit3(ts, inp):
    sys.exit(3)


def exit0(ts, inp):
    sys.exit(0)


def hard_exit(ts, inp):
    os._exit(0)


def pause_then_return(ts, inp):
    ts.set_paused("waiting for data")
    ts.log("a free-text note")


def hang(ts, inp):
    _record(inp, "start", ts)
    time.sleep(1000)


def hang_with_grandchild(ts, inp):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
    with open(inp["pidfile"] + ".tmp", "w") as fh:
        fh.write(str(child.pid))
    os.rename(inp["pidfile"] + ".tmp", inp["pidfile"])
    time.sleep(1000)


def hang_first_time(ts, inp):
    """Hangs on its first run, returns on later ones (marker file)."""
    _record(inp, "start", ts)
    marker = inp["marker"]
    if not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(1000)
    _record(inp, "end", ts)
