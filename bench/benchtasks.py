"""Task handlers for the spoolq side of the daemon benchmarks (e2e, wakeup).

spoolq calls a handler as ``handler(task, input)`` (task: spoolq.TaskContext);
register them by dotted path, with bench/ on the worker's PYTHONPATH:
``benchtasks.noop``, ``benchtasks.stamp``, ``benchtasks.wallstamp``.
"""

import os
import time


def noop(task, input):
    return None


def stamp(task, input):
    """Record when the handler started: time.monotonic() into input["path"]."""
    t = time.monotonic()
    tmp = input["path"] + ".tmp"
    with open(tmp, "w") as f:
        f.write(repr(t))
    os.rename(tmp, input["path"])


def sleep(task, input):
    """Leave a new file in input["dir"] (the handler started), then sleep
    input["seconds"]: keeps one slot busy so the daemon sits idle with the
    rest of the queue waiting (bench/scaling.py, RSS)."""
    import tempfile

    fd, _ = tempfile.mkstemp(prefix="started-", dir=input["dir"])
    os.close(fd)
    time.sleep(input["seconds"])


def wallstamp(task, input):
    """Record when the handler started on the wall clock (time.time(), the
    clock due times are on) into input["path"] (bench/delayed.py)."""
    t = time.time()
    tmp = input["path"] + ".tmp"
    with open(tmp, "w") as f:
        f.write(repr(t))
    os.rename(tmp, input["path"])
