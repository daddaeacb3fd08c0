"""Making every process a handler starts die with it.

A handler may start processes that leave its process group (``setsid``,
a double fork), so killing the group is not enough. Linux's child
subreaper (``PR_SET_CHILD_SUBREAPER``) closes that gap: a process whose
parent dies is re-parented to its nearest subreaper ancestor instead of to
init. The worker and each of its handler processes are subreapers, so:

* when a handler returns, whatever it left behind is a child (or, once
  those die, a grandchild…) of its handler process, which kills them all
  (:func:`kill_descendants`) before it reports the outcome;
* when a handler process itself is killed (time limit, kill, crash), its
  leftovers become children of the worker, which kills every child that is
  not one of its handler processes before it settles the task.

Caveats: a process that re-parents itself under another subreaper (e.g. a
``systemd-run`` scope) escapes; so does everything when the worker itself
is SIGKILLed — then the run lock (docs/design.md) keeps the task from
running twice, and a sweeper kills the leftovers that still hold it. Under
systemd, the unit's cgroup is killed as a whole when the worker dies.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import time

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _prctl = _libc.prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux/glibc
    _prctl = None


def _call_prctl(option: int, value: int) -> bool:
    if _prctl is None:
        return False
    return _prctl(option, value, 0, 0, 0) == 0


def become_subreaper() -> bool:
    """Make orphaned descendants of this process its children. False where
    the kernel does not offer it."""
    return _call_prctl(_PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send *sig* to this process when its parent dies."""
    return _call_prctl(_PR_SET_PDEATHSIG, int(sig))


# The look at /proc itself failed for want of descriptors or memory (a
# handler that lowered its open-files limit): "no child" would be a guess.
_NO_LOOK = (errno.EMFILE, errno.ENFILE, errno.ENOMEM)


def children(pid: int | None = None) -> list[int]:
    """The live children of *pid* (default: this process), from
    ``/proc/PID/task/*/children`` (each thread's own). OSError when /proc
    cannot be read for want of descriptors or memory."""
    pid = os.getpid() if pid is None else pid
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError as exc:
        if exc.errno in _NO_LOOK:
            raise
        return out  # the process is gone
    for tid in tids:
        out += thread_children(pid, int(tid))
    return out


def thread_children(pid: int, tid: int) -> list[int]:
    """The live children that thread *tid* of process *pid* forked (or that
    were re-parented to it); OSError as :func:`children`."""
    # os.open/os.read: a handler process reads these after every run,
    # and open() would add a stat, an isatty and two seeks each time.
    try:
        fd = os.open(f"/proc/{pid}/task/{tid}/children", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in _NO_LOOK:
            raise
        return []  # the thread is gone
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    except OSError:
        return []
    finally:
        os.close(fd)
    return [int(x) for x in b"".join(chunks).split()]


def thread_count() -> int:
    """How many threads this process has: one ``stat`` (procfs counts a
    process's threads in the link count of its ``task`` directory)."""
    return os.stat("/proc/self/task").st_nlink - 2


def kill_children(keep: frozenset[int] = frozenset()) -> list[int]:
    """SIGKILL every child of this process not in *keep*; the pids killed."""
    killed = []
    for child in children():
        if child in keep:
            continue
        try:
            os.kill(child, signal.SIGKILL)
            killed.append(child)
        except ProcessLookupError:
            continue
    return killed


def kill_descendants(*, timeout: float = 10.0) -> None:
    """Kill and reap every descendant of this process (a subreaper): its
    children, then the grandchildren re-parented to it as their parents die,
    until none is left or *timeout* seconds passed. OSError when /proc
    cannot be read (:func:`children`): then nobody knows what is left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # No child at all, alive or unreaped (ECHILD): no descendant either,
        # since each would have a child of ours on its line of ancestors.
        # The common case (a handler that started nothing, or waited for
        # what it started) costs that one waitpid and no /proc scan.
        reaped = _reap_any()
        if reaped is None:
            return
        kill_children()
        if not reaped:
            time.sleep(0.005)  # the killed die asynchronously


def _reap_any() -> int | None:
    """Reap every exited child: how many, or None when there is no child at
    all (none alive, none left to reap)."""
    count = 0
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return count or None
        if pid == 0:
            return count
        count += 1
