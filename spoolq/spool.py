"""The spool: the on-disk layout and every move of a task between its states.

This module owns the directory tree; nothing else in spoolq renames, creates
or removes a task directory. The layout (SPEC §3)::

    ROOT/spool.json                 settings (max_queue, durable, max_input_bytes)
    ROOT/types/<TYPE>.json          one file per registered task type
    ROOT/tmp/                       staging and trash; never read as tasks
    ROOT/enqueued/<TYPE>:<ID>/      waiting; FIFO by the directory's mtime
    ROOT/scheduled/<SERVER>/<TYPE>:<ID>/   claimed by SERVER, not started
    ROOT/running/<TYPE>:<ID>/       started (RUNNING or PAUSED)
    ROOT/done/<TYPE>:<ID>/          FINISHED or FAILED; mtime = finishing time
    ROOT/quarantine/                what could not be trusted; never deleted
    ROOT/locks/                     enqueue.lock, servers/<SERVER>.lock

A task directory holds ``input.pkl`` (or ``input.json``), ``status.json``,
``log`` and, once stored, ``response``.

Crash-safety rules this module relies on, each applied where it matters:

* A task is built in ``tmp/`` and renamed into ``enqueued/`` only when whole,
  so a crash leaves no task or a complete one (rule: never build in place).
* Every move is one ``rename`` inside one filesystem; the first rename wins
  and the losers get ENOENT, so claims need no lock (the kernel arbitrates).
* In durable mode every file is fsynced before the rename that publishes it,
  and both parent directories of a move are fsynced before the transition is
  acknowledged (rename is atomic, not durable).
* ``status.json`` is replaced with tmp + rename, never rewritten in place;
  ``log`` is appended with O_APPEND, one record per write.
* Every change to a claimed task happens under an exclusive ``flock`` on the
  task directory and re-checks the claim number read from ``status.json``, so
  a worker that lost its claim cannot write into the task's next life.
* Moves *back* to ``enqueued/`` (re-enqueue, hand-back) and the uniqueness
  check of ``enqueue`` hold one spool-wide lock: with only forward moves going
  on, probing the state directories in lifecycle order cannot miss a task.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import json
import logging
import os
import pickle
import pickletools
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import IntEnum
from typing import Any

from . import fsutil
from .errors import (
    CorruptTask,
    CrossDevice,
    InvalidInput,
    InvalidName,
    NoResponse,
    QueueFull,
    ServerBusy,
    SpoolError,
    SpoolqError,
    StaleClaim,
    TaskExists,
    TaskNotFound,
    TypeInUse,
    UnknownType,
    UnsafeSpool,
)
from .faults import crashpoint
from .names import check_id, check_server, check_type, split_task_name, task_name

log = logging.getLogger("spoolq.spool")

DEFAULT_ROOT = "/var/spool/spoolq"
STATE_DIRS = ("types", "tmp", "enqueued", "scheduled", "running", "done", "quarantine", "locks")
STATUS = "status.json"
LOG = "log"
RESPONSE = "response"
INPUT_PICKLE = "input.pkl"
INPUT_JSON = "input.json"
DEFAULT_MAX_INPUT = 64 << 20
SPOOL_FORMAT = 1


class State(IntEnum):
    """Task states with the ATP status codes (SPEC §2)."""

    ENQUEUED = 1
    SCHEDULED = 2
    RUNNING = 3
    PAUSED = 4
    FINISHED = 5
    FAILED = 6

    @property
    def terminal(self) -> bool:
        return self in (State.FINISHED, State.FAILED)


# Transitions a claim holder may ask for; everything else is refused.
# A SCHEDULED task becomes RUNNING only through Spool.start (which moves it to
# running/); its holder may only fail it.
_ALLOWED = {
    State.SCHEDULED: {State.FAILED},
    State.RUNNING: {State.RUNNING, State.PAUSED, State.FINISHED, State.FAILED},
    State.PAUSED: {State.RUNNING, State.PAUSED, State.FINISHED, State.FAILED},
}


@dataclass(frozen=True)
class TaskType:
    """A registered task type (``types/<name>.json``)."""

    name: str
    handler: str
    timeout: float = 3600.0
    retention: float = -1.0
    max_restarts: int = 2

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "handler": self.handler,
            "timeout": self.timeout,
            "retention": self.retention,
            "max_restarts": self.max_restarts,
        }


@dataclass(frozen=True)
class Claim:
    """One claim of a task by a server: the ATP ``task_id``.

    Its string form ``TYPE:ID#N@SERVER`` is what ``dequeueTask`` returns.
    ``number`` is the task's claim counter at the time of the claim: once the
    task is claimed again, re-enqueued or deleted, writes through this claim
    are refused.
    """

    type: str
    id: str
    number: int
    server: str

    def __str__(self) -> str:
        return f"{self.type}:{self.id}#{self.number}@{self.server}"

    @property
    def name(self) -> str:
        return task_name(self.type, self.id)

    @classmethod
    def parse(cls, text: str | Claim) -> Claim:
        if isinstance(text, Claim):
            return text
        try:
            rest, server = str(text).rsplit("@", 1)
            name, number = rest.rsplit("#", 1)
            type_name, task_id = split_task_name(name) or ("", "")
            return cls(check_type(type_name), check_id(task_id), int(number), check_server(server))
        except (ValueError, InvalidName):
            raise InvalidName(f"not a task claim: {text!r} (expected TYPE:ID#N@SERVER)") from None


@dataclass(frozen=True)
class LogRecord:
    time: datetime
    state: State
    message: str


@dataclass
class TaskInfo:
    """A task's status document as stored in ``status.json``, plus its path."""

    type: str
    id: str
    state: State
    path: str
    doc: dict[str, Any] = field(repr=False)

    def as_json(self) -> dict[str, Any]:
        out = dict(self.doc)
        out["state"] = self.state.name
        out["code"] = int(self.state)
        out["path"] = self.path
        return out


@dataclass(frozen=True)
class StartedTask:
    type: str
    id: str
    handler: str
    input: Any


@dataclass(frozen=True)
class SweepAction:
    """What a sweep did to one task: 'reenqueued', 'failed', 'handed back',
    'finished move' or 'retired'."""

    type: str
    id: str
    action: str
    reason: str


# --------------------------------------------------------------------------- helpers


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="microseconds")


def _from_iso(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def _escape(message: str) -> str:
    return message.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def _unescape(text: str) -> str:
    out, i = [], 0
    table = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            out.append(table.get(text[i + 1], text[i + 1]))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _status_bytes(doc: dict[str, Any]) -> bytes:
    """``status.json`` as one key per line, sorted, for ``cat``: the text
    ``json.dumps(doc, indent=1, sort_keys=True)`` gives for these flat
    documents, but through the C encoder (``indent`` forces the pure-Python
    one; this is 1.6x faster)."""
    body = json.dumps(doc, sort_keys=True, separators=(",\n ", ": "))
    return ("{\n " + body[1:-1] + "\n}\n").encode()


def _log_line(ts: float, state: State, message: str) -> bytes:
    return f"{_iso(ts)}\t{state.name}\t{_escape(message)}\n".encode()


def _check_pickle(payload: bytes) -> None:
    """Refuse bytes that are not one well-formed pickle, without unpickling
    them (unpickling runs code; parsing the opcodes does not)."""
    try:
        for _ in pickletools.genops(payload):
            pass
    except Exception as exc:  # genops raises ValueError and friends
        raise InvalidInput(f"input is not a valid pickle: {exc}") from None


def _remove(path: str) -> None:
    """Remove *path* whatever it is; a symlink is unlinked, never followed."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


class _FifoClock:
    """Strictly increasing nanosecond stamps within a process: the FIFO key."""

    def __init__(self) -> None:
        self._last = 0

    def next(self, now: float) -> int:
        stamp = max(int(now * 1e9), self._last + 1)
        self._last = stamp
        return stamp


class _Moved(Exception):
    """The path no longer names the task directory we locked."""


class _TaskDir:
    """A task directory opened and locked for a change.

    Opens the directory (never through a symlink), takes an exclusive flock on
    it and reads ``status.json``. The lock travels with the directory across
    renames (it is held on the inode), so the holder may move it.
    """

    def __init__(self, spool: Spool, path: str) -> None:
        self.spool = spool
        self.path = path
        self.fd = -1
        self.doc: dict[str, Any] = {}

    def __enter__(self) -> _TaskDir:
        if self.fd >= 0:
            return self  # already opened and locked by Spool._claimed
        try:
            self.fd = fsutil.open_dir(self.path)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise CorruptTask(f"{self.path} is not a task directory (symlink or file)") from None
            raise
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            fsutil.track_lock_fd(self.fd)
            st = os.fstat(self.fd)
            try:
                now = os.lstat(self.path)
            except FileNotFoundError:
                raise _Moved() from None
            if (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
                raise _Moved()
            self.spool._roll_forward(self.fd)
            self.doc = self.spool._read_status(self.fd, self.path)
        except BaseException:
            fsutil.untrack_lock_fd(self.fd)
            os.close(self.fd)
            self.fd = -1
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            fsutil.untrack_lock_fd(self.fd)
            os.close(self.fd)  # closing releases the flock
            self.fd = -1

    @property
    def state(self) -> State:
        return State[self.doc["state"]]

    def write(self, state: State, message: str, *, record: bool = True, **changes: Any) -> None:
        """Set the state (and other fields), append one log record, make both
        durable. Order: status tmp (fsynced) → log record (fsynced) → rename
        of the status into place → fsync of the task directory."""
        spool = self.spool
        now = spool.clock()
        self.doc.update(changes)
        self.doc["state"] = state.name
        self.doc["updated_at"] = _iso(now)
        self.doc["message"] = message
        data = _status_bytes(self.doc)
        sync = spool.durable
        fsutil.write_new_replacing(self.fd, STATUS + ".tmp", data, sync=sync)
        crashpoint("status.tmp_written")
        if record:
            try:
                fsutil.append(self.fd, LOG, _log_line(now, state, message), sync=sync)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ELOOP, errno.EINVAL, errno.ENXIO):
                    raise
                # No log, or a symlink/FIFO planted as one: the task cannot be trusted.
                raise CorruptTask(f"{self.path}/log cannot be appended to: {exc.strerror}") from None
            crashpoint("status.logged")
        os.rename(STATUS + ".tmp", STATUS, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        if sync:
            os.fsync(self.fd)
        crashpoint("status.replaced")

    def move(self, dest: str, *, mtime_ns: int | None = None) -> None:
        """Rename the locked directory to *dest* and make the move durable.
        *mtime_ns* is set first: the FIFO key in enqueued/, the finishing
        time in done/ (rename keeps a directory's mtime)."""
        if mtime_ns is not None:
            os.utime(self.fd, ns=(mtime_ns, mtime_ns))
        src_parent = os.path.dirname(self.path)
        fsutil.rename_noreplace(self.path, dest)
        crashpoint("move.renamed")
        self.path = dest
        if self.spool.durable:
            fsutil.fsync_dir(src_parent)
            fsutil.fsync_dir(os.path.dirname(dest))


# --------------------------------------------------------------------------- the spool


class Spool:
    """A spool directory and the whole task lifecycle on it.

    Open an existing spool with ``Spool(root)`` or create one with
    ``Spool.init(root)``. Every method that changes a task states what is
    atomic; all of them are safe against concurrent processes.

    ``clock`` (seconds since the epoch) is injectable so tests can age tasks.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self.root = os.path.abspath(os.fspath(root or os.environ.get("SPOOLQ_ROOT") or DEFAULT_ROOT))
        self.clock = clock
        self._fifo = _FifoClock()
        self._server_locks: dict[str, int] = {}
        self._types: dict[str, tuple[tuple[int, ...], TaskType]] = {}
        self._scan: collections.deque[tuple[int, str]] = collections.deque()
        self._check_layout()
        settings = self._read_settings()
        self.max_queue: int = int(settings.get("max_queue", 0))
        self.durable: bool = bool(settings.get("durable", True))
        self.max_input_bytes: int = int(settings.get("max_input_bytes", DEFAULT_MAX_INPUT))
        self._enqueue_lock = fsutil.FlockLock(self._p("locks", "enqueue.lock"))

    # ------------------------------------------------------------------ layout

    @classmethod
    def init(
        cls,
        root: str | os.PathLike[str] | None = None,
        *,
        max_queue: int | None = None,
        durable: bool | None = None,
        max_input_bytes: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> Spool:
        """Create the layout (idempotent) and store the given settings.

        Settings not given keep their stored value (defaults: no queue limit,
        durable, 64 MiB inputs). Directories are created 2770: group
        members may produce, others get nothing, and the setgid bit keeps
        new entries in the spool's group.
        """
        path = os.path.abspath(os.fspath(root or os.environ.get("SPOOLQ_ROOT") or DEFAULT_ROOT))
        for sub in ("", *STATE_DIRS, os.path.join("locks", "servers")):
            directory = os.path.join(path, sub) if sub else path
            try:
                os.mkdir(directory, 0o770)
            except FileExistsError:
                continue  # an existing directory keeps the mode its operator gave it
            # mkdir ignores the setgid bit: set it so entries keep the spool's group.
            os.chmod(directory, 0o2770 & ~_umask())
        settings_path = os.path.join(path, "spool.json")
        try:
            with open(settings_path, "rb") as fh:
                settings = json.load(fh)
        except FileNotFoundError:
            settings = {"format": SPOOL_FORMAT, "max_queue": 0, "durable": True, "max_input_bytes": DEFAULT_MAX_INPUT}
        except ValueError as exc:
            raise SpoolError(f"{settings_path} is not valid JSON ({exc}); fix or remove it") from None
        if max_queue is not None:
            if max_queue < 0:
                raise SpoolError("--max-queue must be 0 (unlimited) or positive")
            settings["max_queue"] = int(max_queue)
        if durable is not None:
            settings["durable"] = bool(durable)
        if max_input_bytes is not None:
            if max_input_bytes <= 0:
                raise SpoolError("--max-input-bytes must be positive")
            settings["max_input_bytes"] = int(max_input_bytes)
        dfd = fsutil.open_dir(path)
        try:
            fsutil.write_new_replacing(dfd, "spool.json.tmp", json.dumps(settings, indent=1).encode() + b"\n", sync=True)
            os.rename("spool.json.tmp", "spool.json", src_dir_fd=dfd, dst_dir_fd=dfd)
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return cls(path, clock=clock)

    def _p(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def _check_layout(self) -> None:
        """Refuse a missing, unsafe or split spool before touching it.

        * others may not write the root or a state directory (pickle is code);
        * no state directory may be a symlink;
        * all state directories must share one filesystem (rename, not copy).
        """
        try:
            root_st = os.stat(self.root)
        except FileNotFoundError:
            raise SpoolError(f"no spool at {self.root}: run 'spoolq init' (or set --root / SPOOLQ_ROOT)") from None
        if not stat.S_ISDIR(root_st.st_mode):
            raise SpoolError(f"spool root {self.root} is not a directory")
        self._check_mode(self.root, root_st)
        for name in STATE_DIRS:
            path = self._p(name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                raise SpoolError(f"{self.root} is not a complete spool ({name}/ is missing): run 'spoolq init'") from None
            if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
                raise UnsafeSpool(f"{path} must be a real directory, not a symlink or file")
            self._check_mode(path, st)
            if st.st_dev != root_st.st_dev:
                raise CrossDevice(
                    f"{path} is on another filesystem than {self.root}: tasks move by rename, "
                    "so every spool directory must live on one filesystem"
                )
            if st.st_uid != root_st.st_uid and st.st_uid != 0:
                raise UnsafeSpool(
                    f"{path} is owned by uid {st.st_uid}, the spool root by uid {root_st.st_uid}: "
                    f"fix with: chown -R {root_st.st_uid} {self.root}"
                )

    @staticmethod
    def _check_mode(path: str, st: os.stat_result) -> None:
        if st.st_mode & stat.S_IWOTH:
            raise UnsafeSpool(
                f"{path} is writable by any user (mode {stat.S_IMODE(st.st_mode):04o}); its pickles "
                f"run as code in the worker: fix with: chmod o-w {path}"
            )

    def _read_settings(self) -> dict[str, Any]:
        try:
            with open(self._p("spool.json"), "rb") as fh:
                return dict(json.load(fh))
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise SpoolError(f"{self._p('spool.json')} is not valid JSON ({exc})") from None

    # ------------------------------------------------------------------ types

    def register_type(
        self,
        name: str,
        handler: str,
        *,
        timeout: float = 3600,
        retention: float = -1,
        max_restarts: int = 2,
    ) -> TaskType:
        """Create or update a task type; atomic (tmp + rename).

        As in ATP, a negative timeout becomes 0, any retention <= 0 means
        keep forever (-1) and a negative max_restarts becomes 0.
        """
        check_type(name)
        if not isinstance(handler, str) or "." not in handler.strip(".") or any(c.isspace() for c in handler):
            raise SpoolError(f"handler must be a dotted import path like 'pkg.module.func', not {handler!r}")
        ttype = TaskType(
            name=name,
            handler=handler,
            timeout=max(0.0, float(timeout)),
            retention=float(retention) if retention > 0 else -1.0,
            max_restarts=max(0, int(max_restarts)),
        )
        dfd = fsutil.open_dir(self._p("types"))
        try:
            tmp = f".{name}.json.{os.getpid()}.{secrets.token_hex(4)}"
            fsutil.write_new(dfd, tmp, json.dumps(ttype.to_json(), indent=1).encode() + b"\n", sync=self.durable)
            os.rename(tmp, f"{name}.json", src_dir_fd=dfd, dst_dir_fd=dfd)
            if self.durable:
                os.fsync(dfd)
        finally:
            os.close(dfd)
        self._types.pop(name, None)
        return ttype

    def get_type(self, name: str) -> TaskType:
        """The registered type *name* (cached until its file is replaced)."""
        check_type(name)
        path = self._p("types", f"{name}.json")
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise UnknownType(f"unknown task type {name!r}: register it first") from None
        # File times are only as fine as the kernel's tick, so a type
        # registered again within one tick keeps its mtime; the replacing
        # rename gives it a new inode and ctime, which the key includes.
        key = (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        cached = self._types.get(name)
        if cached and cached[0] == key:
            return cached[1]
        dfd = fsutil.open_dir(self._p("types"))
        try:
            raw = json.loads(fsutil.read_file(dfd, f"{name}.json"))
            ttype = TaskType(
                name=name,
                handler=str(raw["handler"]),
                timeout=float(raw.get("timeout", 3600)),
                retention=float(raw.get("retention", -1)),
                max_restarts=int(raw.get("max_restarts", 2)),
            )
        except FileNotFoundError:
            raise UnknownType(f"unknown task type {name!r}: register it first") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise SpoolError(f"{path} is corrupt ({exc}): register the type again") from None
        finally:
            os.close(dfd)
        self._types[name] = (key, ttype)
        return ttype

    def types(self) -> list[TaskType]:
        """All registered types, sorted by name."""
        out = []
        for entry in sorted(os.listdir(self._p("types"))):
            if entry.endswith(".json") and not entry.startswith("."):
                try:
                    out.append(self.get_type(entry[:-5]))
                except (UnknownType, InvalidName):
                    continue
        return out

    def unregister_type(self, name: str, *, force: bool = False) -> list[SweepAction]:
        """Remove type *name*. With tasks of that type present this raises
        TypeInUse, unless *force*, which deletes those tasks first."""
        self.get_type(name)
        tasks = [t for t in self.iter_tasks() if t[0] == name]
        if tasks and not force:
            raise TypeInUse(f"task type {name!r} still has {len(tasks)} task(s): delete them or use force")
        removed = []
        for type_name, task_id, _ in tasks:
            try:
                self.delete(type_name, task_id)
                removed.append(SweepAction(type_name, task_id, "deleted", "type unregistered"))
            except TaskNotFound:
                pass
        os.unlink(self._p("types", f"{name}.json"))
        if self.durable:
            fsutil.fsync_dir(self._p("types"))
        self._types.pop(name, None)
        return removed

    # ------------------------------------------------------------------ enqueue

    def enqueue(self, type_name: str, task_id: str, input: Any = None, *, message: str = "") -> TaskInfo:
        """Enqueue task (type, id) with *input* pickled. See :meth:`enqueue_pickled`."""
        try:
            payload = pickle.dumps(input, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise InvalidInput(f"input cannot be pickled: {type(exc).__name__}: {exc}") from None
        return self._enqueue(type_name, task_id, INPUT_PICKLE, payload, message)

    def enqueue_pickled(self, type_name: str, task_id: str, payload: bytes, *, message: str = "") -> TaskInfo:
        """Enqueue task (type, id) whose input is already-pickled bytes.

        The bytes are checked to be one well-formed pickle (without running
        it). The task appears in ``enqueued/`` whole or not at all. Raises
        InvalidName, UnknownType, InvalidInput, TaskExists or QueueFull, and
        in each case leaves nothing behind.
        """
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise InvalidInput("pickled input must be bytes")
        payload = bytes(payload)
        _check_pickle(payload)
        return self._enqueue(type_name, task_id, INPUT_PICKLE, payload, message)

    def enqueue_json(self, type_name: str, task_id: str, value: Any, *, message: str = "") -> TaskInfo:
        """Enqueue task (type, id) whose input is stored as JSON (``input.json``)."""
        if isinstance(value, (bytes, bytearray)):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise InvalidInput(f"input is not valid JSON: {exc}") from None
        try:
            payload = json.dumps(value).encode()
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"input cannot be stored as JSON: {exc}") from None
        return self._enqueue(type_name, task_id, INPUT_JSON, payload, message)

    def _enqueue(self, type_name: str, task_id: str, input_name: str, payload: bytes, message: str) -> TaskInfo:
        name = task_name(type_name, task_id)
        self.get_type(type_name)
        if len(payload) > self.max_input_bytes:
            raise InvalidInput(
                f"input is {len(payload)} bytes, over the spool's limit of {self.max_input_bytes} "
                "(spoolq init --max-input-bytes): pass large data by path instead"
            )
        now = self.clock()
        doc = {
            "type": type_name,
            "id": task_id,
            "state": State.ENQUEUED.name,
            "input": input_name,
            "server": None,
            # The claim counter starts at the enqueue time in microseconds, so
            # claim numbers never repeat across lives of one (type, id): a
            # handler of a deleted task cannot write into its successor.
            "claim": time.time_ns() // 1000,
            "starts": 0,
            "restarts": 0,
            "enqueued_at": _iso(now),
            "claimed_at": None,
            "started_at": None,
            "finished_at": None,
            "updated_at": _iso(now),
            "response_mime": None,
            "message": message,
        }
        stage = self._p("tmp", f"{name}.{os.getpid()}.{secrets.token_hex(6)}")
        os.mkdir(stage, 0o770)
        try:
            sync = self.durable
            dfd = fsutil.open_dir(stage)
            try:
                fsutil.write_new(dfd, input_name, payload, sync=sync)
                fsutil.write_new(dfd, STATUS, _status_bytes(doc), sync=sync)
                fsutil.write_new(dfd, LOG, _log_line(now, State.ENQUEUED, message), sync=sync)
                # The mtime is the FIFO key; set after the last write to the directory.
                stamp = self._fifo.next(now)
                os.utime(dfd, ns=(stamp, stamp))
                if sync:
                    os.fsync(dfd)
            finally:
                os.close(dfd)
            crashpoint("enqueue.staged")
            dest = self._p("enqueued", name)
            with self._enqueue_lock:
                if self._locate(type_name, task_id) is not None:
                    raise TaskExists(f"task {type_name}/{task_id} already exists")
                if self.max_queue and self.count_enqueued() >= self.max_queue:
                    raise QueueFull(f"queue is full ({self.max_queue} tasks waiting): retry later")
                try:
                    fsutil.rename_noreplace(stage, dest)
                except OSError as exc:
                    if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                        raise TaskExists(f"task {type_name}/{task_id} already exists") from None
                    raise
            crashpoint("enqueue.published")
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        if self.durable:
            fsutil.fsync_dir(self._p("enqueued"))
            fsutil.fsync_dir(self._p("tmp"))
        return TaskInfo(type_name, task_id, State.ENQUEUED, dest, doc)

    def count_enqueued(self) -> int:
        """Number of waiting tasks (entries of ``enqueued/``)."""
        return len(os.listdir(self._p("enqueued")))

    # ------------------------------------------------------------------ lookup

    def _locate(self, type_name: str, task_id: str) -> str | None:
        """Path of task (type, id), probing the state directories in
        lifecycle order: a task moving forward during the probe is still
        found. A fixed number of stats (one per server in scheduled/)."""
        name = task_name(type_name, task_id)
        candidates = [self._p("enqueued", name)]
        try:
            servers = sorted(os.listdir(self._p("scheduled")))
        except FileNotFoundError:
            servers = []
        candidates += [self._p("scheduled", s, name) for s in servers]
        candidates += [self._p("running", name), self._p("done", name)]
        for path in candidates:
            try:
                os.lstat(path)
                return path
            except (FileNotFoundError, NotADirectoryError):
                continue
        return None

    def locate(self, type_name: str, task_id: str) -> str:
        """Path of task (type, id); raises TaskNotFound.

        A task is never reported missing while it moves: a miss is retried,
        the last time under the enqueue lock, which stops every backward move.
        """
        for _ in range(2):
            path = self._locate(type_name, task_id)
            if path is not None:
                return path
        with self._enqueue_lock:
            path = self._locate(type_name, task_id)
        if path is None:
            raise TaskNotFound(f"no task {type_name}/{task_id}")
        return path

    def status(self, type_name: str, task_id: str) -> TaskInfo:
        """The task's status document (read without locking: status.json is
        only ever replaced whole)."""
        for _ in range(5):
            path = self.locate(type_name, task_id)
            try:
                dfd = fsutil.open_dir(path)
            except FileNotFoundError:
                continue  # moved between locate and open: look again
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise CorruptTask(f"{path} is not a task directory (symlink or file)") from None
                raise
            try:
                doc = self._read_status(dfd, path)
            finally:
                os.close(dfd)
            return TaskInfo(type_name, task_id, State[doc["state"]], path, doc)
        raise TaskNotFound(f"no task {type_name}/{task_id}")

    def _read_status(self, dfd: int, path: str) -> dict[str, Any]:
        try:
            doc = json.loads(fsutil.read_file(dfd, STATUS))
            State[doc["state"]]
            if not isinstance(doc.get("claim"), int):
                raise ValueError("claim is not a number")
            return dict(doc)
        except FileNotFoundError:
            raise CorruptTask(f"{path} has no status.json") from None
        except OSError as exc:
            raise CorruptTask(f"{path}/status.json cannot be read: {exc}") from None
        except (ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: "[[[[…" nested too deep
            raise CorruptTask(f"{path}/status.json is corrupt: {exc}") from None

    def _peek_status(self, path: str) -> dict[str, Any]:
        """``status.json`` of the task directory *path*, read without its
        lock (the file is only ever replaced whole). Raises OSError when the
        directory cannot be opened (gone, or not a directory) and
        CorruptTask when the status cannot be trusted."""
        dfd = fsutil.open_dir(path)
        try:
            return self._read_status(dfd, path)
        finally:
            os.close(dfd)

    def _roll_forward(self, dfd: int) -> None:
        """Finish or undo a status change a crash interrupted.

        A status change writes ``status.json.tmp``, then its log record, then
        renames the status into place. A leftover tmp whose time and state
        match the last log record was logged, so it is put in place; any
        other leftover never happened and is removed.
        """
        try:
            raw = fsutil.read_file(dfd, STATUS + ".tmp")
        except FileNotFoundError:
            return
        try:
            pending = json.loads(raw)
            records = list(self._parse_log(fsutil.read_file(dfd, LOG)))
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
        if self.durable:
            os.fsync(dfd)

    def log_records(self, type_name: str, task_id: str) -> list[LogRecord]:
        """The task's log, oldest first. A torn last line (a crash in the
        middle of an append) is ignored."""
        raw = self._read_task_file(type_name, task_id, LOG, lambda path: CorruptTask(f"{path} has no log"))
        return list(self._parse_log(raw))

    def _read_task_file(
        self, type_name: str, task_id: str, filename: str, missing: Callable[[str], SpoolqError]
    ) -> bytes:
        """Content of one file of task (type, id). A task that moves between
        locating and opening it is located again; once opened, the directory
        descriptor follows it. ``missing(path)`` is raised if the file is not
        there."""
        for _ in range(5):
            path = self.locate(type_name, task_id)
            try:
                dfd = fsutil.open_dir(path)
            except FileNotFoundError:
                continue
            try:
                return fsutil.read_file(dfd, filename)
            except FileNotFoundError:
                raise missing(path) from None
            finally:
                os.close(dfd)
        raise TaskNotFound(f"no task {type_name}/{task_id}")

    @staticmethod
    def _parse_log(raw: bytes) -> Iterator[LogRecord]:
        for line in raw.decode("utf-8", "replace").split("\n")[:-1]:
            parts = line.split("\t", 2)
            if len(parts) != 3:
                continue
            try:
                yield LogRecord(datetime.fromisoformat(parts[0]), State[parts[1]], _unescape(parts[2]))
            except (ValueError, KeyError):
                continue

    def response(self, type_name: str, task_id: str) -> tuple[bytes, str]:
        """(data, MIME type) of the stored response; raises NoResponse."""
        data = self._read_task_file(
            type_name, task_id, RESPONSE, lambda path: NoResponse(f"task {type_name}/{task_id} has no response")
        )
        mime = self.status(type_name, task_id).doc.get("response_mime")
        return data, mime or "application/octet-stream"

    def iter_tasks(self, state: State | None = None) -> Iterator[tuple[str, str, str]]:
        """(type, id, path) of every task, by state directory; entries that
        are not task names (staging, hand-made junk) are skipped."""
        dirs: list[str] = []
        if state in (None, State.ENQUEUED):
            dirs.append(self._p("enqueued"))
        if state in (None, State.SCHEDULED):
            for server in sorted(os.listdir(self._p("scheduled"))):
                dirs.append(self._p("scheduled", server))
        if state in (None, State.RUNNING, State.PAUSED):
            dirs.append(self._p("running"))
        if state in (None, State.FINISHED, State.FAILED):
            dirs.append(self._p("done"))
        for directory in dirs:
            try:
                names = sorted(os.listdir(directory))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name in names:
                parts = split_task_name(name)
                if parts:
                    yield parts[0], parts[1], os.path.join(directory, name)

    def list_tasks(self, *, state: State | None = None, type_name: str | None = None) -> list[TaskInfo]:
        """Status of every task (optionally of one state and/or type)."""
        out = []
        for t, i, path in self.iter_tasks(state):
            if type_name and t != type_name:
                continue
            try:
                doc = self._peek_status(path)
            except (OSError, CorruptTask):
                continue
            info = TaskInfo(t, i, State[doc["state"]], path, doc)
            if state is None or info.state == state:
                out.append(info)
        return out

    def counts(self) -> dict[str, int]:
        """Tasks per state. Waiting and scheduled tasks are counted from
        directory entries; running and done ones read their status to tell
        RUNNING from PAUSED and FINISHED from FAILED."""
        out = {s.name: 0 for s in State}
        out[State.ENQUEUED.name] = self.count_enqueued()
        for server in os.listdir(self._p("scheduled")):
            try:
                out[State.SCHEDULED.name] += len(os.listdir(self._p("scheduled", server)))
            except NotADirectoryError:
                continue
        for state in (State.RUNNING, State.FINISHED):
            for t, i, path in self.iter_tasks(state):
                try:
                    out[self._peek_status(path)["state"]] += 1
                except (OSError, CorruptTask):
                    continue
        return out

    def waiting(self) -> list[str]:
        """Names in ``enqueued/``, oldest first (FIFO by mtime, then name)."""
        return [name for _, name in self._waiting_keyed()]

    def _waiting_keyed(self) -> list[tuple[int, str]]:
        """(FIFO key, name) of every entry in ``enqueued/``, oldest first."""
        keyed = []
        with os.scandir(self._p("enqueued")) as it:
            for entry in it:
                try:
                    keyed.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.name))
                except FileNotFoundError:
                    continue
        keyed.sort()
        return keyed

    def fifo_key(self, name: str) -> tuple[int, str] | None:
        """The FIFO key of one waiting entry, or None if it is gone."""
        try:
            return os.lstat(self._p("enqueued", name)).st_mtime_ns, name
        except (FileNotFoundError, NotADirectoryError):
            return None

    # ------------------------------------------------------------------ servers

    def hold_server(self, server: str, *, wait: float = 2.0) -> None:
        """Become *server*: take its lock for the life of this process.

        A live server is one whose lock is held; sweepers treat the claims of
        a server whose lock is free as abandoned. Raises ServerBusy when
        another process holds it; a sweeper's momentary probe is waited out
        for up to *wait* seconds.
        """
        check_server(server)
        if server in self._server_locks:
            return
        path = self._p("locks", "servers", f"{server}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o660)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise ServerBusy(f"server {server!r} is already running on {self.root}") from None
                time.sleep(0.02)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._make_server_dir(server)
        except BaseException:
            os.close(fd)
            raise
        self._server_locks[server] = fd

    def _make_server_dir(self, server: str) -> None:
        """Create ``scheduled/SERVER/`` if missing, under the enqueue lock:
        so the set of server directories never changes while the lock is
        held, and :meth:`_locate` under the lock cannot miss a task claimed
        into a brand-new server directory. A symlink there is refused."""
        path = self._p("scheduled", server)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            with self._enqueue_lock:
                try:
                    # Plain 0770: the setgid bit is inherited from scheduled/,
                    # and asking for it is refused under RestrictSUIDSGID=yes.
                    os.mkdir(path, 0o770)
                except FileExistsError:
                    pass
                st = os.lstat(path)
            if self.durable:
                fsutil.fsync_dir(self._p("scheduled"))
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeSpool(f"{path} must be a real directory, not a symlink or file: move it away")

    def release_server(self, server: str) -> None:
        """Stop being *server*: its lock is free, so sweepers treat what it
        still holds as abandoned."""
        fd = self._server_locks.pop(server, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Release every server this object holds."""
        for server in list(self._server_locks):
            self.release_server(server)

    def server_alive(self, server: str) -> bool:
        """True while some process holds *server*'s lock."""
        if server in self._server_locks:
            return True
        try:
            fd = os.open(self._p("locks", "servers", f"{server}.lock"), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, InvalidName, OSError):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def servers(self) -> list[str]:
        """Every server that ever claimed here (has a scheduled/ directory)."""
        return sorted(os.listdir(self._p("scheduled")))

    # ------------------------------------------------------------------ claim & start

    def claim(self, server: str, *, names: list[str] | None = None, message: str = "") -> Claim | None:
        """Claim the oldest waiting task for *server*; None if none is left.

        The claim is the rename ``enqueued/X`` → ``scheduled/SERVER/X``: of
        any number of racing claimers exactly one rename succeeds, the others
        get ENOENT and try the next task. *names* (oldest first) lets a
        caller with its own index of ``enqueued/`` skip the directory scan.
        Without it, the spool keeps the last scan of ``enqueued/`` and works
        down it, scanning again only when it is used up, so a run of claims
        costs one scan, not one per claim; an entry re-enqueued since the scan
        (its FIFO key changed) is left for a later scan, at the back.
        Corrupt entries met on the way are quarantined.
        """
        self.hold_server(server)
        if names is not None:
            for name in names:
                claim = self._claim_one(server, name, message)
                if claim is not None:
                    return claim
            return None
        for _ in range(3):
            if not self._scan:
                self._scan = collections.deque(self._waiting_keyed())
                if not self._scan:
                    return None
            while self._scan:
                key, name = self._scan.popleft()
                if self.fifo_key(name) != (key, name):
                    continue  # claimed meanwhile, or re-enqueued to the back
                claim = self._claim_one(server, name, message)
                if claim is not None:
                    return claim
        return None

    def _claim_one(self, server: str, name: str, message: str) -> Claim | None:
        """Try to claim waiting entry *name*; None if another claimer won or
        the entry could not be trusted (then it is quarantined)."""
        parts = split_task_name(name)
        if not parts:
            self._quarantine(self._p("enqueued", name), "not a task name")
            return None
        src = self._p("enqueued", name)
        dest = self._p("scheduled", server, name)
        try:
            fsutil.rename_noreplace(src, dest)
        except (FileNotFoundError, NotADirectoryError):
            return None  # another claimer won
        except FileExistsError:
            log.warning("stale leftover %s blocks a claim; quarantining it", dest)
            self._quarantine(dest, "leftover in scheduled/ blocked a claim")
            return None
        crashpoint("claim.renamed")
        if self.durable:
            # The move is durable before the status written for its new place
            # (else a power loss could leave enqueued/X saying SCHEDULED).
            fsutil.fsync_dir(self._p("enqueued"))
            fsutil.fsync_dir(self._p("scheduled", server))
        try:
            with _TaskDir(self, dest) as task:
                if task.state != State.ENQUEUED:
                    raise CorruptTask(f"{name} was waiting but its status says {task.state.name}")
                number = int(task.doc["claim"]) + 1
                task.write(
                    State.SCHEDULED,
                    message,
                    server=server,
                    claim=number,
                    claimed_at=_iso(self.clock()),
                )
        except CorruptTask as exc:
            self._quarantine(dest, str(exc))
            return None
        except (FileNotFoundError, _Moved):
            return None  # deleted right after the claim
        except OSError:
            # The status could not be written (disk full): undo the claim,
            # or the task would sit in scheduled/ of a live server for good.
            # A move backwards: under the enqueue lock, like every other one,
            # so a lookup under that lock cannot miss the task (§5 of design.md).
            try:
                with self._enqueue_lock:
                    fsutil.rename_noreplace(dest, src)
            except OSError:
                pass  # left for recover_server
            raise
        return Claim(parts[0], parts[1], number, server)

    def _claimed(self, claim: Claim, allowed: set[State]) -> _TaskDir:
        """Open and lock the task of *claim*, checking the claim still owns it.

        Raises StaleClaim if it was re-enqueued, claimed again, deleted, or
        is in a state outside *allowed*. The places are probed in lifecycle
        order (scheduled, running, done): a task moving forward meanwhile is
        met further on, and a move backwards makes the claim stale anyway.
        """
        for path in (
            self._p("scheduled", claim.server, claim.name),
            self._p("running", claim.name),
            self._p("done", claim.name),
        ):
            task = _TaskDir(self, path)
            try:
                task.__enter__()
            except (FileNotFoundError, NotADirectoryError, _Moved):
                continue
            ours = task.doc.get("claim") == claim.number and task.doc.get("server") == claim.server
            if ours and task.state in allowed:
                return task
            state = task.state
            task.__exit__()
            if ours and state.terminal:
                raise StaleClaim(f"task {claim.type}/{claim.id} is already {state.name}")
            if ours:
                raise StaleClaim(f"task {claim.type}/{claim.id} is {state.name}: that change is not allowed")
            raise StaleClaim(f"claim {claim} no longer owns task {claim.type}/{claim.id} (now {state.name})")
        raise StaleClaim(f"claim {claim} no longer owns task {claim.type}/{claim.id} (it was moved or deleted)")

    def start(self, claim: Claim | str) -> StartedTask:
        """Move a claimed task to ``running/``, count the start and load its
        input: (type, id, handler path, input).

        If the input cannot be loaded the task is FAILED (with the reason in
        its log) and CorruptTask is raised; a task directory whose input file
        is missing is quarantined.
        """
        claim = Claim.parse(claim)
        ttype = self.get_type(claim.type)
        # Unpickling runs code: look again that nobody else can write here
        # (the spool's modes may have changed since it was opened).
        self._check_layout()
        task = self._claimed(claim, {State.SCHEDULED})
        try:
            input_name = task.doc.get("input") or INPUT_PICKLE
            what = None
            if input_name not in (INPUT_PICKLE, INPUT_JSON):
                what = f"status.json names an unknown input file {str(input_name)[:40]!r}"
            else:
                try:
                    raw = fsutil.read_file(task.fd, input_name)
                except FileNotFoundError:
                    what = f"{input_name} is missing"
                except OSError as exc:
                    what = f"{input_name} cannot be read: {exc.strerror}"
            if what is not None:
                path = task.path
                task.__exit__()
                self._quarantine(path, what)
                raise CorruptTask(f"task {claim.type}/{claim.id}: {what} (moved to quarantine)") from None
            task.move(self._p("running", claim.name))
            task.write(
                State.RUNNING,
                "",
                starts=int(task.doc.get("starts", 0)) + 1,
                started_at=_iso(self.clock()),
            )
            crashpoint("start.running")
            try:
                value = json.loads(raw) if input_name == INPUT_JSON else pickle.loads(raw)
            except (Exception, SystemExit) as exc:
                reason = f"input cannot be loaded: {type(exc).__name__}: {exc}"
                self._finish_locked(task, State.FAILED, reason)
                raise CorruptTask(f"task {claim.type}/{claim.id}: {reason}") from None
            return StartedTask(claim.type, claim.id, ttype.handler, value)
        finally:
            if task.fd >= 0:
                task.__exit__()

    # ------------------------------------------------------------------ changes by the claim holder

    def set_state(self, claim: Claim | str, state: State, message: str = "") -> None:
        """Change the task's state through its claim and append one log
        record. FINISHED/FAILED also move it to ``done/``. Raises StaleClaim
        (and changes nothing) if the claim lost the task or it is final."""
        claim = Claim.parse(claim)
        state = State(state)
        if state not in (State.RUNNING, State.PAUSED, State.FINISHED, State.FAILED):
            raise SpoolError(f"a handler cannot set state {state.name}")
        allowed = {s for s, targets in _ALLOWED.items() if state in targets}
        with self._claimed(claim, allowed) as task:
            if state.terminal:
                self._finish_locked(task, state, message)
            else:
                task.write(state, message)

    def finish_if_not_finished(self, claim: Claim | str, message: str = "") -> bool:
        """Set FINISHED unless the task is already final; True if it changed
        (ATP's stopTaskSuccessIfNotFinished)."""
        claim = Claim.parse(claim)
        try:
            self.set_state(claim, State.FINISHED, message)
            return True
        except StaleClaim as exc:
            # Final already through this very claim: that is fine; anything
            # else (claim lost) is the caller's to know.
            stale = exc
        path = self._p("done", claim.name)
        try:
            dfd = fsutil.open_dir(path)
        except OSError:
            raise stale from None
        try:
            doc = self._read_status(dfd, path)
        except CorruptTask:
            raise stale from None
        finally:
            os.close(dfd)
        if doc.get("claim") == claim.number and doc.get("server") == claim.server:
            return False
        raise stale

    def log_message(self, claim: Claim | str, message: str) -> None:
        """Append a free-text record (the current state, *message*) to the log."""
        claim = Claim.parse(claim)
        with self._claimed(claim, set(_ALLOWED)) as task:
            fsutil.append(task.fd, LOG, _log_line(self.clock(), task.state, message), sync=self.durable)

    def store_response(self, claim: Claim | str, data: bytes | str, mime_type: str = "text/xml") -> None:
        """Store (or replace) the response and its MIME type; a str is stored
        as UTF-8. Atomic: readers see the old or the new response."""
        claim = Claim.parse(claim)
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidInput(f"a response must be bytes or str, not {type(data).__name__}")
        with self._claimed(claim, set(_ALLOWED)) as task:
            fsutil.replace_file(task.fd, RESPONSE, bytes(data), sync=self.durable)
            crashpoint("response.stored")
            task.write(task.state, task.doc.get("message", ""), record=False, response_mime=str(mime_type))

    def touch(self, claim: Claim | str) -> bool:
        """Heartbeat: set the running task's mtime to now. False if this
        claim no longer holds a started task there (not started yet, taken
        away, claimed again by another run, finished or deleted), so a
        daemon learns its handler lost the task. Reads the status without
        the task lock: a heartbeat must not wait for a status write."""
        claim = Claim.parse(claim)
        path = self._p("running", claim.name)
        try:
            dfd = fsutil.open_dir(path)
        except OSError:
            return False
        try:
            doc = self._read_status(dfd, path)
            if doc.get("claim") != claim.number or doc.get("server") != claim.server:
                return False
            if doc.get("state") not in (State.RUNNING.name, State.PAUSED.name):
                return False
            ns = int(self.clock() * 1e9)
            os.utime(dfd, ns=(ns, ns))
            return True
        except CorruptTask:
            return False
        finally:
            os.close(dfd)

    def _finish_locked(self, task: _TaskDir, state: State, message: str) -> None:
        now = self.clock()
        task.write(state, message, finished_at=_iso(now))
        crashpoint("finish.status_written")
        name = os.path.basename(task.path)
        task.move(self._p("done", name), mtime_ns=int(now * 1e9))
        crashpoint("finish.moved")

    # ------------------------------------------------------------------ taking tasks away

    def abandon(self, claim: Claim | str, reason: str, *, charge: bool = True) -> str:
        """Take a task away from its claim: re-enqueue it, or fail it once
        its restarts are used up. Returns 'reenqueued', 'failed' or 'gone'.

        *charge*: whether this counts against ``max_restarts`` (timeouts and
        abandonment do; a graceful-shutdown hand-back does not). A task that
        was never started is never charged.
        """
        claim = Claim.parse(claim)
        for path in (self._p("running", claim.name), self._p("scheduled", claim.server, claim.name)):
            result = self._take_away(path, reason, charge=charge, expect_claim=claim.number)
            if result != "gone":
                return result
        return "gone"

    def _take_away(
        self,
        path: str,
        reason: str,
        *,
        charge: bool,
        expect_claim: int | None = None,
        confirm: Callable[[dict[str, Any]], str | None] | None = None,
    ) -> str:
        """Under the enqueue lock and the task's lock: re-enqueue the task at
        *path* (or fail it, once its restarts are used up). "gone" if it is
        no longer there, no longer at claim *expect_claim*, or *confirm*
        (given the status read under the lock) finds nothing wrong."""
        with self._enqueue_lock:
            try:
                task = _TaskDir(self, path).__enter__()
            except (FileNotFoundError, NotADirectoryError, _Moved):
                return "gone"
            try:
                if expect_claim is not None and task.doc.get("claim") != expect_claim:
                    return "gone"
                if confirm is not None:
                    confirmed = confirm(task.doc)
                    if confirmed is None:
                        return "gone"
                    reason = confirmed
                state = task.state
                if state.terminal:
                    # Crashed between the final status write and the move.
                    task.move(self._p("done", os.path.basename(path)), mtime_ns=int(self.clock() * 1e9))
                    return "finished move"
                if state == State.ENQUEUED:
                    # Crashed between the claim rename and its status write.
                    self._requeue_locked(task, reason or "claim was interrupted")
                    return "reenqueued"
                started = state in (State.RUNNING, State.PAUSED)
                ttype = self._type_or_none(task.doc["type"])
                max_restarts = ttype.max_restarts if ttype else 0
                if started and charge:
                    restarts = int(task.doc.get("restarts", 0))
                    if restarts >= max_restarts:
                        starts = int(task.doc.get("starts", 0))
                        self._finish_locked(task, State.FAILED, f"{reason}; gave up after {starts} start(s)")
                        return "failed"
                    task.doc["restarts"] = restarts + 1
                self._requeue_locked(task, reason)
                return "reenqueued"
            finally:
                if task.fd >= 0:
                    task.__exit__()

    def _requeue_locked(self, task: _TaskDir, reason: str) -> None:
        """Back to ``enqueued/`` (caller holds the enqueue lock and the task).
        It goes to the back of the queue; the queue limit is not applied."""
        task.write(State.ENQUEUED, reason, server=None, claimed_at=None)
        now = self.clock()
        name = os.path.basename(task.path)
        task.move(self._p("enqueued", name), mtime_ns=self._fifo.next(now))
        crashpoint("requeue.moved")

    def hand_back(self, claim: Claim | str, reason: str = "handed back") -> str:
        """Return a claimed task to the queue without charging a restart."""
        return self.abandon(claim, reason, charge=False)

    def _type_or_none(self, name: str) -> TaskType | None:
        try:
            return self.get_type(name)
        except (UnknownType, SpoolError, InvalidName):
            return None

    def delete(self, type_name: str, task_id: str) -> None:
        """Remove the task in whatever state. Atomic: it is renamed into
        ``tmp/`` first (so it vanishes at once), then removed. A running
        handler's later writes are refused; the daemon kills it."""
        for _ in range(5):
            path = self.locate(type_name, task_id)
            trash = self._p("tmp", f".trash.{os.path.basename(path)}.{secrets.token_hex(6)}")
            try:
                with _TaskDir(self, path) as task:
                    task.move(trash)
            except (FileNotFoundError, _Moved):
                continue
            except CorruptTask:
                try:
                    os.rename(path, trash)  # a symlink is moved, not followed
                except FileNotFoundError:
                    continue
            _remove(trash)
            return
        raise TaskNotFound(f"no task {type_name}/{task_id}")

    # ------------------------------------------------------------------ sweeps

    def reenqueue_zombies(self, message: str = "") -> list[SweepAction]:
        """One pass over ``scheduled/`` and ``running/``: a task whose server
        is dead, or that runs past its type's timeout (from the claim), is
        re-enqueued while restarts remain, else FAILED. Reads the status of
        just these tasks (bounded by total concurrency, not by spool size).
        Safe to run from several processes at once: each take-away re-checks
        the claim under the task's lock."""
        now = self.clock()
        actions: list[SweepAction] = []
        alive: dict[str, bool] = {}

        def is_alive(server: str | None) -> bool:
            if not server:
                return False
            if server not in alive:
                alive[server] = self.server_alive(server)
            return alive[server]

        for server in self.servers():
            sdir = self._p("scheduled", server)
            try:
                if not stat.S_ISDIR(os.lstat(sdir).st_mode):
                    self._quarantine(sdir, "not a server directory (symlink or file)")
                    continue
                names = os.listdir(sdir)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name in names:
                path = os.path.join(sdir, name)
                verdict = self._zombie_verdict(path, now, is_alive, message)
                if verdict:
                    actions.append(verdict)
        for name in os.listdir(self._p("running")):
            verdict = self._zombie_verdict(self._p("running", name), now, is_alive, message)
            if verdict:
                actions.append(verdict)
        return actions

    def _zombie_verdict(
        self, path: str, now: float, is_alive: Callable[[str | None], bool], message: str
    ) -> SweepAction | None:
        name = os.path.basename(path)
        parts = split_task_name(name)
        if not parts:
            self._quarantine(path, "not a task name")
            return None
        try:
            dfd = fsutil.open_dir(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._quarantine(path, f"not a task directory: {exc.strerror}")
            return None
        try:
            doc = self._read_status(dfd, path)
        except CorruptTask as exc:
            self._quarantine(path, str(exc))
            return None
        finally:
            os.close(dfd)
        reason = self._zombie_reason(doc, path, now, is_alive, message)
        if reason is None:
            return None

        def confirm(locked: dict[str, Any]) -> str | None:
            # Under the task's lock, with a fresh look at the server's lock:
            # a server that came back meanwhile keeps its claim.
            return self._zombie_reason(locked, path, now, self.server_alive, message)

        result = self._take_away(path, reason, charge=True, expect_claim=int(doc["claim"]), confirm=confirm)
        crashpoint("sweep.taken_away")
        if result == "gone":
            return None
        return SweepAction(parts[0], parts[1], result, reason)

    def _zombie_reason(
        self, doc: dict[str, Any], path: str, now: float, is_alive: Callable[[str | None], bool], message: str
    ) -> str | None:
        """Why the task at *path* (in scheduled/ or running/) must be taken
        from its claim, or None if it is fine. A type's timeout <= 0 means
        no time limit."""
        state = State[doc["state"]]
        if state.terminal:
            return "completing an interrupted finish"
        if state == State.ENQUEUED:
            parent = os.path.dirname(path)
            if os.path.dirname(parent) != self._p("scheduled"):
                # In running/: a re-enqueue died between its status write
                # and its move.
                return message or "completing an interrupted re-enqueue"
            # Between a claim's rename and its status write: only a dead
            # claimer leaves it so for long.
            if is_alive(os.path.basename(parent)):
                return None
            return message or "claim was interrupted"
        server = doc.get("server")
        if not is_alive(server):
            return message or f"abandoned: server {server} is gone"
        ttype = self._type_or_none(str(doc.get("type")))
        claimed_at = doc.get("claimed_at")
        if ttype is not None and ttype.timeout > 0 and claimed_at and now - _from_iso(claimed_at) > ttype.timeout:
            return message or f"timed out after {ttype.timeout:g} s"
        return None

    def recover_server(self, server: str, *, keep_scheduled: bool = False) -> list[SweepAction]:
        """Recover what *server* held when it died; call after
        :meth:`hold_server`. Unstarted claims go back to the queue for free
        (unless *keep_scheduled*: a draining server runs them itself);
        started ones are abandoned (a restart is charged)."""
        self.hold_server(server)
        actions = []
        sdir = self._p("scheduled", server)
        for name in [] if keep_scheduled else os.listdir(sdir):
            parts = split_task_name(name)
            if not parts:
                self._quarantine(os.path.join(sdir, name), "not a task name")
                continue
            result = self._take_away(os.path.join(sdir, name), f"handed back: server {server} restarted", charge=False)
            if result != "gone":
                actions.append(SweepAction(parts[0], parts[1], result, "server restarted before start"))
        for name in os.listdir(self._p("running")):
            path = self._p("running", name)
            parts = split_task_name(name)
            if not parts:
                continue
            try:
                doc = self._peek_status(path)
            except OSError:
                continue
            except CorruptTask as exc:
                self._quarantine(path, str(exc))
                continue
            if doc.get("server") != server:
                continue
            reason = f"abandoned: server {server} restarted while it ran"
            result = self._take_away(path, reason, charge=True, expect_claim=int(doc["claim"]))
            crashpoint("recover.taken_away")
            if result != "gone":
                actions.append(SweepAction(parts[0], parts[1], result, reason))
        return actions

    def delete_retired(self) -> list[SweepAction]:
        """Remove tasks in ``done/`` older than their type's retention (from
        the finishing time, the directory's mtime). One lstat per task, no
        status parsing; retention <= 0 keeps tasks forever."""
        now = self.clock()
        actions = []
        types: dict[str, TaskType | None] = {}
        with os.scandir(self._p("done")) as it:
            entries = list(it)
        for entry in entries:
            parts = split_task_name(entry.name)
            if not parts:
                continue
            if parts[0] not in types:
                types[parts[0]] = self._type_or_none(parts[0])
            ttype = types[parts[0]]
            if ttype is None or ttype.retention <= 0:
                continue
            try:
                finished = entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue
            if now - finished <= ttype.retention:
                continue
            trash = self._p("tmp", f".trash.{entry.name}.{secrets.token_hex(6)}")
            try:
                os.rename(entry.path, trash)
            except FileNotFoundError:
                continue  # another sweeper or a delete took it
            crashpoint("retire.renamed")
            _remove(trash)
            crashpoint("sweep.retired")
            actions.append(SweepAction(parts[0], parts[1], "retired", f"older than {ttype.retention:g} s"))
        if actions and self.durable:
            fsutil.fsync_dir(self._p("done"))
        return actions

    def clean_tmp(self, *, grace: float = 900.0) -> int:
        """Remove staging leftovers older than *grace* seconds and any trash
        (interrupted deletes). Returns how many entries were removed."""
        now = self.clock()
        removed = 0
        with os.scandir(self._p("tmp")) as it:
            entries = list(it)
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if entry.name.startswith(".trash.") or now - st.st_mtime > grace:
                _remove(entry.path)
                removed += 1
        return removed

    def _quarantine(self, path: str, reason: str) -> str | None:
        """Move *path* (whatever it is; a symlink is moved, not followed) to
        ``quarantine/`` with a ``.reason`` note beside it. Never deletes."""
        base = os.path.basename(path)[:200]  # room for the suffixes within NAME_MAX
        stamp = datetime.fromtimestamp(self.clock(), timezone.utc).strftime("%Y%m%dT%H%M%S")
        dest = self._p("quarantine", f"{base}.{stamp}.{secrets.token_hex(3)}")
        try:
            os.rename(path, dest)
        except FileNotFoundError:
            return None
        with open(dest + ".reason", "w", encoding="utf-8", errors="backslashreplace") as fh:  # names may not be UTF-8
            fh.write(f"{path}: {reason}\n")
        if self.durable:
            fsutil.fsync_dir(os.path.dirname(path))
            fsutil.fsync_dir(self._p("quarantine"))
        log.warning("quarantined %s: %s", path, reason)
        return dest
