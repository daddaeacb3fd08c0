"""spoolq: a crash-safe task queue in a directory tree, worked by a daemon
that systemd supervises. README.md has the tour, docs/contract.md the
contract and docs/design.md the inside."""

from .errors import (
    CorruptTask,
    CrossDevice,
    InvalidInput,
    InvalidName,
    NoResponse,
    NoSpool,
    QueueEmpty,
    QueueException,
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
from .lifecycle import Action, Claim, Outcome, State
from .queries import Census, TaskInfo
from .spool import Spool, StartedTask, SweepAction
from .store.codec import LogRecord
from .store.registry import TaskType
from .task import TaskContext

__version__ = "0.1.0"

__all__ = [
    "Action", "Census", "Claim", "CorruptTask", "CrossDevice", "InvalidInput", "InvalidName", "LogRecord",
    "NoResponse", "NoSpool", "Outcome",
    "QueueEmpty", "QueueException", "QueueFull", "ServerBusy", "Spool", "SpoolError", "SpoolqError",
    "StaleClaim", "StartedTask", "State", "SweepAction", "TaskContext", "TaskExists", "TaskInfo",
    "TaskNotFound", "TaskType", "TypeInUse", "UnknownType", "UnsafeSpool",
]
