"""Per-type concurrency across every server: ``locks/types/<TYPE>.<k>.lock``.

A type with ``concurrency N`` has N slot files. Running one of its tasks
takes an exclusive ``flock`` on one free slot (``LOCK_NB``, slot by slot)
and keeps it for the run, in the process that runs the handler (children
inherit it). The kernel arbitrates (two claimers never get one slot) and
drops the lock the moment the last process holding it dies: a server that
dies holding a slot gives it back at once, not after a timeout. There is
nothing to clean up and nothing to trust on disk but the lock files.
"""

from __future__ import annotations

import fcntl
import os
import time

from . import fsutil
from .layout import Layout

_O_SLOT = os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
ACQUIRE_TRIES = 3  # looks at the slots before a run is refused for want of one
PROBE_PAUSE = 0.005  # seconds between them: a probe of free() holds a slot's lock for microseconds


class TypeSlots:
    """The slot files of one spool."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.directory = layout.path("locks", "types")

    def _open(self, type_name: str, k: int) -> int:
        try:
            fd = os.open(os.path.join(self.directory, f"{type_name}.{k}.lock"), _O_SLOT, 0o660)
        except FileNotFoundError:  # the directory is made on first use
            try:
                os.mkdir(self.directory, 0o770)
                dfd = fsutil.open_dir(self.directory)
                try:
                    fsutil.share_with_group(dfd, directory=True)
                finally:
                    os.close(dfd)
            except FileExistsError:
                pass
            fd = os.open(os.path.join(self.directory, f"{type_name}.{k}.lock"), _O_SLOT, 0o660)
        if os.fstat(fd).st_uid == os.geteuid():
            fsutil.share_with_group(fd)
        return fd

    def acquire(self, type_name: str, limit: int) -> int | None:
        """Take a free slot of *type_name* (one of *limit*): its descriptor,
        to keep open while the task runs; None when all are taken.

        A worker that asks how many are :meth:`free` takes each slot's lock
        for a moment: a slot found taken is tried again after a pause
        longer than such a probe, before the run is refused for want of one."""
        for attempt in range(ACQUIRE_TRIES):
            for k in range(limit):
                fd = self._open(type_name, k)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    os.close(fd)
            if attempt + 1 < ACQUIRE_TRIES:
                time.sleep(PROBE_PAUSE)
        return None

    def free(self, type_name: str, limit: int) -> int:
        """How many of the type's *limit* slots are free right now (a hint:
        another server may take one the next moment)."""
        free = 0
        for k in range(limit):
            fd = self._open(type_name, k)
            try:
                free += not fsutil.lock_taken(fd, exclusive=True)
            finally:
                os.close(fd)
        return free
