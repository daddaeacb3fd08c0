"""The remote side of the dask executor: what runs on a Dask worker.

Two parts, in two processes of the Dask worker's host:

* :func:`run_remote` is the function the spool host submits to Dask. It runs
  in a thread of the Dask worker process. It hands the task to a *slot*, a
  handler process of its own, forwards everything the handler reports to the
  spool host, in order, through a ``distributed.Queue`` that the spool host's
  daemon reads, and watches its own Dask task: once nobody wants the task
  any more (the spool host cancelled it: a timeout or a kill; or the spool
  host's client went away, so the scheduler released it), it kills the
  slot's whole process group and says so. Dask cannot interrupt a thread;
  it can kill a process, and that is why the handler runs in one.
* The slot (``python -m spoolq.worker.remote``, started by :func:`run_remote`
  and reused by the same Dask thread for later tasks) runs
  :func:`~spoolq.worker.runner.run_claim` unchanged, against a
  :class:`RemoteSpool`: a stand-in for the spool that keeps the task's state
  as its own writes leave it and turns every write into a message. The
  handler gets the same :class:`~spoolq.task.TaskContext` as under fork, the
  same rules (a write after a final state raises StaleClaim) and the same
  messages in the log. Limits (:mod:`.limits`) are applied in the slot, as in
  a fork slot, and a slot that ran a limited task exits after it.

Each message is ``[claim, attempt, seq, kind, *args]``; kinds: ``hello``
(Dask worker address, its pid, the slot's pid), ``state`` (state name,
message), ``log`` (message), ``response`` (bytes, MIME type), ``progress``
(the progress document, contract §12.3), ``output`` (the run's output as
``spoolq output`` shows it, capped as under fork, sent right before the
message that makes the task final or ends the run, contract §12.1), ``end``
(outcome or "", reason). ``attempt`` is random per call of
:func:`run_remote`, so the spool host can tell a second attempt of the same
claim (Dask ran it again after losing a worker) from the first, and refuse
it. The spool host applies each message through the fenced API with the
claim, so a message of a claim that lost its task is refused there.

Nothing here imports ``distributed`` at module level; the slot process never
imports it at all.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import secrets
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
from typing import Any

from ..errors import CorruptTask, SpoolError, StaleClaim
from ..lifecycle import HELD_STATES, Claim, Outcome, State, sources_of
from ..queries import TaskInfo
from ..spool import StartedTask
from ..store import fsutil
from ..store.codec import DEFAULT_RESPONSE_MIME, INPUT_JSON, response_of
from ..store.output import compose
from ..store.registry import TaskType
from .hygiene import ProcessState
from .limits import Limits
from .runner import run_claim

WATCH_INTERVAL = 0.05  # seconds between looks at whether the Dask task is still wanted
_PR_SET_PDEATHSIG = 1
_HEADER = struct.Struct("!I")


# --------------------------------------------------------------------------- frames between a Dask thread and its slot


def write_frame(fd: int, value: Any) -> None:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _read_exact(fd: int, size: int) -> bytes | None:
    chunks = b""
    while len(chunks) < size:
        chunk = os.read(fd, size - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return chunks


def read_frame(fd: int) -> Any:
    """One frame, or None at EOF."""
    header = _read_exact(fd, _HEADER.size)
    if header is None:
        return None
    data = _read_exact(fd, _HEADER.unpack(header)[0])
    return None if data is None else pickle.loads(data)


# --------------------------------------------------------------------------- the slot process


class RemoteSpool:
    """The spool as a handler on a Dask worker sees it: the calls that
    :func:`run_claim` and :class:`~spoolq.task.TaskContext` make, checked
    against the task's state as this run's own writes leave it (nobody else
    writes to a task while its claim holds it; if the spool host takes the
    task away it kills this run), and sent to the spool host as messages."""

    def __init__(self, spec: dict[str, Any], report: Any) -> None:
        self.claim = Claim.parse(spec["claim"])
        self.spec = spec
        self.report = report
        self.doc = dict(spec["doc"])
        self.state = State.RUNNING
        self.ttype = TaskType.from_json(self.claim.type, spec["type"])

    def _check(self, claim: Claim | str, allowed: frozenset[State]) -> Claim:
        claim = Claim.parse(claim)
        if claim != self.claim:
            raise StaleClaim(f"claim {claim} no longer owns task {claim.type}/{claim.id} (it was moved or deleted)")
        if self.state not in allowed:
            if self.state.terminal:
                raise StaleClaim(f"task {claim.type}/{claim.id} is already {self.state.name}")
            raise StaleClaim(f"task {claim.type}/{claim.id} is {self.state.name}: that change is not allowed")
        return claim

    def get_type(self, name: str) -> TaskType:
        return self.ttype

    def start(self, claim: Claim | str, *, hold_run_lock: bool = False) -> StartedTask:
        # No run lock here: the task's directory is on the spool host.
        claim = self._check(claim, frozenset({State.RUNNING}))
        raw, input_file = self.spec["payload"], self.spec["input_file"]
        try:
            value = __import__("json").loads(raw) if input_file == INPUT_JSON else pickle.loads(raw)
        except (Exception, SystemExit) as exc:
            reason = f"input cannot be loaded: {type(exc).__name__}: {exc}"
            self.set_state(claim, State.FAILED, reason)
            raise CorruptTask(self.spec["path"], f"task {claim.type}/{claim.id}: {reason}") from None
        return StartedTask(claim.type, claim.id, self.spec["handler"], value, input_file=input_file)

    def set_state(self, claim: Claim | str, state: State, message: str = "") -> State:
        state = State(state)
        if not sources_of(state):
            raise SpoolError(f"a handler cannot set state {state.name}")
        self._check(claim, sources_of(state))
        self.state = state
        self.doc.update(state=state.name, message=message)
        self.report("state", state.name, message)
        return state  # FAILED may become a retry on the spool host, which decides

    def retry(self, claim: Claim | str, delay: float | None = None, message: str = "") -> State:
        """A retry asked for by the handler: the spool host applies it."""
        self._check(claim, HELD_STATES)
        self.state = State.FAILED  # this run is over either way
        self.report("retry", delay, message)
        return State.ENQUEUED

    def finish_if_not_finished(self, claim: Claim | str, message: str = "") -> bool:
        if Claim.parse(claim) == self.claim and self.state.terminal:
            return False
        self.set_state(claim, State.FINISHED, message)
        return True

    def log_message(self, claim: Claim | str, message: str) -> None:
        self._check(claim, HELD_STATES)
        self.report("log", str(message))

    def store_response(self, claim: Claim | str, data: bytes | str, mime_type: str | None = DEFAULT_RESPONSE_MIME) -> None:
        data, mime_type = response_of(data, mime_type)  # refused here, in the handler's own call
        self._check(claim, HELD_STATES)
        self.doc["response_mime"] = mime_type
        self.report("response", data, mime_type)

    def store_progress(self, claim: Claim | str, doc: dict[str, Any]) -> None:
        """The handler's progress (already coalesced by its TaskContext: at
        most one message every 0.2 s), forwarded like the other writes."""
        self._check(claim, HELD_STATES)
        self.report("progress", dict(doc))

    def status(self, type_name: str, task_id: str) -> TaskInfo:
        return TaskInfo(type_name, task_id, self.state, self.spec["path"], dict(self.doc))


def slot_main(commands: int, results: int, parent: int) -> int:
    """A slot's life: run one task per frame read; exit at EOF, or after a
    task with limits (they cannot all be lifted)."""
    os.setpgid(0, 0)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        return 0  # the Dask worker died before we could ask to die with it
    born = ProcessState.take()
    while True:
        spec = read_frame(commands)
        if spec is None:
            return 0
        spool = RemoteSpool(spec, lambda *message: write_frame(results, ("msg", *message)))
        limited = bool(Limits.of(spool.ttype))
        # The handler's fds 1 and 2 go to a directory of the Dask thread
        # that runs this task; it forwards the output when the run is over.
        output_dir = _open_dir(spec.get("output_dir"))
        try:
            outcome = run_claim(spool, spool.claim, import_first=False, take_slot=False,  # type: ignore[arg-type]
                                output_dir=output_dir, hygiene=born)
        finally:
            if output_dir is not None:
                os.close(output_dir)
        retire = limited or born.retire  # (what cannot be put back: .hygiene)
        write_frame(results, ("end", outcome.value, retire))
        if retire:
            return 0


# --------------------------------------------------------------------------- in the Dask worker process


class _Slot:
    """A slot process and the pipes to it, owned by one Dask worker thread."""

    def __init__(self) -> None:
        cmd_r, self.commands = os.pipe2(os.O_CLOEXEC)
        self.results, res_w = os.pipe2(os.O_CLOEXEC)
        env = dict(os.environ)
        # The slot imports what this Dask worker can import (handler code
        # must be installed on the Dask workers, docs/scale-out.md).
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spoolq.worker.remote", str(cmd_r), str(res_w), str(os.getpid())],
            pass_fds=(cmd_r, res_w), stdin=subprocess.DEVNULL, env=env, close_fds=True,
        )
        os.close(cmd_r)
        os.close(res_w)
        self.pid = self.proc.pid

    def kill(self) -> None:
        for kill in (lambda: os.killpg(self.pid, signal.SIGKILL), lambda: os.kill(self.pid, signal.SIGKILL)):
            try:
                kill()
                break
            except (ProcessLookupError, PermissionError):
                continue

    def reap(self) -> tuple[int, float | None]:
        """Wait for the slot to exit: (wait status, CPU seconds it used)."""
        _, status, usage = os.wait4(self.pid, 0)
        self.proc.returncode = status  # Popen must not wait for it again
        self.close()
        return status, usage.ru_utime + usage.ru_stime

    def close(self) -> None:
        for fd in (self.commands, self.results):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.commands = self.results = -1


_slots: dict[int, _Slot] = {}
_queues: dict[str, Any] = {}
_lock = threading.Lock()


def _queue(name: str) -> Any:
    from distributed import Queue, get_client

    with _lock:
        queue = _queues.get(name)
        if queue is None or getattr(queue.client, "status", "") != "running":
            queue = _queues[name] = Queue(name, client=get_client())
        return queue


def _wanted(worker: Any, key: str) -> bool:
    """Whether this Dask task is still wanted: not cancelled by its client,
    not released because the client went away, the worker not closing.
    (A running task cannot be interrupted; it learns this by looking.)"""
    if str(getattr(worker, "status", "running")).split(".")[-1] not in ("running", "paused"):
        return False
    state = getattr(worker, "state", None)
    tasks = getattr(state, "tasks", None)
    if tasks is None:
        return True
    ts = tasks.get(key)
    return ts is not None and ts.state in ("executing", "long-running", "resumed")


def run_remote(spec: dict[str, Any]) -> str:
    """Run one claim on this Dask worker (see the module's docstring). Returns
    the outcome's value, or "" when the handler's process died or was killed;
    the spool host learns the same, in order, from the messages."""
    from distributed import get_worker

    worker = get_worker()
    key = worker.get_current_task()
    queue = _queue(spec["queue"])
    attempt = secrets.token_hex(6)
    seq = 0

    def send(messages: list[tuple[Any, ...]]) -> None:
        nonlocal seq
        batch = []
        for kind, *args in messages:
            seq += 1
            batch.append([spec["claim"], attempt, seq, kind, *args])
        queue.put(batch)

    # The run's output is captured into a directory of its own here, and
    # forwarded (capped, as under fork) in one message before the message
    # that ends the run's hold on the task, so that whoever sees the task
    # final (a waiter, ``output --follow``) finds its output there. The
    # directory is made in the Dask worker's own local directory: when the
    # worker is killed before the ``finally`` below, Dask purges a dead
    # worker's directory when the next worker starts, instead of it staying
    # in /tmp for good.
    output_dir = tempfile.mkdtemp(prefix="spoolq-output-", dir=worker.local_directory)
    spec = {**spec, "output_dir": output_dir}
    try:
        return _start_and_follow(worker, key, spec, _OutputBeforeEnds(send, output_dir))
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)


class _OutputBeforeEnds:
    """Sends batches of messages with the run's output (``output``) put
    before each one that ends the run's hold on its task: a final state, a
    retry, the run's end. The spool host applies messages in order, so the
    output is in the task before it is final, as under fork. A handler that
    made its task final itself and printed on afterwards has its output sent
    again at the end (the spool host accepts output through a claim that made
    its task final); output that did not change since it was sent is not."""

    def __init__(self, send: Any, output_dir: str) -> None:
        self.send = send
        self.output_dir = output_dir
        self.sent: bytes | None = None

    def __call__(self, messages: list[tuple[Any, ...]]) -> None:
        batch: list[tuple[Any, ...]] = []
        for message in messages:
            if _ends_the_hold(message):
                output = _output_of(self.output_dir)
                if output != self.sent:
                    batch.append(("output", output))
                    self.sent = output
            batch.append(message)
        self.send(batch)


def _ends_the_hold(message: tuple[Any, ...]) -> bool:
    kind = message[0]
    return kind in ("end", "retry") or (kind == "state" and State[message[1]].terminal)


def _output_of(path: str) -> bytes:
    dfd = _open_dir(path)
    if dfd is None:
        return b""
    try:
        return compose(dfd)
    except OSError:
        return b""
    finally:
        os.close(dfd)


def _open_dir(path: str | None) -> int | None:
    if not path:
        return None
    try:
        return fsutil.open_dir(path)
    except OSError:
        return None


def _start_and_follow(worker: Any, key: str, spec: dict[str, Any], send: Any) -> str:
    thread = threading.get_ident()
    slot = _slots.get(thread)
    if slot is None or slot.proc.poll() is not None:
        if slot is not None:
            slot.close()
        slot = _slots[thread] = _Slot()
    send([("hello", worker.address, os.getpid(), slot.pid)])
    if not _wanted(worker, key):
        send([("end", "", "cancelled before the handler started")])
        return ""
    try:
        write_frame(slot.commands, spec)
    except OSError:
        slot.kill()
        slot = _slots[thread] = _Slot()
        write_frame(slot.commands, spec)
    return _follow(worker, key, slot, thread, spec, send)


def _follow(worker: Any, key: str, slot: _Slot, thread: int, spec: dict[str, Any], send: Any) -> str:
    """Forward the slot's messages until it ends the task, dies, or the task
    is no longer wanted (then kill it)."""
    limits = Limits.of(TaskType.from_json(Claim.parse(spec["claim"]).type, spec["type"]))
    while True:
        ready, _, _ = select.select([slot.results], [], [], WATCH_INTERVAL)
        if ready:
            frames = []
            while True:
                frame = read_frame(slot.results)
                if frame is None:  # EOF: the slot died
                    status, cpu = slot.reap()
                    _slots.pop(thread, None)
                    send([*frames, ("end", "", limits.explain_death(status, cpu) or _death(status))])
                    return ""
                frames.append(frame[1:])
                if frame[0] == "end":
                    outcome, limited = frame[1], frame[2]
                    send([*frames[:-1], ("end", outcome, "")])
                    if limited:
                        slot.reap()
                        _slots.pop(thread, None)
                    return str(outcome)
                if not select.select([slot.results], [], [], 0)[0]:
                    break
            send(frames)
        if not _wanted(worker, key):
            slot.kill()
            slot.reap()
            _slots.pop(thread, None)
            send([("end", "", "killed: the spool host cancelled the run or went away")])
            return ""


def _death(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"handler process died of signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"handler process exited with status {os.WEXITSTATUS(status)} without finishing the task"


def outcome_name(value: str) -> Outcome | None:
    """The Outcome an ``end`` message carries ("" for none)."""
    return Outcome(value) if value else None


if __name__ == "__main__":
    sys.exit(slot_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
