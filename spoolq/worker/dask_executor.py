"""The dask executor: handlers of ``--executor dask`` types run on a Dask
``distributed`` cluster; the spool, its locks and every state change stay on
the spool host (contract §13.1-13.2, docs/scale-out.md).

On the spool host, :class:`DaskExecutor` behind the :class:`Executor` seam:

* ``submit(claim)`` starts the task here (``Spool.start(load=False)``: the
  task moves to ``running/``; its input is read, not unpickled) and submits
  :func:`~spoolq.worker.remote.run_remote` with the handler path, the input
  bytes, the type's settings and the claim, under the key
  ``spoolq:<claim>``, ``pure=False`` and no Dask retries: spoolq decides
  about runs again, through restarts.
* A background thread (``spoolq-dask``) owns the connection: it connects (and
  reconnects) to the scheduler, reads the per-server ``distributed.Queue``
  the remote side writes to, subscribes to the scheduler's ``all`` events
  (``remove-worker``), forwards cancels, and reads the cluster's size. It
  never touches the spool: it appends what it learns to an inbox and writes
  a byte to a pipe that is among ``fds()``, which wakes the worker loop.
* ``events()``, in the loop's thread, applies each message through the spool's
  fenced API with the run's claim, in the order the handler made them. A
  message of a claim that lost its task gets StaleClaim there and is refused
  and counted (``refused``), like any late write; so is every message of an
  attempt other than the first (Dask ran the task again after losing a
  worker). A run is reported ended by its ``end`` message; or *lost*
  (``Ended.lost``: the loop re-enqueues it and charges a restart) when its
  Dask worker was removed, Dask gave up on it (KilledWorker), the scheduler
  connection was lost, or no ``end`` came; a lost run is reported only after
  :data:`QUIET` seconds in which no further attempt of it spoke up, or after
  such an attempt has ended too.
* ``kill(claim)`` cancels the run's future; the remote side sees its task
  cancelled and kills the handler's process group; its ``end`` follows.
* ``available()`` is False while the scheduler is unreachable: the loop then
  claims no dask task (and says so, once), and takes them again once it is
  back. ``capacity()`` is ``--dask-concurrency`` or the cluster's threads.

``distributed`` is imported only when a DaskExecutor is made
(``pip install 'spoolq[dask]'``).
"""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from ..errors import CorruptTask, SpoolError, SpoolqError, StaleClaim, TaskNotFound
from ..lifecycle import Claim, Outcome, State
from ..spool import Spool
from .executor import Ended
from .remote import outcome_name, run_remote
from .runner import RETRY_ASKED, NotRecorded, outcome_of

log = logging.getLogger("spoolq.dask")

QUIET = 1.0  # seconds a lost run waits for another attempt of it to speak up
KILL_CONFIRM = 30.0  # seconds a cancelled run may take to confirm its end, connected
NO_END = 10.0  # seconds a finished future may wait for its end message
INFO_INTERVAL = 1.0  # seconds between reads of the cluster's workers and threads
# Seconds between looks at the queue when it was empty. A get that waits on
# the scheduler ends, when nothing came, in a TimeoutError the scheduler logs
# as an ERROR with its traceback (five a second, for as long as a worker is
# connected): so the queue is read without waiting, and idle turns sleep here.
QUEUE_IDLE_SLEEP = 0.05
CONNECT_TIMEOUT = 5.0
_WRITES = ("state", "retry", "log", "response", "progress", "output")  # the messages that write to the task, through its claim


def import_distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise SpoolError(f"the dask executor needs the 'dask' extra: pip install 'spoolq[dask]' ({exc})") from None
    return distributed


def check_address(address: str) -> str:
    """*address* if the scheduler address is well formed; SpoolError if not."""
    import_distributed()
    from distributed.comm import parse_address

    try:
        scheme, location = parse_address(address)
        if not location or ":" not in location:
            raise ValueError("no port")
    except (ValueError, TypeError) as exc:
        raise SpoolError(f"bad --dask-scheduler {address!r}: expected tcp://HOST:PORT ({exc})") from None
    return address


@dataclass
class _Run:
    claim: Claim
    future: Any
    attempt: str | None = None  # the first attempt's token: only its messages count
    worker: str | None = None
    pids: tuple[int, int] | None = None  # Dask worker process, handler process
    others: set[str] = field(default_factory=set)  # later attempts not yet ended
    future_status: str | None = None
    future_done_at: float | None = None
    lost: str | None = None  # why, once the run is taken for lost
    lost_at: float | None = None
    killing: bool = False
    killed_at: float | None = None
    run_lock: int | None = None  # held here for the remote run: no sweeper takes the task meanwhile
    slot: int | None = None  # a slot of its type's concurrency limit, held here for the remote run
    unrecorded: NotRecorded | None = None  # the run's end, which this host could not write


class DaskExecutor:
    """Handlers on a Dask cluster; see the module's docstring."""

    name = "dask"

    def __init__(self, spool: Spool, server: str, address: str, *, concurrency: int = 0) -> None:
        import_distributed()
        self.spool = spool
        self.server = server
        self.address = check_address(address)
        self.concurrency = max(0, int(concurrency))
        self.queue_name = f"spoolq:{server}:{spool.root}"
        self.refused = 0  # messages refused: late ones of lost claims, later attempts
        self.runs: dict[Claim, _Run] = {}
        self._inbox: collections.deque[tuple[Any, ...]] = collections.deque()
        self._cancels: collections.deque[Any] = collections.deque()
        self._early: list[Ended] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._client: Any = None
        self._queue: Any = None
        self._connected = False
        self._why = ""  # empty until the first try to connect has an answer
        self._workers: set[str] = set()
        self._gone: set[str] = set()  # workers seen in the cluster and then no more
        self._nthreads = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_at: float | None = None  # monotonic, when the background thread started

    # ------------------------------------------------------------------ the Executor seam

    def available(self) -> bool:
        if self._thread is None:
            self._thread = threading.Thread(target=self._io, name="spoolq-dask", daemon=True)
            self._started_at = time.monotonic()
            self._thread.start()
        return self._connected

    def unavailable_reason(self) -> str:
        """Why it is not available; empty while the first connection is
        being made, unless that takes longer than a connection may."""
        why = self._why
        if not why and self._started_at is not None:
            waited = time.monotonic() - self._started_at
            if waited > 2 * CONNECT_TIMEOUT:
                why = f"no answer after {waited:.0f} s; still trying"
        return f"dask scheduler {self.address}: {why}" if why else ""

    def capacity(self) -> int | None:
        # --dask-concurrency, else the cluster's threads; and none while the
        # cluster has no worker: a task claimed then sat RUNNING, its timeout
        # running and a restart charged at the end, with nothing to run it.
        if not self._nthreads:
            return 0
        return self.concurrency or self._nthreads

    def submit(self, claim: Claim, deadline: float = math.inf) -> None:
        client = self._client
        if client is None or not self._connected:
            raise OSError(f"dask scheduler {self.address} is not connected")
        ttype = self.spool.get_type(claim.type)
        slot = self.spool.slots.acquire(claim.type, ttype.concurrency) if ttype.concurrency else None
        if ttype.concurrency and slot is None:
            self._early.append(Ended(claim, Outcome.NO_ROOM, f"all {ttype.concurrency} slots of {claim.type} are taken"))
            self._poke()
            return
        try:
            started = self.spool.start(claim, load=False, hold_run_lock=True)
        except (StaleClaim, TaskNotFound, CorruptTask) as exc:
            if slot is not None:
                os.close(slot)
            if isinstance(exc, CorruptTask):
                log.error("%s: %s", claim, exc)
            self._early.append(Ended(claim, outcome_of(self.spool, claim) if isinstance(exc, CorruptTask)
                                     else Outcome.GONE))
            self._poke()
            return
        info = self.spool.status(claim.type, claim.id)
        spec = {
            "claim": str(claim), "handler": started.handler, "input_file": started.input_file,
            "payload": started.input, "type": self.spool.get_type(claim.type).to_json(), "doc": info.doc,
            "path": info.path, "queue": self.queue_name,
        }
        run = _Run(claim, None, run_lock=started.run_lock, slot=slot)
        self.runs[claim] = run
        try:
            run.future = client.submit(run_remote, spec, key=f"spoolq:{claim}", pure=False, retries=0)
            run.future.add_done_callback(lambda future: self._post("done", claim, future.status))
        except Exception as exc:  # noqa: BLE001 - the task runs already: it is lost, not handed back
            self._lose(run, f"could not submit it to dask: {type(exc).__name__}: {exc}", time.monotonic())

    def fds(self) -> list[int]:
        return [self._wake_r]

    def events(self, ready: Collection[int] | None = None) -> list[Ended]:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        ended, self._early = self._early, []
        now = time.monotonic()
        while self._inbox:
            item = self._inbox.popleft()
            if item[0] == "messages":
                for message in item[1]:
                    ended += self._apply(message, now)
            elif item[0] == "done":
                self._future_done(item[1], item[2], now)
            elif item[0] == "worker-removed":
                self._worker_removed(item[1], item[2], now)
        ended += self._overdue(now)
        return ended

    def kill(self, claim: Claim) -> None:
        run = self.runs.get(claim)
        if run is None or run.killing:
            return
        run.killing = True
        run.killed_at = time.monotonic()
        if run.future is not None:
            self._cancels.append(run.future)

    def pid(self, claim: Claim) -> int | None:
        return None  # the handler's process is on a Dask worker's host

    def close(self, *, timeout: float = 10.0) -> None:
        for run in self.runs.values():
            if run.future is not None:
                self._cancels.append(run.future)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # ------------------------------------------------------------------ messages, in the loop's thread

    def _apply(self, message: list[Any], now: float) -> list[Ended]:
        claim_text, attempt, _seq, kind, *args = message
        try:
            claim = Claim.parse(claim_text)
        except SpoolqError:
            return []
        run = self.runs.get(claim)
        if kind == "hello" and run is not None:
            if run.attempt is None:
                run.attempt, run.worker, run.pids = attempt, args[0], (args[1], args[2])
                log.info("running %s:%s on dask worker %s (worker pid %s, handler pid %s)",
                         claim.type, claim.id, args[0], args[1], args[2])
            elif attempt != run.attempt:
                run.others.add(attempt)
                self._lose(run, f"dask worker {run.worker} was lost while it ran the task", now)
            return []
        if run is not None and attempt != run.attempt:
            # A later attempt of a run we hold (Dask ran it again after
            # losing a worker): never applied, its claim is still valid.
            if kind == "end":
                run.others.discard(attempt)
            elif kind in _WRITES:
                self.refused += 1
                log.info("refused a %s of %s from a second dask attempt (%d refused so far)", kind, claim, self.refused)
            return []
        if run is None:
            # A run this process does not hold: a lost claim (this daemon was
            # restarted, or the run was settled as lost). Through the fence.
            if kind in _WRITES:
                self._refuse_or_apply(claim, kind, args, late=True)
            return []
        if kind == "end":
            self._drop(run)
            outcome = outcome_name(args[0])
            if outcome is not None and run.unrecorded is not None:
                return [Ended(claim, Outcome.UNRECORDED, run.unrecorded.note)]
            if outcome is not None:
                return [Ended(claim, outcome_of(self.spool, claim))]
            if run.lost is not None and not run.killing:  # killed because it was taken for lost
                return [Ended(claim, None, run.lost, lost=True)]
            return [Ended(claim, None, args[1])]
        error = self._refuse_or_apply(claim, kind, args, late=False)
        if error is not None and (kind == "retry" or (kind == "state" and State[args[0]].terminal)):
            # The run's end, not written here (an I/O error): the loop writes
            # it through the claim once the run has ended, as under fork.
            state, message = (State.FAILED, args[1] or RETRY_ASKED) if kind == "retry" \
                else (State[args[0]], args[1])
            run.unrecorded = NotRecorded(state, message, error.strerror or str(error))
        return []

    def _drop(self, run: _Run) -> None:
        """The run is over for this host: forget it and let its run lock go
        (the remote side has confirmed its end, or it is taken for lost)."""
        self.runs.pop(run.claim, None)
        for fd in (run.run_lock, run.slot):
            if fd is not None:
                os.close(fd)
        run.run_lock = run.slot = None

    def _refuse_or_apply(self, claim: Claim, kind: str, args: list[Any], *, late: bool) -> OSError | None:
        """One write through the claim; StaleClaim means refused (counted).
        The OSError it met (logged), if any."""
        try:
            if kind == "state":
                self.spool.set_state(claim, State[args[0]], args[1])
            elif kind == "retry":
                self.spool.retry(claim, args[0], args[1])
            elif kind == "log":
                self.spool.log_message(claim, args[0])
            elif kind == "progress":
                self.spool.store_progress(claim, args[0])
            elif kind == "output":
                self.spool.store_output(claim, args[0])
            else:
                self.spool.store_response(claim, args[0], args[1])
        except StaleClaim as exc:
            self.refused += 1
            what = "late message from lost claim" if late else "message of a run whose task was taken away"
            log.info("refused a %s %s (%s): %s (%d refused so far)", what, claim, kind, exc, self.refused)
        except SpoolqError as exc:
            log.error("cannot apply %s of %s: %s", kind, claim, exc)
        except OSError as exc:
            log.error("cannot apply %s of %s: %s", kind, claim, exc)
            return exc
        return None

    def _future_done(self, claim: Claim, status: str, now: float) -> None:
        run = self.runs.get(claim)
        if run is None:
            return
        run.future_status, run.future_done_at = status, now
        if status == "error" and run.lost is None:
            try:
                exc = run.future.exception(timeout=0)
                why = f"dask gave up on it: {type(exc).__name__}: {exc}"
            except Exception as err:  # noqa: BLE001
                why = f"dask gave up on it: {type(err).__name__}"
            self._lose(run, why, now)
        elif status == "cancelled" and not run.killing and run.lost is None:
            self._lose(run, f"the connection to the dask scheduler {self.address} was lost while it ran", now)

    def _worker_removed(self, address: str, keys: set[str], now: float) -> None:
        for run in list(self.runs.values()):
            if run.worker == address or f"spoolq:{run.claim}" in keys:
                self._lose(run, f"dask worker {address} was lost while it ran the task", now)

    def _lose(self, run: _Run, why: str, now: float) -> None:
        if run.lost is None:
            run.lost, run.lost_at = why, now
            log.warning("%s:%s: %s", run.claim.type, run.claim.id, why)
        if run.future is not None:
            self._cancels.append(run.future)  # no further attempt may start
        self._poke()

    def _overdue(self, now: float) -> list[Ended]:
        """Runs to report without an end message: lost ones after the quiet
        period (and after any later attempt ended); cancelled ones that never
        started; ones whose end never came."""
        ended = []
        for run in list(self.runs.values()):
            if run.lost is None and run.worker in self._gone:
                self._lose(run, f"dask worker {run.worker} left the cluster while it ran the task", now)
            if run.lost is None and run.future_done_at is not None:
                if run.killing and run.attempt is None and now - run.future_done_at >= QUIET:
                    run.lost, run.lost_at = "killed before it started", now - QUIET
                elif run.future_status == "finished" and now - run.future_done_at >= NO_END:
                    self._lose(run, "its result came but not its messages", now - QUIET)
            if run.lost is None and run.killing and run.killed_at is not None and now - run.killed_at > KILL_CONFIRM:
                self._lose(run, f"no confirmation of its end {KILL_CONFIRM:g} s after it was killed", now - QUIET)
            if run.lost is not None and not run.others and run.lost_at is not None and now - run.lost_at >= QUIET:
                self._drop(run)
                ended.append(Ended(run.claim, None, run.lost, lost=True))
        return ended

    # ------------------------------------------------------------------ the background thread

    def _post(self, *item: Any) -> None:
        self._inbox.append(item)
        self._poke()

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _io(self) -> None:
        next_info = 0.0
        while not self._stop.is_set():
            if not self._ensure_connected():
                self._stop.wait(1.0)
                continue
            while self._cancels:
                future = self._cancels.popleft()
                try:
                    future.cancel()
                except Exception:  # noqa: BLE001 - lost connection: the runs are lost anyway
                    pass
            if time.monotonic() >= next_info:
                next_info = time.monotonic() + INFO_INTERVAL
                self._read_cluster()
            self._receive()
            if any(run.lost or run.killing or run.future_done_at for run in self.runs.values()):
                self._poke()  # let the loop look at deadlines
        self._disconnect()

    def _ensure_connected(self) -> bool:
        client = self._client
        if client is not None and client.status == "running":
            if self._queue is None:
                try:
                    self._subscribe(client)
                except Exception as exc:  # noqa: BLE001
                    self._set_connected(False, f"{type(exc).__name__}: {exc}")
                    return False
            self._set_connected(True, "")
            return True
        if client is not None and client.status in ("connecting", "newly-created"):
            self._queue = None  # a new scheduler knows neither our queue nor our subscription
            self._set_connected(False, "connection lost; reconnecting")
            return False
        self._disconnect()
        distributed = import_distributed()
        try:
            client = distributed.Client(self.address, timeout=CONNECT_TIMEOUT, set_as_default=False)
        except Exception as exc:  # noqa: BLE001 - unreachable, refused, timed out
            self._set_connected(False, f"unreachable ({type(exc).__name__}: {exc})".replace("\n", " "))
            return False
        self._client = client
        return self._ensure_connected()

    def _subscribe(self, client: Any) -> None:
        distributed = import_distributed()
        client.subscribe_topic("all", self._on_event)
        # Queue() asks the scheduler with no time limit: a scheduler that
        # accepted the connection but does not answer must cost
        # CONNECT_TIMEOUT and a retry, not the thread, so ask it first.
        client.sync(client.scheduler.identity, n_workers=0, callback_timeout=CONNECT_TIMEOUT)
        self._queue = distributed.Queue(self.queue_name, client=client)
        self._read_cluster()

    def _on_event(self, event: Any) -> None:
        msg = event[1] if isinstance(event, tuple) and len(event) == 2 else event
        if isinstance(msg, dict) and msg.get("action") == "remove-worker" and msg.get("worker"):
            self._post("worker-removed", msg["worker"], {str(k) for k in msg.get("processing-tasks", ())})

    def _set_connected(self, connected: bool, why: str) -> None:
        if connected != self._connected:
            self._connected = connected
            self._poke()
        self._why = why

    def _read_cluster(self) -> None:
        client = self._client
        try:  # scheduler_info() would wait without limit
            info = client.sync(client.scheduler.identity, n_workers=-1, callback_timeout=CONNECT_TIMEOUT)
        except Exception:  # noqa: BLE001
            return
        workers = info.get("workers", {})
        self._nthreads = sum(int(w.get("nthreads", 0)) for w in workers.values())
        self._gone |= self._workers - set(workers)
        self._workers = set(workers)

    def _receive(self) -> None:
        queue = self._queue
        if queue is None:
            self._stop.wait(QUEUE_IDLE_SLEEP)
            return
        try:
            items = queue.get(batch=True)  # what is there now; never waits
        except (TimeoutError, OSError):
            return
        except Exception as exc:  # noqa: BLE001 - e.g. the scheduler restarted and lost the queue
            log.debug("reading %s: %s", self.queue_name, exc)
            self._queue = None
            return
        if not items:
            self._stop.wait(QUEUE_IDLE_SLEEP)
            return
        for item in items:
            self._post("messages", item)

    def _disconnect(self) -> None:
        client, self._client, self._queue = self._client, None, None
        if client is not None:
            try:
                client.close(timeout=2)
            except Exception:  # noqa: BLE001
                pass
