"""Wake-ups from file events: an inotify watch that a select() loop waits on.

:class:`DirWatcher` watches one directory for entries created in it or moved
into it (``IN_CREATE | IN_MOVED_TO``) and hands their names to the caller. Its
``fileno()`` is the inotify descriptor itself, so the daemon's ``select()``
wakes straight from the kernel: no thread, no pipe.

The daemon watches ``enqueued/`` with it, ``spoolq wait`` watches ``done/``.
Why not the watchdog package, the starting choice: watchdog pairs
IN_MOVED_FROM with IN_MOVED_TO by holding every IN_MOVED_FROM for 0.5 s, and
events behind it wait too (watchdog issue #649). Every claim renames a task
*out of* ``enqueued/``, so under watchdog each claim delayed the next arrival
by up to half a second: wake-up latency was a steady 300 ms with watchdog,
against 4.3 ms p50 / 8.3 ms p95 with this watch (bench/wakeup.py, the figure
README's performance table gives). watchdog also drops IN_Q_OVERFLOW silently
(issue #654); this watch reports it so the caller rescans.

Events are hints, never the truth: callers still rescan the directory now and
then. With ``poll=True`` (filesystems without inotify, e.g. NFS), or when the
kernel refuses a watch (``fs.inotify.max_user_watches``/``max_user_instances``
reached), no watch is set up and the caller's rescans are the only source.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import struct
from typing import Iterator, Self

log = logging.getLogger("spoolq.watch")

IN_ATTRIB = 0x00000004
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len (struct inotify_event)

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _inotify_init1 = _libc.inotify_init1
    _inotify_init1.argtypes = [ctypes.c_int]
    _inotify_add_watch = _libc.inotify_add_watch
    _inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    _inotify_rm_watch = _libc.inotify_rm_watch
    _inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
except (OSError, AttributeError):  # pragma: no cover - not Linux/glibc
    _inotify_init1 = _inotify_add_watch = _inotify_rm_watch = None


ARRIVALS = IN_CREATE | IN_MOVED_TO
DEPARTURES = IN_MOVED_FROM | IN_DELETE
IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
# What happens inside a task directory while it is followed: files written,
# created, renamed into place (status.json), and the directory itself moved
# (between state directories) or deleted.
TASK_EVENTS = IN_MODIFY | IN_CLOSE_WRITE | IN_CREATE | IN_MOVED_TO | IN_DELETE | IN_MOVE_SELF | IN_DELETE_SELF


def _raw_events(fd: int) -> Iterator[tuple[int, int, bytes]]:
    """(watch descriptor, mask, name bytes) of every event waiting on the
    inotify descriptor *fd*, read until none is left (none when *fd* is -1)."""
    while fd >= 0:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        offset = 0
        while offset + _HEADER.size <= len(data):
            wd, mask, _, length = _HEADER.unpack_from(data, offset)
            yield wd, mask, data[offset + _HEADER.size : offset + _HEADER.size + length].rstrip(b"\0")
            offset += _HEADER.size + length


def _read_events(fd: int) -> list[tuple[int, str]]:
    """(mask, name) of every event waiting on the inotify descriptor *fd*
    (none when *fd* is -1: no watch)."""
    return [(mask, os.fsdecode(raw)) for _, mask, raw in _raw_events(fd)]


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class _Watch:
    """One inotify descriptor to wait on, or, where no watch could be set, the
    read end of a pipe nobody writes (it never becomes readable), so callers
    need no special case."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._idle: tuple[int, int] | None = None if fd >= 0 else os.pipe2(os.O_CLOEXEC)

    @property
    def watching(self) -> bool:
        return self._fd >= 0

    def fileno(self) -> int:
        return self._fd if self._fd >= 0 else self._idle[0]  # type: ignore[index]

    def close(self) -> None:
        _close_all([self._fd] if self._fd >= 0 else list(self._idle or ()))
        self._fd = -1
        self._idle = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DirWatcher(_Watch):
    """Names of entries arriving in *directory* (or leaving it, with
    ``events=DEPARTURES``), and an fd to wait on.

    ``fileno()`` becomes readable when something happened; ``drain()``
    returns the names seen since the last call (oldest first). ``overflowed`` turns
    True when the kernel dropped events; the caller should rescan and call
    :meth:`clear_overflow`. Without a watch, ``fileno()`` is a descriptor
    that never becomes readable, so callers need no special case.
    """

    def __init__(self, directory: str, *, poll: bool = False, events: int = ARRIVALS) -> None:
        self.directory = os.path.abspath(directory)
        self.events = events
        self.overflowed = False
        super().__init__(-1 if poll else self._watch())

    def _watch(self, *, level: int = logging.WARNING) -> int:
        if _inotify_init1 is None:
            log.log(level, "no inotify on this system; relying on rescans of %s", self.directory)
            return -1
        fd = _inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            hint = " (raise fs.inotify.max_user_instances)" if err == errno.EMFILE else ""
            log.log(level, "cannot create an inotify instance (%s)%s; relying on rescans", os.strerror(err), hint)
            return -1
        mask = self.events | IN_ONLYDIR | IN_DONT_FOLLOW | IN_DELETE_SELF | IN_MOVE_SELF
        if _inotify_add_watch(fd, os.fsencode(self.directory), mask) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            hint = " (raise fs.inotify.max_user_watches)" if err == errno.ENOSPC else ""
            log.log(level, "cannot watch %s: %s%s; relying on rescans", self.directory, os.strerror(err), hint)
            return -1
        return fd

    def rewatch(self) -> bool:
        """Try again to set a watch the kernel refused (its limits are per
        user, and other programs may have let go since); True if one is set
        now. Quiet: the refusal was said when it happened."""
        if self._fd >= 0:
            return True
        fd = self._watch(level=logging.DEBUG)
        if fd < 0:
            return False
        _close_all(list(self._idle or ()))
        self._idle = None
        self._fd = fd
        return True

    def drain(self) -> list[str]:
        """Names that arrived since the last call, oldest first."""
        names: list[str] = []
        for mask, name in _read_events(self._fd):
            if mask & IN_Q_OVERFLOW:
                self.overflowed = True
            elif mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED):
                log.error("%s itself was removed or moved; relying on rescans", self.directory)
                self.overflowed = True
            elif name:
                names.append(name)
        return names

    def clear_overflow(self) -> None:
        self.overflowed = False


class FdWatch(_Watch):
    """An inotify watch on the directory open as *fd*, whatever it is called
    now or later: the watch is set through ``/proc/self/fd/N``, so it is on
    that very inode and follows it through every rename (a task directory
    moving between state directories). ``fileno()`` becomes readable when
    something happened in it; :meth:`drain` returns the event masks and
    names. Without inotify (or when the kernel refuses a watch) ``fileno()``
    never becomes readable and the caller's periodic re-reads carry on."""

    def __init__(self, fd: int, events: int = TASK_EVENTS) -> None:
        watch = -1
        if _inotify_init1 is not None:
            ifd = _inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
            if ifd >= 0:
                if _inotify_add_watch(ifd, os.fsencode(f"/proc/self/fd/{fd}"), events | IN_ONLYDIR) >= 0:
                    watch = ifd
                else:
                    os.close(ifd)
        super().__init__(watch)

    def drain(self) -> list[tuple[int, str]]:
        """(mask, name) of the events since the last call, oldest first."""
        return list(_read_events(self._fd))


class TaskWatches:
    """Watches on a changing set of task directories through one inotify
    descriptor: each watched directory's replaced files (``IN_MOVED_TO``:
    ``status.json`` is replaced by a rename). A watch follows its directory
    across renames (inotify watches the inode), so a task that moves from
    ``running/`` to ``done/`` stays watched until :meth:`remove`.
    ``fileno()`` is always a descriptor to wait on (one that never becomes
    readable when there is no inotify)."""

    def __init__(self, *, poll: bool = False) -> None:
        self._fd = -1 if poll or _inotify_init1 is None else _inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        self._idle = os.pipe2(os.O_CLOEXEC) if self._fd < 0 else None
        self._keys: dict[int, object] = {}  # watch descriptor -> the caller's key

    @property
    def watching(self) -> bool:
        return self._fd >= 0

    def fileno(self) -> int:
        return self._fd if self._fd >= 0 else self._idle[0]  # type: ignore[index]

    def add(self, path: str, key: object) -> bool:
        """Watch the directory *path* for *key*; False when it cannot be."""
        if self._fd < 0:
            return False
        wd = _inotify_add_watch(self._fd, os.fsencode(path), IN_MOVED_TO | IN_ONLYDIR | IN_DONT_FOLLOW)
        if wd < 0:
            return False
        self._keys[wd] = key
        return True

    def remove(self, key: object) -> None:
        for wd in [w for w, k in self._keys.items() if k == key]:
            del self._keys[wd]
            if _inotify_rm_watch is not None:
                _inotify_rm_watch(self._fd, wd)

    def drain(self) -> list[tuple[object, str]]:
        """(key, file name) of each file replaced in a watched directory
        since the last call."""
        out: list[tuple[object, str]] = []
        for wd, mask, raw in _raw_events(self._fd):
            if mask & IN_IGNORED:
                self._keys.pop(wd, None)
            elif raw and wd in self._keys:
                out.append((self._keys[wd], os.fsdecode(raw)))
        return out

    def close(self) -> None:
        for fd in [self._fd] if self._fd >= 0 else list(self._idle or ()):
            try:
                os.close(fd)
            except OSError:
                pass
        self._fd = -1
        self._idle = None
        self._keys.clear()


class ChangeWatch:
    """Whether anything happened to some directories since the last look.

    *paths* maps each directory to whether its entries count too. A change
    of a directory itself is one of its mode, owner, ACL or times
    (``IN_ATTRIB``), or it being moved or deleted; a change of its entries
    is one created, deleted, moved in or out, or changing attributes. (The
    kernel reports the attributes of a watched directory's entries whether
    asked or not; for a directory whose entries do not count they are
    ignored.) ``changed()`` is one non-blocking read of the inotify
    descriptor: True when a change (or an overflow) arrived since the
    previous call, or whenever there is no watch to ask: no inotify, a watch
    the kernel refused, or a process that inherited the descriptor through
    ``fork()`` (parent and child would read each other's events); callers
    then look every time.

    inotify does not report a filesystem mounted over a directory, so a
    change of this process's mount table counts too: the kernel flags it
    (``POLLPRI``) on an open ``/proc/self/mountinfo``, once per change.
    """

    def __init__(self, paths: dict[str, bool]) -> None:
        self.pid = os.getpid()
        self._fd = -1
        self._entries_count: dict[int, bool] = {}
        self._mounts = -1
        self._mounts_poll = select.poll()
        if _inotify_init1 is None:
            return
        fd = _inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            return
        for path, entries in paths.items():
            mask = IN_ATTRIB | IN_ONLYDIR | IN_DONT_FOLLOW | IN_DELETE_SELF | IN_MOVE_SELF
            if entries:
                mask |= ARRIVALS | DEPARTURES
            wd = _inotify_add_watch(fd, os.fsencode(path), mask)
            if wd < 0:
                os.close(fd)
                return
            self._entries_count[wd] = entries
        try:
            self._mounts = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(fd)
            return
        self._mounts_poll.register(self._mounts, select.POLLPRI)
        self._fd = fd

    @property
    def watching(self) -> bool:
        return self._fd >= 0 and self.pid == os.getpid()

    def changed(self) -> bool:
        if not self.watching:
            return True
        changed = bool(self._mounts_poll.poll(0))
        for wd, mask, raw in _raw_events(self._fd):  # all of them: what is left would count next time
            if mask & IN_Q_OVERFLOW or not raw or self._entries_count.get(wd, True):
                changed = True
        return changed

    def close(self) -> None:
        _close_all([fd for fd in (self._fd, self._mounts) if fd >= 0])
        self._fd = self._mounts = -1
