"""Reading the spool: find a task, its status, log and response; list, count,
wait.

Nothing here writes or takes a task lock: ``status.json`` is only ever
replaced whole, the log only appended to, so plain reads are consistent. What
needs care is that tasks move while they are read:

* a lookup probes the places in lifecycle order (a task moving forward is
  met further on) and, after two misses, once more under the enqueue lock,
  which stops every move backwards: a task is never reported missing while
  it moves;
* a listing meets a moving task in at most two places, and reports it once.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .errors import CorruptTask, NoResponse, SpoolqError, TaskGone, TaskNotFound, UnknownType
from .lifecycle import PLACE_OF, PLACE_ORDER, Place, State, due
from .names import split_task_name, task_name
from .store import codec, fsutil, queue
from .store.codec import LOG, LogRecord
from .store.layout import Layout
from .store.output import compose, read_progress
from .store.registry import TypeRegistry
from .store.taskdir import UNLIMITED, open_task_dir, read_response, read_status, read_status_and_claim, response_mime

# How often `wait_for` re-reads the status even without a file event: a
# safety net for a missed event, not the mechanism.
WAIT_RECHECK = 1.5
_MOVE_RETRIES = 5


@dataclass
class TaskInfo:
    """A task's status document as stored in ``status.json``, plus its path."""

    type: str
    id: str
    state: State
    path: str
    doc: dict[str, Any] = field(repr=False)
    # The handler's last progress (contract §12.3), from the task's
    # ``progress`` file, or None.
    progress: dict[str, Any] | None = field(default=None, repr=False)

    def as_json(self) -> dict[str, Any]:
        out = dict(self.doc)
        out["state"] = self.state.name
        out["code"] = int(self.state)
        out["path"] = self.path
        out["progress"] = self.progress
        return out


class Unreadable(NamedTuple):
    """A listed task whose status cannot be read (fsck says why)."""

    path: str


@dataclass
class Census:
    """Tasks per state and per (type, state), restarts per type (of the
    tasks in running/ and done/, whose status is read anyway), and the age
    of the oldest waiting task (None when none waits)."""

    states: dict[str, int]
    types: dict[str, dict[str, int]]
    restarts: dict[str, int]
    oldest_waiting_seconds: float | None
    # Paths of tasks in running/ or done/ whose status cannot be read, and of
    # entries anywhere that are not directories (not counted; fsck says why).
    unreadable: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "states": self.states,
            "types": self.types,
            "restarts": self.restarts,
            "oldest_waiting_seconds": self.oldest_waiting_seconds,
        }


class Queries:
    """The read side of one spool."""

    def __init__(self, layout: Layout, registry: TypeRegistry, *, clock: Callable[[], float] = time.time) -> None:
        self.layout = layout
        self.registry = registry
        self.clock = clock
        self._servers: tuple[int, list[str]] | None = None  # (mtime of scheduled/, its entries)

    # ------------------------------------------------------------------ lookup

    def _server_names(self) -> list[str]:
        """The directories in ``scheduled/``, listed again only when its mtime
        changed. A listing is remembered only when that mtime is over a
        second old: mtimes come from a coarse clock, so an entry added in
        the same tick as the listing could leave the mtime as it was."""
        try:
            mtime = os.stat(self.layout.scheduled).st_mtime_ns
        except FileNotFoundError:
            return []
        cached = self._servers
        if cached is not None and cached[0] == mtime:
            return cached[1]
        try:
            with os.scandir(self.layout.scheduled) as listing:
                # Never through a symlink planted as a server's directory: a
                # lookup would read (and requeue move in) what it points to.
                servers = sorted(e.name for e in listing if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []
        self._servers = (mtime, servers) if time.time_ns() - mtime > 1_000_000_000 else None
        return servers

    def _candidates(self, name: str) -> list[str]:
        layout = self.layout
        servers = self._server_names()
        return [
            layout.task_path(Place.ENQUEUED, name),
            *(layout.task_path(Place.SCHEDULED, name, s) for s in servers),
            layout.task_path(Place.RUNNING, name),
            layout.task_path(Place.DONE, name),
        ]

    def _probe(self, type_name: str, task_id: str) -> str | None:
        """Path of task (type, id), probing the places in lifecycle order: a
        fixed number of lstats (one per server in scheduled/)."""
        for path in self._candidates(task_name(type_name, task_id)):
            try:
                os.lstat(path)
                return path
            except (FileNotFoundError, NotADirectoryError):
                continue
        return None

    def exists(self, type_name: str, task_id: str) -> bool:
        """Whether task (type, id) is anywhere (one probe; the caller holds
        the enqueue lock when it needs the answer to stay true)."""
        return self._probe(type_name, task_id) is not None

    def locate(self, type_name: str, task_id: str) -> str:
        """Path of task (type, id); raises TaskNotFound. A miss is retried,
        the last time under the enqueue lock."""
        for _ in range(2):
            path = self._probe(type_name, task_id)
            if path is not None:
                return path
        with self.layout.enqueue_lock:
            path = self._probe(type_name, task_id)
        if path is None:
            raise self._missing(type_name, task_id)
        return path

    def _missing(self, type_name: str, task_id: str) -> SpoolqError:
        """Why task (type, id) is nowhere: UnknownType when its type is not
        registered (the likelier mistake: a misspelt type), else TaskNotFound."""
        try:
            self.registry.get(type_name)
        except UnknownType as exc:
            return exc
        except SpoolqError:
            pass  # a type file that cannot be read: the task is still not there
        return TaskNotFound(type_name, task_id)

    def _open(self, type_name: str, task_id: str) -> Iterator[tuple[str, int]]:
        """(path, directory fd) of the task, located again when it moved
        between the lookup and the open; the fd follows it from then on. The
        caller closes the fd and stops iterating once it has what it needs."""
        for _ in range(_MOVE_RETRIES):
            path = self.locate(type_name, task_id)
            try:
                dfd = open_task_dir(path)
            except FileNotFoundError:
                continue
            yield path, dfd
            return
        raise TaskNotFound(type_name, task_id)

    def status(self, type_name: str, task_id: str) -> TaskInfo:
        """The task's status document."""
        for path, dfd in self._open(type_name, task_id):
            try:
                return _info(type_name, task_id, path, dfd, self.layout)
            finally:
                os.close(dfd)
        raise TaskNotFound(type_name, task_id)  # pragma: no cover - _open raises first

    def output(self, type_name: str, task_id: str) -> bytes:
        """The handler's captured output (contract §12.1), as ``spoolq output``
        prints it; empty when there is none (yet)."""
        for _path, dfd in self._open(type_name, task_id):
            try:
                return compose(dfd)
            finally:
                os.close(dfd)
        raise TaskNotFound(type_name, task_id)  # pragma: no cover

    def log_records(self, type_name: str, task_id: str) -> list[LogRecord]:
        """The task's log, oldest first. A torn last line (a crash in the
        middle of an append) is ignored. A claim made by its move alone
        shows as its SCHEDULED record, as its start will write it."""
        for path, dfd in self._open(type_name, task_id):
            try:
                try:
                    raw = fsutil.read_file(dfd, LOG, limit=UNLIMITED)
                except FileNotFoundError:
                    raise CorruptTask(path, f"{path} has no log") from None
                records = list(codec.parse_log(raw))
                # The status after the log: a claim recorded meanwhile is
                # then either in the log already or not yet in either.
                _doc, claimed = read_status_and_claim(dfd, path, claimed_in=self.layout.server_of_path(path))
                if claimed is not None:
                    records.append(LogRecord(codec.parse_time(codec.iso(claimed)), State.SCHEDULED, ""))
                return records
            finally:
                os.close(dfd)
        raise TaskNotFound(type_name, task_id)  # pragma: no cover - _open raises first

    def response(self, type_name: str, task_id: str) -> tuple[bytes, str]:
        """(data, MIME type) of the stored response; raises NoResponse. The
        type is read with the data, from the same file (an attribute of it);
        a response stored where the filesystem keeps no attributes has its
        type in the status."""
        for path, dfd in self._open(type_name, task_id):
            try:
                data, mime = read_response(dfd)
                if mime is not None:
                    return data, mime
                mime = read_status(dfd, path, claimed_in=self.layout.server_of_path(path)).get("response_mime")
                return data, mime or "application/octet-stream"
            except FileNotFoundError:
                raise NoResponse(type_name, task_id) from None
            finally:
                os.close(dfd)
        raise TaskNotFound(type_name, task_id)  # pragma: no cover - _open raises first

    # ------------------------------------------------------------------ listings

    def _dirs(self, state: State | None) -> list[str]:
        layout = self.layout
        dirs: list[str] = []
        for place in PLACE_ORDER:
            if state is not None and place is not PLACE_OF[state]:
                continue
            if place is Place.SCHEDULED:
                dirs += [layout.server_dir(s) for s in self._server_names()]
            else:
                dirs.append(layout.place_dir(place))
        return dirs

    def iter_tasks(self, state: State | None = None) -> Iterator[tuple[str, str, str]]:
        """(type, id, path) of every entry of the places where *state* lives
        (all places when None), in lifecycle order; entries that are not task
        names (staging, hand-made junk) are skipped. A task that moves
        during the walk may be met twice."""
        for t, i, path, _ in self._entries(state):
            yield t, i, path

    def _entries(self, state: State | None) -> Iterator[tuple[str, str, str, bool]]:
        """What :meth:`iter_tasks` yields, and whether the entry is a real
        directory (from the listing's file type: no lstat per entry), so a
        count of waiting tasks, which reads no status, can leave out a file
        or a symlink planted under a task's name."""
        for directory in self._dirs(state):
            try:
                with os.scandir(directory) as listing:
                    entries = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in listing)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name, is_dir in entries:
                parts = split_task_name(name)
                if parts:
                    yield parts[0], parts[1], os.path.join(directory, name), is_dir

    def snapshot(self, state: State | None = None) -> list[tuple[str, str, str, bool]]:
        """(type, id, path, is a directory) of every task in the places where
        *state* lives (all places when None), each task once: the
        directories are listed under the enqueue lock, which stops every move
        backwards, and a task met twice (it moved forward during the listing)
        is kept at its later place. Listing names is quick; nothing is read
        under the lock."""
        found: dict[tuple[str, str], tuple[str, bool]] = {}
        with self.layout.enqueue_lock:
            for t, i, path, is_dir in self._entries(state):
                found.pop((t, i), None)
                found[(t, i)] = (path, is_dir)
        return [(t, i, path, is_dir) for (t, i), (path, is_dir) in found.items()]

    def _read_listed(self, type_name: str, task_id: str, path: str) -> TaskInfo | Unreadable | None:
        """The status of a listed task: at its listed path, or wherever it
        moved since; None if it is gone, :class:`Unreadable` if it cannot be
        read."""
        try:
            dfd = open_task_dir(path)
            try:
                return _info(type_name, task_id, path, dfd, self.layout)
            finally:
                os.close(dfd)
        except FileNotFoundError:
            pass
        except (OSError, CorruptTask):
            return Unreadable(path)
        try:
            return self.status(type_name, task_id)
        except (TaskNotFound, UnknownType):
            return None
        except (SpoolqError, OSError):
            return Unreadable(path)

    def list_tasks(
        self, *, state: State | None = None, type_name: str | None = None, unreadable: list[str] | None = None,
    ) -> list[TaskInfo]:
        """Status of every task (optionally of one state and/or type), each
        task once, in lifecycle order of where it was listed. The paths of
        tasks whose status cannot be read (fsck says why) go into
        *unreadable*, when given."""
        out = []
        for t, i, path, _ in self.snapshot(state):
            if type_name and t != type_name:
                continue
            info = self._read_listed(t, i, path)
            if isinstance(info, Unreadable):
                if unreadable is not None:
                    unreadable.append(info.path)
            elif info is not None and (state is None or info.state == state):
                out.append(info)
        return out

    def count_enqueued(self) -> int:
        """Number of waiting tasks (entries of ``enqueued/``)."""
        return len(os.listdir(self.layout.enqueued))

    def waiting(self) -> list[str]:
        """Names in ``enqueued/``, first to be claimed first."""
        return [key[-1] for key, _ in queue.scan(self.layout)]

    def census(self) -> Census:
        """Counts per state and per type (each task once, see
        :meth:`snapshot`), restarts per type, and the oldest waiting task's
        age. Waiting and claimed tasks are counted from directory entries
        (a file or symlink under a task's name is not one);
        running and done ones read their status to tell RUNNING from PAUSED
        and FINISHED from FAILED."""
        per_type: dict[str, dict[str, int]] = {}
        restarts: dict[str, int] = {}
        unreadable: list[str] = []

        def row(type_name: str) -> dict[str, int]:
            return per_type.setdefault(type_name, {s.name: 0 for s in State})

        for ttype in self.registry.all():
            row(ttype.name)
            restarts[ttype.name] = 0
        for t, i, path, is_dir in self.snapshot():
            place = self.layout.place_of_path(path)
            if place is None:
                continue
            if not is_dir:  # a file or symlink under a task's name: no task (fsck sets it aside)
                unreadable.append(path)
                continue
            if place[0] in (Place.ENQUEUED, Place.SCHEDULED):
                row(t)[State.ENQUEUED.name if place[0] is Place.ENQUEUED else State.SCHEDULED.name] += 1
                continue
            info = self._read_listed(t, i, path)  # running/ and done/: the status tells which
            if isinstance(info, Unreadable):
                unreadable.append(info.path)
                continue
            if info is None:
                continue
            row(t)[info.state.name] += 1
            restarts[t] = restarts.get(t, 0) + int(info.doc.get("restarts", 0))
        totals = {s.name: sum(r[s.name] for r in per_type.values()) for s in State}
        # How long the task waiting longest has been due: one enqueued to
        # run later waits from its due time (an alert on this age must not
        # fire for every task scheduled ahead), not from its enqueue.
        now_ns = int(self.clock() * 1e9)
        due_since = [key[1] for key, _ in queue.scan(self.layout) if due(key, now_ns)]
        oldest = max(0.0, (now_ns - min(due_since)) / 1e9) if due_since else None
        return Census(totals, dict(sorted(per_type.items())), dict(sorted(restarts.items())), oldest, unreadable)

    def counts(self) -> dict[str, int]:
        """Tasks per state."""
        return self.census().states

    # ------------------------------------------------------------------ waiting for an end

    def wait_for(
        self,
        type_name: str,
        task_id: str,
        timeout: float | None = None,
        *,
        give_up: Callable[[], bool] | None = None,
    ) -> TaskInfo | None:
        """Block until task (type, id) is FINISHED or FAILED and return its
        status; None when *timeout* seconds passed first (or *give_up()*
        turned true).

        A task becomes final by a rename into ``done/``: an inotify watch on
        that directory wakes the wait at once, and the status is re-read every
        WAIT_RECHECK seconds as a safety net for a missed event. Raises
        TaskNotFound if there is no such task, and TaskGone (a kind of it) if
        the task disappears while waited for (deleted, retired)."""
        from .watch import DirWatcher  # not needed by the other queries

        task_name(type_name, task_id)  # a bad name fails before the watch is set
        deadline = None if timeout is None else time.monotonic() + timeout
        # The watch is set before the first read, so no arrival can slip between.
        with DirWatcher(self.layout.done) as watcher:
            life = None  # its enqueue time: a task deleted and enqueued again under its id is another
            while True:
                watcher.drain()  # before the read: a later arrival wakes the select below
                try:
                    info = self.status(type_name, task_id)
                except TaskNotFound:
                    if life is not None:
                        raise TaskGone(type_name, task_id, "waited for") from None
                    raise
                if life is None:
                    life = info.doc.get("enqueued_at")
                elif info.doc.get("enqueued_at") != life:
                    raise TaskGone(type_name, task_id, "waited for")
                if info.state.terminal:
                    return info
                if give_up is not None and give_up():
                    return None
                pause = WAIT_RECHECK
                if deadline is not None:
                    pause = min(pause, deadline - time.monotonic())
                    if pause <= 0:
                        return None
                select.select([watcher.fileno()], [], [], pause)


def _info(type_name: str, task_id: str, path: str, dfd: int, layout: Layout) -> TaskInfo:
    """The status of the task open as *dfd*, with its progress (a claim made
    by its move alone read as recorded)."""
    doc = read_status(dfd, path, claimed_in=layout.server_of_path(path))
    state = codec.state_of(doc)
    if not state.terminal:
        # A response stored during the run keeps its type with it until
        # the final status copies it (Spool.store_response).
        mime = response_mime(dfd)
        if mime is not None:
            doc["response_mime"] = mime
    # A waiting or claimed task has no run: the progress file an interrupted
    # run left (removed when the next run starts) is not its progress.
    progress = read_progress(dfd) if state.started or state.terminal else None
    return TaskInfo(type_name, task_id, state, path, doc, progress)


def format_log(records: list[LogRecord]) -> list[str]:
    """Log records as text lines, oldest first: ISO time, state, message,
    escaped as the log stores it (codec.one_line: a tab or carriage return
    in a message would otherwise break the columns or overwrite the line)."""
    return [f"{r.time.isoformat()}  {r.state.name:<9}  {codec.one_line(r.message)}".rstrip() for r in records]


__all__ = ["Census", "Queries", "TaskInfo", "WAIT_RECHECK", "format_log"]
