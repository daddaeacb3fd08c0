"""Per-type resource limits, applied in the handler's process (contract §13.3).

:class:`Limits` is what a type asks for (``--memory-max``, ``--cpu-time``,
``--nice``, ``--max-open-files``). The runner applies it in the process that
is about to call the handler, after the handler was imported and right before
the call, and turns a failure caused by a limit into a message that names it:

==================  ===============================================  ==========================================
limit               how                                              failure message
==================  ===============================================  ==========================================
``memory_max``      ``RLIMIT_AS`` (soft) = address space now + max   ``memory limit 64M exceeded`` (MemoryError)
``cpu_time``        ``RLIMIT_CPU`` soft = CPU used + max (rounded    ``CPU time limit 1 s exceeded`` (SIGXCPU
                    up to a second), hard = soft + 1 s               raises :class:`CpuTimeExceeded`; the hard
                                                                     limit SIGKILLs a handler stuck in C code)
``nice``            ``os.nice`` up to N; never below the process's   (none: it only slows the handler)
                    own niceness
``max_open_files``  ``RLIMIT_NOFILE`` (soft) = N                     ``open files limit N reached`` (EMFILE)
==================  ===============================================  ==========================================

Decisions, and their limits:

* ``memory_max`` bounds what the handler *adds*: the handler process already
  maps the interpreter and spoolq (and, for the fork executor, what it
  inherited from the worker), which is not the handler's doing. It is address
  space, not resident memory: libraries that reserve large virtual areas
  (thread arenas, BLAS buffers, JITs) need room for that. A cgroup limit
  (``MemoryMax=`` on the unit) bounds the whole worker instead.
* Limits are set as soft limits (CPU: with a hard limit 1 s above), so that
  after the handler returns the runner can lift them (:meth:`Limits.apply`
  returns the function that does) and record the outcome: a handler that
  leaked file descriptors up to the limit must not make the final status
  write fail. A handler can raise a soft limit itself: these limits catch
  accidents (a runaway loop, a leak), they are no sandbox.
* Niceness cannot be lowered again by an unprivileged process, and a process
  that ran a limited handler is not trusted to be clean: **a handler process
  that ran a task with any limit is retired after that task** (the fork
  executor replaces the slot; the dask executor's remote slot exits). Limits
  therefore never leak into the next task, of whatever type.
* Under the shipped systemd unit, ``setrlimit``/``prlimit64``/``setpriority``
  are allowed again for this (``packaging/systemd/spoolq@.service``). If a
  limit cannot be applied, the task fails with a message saying which and
  why, rather than running without it.
"""

from __future__ import annotations

import errno
import math
import os
import resource
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..units import format_size


class CpuTimeExceeded(BaseException):
    """Raised in the handler at its CPU time limit (SIGXCPU). A BaseException,
    so an ``except Exception`` in the handler does not swallow it."""


@dataclass(frozen=True)
class Limits:
    """The resource limits of one type (None: no limit)."""

    memory_max: int | None = None
    cpu_time: float | None = None
    nice: int | None = None
    max_open_files: int | None = None

    @classmethod
    def of(cls, ttype: Any) -> Limits:
        """The limits of a :class:`~spoolq.store.registry.TaskType`."""
        return cls(
            memory_max=getattr(ttype, "memory_max", None),
            cpu_time=getattr(ttype, "cpu_time", None),
            nice=getattr(ttype, "nice", None),
            max_open_files=getattr(ttype, "max_open_files", None),
        )

    @classmethod
    def for_type(cls, spool: Any, type_name: str) -> Limits:
        """The limits of *type_name* on *spool*; none when the type cannot be read."""
        try:
            return cls.of(spool.get_type(type_name))
        except Exception:  # noqa: BLE001 - an unreadable type is reported elsewhere
            return cls()

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.memory_max, self.cpu_time, self.nice, self.max_open_files))

    def to_json(self) -> dict[str, Any]:
        return {"memory_max": self.memory_max, "cpu_time": self.cpu_time, "nice": self.nice,
                "max_open_files": self.max_open_files}

    # ------------------------------------------------------------------ in the handler process

    def apply(self) -> Callable[[], None]:
        """Apply the limits to this process; returns the function that lifts
        what can be lifted once the handler is done. OSError (with the limit
        named) when a limit cannot be set."""
        undo: list[Callable[[], None]] = []
        if self.nice is not None:
            _guard("nice", self.nice, lambda: _raise_niceness(self.nice))
        if self.max_open_files is not None:
            undo.append(_lower_soft(resource.RLIMIT_NOFILE, self.max_open_files, "max_open_files"))
        if self.memory_max is not None:
            undo.append(_lower_soft(resource.RLIMIT_AS, _address_space() + self.memory_max, "memory_max"))
        if self.cpu_time is not None:
            undo.append(self._limit_cpu())

        def lift() -> None:
            for step in reversed(undo):
                try:
                    step()
                except (OSError, ValueError):
                    pass

        return lift

    def _limit_cpu(self) -> Callable[[], None]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        assert self.cpu_time is not None
        soft = math.ceil(usage.ru_utime + usage.ru_stime + self.cpu_time)
        old = resource.getrlimit(resource.RLIMIT_CPU)
        hard = soft + 1 if old[1] == resource.RLIM_INFINITY else min(old[1], soft + 1)

        def on_xcpu(signum: int, frame: object) -> None:
            raise CpuTimeExceeded(self.describe_cpu())

        signal.signal(signal.SIGXCPU, on_xcpu)
        _guard("cpu_time", self.cpu_time, lambda: resource.setrlimit(resource.RLIMIT_CPU, (min(soft, hard), hard)))

        def lift() -> None:
            # The kernel repeats SIGXCPU every second past the soft limit:
            # the bookkeeping after the handler must not be interrupted.
            signal.signal(signal.SIGXCPU, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))

        return lift

    # ------------------------------------------------------------------ messages

    def describe_memory(self) -> str:
        return f"memory limit {format_size(self.memory_max or 0)} exceeded"

    def describe_cpu(self) -> str:
        return f"CPU time limit {self.cpu_time:g} s exceeded"

    def explain(self, exc: BaseException) -> str | None:
        """The message for a handler that raised *exc*, when a limit of these
        caused it (the exception itself or what it was raised from)."""
        for cause in (exc, exc.__cause__, exc.__context__):
            if isinstance(cause, CpuTimeExceeded):
                return self.describe_cpu()
            if isinstance(cause, MemoryError) and self.memory_max is not None:
                return f"{self.describe_memory()} (MemoryError)"
            if (isinstance(cause, RuntimeError) and "can't start new thread" in str(cause)
                    and self.memory_max is not None):
                # A thread's stack is address space: the limit refuses it too.
                return f"{self.describe_memory()} ({type(cause).__name__}: {cause})"
            if isinstance(cause, OSError) and cause.errno == errno.EMFILE and self.max_open_files is not None:
                return f"open files limit {self.max_open_files} reached ({type(cause).__name__}: {cause})"
        return None

    def explain_death(self, status: int, cpu_used: float | None = None) -> str | None:
        """The message for a handler process that died with wait *status*,
        when a limit of these killed it. *cpu_used* (seconds, from wait4)
        makes a SIGKILL at the CPU hard limit certain."""
        if not os.WIFSIGNALED(status) or self.cpu_time is None:
            return None
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_used is not None and cpu_used >= self.cpu_time):
            return f"{self.describe_cpu()} (handler process died of signal {signal.Signals(sig).name})"
        if sig == signal.SIGKILL and cpu_used is None:
            return (f"handler process died of signal SIGKILL (the CPU time limit {self.cpu_time:g} s "
                    "kills at its hard limit; or it was killed from outside)")
        return None


def _guard(name: str, value: Any, step: Callable[[], Any]) -> None:
    try:
        step()
    except (OSError, ValueError) as exc:
        raise OSError(getattr(exc, "errno", None) or errno.EPERM, f"cannot apply {name} {value}: {exc}") from None


def _lower_soft(which: int, value: int, name: str) -> Callable[[], None]:
    soft, hard = resource.getrlimit(which)
    new = value if hard == resource.RLIM_INFINITY else min(value, hard)
    _guard(name, value, lambda: resource.setrlimit(which, (new, hard)))
    return lambda: resource.setrlimit(which, (soft, hard))


def _raise_niceness(target: int) -> None:
    current = os.nice(0)
    if target > current:
        os.nice(target - current)


def _address_space() -> int:
    """Bytes of address space this process maps now (VmSize)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
