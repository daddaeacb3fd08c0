"""The object a handler receives: its task's claim, with the status calls.

``handler(task_status, input)`` gets a :class:`TaskContext` (the ATP layer
adds the camelCase names). Every call goes through the claim, so once the
task was taken away from this run (timed out and re-enqueued, deleted), the
calls raise :class:`~spoolq.errors.StaleClaim` instead of writing.
"""

from __future__ import annotations

from .spool import Claim, Spool, State, TaskInfo


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

    def log(self, message: str) -> None:
        """A free-text log record; the state does not change."""
        self.spool.log_message(self.claim, message)

    def store_response(self, data: bytes | str, mime_type: str = "text/xml") -> None:
        """Store or replace the response (str is stored as UTF-8)."""
        self.spool.store_response(self.claim, data, mime_type)

    def info(self) -> TaskInfo:
        """The task's current status document."""
        return self.spool.status(self.claim.type, self.claim.id)
