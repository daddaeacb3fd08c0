"""Capturing a handler's output into its task directory (contract §12.1).

A handler process (a fork slot) runs many tasks, so for each run
:class:`Capture` points fds 1 and 2 at the write end of a pipe, and puts
them back when the handler returns. Whatever the handler writes, and
whatever its subprocesses write (they inherit fds 1 and 2), goes through
that pipe. A thread of the handler process moves it into the task's files
with ``splice(2)``: the kernel moves the pages from the pipe into the page
cache of the file, and no byte passes through Python or through the daemon.

* The first ``head`` bytes (half the type's ``max_output_bytes``) go into
  ``output``, created when the first byte comes (a run that prints nothing
  leaves no file).
* The rest goes into numbered parts ``output.tail.K`` of ``seg`` bytes
  each; when a part is full the next one is started and the one before the
  previous is unlinked, so at most ``2*seg`` bytes of tail are on disk and
  the latest ``seg`` bytes are always there.
* When the run ends the parts are unlinked (while their descriptors are
  still open), then the marker line and the latest ``seg`` bytes are
  appended to ``output`` with ``copy_file_range(2)``, again in the kernel.

So memory stays flat whatever the handler prints, and ``output`` ends at
most ``max_output_bytes`` plus one marker line long. A handler killed
mid-run leaves ``output`` and its parts, which the read side puts together
(:func:`spoolq.store.output.compose`). The output is not durable state:
nothing is fsynced.

Caveats (docs/design.md, "Output"): bytes a handler leaves in its own
buffers when it is killed are lost (as on a terminal); a process the handler
leaves behind that still writes after the run is over gets EPIPE; output
written to other descriptors (a log file of its own) is not captured.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import queue
import select
import sys
import termios
import threading
from collections.abc import Callable

from ..faults import crashpoint
from ..store import fsutil
from ..store.output import OUTPUT, budgets, marker, part_name, tail_plan

CHUNK = 1 << 20  # most bytes one splice call moves
PIPE_SIZE = 1 << 20  # the pipe's buffer (F_SETPIPE_SZ), so a writer rarely waits for the mover
_F_SETPIPE_SZ = 1031
_O_OUT = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC  # parts are read back at the end
_SPLICE = hasattr(os, "splice")


class Capture:
    """fds 1 and 2 of this process into the task open as *dfd*, capped at
    *cap* bytes, while in the ``with`` block."""

    def __init__(self, dfd: int, cap: int) -> None:
        self.dfd = dfd
        self.head, self.seg = budgets(cap)
        self.out = -1
        self.written_head = 0
        self.parts: list[tuple[int, int]] = []  # (index, fd) of the parts on disk, oldest first
        self.part_written = 0
        self._saved: list[int] = []
        self._read = self._write = self._stop_r = self._stop_w = -1
        self._moved: threading.Event | None = None  # set by the mover thread when the run's output is in
        self._splice = _SPLICE
        self.error: Exception | None = None

    # ------------------------------------------------------------------ the run's side

    def __enter__(self) -> Capture:
        try:
            self._start()
        except (OSError, RuntimeError) as exc:
            # No capture (out of descriptors or threads, disk full): the handler runs
            # with fds 1 and 2 as they were; that is no reason to fail it.
            self.error = exc
            self._undo_start()
        return self

    def _undo_start(self) -> None:
        for target, saved in zip((1, 2), self._saved):
            os.dup2(saved, target)
        for fd in (*self._saved, self._read, self._write, self._stop_r, self._stop_w, self.out):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._saved = []
        self._moved = None
        self._read = self._write = self._stop_r = self._stop_w = self.out = -1

    def _start(self) -> None:
        _flush()
        self._read, self._write = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._read, False)
        try:
            fcntl.fcntl(self._write, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # the default buffer (64 KiB) works too, with more wake-ups
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._saved = [os.dup(1), os.dup(2)]
        os.dup2(self._write, 1)
        os.dup2(self._write, 2)
        os.close(self._write)
        self._write = -1
        self._moved = threading.Event()
        _the_mover().take(self._move_all)

    def __exit__(self, *exc: object) -> None:
        if self._moved is None:
            return  # it never started
        _flush()
        for target, saved in zip((1, 2), self._saved):
            os.dup2(saved, target)
            os.close(saved)
        self._saved = []
        os.write(self._stop_w, b"x")
        self._moved.wait()
        for fd in (self._read, self._stop_r, self._stop_w):
            os.close(fd)
        try:
            self._finish()
        except OSError as exc:  # disk full: the output is not worth failing the run for
            self.error = exc
        finally:
            for _, fd in self.parts:
                os.close(fd)
            self.parts = []
            if self.out >= 0:
                os.close(self.out)
            self.out = -1

    # ------------------------------------------------------------------ the mover thread

    def _move_all(self) -> None:
        """The mover thread's work for this run; tells the run's side when done."""
        try:
            self._move()
        except Exception as exc:  # noqa: BLE001 - a bug here must not hang the run
            self.error = exc
        finally:
            assert self._moved is not None
            self._moved.set()

    def _move(self) -> None:
        try:
            while True:
                ready, _, _ = select.select([self._read, self._stop_r], [], [])
                if self._read in ready and self._pump() < 0:
                    return  # EOF: every writer is gone
                if self._stop_r in ready:
                    # The run is over: take what is in the pipe, not what a
                    # leftover process may go on writing.
                    budget = 2 * PIPE_SIZE
                    while budget > 0:
                        moved = self._pump()
                        if moved <= 0:
                            break
                        budget -= moved
                    return
        except OSError as exc:  # disk full and the like: the rest is not kept
            self.error = exc
            self._discard()

    def _pump(self) -> int:
        """Move what the pipe holds (one call's worth): the bytes moved, 0
        when it is empty, -1 at EOF (every writer is gone)."""
        if self.written_head < self.head:
            if self.out < 0:
                if not _pending(self._read):
                    return -1  # woken by the end of the run (EOF), nothing printed
                self._open_output()
            target, room = self.out, self.head - self.written_head
        else:
            if not self.parts or self.part_written >= self.seg:
                self._roll()
            target, room = self.parts[-1][1], self.seg - self.part_written
        moved = self._transfer(target, min(room, CHUNK))
        if moved <= 0:
            return moved
        if target == self.out:
            self.written_head += moved
        else:
            self.part_written += moved
        return moved

    def _transfer(self, target: int, size: int) -> int:
        """Move up to *size* bytes from the pipe to *target*: the count, 0
        when the pipe is empty, -1 at EOF."""
        if self._splice:
            try:
                moved = os.splice(self._read, target, size, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
                return moved if moved > 0 else -1
            except BlockingIOError:
                return 0
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise
                self._splice = False  # a filesystem that takes no splice: copy through a buffer
        try:
            data = os.read(self._read, min(size, 1 << 16))
        except BlockingIOError:
            return 0
        if not data:
            return -1
        view = memoryview(data)
        while view:
            view = view[os.write(target, view):]
        return len(data)

    def _open_output(self) -> None:
        """Create ``output`` when the first bytes come: most handlers print
        nothing, and a file per run would be one more inode a task."""
        self.out = os.open(OUTPUT, _O_OUT, 0o660, dir_fd=self.dfd)
        fsutil.share_with_group(self.out)

    def _roll(self) -> None:
        """Start the next part; keep only the two latest."""
        index = self.parts[-1][0] + 1 if self.parts else 0
        fd = os.open(part_name(index), _O_OUT, 0o660, dir_fd=self.dfd)
        fsutil.share_with_group(fd)
        self.parts.append((index, fd))
        self.part_written = 0
        while len(self.parts) > 2:
            old, old_fd = self.parts.pop(0)
            os.close(old_fd)
            _unlink(self.dfd, part_name(old))

    def _discard(self) -> None:
        """After an error: empty the pipe so writers never block on it."""
        try:
            os.set_blocking(self._read, False)
            while os.read(self._read, 1 << 16):
                pass
        except OSError:
            pass

    # ------------------------------------------------------------------ the end

    def _finish(self) -> None:
        """Unlink the parts, then append the marker and the latest tail to
        ``output`` (in the kernel). A crash in between leaves the head
        alone: readable, the tail lost."""
        if not self.parts:
            return
        sizes = [(index, os.fstat(fd).st_size) for index, fd in self.parts]
        fds = dict(self.parts)
        for index, _ in reversed(sizes):
            _unlink(self.dfd, part_name(index))
        crashpoint("output.parts_removed")
        pieces, skipped = tail_plan(sizes)
        os.lseek(self.out, 0, os.SEEK_END)
        if skipped:
            os.write(self.out, marker(skipped))
        for index, offset, length in pieces:
            _copy(fds[index], self.out, offset, length)


class _Mover:
    """The thread of a handler process that moves its runs' output, one run
    at a time (a process runs one handler at a time). Started at the first
    run and kept: a thread per run cost about 15 syscalls and a thread start
    a task. A child the handler forks has no such thread, so it forgets it."""

    def __init__(self) -> None:
        self._runs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="spoolq-output", daemon=True).start()

    def take(self, work: Callable[[], None]) -> None:
        """Run *work* (one run's moving, which reports its own end) next."""
        self._runs.put(work)

    def _serve(self) -> None:
        while True:
            self._runs.get()()


_mover: _Mover | None = None


def _the_mover() -> _Mover:
    global _mover
    if _mover is None:
        _mover = _Mover()
    return _mover


def _forget_mover() -> None:
    global _mover
    _mover = None


os.register_at_fork(after_in_child=_forget_mover)


def task_dir_of_run(path: str, run_lock: int) -> int | None:
    """The task directory at *path*, opened, if it is the one whose run lock
    (its ``log``) this process holds as *run_lock*; else None (the task was
    deleted or moved on since its start)."""
    try:
        dfd = fsutil.open_dir(path)
    except OSError:
        return None
    try:
        log = os.stat("log", dir_fd=dfd, follow_symlinks=False)
        held = os.fstat(run_lock)
        if (log.st_dev, log.st_ino) == (held.st_dev, held.st_ino):
            return dfd
    except OSError:
        pass
    os.close(dfd)
    return None


def _copy(src: int, dst: int, offset: int, length: int) -> None:
    """*length* bytes of *src* from *offset* to *dst*'s position, in the kernel."""
    while length > 0:
        try:
            n = os.copy_file_range(src, dst, length, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            n = os.sendfile(dst, src, offset, length)
        if n <= 0:
            return
        offset += n
        length -= n


def _pending(fd: int) -> int:
    """Bytes waiting in the pipe *fd* (FIONREAD)."""
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return buf[0]


def _unlink(dfd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dfd)
    except FileNotFoundError:
        pass


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
