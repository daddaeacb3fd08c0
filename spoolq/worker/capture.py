"""Capturing a handler's output into its task directory (contract §12.1).

A handler process (a fork slot) runs many tasks, so for each run
:class:`Capture` points fds 1 and 2 at the write end of a pipe, and puts
them back when the handler returns. Whatever the handler writes, and
whatever its subprocesses write (they inherit fds 1 and 2), goes through
that pipe. A thread of the handler process moves it into the task's files
with ``splice(2)``: the kernel moves the pages from the pipe into the page
cache of the file, and no byte passes through Python or through the daemon.
The thread sleeps in ``epoll_wait`` and wakes only when bytes come; at the
run's end the run's own side takes the pipe back and moves what is left, so
a run that prints nothing costs no thread switch.

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
buffers when it is killed are lost (as on a terminal), and so are bytes
still in the pipe, not moved yet (up to the pipe's 1 MiB; more when the
thread falls behind a handler that floods on a loaded machine); a process the handler
leaves behind that still writes after the run is over gets EPIPE; output
written to other descriptors (a log file of its own) is not captured.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import select
import sys
import termios
import threading

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
        self._read = self._write = -1
        self._mover: _Mover | None = None  # the thread watching the pipe while the run lasts
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
        if self._mover is not None:
            self._mover.forget(self, self._read)
            self._mover = None
        for target, saved in zip((1, 2), self._saved):
            os.dup2(saved, target)
        for fd in (*self._saved, self._read, self._write, self.out):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._saved = []
        self._read = self._write = self.out = -1

    def _start(self) -> None:
        _flush()
        mover = _the_mover()
        self._read, self._write = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._read, False)
        try:
            fcntl.fcntl(self._write, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # the default buffer (64 KiB) works too, with more wake-ups
        self._saved = [os.dup(1), os.dup(2)]
        mover.watch(self, self._read)  # before the first byte can come
        self._mover = mover
        os.dup2(self._write, 1)
        os.dup2(self._write, 2)
        os.close(self._write)
        self._write = -1

    def __exit__(self, *exc: object) -> None:
        if self._mover is None:
            return  # it never started
        _flush()
        # From here on this side alone moves the run's bytes: the thread lets
        # go of the pipe (once a move it is in the middle of is done).
        self._mover.forget(self, self._read)
        self._mover = None
        for target, saved in zip((1, 2), self._saved):
            os.dup2(saved, target)
            os.close(saved)
        self._saved = []
        # Take what is in the pipe, not what a leftover process may go on
        # writing (it gets EPIPE once the read end is closed).
        self.take(budget=2 * PIPE_SIZE)
        os.close(self._read)
        self._read = -1
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

    # ------------------------------------------------------------------ moving (one side at a time)

    def take(self, *, budget: int = 1 << 62) -> bool:
        """Move what the pipe holds now, up to about *budget* bytes; after an
        error, read it and drop it, so writers never block on a full pipe.
        True at EOF (every writer is gone)."""
        try:
            while budget > 0:
                moved = self._pump() if self.error is None else self._drop()
                if moved <= 0:
                    return moved < 0
                budget -= moved
        except OSError as exc:  # disk full and the like: the rest is not kept
            self.error = exc
        return False

    def _drop(self) -> int:
        """Read and drop one call's worth: the count, 0 when empty, -1 at EOF."""
        try:
            data = os.read(self._read, 1 << 16)
        except BlockingIOError:
            return 0
        except OSError:
            return -1
        return len(data) if data else -1

    def _pump(self) -> int:
        """Move what the pipe holds (one call's worth): the bytes moved, 0
        when it is empty, -1 at EOF (every writer is gone)."""
        if self.written_head < self.head:
            if self.out < 0:
                if not _pending(self._read):
                    return 0  # nothing printed yet (EOF, if it is, is seen by the caller)
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
        self.out = _above_std(os.open(OUTPUT, _O_OUT, 0o660, dir_fd=self.dfd))
        fsutil.share_with_group(self.out)

    def _roll(self) -> None:
        """Start the next part; keep only the two latest. The oldest goes
        before the next is made, so a kill at any point leaves at most two
        parts (contract §12.1), the latest full one among them."""
        index = self.parts[-1][0] + 1 if self.parts else 0
        while len(self.parts) > 1:
            old, old_fd = self.parts.pop(0)
            os.close(old_fd)
            _unlink(self.dfd, part_name(old))
        fd = _above_std(os.open(part_name(index), _O_OUT, 0o660, dir_fd=self.dfd))
        fsutil.share_with_group(fd)
        self.parts.append((index, fd))
        self.part_written = 0

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
    """The thread of a handler process that moves its runs' output while
    they last. It sleeps in ``epoll_wait`` on the pipes of the runs under
    way (one at a time in a fork slot) and wakes only when bytes come or
    every writer is gone. A run registers its pipe at its start and takes
    it back at its end (:meth:`forget` waits for a move under way), then
    moves what is left itself: a run that prints nothing never wakes the
    thread. Started at the first run and kept: a thread per run cost about
    15 syscalls and a thread start a task, and handing each run to a
    waiting thread and back two thread switches. A child the handler forks
    has no such thread, so it forgets it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # held while bytes are moved, by either side
        self._runs: dict[int, Capture] = {}  # by the read end of their pipe
        self._epoll = select.epoll()
        try:
            threading.Thread(target=self._serve, name="spoolq-output", daemon=True).start()
        except RuntimeError:
            self._epoll.close()
            raise

    def watch(self, run: Capture, fd: int) -> None:
        """Move *run*'s bytes from the pipe *fd* as they come, from now on."""
        with self._lock:
            self._epoll.register(fd, select.EPOLLIN)
            self._runs[fd] = run

    def forget(self, run: Capture, fd: int) -> None:
        """Stop moving *run*'s bytes (after the move under way, if any)."""
        with self._lock:
            if self._runs.get(fd) is run:
                del self._runs[fd]
                self._epoll.unregister(fd)

    def _serve(self) -> None:
        while True:
            try:
                events = self._epoll.poll()
            except InterruptedError:
                continue
            for fd, mask in events:
                with self._lock:
                    run = self._runs.get(fd)  # None: taken back since (the fd may be another run's by now)
                    if run is None:
                        continue
                    eof = run.take()
                    if eof or (mask & (select.EPOLLHUP | select.EPOLLERR) and not _pending(fd)):
                        # Every writer is gone (the handler closed fds 1 and 2): nothing
                        # more comes, and a level-triggered hang-up would wake us forever.
                        del self._runs[fd]
                        self._epoll.unregister(fd)


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


def _above_std(fd: int) -> int:
    """*fd*, or a copy of it numbered 3 or more if it is 0, 1 or 2: a
    handler that closed its fds 1 and 2 would get the capture's files back
    as them (and the run's end puts the saved ones over them)."""
    if fd > 2:
        return fd
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    finally:
        os.close(fd)


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
