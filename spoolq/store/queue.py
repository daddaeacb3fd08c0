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

from ..lifecycle import WaitKey, wait_order_key
from .layout import Layout


def wait_key(directory: str, name: str) -> WaitKey | None:
    """The wait-order key of entry *name* of ``enqueued/`` (*directory*), or
    None when it is gone. The queue stamp is the directory's mtime, set when
    the task was (re-)enqueued; nothing writes into a waiting task, so it
    stays put."""
    try:
        return wait_order_key(os.lstat(os.path.join(directory, name)).st_mtime_ns, name)
    except (FileNotFoundError, NotADirectoryError):
        return None


def scan(layout: Layout) -> list[WaitKey]:
    """The keys of every entry of ``enqueued/``, first to be claimed first."""
    keyed = []
    with os.scandir(layout.enqueued) as it:
        for entry in it:
            try:
                keyed.append(wait_order_key(entry.stat(follow_symlinks=False).st_mtime_ns, entry.name))
            except FileNotFoundError:
                continue
    keyed.sort()
    return keyed


class WaitingIndex:
    """A heap of the waiting tasks by wait-order key: O(log n) per arrival
    and per claim; memory one key per waiting task."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._heap: list[WaitKey] = []
        self._keys: dict[str, WaitKey] = {}  # the current key of each name in the heap

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, name: str) -> bool:
        return name in self._keys

    def add(self, name: str) -> None:
        """Index entry *name* (an arrival); nothing if it is gone or known
        with the same key."""
        key = wait_key(self.layout.enqueued, name)
        if key is not None and self._keys.get(name) != key:
            self._push(key)

    def _push(self, key: WaitKey) -> None:
        self._keys[key[-1]] = key
        heapq.heappush(self._heap, key)

    def rescan(self) -> None:
        """Rebuild from the directory itself: the safety net for lost events."""
        self._heap = scan(self.layout)  # sorted, so already a heap
        self._keys = {key[-1]: key for key in self._heap}

    def pop(self) -> str | None:
        """The name of the first waiting task, removed from the index; None
        when the index is empty. A name whose entry is gone is skipped; one
        whose key changed on disk (re-enqueued) goes back in at its new place."""
        while self._heap:
            key = heapq.heappop(self._heap)
            name = key[-1]
            if self._keys.get(name) != key:
                continue  # superseded by a newer key for the same name
            del self._keys[name]
            now = wait_key(self.layout.enqueued, name)
            if now is None:
                continue
            if now != key:
                self._push(now)
                continue
            return name
        return None
