"""Low-level filesystem steps with the crash-safety rules they rely on.

Every function here works relative to directory file descriptors and never
follows a symlink at the last path component (``O_NOFOLLOW``), because a spool
that a producer can write must not let it redirect the worker elsewhere.

A spool is shared by the users of its group (producers, workers), so what
one of them creates the others must be able to use, whatever its umask:
:func:`share_with_group` gives new files and task directories group
read/write. Only a file's owner may set explicit times on it, so
:func:`set_mtime` falls back to "now" (which anyone who can write the file
may set) when the caller is not the owner.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import threading
from collections.abc import Callable

from ..faults import crashpoint

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted under a task file's name must not hang the
# opener (it is then refused by _check_regular); no effect on regular files.
_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_O_APPEND = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _renameat2 = _libc.renameat2
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    _renameat2.restype = ctypes.c_int
except (OSError, AttributeError):  # pragma: no cover - non-glibc
    _renameat2 = None


READ_LIMIT = 16 << 20  # metadata files (status, types, settings) are small; refuse a huge one


def _process_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once: the umask is per process and spoolq never changes it.
_GROUP_MASKED = bool(_process_umask() & 0o060)


def share_with_group(fd: int, *, directory: bool = False) -> None:
    """Give the group read and write (and search, for a directory) on the
    file open as *fd*, which this process just created, when the umask took
    them away. The setgid bit of a directory is kept (it is already there,
    from the parent, so it is not asked for: a sandbox that forbids setting
    it, RestrictSUIDSGID, is then never hit)."""
    if not _GROUP_MASKED:
        return
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    want = mode | (0o070 if directory else 0o060)
    if want != mode:
        os.fchmod(fd, want)


def lock_taken(fd: int, *, exclusive: bool) -> bool:
    """Whether another open file holds a flock on *fd*'s file that a lock of
    this kind would conflict with: probed by taking one without waiting. The
    caller closes *fd*, which drops the probe's lock."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True


def set_mtime(fd: int, ns: int | None) -> None:
    """Set the access and modification times of *fd* to *ns* (None: now).
    An explicit time is only allowed to the owner; anyone else who can write
    the file gets "now" instead, which is what a move stamps anyway."""
    if ns is not None:
        try:
            os.utime(fd, ns=(ns, ns))
            return
        except PermissionError:
            pass  # not the owner (EPERM): "now" is allowed to whoever may write
    os.utime(fd)


try:
    _syncfs = _libc.syncfs
    _syncfs.argtypes = [ctypes.c_int]
    _syncfs.restype = ctypes.c_int
except (NameError, AttributeError):  # pragma: no cover - non-glibc
    _syncfs = None


def syncfs(path: str) -> bool:
    """Make everything written to the filesystem holding *path* durable, in
    one call (the group-commit barrier). False where syncfs(2) is missing
    or failed: the caller then syncs file by file."""
    if _syncfs is None:
        return False
    fd = os.open(path, _O_DIR)
    try:
        return _syncfs(fd) == 0
    finally:
        os.close(fd)


def open_dir(path: str, *, dir_fd: int | None = None) -> int:
    """Open a directory (never a symlink to one) and return its descriptor."""
    return os.open(path, _O_DIR, dir_fd=dir_fd)


def fsync_dir(path: str) -> None:
    """Make the entries of directory *path* durable (rename, mkdir, unlink)."""
    fd = os.open(path, _O_DIR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rename_noreplace(src: str, dst: str) -> None:
    """Rename *src* to *dst*, failing with EEXIST if *dst* exists.

    Plain rename(2) silently replaces an *empty* target directory; renameat2
    with RENAME_NOREPLACE makes "the first rename wins" hold for directories
    too. Falls back to rename(2) where the kernel or filesystem lacks it:
    task directories are never empty, so there the target still cannot be
    silently replaced (the rename fails with ENOTEMPTY instead).
    """
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), src, None, dst)
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


def staging_name(name: str) -> str:
    """A fresh name to write file *name* under, in its own directory, before
    the rename that publishes it: hidden (a leading dot), and this writer's
    alone (pid and random), so writers that race never share one."""
    return f".{name}.{os.getpid()}.{os.urandom(4).hex()}"


def is_staging(entry: str, name: str) -> bool:
    """Whether *entry* is a :func:`staging_name` of file *name*."""
    return entry.startswith(f".{name}.")


def write_new(dir_fd: int, name: str, data: bytes, *, sync: bool,
              attribute: tuple[str, bytes] | None = None, owner: tuple[int, int] | None = None) -> bool:
    """Create file *name* in *dir_fd* (it must not exist) holding *data*.

    With *sync*, the data is fsynced before returning; the directory entry is
    the caller's to sync (one directory fsync covers several new files).
    With *attribute* (an extended attribute's name and value), it is set
    before the fsync, which makes it durable with the data. With *owner*
    (uid, gid), the file is given to them (root's writes for the spool's
    owner). Returns False if the filesystem would not keep the attribute
    (the file is written all the same), else True.
    """
    fd = os.open(name, _O_NEW, 0o660, dir_fd=dir_fd)
    kept = True
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        if _GROUP_MASKED:
            # Just created by this process, 0660 less the umask: no need
            # to read the mode (share_with_group) to know what to set.
            os.fchmod(fd, 0o660)
        _write_all(fd, data)
        crashpoint("file.written")  # written, not yet fsynced
        if attribute is not None:
            try:
                crashpoint("file.attribute")
                os.setxattr(fd, attribute[0], attribute[1])
            except OSError:  # ENOTSUP (no user attributes here), EDQUOT, EIO: the caller's fallback
                kept = False
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return kept


def attribute_of(dir_fd: int, name: str, attribute: str) -> bytes | None:
    """Extended attribute *attribute* of file *name* in *dir_fd* (never
    through a symlink); None if the file or the attribute is not there."""
    try:
        fd = os.open(name, _O_READ, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        return read_attribute(fd, attribute)
    finally:
        os.close(fd)


def read_attribute(fd: int, name: str) -> bytes | None:
    """Extended attribute *name* of open file *fd*; None if it has none (or
    the filesystem keeps none)."""
    try:
        return os.getxattr(fd, name)
    except OSError:
        return None


def replace_file(dir_fd: int, name: str, data: bytes, *, sync: bool,
                 attribute: tuple[str, bytes] | None = None) -> bool:
    """Replace file *name* in *dir_fd* atomically (tmp + fsync + rename).

    Readers see the old or the new content, never a torn file; an
    *attribute* set on the new file is published with it (what
    :func:`write_new` returns). The rename is made durable by the caller's
    fsync of the directory.
    """
    tmp = name + ".tmp"
    try:
        kept = write_new_replacing(dir_fd, tmp, data, sync=sync, attribute=attribute)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except Exception:
        # A full disk, a file size limit: no half-written tmp left behind
        # for fsck to report (a crash leaves one, which fsck settles).
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    return kept


def write_new_replacing(dir_fd: int, name: str, data: bytes, *, sync: bool,
                        attribute: tuple[str, bytes] | None = None) -> bool:
    """Like :func:`write_new`, removing a leftover *name* from a crash
    first (only when there is one: the exclusive create says so)."""
    try:
        return write_new(dir_fd, name, data, sync=sync, attribute=attribute)
    except FileExistsError:
        os.unlink(name, dir_fd=dir_fd)
        return write_new(dir_fd, name, data, sync=sync, attribute=attribute)


def append(dir_fd: int, name: str, data: bytes, *, sync: bool) -> None:
    """Append *data* to *name* with O_APPEND in one write (one log record)."""
    fd = os.open(name, _O_APPEND, dir_fd=dir_fd)
    try:
        _check_regular(fd, name)
        _write_all(fd, data)
        crashpoint("file.appended")  # appended, not yet fdatasynced
        if sync:
            os.fdatasync(fd)
    finally:
        os.close(fd)


def read_file(dir_fd: int | None, name: str, *, limit: int = READ_LIMIT) -> bytes:
    """Whole content of *name* in *dir_fd* (None: a path); never follows a
    symlink, never blocks on a FIFO, refuses anything but a regular file and
    anything over *limit* bytes (EFBIG)."""
    fd = os.open(name, _O_READ, dir_fd=dir_fd)
    try:
        return _read_open(fd, name, limit)
    finally:
        os.close(fd)


def read_with_attribute(dir_fd: int, name: str, attribute: str, *,
                        limit: int = READ_LIMIT) -> tuple[bytes, bytes | None]:
    """What :func:`read_file` reads, and the file's extended attribute
    *attribute* (None if it has none), through one open: a file and an
    attribute replaced together are read together."""
    fd = os.open(name, _O_READ, dir_fd=dir_fd)
    try:
        return _read_open(fd, name, limit), read_attribute(fd, attribute)
    finally:
        os.close(fd)


def _read_open(fd: int, name: str, limit: int) -> bytes:
    size = _check_regular(fd, name)
    if size <= limit:
        # One read for the common case: as many bytes as fstat said,
        # asked one more, means the whole file (a file that grew or
        # shrank meanwhile is read on to its end as below).
        first = os.read(fd, size + 1)
        if len(first) == size:
            return first
        if len(first) > limit:
            raise OSError(errno.EFBIG, f"more than {limit} bytes", name)
        return first + read_limited(fd, limit - len(first), name)
    return read_limited(fd, limit, name)


def read_limited(fd: int, limit: int, name: str = "input") -> bytes:
    """Everything readable from *fd*, or EFBIG once more than *limit* bytes
    came (reading stops there: a device or pipe that never ends is fine)."""
    chunks = []
    size = 0
    while True:
        chunk = os.read(fd, min(1 << 20, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise OSError(errno.EFBIG, f"more than {limit} bytes", name)


def _check_regular(fd: int, name: str) -> int:
    """Refuse anything but a regular file (a FIFO, device or directory
    planted under a task file's name) with EINVAL; its size."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "not a regular file", name)
    return st.st_size


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


# Descriptors that carry a short-lived flock (the enqueue lock, task locks)
# while some thread holds it. A process forked meanwhile would share those
# locks for as long as it lived, so the child closes its copies at once
# (closing a copy never releases the parent's lock). A descriptor is opened
# and recorded, and forgotten and closed, under the guard, which a fork
# takes first: no child can inherit one that is open but not recorded (a
# child forked in that window kept the parent's enqueue lock for good, and
# every enqueue of both waited on it forever).
_held_fds: set[int] = set()
_held_guard = threading.Lock()


def open_lock_fd(opener: Callable[[], int]) -> int:
    """``opener()``, a descriptor that is to carry a flock, recorded as such
    before any fork can copy it."""
    with _held_guard:
        fd = opener()
        _held_fds.add(fd)
    return fd


def close_lock_fd(fd: int) -> None:
    """Close a descriptor of :func:`open_lock_fd` (which releases its flock)."""
    with _held_guard:
        _held_fds.discard(fd)
        os.close(fd)


def _close_inherited_locks() -> None:
    global _held_guard
    _held_guard = threading.Lock()  # held by the fork itself (before it)
    for fd in list(_held_fds):
        try:
            os.close(fd)
        except OSError:
            pass
    _held_fds.clear()


def _fork_done_in_parent() -> None:
    _held_guard.release()


os.register_at_fork(before=lambda: _held_guard.acquire(), after_in_parent=_fork_done_in_parent,
                    after_in_child=_close_inherited_locks)


class FlockLock:
    """An exclusive ``flock`` on a lock file: the spool-wide enqueue lock.

    Each outermost acquisition opens the file (never through a symlink),
    so the lock belongs to that open file description: two processes, or a
    parent and its forked child, always exclude each other. Re-entrant within
    a thread; other threads of the process wait their turn. A child forked
    while its parent held the lock does not inherit the holding.
    Four syscalls per acquisition: open, flock, flock(UN), close.
    """

    def __init__(self, path: str, mode: int = 0o660) -> None:
        self.path = path
        self.mode = mode
        self._local = threading.local()

    def acquire(self) -> None:
        local = self._local
        if getattr(local, "pid", None) == os.getpid() and local.depth > 0:
            local.depth += 1
            return
        # Read-only: flock needs no write access. The file is made by
        # `spoolq init`; if it is made here, it is made readable by the group
        # whatever this process's umask, or other members could not lock it.
        fd = open_lock_fd(lambda: os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                                          self.mode))
        try:
            if os.fstat(fd).st_uid == os.geteuid():
                share_with_group(fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            close_lock_fd(fd)
            raise
        local.fd, local.depth, local.pid = fd, 1, os.getpid()

    def release(self) -> None:
        local = self._local
        if getattr(local, "pid", None) != os.getpid() or local.depth <= 0:
            raise RuntimeError(f"{self.path} is not held by this thread")
        local.depth -= 1
        if local.depth == 0:
            fd, local.fd = local.fd, -1
            close_lock_fd(fd)  # closing the only descriptor releases the flock

    @property
    def held(self) -> bool:
        local = self._local
        return getattr(local, "pid", None) == os.getpid() and local.depth > 0

    def __enter__(self) -> FlockLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
