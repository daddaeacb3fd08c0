"""Putting tasks into the spool: one at a time, or many with one durable
barrier (group commit).

A task is built in ``tmp/`` (its input, ``status.json`` and ``log``) and
renamed into ``enqueued/`` only when whole, under the enqueue lock that also
guards the uniqueness check and the queue limit: a crash leaves no task or a
complete one, never half of one (crash points ``enqueue.staged``,
``enqueue.published``).

Durability. One enqueue fsyncs its files, its directory, then (after the
publishing rename) ``enqueued/`` and ``tmp/``. A batch
(:meth:`Producer.enqueue_many`) writes every task's files without a sync,
then makes them all durable with one barrier (``syncfs`` of the spool's
filesystem, or an fsync per file where that is missing), publishes them all
under one acquisition of the enqueue lock, and fsyncs ``enqueued/`` and
``tmp/`` once. Every task still appears whole (its files were durable before
its rename) or not at all; none is acknowledged before the barrier that
covers it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from .errors import InvalidInput, QueueFull, SpoolqError, TaskExists
from .faults import crashpoint
from .lifecycle import Place, State
from .names import task_name
from .queries import Queries, TaskInfo
from .store import codec, fsutil
from .store.codec import INPUT_JSON, STATUS
from .store.layout import Layout
from .store.registry import TaskType, TypeRegistry, check_priority
from .units import MAX_DURATION, MAX_DURATION_TEXT, parse_duration


class StampClock:
    """Strictly increasing nanosecond stamps within a process: the queue stamp."""

    def __init__(self) -> None:
        self._last = 0

    def next(self, now: float) -> int:
        stamp = max(int(now * 1e9), self._last + 1)
        self._last = stamp
        return stamp


def check_delay(delay: Any) -> float:
    """*delay* as seconds; InvalidInput unless it is a number from 0 to
    units.MAX_DURATION (100 years): a delay of an enqueue, a requeue or a
    handler's retry."""
    if isinstance(delay, bool) or not isinstance(delay, (int, float)):
        raise InvalidInput(f"a delay is a number of seconds, not {delay!r}")
    try:
        return parse_duration(delay)
    except ValueError as exc:
        raise InvalidInput(f"delay {exc}") from None


def check_due(due: float, now: float, what: str) -> float:
    """*due* (seconds since the epoch) if it is within units.MAX_DURATION of
    *now*, else InvalidInput naming *what* was given. Within it the time is
    one status.json holds and reads back (a four-digit year) for thousands of
    years yet; further ahead is no real schedule, and further back no more
    "due now" than a recent past."""
    if not abs(due - now) <= MAX_DURATION:  # `not <=`: NaN too
        raise InvalidInput(f"{what} is not within {MAX_DURATION_TEXT} of now")
    return due


def due_time(not_before: datetime | float | None, delay: float | None, now: float) -> float | None:
    """The due time (seconds since the epoch) of a task enqueued with
    *not_before* (a datetime; naive means local time) or *delay* (seconds
    from *now*), or None for "now". InvalidInput when both are given, or
    when either is not a number or is out of range (:func:`check_delay`,
    :func:`check_due`)."""
    if not_before is not None and delay is not None:
        raise InvalidInput("give a due time or a delay, not both")
    if delay is not None:
        return now + check_delay(delay)
    if not_before is None:
        return None
    if isinstance(not_before, bool) or not isinstance(not_before, (datetime, int, float)):
        raise InvalidInput(f"not_before must be a datetime, not {type(not_before).__name__}")
    is_datetime = isinstance(not_before, datetime)
    try:
        due = not_before.timestamp() if is_datetime else float(not_before)  # naive: local time, as datetime does
    except (ValueError, OverflowError):  # year 1 local may be year 0 in UTC; an int past every float
        due = math.nan
    return check_due(due, now, f"not_before {not_before.isoformat() if is_datetime else repr(not_before)}")


@dataclass(frozen=True)
class Item:
    """One task of a batch: its id, its input (JSON), its priority and due
    time (None: the type's priority; now)."""

    id: str
    input: Any
    priority: int | None = None
    not_before: datetime | float | None = None
    delay: float | None = None


# The keys a batch item given as a dict (Spool.enqueue_many) may have
# besides "id" and "input": Item's other fields.
ITEM_KEYS = tuple(field.name for field in fields(Item) if field.name not in ("id", "input"))


def check_item_keys(doc: Any, optional: Collection[str], what: str) -> None:
    """InvalidInput unless *doc* is an object (a mapping) with "id" and
    "input" and no key but those and *optional*; *what* names it in the
    message ("an item", "a line"). The one rule of a batch item's shape, for
    the library's dicts and the command line's JSON Lines alike."""
    if not isinstance(doc, Mapping):
        raise InvalidInput(f'{what} must be an object with "id" and "input", not {type(doc).__name__}')
    missing = [key for key in ("id", "input") if key not in doc]
    if missing:
        raise InvalidInput(f"{what} has no {' or '.join(map(json.dumps, missing))}")
    unknown = [key for key in doc if key not in ("id", "input", *optional)]
    if unknown:
        raise InvalidInput(f"{what} has unknown key(s) {', '.join(map(repr, unknown))}"[:200])


def item_of(value: Any) -> Item:
    """*value* as an :class:`Item`: an Item, or a dict with "id", "input"
    and optionally "priority", "not_before", "delay"; InvalidInput saying
    what is wrong with it otherwise (:func:`check_item_keys`)."""
    if isinstance(value, Item):
        return value
    check_item_keys(value, ITEM_KEYS, "an item")
    return Item(**value)


@dataclass(frozen=True)
class BatchResult:
    """What became of item number *index* (0-based) of a batch: *error* is
    None when it was enqueued."""

    index: int
    id: str | None
    error: SpoolqError | None = None


@dataclass
class _Stage:
    type: str
    id: str
    name: str
    path: str
    doc: dict[str, Any]


class Producer:
    """The enqueue side of one spool (used through :class:`spoolq.Spool`)."""

    def __init__(
        self, layout: Layout, registry: TypeRegistry, queries: Queries, *, clock: Callable[[], float],
        durable: bool, max_input_bytes: int, stamps: StampClock,
    ) -> None:
        self.layout = layout
        self.registry = registry
        self.queries = queries
        self.clock = clock
        self.durable = durable
        self.max_input_bytes = max_input_bytes
        self.stamps = stamps

    # ------------------------------------------------------------------ inputs

    def pickled(self, value: Any) -> bytes:
        import pickle  # here, not at the top: `spoolq status` need not load it (contract §12.7)

        try:
            return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise InvalidInput(f"input cannot be pickled: {type(exc).__name__}: {exc}") from None

    def checked_pickle(self, payload: Any) -> bytes:
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise InvalidInput("pickled input must be bytes")
        payload = bytes(payload)
        codec.check_pickle(payload)
        return payload

    def read_input(self, fd: int) -> bytes:
        """Read a task input from *fd*, stopping at the spool's input limit:
        InvalidInput as soon as more arrives (a pipe or device that never
        ends is not read whole)."""
        try:
            return fsutil.read_limited(fd, self.max_input_bytes)
        except OSError as exc:
            if exc.errno != errno.EFBIG:
                raise
        raise InvalidInput(
            f"input is over the spool's limit of {self.max_input_bytes} bytes", limit=self.max_input_bytes
        )

    # ------------------------------------------------------------------ one task

    def enqueue(
        self, type_name: str, task_id: str, input_name: str, payload: bytes, *, message: str = "",
        priority: int | None = None, not_before: datetime | float | None = None, delay: float | None = None,
    ) -> TaskInfo:
        """Enqueue one task; whole or not at all. Raises InvalidName,
        UnknownType, InvalidInput, TaskExists or QueueFull, and in each case
        leaves nothing behind."""
        stage = self._stage(type_name, task_id, input_name, payload, message, priority, not_before, delay,
                            sync=self.durable)
        try:
            with self.layout.enqueue_lock:
                limit = self.layout.settings_now().max_queue
                self._publish(stage, limit, limit and self.queries.count_enqueued())
        except BaseException:
            shutil.rmtree(stage.path, ignore_errors=True)
            raise
        if self.durable:
            fsutil.fsync_dir(self.layout.enqueued)
            fsutil.fsync_dir(self.layout.tmp)
        return TaskInfo(stage.type, stage.id, State.ENQUEUED, stage.path, stage.doc)

    def _stage(
        self, type_name: str, task_id: str, input_name: str, payload: bytes, message: str,
        priority: int | None, not_before: datetime | float | None, delay: float | None, *, sync: bool,
    ) -> _Stage:
        """Build the task in ``tmp/``: its files written (fsynced with *sync*)."""
        name = task_name(type_name, task_id)
        ttype = self.registry.get(type_name)
        if len(payload) > self.max_input_bytes:
            raise InvalidInput(
                f"input is {len(payload)} bytes, over the spool's limit of {self.max_input_bytes}",
                limit=self.max_input_bytes,
            )
        now = self.clock()
        doc = self._status(ttype, task_id, input_name, message, now, priority, due_time(not_before, delay, now))
        path = self.layout.path("tmp", f"{name}.{os.getpid()}.{os.urandom(6).hex()}")
        os.mkdir(path, 0o770)
        try:
            dfd = fsutil.open_dir(path)
            try:
                fsutil.share_with_group(dfd, directory=True)  # the worker writes into it
                fsutil.write_new(dfd, input_name, payload, sync=sync)
                fsutil.write_new(dfd, STATUS, codec.encode_status(doc), sync=sync)
                fsutil.write_new(dfd, codec.LOG, codec.log_line(now, State.ENQUEUED, message), sync=sync)
                # The queue stamp; set after the last write to the directory.
                fsutil.set_mtime(dfd, self.stamps.next(now))
                if sync:
                    os.fsync(dfd)
            finally:
                os.close(dfd)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        crashpoint("enqueue.staged")
        return _Stage(type_name, task_id, name, path, doc)

    @staticmethod
    def _status(
        ttype: TaskType, task_id: str, input_name: str, message: str, now: float, priority: int | None,
        due: float | None,
    ) -> dict[str, Any]:
        return {
            "type": ttype.name,
            "id": task_id,
            "state": State.ENQUEUED.name,
            "input": input_name,
            "server": None,
            # The claim counter starts at the enqueue time in microseconds, so
            # claim numbers never repeat across lives of one (type, id): a
            # handler of a deleted task cannot write into its successor.
            "claim": time.time_ns() // 1000,
            "starts": 0,
            "restarts": 0,
            "retries": 0,
            "priority": check_priority(ttype.priority if priority is None else priority),
            "not_before": None if due is None else codec.iso(due),
            "enqueued_at": codec.iso(now),
            "claimed_at": None,
            "started_at": None,
            "finished_at": None,
            "updated_at": codec.iso(now),
            "response_mime": None,
            "message": codec.bounded(message, codec.STATUS_MESSAGE_MAX),
        }

    def _publish(self, stage: _Stage, limit: int, waiting: int) -> None:
        """Rename a complete stage into ``enqueued/`` (caller holds the
        enqueue lock; *waiting* is how many tasks wait, when there is a
        *limit*)."""
        # The type again, under the lock an unregister holds while it removes
        # it: a task published after that would be of no type, and run
        # anyway by a worker that had the type cached.
        self.registry.get(stage.type)
        if self.queries.exists(stage.type, stage.id):
            raise TaskExists(stage.type, stage.id)
        if limit and waiting >= limit:
            raise QueueFull(limit)
        dest = self.layout.task_path(Place.ENQUEUED, stage.name)
        try:
            fsutil.rename_noreplace(stage.path, dest)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise TaskExists(stage.type, stage.id) from None
            raise
        stage.path = dest
        crashpoint("enqueue.published")

    # ------------------------------------------------------------------ many tasks

    def enqueue_many(self, type_name: str, items: Iterable[Item | Mapping[str, Any]]) -> Iterator[BatchResult]:
        """Enqueue a batch of tasks (JSON inputs) of one type with one
        durable barrier; yields one :class:`BatchResult` per item, in order,
        once the whole batch is published. A bad item (not an Item or a dict
        of its fields (:func:`item_of`), a bad id, input, priority or due
        time, an id that exists or comes twice) is reported and skipped; the
        others are enqueued."""
        self.registry.get(type_name)
        stages: list[tuple[int, _Stage]] = []
        results: dict[int, BatchResult] = {}
        seen: set[str] = set()
        try:
            for index, value in enumerate(items):
                try:
                    # Converted here, inside the item's own try: a malformed
                    # item is its own result, not the end of the batch.
                    item = item_of(value)
                    if item.id in seen:
                        raise TaskExists(type_name, item.id)
                    stage = self._stage(type_name, item.id, INPUT_JSON, codec.json_input(item.input), "",
                                        item.priority, item.not_before, item.delay, sync=False)
                except SpoolqError as exc:
                    given = value.get("id") if isinstance(value, Mapping) else getattr(value, "id", None)
                    results[index] = BatchResult(index, given if isinstance(given, str) else None, exc)
                    continue
                seen.add(item.id)
                stages.append((index, stage))
            if self.durable:
                self._barrier([stage for _, stage in stages])
            crashpoint("enqueue.batch_synced")
            # One look at the type's file for the batch (_publish looks at it
            # again): under the enqueue lock no unregister can remove it meanwhile.
            with self.layout.enqueue_lock, self.registry.moment():
                limit = self.layout.settings_now().max_queue
                waiting = limit and self.queries.count_enqueued()
                for index, stage in stages:
                    try:
                        self._publish(stage, limit, waiting)
                        waiting += 1
                        results[index] = BatchResult(index, stage.id)
                    except SpoolqError as exc:
                        shutil.rmtree(stage.path, ignore_errors=True)
                        results[index] = BatchResult(index, stage.id, exc)
        except BaseException:
            for _, stage in stages:
                if os.path.dirname(stage.path) == self.layout.tmp:
                    shutil.rmtree(stage.path, ignore_errors=True)
            raise
        if self.durable and stages:
            fsutil.fsync_dir(self.layout.enqueued)
            fsutil.fsync_dir(self.layout.tmp)
        for index in sorted(results):
            yield results[index]

    def _barrier(self, stages: list[_Stage]) -> None:
        """Make every staged file and directory durable at once."""
        if not stages:
            return
        if fsutil.syncfs(self.layout.tmp):
            return
        for stage in stages:  # no syncfs here: one fsync per file, as a single enqueue does
            dfd = fsutil.open_dir(stage.path)
            try:
                for entry in os.listdir(dfd):
                    fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                os.fsync(dfd)
            finally:
                os.close(dfd)


__all__ = ["BatchResult", "ITEM_KEYS", "Item", "Producer", "StampClock", "check_delay", "check_due", "check_item_keys",
           "due_time", "item_of"]
