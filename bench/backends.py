"""The backends of the lifecycle benchmark, behind one small interface.

A backend runs one task's whole life in this process:

    open(root, durable)     set up in an empty directory of its own
    enqueue(i, obj)         add task i (called for all N tasks first)
    process_one()           claim -> start -> store response -> finish
                            (or the peer's nearest equivalent)
    verify(n)               untimed: raise unless all n tasks went through
    close()

`durable_support` says what durable mode means for the peer: "native" when it
has a setting that makes each step survive a power cut, None when it has none
(then it is skipped in durable mode, not run non-durably under that label).
"""

from __future__ import annotations

import importlib
import os
import pickle

import common  # noqa: F401  (puts the repo root on sys.path for spoolq)
from floor import Floor

TASK_TYPE = "noop"
SERVER = "S"
RESPONSE = b"ok"
RESPONSE_MIME = "text/plain"


def task_id(i: int) -> str:
    return f"t{i:08d}"


class Backend:
    name = "?"
    durable_support: str | None = None
    note = ""
    requires: tuple[str, ...] = ()  # modules that must import

    @classmethod
    def available(cls) -> str | None:
        """None when usable, else why not."""
        return missing(cls.requires)

    def open(self, root: str, durable: bool) -> None:
        raise NotImplementedError

    def enqueue(self, i: int, obj) -> None:
        raise NotImplementedError

    def process_one(self) -> None:
        raise NotImplementedError

    def verify(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def missing(modules) -> str | None:
    """None if every module imports, else the first ImportError's text."""
    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError as e:
            return f"{m} not importable ({e})"
    return None


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


# ---------------------------------------------------------------- floor


class FloorBackend(Backend):
    name = "floor"
    durable_support = "native"
    note = "spoolq layout, plain os calls, nothing else (bench/floor.py)"

    def open(self, root, durable):
        self.f = Floor(root, durable, SERVER)

    def enqueue(self, i, obj):
        self.f.enqueue(TASK_TYPE, task_id(i), obj)

    def process_one(self):
        f = self.f
        t = f.claim()
        f.start(t)
        f.store_response(t, RESPONSE, RESPONSE_MIME)
        f.finish(t)

    def verify(self, n):
        _check(self.f.count_done() == n, f"floor: {self.f.count_done()} done, want {n}")

    def close(self):
        self.f.close()


# ---------------------------------------------------------------- spoolq


class SpoolqBackend(Backend):
    """spoolq itself, through its public Python API (the working tree's).

    Every spoolq call of the lifecycle benchmark is here and nowhere else:

        spool = Spool.init(root, durable=durable)
        spool.register_type(TASK_TYPE, HANDLER)        # handler: dotted path
        spool.enqueue(TASK_TYPE, id, obj)              # id: str, obj: picklable
        claim = spool.claim(SERVER)                    # -> Claim | None
        spool.start(claim)
        spool.store_response(claim, data, mime)        # data: bytes, mime: str
        spool.finish(claim)                            # if Spool has finish();
            else spool.set_state(claim, State.FINISHED)  # what a handler's
                                                         # set_success() does
        spool.close()                                  # only if it exists

    The handler is never called here (the bench drives the lifecycle itself);
    it only has to be a valid dotted path.
    """

    name = "spoolq"
    durable_support = "native"
    note = "spoolq public API: enqueue / claim / start / store_response / finish"
    HANDLER = "benchtasks.noop"

    @classmethod
    def available(cls):
        why = missing(["spoolq"])
        if why is None and not hasattr(importlib.import_module("spoolq"), "Spool"):
            why = "spoolq has no Spool yet"
        return why

    def open(self, root, durable):
        from spoolq import Spool

        self.root = root
        self.spool = s = Spool.init(root, durable=durable)
        s.register_type(TASK_TYPE, self.HANDLER)
        finish = getattr(s, "finish", None)
        if finish is None:
            from spoolq import State

            def finish(claim):
                s.set_state(claim, State.FINISHED)
        self._finish = finish

    def enqueue(self, i, obj):
        self.spool.enqueue(TASK_TYPE, task_id(i), obj)

    def process_one(self):
        s = self.spool
        c = s.claim(SERVER)
        s.start(c)
        s.store_response(c, RESPONSE, RESPONSE_MIME)
        self._finish(c)

    def verify(self, n):
        # Untimed check straight on the documented layout.
        done = len(os.listdir(os.path.join(self.root, "done")))
        _check(done == n, f"spoolq: {done} in done/, want {n}")

    def close(self):
        close = getattr(self.spool, "close", None)
        if close is not None:
            close()


class SpoolqTrackerBackend(SpoolqBackend):
    """spoolq through its ATP API (``spoolq.tracker``), as an EOxServer ATP
    program calls it: the same lifecycle as SpoolqBackend, one call each.

        tracker.use_spool(spool)
        tracker.enqueueTask(TASK_TYPE, id, obj)
        [task_id] = tracker.dequeueTask(SERVER)
        tracker.startTask(task_id)
        tracker.setTaskResponse(task_id, data, mime)
        tracker.stopTaskSuccess(task_id)
    """

    name = "spoolq.tracker"
    note = "spoolq ATP API: enqueueTask / dequeueTask / startTask / setTaskResponse / stopTaskSuccess"

    def open(self, root, durable):
        from spoolq import tracker

        super().open(root, durable)
        self.tracker = tracker
        tracker.use_spool(self.spool)

    def enqueue(self, i, obj):
        self.tracker.enqueueTask(TASK_TYPE, task_id(i), obj)

    def process_one(self):
        t = self.tracker
        (tid,) = t.dequeueTask(SERVER)
        t.startTask(tid)
        t.setTaskResponse(tid, RESPONSE, RESPONSE_MIME)
        t.stopTaskSuccess(tid)

    def close(self):
        self.tracker.use_spool(None)
        super().close()


# ---------------------------------------------------------------- dirq


class DirqQueueBackend(Backend):
    """dirq.queue.Queue: one directory per element (schema {"body": binary}).

    add() -> lock() -> get() -> remove(). dirq has no fsync anywhere, so no
    durable mode. No status, log or response is kept.
    """

    name = "dirq.Queue"
    note = "add / lock / get / remove; one dir per element; no fsync"

    requires = ("dirq",)

    def open(self, root, durable):
        from dirq.queue import Queue

        self.q = Queue(os.path.join(root, "q"), schema={"body": "binary"})
        self._names = None

    def enqueue(self, i, obj):
        self.q.add({"body": pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)})

    def _next(self):
        if self._names is None:
            self._names = iter(self.q)  # dirq lists its directories lazily
        for name in self._names:
            if self.q.lock(name):
                return name
        raise AssertionError("dirq queue empty")

    def process_one(self):
        name = self._next()
        pickle.loads(self.q.get(name)["body"])
        self.q.remove(name)

    def verify(self, n):
        _check(self.q.count() == 0, f"dirq.Queue: {self.q.count()} left")


class DirqSimpleBackend(DirqQueueBackend):
    """dirq.QueueSimple: one file per element. add / lock / get / remove."""

    name = "dirq.QueueSimple"
    note = "add / lock / get / remove; one file per element; no fsync"

    def open(self, root, durable):
        from dirq.QueueSimple import QueueSimple

        self.q = QueueSimple(os.path.join(root, "q"))
        self._names = None

    def enqueue(self, i, obj):
        self.q.add(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    def process_one(self):
        name = self._next()
        pickle.loads(self.q.get(name))
        self.q.remove(name)


# ---------------------------------------------------------------- huey


class HueyFileBackend(Backend):
    """huey's FileStorage, driven the way Huey and its consumer drive it.

    enqueue: Huey.enqueue(task) -> storage.enqueue(serialized message)
    process: Huey.dequeue() (storage.dequeue + deserialize), run the task
             function, Huey.put_result() (storage.put_data), then the
             caller's Result.get() (storage.pop_data) — minus the consumer's
             signals, logging and revoke checks. FileStorage takes a flock
             around every operation and never fsyncs: no durable mode.
    """

    name = "huey.FileStorage"
    note = "enqueue / dequeue / put_data result / pop_data result; no fsync"

    requires = ("huey",)

    def open(self, root, durable):
        from huey import FileHuey

        self.huey = FileHuey("bench", path=os.path.join(root, "huey"))

        @self.huey.task(name=TASK_TYPE)
        def noop(obj):
            return RESPONSE

        self.noop = noop

    def enqueue(self, i, obj):
        self.huey.enqueue(self.noop.s(obj))

    def process_one(self):
        h = self.huey
        task = h.dequeue()
        value = task.execute()
        h.put_result(task.id, value)
        _check(h.get(task.id) == RESPONSE, "huey: result lost")

    def verify(self, n):
        s = self.huey.storage
        _check(s.queue_size() == 0 and s.result_store_size() == 0, "huey: leftovers")


# ---------------------------------------------------------------- persist-queue


class PersistQueueBackend(Backend):
    """persist-queue SQLiteAckQueue: put -> get -> ack.

    persist-queue opens SQLite in WAL mode and leaves `synchronous` at
    SQLite's default, FULL: each commit (one per put, get and ack) fsyncs
    the WAL. That is its durable mode. Non-durable mode sets
    PRAGMA synchronous=OFF on its connection. No response is stored.
    """

    name = "persist-queue.SQLiteAckQueue"
    durable_support = "native"
    note = "put / get / ack; SQLite WAL, synchronous FULL (durable) or OFF"

    requires = ("persistqueue",)

    def open(self, root, durable):
        from persistqueue import SQLiteAckQueue

        self.q = SQLiteAckQueue(os.path.join(root, "pq"), auto_commit=True)
        conn = self.q._conn  # the one connection when multithreading=False
        if not durable:
            conn.execute("PRAGMA synchronous=OFF")
        self.synchronous = conn.execute("PRAGMA synchronous").fetchone()[0]
        _check(self.synchronous == (2 if durable else 0),
               f"persist-queue: synchronous={self.synchronous}")

    def enqueue(self, i, obj):
        self.q.put(obj)

    def process_one(self):
        item = self.q.get(block=False, raw=True)
        self.q.ack(id=item["pqid"])

    def verify(self, n):
        _check(self.q.acked_count() == n, f"persist-queue: {self.q.acked_count()} acked")

    def close(self):
        self.q.close()


# The order of a lifecycle round (reversed every other round): the target
# comparisons (spoolq with the floor and with huey) run next to each other.
ALL = [
    FloorBackend,
    SpoolqBackend,
    SpoolqTrackerBackend,
    HueyFileBackend,
    DirqQueueBackend,
    DirqSimpleBackend,
    PersistQueueBackend,
]
BY_NAME = {b.name: b for b in ALL}
