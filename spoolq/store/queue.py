"""The order of ``enqueued/``: one index of waiting tasks, used by every claimer.

A waiting task's place in the queue is :func:`spoolq.lifecycle.wait_order_key`
of what :func:`wait_key` reads from the disk. :class:`WaitingIndex` keeps
those keys in a heap: the daemon feeds it with file events and rescans,
``Spool.claim`` with rescans alone. Keys are hints that can go stale (a task
claimed by another server, or re-enqueued to the back): :meth:`WaitingIndex.pop`
checks each key against the disk before handing a name out.
"""

from __future__ import annotations

import heapq
import os
import time

from ..lifecycle import WaitKey, wait_order_key
from .layout import Layout


FUTURE_SLACK_NS = 60 * 10**9  # how far in the future a stamp may be before the clock is suspected


def _stamp(mtime_ns: int) -> int:
    """The queue stamp of a waiting task: the directory's mtime, set when the
    task was (re-)enqueued (nothing writes into a waiting task, so it stays
    put) -- but never later than now."""
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


def wait_key(directory: str, name: str) -> WaitKey | None:
    """The wait-order key of entry *name* of ``enqueued/`` (*directory*), or
    None when it is gone."""
    mtime = _mtime(directory, name)
    return None if mtime is None else wait_order_key(_stamp(mtime), name)


def scan(layout: Layout) -> list[tuple[WaitKey, int]]:
    """(key, mtime) of every entry of ``enqueued/``, first to be claimed first."""
    keyed = []
    with os.scandir(layout.enqueued) as it:
        for entry in it:
            try:
                mtime = _settle_future(entry.path, entry.stat(follow_symlinks=False).st_mtime_ns)
            except FileNotFoundError:
                continue
            keyed.append((wait_order_key(_stamp(mtime), entry.name), mtime))
    keyed.sort()
    return keyed


class WaitingIndex:
    """A heap of the waiting tasks by wait-order key: O(log n) per arrival
    and per claim; memory one key per waiting task."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._heap: list[WaitKey] = []
        # name -> (its current key in the heap, the mtime it was read from)
        self._keys: dict[str, tuple[WaitKey, int]] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, name: str) -> bool:
        return name in self._keys

    def add(self, name: str) -> None:
        """Index entry *name* (an arrival); nothing if it is gone or known
        as it is."""
        mtime = _mtime(self.layout.enqueued, name)
        if mtime is None:
            return
        known = self._keys.get(name)
        if known is None or known[1] != mtime:
            self._push(wait_order_key(_stamp(mtime), name), mtime)

    def _push(self, key: WaitKey, mtime: int) -> None:
        self._keys[key[-1]] = (key, mtime)
        heapq.heappush(self._heap, key)

    def rescan(self) -> None:
        """Rebuild from the directory itself: the safety net for lost events."""
        found = scan(self.layout)
        self._heap = [key for key, _ in found]  # sorted, so already a heap
        self._keys = {key[-1]: (key, mtime) for key, mtime in found}

    def pop(self) -> str | None:
        """The name of the first waiting task, removed from the index; None
        when the index is empty. A name whose entry is gone is skipped; one
        re-enqueued since it was indexed (a new mtime) goes back in at its
        new place."""
        while self._heap:
            key = heapq.heappop(self._heap)
            name = key[-1]
            known = self._keys.get(name)
            if known is None or known[0] != key:
                continue  # superseded by a newer key for the same name
            del self._keys[name]
            mtime = _mtime(self.layout.enqueued, name)
            if mtime is None:
                continue
            if mtime != known[1]:
                self._push(wait_order_key(_stamp(mtime), name), mtime)
                continue
            return name
        return None
