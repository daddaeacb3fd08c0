"""Registered task types: ``types/<TYPE>.json``, one file per type.

A type file is replaced whole (tmp + rename), so readers see the old or the
new settings. Reads are cached per registry and keyed on the file's inode,
times and size, so a re-registration is seen at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidName, SpoolError, UnknownType
from ..names import check_type
from ..units import MAX_DURATION, parse_duration
from . import fsutil
from .layout import Layout

DEFAULT_TIMEOUT = 3600.0
DEFAULT_RETENTION = -1.0
DEFAULT_MAX_RESTARTS = 2
DEFAULT_EXECUTOR = "fork"
EXECUTORS = ("fork", "dask")  # where handlers may run (contract §13.1)
NICE_RANGE = (0, 19)
PRIORITY_RANGE = (-100, 100)
DEFAULT_MAX_OUTPUT = 1 << 20  # bytes of a handler's output kept (contract §12.1)
# The most a count setting may be. Past it a restart or retry limit is no
# limit at all, and a concurrency is more slot files than a look at the type's
# room should open (locks/types/, one file a slot); a stored number stays one
# any JSON reader takes exactly.
MAX_COUNT = 10_000
# The settings bounded by units.MAX_DURATION (seconds) and by MAX_COUNT.
DURATIONS = ("timeout", "retention", "cpu_time", "retry_backoff", "retry_backoff_max")
COUNTS = ("max_restarts", "retries", "concurrency")


@dataclass(frozen=True)
class TaskType:
    """A registered task type (``types/<name>.json``). Every field is a
    setting of ``spoolq register`` (and a keyword of ``register_type``),
    except ``held`` (``spoolq hold``/``release``); a file without a field
    reads as its default, so files of older versions stay readable."""

    name: str
    handler: str
    timeout: float = DEFAULT_TIMEOUT  # seconds from the claim; <= 0: no limit
    retention: float = DEFAULT_RETENTION  # seconds kept in done/; <= 0: forever
    max_restarts: int = DEFAULT_MAX_RESTARTS
    # Where handlers run, and their limits (None: no limit), contract §13.
    executor: str = DEFAULT_EXECUTOR
    memory_max: int | None = None  # bytes of address space the handler may add
    cpu_time: float | None = None  # seconds of CPU
    nice: int | None = None  # 0-19
    max_open_files: int | None = None
    max_output_bytes: int = DEFAULT_MAX_OUTPUT  # the cap of the task's ``output`` (contract §12.1)
    # Scheduling, contract §11.
    retries: int = 0  # re-runs after a handler failure
    retry_backoff: float = 10.0  # seconds before the first retry (doubling)
    retry_backoff_max: float = 3600.0
    priority: int = 0  # of its tasks, unless enqueued with one
    concurrency: int = 0  # most RUNNING/PAUSED at once over every server; 0: no limit
    held: bool = False  # no server claims its tasks

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def limited(self) -> bool:
        """Whether any resource limit is set."""
        return any(v is not None for v in (self.memory_max, self.cpu_time, self.nice, self.max_open_files))

    @classmethod
    def from_json(cls, name: str, raw: dict[str, Any]) -> TaskType:
        """The type in a file's JSON; ValueError/TypeError/KeyError if a
        value is not what it must be."""
        values: dict[str, Any] = {"name": name, "handler": str(raw["handler"])}
        for field in dataclasses.fields(cls)[2:]:
            if field.name in raw and raw[field.name] is not None:
                values[field.name] = _COERCE[field.name](raw[field.name])
        # A file written before the bounds existed reads at the bound: the
        # same "never" or "no limit" it meant, and its retries' due times
        # stay ones a status can hold.
        for name in DURATIONS + COUNTS:
            if values.get(name) is not None:
                values[name] = min(values[name], MAX_DURATION if name in DURATIONS else MAX_COUNT)
        ttype = cls(**values)
        check_settings(ttype)
        return ttype


# The numeric settings and their kind: int for a whole number (a count, a
# size, a niceness, a priority), float for any real number (seconds).
NUMBERS: dict[str, type] = {
    "timeout": float, "retention": float, "max_restarts": int, "memory_max": int, "cpu_time": float, "nice": int,
    "max_open_files": int, "max_output_bytes": int, "retries": int, "retry_backoff": float,
    "retry_backoff_max": float, "priority": int, "concurrency": int,
}


def _is_number(value: Any) -> bool:
    # A bool is an int to Python, but True as a timeout or a count is a
    # mistake, not 1.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_number(name: str, value: Any) -> Any:
    """*value* if it is a number of setting *name*'s kind (:data:`NUMBERS`):
    a whole number (an int) where the setting counts, a finite number for
    seconds (NaN and infinity are no time); never a bool or a str.
    SpoolError otherwise; the range is :func:`check_settings`' to check."""
    if NUMBERS[name] is int:
        if not _is_number(value) or not isinstance(value, int):
            raise SpoolError(f"{name} must be a whole number, not {repr(value)[:40]}")
        return value
    try:
        finite = _is_number(value) and math.isfinite(value)
    except OverflowError:  # an int past every float
        finite = False
    if not finite:
        raise SpoolError(f"{name} must be a finite number, not {repr(value)[:40]}")
    return value


def _number(kind: type) -> Any:
    def coerce(value: Any) -> Any:
        if not _is_number(value):
            raise TypeError(f"not a number: {value!r}")
        return kind(value)
    return coerce


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"not true or false: {value!r}")
    return value


_COERCE: dict[str, Any] = {
    "timeout": _number(float), "retention": _number(float), "max_restarts": _number(int), "executor": str,
    "memory_max": _number(int), "cpu_time": _number(float), "nice": _number(int), "max_open_files": _number(int),
    "max_output_bytes": _number(int),
    "retries": _number(int), "retry_backoff": _number(float), "retry_backoff_max": _number(float),
    "priority": _number(int), "concurrency": _number(int), "held": _flag,
}


def check_priority(priority: Any) -> int:
    """*priority* if it is a whole number from -100 to 100, else SpoolError."""
    if isinstance(priority, bool) or not isinstance(priority, int) or not (
            PRIORITY_RANGE[0] <= priority <= PRIORITY_RANGE[1]):
        raise SpoolError(f"priority must be a whole number from {PRIORITY_RANGE[0]} to {PRIORITY_RANGE[1]}, "
                         f"not {priority!r}")
    return priority


def check_settings(ttype: TaskType) -> None:
    """SpoolError naming the first setting that is not a number of its kind
    (:func:`check_number`) or is out of its range (contract §11, §13)."""
    for name in NUMBERS:
        if getattr(ttype, name) is not None:  # None: no limit (the limits of §13)
            check_number(name, getattr(ttype, name))
    if ttype.executor not in EXECUTORS:
        raise SpoolError(f"unknown executor {ttype.executor!r}: choose {' or '.join(EXECUTORS)}")
    if ttype.memory_max is not None and ttype.memory_max <= 0:
        raise SpoolError(f"memory_max must be a positive number of bytes, not {ttype.memory_max!r}")
    if ttype.cpu_time is not None and not ttype.cpu_time > 0:
        raise SpoolError(f"cpu_time must be a positive number of seconds, not {ttype.cpu_time!r}")
    if ttype.nice is not None and not NICE_RANGE[0] <= ttype.nice <= NICE_RANGE[1]:
        raise SpoolError(f"nice must be from {NICE_RANGE[0]} to {NICE_RANGE[1]}, not {ttype.nice!r}")
    if ttype.max_open_files is not None and ttype.max_open_files <= 0:
        raise SpoolError(f"max_open_files must be positive, not {ttype.max_open_files!r}")
    check_output_cap(ttype.max_output_bytes)
    if ttype.retries < 0:
        raise SpoolError(f"retries must be 0 or more, not {ttype.retries!r}")
    if not ttype.retry_backoff > 0 or not ttype.retry_backoff_max > 0:
        raise SpoolError("retry_backoff and retry_backoff_max must be positive numbers of seconds")
    check_priority(ttype.priority)
    if ttype.concurrency < 0:
        raise SpoolError(f"concurrency must be 0 (no limit) or more, not {ttype.concurrency!r}")
    for name in DURATIONS:
        value = getattr(ttype, name)
        if value is not None:
            try:
                parse_duration(value, allow_negative=True)  # finite, at most 100 years
            except ValueError as exc:
                raise SpoolError(f"{name}: {exc}") from None
    for name in COUNTS:
        if getattr(ttype, name) > MAX_COUNT:
            raise SpoolError(f"{name} must be at most {MAX_COUNT}, not {getattr(ttype, name)!r}")


def check_output_cap(max_output_bytes: int) -> None:
    """SpoolError unless *max_output_bytes* is a whole number from 2 up (half
    for the start of the output, half for its end)."""
    if isinstance(max_output_bytes, bool) or not isinstance(max_output_bytes, int) or max_output_bytes < 2:
        raise SpoolError(f"max_output_bytes must be a whole number of bytes, 2 or more, not {max_output_bytes!r}")


def check_handler(handler: object) -> str:
    """*handler* if it is a dotted import path (``pkg.module.func``: two or
    more Python identifiers), else SpoolError. A file path
    (``myapp/tasks.py``) and the ``module:func`` form are the likely
    mistakes; each gets a message that shows the right form."""
    parts = handler.split(".") if isinstance(handler, str) else []
    if len(parts) < 2 or not all(part.isidentifier() for part in parts):
        hint = ""
        if isinstance(handler, str) and ":" in handler:
            hint = f" (write {handler.replace(':', '.')!r}: a dot before the function, not a colon)"
        elif isinstance(handler, str) and ("/" in handler or handler.endswith(".py")):
            hint = " (the module's import name, not its file: 'myapp.tasks.func' for myapp/tasks.py)"
        raise SpoolError(f"handler must be a dotted import path like 'pkg.module.func', not {handler!r}{hint}")
    return handler


class TypeRegistry:
    """The ``types/`` directory of one spool."""

    def __init__(self, layout: Layout, *, durable: bool) -> None:
        self.layout = layout
        self.durable = durable
        self._cache: dict[str, tuple[tuple[int, ...], TaskType]] = {}
        self._moment = threading.local()  # .seen: types looked at in this thread's moment()

    @contextlib.contextmanager
    def moment(self) -> Iterator[None]:
        """Within the block, each type's file is looked at (lstat) at most
        once by this thread: for a caller that makes many lookups in one
        short step (a turn of the worker's loop) and may see a change at
        its next step. Nests; a put() or remove() here is seen at once."""
        outer = getattr(self._moment, "seen", None)
        if outer is None:
            self._moment.seen = {}
        try:
            yield
        finally:
            if outer is None:
                self._moment.seen = None

    def _file(self, name: str) -> str:
        return self.layout.path("types", f"{name}.json")

    def put(self, ttype: TaskType) -> TaskType:
        """Create or replace the type's file; atomic (tmp + rename)."""
        check_type(ttype.name)
        check_handler(ttype.handler)
        check_settings(ttype)
        dfd = fsutil.open_dir(self.layout.types)
        try:
            tmp = fsutil.staging_name(f"{ttype.name}.json")
            fsutil.write_new(dfd, tmp, json.dumps(ttype.to_json(), indent=1).encode() + b"\n", sync=self.durable)
            os.rename(tmp, f"{ttype.name}.json", src_dir_fd=dfd, dst_dir_fd=dfd)
            if self.durable:
                os.fsync(dfd)
        finally:
            os.close(dfd)
        self._forget(ttype.name)
        return ttype

    def _forget(self, name: str) -> None:
        self._cache.pop(name, None)
        seen = getattr(self._moment, "seen", None)
        if seen is not None:
            seen.pop(name, None)

    def get(self, name: str) -> TaskType:
        """The registered type *name*; UnknownType if there is none,
        SpoolError if its file is corrupt."""
        seen = getattr(self._moment, "seen", None)
        if seen is not None and name in seen:
            return seen[name]
        ttype = self._get(name)
        if seen is not None:
            seen[name] = ttype
        return ttype

    def _get(self, name: str) -> TaskType:
        check_type(name)
        path = self._file(name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise UnknownType(name) from None
        # File times are only as fine as the kernel's tick, so a type
        # registered again within one tick keeps its mtime; the replacing
        # rename gives it a new inode and ctime, which the key includes.
        key = (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        cached = self._cache.get(name)
        if cached and cached[0] == key:
            return cached[1]
        dfd = fsutil.open_dir(self.layout.types)
        try:
            ttype = TaskType.from_json(name, json.loads(fsutil.read_file(dfd, f"{name}.json")))
        except FileNotFoundError:
            raise UnknownType(name) from None
        except PermissionError as exc:
            raise SpoolError(f"{path} cannot be read ({exc.strerror}): register the type again, or its owner or "
                             f"root can run: chgrp {os.stat(self.layout.root).st_gid} {path}; chmod g+r {path}") from None
        except OSError as exc:  # a directory, a symlink (never followed) or a FIFO under a type's name
            raise SpoolError(f"{path} cannot be read ({exc.strerror or exc}): register the type again") from None
        except (ValueError, KeyError, TypeError, OverflowError, SpoolError) as exc:
            raise SpoolError(f"{path} is corrupt ({exc}): register the type again") from None
        finally:
            os.close(dfd)
        self._cache[name] = (key, ttype)
        return ttype

    def find(self, name: str) -> TaskType | None:
        """The type *name*, or None when it is unknown, corrupt or misnamed."""
        try:
            return self.get(name)
        except (UnknownType, SpoolError, InvalidName):
            return None

    def all(self, *, left_out: list[str] | None = None) -> list[TaskType]:
        """Every readable registered type, sorted by name (one that cannot be
        read or is corrupt is left out, its file's path put in *left_out*
        when given: fsck reports it, and a lookup of it by name says why)."""
        out = []
        for entry in sorted(os.listdir(self.layout.types)):
            if entry.endswith(".json") and not entry.startswith("."):
                try:
                    out.append(self.get(entry[:-5]))
                except UnknownType:
                    continue  # removed meanwhile
                except (InvalidName, SpoolError):
                    if left_out is not None:
                        left_out.append(self._file(entry[:-5]))
        return out

    def remove(self, name: str) -> None:
        os.unlink(self._file(name))
        if self.durable:
            fsutil.fsync_dir(self.layout.types)
        self._forget(name)
