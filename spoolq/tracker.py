"""ATP-compatible API: EOxServer's ``eoxserver.resources.processes.tracker``
names over :class:`spoolq.Spool`, so ATP producers and daemons move over by
changing their import line.

The spool is ``$SPOOLQ_ROOT`` (default ``/var/spool/spoolq``). Differences
from ATP, all fixes of its defects (see docs/design.md, "Decisions"): ``task_id`` is a claim
string ``TYPE:ID#N@SERVER`` rather than a database key, and writes through a
claim that lost its task raise; terminal states are final; ``max_restarts``
is enforced; the stored MIME type follows the latest response; the queue
limit is a spool setting (``spoolq init --max-queue``) and exact.
"""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Any

from . import sweeps
from .errors import (
    InvalidInput,
    InvalidName,
    NoResponse,
    QueueEmpty,
    QueueException,
    QueueFull,
    SpoolqError,
    StaleClaim,
    TaskExists,
    TaskNotFound,
    TypeInUse,
    UnknownType,
    WrongState,
)
from .lifecycle import Action, Claim, State
from .spool import Spool
from .store.codec import DEFAULT_RESPONSE_MIME
from .store.layout import resolve_root
from .task import TaskContext

__all__ = [
    "QueueException", "QueueFull", "QueueEmpty", "TaskStatus", "STATUS2TEXT", "TEXT2STATUS",
    # spoolq's own conditions, for ATP code that wants to catch them
    "SpoolqError", "StaleClaim", "TaskNotFound", "UnknownType", "DoesNotExist", "NoResponse", "TaskExists",
    "TypeInUse", "InvalidName", "InvalidInput", "WrongState",
    "registerTaskType", "unregisterTaskType", "enqueueTask", "dequeueTask", "startTask",
    "reenqueueTask", "getQueueSize", "getMaxQueueSize",
    "getTaskStatus", "getTaskStatusByIdentifier", "getTaskInfo", "getTaskIdentifier",
    "getTaskLog", "getTaskResponse", "setTaskResponse",
    "stopTaskSuccess", "stopTaskFailure", "pauseTask", "resumeTask", "stopTaskSuccessIfNotFinished",
    "deleteTask", "deleteTaskByIdentifier", "reenqueueZombieTasks", "deleteRetiredTasks", "dummyHandler",
]

_spool: Spool | None = None
_chosen = False  # _spool was given by use_spool(), not found at $SPOOLQ_ROOT

# ATP's status tables (EOxServer's ``processes.models``): code -> name and
# name -> code. Code 0 (UNDEFINED) is ATP's and never used by spoolq. Code 1
# is ENQUEUED, the name every spoolq call returns (``getTaskStatus`` ->
# ``(1, "ENQUEUED")``); ATP called it ACCEPTED, and TEXT2STATUS takes both.
STATUS2TEXT: dict[int, str] = {0: "UNDEFINED", **{int(s): s.name for s in State}}
TEXT2STATUS: dict[str, int] = {**{name: code for code, name in STATUS2TEXT.items()}, "ACCEPTED": int(State.ENQUEUED)}


def _get_spool() -> Spool:
    """The spool given to use_spool(), else the process's spool at
    ``$SPOOLQ_ROOT``, reopened if that changed."""
    global _spool
    if _chosen:
        return _spool  # type: ignore[return-value]
    root = resolve_root()
    if _spool is None or _spool.root != root:
        _spool = Spool(root)
    return _spool


def use_spool(spool: Spool | None) -> None:
    """Make the tracker functions work on *spool*, wherever it is (None:
    back to ``$SPOOLQ_ROOT``); for programs and tests with a spool object
    of their own."""
    global _spool, _chosen
    _spool, _chosen = spool, spool is not None


def _pair(state: State) -> tuple[int, str]:
    return int(state), state.name


# --- types -------------------------------------------------------------------


def registerTaskType(identifier: str, handler: str, timeout: float = 3600, timeret: float = -1, maxrestart: int = 2) -> None:
    _get_spool().register_type(identifier, handler, timeout=timeout, retention=timeret, max_restarts=maxrestart)


def unregisterTaskType(identifier: str, force: bool = False) -> None:
    _get_spool().unregister_type(identifier, force=force)


# --- producer ----------------------------------------------------------------


def enqueueTask(type_id: str, identifier: str, input: Any, message: str = "") -> None:
    _get_spool().enqueue(type_id, identifier, input, message=message)


def getQueueSize() -> int:
    return _get_spool().count_enqueued()


def getMaxQueueSize() -> int:
    """The queue limit; ``sys.maxsize`` when the spool has none (``max_queue``
    0), so ATP's ``while getQueueSize() < getMaxQueueSize(): enqueueTask(…)``
    keeps working (ATP's limit was a fixed 64)."""
    return _get_spool().max_queue or sys.maxsize


# --- consumer ----------------------------------------------------------------


def dequeueTask(serverID: str, message: str = "") -> list[str]:
    """Claim the oldest waiting task for server *serverID*: a list holding its
    one task_id. Raises QueueEmpty when there is nothing to claim. The
    process becomes that server (holds its lock) until it exits."""
    claim = _get_spool().claim(str(serverID), message=message)
    if claim is None:
        raise QueueEmpty("no task is waiting")
    return [str(claim)]


def startTask(task_id: str, message: str = "") -> tuple[str, str, str, Any]:
    started = _get_spool().start(task_id, message)
    return started.type, started.id, started.handler, started.input


def reenqueueTask(task_id: str, message: str = "") -> None:
    """Hand the claimed task back; StaleClaim if the claim no longer holds it."""
    if _get_spool().hand_back(task_id, message or "re-enqueued") is Action.GONE:
        raise StaleClaim(f"claim {task_id} no longer holds its task: nothing handed back")


def stopTaskSuccess(task_id: str, message: str = "") -> None:
    _get_spool().set_state(task_id, State.FINISHED, message)


def stopTaskFailure(task_id: str, message: str = "") -> None:
    _get_spool().set_state(task_id, State.FAILED, message)


def pauseTask(task_id: str, message: str = "") -> None:
    _get_spool().set_state(task_id, State.PAUSED, message)


def resumeTask(task_id: str, message: str = "") -> None:
    _get_spool().set_state(task_id, State.RUNNING, message)


def stopTaskSuccessIfNotFinished(task_id: str, message: str = "") -> bool:
    return _get_spool().finish_if_not_finished(task_id, message)


def setTaskResponse(task_id: str, response: bytes | str, mimeType: str | None = DEFAULT_RESPONSE_MIME) -> None:
    _get_spool().store_response(task_id, response, mimeType)


# --- inspection --------------------------------------------------------------


def getTaskStatusByIdentifier(type_id: str, identifier: str) -> tuple[int, str]:
    return _pair(_get_spool().status(type_id, identifier).state)


def getTaskStatus(task_id: str) -> tuple[int, str]:
    claim = Claim.parse(task_id)
    return getTaskStatusByIdentifier(claim.type, claim.id)


def getTaskIdentifier(task_id: str) -> tuple[str, str]:
    claim = Claim.parse(task_id)
    return claim.type, claim.id


def getTaskInfo(task_id: str) -> tuple[str, str, int, str]:
    claim = Claim.parse(task_id)
    return (claim.type, claim.id, *getTaskStatus(task_id))


def getTaskLog(type_id: str, identifier: str) -> list[tuple[datetime, tuple[int, str], str]]:
    return [(r.time, _pair(r.state), r.message) for r in _get_spool().log_records(type_id, identifier)]


def getTaskResponse(type_id: str, identifier: str) -> tuple[bytes, str]:
    return _get_spool().response(type_id, identifier)


# --- removal and maintenance -------------------------------------------------


def deleteTaskByIdentifier(type_id: str, identifier: str) -> None:
    """Delete the task. As in ATP, an unknown type raises and an unknown task
    of a known type is a no-op."""
    _delete(type_id, identifier, None)


def deleteTask(task_id: str) -> None:
    """Delete the task of claim *task_id*: StaleClaim, and nothing deleted,
    once another life of the task holds it; a no-op when it is gone (as
    :func:`deleteTaskByIdentifier`)."""
    claim = Claim.parse(task_id)
    _delete(claim.type, claim.id, claim)


def _delete(type_id: str, identifier: str, through: Claim | None) -> None:
    spool = _get_spool()
    spool.get_type(type_id)  # an unknown type raises, as in ATP
    try:
        spool.delete(type_id, identifier, through=through)
    except TaskNotFound:
        pass


def reenqueueZombieTasks(message: str = "") -> list[tuple[str, str]]:
    """Re-enqueue (or fail, once restarts are used up) abandoned and
    timed-out tasks: [(action, "type::id"), …]."""
    return [(a.action, f"{a.type}::{a.id}") for a in sweeps.reenqueue_zombies(_get_spool(), message)]


def deleteRetiredTasks() -> list[tuple[str, str]]:
    return [(a.action, f"{a.type}::{a.id}") for a in sweeps.delete_retired(_get_spool())]


def dummyHandler(taskStatus: TaskStatus, input: Any) -> None:
    """The no-op handler prototype."""


class TaskStatus(TaskContext):
    """What handlers receive, constructible the ATP way: ``TaskStatus(task_id)``
    works on the tracker's spool. ``dbLock`` is accepted and ignored (the
    filesystem arbitrates). The camelCase methods come from TaskContext.

    ATP's status codes are class constants (``TaskStatus.FINISHED == 5``),
    with ACCEPTED and ENQUEUED both 1 (ATP's ``TaskStatus.ACCEPTED``)."""

    # Plain ints, as in ATP (print(TaskStatus.FINISHED) shows 5).
    UNDEFINED = 0
    ACCEPTED = int(State.ENQUEUED)
    ENQUEUED = int(State.ENQUEUED)
    SCHEDULED = int(State.SCHEDULED)
    RUNNING = int(State.RUNNING)
    PAUSED = int(State.PAUSED)
    FINISHED = int(State.FINISHED)
    FAILED = int(State.FAILED)

    def __init__(self, task_id: str | Claim, dbLock: Any = None, *, spool: Spool | None = None) -> None:
        super().__init__(spool or _get_spool(), task_id)


# Kept importable under the ATP names some callers catch.
DoesNotExist = TaskNotFound
