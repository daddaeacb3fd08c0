"""Handlers for tests/test_observe.py: output, progress, follow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def _peak_rss_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def printer(ts, inp):
    """Print inp["mib"] MiB in numbered 64-byte lines (the first "line 00000000",
    the last "LAST LINE"), run echo, write to stderr; answer the handler
    process's peak RSS."""
    lines = inp["mib"] * (1 << 20) // 64
    chunk = []
    for i in range(lines):
        chunk.append(b"line %08d %s\n" % (i, b"." * 49))
        if len(chunk) == 1024:
            sys.stdout.buffer.write(b"".join(chunk))
            chunk = []
    sys.stdout.buffer.write(b"".join(chunk))
    print("LAST LINE", flush=True)
    subprocess.run(["echo", "echo says", ts.id], check=True)
    print("stderr says", ts.id, file=sys.stderr, flush=True)
    ts.store_response(json.dumps({"peak_rss_kib": _peak_rss_kib()}), "application/json")


def chatty(ts, inp):
    """A few log records and output lines, spread over inp["seconds"]."""
    steps = inp.get("steps", 5)
    for i in range(steps):
        print(f"out {i}", flush=True)
        ts.log(f"step {i}")
        time.sleep(inp.get("seconds", 1.0) / steps)
    if inp.get("fail"):
        raise RuntimeError("asked to fail")


def progress_loop(ts, inp):
    """Call progress inp["n"] times; answer how long the calls took."""
    n = inp["n"]
    started = time.perf_counter()
    for i in range(n):
        ts.progress(i + 1, n, "working")
    elapsed = time.perf_counter() - started
    ts.store_response(json.dumps({"seconds": elapsed}), "application/json")


def slow_progress(ts, inp):
    for i in range(inp["steps"]):
        ts.progress(i + 1, inp["steps"], f"step {i + 1}")
        time.sleep(inp.get("pause", 0.3))
    if inp.get("hang"):
        time.sleep(1000)


def bad_progress(ts, inp):
    ts.progress("half")


def tail_then_hang(ts, inp):
    """Past the head into the tail, then hang (the test kills the slot)."""
    for i in range(inp["lines"]):
        sys.stdout.write(f"line {i:08d}\n")
    sys.stdout.flush()
    with open(inp["ready"], "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(1000)


def noisy_first_run(ts, inp):
    """First run: prints past the head into the tail parts, reports
    progress, then hangs until its timeout. Later runs print one line."""
    if not os.path.exists(inp["marker"]):
        open(inp["marker"], "w").close()
        for i in range(inp["lines"]):
            sys.stdout.write(f"first run {i:08d}\n")
        sys.stdout.flush()
        ts.progress(1, 2, "first run")
        time.sleep(1000)
    print("second run", flush=True)


def leave_a_printer(ts, inp):
    """Print a line, leave behind a process (in a session of its own) that
    prints without end to the inherited fds 1 and 2, and return at once."""
    print("before", flush=True)
    subprocess.Popen([sys.executable, "-c", "import sys\nwhile True: sys.stdout.write('leftover\\n')"],
                     start_new_session=True)


def say(ts, inp):
    """Print inp["text"]."""
    print(inp["text"], flush=True)
