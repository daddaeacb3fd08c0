"""The exceptions spoolq raises: one hierarchy under :class:`SpoolqError`.

Every error a user can cause (a bad name, an unknown task, a full queue, a
corrupt task directory) is one of these, with a message that fits on one line,
so the command line can print it without a traceback.
"""

from __future__ import annotations


class SpoolqError(Exception):
    """Base of every error spoolq raises on purpose."""


class InvalidName(SpoolqError, ValueError):
    """A type name, task id or server id breaks the naming rules (SPEC §1)."""


class SpoolError(SpoolqError):
    """The spool itself is missing, misconfigured or unsafe to use."""


class UnsafeSpool(SpoolError):
    """The spool is writable by users who could plant pickles (code) in it."""


class CrossDevice(SpoolError):
    """Spool directories live on different filesystems, so rename is not atomic."""


class ServerBusy(SpoolError):
    """Another live process already works as this server id."""


class UnknownType(SpoolqError, LookupError):
    """No task type of that name is registered."""


class TypeInUse(SpoolqError):
    """A task type still has tasks and was not unregistered with force."""


class TaskNotFound(SpoolqError, LookupError):
    """No task with that (type, id) exists."""


class TaskExists(SpoolqError):
    """A task with that (type, id) already exists."""


class QueueException(SpoolqError):
    """Base of the queue-level conditions kept from ATP."""


class QueueFull(QueueException):
    """The queue limit is reached; nothing was written. Retry later."""


class QueueEmpty(QueueException):
    """There was nothing to claim."""


class InvalidInput(SpoolqError, ValueError):
    """The task input cannot be stored (not picklable, not JSON, too large)."""


class StaleClaim(SpoolqError):
    """A write through a claim that no longer owns its task (re-enqueued,
    deleted, claimed again) or to a task that already reached a final state.
    Nothing was changed."""


class NoResponse(SpoolqError, LookupError):
    """The task has no stored response."""


class CorruptTask(SpoolqError):
    """A task directory cannot be trusted (bad status.json, missing input);
    it was, or should be, moved to quarantine/."""
