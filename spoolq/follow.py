"""Following a task as it runs: ``spoolq log --follow`` and ``spoolq output
--follow`` (contract §12.2).

A follower opens the task's directory once and keeps that descriptor: a
task moves between state directories by renaming its directory, so the
descriptor (and an inotify watch set on the same inode, :class:`FdWatch`)
stays on the task from ``enqueued/`` through ``scheduled/`` and ``running/``
to ``done/``, and back to the queue on a restart. It reads what is new,
prints it, and waits for the next file event in the directory; it reads again
every :data:`RECHECK` seconds in case an event was missed. It ends when the
status, read through the same descriptor, is FINISHED or FAILED, after one
last read (the final log record is written before the status that announces
it; the output is complete before the run's final state is set).

A task deleted while it is followed ends the follow with TaskNotFound.
"""

from __future__ import annotations

import json
import os
import select
import time
from collections.abc import Callable

from .errors import CorruptTask, TaskGone, TaskNotFound, UnknownType
from .names import task_name
from .queries import Queries, TaskInfo, format_log
from .store import codec
from .store.codec import LOG
from .store.output import MARKER, OUTPUT, marker, part_name, parts_of, tail_plan
from .store.taskdir import open_task_dir, read_status
from .watch import FdWatch

RECHECK = 1.5  # seconds between reads without a file event (a safety net)
_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
Write = Callable[[bytes], None]


def _open_task(queries: Queries, type_name: str, task_id: str) -> tuple[str, int]:
    for _ in range(5):
        path = queries.locate(type_name, task_id)
        try:
            return path, open_task_dir(path)
        except FileNotFoundError:
            continue
    raise TaskNotFound(type_name, task_id)


class _Follower:
    """The loop both follows share: wait for events, re-read, stop at the end."""

    def __init__(self, queries: Queries, type_name: str, task_id: str, timeout: float | None) -> None:
        task_name(type_name, task_id)
        self.queries = queries
        self.type = type_name
        self.id = task_id
        self.path, self.dfd = _open_task(queries, type_name, task_id)
        self.watch = FdWatch(self.dfd)
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def close(self) -> None:
        self.watch.close()
        os.close(self.dfd)

    def status(self) -> TaskInfo:
        """The task's status, read through the descriptor that follows it."""
        st = os.fstat(self.dfd)
        if st.st_nlink == 0:
            raise TaskGone(self.type, self.id, "followed")
        try:
            doc = read_status(self.dfd, self.path)
        except CorruptTask:
            if os.fstat(self.dfd).st_nlink == 0:
                raise TaskGone(self.type, self.id, "followed") from None
            raise
        return TaskInfo(self.type, self.id, codec.state_of(doc), self.path, doc)

    def moved_away(self) -> bool:
        """Whether the directory left the spool's state directories (a delete
        renames it into tmp/ before removing it)."""
        try:
            path = self.queries.locate(self.type, self.id)
            now = os.stat(path, follow_symlinks=False)
        except (TaskNotFound, UnknownType, OSError):
            return True
        mine = os.fstat(self.dfd)
        if (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
            return True
        self.path = path
        return False

    def run(self, read_new: Callable[[], None]) -> TaskInfo | None:
        """Call *read_new* now and after every event until the task is final;
        its final status, or None when the timeout ran out first."""
        try:
            while True:
                events = self.watch.drain()  # before the reads: a later event wakes the select
                if any(mask & 0x00000800 for mask, _ in events) and self.moved_away():  # IN_MOVE_SELF
                    raise TaskGone(self.type, self.id, "followed")
                read_new()
                info = self.status()
                if info.state.terminal:
                    read_new()
                    return info
                pause = RECHECK
                if self.deadline is not None:
                    pause = min(pause, self.deadline - time.monotonic())
                    if pause <= 0:
                        return None
                select.select([self.watch.fileno()], [], [], pause)
        finally:
            self.close()


def _open_file(dfd: int, name: str) -> int | None:
    try:
        return os.open(name, _O_READ, dir_fd=dfd)
    except (FileNotFoundError, OSError):
        return None


def _read_from(fd: int, offset: int, limit: int | None = None) -> bytes:
    chunks = []
    while limit is None or limit > 0:
        chunk = os.pread(fd, 1 << 20 if limit is None else min(limit, 1 << 20), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        if limit is not None:
            limit -= len(chunk)
    return b"".join(chunks)


def follow_log(queries: Queries, type_name: str, task_id: str, write: Callable[[str], None], *,
               as_json: bool = False, timeout: float | None = None) -> TaskInfo | None:
    """Print the task's log records, each once and in order, as they are
    written, until the task is FINISHED or FAILED (its final status is
    returned; None if *timeout* ran out). With *as_json*, one JSON object a
    line (JSON Lines)."""
    follower = _Follower(queries, type_name, task_id, timeout)
    state = {"fd": _open_file(follower.dfd, LOG), "offset": 0, "pending": b""}

    def read_new() -> None:
        if state["fd"] is None:
            state["fd"] = _open_file(follower.dfd, LOG)
            if state["fd"] is None:
                return
        data = _read_from(state["fd"], state["offset"])
        state["offset"] += len(data)
        buffered = state["pending"] + data
        complete, _, state["pending"] = buffered.rpartition(b"\n")
        if not complete:
            return
        for record in codec.parse_log(complete + b"\n"):
            if as_json:
                write(json.dumps({"time": record.time.isoformat(), "state": record.state.name,
                                  "message": record.message}, sort_keys=True) + "\n")  # as every --json output
            else:
                write(format_log([record])[0] + "\n")

    try:
        return follower.run(read_new)
    finally:
        if state["fd"] is not None:
            os.close(state["fd"])


class _OutputReader:
    """What is new in a run's output: the head as ``output`` grows, then the
    tail parts one after the other (a part that was already recycled when we
    got to it is replaced by a marker line). A new run (a fresh ``output``)
    starts over."""

    def __init__(self, dfd: int, write: Write, new_run: Callable[[], None] | None = None) -> None:
        self.dfd = dfd
        self.write = write
        self.new_run = new_run
        self.out: int | None = None
        self.out_ino: tuple[int, int] | None = None
        self.head_off = 0
        self.part: tuple[int, int] | None = None  # (index, fd) being read
        self.part_off = 0
        self.seg = 0  # the size of a full part, once one was read whole
        self.over = False  # the run ended while we were in its tail, and all of it is printed

    def close(self) -> None:
        for fd in (self.out, self.part[1] if self.part else None):
            if fd is not None:
                os.close(fd)
        self.out = None
        self.part = None
        self.over = False

    def _reopen_output(self) -> None:
        try:
            st = os.stat(OUTPUT, dir_fd=self.dfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if self.out is not None and (st.st_dev, st.st_ino) == self.out_ino:
            return
        fd = _open_file(self.dfd, OUTPUT)
        if fd is None:
            return
        if self.out_ino is not None and self.new_run is not None:
            self.new_run()  # its output does not go on from the last run's
        self.close()  # a new run: start over
        self.out, self.out_ino = fd, (st.st_dev, st.st_ino)
        self.head_off = 0
        self.part_off = 0

    def __call__(self) -> None:
        self._reopen_output()
        if self.out is None or self.over:
            return
        if self.part is None:
            self._read_head()
            parts = parts_of(self.dfd)
            if not parts:
                return
            self._read_head()  # the head is complete once a part exists
            self._enter_tail(parts)
        self._read_tail()

    def _read_head(self) -> None:
        assert self.out is not None
        data = _read_from(self.out, self.head_off)
        self.head_off += len(data)
        if data:
            self.write(data)

    def _enter_tail(self, parts: list[int]) -> None:
        """Start on the tail: at the first part if we were there when the
        run left its head; else with the latest bytes, as the run's end
        would keep them, and a marker for what came before."""
        fds = {i: fd for i in parts[-2:] if (fd := _open_file(self.dfd, part_name(i))) is not None}
        if not fds:
            return
        if 0 in fds:
            first, self.part_off = 0, 0
        else:
            sizes = [(i, os.fstat(fd).st_size) for i, fd in sorted(fds.items())]
            pieces, skipped = tail_plan(sizes)
            if skipped:
                self.write(marker(skipped))
            for index, offset, length in pieces:
                self.write(_read_from(fds[index], offset, length))
            first, self.part_off = sizes[-1]
            self.seg = sizes[0][1] if len(sizes) > 1 else 0
        self.part = (first, fds.pop(first))
        for fd in fds.values():
            os.close(fd)

    def _read_tail(self) -> None:
        while self.part is not None:
            index, fd = self.part
            data = _read_from(fd, self.part_off)
            self.part_off += len(data)
            if data:
                self.write(data)
            parts = parts_of(self.dfd)
            if not parts:
                self._read_assembled(index)
                return
            newer = [i for i in parts if i > index]
            if not newer:
                return
            # This part is full (the next one exists): go on with the next.
            self.seg = self.part_off
            nxt = index + 1
            fd_next = _open_file(self.dfd, part_name(nxt))
            if fd_next is None:  # recycled before we got to it
                nxt = newer[0]
                fd_next = _open_file(self.dfd, part_name(nxt))
                if fd_next is None:
                    return
                self.write(marker((nxt - index - 1) * self.seg))
            os.close(fd)
            self.part = (nxt, fd_next)
            self.part_off = 0


    def _read_assembled(self, index: int) -> None:
        """The run ended while we were in its tail: its parts are gone and
        ``output`` now ends with the marker and the latest tail. Print what
        of that tail we have not printed yet (a marker first if we fell
        behind further than it reaches)."""
        assert self.out is not None and self.part is not None
        rest = _read_from(self.out, self.head_off)
        if not rest:
            return  # not assembled (yet, or the run died): the parts were all there was
        skipped = 0
        match = MARKER.match(rest)
        if match:
            skipped = int(match.group(1))
            rest = rest[match.end():]
        position = index * self.seg + self.part_off if index else self.part_off
        if position >= skipped:
            rest = rest[position - skipped:]
        else:
            self.write(marker(skipped - position))
        if rest:
            self.write(rest)
        os.close(self.part[1])
        self.part = None
        self.over = True  # until a new run starts a new output


def follow_output(queries: Queries, type_name: str, task_id: str, write: Write, *,
                  timeout: float | None = None, new_run: Callable[[], None] | None = None) -> TaskInfo | None:
    """Print the task's output as it is written, until the task is FINISHED
    or FAILED (its final status is returned; None if *timeout* ran out).
    Within the cap this prints exactly what the output file ends with; past
    it, the tail as it streams (a follower that falls more than a part
    behind prints a marker where it lost bytes). *new_run()* is called when
    a later run's output replaces one already printed (a restart, a retry)."""
    follower = _Follower(queries, type_name, task_id, timeout)
    reader = _OutputReader(follower.dfd, write, new_run)
    try:
        return follower.run(reader)
    finally:
        reader.close()


__all__ = ["RECHECK", "follow_log", "follow_output"]
