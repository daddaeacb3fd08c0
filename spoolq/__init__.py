"""spoolq: a crash-safe task queue in a directory tree, worked by a daemon
that systemd supervises. See README.md for the tour and SPEC-level contract."""

from .errors import (
    CorruptTask,
    CrossDevice,
    InvalidInput,
    InvalidName,
    NoResponse,
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
from .spool import Claim, LogRecord, Spool, StartedTask, State, SweepAction, TaskInfo, TaskType
from .task import TaskContext

__version__ = "0.1.0"

__all__ = [
    "Claim", "CorruptTask", "CrossDevice", "InvalidInput", "InvalidName", "LogRecord", "NoResponse",
    "QueueEmpty", "QueueException", "QueueFull", "ServerBusy", "Spool", "SpoolError", "SpoolqError",
    "StaleClaim", "StartedTask", "State", "SweepAction", "TaskContext", "TaskExists", "TaskInfo",
    "TaskNotFound", "TaskType", "TypeInUse", "UnknownType", "UnsafeSpool",
]
