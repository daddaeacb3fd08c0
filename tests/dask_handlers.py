"""Handlers for tests/test_dask.py. Each records what it does with O_APPEND
writes to the file named by the input's "record" key, one line each:
``<event> <type>:<id> <pid> <parent pid> <time>``. At its start a handler
also checks that no earlier run of the same task is still alive (a process
whose "start" has no "end" and that still runs), and records "overlap" if
one is: the test then knows a task ran twice at once."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def _record(inp: dict, event: str, ts) -> None:
    line = f"{event} {ts.type}:{ts.id} {os.getpid()} {os.getppid()} {time.time():.6f}\n"
    fd = os.open(inp["record"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _check_overlap(inp: dict, ts) -> None:
    try:
        with open(inp["record"]) as fh:
            lines = [line.split() for line in fh]
    except FileNotFoundError:
        return
    name = f"{ts.type}:{ts.id}"
    started = {int(r[2]) for r in lines if r[0] == "start" and r[1] == name}
    ended = {int(r[2]) for r in lines if r[0] == "end" and r[1] == name}
    for pid in started - ended:
        if pid != os.getpid() and _alive(pid):
            _record(inp, "overlap", ts)


def timed(ts, inp):
    """Sleeps inp["seconds"], logs and stores a response on the way."""
    _check_overlap(inp, ts)
    _record(inp, "start", ts)
    ts.log("working")
    time.sleep(inp.get("seconds", 0.5))
    ts.store_response(f"done {ts.id}", "text/plain")
    _record(inp, "end", ts)


def hang(ts, inp):
    """Starts a grandchild, writes both pids to inp["pidfile"], then hangs."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
    with open(inp["pidfile"] + ".tmp", "w") as fh:
        fh.write(f"{os.getpid()} {child.pid}")
    os.rename(inp["pidfile"] + ".tmp", inp["pidfile"])
    time.sleep(1000)


def progress(ts, inp):
    """Report progress on a Dask worker, then finish."""
    for i in range(inp["n"]):
        ts.progress(i + 1, inp["n"], "remote")
    ts.progress(inp["n"], inp["n"], "remote done")


def printer(ts, inp):
    """Print on a Dask worker: Python, a subprocess and stderr; past the cap
    when asked to; after making the task final itself when asked to."""
    import subprocess
    import sys

    if inp.get("succeed_first"):  # ATP style: the handler makes its task final itself, then prints on
        print("before success", flush=True)
        ts.set_success("done early")
    for i in range(inp.get("lines", 3)):
        print(f"remote line {i:06d}")
    sys.stdout.flush()
    subprocess.run(["echo", "echo on", ts.id], check=True)
    print("stderr on", ts.id, file=sys.stderr, flush=True)
    if inp.get("fail"):
        raise RuntimeError("asked to fail")
