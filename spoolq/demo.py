"""``spoolq demo``: the ATP guide's "Simple ATP Application" end to end.

The seed's SequenceSum example, run the way it runs in production: the
producer steps use the ATP names of :mod:`spoolq.tracker` (the seed's code
with its import line changed), and a real worker process
(``python -m spoolq worker demo1``) claims and runs the tasks. Everything
happens in a temporary spool that is removed at the end.

This module is also the handler's home (``spoolq.demo.sequence_sum``), so it
imports nothing heavy: the worker imports it to run a task.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import IO, Any

TYPE = "SequenceSum"
HANDLER = "spoolq.demo.sequence_sum"
SERVER = "demo1"
WAIT_LIMIT = 60.0  # the type's timeout: a demo task that takes longer is broken


def sequence_sum(task_status: Any, input: Any) -> None:
    """The seed's example handler: sum a sequence of numbers and store the sum
    as text (``text/plain``); fail the task if the input is not one."""
    total = 0.0
    try:
        for value in input:
            total += float(value)
    except (TypeError, ValueError):
        task_status.setFailure("Input must be a sequence of numbers!")
        return
    task_status.storeResponse(str(total), "text/plain")


def _say(text: str = "") -> None:
    print(text, flush=True)


def _tail(log: IO[bytes], lines: int = 15) -> str:
    log.seek(0)
    return "\n".join(log.read().decode("utf-8", "replace").splitlines()[-lines:])


def run_demo() -> int:
    """Run the demo; 0 when every step did what it should."""
    from . import tracker
    from .queries import format_log
    from .spool import Spool

    root = tempfile.mkdtemp(prefix="spoolq-demo-")
    os.chmod(root, 0o700)
    saved_root = os.environ.get("SPOOLQ_ROOT")
    os.environ["SPOOLQ_ROOT"] = root  # where the tracker functions work
    worker: subprocess.Popen[bytes] | None = None
    worker_log = tempfile.TemporaryFile()
    try:
        spool = Spool.init(root)
        _say("spoolq demo: the SequenceSum example of the ATP developers' guide")
        _say(f"  spool: {root} (temporary)")
        _say()

        tracker.registerTaskType(TYPE, HANDLER, 60, 600, 3)
        _say(f"1. registerTaskType({TYPE!r}, {HANDLER!r}, 60, 600, 3)")
        _say("   timeout 60 s from the claim, kept 600 s when done, at most 3 restarts")

        cmd = [sys.executable, "-m", "spoolq", "--root", root, "worker", SERVER]
        worker = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=worker_log, stderr=worker_log)
        _say(f"2. start a worker: spoolq --root {root} worker {SERVER}  (pid {worker.pid})")

        def worker_died() -> bool:
            return worker is not None and worker.poll() is not None

        def run_task(task_id: str, value: Any) -> tuple[int, str] | None:
            while True:
                try:
                    tracker.enqueueTask(TYPE, task_id, value)
                    break
                except tracker.QueueFull:  # retry if the queue is full, as the seed does
                    _say("   QueueFull! retrying in 1 s")
                    time.sleep(1)
            _say(f"   enqueueTask({TYPE!r}, {task_id!r}, {value!r})")
            started = time.monotonic()
            info = spool.queries.wait_for(TYPE, task_id, WAIT_LIMIT, give_up=worker_died)
            if info is None:
                why = "the worker died" if worker_died() else f"no final state after {WAIT_LIMIT:g} s"
                _say(f"   waiting for {task_id}: {why}; worker output:\n{_tail(worker_log)}")
                return None
            status = tracker.getTaskStatusByIdentifier(TYPE, task_id)
            _say(f"   wait (woken by inotify on done/): {status[1]} after {time.monotonic() - started:.2f} s")
            _say("   its log, oldest first (spoolq log):")
            for line in format_log(spool.log_records(TYPE, task_id)):
                _say(f"     {line}")
            return status

        _say("3. a task that works:")
        status = run_task("Task001", (1, 2, 3, 4, 5))
        if status is None:
            return 1
        data, mime = tracker.getTaskResponse(TYPE, "Task001")
        _say(f"   getTaskResponse: {data.decode()}  ({mime})")
        ok = status[1] == "FINISHED" and data == b"15.0"

        _say("4. a task that fails:")
        status = run_task("Task002", ("a",))
        if status is None:
            return 1
        ok = ok and status[1] == "FAILED"

        for task_id in ("Task001", "Task002"):
            tracker.deleteTaskByIdentifier(TYPE, task_id)
        left = spool.list_tasks()
        _say(f"5. deleteTaskByIdentifier for both: {len(left)} task(s) left")
        ok = ok and not left

        worker.send_signal(signal.SIGTERM)
        try:
            code = worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            code = None
        _say(f"6. stop the worker with SIGTERM: {'still running' if code is None else f'exit {code}'}")
        if code != 0:
            _say(f"   worker output:\n{_tail(worker_log)}")
        ok = ok and code == 0
        _say()
        _say("done: the spool is removed." if ok else "something went wrong (see above).")
        return 0 if ok else 1
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait()
        worker_log.close()
        if saved_root is None:
            os.environ.pop("SPOOLQ_ROOT", None)
        else:
            os.environ["SPOOLQ_ROOT"] = saved_root
        shutil.rmtree(root, ignore_errors=True)
