"""Wake-ups from file events: a directory watch that feeds a select() loop.

:class:`DirWatcher` watches one directory (not recursively) with watchdog
(inotify on Linux) and turns every entry created in it or moved into it into
(a) the entry's name on a queue and (b) a byte on a pipe whose read end a
``select()`` loop waits on. Events are hints, never the truth: inotify drops
events when its queue overflows and watchdog does not report it, so callers
also rescan the directory now and then. With ``poll=True`` (filesystems
without inotify, e.g. NFS) no watch is set up at all and the caller's rescan
is the only source.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque

from watchdog.events import FileSystemEvent, FileSystemEventHandler

log = logging.getLogger("spoolq.watch")


class _Handler(FileSystemEventHandler):
    """Reports entries created in, or moved into, the watched directory. An
    unmatched move into it (``mv`` from elsewhere) arrives as "created"."""

    def __init__(self, watcher: DirWatcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type == "moved":
            path = os.fsdecode(event.dest_path)
        elif event.event_type == "created":
            path = os.fsdecode(event.src_path)
        else:
            return
        if os.path.dirname(path) == self.watcher.directory:
            self.watcher._arrived(os.path.basename(path))


class DirWatcher:
    """Names of entries arriving in *directory*, and an fd to wait on.

    ``fileno()`` becomes readable when something arrived; ``drain()`` returns
    the names seen since the last call (and empties the pipe). Thread-safe:
    watchdog's observer thread produces, the owner's loop consumes.
    """

    def __init__(self, directory: str, *, poll: bool = False) -> None:
        self.directory = os.path.abspath(directory)
        self._names: deque[str] = deque()
        self._lock = threading.Lock()
        self._rfd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._observer = None
        if not poll:
            from watchdog.observers import Observer

            observer = Observer()
            observer.daemon = True
            observer.schedule(_Handler(self), self.directory, recursive=False)
            try:
                observer.start()
                self._observer = observer
            except OSError as exc:
                # inotify watch or instance limits reached: rescans still work.
                log.warning("cannot watch %s (%s); relying on rescans", self.directory, exc)

    @property
    def watching(self) -> bool:
        return self._observer is not None

    def fileno(self) -> int:
        return self._rfd

    def _arrived(self, name: str) -> None:
        with self._lock:
            self._names.append(name)
        self._poke()

    def _poke(self) -> None:
        try:
            os.write(self._wfd, b"x")
        except BlockingIOError:
            pass  # the pipe is full, so the reader is woken anyway

    def drain(self) -> list[str]:
        """Names that arrived since the last call, oldest first."""
        try:
            while os.read(self._rfd, 4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            names = list(self._names)
            self._names.clear()
        return names

    def close(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
        for fd in (self._rfd, self._wfd):
            try:
                os.close(fd)
            except OSError:
                pass

    def close_in_child(self) -> None:
        """In a forked child: drop the pipe descriptors (the observer thread
        does not exist there)."""
        for fd in (self._rfd, self._wfd):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> DirWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
