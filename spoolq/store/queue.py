"""The order of ``enqueued/``: one index of waiting tasks, used by every claimer.

A waiting task's place in the queue is :func:`spoolq.lifecycle.wait_order_key`
of what :func:`read_key` finds on the disk: its priority and due time from
``status.json``, and its queue stamp, the directory's mtime (set when the
task was (re-)enqueued; nothing writes into a waiting task, so it stays put).

:class:`WaitingIndex` keeps those keys in two heaps: the tasks that are due
(by key) and the ones due later (by due time). The daemon feeds it with file
events and rescans, ``Spool.claim`` with rescans alone. Keys are hints that
can go stale (a task claimed by another server, or re-enqueued):
:meth:`WaitingIndex.pop` checks each against the disk before handing a name
out, and the claim itself checks the due time again under the task's lock.
"""

from __future__ import annotations

import heapq
import os
import time
from collections.abc import Callable, Iterator

from ..errors import CorruptTask
from ..lifecycle import Place, State, WaitKey, cancelled_while_waiting, due, wait_order_key
from ..names import split_task_name
from .codec import from_iso
from .layout import Layout
from .taskdir import peek_status

FUTURE_SLACK_NS = 60 * 10**9  # how far in the future a stamp may be before the clock is suspected


def _stamp(mtime_ns: int) -> int:
    """The queue stamp of a waiting task: its directory's mtime, but never
    later than now."""
    return min(mtime_ns, time.time_ns())


def _mtime(directory: str, name: str) -> int | None:
    path = os.path.join(directory, name)
    try:
        mtime = os.lstat(path).st_mtime_ns
    except (FileNotFoundError, NotADirectoryError):
        return None
    return _settle_future(path, mtime)


def _settle_future(path: str, mtime: int) -> int:
    """A stamp from before the clock stepped back would keep its task behind
    everything enqueued until the clock catches up: it is set to now, once,
    on the disk (anyone who may write the directory may do that), so the
    task keeps one place in the queue from then on."""
    now = time.time_ns()
    if mtime <= now + FUTURE_SLACK_NS:
        return mtime
    try:
        os.utime(path, follow_symlinks=False)
        return os.lstat(path).st_mtime_ns
    except OSError:
        return now


def read_key(directory: str, name: str, mtime: int) -> WaitKey:
    """The wait-order key of entry *name* of ``enqueued/`` whose mtime is
    *mtime*. An entry whose status cannot be read is keyed as a plain task,
    so that a claim meets it and quarantines it; so is one whose cancel
    stopped before its move, so that a claim completes the move."""
    try:
        doc = peek_status(os.path.join(directory, name))
    except (OSError, CorruptTask):
        return wait_order_key(_stamp(mtime), name)
    if doc.get("state") in State.__members__ and cancelled_while_waiting(Place.ENQUEUED, State[doc["state"]]):
        return wait_order_key(_stamp(mtime), name)
    priority = doc.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        priority = 0
    due_ns = None
    not_before = doc.get("not_before")
    if isinstance(not_before, str):
        try:
            due_ns = int(from_iso(not_before) * 1e9)
        except ValueError:
            due_ns = None
    return wait_order_key(_stamp(mtime), name, priority=priority, due_ns=due_ns)


def scan(layout: Layout) -> list[tuple[WaitKey, int]]:
    """(key, mtime) of every task of ``enqueued/``, first to be claimed
    first (due or not). A file, a symlink or a directory not named as a
    task is none (a claim sets it aside): a planted file's years-old mtime
    made the oldest waiting age, and alerts on it, fire."""
    keyed = []
    with os.scandir(layout.enqueued) as it:
        for entry in it:
            if split_task_name(entry.name) is None or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                mtime = _settle_future(entry.path, entry.stat(follow_symlinks=False).st_mtime_ns)
            except FileNotFoundError:
                continue
            keyed.append((read_key(layout.enqueued, entry.name, mtime), mtime))
    keyed.sort()
    return keyed


class WaitingIndex:
    """The waiting tasks in claim order: O(log n) per arrival and per claim,
    memory one key per waiting task, a status read per new or changed entry.

    *accept(name)*, when given, keeps other names out (a worker's lanes).
    """

    def __init__(self, layout: Layout, *, accept: Callable[[str], bool] | None = None) -> None:
        self.layout = layout
        self.accept = accept
        self._ready: list[WaitKey] = []  # due: by key
        self._later: list[tuple[int, WaitKey]] = []  # due later: by due time
        self._keys: dict[str, tuple[WaitKey, int]] = {}  # name -> (its current key, the mtime read with it)
        self._pass_seen: set[str] | None = None  # during a rescan pass: the names it must keep
        self.popped: tuple[WaitKey, int] | None = None  # (key, mtime) of the name pop() returned last
        self.complete = False
        """True once a rescan has covered the whole directory: until then the
        index may lack tasks that should be claimed before those it holds."""

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, name: str) -> bool:
        return name in self._keys

    def add(self, name: str) -> None:
        """Index entry *name* (an arrival); nothing if it is gone, not
        accepted, or known as it is."""
        if self.accept is not None and not self.accept(name):
            return
        mtime = _mtime(self.layout.enqueued, name)
        if mtime is None:
            return
        known = self._keys.get(name)
        if known is None or known[1] != mtime:
            self._push(read_key(self.layout.enqueued, name, mtime), mtime)

    def _push(self, key: WaitKey, mtime: int) -> None:
        self._keys[key[-1]] = (key, mtime)
        if self._pass_seen is not None:
            self._pass_seen.add(key[-1])
        self._file(key, time.time_ns())

    def _file(self, key: WaitKey, now: int) -> None:
        """Put *key* on its heap: the due ones, or the ones due later."""
        if due(key, now):
            heapq.heappush(self._ready, key)
        else:
            heapq.heappush(self._later, (key[1], key))

    def rescan(self) -> None:
        """Rebuild from the directory itself: the safety net for lost events.
        An entry known with the same mtime keeps its key (no status read)."""
        for _ in self.rescan_steps():
            pass

    def rescan_steps(self) -> Iterator[None]:
        """:meth:`rescan` one entry of ``enqueued/`` at a time, so that a
        caller may spread a pass over a huge queue across its other duties
        (a pass costs an ``lstat`` per entry, and a status read per entry not
        known yet: seconds for a few hundred thousand, more with a cold
        cache). What the pass finds goes into the index as it is found, and
        arrivals meanwhile (:meth:`add`) too; when the pass ends, names it
        did not find and nobody added meanwhile (gone) are dropped, and the
        index is :attr:`complete`. A pass dropped midway (``close()``) keeps
        what it found and drops nothing. One pass at a time."""
        self._pass_seen = seen = set()
        try:
            with os.scandir(self.layout.enqueued) as it:
                for entry in it:
                    yield
                    if self.accept is not None and not self.accept(entry.name):
                        continue
                    try:
                        mtime = _settle_future(entry.path, entry.stat(follow_symlinks=False).st_mtime_ns)
                    except FileNotFoundError:
                        continue
                    seen.add(entry.name)
                    known = self._keys.get(entry.name)
                    if known is None or known[1] != mtime:
                        self._push(read_key(self.layout.enqueued, entry.name, mtime), mtime)
            # The heaps are rebuilt from what is left: superseded and gone keys go too.
            self._keys = {name: known for name, known in self._keys.items() if name in seen}
            now = time.time_ns()
            self._ready, self._later = [], []
            for key, _ in self._keys.values():
                self._file(key, now)
            self.complete = True
        finally:
            self._pass_seen = None

    def _mature(self) -> None:
        """Move the tasks whose due time has come to the ready heap."""
        now = time.time_ns()
        while self._later and self._later[0][0] <= now:
            _, key = heapq.heappop(self._later)
            if self._keys.get(key[-1], (None,))[0] == key:
                heapq.heappush(self._ready, key)

    def next_due(self) -> float | None:
        """Seconds since the epoch when the next task that is not due yet
        will be (None: there is none): the daemon sleeps until then."""
        while self._later and self._keys.get(self._later[0][1][-1], (None,))[0] != self._later[0][1]:
            heapq.heappop(self._later)  # superseded
        return self._later[0][0] / 1e9 if self._later else None

    def pop(self) -> str | None:
        """The name of the first waiting task that is due, removed from the
        index; None when none is. A name whose entry is gone is skipped; one
        re-enqueued since it was indexed (a new mtime) goes back in at its
        new place."""
        self._mature()
        while self._ready:
            key = heapq.heappop(self._ready)
            name = key[-1]
            known = self._keys.get(name)
            if known is None or known[0] != key:
                continue  # superseded by a newer key for the same name
            del self._keys[name]
            mtime = _mtime(self.layout.enqueued, name)
            if mtime is None:
                continue
            if mtime != known[1]:
                self._push(read_key(self.layout.enqueued, name, mtime), mtime)
                continue
            self.popped = known
            return name
        return None

    def put_back(self, name: str, entry: tuple[WaitKey, int] | None) -> None:
        """Index *name* again with the (key, mtime) :attr:`popped` gave for
        it, without looking at it again (a claim looks anyway): a gate that
        opens on thousands of tasks (a type released) gives them back at
        once, not an lstat each (3 s for 77,000). None: as :meth:`add`."""
        if entry is None:
            self.add(name)
        elif name not in self._keys:
            self._push(*entry)
