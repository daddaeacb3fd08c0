"""Registered task types: ``types/<TYPE>.json``, one file per type.

A type file is replaced whole (tmp + rename), so readers see the old or the
new settings. Reads are cached per registry and keyed on the file's inode,
times and size, so a re-registration is seen at once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidName, SpoolError, UnknownType
from ..names import check_type
from . import fsutil
from .layout import Layout

DEFAULT_TIMEOUT = 3600.0
DEFAULT_RETENTION = -1.0
DEFAULT_MAX_RESTARTS = 2
DEFAULT_EXECUTOR = "fork"
EXECUTORS = ("fork", "dask")  # where handlers may run (contract §13.1)
NICE_RANGE = (0, 19)


@dataclass(frozen=True)
class TaskType:
    """A registered task type (``types/<name>.json``)."""

    name: str
    handler: str
    timeout: float = DEFAULT_TIMEOUT  # seconds from the claim; <= 0: no limit
    retention: float = DEFAULT_RETENTION  # seconds kept in done/; <= 0: forever
    max_restarts: int = DEFAULT_MAX_RESTARTS
    # Second edition (contract §13): where handlers run, and their limits
    # (None: no limit). Files without these keys read as the defaults.
    executor: str = DEFAULT_EXECUTOR
    memory_max: int | None = None  # bytes of address space the handler may add
    cpu_time: float | None = None  # seconds of CPU
    nice: int | None = None  # 0-19
    max_open_files: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "handler": self.handler,
            "timeout": self.timeout,
            "retention": self.retention,
            "max_restarts": self.max_restarts,
            "executor": self.executor,
            "memory_max": self.memory_max,
            "cpu_time": self.cpu_time,
            "nice": self.nice,
            "max_open_files": self.max_open_files,
        }

    @property
    def limited(self) -> bool:
        """Whether any resource limit is set."""
        return any(v is not None for v in (self.memory_max, self.cpu_time, self.nice, self.max_open_files))

    @classmethod
    def from_json(cls, name: str, raw: dict[str, Any]) -> TaskType:
        """Settings missing from the file take their defaults (files written
        by older versions stay readable)."""
        return cls(
            name=name,
            handler=str(raw["handler"]),
            timeout=float(raw.get("timeout", DEFAULT_TIMEOUT)),
            retention=float(raw.get("retention", DEFAULT_RETENTION)),
            max_restarts=int(raw.get("max_restarts", DEFAULT_MAX_RESTARTS)),
            executor=str(raw.get("executor") or DEFAULT_EXECUTOR),
            memory_max=_optional(int, raw.get("memory_max")),
            cpu_time=_optional(float, raw.get("cpu_time")),
            nice=_optional(int, raw.get("nice")),
            max_open_files=_optional(int, raw.get("max_open_files")),
        )


def _optional(kind: type, value: Any) -> Any:
    return None if value is None else kind(value)


def check_settings(
    executor: str, memory_max: int | None, cpu_time: float | None, nice: int | None, max_open_files: int | None
) -> None:
    """SpoolError naming the first setting out of its range (contract §13)."""
    if executor not in EXECUTORS:
        raise SpoolError(f"unknown executor {executor!r}: choose {' or '.join(EXECUTORS)}")
    if memory_max is not None and memory_max <= 0:
        raise SpoolError(f"memory_max must be a positive number of bytes, not {memory_max!r}")
    if cpu_time is not None and not cpu_time > 0:
        raise SpoolError(f"cpu_time must be a positive number of seconds, not {cpu_time!r}")
    if nice is not None and not NICE_RANGE[0] <= nice <= NICE_RANGE[1]:
        raise SpoolError(f"nice must be from {NICE_RANGE[0]} to {NICE_RANGE[1]}, not {nice!r}")
    if max_open_files is not None and max_open_files <= 0:
        raise SpoolError(f"max_open_files must be positive, not {max_open_files!r}")


def check_handler(handler: object) -> str:
    """*handler* if it looks like a dotted import path, else SpoolError."""
    if not isinstance(handler, str) or "." not in handler.strip(".") or any(c.isspace() for c in handler):
        raise SpoolError(f"handler must be a dotted import path like 'pkg.module.func', not {handler!r}")
    return handler


class TypeRegistry:
    """The ``types/`` directory of one spool."""

    def __init__(self, layout: Layout, *, durable: bool) -> None:
        self.layout = layout
        self.durable = durable
        self._cache: dict[str, tuple[tuple[int, ...], TaskType]] = {}

    def _file(self, name: str) -> str:
        return self.layout.path("types", f"{name}.json")

    def put(self, ttype: TaskType) -> TaskType:
        """Create or replace the type's file; atomic (tmp + rename)."""
        check_type(ttype.name)
        check_handler(ttype.handler)
        dfd = fsutil.open_dir(self.layout.types)
        try:
            tmp = f".{ttype.name}.json.{os.getpid()}.{os.urandom(4).hex()}"
            fsutil.write_new(dfd, tmp, json.dumps(ttype.to_json(), indent=1).encode() + b"\n", sync=self.durable)
            os.rename(tmp, f"{ttype.name}.json", src_dir_fd=dfd, dst_dir_fd=dfd)
            if self.durable:
                os.fsync(dfd)
        finally:
            os.close(dfd)
        self._cache.pop(ttype.name, None)
        return ttype

    def get(self, name: str) -> TaskType:
        """The registered type *name*; UnknownType if there is none,
        SpoolError if its file is corrupt."""
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
        except (ValueError, KeyError, TypeError) as exc:
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

    def all(self) -> list[TaskType]:
        """Every readable registered type, sorted by name."""
        out = []
        for entry in sorted(os.listdir(self.layout.types)):
            if entry.endswith(".json") and not entry.startswith("."):
                try:
                    out.append(self.get(entry[:-5]))
                except (UnknownType, InvalidName):
                    continue
        return out

    def remove(self, name: str) -> None:
        os.unlink(self._file(name))
        if self.durable:
            fsutil.fsync_dir(self.layout.types)
        self._cache.pop(name, None)
