"""The object a handler receives: its task's claim, with the status calls.

``handler(task_status, input)`` gets a :class:`TaskContext`. Every call goes
through the claim, so once the task was taken away from this run (timed out
and re-enqueued, deleted), the calls raise :class:`~spoolq.errors.StaleClaim`
instead of writing. ATP's camelCase names are aliases of the snake_case
ones, so an ATP handler runs unchanged.
"""

from __future__ import annotations

from .lifecycle import Claim, State
from .queries import TaskInfo
from .spool import Spool


class Retry(Exception):
    """Raised by a handler to be run again: ``raise spoolq.Retry(delay=60,
    message="the service is down")``. Uses up one of the type's retries (the
    task FAILS when none is left); *delay* in seconds replaces the backoff."""

    def __init__(self, delay: float | None = None, message: str = "") -> None:
        self.delay = delay
        self.message = message
        super().__init__(message or "retry")


class TaskContext:
    """Status calls for one claim of one task."""

    def __init__(self, spool: Spool, claim: Claim | str) -> None:
        self.spool = spool
        self.claim = Claim.parse(claim)

    @property
    def type(self) -> str:
        return self.claim.type

    @property
    def id(self) -> str:
        return self.claim.id

    def set_success(self, msg: str = "") -> None:
        """FINISHED (final); the task moves to done/."""
        self.spool.set_state(self.claim, State.FINISHED, msg)

    def set_failure(self, msg: str = "") -> None:
        """FAILED (final); the task moves to done/."""
        self.spool.set_state(self.claim, State.FAILED, msg)

    def set_paused(self, msg: str = "") -> None:
        """PAUSED: waiting for something; the timeout keeps running."""
        self.spool.set_state(self.claim, State.PAUSED, msg)

    def set_running(self, msg: str = "") -> None:
        """RUNNING again (after PAUSED), or a progress record while running."""
        self.spool.set_state(self.claim, State.RUNNING, msg)

    def retry(self, delay: float | None = None, message: str = "") -> State:
        """Ask to be run again (see :class:`Retry`): the task goes back to
        the queue, due after *delay* seconds or the type's backoff; FAILED
        when its retries are used up. Return from the handler after it: the
        claim no longer holds the task. The state the task is in now."""
        return self.spool.retry(self.claim, delay, message)

    def log(self, message: str) -> None:
        """A free-text log record; the state does not change."""
        self.spool.log_message(self.claim, message)

    def store_response(self, data: bytes | str, mime_type: str = "text/xml") -> None:
        """Store or replace the response (str is stored as UTF-8)."""
        self.spool.store_response(self.claim, data, mime_type)

    def info(self) -> TaskInfo:
        """The task's current status document."""
        return self.spool.status(self.claim.type, self.claim.id)

    # ATP's names (EOxServer's TaskStatus), for handlers moved over unchanged.

    def setSuccess(self, msg: str = "") -> None:
        self.set_success(msg)

    def setFailure(self, msg: str = "") -> None:
        self.set_failure(msg)

    def setPaused(self, msg: str = "") -> None:
        self.set_paused(msg)

    def setRunning(self, msg: str = "") -> None:
        self.set_running(msg)

    def storeResponse(self, response: bytes | str, mimeType: str = "text/xml") -> None:
        self.store_response(response, mimeType)

    def getStatus(self) -> tuple[int, str]:
        state = self.info().state
        return int(state), state.name

    def getIdentifier(self) -> tuple[str, str]:
        return self.claim.type, self.claim.id

    def getInfo(self) -> tuple[str, str, int, str]:
        return (self.claim.type, self.claim.id, *self.getStatus())
