"""A task's captured output and progress, as files of its task directory.

**Output** (contract §12.1). What a handler and its subprocesses write to
fds 1 and 2 is kept in ``output``, capped by the type's
``max_output_bytes`` (the *cap*): the first ``cap // 2`` bytes (the head)
and the latest ``cap - cap // 2`` bytes (the tail), with one marker line
between them when bytes were left out. While a run is past its head, the
tail is written to numbered *parts*, ``output.tail.K``, each ``seg`` bytes
long but the last; only the two latest exist. Part K holds bytes
``[K*seg, (K+1)*seg)`` of what came after the head, so the latest ``seg``
bytes are always in the last two parts. When the run ends, the parts are
unlinked and the tail is appended to ``output`` with the marker; so:

* no part: ``output`` is the whole story (a finished run, or one still in
  its head);
* parts: the run is still in its tail, or died there; :func:`compose` puts
  head, marker and tail together the way the run's end would have.

None of this is durable state: it is never fsynced, and a crash may lose
the last bytes written (docs/design.md, "Output").

**Progress** (contract §12.3) is the file ``progress``: one small JSON
object ``{"done", "total", "message", "at"}``, replaced whole (tmp +
rename), never fsynced either.

This module knows the names and the formats; the worker's
:mod:`spoolq.worker.capture` writes the output, :class:`spoolq.task.TaskContext`
the progress, and the read side (:mod:`spoolq.queries`, ``spoolq output``)
reads both.
"""

from __future__ import annotations

import errno
import json
import os
import re
from typing import Any

from . import fsutil
from .codec import STATUS_MESSAGE_MAX, bounded

OUTPUT = "output"
PART_PREFIX = "output.tail."
PROGRESS = "progress"
PROGRESS_TMP = "progress.tmp"
_PART = re.compile(r"output\.tail\.(\d{1,12})\Z")
_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
PROGRESS_LIMIT = 64 << 10  # a progress file is small; a larger one is not read


def budgets(cap: int) -> tuple[int, int]:
    """(head, seg): bytes kept from the start, and from the end, of an output
    capped at *cap* bytes."""
    head = max(1, cap // 2)
    return head, max(1, cap - head)


def part_name(index: int) -> str:
    return f"{PART_PREFIX}{index}"


def part_index(name: str) -> int | None:
    """K of a part's file name ``output.tail.K``; None for any other name."""
    match = _PART.match(name)
    return int(match.group(1)) if match else None


def is_output_file(name: str) -> bool:
    """Whether *name* is one of the output's files (``output`` or a part)."""
    return name == OUTPUT or part_index(name) is not None


def marker(skipped: int) -> bytes:
    """The line that stands where *skipped* bytes were left out."""
    return f"\n[spoolq: {skipped} bytes of output left out here]\n".encode()


MARKER = re.compile(rb"\n\[spoolq: (\d+) bytes of output left out here\]\n")  # what :func:`marker` writes


def parts_of(dfd: int) -> list[int]:
    """Indices of the parts in the task directory open as *dfd*, oldest first."""
    found = []
    for name in os.listdir(dfd):
        index = part_index(name)
        if index is not None:
            found.append(index)
    return sorted(found)


def _open(dfd: int, name: str) -> int | None:
    try:
        fd = os.open(name, _O_READ, dir_fd=dfd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None  # a symlink planted as output: never followed
        raise
    if not _regular(fd):
        os.close(fd)
        return None
    return fd


def _regular(fd: int) -> bool:
    import stat

    return stat.S_ISREG(os.fstat(fd).st_mode)


def _read_range(fd: int, start: int, size: int) -> bytes:
    chunks = []
    while size > 0:
        chunk = os.pread(fd, min(size, 1 << 20), start)
        if not chunk:
            break
        chunks.append(chunk)
        start += len(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def tail_plan(sizes: list[tuple[int, int]]) -> tuple[list[tuple[int, int, int]], int]:
    """From the parts' (index, size), oldest first: the pieces that make the
    tail, as (index, offset, length), and how many bytes were left out
    before it. The segment size is the size of a full part (every part but
    the last is full), so the tail is the latest ``seg`` bytes."""
    if not sizes:
        return [], 0
    last_index, last_size = sizes[-1]
    if len(sizes) == 1:
        seg = last_size
        pieces = [(last_index, 0, last_size)]
    else:
        prev_index, prev_size = sizes[-2]
        seg = prev_size
        need = max(0, seg - last_size)
        pieces = []
        if need and prev_index == last_index - 1:
            pieces.append((prev_index, prev_size - need, need))
        pieces.append((last_index, 0, last_size))
    kept = sum(length for _, _, length in pieces)
    written = last_index * seg + last_size
    return pieces, max(0, written - kept)


def compose(dfd: int, limit: int = 1 << 30) -> bytes:
    """The task's output as ``spoolq output`` prints it: ``output`` alone, or
    (while parts exist) head, marker and tail as the run's end would leave
    them. Empty when the task has no output (yet)."""
    fd = _open(dfd, OUTPUT)
    head = b""
    if fd is not None:
        try:
            head = fsutil.read_limited(fd, limit, OUTPUT)
        finally:
            os.close(fd)
    fds: dict[int, int] = {}
    try:
        for index in parts_of(dfd)[-2:]:
            part = _open(dfd, part_name(index))
            if part is not None:
                fds[index] = part
        if not fds:
            return head
        sizes = [(i, os.fstat(fd).st_size) for i, fd in sorted(fds.items())]
        pieces, skipped = tail_plan(sizes)
        tail = b"".join(_read_range(fds[i], offset, length) for i, offset, length in pieces)
        return head + (marker(skipped) if skipped else b"") + tail
    finally:
        for part in fds.values():
            os.close(part)


def write_output(dfd: int, data: bytes) -> None:
    """Replace the task's output with *data* (the output of a run made
    elsewhere, already capped); its parts go. Not fsynced."""
    for index in parts_of(dfd):
        try:
            os.unlink(part_name(index), dir_fd=dfd)
        except FileNotFoundError:
            pass
    fd = os.open(OUTPUT, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o660, dir_fd=dfd)
    try:
        fsutil.share_with_group(fd)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- progress


def progress_doc(done: Any, total: Any, message: str, at: str) -> dict[str, Any]:
    """The ``progress`` document; its message cut as a status message is
    (a megabyte of message made a file too large to read back, and the
    progress vanished without a word)."""
    return {"done": done, "total": total, "message": bounded(message, STATUS_MESSAGE_MAX), "at": at}


def write_progress(dfd: int, doc: dict[str, Any]) -> None:
    """Replace ``progress`` whole (tmp + rename); not fsynced (it is not
    durable state: a crash may leave the previous value)."""
    data = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
    try:
        os.unlink(PROGRESS_TMP, dir_fd=dfd)
    except FileNotFoundError:
        pass
    fd = os.open(PROGRESS_TMP, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o660,
                 dir_fd=dfd)
    try:
        fsutil.share_with_group(fd)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.rename(PROGRESS_TMP, PROGRESS, src_dir_fd=dfd, dst_dir_fd=dfd)


def read_progress(dfd: int) -> dict[str, Any] | None:
    """The task's last progress, or None (none stored, or unreadable: a
    progress that cannot be read is no reason to fail a status read)."""
    fd = _open(dfd, PROGRESS)
    if fd is None:
        return None
    try:
        doc = json.loads(fsutil.read_limited(fd, PROGRESS_LIMIT, PROGRESS))
    except (OSError, ValueError, RecursionError):
        return None
    finally:
        os.close(fd)
    if not isinstance(doc, dict):
        return None
    return {key: doc.get(key) for key in ("done", "total", "message", "at")}


def clear_run_files(dfd: int) -> None:
    """Remove what an earlier run of the task left (its output, parts and
    progress): a new run starts them afresh."""
    try:
        os.unlink(OUTPUT, dir_fd=dfd)
    except FileNotFoundError:
        # No output, so no parts either (a run makes parts only once its
        # output's head is full): no need to list the directory.
        for name in (PROGRESS, PROGRESS_TMP):
            try:
                os.unlink(name, dir_fd=dfd)
            except FileNotFoundError:
                pass
        return
    except IsADirectoryError:
        pass
    for name in os.listdir(dfd):
        if is_output_file(name) or name in (PROGRESS, PROGRESS_TMP):
            try:
                os.unlink(name, dir_fd=dfd)
            except (FileNotFoundError, IsADirectoryError):
                pass
