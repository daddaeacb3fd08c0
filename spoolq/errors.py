"""The exceptions spoolq raises: one hierarchy under :class:`SpoolqError`.

Every error a user can cause (a bad name, an unknown task, a full queue, a
corrupt task directory) is one of these. Each carries what it is about as
attributes (``exc.type``, ``exc.id``, ``exc.path`` …) and a message that fits
on one line; the command line adds its own advice where a command would fix
it (``spoolq.cli``), the library does not.
"""

from __future__ import annotations


class SpoolqError(Exception):
    """Base of every error spoolq raises on purpose."""


class InvalidName(SpoolqError, ValueError):
    """A type name, task id, server id or claim breaks the naming rules
    (docs/contract.md §1). ``kind`` says which, ``value`` is what was given."""

    def __init__(self, kind: str, value: object, problem: str) -> None:
        self.kind = kind
        self.value = value
        self.problem = problem
        super().__init__(problem)


class SpoolError(SpoolqError):
    """The spool itself is missing, misconfigured or unsafe to use, or a
    setting given to it is out of range."""


class NoSpool(SpoolError):
    """There is no spool at ``root`` (or only part of one: ``missing`` names
    the first missing state directory)."""

    def __init__(self, root: str, missing: str | None = None, problem: str | None = None) -> None:
        self.root = root
        self.missing = missing
        if problem is None:
            what = f"{root} is not a complete spool ({missing}/ is missing)" if missing else f"no spool at {root}"
            problem = f"{what}: create it with 'spoolq init' or Spool.init(), or point $SPOOLQ_ROOT at the spool"
        super().__init__(problem)


class UnsafeSpool(SpoolError):
    """A spool path others could use to plant pickles (code), or that is not
    what it must be (a symlink, a file). ``fix`` is the command that fixes it,
    when there is one."""

    def __init__(self, path: str, problem: str, fix: str | None = None) -> None:
        self.path = path
        self.fix = fix
        super().__init__(f"{problem}: fix with: {fix}" if fix else problem)


class CrossDevice(UnsafeSpool):
    """Spool directories live on different filesystems, so rename is not atomic."""


class ServerBusy(SpoolError):
    """Another live process already works as ``server``."""

    def __init__(self, server: str, problem: str) -> None:
        self.server = server
        super().__init__(problem)


class UnknownType(SpoolqError, LookupError):
    """No task type named ``type`` is registered."""

    def __init__(self, type_name: str) -> None:
        self.type = type_name
        super().__init__(f"unknown task type {type_name!r}: register it first")


class TypeInUse(SpoolqError):
    """Type ``type`` still has ``count`` tasks and was not unregistered with force."""

    def __init__(self, type_name: str, count: int) -> None:
        self.type = type_name
        self.count = count
        super().__init__(f"task type {type_name!r} still has {count} task(s): delete them or use force")


class TaskNotFound(SpoolqError, LookupError):
    """No task (``type``, ``id``) exists."""

    def __init__(self, type_name: str, task_id: str) -> None:
        self.type = type_name
        self.id = task_id
        super().__init__(f"no task {type_name}/{task_id}")


class TaskGone(TaskNotFound):
    """Task (``type``, ``id``) was there and was deleted (or retired) while
    a caller was *doing* something with it ("followed", "waited for")."""

    def __init__(self, type_name: str, task_id: str, doing: str) -> None:
        super().__init__(type_name, task_id)
        self.args = (f"task {type_name}/{task_id} was deleted while it was {doing}",)


class TaskExists(SpoolqError):
    """Task (``type``, ``id``) already exists."""

    def __init__(self, type_name: str, task_id: str) -> None:
        self.type = type_name
        self.id = task_id
        super().__init__(f"task {type_name}/{task_id} already exists")


class QueueException(SpoolqError):
    """Base of the queue-level conditions kept from ATP."""


class QueueFull(QueueException):
    """The queue limit (``limit`` waiting tasks) is reached; nothing was
    written. Retry later."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"queue is full ({limit} tasks waiting): retry later")


class QueueEmpty(QueueException):
    """There was nothing to claim."""


class InvalidInput(SpoolqError, ValueError):
    """The task input (or a response) cannot be stored: not picklable, not
    JSON, too large. ``limit`` is the byte limit when that was the reason."""

    def __init__(self, problem: str, *, limit: int | None = None) -> None:
        self.limit = limit
        super().__init__(problem)


class StaleClaim(SpoolqError):
    """A write through a claim that no longer owns its task (taken away,
    deleted, claimed again) or to a task in a state that forbids it.
    Nothing was changed."""


class NoResponse(SpoolqError, LookupError):
    """Task (``type``, ``id``) has no stored response."""

    def __init__(self, type_name: str, task_id: str) -> None:
        self.type = type_name
        self.id = task_id
        super().__init__(f"task {type_name}/{task_id} has no response")


class CorruptTask(SpoolqError):
    """The task directory at ``path`` cannot be trusted (bad status.json,
    missing input, a symlink); it was, or should be, moved to quarantine/."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(problem)


def safe_text(exc: BaseException) -> str:
    """``str(exc)``, for an exception from code we do not trust: its
    ``__str__`` may itself raise, and a failure must still be reported."""
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - any failure of foreign code
        try:
            return repr(exc)
        except Exception:  # noqa: BLE001
            return f"<{type(exc).__name__} whose str() fails>"


def describe(exc: BaseException) -> str:
    """``ExceptionName: text``, or ``ExceptionName`` alone when the text is
    empty (a bare ``KeyboardInterrupt``): how a failure names its cause."""
    text = safe_text(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class WrongState(SpoolqError):
    """Task (``type``, ``id``) is in ``state``, where the asked action does
    not apply (cancel a final task, requeue one that is not FAILED). Nothing
    was changed."""

    def __init__(self, type_name: str, task_id: str, state: str, problem: str) -> None:
        self.type = type_name
        self.id = task_id
        self.state = state
        super().__init__(f"task {type_name}/{task_id} is {state}: {problem}")
