"""One task directory, opened and locked for a change.

:class:`TaskDir` opens the directory (never through a symlink), takes an
exclusive ``flock`` on it, finishes or undoes a status change a crash left
half done, and reads ``status.json``. The lock is held on the inode, so it
travels with the directory across renames and the holder may move it. After
the lock, the path is checked to still name the locked inode (:class:`Moved`
otherwise): a waiter overtaken by a move notices it.

Crash-safety rules of a status change (:meth:`TaskDir.write`):

* ``status.json`` is replaced whole (tmp + rename), never rewritten in place;
* the order is status tmp (fsynced) → log record (fdatasynced) → rename of
  the status into place → fsync of the directory, so a crash leaves either
  no record and the old status, or a record and a tmp that the next locker
  puts in place (:func:`roll_forward`);
* ``log`` is appended with O_APPEND, one record per write.

A handle takes the clock and the durability setting, not the spool: it is
the mechanism, the spool decides what to write.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from ..errors import CorruptTask
from ..faults import crashpoint
from ..lifecycle import Place, State, as_claimed, claimed_by_move
from . import codec, fsutil
from .codec import LOG, RESPONSE, RESPONSE_MIME_ATTRIBUTE, STATUS

UNLIMITED = 1 << 62  # logs and responses have no size limit of their own


class Moved(Exception):
    """The path no longer names the task directory that was locked."""


class LockBusy(Exception):
    """The task's lock was not free within the wait asked for: some process
    holds it for long (stuck, or stopped)."""


# --------------------------------------------------------------------------- the run lock
#
# While a handler runs, the process that runs it holds a shared flock on the
# task's log (the "run lock"), and whatever that process forks inherits it.
# The kernel drops it when the last of them is gone. So "can the run lock be
# taken exclusively?" answers "is any process of this run still alive?",
# exactly and at once, whatever happened to the worker that started the
# run. A task is never taken from its run while the answer is no
# (Spool.take_away), so it never runs twice at once. A shared lock, so the
# holder's children keep it; a different inode from the task directory's
# own lock, so status changes are not blocked by it.

_O_RUNLOCK = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def hold_run_lock(dfd: int) -> int:
    """Take the run lock of the task open as *dfd*; the descriptor to keep
    open for the run (closing it, and the exit of every process that
    inherited it, releases the lock). BlockingIOError if another run holds
    it exclusively (a take-away is deciding about it right now)."""
    fd = os.open(LOG, _O_RUNLOCK, dir_fd=dfd)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def run_alive(dfd: int) -> bool:
    """Whether some process still holds the run lock of the task open as *dfd*."""
    try:
        fd = os.open(LOG, _O_RUNLOCK, dir_fd=dfd)
    except FileNotFoundError:
        return False
    try:
        return fsutil.lock_taken(fd, exclusive=True)
    finally:
        os.close(fd)  # releases the probe's lock


def run_lock_holders(path: str) -> list[int]:
    """Pids of the processes (that this process may inspect) with a
    descriptor open on the log of the task directory *path*: the leftovers
    of a run, when its worker is gone."""
    try:
        target = os.stat(os.path.join(path, LOG), follow_symlinks=False)
    except OSError:
        return []
    me = os.getpid()
    holders = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        fd_dir = f"/proc/{entry}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                holders.append(int(entry))
                break
    return holders


def read_status(dfd: int, path: str, *, claimed_in: str | None = None) -> dict[str, Any]:
    """The status document of the task directory open as *dfd* (at *path*,
    for messages); CorruptTask when it is missing or cannot be trusted.
    *claimed_in*: the server when the directory is in ``scheduled/<server>/``,
    where a claim made by its move alone reads as recorded."""
    return read_status_and_claim(dfd, path, claimed_in=claimed_in)[0]


def read_status_and_claim(
    dfd: int, path: str, *, claimed_in: str | None, st: os.stat_result | None = None,
) -> tuple[dict[str, Any], float | None]:
    """:func:`read_status`, and the time of the claim made by its move alone
    that the document shows as recorded (None when there is none). *st*:
    the directory's stat, if the caller has it."""
    try:
        raw = fsutil.read_file(dfd, STATUS)
    except FileNotFoundError:
        raise CorruptTask(path, f"{path} has no status.json") from None
    except OSError as exc:
        raise CorruptTask(path, f"{path}/status.json cannot be read: {exc}") from None
    doc = codec.decode_status(raw, path)
    if claimed_in is None or not claimed_by_move(Place.SCHEDULED, codec.state_of(doc)):
        return doc, None
    when = claim_time(st if st is not None else os.fstat(dfd))
    return as_claimed(doc, claimed_in, codec.iso(when)), when


def claim_time(st: os.stat_result) -> float:
    """When the task whose directory's stat is *st*, in ``scheduled/`` and
    claimed by its move alone, was claimed: the claim stamps the directory's
    mtime (a rename keeps it; in ``enqueued/`` it was the queue stamp), and nothing inside
    the directory changes before the claim is recorded (a crash's leftover
    removed meanwhile only makes it later: a timeout counted from it never
    fires early)."""
    return st.st_mtime


def peek_status(path: str, *, claimed_in: str | None = None) -> dict[str, Any]:
    """``status.json`` of the task directory *path*, read without its lock
    (the file is only ever replaced whole), as :func:`read_status` gives it.
    Raises OSError when the directory cannot be opened (gone, not a
    directory) and CorruptTask when the status cannot be trusted."""
    dfd = fsutil.open_dir(path)
    try:
        return read_status(dfd, path, claimed_in=claimed_in)
    finally:
        os.close(dfd)


def response_mime(dfd: int) -> str | None:
    """The MIME type stored with the response of the task open as *dfd*;
    None if it has no response, or one stored where the filesystem keeps no
    extended attributes (its type is then in the status)."""
    return _mime_of(fsutil.attribute_of(dfd, RESPONSE, RESPONSE_MIME_ATTRIBUTE))


def read_response(dfd: int) -> tuple[bytes, str | None]:
    """The response of the task open as *dfd* and the MIME type stored with
    it (None as for :func:`response_mime`), read through one open: a response
    replaced meanwhile is read whole with its own type. FileNotFoundError if
    the task has no response."""
    data, value = fsutil.read_with_attribute(dfd, RESPONSE, RESPONSE_MIME_ATTRIBUTE, limit=UNLIMITED)
    return data, _mime_of(value)


def _mime_of(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


def open_task_dir(path: str) -> int:
    """Open the task directory *path*; CorruptTask if it is a symlink or a file."""
    try:
        return fsutil.open_dir(path)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise CorruptTask(path, f"{path} is not a task directory (symlink or file)") from None
        raise


def roll_forward(dfd: int, *, durable: bool) -> None:
    """Finish or undo a status change a crash interrupted (caller holds the
    task's lock).

    A status change writes ``status.json.tmp``, then its log record, then
    renames the status into place. A leftover tmp whose time and state match
    the last log record was logged, so it is put in place; any other
    leftover never happened and is removed.
    """
    try:
        raw = fsutil.read_file(dfd, STATUS + ".tmp")
    except FileNotFoundError:
        return
    try:
        pending = json.loads(raw)
        records = list(codec.parse_log(fsutil.read_file(dfd, LOG, limit=UNLIMITED)))
        last = records[-1] if records else None
        logged = (
            last is not None
            and last.time == datetime.fromisoformat(pending.get("updated_at"))
            and last.state.name == pending.get("state")
        )
    except (ValueError, OSError, AttributeError, TypeError, RecursionError):  # any junk: not logged
        logged = False
    if logged:
        os.rename(STATUS + ".tmp", STATUS, src_dir_fd=dfd, dst_dir_fd=dfd)
    else:
        os.unlink(STATUS + ".tmp", dir_fd=dfd)
    if durable:
        os.fsync(dfd)


def _lock(fd: int, wait: float | None) -> None:
    if wait is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise LockBusy() from None
            time.sleep(0.005)


class TaskDir:
    """A task directory, locked for a change: a context manager.

    ``doc`` is its status document, read under the lock; ``state`` its state.
    Closing the handle releases the lock.

    *claimed_in* (the server, for a directory in ``scheduled/<server>/``, and
    *queue_dir*, ``enqueued/``) makes a claim made by its move alone read as
    recorded (``doc`` says SCHEDULED; ``unrecorded_claim`` is its time). The
    first change through the handle then records it: before anything else is
    made durable, the claim's move is (:meth:`_claim_move_durable`: a state
    written for the new place must not outlive a lost move), and the next
    log append starts with the claim's SCHEDULED record.
    """

    def __init__(self, path: str, *, clock: Callable[[], float], durable: bool, wait: float | None = None,
                 claimed_in: str | None = None, queue_dir: str | None = None) -> None:
        self.path = path
        self.clock = clock
        self.durable = durable
        self.wait = wait  # seconds to wait for the lock (None: as long as it takes)
        self.claimed_in = claimed_in
        self.queue_dir = queue_dir
        self.fd = -1
        self.doc: dict[str, Any] = {}
        self.unrecorded_claim: float | None = None
        self._claim_move_synced = False

    def __enter__(self) -> TaskDir:
        if self.fd < 0:  # not opened yet (a handle may be opened before the with)
            self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Open, lock, roll forward and read. Raises FileNotFoundError or
        NotADirectoryError if nothing is there, Moved if the directory moved
        while the lock was awaited, LockBusy if the lock stayed taken past
        the handle's wait, CorruptTask if it cannot be trusted."""
        self.fd = fsutil.open_lock_fd(lambda: open_task_dir(self.path))
        try:
            _lock(self.fd, self.wait)
            st = os.fstat(self.fd)
            try:
                now = os.lstat(self.path)
            except FileNotFoundError:
                raise Moved() from None
            if (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
                raise Moved()
            roll_forward(self.fd, durable=self.durable)
            self.doc, self.unrecorded_claim = read_status_and_claim(self.fd, self.path, claimed_in=self.claimed_in,
                                                                    st=st)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.fd >= 0:
            fsutil.close_lock_fd(self.fd)  # closing releases the flock
            self.fd = -1

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def state(self) -> State:
        return codec.state_of(self.doc)

    def read(self, filename: str, *, limit: int = fsutil.READ_LIMIT) -> bytes:
        """Content of one of the task's files (never through a symlink);
        EFBIG past *limit* bytes."""
        return fsutil.read_file(self.fd, filename, limit=limit)

    def write(self, state: State, message: str, *, record: bool = True, **changes: Any) -> None:
        """Set the state (and other fields), append one log record (unless
        not *record*), make both durable: status tmp (fsynced) → log record
        (fdatasynced) → rename of the status into place → fsync of the task
        directory. A claim not recorded yet gets its SCHEDULED record
        first, in the same append."""
        kept = codec.bounded(message, codec.STATUS_MESSAGE_MAX)  # (the log record keeps more)
        self._claim_move_durable()
        now = self.clock()
        claimed = self.unrecorded_claim
        if claimed is not None and not record and state is State.SCHEDULED:
            # The claim's record is this write's record: the same time and
            # state, as roll_forward requires of the last record.
            now = claimed
        self.doc.update(changes)
        self.doc["state"] = state.name
        self.doc["updated_at"] = codec.iso(now)
        self.doc["message"] = kept
        sync = self.durable
        fsutil.write_new_replacing(self.fd, STATUS + ".tmp", codec.encode_status(self.doc), sync=sync)
        crashpoint("status.tmp_written")
        if record or claimed is not None:
            lines = self._claim_record()
            if record or state is not State.SCHEDULED:
                lines += codec.log_line(now, state, message)
            self._append(lines)
            crashpoint("status.logged")
        os.rename(STATUS + ".tmp", STATUS, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        if sync:
            os.fsync(self.fd)
        crashpoint("status.replaced")

    def append_log(self, now: float, state: State, message: str) -> None:
        """Append one log record; CorruptTask if the log is gone or is not a
        regular file (a symlink or FIFO planted as one). Through a claim not
        recorded yet, the status is written first (that records it)."""
        if self.unrecorded_claim is not None:
            self.write(self.state, "", record=False)
        self._append(codec.log_line(now, state, message))

    def _append(self, lines: bytes) -> None:
        try:
            fsutil.append(self.fd, LOG, lines, sync=self.durable)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ELOOP, errno.EINVAL, errno.ENXIO):
                raise
            raise CorruptTask(self.path, f"{self.path}/log cannot be appended to: {exc.strerror}") from None

    def _claim_record(self) -> bytes:
        """The SCHEDULED log record of a claim made by its move alone (once),
        dated at the move; empty when there is none to record."""
        if self.unrecorded_claim is None:
            return b""
        when, self.unrecorded_claim = self.unrecorded_claim, None
        return codec.log_line(when, State.SCHEDULED, "")

    def _claim_move_durable(self, *, moving_on: bool = False) -> None:
        """A claim made by its move alone fsynced neither parent of that
        move: they are, before anything that records the claim or moves the
        task on is made durable (else a power cut could keep the task both in
        ``enqueued/`` and where it went next). When the task is *moving_on*,
        its ``scheduled/`` directory is the source of that move, which
        fsyncs it anyway: only ``enqueued/`` first."""
        if self.unrecorded_claim is None or not self.durable or self.queue_dir is None or self._claim_move_synced:
            return
        fsutil.fsync_dir(self.queue_dir)
        if not moving_on:
            fsutil.fsync_dir(os.path.dirname(self.path))
        self._claim_move_synced = True

    def replace_file(self, filename: str, data: bytes) -> None:
        """Replace one of the task's files atomically (tmp + rename)."""
        fsutil.replace_file(self.fd, filename, data, sync=self.durable)

    def store_response(self, data: bytes, mime_type: str) -> bool:
        """Replace ``response`` atomically, its MIME type an extended
        attribute of the new file: one rename publishes both, and the status
        is not rewritten (a final status copies the type: :func:`response_mime`).
        Durable: the claim's move first (if not yet), the file with its
        attribute fsynced before the rename, the directory after it. False
        if the filesystem keeps no such attribute: the response is stored,
        and the caller writes its type into the status instead (whose write
        then makes the rename durable). False too through a claim not
        recorded yet: the first write through a claim records it, and this
        one writes no status."""
        self._claim_move_durable()
        typed = fsutil.replace_file(self.fd, RESPONSE, data, sync=self.durable,
                                    attribute=(RESPONSE_MIME_ATTRIBUTE, mime_type.encode("utf-8", "replace")))
        if not typed or self.unrecorded_claim is not None:
            return False
        if self.durable:
            os.fsync(self.fd)
        return True

    def move(self, dest: str, *, mtime_ns: int | None = None) -> None:
        """Rename the locked directory to *dest* and make the move durable
        (both parents fsynced). *mtime_ns* is set first: the queue stamp in
        enqueued/, the finishing time in done/ (rename keeps a directory's
        mtime)."""
        self._claim_move_durable(moving_on=True)
        if mtime_ns is not None:
            fsutil.set_mtime(self.fd, mtime_ns)
        src_parent = os.path.dirname(self.path)
        fsutil.rename_noreplace(self.path, dest)
        crashpoint("move.renamed")
        self.path = dest
        if self.durable:
            fsutil.fsync_dir(src_parent)
            fsutil.fsync_dir(os.path.dirname(dest))
