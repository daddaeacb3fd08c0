"""The spool: every move of a task between its places, and the Python API.

:class:`Spool` is the one writer of task directories: enqueue, claim,
start, the holder's state changes, take-away (re-enqueue, hand-back) and
delete are its methods, each written as the rule it follows
(:mod:`spoolq.lifecycle`) applied with the mechanism of :mod:`spoolq.store`.
The read side (status, log, listings, census, wait) is :mod:`spoolq.queries`;
sweeps and recovery are :mod:`spoolq.sweeps`.

Crash-safety rules this module relies on, each applied where it matters:

* A task is built in ``tmp/`` and renamed into ``enqueued/`` only when whole,
  so a crash leaves no task or a complete one (never build in place).
* Every move is one ``rename`` inside one filesystem; the first rename wins
  and the losers get ENOENT, so claims need no lock (the kernel arbitrates).
* In durable mode every file is fsynced before the rename that publishes it,
  and both parent directories of a move are fsynced before the transition is
  acknowledged (rename is atomic, not durable).
* Every change to a claimed task happens under the task directory's lock and
  re-checks the claim (:meth:`Claim.owns`), so a worker that lost its claim
  cannot write into the task's next life.
* Moves *back* to ``enqueued/`` (re-enqueue, hand-back) and the uniqueness
  check of ``enqueue`` hold one spool-wide lock: with only forward moves going
  on, probing the places in lifecycle order cannot miss a task.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from dataclasses import dataclass
from typing import Any

from .errors import (
    CorruptTask,
    InvalidInput,
    SpoolError,
    StaleClaim,
    TaskNotFound,
    TypeInUse,
    UnknownType,
    WrongState,
    describe,
)
from .faults import crashpoint
from .lifecycle import (
    HELD_STATES,
    Action,
    Claim,
    Place,
    State,
    cancelled_while_waiting,
    charges_restart,
    gives_up,
    retry_delay,
    sources_of,
    state_named,
)
from .names import check_type, split_task_name
from .producer import BatchResult, Item, Producer, StampClock, check_delay, due_time
from .queries import Census, Queries, TaskInfo
from .store import codec, fsutil
from .store.codec import DEFAULT_RESPONSE_MIME, INPUT_JSON, INPUT_NAMES, INPUT_PICKLE, RESPONSE, LogRecord
from .store.layout import Layout, check_setting, task_trust_problem
from .store.queue import WaitingIndex
from .store.registry import (
    DEFAULT_MAX_RESTARTS, DEFAULT_RETENTION, DEFAULT_TIMEOUT, TaskType, TypeRegistry, check_number,
)
from .store.servers import ServerLocks
from .store.slots import TypeSlots
from .store.taskdir import LockBusy, Moved, TaskDir, peek_status, read_status, response_mime, run_alive, run_lock_holders
from .store.taskdir import hold_run_lock as hold_run_lock_fd
from .units import MAX_DURATION, parse_duration

log = logging.getLogger("spoolq.spool")

TAKE_AWAY_LOCK_WAIT = 1.0  # seconds a take-away waits for a task's lock before it leaves the task for later
DELETE_WAIT = 10.0  # seconds a delete of a running task waits for its handler to be stopped


@dataclass(frozen=True)
class StartedTask:
    """What a start hands the runner: the task, its handler path and input,
    and (when asked for) the run lock's descriptor, to keep open for the run."""

    type: str
    id: str
    handler: str
    input: Any
    run_lock: int | None = None
    # The input's file (input.pkl or input.json); with start(load=False)
    # *input* holds that file's bytes, not loaded.
    input_file: str = INPUT_PICKLE
    starts: int = 1  # this start included: more than 1, an earlier run may have left files


@dataclass(frozen=True)
class SweepAction:
    """What a take-away, sweep or delete did to one task."""

    type: str
    id: str
    action: Action
    reason: str


def _final_fields(task: TaskDir) -> dict[str, Any]:
    """What a final status copies from the task's files: the MIME type kept
    with its response (the status is not rewritten when a response is
    stored), so ``status.json`` says it once the task is final."""
    mime = response_mime(task.fd)
    return {} if mime is None else {"response_mime": mime}


def _remove(path: str) -> None:
    """Remove *path* whatever it is; a symlink is unlinked, never followed."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


class Spool:
    """A spool directory and the whole task lifecycle on it.

    Open an existing spool with ``Spool(root)`` or create one with
    ``Spool.init(root)``; *root* defaults to ``$SPOOLQ_ROOT``, then
    ``/var/spool/spoolq``. Every method that changes a task states what is
    atomic; all of them are safe against concurrent processes.

    ``clock`` (seconds since the epoch) is injectable so tests can age tasks.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self.layout = Layout(root)
        self.root = self.layout.root
        self.clock = clock
        self.layout.check()
        settings = self.layout.settings_now()
        self.durable = settings.durable
        self.max_input_bytes = settings.max_input_bytes
        self.registry = TypeRegistry(self.layout, durable=self.durable)
        self.server_locks = ServerLocks(self.layout, self.layout.enqueue_lock, durable=self.durable)
        self.queries = Queries(self.layout, self.registry, clock=clock)
        self._stamps = StampClock()
        self.producer = Producer(
            self.layout, self.registry, self.queries, clock=clock, durable=self.durable,
            max_input_bytes=self.max_input_bytes, stamps=self._stamps,
        )
        self._waiting = WaitingIndex(self.layout)
        self.slots = TypeSlots(self.layout)

    @property
    def max_queue(self) -> int:
        """The queue limit as ``spool.json`` says now (0: none)."""
        return self.layout.settings_now().max_queue

    @classmethod
    def init(
        cls,
        root: str | os.PathLike[str] | None = None,
        *,
        max_queue: int | None = None,
        durable: bool | None = None,
        max_input_bytes: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> Spool:
        """Create the layout (idempotent) and store the given settings.

        Settings not given keep their stored value (defaults: no queue limit,
        durable, 64 MiB inputs); ``spool.json`` is rewritten only when one
        changes. Directories are created 2770: group
        members may produce, others get nothing, and the setgid bit keeps
        new entries in the spool's group.
        """
        if max_queue is not None:
            check_setting("max_queue", max_queue)
        if max_input_bytes is not None:
            check_setting("max_input_bytes", max_input_bytes)
        if durable is not None and not isinstance(durable, bool):
            # A truth value would turn 'false', 'no' or '0' from the environment into durable.
            raise SpoolError(f"durable must be True or False, not {str(durable)[:40]!r}")
        layout = Layout(root)
        layout.create()
        layout.change_settings(max_queue=max_queue, durable=durable, max_input_bytes=max_input_bytes)
        return cls(layout.root, clock=clock)

    def _task(self, path: str, *, wait: float | None = None, as_stored: bool = False) -> TaskDir:
        """A handle on the task directory at *path*. In ``scheduled/`` a claim
        made by its move alone reads as recorded, unless *as_stored*."""
        return TaskDir(path, clock=self.clock, durable=self.durable, wait=wait,
                       claimed_in=None if as_stored else self.layout.server_of_path(path),
                       queue_dir=self.layout.enqueued)

    def _path(self, place: Place, name: str, server: str | None = None) -> str:
        return self.layout.task_path(place, name, server)

    # ------------------------------------------------------------------ types

    def register_type(
        self,
        name: str,
        handler: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retention: float = DEFAULT_RETENTION,
        max_restarts: int = DEFAULT_MAX_RESTARTS,
        **settings: Any,
    ) -> TaskType:
        """Create or update a task type; atomic (tmp + rename).

        As in ATP, a negative timeout becomes 0 (no limit), any retention
        <= 0 means keep forever (-1) and a negative max_restarts becomes 0.
        *settings* are the other fields of :class:`TaskType`: ``executor``
        (``fork`` or ``dask``) and the limits (contract §13), ``retries``,
        ``retry_backoff``, ``retry_backoff_max``, ``priority``,
        ``concurrency`` (contract §11). A setting out of range raises
        SpoolError, nothing written. An update keeps the type held or
        released as it was.
        """
        check_type(name)
        # Checked before ATP's rules below rewrite them: float('nan') would
        # become 0 (no limit), 2.7 restarts 2, '10' ten seconds.
        for setting, value in (("timeout", timeout), ("retention", retention), ("max_restarts", max_restarts)):
            check_number(setting, value)
        unknown = set(settings) - {f.name for f in dataclasses.fields(TaskType)} - {"name", "handler", "held"}
        if unknown or "held" in settings:
            raise TypeError(f"register_type() got unexpected settings: {', '.join(sorted(unknown or {'held'}))}")
        current = self.registry.find(name)
        return self.registry.put(TaskType(
            name=name,
            handler=handler,
            timeout=max(0.0, float(timeout)),
            retention=float(retention) if retention > 0 else -1.0,
            max_restarts=max(0, int(max_restarts)),
            held=current.held if current is not None else False,
            **{k: v for k, v in settings.items() if v is not None},
        ))

    def hold(self, name: str) -> TaskType:
        """Stop every server from claiming tasks of type *name* (enqueues
        still work; started tasks go on). Atomic; every server obeys within
        a second (they watch ``types/``)."""
        return self.registry.put(dataclasses.replace(self.registry.get(name), held=True))

    def release(self, name: str) -> TaskType:
        """Undo :meth:`hold`."""
        return self.registry.put(dataclasses.replace(self.registry.get(name), held=False))

    def get_type(self, name: str) -> TaskType:
        """The registered type *name*; UnknownType if there is none."""
        return self.registry.get(name)

    def types(self, *, left_out: list[str] | None = None) -> list[TaskType]:
        """All registered types, sorted by name; the files of those that
        cannot be read go into *left_out*, when given."""
        return self.registry.all(left_out=left_out)

    def unregister_type(self, name: str, *, force: bool = False) -> list[SweepAction]:
        """Remove type *name*. With tasks of that type present this raises
        TypeInUse, unless *force*, which deletes those tasks first."""
        # Under the enqueue lock, which every publish of a task holds and
        # under which it looks at its type again: no task of the type can
        # appear once the type is gone (one that raced the unregister was
        # left behind, of no type, and run).
        with self.layout.enqueue_lock:
            self.registry.get(name)
            tasks = [t for t in self.iter_tasks() if t[0] == name]
            if tasks and not force:
                raise TypeInUse(name, len(tasks))
            self.registry.remove(name)
        removed = []
        for type_name, task_id, _ in tasks:
            try:
                self.delete(type_name, task_id)
                removed.append(SweepAction(type_name, task_id, Action.DELETED, "type unregistered"))
            except (TaskNotFound, UnknownType):
                pass
        return removed

    # ------------------------------------------------------------------ enqueue (spoolq.producer)

    def enqueue(
        self, type_name: str, task_id: str, input: Any = None, *, message: str = "", priority: int | None = None,
        not_before: datetime | float | None = None, delay: float | None = None,
    ) -> TaskInfo:
        """Enqueue task (type, id) with *input* pickled. See :meth:`enqueue_pickled`."""
        return self.producer.enqueue(type_name, task_id, INPUT_PICKLE, self.producer.pickled(input), message=message,
                                     priority=priority, not_before=not_before, delay=delay)

    def enqueue_pickled(
        self, type_name: str, task_id: str, payload: bytes, *, message: str = "", priority: int | None = None,
        not_before: datetime | float | None = None, delay: float | None = None,
    ) -> TaskInfo:
        """Enqueue task (type, id) whose input is already-pickled bytes.

        The bytes are checked to be one well-formed pickle (without running
        it). The task appears in ``enqueued/`` whole or not at all. Raises
        InvalidName, UnknownType, InvalidInput, TaskExists or QueueFull, and
        in each case leaves nothing behind.

        *priority* (-100 to 100, higher first; default: the type's),
        *not_before* (a datetime; naive is local time) or *delay* (seconds):
        the task is claimed by priority, then due time, then enqueue time,
        and never before its due time (contract §11.2, §11.3).
        """
        return self.producer.enqueue(type_name, task_id, INPUT_PICKLE, self.producer.checked_pickle(payload),
                                     message=message, priority=priority, not_before=not_before, delay=delay)

    def enqueue_json(
        self, type_name: str, task_id: str, value: Any, *, message: str = "", priority: int | None = None,
        not_before: datetime | float | None = None, delay: float | None = None,
    ) -> TaskInfo:
        """Enqueue task (type, id) whose input is stored as JSON (``input.json``)."""
        return self.producer.enqueue(type_name, task_id, INPUT_JSON, codec.json_input(value), message=message,
                                     priority=priority, not_before=not_before, delay=delay)

    def enqueue_many(self, type_name: str, items: Iterable[Item | dict[str, Any]]) -> list[BatchResult]:
        """Enqueue many tasks of one type (JSON inputs) with one durable
        barrier (group commit). *items*: :class:`Item` or dicts with "id",
        "input" and optionally "priority", "not_before"/"delay". One result
        per item, in order; a bad item (a malformed one too: InvalidInput)
        is reported there and skipped."""
        return list(self.producer.enqueue_many(type_name, items))

    def read_input(self, fd: int) -> bytes:
        """Read a task input from *fd*, stopping at the spool's input limit."""
        return self.producer.read_input(fd)

    # ------------------------------------------------------------------ the read side (spoolq.queries)

    def locate(self, type_name: str, task_id: str) -> str:
        """Path of task (type, id); TaskNotFound. Never misses a moving task."""
        return self.queries.locate(type_name, task_id)

    def status(self, type_name: str, task_id: str) -> TaskInfo:
        """The task's status document."""
        return self.queries.status(type_name, task_id)

    def log_records(self, type_name: str, task_id: str) -> list[LogRecord]:
        """The task's log, oldest first."""
        return self.queries.log_records(type_name, task_id)

    def response(self, type_name: str, task_id: str) -> tuple[bytes, str]:
        """(data, MIME type) of the stored response; raises NoResponse."""
        return self.queries.response(type_name, task_id)

    def iter_tasks(self, state: State | None = None) -> Iterator[tuple[str, str, str]]:
        """(type, id, path) of every task entry, by place."""
        return self.queries.iter_tasks(state)

    def list_tasks(
        self, *, state: State | None = None, type_name: str | None = None, unreadable: list[str] | None = None,
    ) -> list[TaskInfo]:
        """Status of every task (optionally of one state, a State or its
        name in any case, and/or of one registered type: UnknownType
        otherwise), each once; the paths of those that cannot be read go
        into *unreadable*."""
        if state is not None:
            state = state_named(state)
        if type_name is not None:
            self.registry.get(type_name)
        return self.queries.list_tasks(state=state, type_name=type_name, unreadable=unreadable)

    def count_enqueued(self) -> int:
        """Number of waiting tasks."""
        return self.queries.count_enqueued()

    def counts(self) -> dict[str, int]:
        """Tasks per state."""
        return self.queries.counts()

    def census(self) -> Census:
        """Tasks per state and type, restarts, oldest waiting age."""
        return self.queries.census()

    def waiting(self) -> list[str]:
        """Names in ``enqueued/``, first to be claimed first."""
        return self.queries.waiting()

    def wait(self, type_name: str, task_id: str, timeout: float | None = None) -> TaskInfo | None:
        """Block until the task is FINISHED or FAILED (its status), or None
        after *timeout* seconds (InvalidInput unless 0 to 100 years: nan
        would wait forever); woken by file events."""
        if timeout is not None:
            try:
                timeout = parse_duration(timeout)
            except ValueError as exc:
                raise InvalidInput(f"timeout {exc}") from None
        return self.queries.wait_for(type_name, task_id, timeout)

    # ------------------------------------------------------------------ servers

    def hold_server(self, server: str, *, wait: float = 2.0) -> None:
        """Become *server* for the life of this process (ServerBusy if another
        process is it). A live server is one whose lock is held."""
        self.server_locks.hold(server, wait=wait)

    def release_server(self, server: str) -> None:
        """Stop being *server*: sweepers treat what it still holds as abandoned."""
        self.server_locks.release(server)

    def close(self) -> None:
        """Release every server this object holds."""
        self.server_locks.release_all()

    def server_alive(self, server: str) -> bool:
        """True while some process holds *server*'s lock."""
        return self.server_locks.alive(server)

    def servers(self) -> list[str]:
        """Every server that ever claimed here."""
        return self.server_locks.known()

    # ------------------------------------------------------------------ claim & start

    def claim(self, server: str, *, names: list[str] | None = None, message: str = "") -> Claim | None:
        """Claim the first waiting task for *server* (by priority, then due
        time, then enqueue time; never one not due yet, nor one of a held
        type); None if none is left.

        The claim is the rename ``enqueued/X`` → ``scheduled/SERVER/X``: of
        any number of racing claimers exactly one rename succeeds, the others
        get ENOENT and try the next task. *names* (first first) lets a caller
        with its own index of ``enqueued/`` choose; without it, the spool's
        own :class:`WaitingIndex` is used, rescanned when it runs dry, so a
        run of claims costs one scan, not one per claim. Corrupt entries met
        on the way are quarantined.
        """
        self.hold_server(server)
        with self.registry.moment():  # one look at a type's file for the whole claim
            return self._claim_first(server, names, message)

    def _claim_first(self, server: str, names: list[str] | None, message: str) -> Claim | None:
        if names is not None:
            for name in names:
                claim = self._claim_one(server, name, message)
                if claim is not None:
                    return claim
            return None
        for _ in range(2):  # what the index holds, then a fresh scan
            while (name := self._waiting.pop()) is not None:
                ttype = self.registry.find(name.partition(":")[0])
                if ttype is not None and ttype.held:
                    continue  # held: left waiting (a later scan sees it again)
                try:
                    claim = self._claim_one(server, name, message)
                except SpoolError as exc:  # this task cannot be claimed by us: the next one can
                    log.warning("cannot claim %s: %s", name, exc)
                    continue
                if claim is not None:
                    return claim
            self._waiting.rescan()
        return None

    def _claim_one(self, server: str, name: str, message: str) -> Claim | None:
        """Try to claim waiting entry *name*; None if another claimer won or
        the entry could not be trusted (then it is quarantined)."""
        parts = split_task_name(name)
        src = self._path(Place.ENQUEUED, name)
        if not parts:
            self.quarantine(src, "not a task name")
            return None
        dest = self._path(Place.SCHEDULED, name, server)
        try:
            fsutil.rename_noreplace(src, dest)
        except (FileNotFoundError, NotADirectoryError):
            return None  # another claimer won
        except FileExistsError:
            log.warning("stale leftover %s blocks a claim; quarantining it", dest)
            self.quarantine(dest, "leftover in scheduled/ blocked a claim")
            return None
        except PermissionError as exc:
            # Moving a directory to another parent rewrites its "..": it needs
            # write permission on the task directory itself, which a task made
            # by hand under a strict umask lacks. Nor can it be quarantined
            # (that is a move too): only its owner or root can fix it.
            raise SpoolError(
                f"{src} cannot be moved by this worker's user ({exc.strerror}): it was made without the group's "
                f"write permission; its owner or root must run: chmod -R g+rwX {src}") from None
        try:
            crashpoint("claim.renamed")
            if self.durable and message:
                # The move is durable before the status written for its new
                # place (else a power loss could leave enqueued/X saying
                # SCHEDULED). A claim without a message writes nothing: its
                # first write makes the move durable first (TaskDir).
                fsutil.fsync_dir(self.layout.enqueued)
                fsutil.fsync_dir(self.layout.server_dir(server))
            with self._task(dest, as_stored=True) as task:
                if cancelled_while_waiting(Place.ENQUEUED, task.state):
                    # Its cancel was interrupted before its move: complete
                    # the move; nothing to claim.
                    task.move(self._path(Place.DONE, name), mtime_ns=int(self.clock() * 1e9))
                    return None
                if task.state != State.ENQUEUED:
                    raise CorruptTask(dest, f"{name} was waiting but its status says {task.state.name}")
                not_now = self._not_claimable(parts[0], task.doc)
                number = int(task.doc["claim"]) + 1
                if not_now:
                    pass  # moved back below, untouched
                elif message:
                    task.write(State.SCHEDULED, message, server=server, claim=number,
                               claimed_at=codec.iso(self.clock()))
                else:
                    # Without a message the move is the claim: the status
                    # stays ENQUEUED until the start records it
                    # (lifecycle.claimed_by_move), one status write and one
                    # log append a task fewer; the directory's mtime says
                    # when (taskdir.claim_time).
                    fsutil.set_mtime(task.fd, int(self.clock() * 1e9))
        except CorruptTask as exc:
            self.quarantine(dest, str(exc))
            return None
        except (FileNotFoundError, Moved):
            return None  # deleted right after the claim
        except PermissionError as exc:
            # Not writable by this worker (made by hand, or by an old version
            # with a strict umask): it would fail every claim; set it aside.
            self.quarantine(dest, f"the worker cannot write into it: {exc.strerror} (fix its modes: chmod -R g+rwX)")
            return None
        except OSError:
            # The claim could not be made durable or its status written (an
            # I/O error, a full disk): undo it, or the task would sit in
            # scheduled/ of a live server until its timeout.
            # A move backwards: under the enqueue lock, like every other one,
            # so a lookup under that lock cannot miss the task.
            try:
                with self.layout.enqueue_lock:
                    fsutil.rename_noreplace(dest, src)
            except OSError:
                pass  # left for recover_server
            raise
        if not_now:
            # Not due yet, or its type is held: it was never ours. Back it
            # goes, still ENQUEUED (a move backwards: under the enqueue lock).
            with self.layout.enqueue_lock:
                fsutil.rename_noreplace(dest, src)
            return None
        return Claim(parts[0], parts[1], number, server)

    def _not_claimable(self, type_name: str, doc: dict[str, Any]) -> bool:
        """A waiting task that no claim may take now: due later, or of a
        held type. (Claimers' indexes skip these; this is the rule itself,
        checked under the task's lock.)"""
        not_before = doc.get("not_before")
        if isinstance(not_before, str) and codec.from_iso(not_before) > time.time():
            return True
        ttype = self.registry.find(type_name)
        return ttype is not None and ttype.held

    def _claimed(self, claim: Claim, allowed: frozenset[State]) -> TaskDir:
        """Open and lock the task of *claim*, checking the claim still owns it.

        Raises StaleClaim if it was taken away, claimed again, deleted, or
        is in a state outside *allowed*. The places are probed in lifecycle
        order (scheduled, running, done): a task moving forward meanwhile is
        met further on, and a move backwards makes the claim stale anyway.
        """
        for path in (
            self._path(Place.SCHEDULED, claim.name, claim.server),
            self._path(Place.RUNNING, claim.name),
            self._path(Place.DONE, claim.name),
        ):
            task = self._task(path)
            try:
                task.open()
            except (FileNotFoundError, NotADirectoryError, Moved):
                continue
            ours = claim.owns(task.doc)
            if ours and task.state in allowed:
                return task
            state = task.state
            task.close()
            if ours and state.terminal:
                raise StaleClaim(f"task {claim.type}/{claim.id} is already {state.name}")
            if ours:
                raise WrongState(claim.type, claim.id, state.name, "that change is not allowed")
            raise StaleClaim(f"claim {claim} no longer owns task {claim.type}/{claim.id} (now {state.name})")
        raise StaleClaim(f"claim {claim} no longer owns task {claim.type}/{claim.id} (it was moved or deleted)")

    def start(
        self, claim: Claim | str, message: str = "", *, hold_run_lock: bool = False, load: bool = True,
    ) -> StartedTask:
        """Move a claimed task to ``running/``, count the start (its log
        record says *message*) and load its input: (type, id, handler path,
        input).

        With *hold_run_lock*, the run lock is taken before the task is
        released and its descriptor returned: keep it open while the handler
        runs, so nobody takes the task away from a live run (the daemon's
        handler processes do this; an ATP program that runs handlers itself
        does not, and its timeouts work as in ATP).

        ``load=False`` returns the input file's bytes instead, unloaded, for
        an executor that ships them to the process that runs the handler (the
        worker itself never unpickles input, contract §7.2).


        If the input cannot be loaded the task is FAILED (with the reason in
        its log) and CorruptTask is raised; a task directory whose input file
        is missing is quarantined.
        """
        claim = Claim.parse(claim)
        ttype = self.registry.get(claim.type)
        # Unpickling runs code: look again that nobody else can write here
        # (the spool's modes may have changed since it was opened).
        self.layout.check_again()
        task = self._claimed(claim, frozenset({State.SCHEDULED}))
        try:
            input_name = task.doc.get("input") or INPUT_PICKLE
            what = None
            if input_name not in INPUT_NAMES:
                what = f"status.json names an unknown input file {str(input_name)[:40]!r}"
            else:
                try:
                    raw = task.read(input_name, limit=max(self.max_input_bytes, fsutil.READ_LIMIT))
                except FileNotFoundError:
                    what = f"{input_name} is missing"
                except OSError as exc:
                    what = f"{input_name} cannot be read: {exc.strerror}"
            if what is None:
                what = self._untrusted(task, input_name)
            if what is None:
                task.move(self._path(Place.RUNNING, claim.name))
                starts = int(task.doc.get("starts", 0)) + 1
                try:
                    task.write(State.RUNNING, message, starts=starts, started_at=codec.iso(self.clock()))
                except CorruptTask as exc:  # its log is gone or not a file
                    what = str(exc)
            if what is not None:
                path = task.path
                task.close()
                self.quarantine(path, what)
                raise CorruptTask(path, f"task {claim.type}/{claim.id}: {what} (moved to quarantine)")
            crashpoint("start.running")
            if not load:
                run_lock = hold_run_lock_fd(task.fd) if hold_run_lock else None
                return StartedTask(claim.type, claim.id, ttype.handler, raw, run_lock, input_name, starts)
            import pickle  # see enqueue()

            try:
                value = json.loads(raw) if input_name == INPUT_JSON else pickle.loads(raw)
            except (Exception, SystemExit) as exc:
                reason = f"input cannot be loaded: {describe(exc)}"
                self._finish_locked(task, State.FAILED, reason)
                raise CorruptTask(task.path, f"task {claim.type}/{claim.id}: {reason}") from None
            run_lock = hold_run_lock_fd(task.fd) if hold_run_lock else None
            return StartedTask(claim.type, claim.id, ttype.handler, value, run_lock, input_name, starts)
        finally:
            task.close()

    def _untrusted(self, task: TaskDir, input_name: str) -> str | None:
        """Why the input of *task* (open and locked) must not be loaded
        (:func:`task_trust_problem` of its directory or input file); None if
        it may be."""
        root_st = os.stat(self.layout.root)
        for path, st in ((task.path, os.fstat(task.fd)),
                         (os.path.join(task.path, input_name), os.stat(input_name, dir_fd=task.fd, follow_symlinks=False))):
            problem = task_trust_problem(path, st, root_st)
            if problem is not None:
                return f"not loaded: {problem}"
        return None

    # ------------------------------------------------------------------ changes by the claim holder

    def set_state(self, claim: Claim | str, state: State, message: str = "") -> State:
        """Change the task's state through its claim and append one log
        record. FINISHED/FAILED also move it to ``done/``; FAILED becomes a
        retry while the type's retries last (see :meth:`retry`). Returns the
        state the task is in now. Raises StaleClaim (and changes nothing) if
        the claim lost the task or it is final."""
        claim = Claim.parse(claim)
        state = State(state)
        if state is State.FAILED:
            return self._fail(claim, message, delay=None)
        allowed = sources_of(state)
        if not allowed:
            raise SpoolError(f"a handler cannot set state {state.name}")
        with self._claimed(claim, allowed) as task:
            if state.terminal:
                self._finish_locked(task, state, message)
            else:
                task.write(state, message)
        return state

    def retry(self, claim: Claim | str, delay: float | None = None, message: str = "") -> State:
        """The handler asks to be run again: back to the queue, due after
        *delay* seconds (None: the type's backoff), using up a retry; FAILED
        with *message* when none is left. Returns the state it is in now
        (ENQUEUED or FAILED)."""
        if delay is not None:
            delay = check_delay(delay)
        return self._fail(Claim.parse(claim), message or "retry asked for by the handler", delay=delay)

    def _fail(self, claim: Claim, message: str, *, delay: float | None) -> State:
        """A handler failure (it raised, set FAILED, died, or asked for a
        retry): back to the queue while the type's retries last, else FAILED.
        A task whose cancel was asked for is never retried."""
        ttype = self.registry.find(claim.type)
        retries = ttype.retries if ttype is not None else 0
        # Back to the queue is a move backwards: under the enqueue lock, taken first.
        with self.layout.enqueue_lock if retries else contextlib.nullcontext():
            with self._claimed(claim, sources_of(State.FAILED)) as task:
                used = int(task.doc.get("retries") or 0)
                if ttype is not None and used < retries and task.doc.get("cancel") is None:
                    self._retry_locked(task, ttype, used + 1, message, delay)
                    return State.ENQUEUED
                self._finish_locked(task, State.FAILED, message)
                return State.FAILED

    def _retry_locked(self, task: TaskDir, ttype: TaskType, attempt: int, message: str, delay: float | None) -> None:
        now = self.clock()
        if delay is None:
            delay = retry_delay(attempt, ttype.retry_backoff, ttype.retry_backoff_max, random.random())
        # A due time spoolq computes is one it can store and read back, whatever
        # the type's settings say: a time past year 9999 would be written, then
        # found unreadable by the next reader and the task quarantined (lost).
        delay = min(delay, MAX_DURATION)
        task.write(
            State.ENQUEUED, f"retry {attempt}/{ttype.retries} in {delay:.3g} s: {message}",
            server=None, claimed_at=None, retries=attempt, not_before=codec.iso(now + delay),
        )
        task.move(self._path(Place.ENQUEUED, task.name), mtime_ns=self._stamps.next(now))
        crashpoint("retry.moved")

    def finish_if_not_finished(self, claim: Claim | str, message: str = "") -> bool:
        """Set FINISHED unless the task is already final; True if it changed
        (ATP's stopTaskSuccessIfNotFinished). StaleClaim if the claim lost
        the task to another life."""
        claim = Claim.parse(claim)
        try:
            self.set_state(claim, State.FINISHED, message)
            return True
        except StaleClaim as exc:
            stale = exc
        # Final already through this very claim: that is fine; anything else
        # (claim lost) is the caller's to know.
        try:
            doc = peek_status(self._path(Place.DONE, claim.name))
        except (OSError, CorruptTask):
            raise stale from None
        if claim.owns(doc):
            return False
        raise stale

    def log_message(self, claim: Claim | str, message: str) -> None:
        """Append a free-text record (the current state, *message*) to the log."""
        claim = Claim.parse(claim)
        with self._claimed(claim, HELD_STATES) as task:
            task.append_log(self.clock(), task.state, message)

    def store_response(self, claim: Claim | str, data: bytes | str, mime_type: str | None = DEFAULT_RESPONSE_MIME) -> None:
        """Store (or replace) the response and its MIME type; a str is stored
        as UTF-8, a MIME type of None is ``text/xml`` (codec.response_of says
        what is refused). Atomic: readers see the old or the new response."""
        claim = Claim.parse(claim)
        data, mime_type = codec.response_of(data, mime_type)
        with self._claimed(claim, HELD_STATES) as task:
            typed = task.store_response(data, mime_type)
            crashpoint("response.stored")
            if not typed:  # no extended attributes here, or the claim's first write: the status says it
                task.write(task.state, str(task.doc.get("message") or ""), record=False, response_mime=mime_type)

    def store_progress(self, claim: Claim | str, doc: dict[str, Any]) -> None:
        """Replace the task's ``progress`` (contract §12.3) through its claim:
        no log record, no status change, not fsynced. (The daemon's handler
        processes write it straight into the task directory they hold.)"""
        from .store.output import write_progress

        with self._claimed(Claim.parse(claim), HELD_STATES) as task:
            write_progress(task.fd, doc)

    def store_output(self, claim: Claim | str, data: bytes) -> None:
        """Replace the task's ``output`` (contract §12.1) with *data*, through
        its claim, also once the claim made the task final (an executor that
        runs the handler elsewhere sends the run's output at its end). Not
        fsynced: the output is not durable state."""
        from .store.output import write_output

        with self._claimed(Claim.parse(claim), HELD_STATES | {State.FINISHED, State.FAILED}) as task:
            write_output(task.fd, bytes(data))

    def touch(self, claim: Claim | str) -> bool:
        """Heartbeat: set the running task's mtime to now. False if this
        claim no longer holds a started task there (not started yet, taken
        away, claimed again by another run, finished or deleted), so a
        daemon learns its handler lost the task. Reads the status without
        the task lock: a heartbeat must not wait for a status write."""
        claim = Claim.parse(claim)
        path = self._path(Place.RUNNING, claim.name)
        try:
            dfd = fsutil.open_dir(path)
        except OSError:
            return False
        try:
            doc = read_status(dfd, path)
            if not claim.owns(doc) or not codec.state_of(doc).started:
                return False
            fsutil.set_mtime(dfd, int(self.clock() * 1e9))
            return True
        except CorruptTask:
            return False
        finally:
            os.close(dfd)

    def _finish_locked(self, task: TaskDir, state: State, message: str, **changes: Any) -> None:
        now = self.clock()
        task.write(state, message, finished_at=codec.iso(now), **_final_fields(task), **changes)
        crashpoint("finish.status_written")
        task.move(self._path(Place.DONE, task.name), mtime_ns=int(now * 1e9))
        crashpoint("finish.moved")

    # ------------------------------------------------------------------ taking tasks away

    def abandon(self, claim: Claim | str, reason: str, *, charge: bool = True) -> Action:
        """Take a task away from its claim: re-enqueue it, or fail it once
        its restarts are used up. Returns the Action (``GONE`` if the claim
        no longer holds it).

        *charge*: whether this counts against ``max_restarts`` (timeouts and
        abandonment do; a graceful-shutdown hand-back does not). A task that
        was never started is never charged.
        """
        claim = Claim.parse(claim)
        for path in (self._path(Place.RUNNING, claim.name), self._path(Place.SCHEDULED, claim.name, claim.server)):
            result = self.take_away(path, reason, charge=charge, expect_claim=claim.number)
            if result is not Action.GONE:
                return result
        return Action.GONE

    def hand_back(self, claim: Claim | str, reason: str = "handed back") -> Action:
        """Return a claimed task to the queue without charging a restart."""
        return self.abandon(claim, reason, charge=False)

    def take_away(
        self,
        path: str,
        reason: str,
        *,
        charge: bool,
        expect_claim: int | None = None,
        confirm: Callable[[dict[str, Any]], str | None] | None = None,
    ) -> Action:
        """Under the enqueue lock and the task's lock: re-enqueue the task at
        *path* (or fail it, once a charged take-away finds its restarts used
        up), or complete a finish or re-enqueue a crash interrupted. GONE if
        it is no longer there, no longer at claim *expect_claim*, or
        *confirm* (given the status read under the lock) returns None; a
        string from *confirm* replaces *reason*. BUSY, and nothing changes,
        while a process of the task's run is alive (its run lock is held):
        a task is taken from a run only once the run is over."""
        with self.layout.enqueue_lock:
            # Holders keep a task's lock for milliseconds; one that keeps it
            # longer is stuck or stopped, and waiting on it would stall this
            # take-away and, through the enqueue lock, every producer.
            task = self._open_for_take_away(path)
            if isinstance(task, Action):
                return task
            try:
                if expect_claim is not None and task.doc.get("claim") != expect_claim:
                    return Action.GONE
                if confirm is not None:
                    confirmed = confirm(task.doc)
                    if confirmed is None:
                        return Action.GONE
                    reason = confirmed
                state = task.state
                if state.terminal:
                    # Crashed between the final status write and the move.
                    task.move(self._path(Place.DONE, task.name), mtime_ns=int(self.clock() * 1e9))
                    return Action.FINISHED_MOVE
                if state is not State.ENQUEUED and run_alive(task.fd):
                    return Action.BUSY
                if state == State.ENQUEUED:
                    # Crashed between the claim rename and its status write.
                    self._requeue_locked(task, reason or "claim was interrupted")
                    return Action.REENQUEUED
                if charges_restart(state, charge):
                    ttype = self.registry.find(task.doc["type"])
                    restarts = int(task.doc.get("restarts", 0))
                    if gives_up(restarts, ttype.max_restarts if ttype else 0):
                        starts = int(task.doc.get("starts", 0))
                        self._finish_locked(task, State.FAILED, f"{reason}; gave up after {starts} start(s)")
                        return Action.FAILED
                    task.doc["restarts"] = restarts + 1
                self._requeue_locked(task, reason)
                return Action.REENQUEUED
            finally:
                task.close()

    def _requeue_locked(self, task: TaskDir, reason: str) -> None:
        """Back to ``enqueued/`` (caller holds the enqueue lock and the task);
        the queue limit is not applied. A task that ran goes to the back of
        the queue; one never started (a claim handed back: no slot of its
        type was free after all, its server stopped) keeps its place, by its
        enqueue time: behind a type at its concurrency, on several servers,
        such hand-backs ran a type's tasks out of their order."""
        now = self.clock()
        stamp = self._stamps.next(now)
        enqueued_at = task.doc.get("enqueued_at")
        if not task.state.started and isinstance(enqueued_at, str):
            try:
                stamp = int(codec.from_iso(enqueued_at) * 1e9)
            except ValueError:
                pass  # unreadable: the back of the queue
        task.write(State.ENQUEUED, reason, server=None, claimed_at=None)
        task.move(self._path(Place.ENQUEUED, task.name), mtime_ns=stamp)
        crashpoint("requeue.moved")

    # ------------------------------------------------------------------ user actions: cancel, requeue

    def cancel(self, type_name: str, task_id: str, reason: str | None = None) -> TaskInfo:
        """Cancel task (type, id): it ends FAILED with the message
        ``cancelled: <reason>`` and ``"cancelled": true``, keeping its
        directory, log and response. A task not started yet ends so at once
        (no daemon needed). For a started one the request is recorded in its
        status (``"cancel"``); the daemon that runs it stops its handler
        within a second and then ends it (or, when its server is gone, this
        call does). WrongState for a task already final. Returns its status
        after the call (FAILED, or RUNNING/PAUSED with the request in)."""
        reason = (codec.bounded(reason, codec.STATUS_MESSAGE_MAX) if reason is not None else "").strip() \
            or "no reason given"
        for _ in range(5):
            path = self.locate(type_name, task_id)
            try:
                with self._task(path) as task:
                    state = task.state
                    if state.terminal:
                        here = self.layout.place_of_path(task.path)
                        if here is not None and cancelled_while_waiting(here[0], state):
                            task.move(self._path(Place.DONE, task.name), mtime_ns=int(self.clock() * 1e9))
                        raise WrongState(type_name, task_id, state.name, "there is nothing to cancel")
                    if not state.started:
                        self._cancel_unstarted(task, reason)
                        return TaskInfo(type_name, task_id, State.FAILED, task.path, task.doc)
                    task.write(state, str(task.doc.get("message") or ""), record=False, cancel=reason)
                    crashpoint("cancel.asked")
                    server, claim = task.doc.get("server"), int(task.doc["claim"])
                    path = task.path
            except (FileNotFoundError, Moved):
                continue  # it moved on: look again
            if isinstance(server, str) and not self.server_alive(server):
                self.finish_cancel(path, expect_claim=claim)  # nobody else will
            return self.status(type_name, task_id)
        raise TaskNotFound(type_name, task_id)

    def _cancel_unstarted(self, task: TaskDir, reason: str) -> None:
        """FAILED, cancelled, and on to done/. A waiting task can be claimed
        while it is locked here (a claim is a rename and takes no lock): then
        it is found in the claimer's scheduled/ by its inode, and the claimer,
        waiting for its lock, finds it gone. (A crash between the status and
        the move leaves a FAILED task where it was; whoever meets it next
        completes the move: a claim, the sweep, fsck.)"""
        now = self.clock()
        task.write(State.FAILED, f"cancelled: {reason}", finished_at=codec.iso(now), cancelled=True,
                   **_final_fields(task))
        crashpoint("cancel.unstarted")
        dest = self._path(Place.DONE, task.name)
        try:
            task.move(dest, mtime_ns=int(now * 1e9))
        except FileNotFoundError:
            task.path = self._find_by_inode(task.fd, task.name)
            task.move(dest, mtime_ns=int(now * 1e9))

    def _find_by_inode(self, fd: int, name: str) -> str:
        """Where the task directory open as *fd* is now, when a claim moved
        it to scheduled/<server>/ while this process held its lock."""
        st = os.fstat(fd)
        for server in self.servers():
            path = self._path(Place.SCHEDULED, name, server)
            try:
                here = os.lstat(path)
            except OSError:
                continue
            if (here.st_dev, here.st_ino) == (st.st_dev, st.st_ino):
                return path
        raise FileNotFoundError(f"task directory {name} moved where no claim puts it")

    def _open_for_take_away(self, path: str) -> TaskDir | Action:
        """The task at *path*, open and locked; GONE when it is no longer
        there, BUSY when its lock stays held (its run is alive)."""
        task = self._task(path, wait=TAKE_AWAY_LOCK_WAIT)
        try:
            task.open()
        except (FileNotFoundError, NotADirectoryError, Moved):
            return Action.GONE
        except LockBusy:
            return Action.BUSY
        return task

    def finish_cancel(self, path: str, *, expect_claim: int | None = None) -> Action:
        """End the started task at *path* whose cancel was asked for, once no
        process of its run is alive: FAILED, cancelled. BUSY while its run
        lives, GONE if it changed meanwhile (finished, taken away)."""
        task = self._open_for_take_away(path)
        if isinstance(task, Action):
            return task
        try:
            reason = task.doc.get("cancel")
            if reason is None or not task.state.started or (
                    expect_claim is not None and task.doc.get("claim") != expect_claim):
                return Action.GONE
            if run_alive(task.fd):
                return Action.BUSY
            self._finish_locked(task, State.FAILED, f"cancelled: {reason}", cancelled=True)
            crashpoint("cancel.finished")
            return Action.FAILED
        finally:
            task.close()

    def cancel_asked(self, claim: Claim | str) -> str | None:
        """The reason of a cancel asked for the started task of *claim*, or
        None (no request, or the claim does not hold it). An unlocked read:
        the request is only ever written whole."""
        claim = Claim.parse(claim)
        try:
            doc = peek_status(self._path(Place.RUNNING, claim.name))
        except (OSError, CorruptTask):
            return None
        reason = doc.get("cancel")
        return reason if claim.owns(doc) and isinstance(reason, str) else None

    def requeue(
        self, type_name: str, task_id: str, *, not_before: datetime | float | None = None, delay: float | None = None,
    ) -> TaskInfo:
        """Send a FAILED task round again: back to ENQUEUED (due now, at
        *not_before* or after *delay* seconds) with its retries and restarts
        reset to 0; its log keeps its history plus a ``requeued`` record,
        its old response is dropped. WrongState for a task not FAILED."""
        with self.layout.enqueue_lock:  # a move backwards
            path = self.locate(type_name, task_id)
            with self._task(path) as task:
                if task.state is not State.FAILED:
                    raise WrongState(type_name, task_id, task.state.name, "only a FAILED task can be requeued")
                now = self.clock()
                due = due_time(not_before, delay, now)
                try:
                    os.unlink(RESPONSE, dir_fd=task.fd)
                except FileNotFoundError:
                    pass
                for key in ("cancelled", "cancel"):
                    task.doc.pop(key, None)
                task.write(
                    State.ENQUEUED, "requeued", server=None, retries=0, restarts=0, response_mime=None,
                    claimed_at=None, started_at=None, finished_at=None,
                    not_before=None if due is None else codec.iso(due),
                )
                task.move(self._path(Place.ENQUEUED, task.name), mtime_ns=self._stamps.next(now))
                crashpoint("requeue.failed_moved")
                return TaskInfo(type_name, task_id, State.ENQUEUED, task.path, task.doc)

    def requeue_failed(self, type_name: str | None = None) -> int:
        """Requeue every FAILED task (of *type_name*); how many."""
        if type_name is not None:
            self.registry.get(type_name)
        count = 0
        for info in self.list_tasks(state=State.FAILED, type_name=type_name):
            try:
                self.requeue(info.type, info.id)
                count += 1
            except (WrongState, TaskNotFound):
                continue  # changed meanwhile
        return count

    def delete(self, type_name: str, task_id: str, *, through: Claim | None = None) -> bool:
        """Remove the task in whatever state. Atomic: it is renamed into
        ``tmp/`` first (so it vanishes at once), then removed. A running
        handler's later writes are refused; the daemon kills it, and this
        call returns once it has (at most DELETE_WAIT seconds later), so a
        task enqueued again under the same id never runs beside it. True
        when the handler still ran at the end of that wait (its worker is
        stopped: it stops the run when it goes on); else False.

        *through*: a claim of the task (ATP's ``deleteTask(task_id)``); the
        delete is refused with StaleClaim, and nothing changes, once that
        claim no longer holds the task (a later life of it is not the
        caller's to delete)."""
        for _ in range(5):
            path = self.locate(type_name, task_id)
            trash = self.layout.trash_path(os.path.basename(path))
            try:
                with self._task(path) as task:
                    if through is not None and not through.owns(task.doc):
                        raise StaleClaim(f"claim {through} no longer owns task {type_name}/{task_id} "
                                         f"(now {task.state.name}): not deleted")
                    task.move(trash)
                    running = run_alive(task.fd)
            except (FileNotFoundError, Moved):
                continue
            except CorruptTask:
                try:
                    os.rename(path, trash)  # a symlink is moved, not followed
                except FileNotFoundError:
                    continue
                running = False
            if running:  # without the task's lock, which stopping the run does not need
                run_dir = fsutil.open_dir(trash)
                try:
                    deadline = time.monotonic() + DELETE_WAIT
                    while (running := run_alive(run_dir)) and time.monotonic() < deadline:
                        time.sleep(0.02)
                finally:
                    os.close(run_dir)
            _remove(trash)
            return running
        raise TaskNotFound(type_name, task_id)

    def quarantine(self, path: str, reason: str) -> str | None:
        """Move *path* (a symlink is moved, not followed) to ``quarantine/``
        with a ``.reason`` note; never deletes. The new path, or None if gone."""
        return self.layout.quarantine(path, reason, now=self.clock(), durable=self.durable)

    def run_holders(self, path: str) -> list[int]:
        """Pids still holding the run lock of the task at *path* (that this
        process may see): leftovers of a run whose worker is gone."""
        return run_lock_holders(path)

    def remove_trash(self, path: str) -> None:
        """Remove an entry that was renamed into ``tmp/`` (see :meth:`delete`)."""
        _remove(path)
