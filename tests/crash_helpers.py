"""Processes and handlers for the crash-point, strace and soak tests.

Run as a program it is one of the real processes those tests start:

* ``python crash_helpers.py worker ROOT SERVER OPTIONS_JSON`` — a worker
  daemon (:class:`spoolq.worker.Worker`) with options the command line does
  not expose (short heartbeat and sweep intervals); ``SLOT_CRASH_AT=point``
  (``SLOT_FAIL_AT=point``: an I/O error there) arms a crash point in its
  first handler process only;
* ``python crash_helpers.py produce ROOT ACKS TASKS_JSON [SECONDS]`` — a
  producer that enqueues ``[[type, id, input], …]`` (spread evenly over
  SECONDS if given) and appends ``<type>:<id>`` to ACKS
  (O_APPEND) once ``enqueue`` returned, i.e. once the task was acknowledged;
  a task that already exists (enqueued by an earlier life of this producer)
  is noted as ``exists <type>:<id>``.

Crash hits. ``SPOOLQ_CRASH_AT`` makes ``spoolq.faults.crashpoint`` SIGKILL
its own process (``SPOOLQ_HANG_AT``: hang there). So that a test can tell
*which* process hit the point (the daemon or one of its handler processes,
or a producer), these programs install an audit hook: on the
``spoolq.crashpoint`` audit event a crash point raises, when
``SPOOLQ_CRASH_LOG`` names a file, one line ``<point> <role> <pid> <caller>
<caller's caller> …`` is appended to it just before the kill (or hang). The
hook only observes; the kill is spoolq's own.

Handlers. Each records ``<event> <type>:<id> <server> <pid> <ppid>
<monotonic ns>`` with one O_APPEND write to the file named by the input's
``record`` key. A run holds an exclusive ``flock`` on a per-task file in
``<record>.locks/`` from its start until it ends or its process dies (the
kernel drops the lock at death); finding it taken means another run of the
same task is alive at that moment, and is recorded as ``overlap``. That is an
exact "never on two servers at once" detector, killed runs included.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator

MAIN_PID = os.getpid()

# --------------------------------------------------------------------------- crash-hit recorder


def _audit(event: str, args: tuple) -> None:
    if event != "spoolq.crashpoint":
        return
    path = os.environ.get("SPOOLQ_CRASH_LOG")
    if not path:
        return
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_name != "crashpoint":
        frame = frame.f_back
    if frame is None:
        return
    point = args[0]
    callers = []
    caller = frame.f_back
    while caller is not None and len(callers) < 4:
        callers.append(caller.f_code.co_name)
        caller = caller.f_back
    role = os.environ.get("CRASH_ROLE", "?")
    if os.getpid() != MAIN_PID:
        role += "-child"
    _append(path, f"{point} {role} {os.getpid()} {' '.join(callers)}\n")


def read_lines(path: str | os.PathLike[str]) -> list[list[str]]:
    """A file of records as split lines ([] if it does not exist yet): the
    crash log gives [point, role, pid, callers…], the handler records
    [event, task, server, pid, ppid, ns]."""
    try:
        with open(path, encoding="utf-8") as fh:
            return [line.split() for line in fh if line.strip()]
    except FileNotFoundError:
        return []


read_hits = read_records = read_lines


# --------------------------------------------------------------------------- handler records

def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _record(inp: dict, event: str, ts) -> None:
    server = os.environ.get("SPOOLQ_TEST_SERVER", "?")
    line = f"{event} {ts.type}:{ts.id} {server} {os.getpid()} {os.getppid()} {time.monotonic_ns()}\n"
    _append(inp["record"], line)


@contextlib.contextmanager
def _run(ts, inp: dict) -> Iterator[None]:
    """One handler run: take the task's run lock (see module doc), record
    ``start``; record ``end`` if the body returns; always drop the lock
    (a handler process runs many tasks in its life)."""
    locks = inp["record"] + ".locks"
    os.makedirs(locks, exist_ok=True)
    fd = os.open(os.path.join(locks, f"{ts.type}:{ts.id}"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _record(inp, "overlap", ts)
        _record(inp, "start", ts)
        yield
        _record(inp, "end", ts)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- handlers


def ok(ts, inp):
    """Print past the head of its output (type N keeps 64 bytes of it, so
    the run's end puts head, marker and tail together: the point
    ``output.parts_removed``), store a response and return."""
    with _run(ts, inp):
        print(f"output of {ts.id} " * 20, flush=True)
        ts.store_response(f"done {ts.id}", "text/plain")


def fail(ts, inp):
    """Run to its end, then raise."""
    with _run(ts, inp):
        pass
    raise ValueError(f"planned failure of {ts.id}")


def slow_first(ts, inp):
    """Sleep ``seconds`` on the first run (marker file), return at once later."""
    with _run(ts, inp):
        marker = inp["record"] + f".{ts.type}:{ts.id}.ran"
        if not os.path.exists(marker):
            _append(marker, "1\n")
            time.sleep(inp.get("seconds", 30))


def _escape(inp: dict) -> None:
    """Leave a grandchild behind that leaves the process group (setsid,
    double fork) and sleeps; its pid goes to ``<record>.escaped``. It keeps
    the run's lock file open (inherited), so if it outlived the run, a later
    run of the task would record an overlap."""
    child = os.fork()
    if child == 0:
        os.setsid()
        if os.fork() == 0:
            _append(inp["record"] + ".escaped", f"{os.getpid()}\n")
            time.sleep(60)
        os._exit(0)
    os.waitpid(child, 0)


def work(ts, inp):
    """The soak's handler: ``kind`` is noop, sleep, fail, hang or escape."""
    kind = inp.get("kind", "noop")
    with _run(ts, inp):
        if kind == "sleep":
            time.sleep(inp["seconds"])
        elif kind == "hang":
            time.sleep(3600)  # killed at the type's timeout
        elif kind == "escape":
            _escape(inp)
            time.sleep(inp.get("seconds", 0))
    if kind == "fail":
        raise ValueError(f"planned failure of {ts.id}")


# --------------------------------------------------------------------------- starting the programs


def spawn(args: list[str], log_path: str | os.PathLike[str], env: dict | None = None):
    """Start this file as a program (``worker …`` or ``produce …``) with
    stderr to *log_path*, ``tests/`` on PYTHONPATH, no systemd socket and
    no crash point armed unless *env* arms one."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    full = {k: v for k, v in os.environ.items() if not k.startswith("SPOOLQ_CRASH") and k != "NOTIFY_SOCKET"}
    full.pop("SLOT_CRASH_AT", None)
    full.pop("SLOT_FAIL_AT", None)
    full["PYTHONPATH"] = os.pathsep.join([here, full.get("PYTHONPATH", "")])
    full.update(env or {})
    with open(log_path, "w") as err:
        return subprocess.Popen(
            [sys.executable, os.path.join(here, "crash_helpers.py"), *args],
            env=full, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
        )


# --------------------------------------------------------------------------- checks shared by the tests


def _next_states():
    from spoolq import State

    # state -> states that may follow it in a log (free-text records repeat the state)
    return {
        # ENQUEUED again: a claim was interrupted; FAILED: cancelled while waiting
        State.ENQUEUED: {State.ENQUEUED, State.SCHEDULED, State.FAILED},
        State.SCHEDULED: {State.RUNNING, State.ENQUEUED, State.FAILED},
        State.RUNNING: {State.RUNNING, State.PAUSED, State.FINISHED, State.FAILED, State.ENQUEUED},
        State.PAUSED: {State.RUNNING, State.PAUSED, State.FINISHED, State.FAILED, State.ENQUEUED},
        State.FINISHED: set(),
        State.FAILED: {State.ENQUEUED},  # only by `requeue`: its record says so (check_task)
    }


def runs_by_task(records: list[list[str]]) -> dict[str, list[list[str]]]:
    """Handler records grouped by task name, in file order."""
    out: dict[str, list[list[str]]] = {}
    for record in records:
        out.setdefault(record[1], []).append(record)
    return out


def check_task(spool, t: str, i: str, runs: list[list[str]]):
    """Check one task's status against its log and its handler records
    (*runs*: its lines from :func:`runs_by_task`); returns its TaskInfo.

    * the log starts ENQUEUED, ends in the status's state, and only makes
      allowed transitions; its SCHEDULED→RUNNING pairs are the counted starts;
      restarts stay within max_restarts and within the re-enqueues after a start;
    * no two runs of the handler were alive at once (run lock); every ``end``
      follows a ``start`` in the same process; there are no more handler runs
      than counted starts; a FINISHED task's handler completed at least once.
    """
    from spoolq import State

    info = spool.status(t, i)
    records = spool.log_records(t, i)
    states = [r.state for r in records]
    label = f"{t}:{i}: log {[s.name for s in states]} vs status {info.doc}"
    assert states and states[0] == State.ENQUEUED, label
    assert states[-1] == info.state, label
    allowed = _next_states()
    for before, after in zip(records, records[1:]):
        assert after.state in allowed[before.state], label
        if before.state == State.FAILED:
            assert after.message == "requeued", label
    starts = sum(1 for a, b in zip(states, states[1:]) if a == State.SCHEDULED and b == State.RUNNING)
    assert starts == info.doc["starts"], label
    requeued = sum(1 for a, b in zip(states, states[1:]) if a in (State.RUNNING, State.PAUSED) and b == State.ENQUEUED)
    assert info.doc["restarts"] <= min(spool.get_type(t).max_restarts, requeued), label

    assert not [r for r in runs if r[0] == "overlap"], f"{t}:{i} ran twice at once: {runs}"
    alive: set[str] = set()
    handler_runs = ends = 0
    for event, _, _, pid, *_ in runs:
        if event == "start":
            alive.add(pid)
            handler_runs += 1
        elif event == "end":
            assert pid in alive, f"{t}:{i}: end without a start in pid {pid}: {runs}"
            alive.discard(pid)
            ends += 1
    assert handler_runs <= info.doc["starts"], f"{t}:{i}: {handler_runs} handler runs, {label}"
    if info.state == State.FINISHED:
        assert ends >= 1, f"{t}:{i} FINISHED but its handler never completed: {runs}"
    return info


# --------------------------------------------------------------------------- programs


def produce(root: str, acks: str, tasks: list, spread: float = 0.0) -> int:
    """Enqueue *tasks*, evenly over *spread* seconds (0: at once). Tasks
    whose input says ``"batch": true`` go in one ``enqueue_many`` at the end
    (JSON inputs), acknowledged once it returned."""
    from spoolq import Spool
    from spoolq.errors import QueueFull, TaskExists

    spool = Spool(root)
    began = time.monotonic()
    batch = [t for t in tasks if isinstance(t[2], dict) and t[2].get("batch")]
    tasks = [t for t in tasks if t not in batch]
    for n, (type_name, task_id, inp) in enumerate(tasks):
        if spread > 0:
            time.sleep(max(0.0, began + n * spread / len(tasks) - time.monotonic()))
        while True:
            try:
                spool.enqueue(type_name, task_id, inp)
                _append(acks, f"{type_name}:{task_id}\n")
            except TaskExists:
                _append(acks, f"exists {type_name}:{task_id}\n")
            except QueueFull:
                time.sleep(0.01)
                continue
            break
    if batch:
        results = spool.enqueue_many(batch[0][0], [{"id": i, "input": inp} for _, i, inp in batch])
        for result in results:
            exists = isinstance(result.error, TaskExists)
            assert result.error is None or exists, result.error
            _append(acks, f"{'exists ' if exists else ''}{batch[0][0]}:{result.id}\n")
    return 0


def requeue(root: str, type_name: str, task_id: str) -> int:
    """Requeue a FAILED task (once more after a crash: one not FAILED is fine then)."""
    from spoolq import Spool
    from spoolq.errors import WrongState

    try:
        Spool(root).requeue(type_name, task_id)
    except WrongState:
        pass
    return 0


def cancel(root: str, type_name: str, task_id: str) -> int:
    """Cancel a task (once more after a crash: a final task is fine then)."""
    from spoolq import Spool
    from spoolq.errors import WrongState

    try:
        Spool(root).cancel(type_name, task_id, "crash test")
    except WrongState:
        pass
    return 0


def worker(root: str, server: str, options: dict) -> int:
    from spoolq.worker import Worker
    from spoolq.errors import SpoolqError
    from spoolq.spool import Spool
    from spoolq.systemd import setup_logging

    os.environ["SPOOLQ_TEST_SERVER"] = server  # the handler processes record it
    slot_fault = [(f"SPOOLQ_{kind}_AT", os.environ[f"SLOT_{kind}_AT"])
                  for kind in ("CRASH", "FAIL") if os.environ.get(f"SLOT_{kind}_AT")]
    if slot_fault:
        # Arm the point in the first handler process the daemon forks only
        # (it re-reads SPOOLQ_CRASH_AT / SPOOLQ_FAIL_AT in each child,
        # faults.reconfigure): one crash or I/O error, then the daemon's
        # replacement processes recover from it. (Armed in every one, a
        # crash in the start between its move and its status write would
        # come back with each new process: such a start is never counted,
        # so its task goes round again.)
        armed = [True]

        def arm() -> None:
            if armed[0]:
                os.environ[slot_fault[0][0]] = slot_fault[0][1]

        def disarm() -> None:
            armed[0] = False

        os.register_at_fork(after_in_child=arm, after_in_parent=disarm)
    if os.environ.get("SPOOLQ_FAIL_AT"):
        # An I/O error armed for the daemon is the daemon's alone: its
        # handler processes (which re-read the variable) do not inherit it.
        os.register_at_fork(after_in_child=lambda: os.environ.pop("SPOOLQ_FAIL_AT", None))
    setup_logging()
    try:
        return Worker(Spool(root), server, **options).run()
    except SpoolqError as exc:
        print(f"spoolq: {exc}", file=sys.stderr)
        return 78


if __name__ == "__main__":
    sys.addaudithook(_audit)
    command = sys.argv[1]
    if command == "worker":
        sys.exit(worker(sys.argv[2], sys.argv[3], json.loads(sys.argv[4])))
    elif command == "requeue":
        sys.exit(requeue(sys.argv[2], sys.argv[3], sys.argv[4]))
    elif command == "cancel":
        sys.exit(cancel(sys.argv[2], sys.argv[3], sys.argv[4]))
    elif command == "produce":
        with open(sys.argv[4], encoding="utf-8") as fh:
            spread = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
            sys.exit(produce(sys.argv[2], sys.argv[3], json.load(fh), spread))
    sys.exit(f"unknown command {command!r}")
