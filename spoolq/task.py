"""The object a handler receives: its task's claim, with the status calls.

``handler(task_status, input)`` gets a :class:`TaskContext`. Every call goes
through the claim, so once the task was taken away from this run (timed out
and re-enqueued, deleted), the calls raise :class:`~spoolq.errors.StaleClaim`
instead of writing. ATP's camelCase names are aliases of the snake_case
ones, so an ATP handler runs unchanged.
"""

from __future__ import annotations

import time
from typing import Any

from .errors import InvalidInput, SpoolqError
from .lifecycle import Claim, State
from .queries import TaskInfo
from .spool import Spool
from .store.codec import DEFAULT_RESPONSE_MIME, iso
from .store.output import progress_doc, write_progress

# Progress is written at most this often (seconds), and once more when the
# run ends: a handler may call progress() in its inner loop.
PROGRESS_INTERVAL = 0.2
_NUMBER = (int, float)


class Retry(Exception):
    """Raised by a handler to be run again: ``raise spoolq.Retry(delay=60,
    message="the service is down")``. Uses up one of the type's retries (the
    task FAILS when none is left); *delay* in seconds replaces the backoff."""

    def __init__(self, delay: float | None = None, message: str = "") -> None:
        if not isinstance(message, str):
            # Here, where the handler's mistake is, and whether or not a retry is left.
            raise InvalidInput(f"a message must be a str, not {type(message).__name__}")
        self.delay = delay
        self.message = message
        super().__init__(message or "retry")


class TaskContext:
    """Status calls for one claim of one task."""

    def __init__(self, spool: Spool, claim: Claim | str, *, task_dir: int | None = None) -> None:
        self.spool = spool
        self.claim = Claim.parse(claim)
        # The task's directory, open, when the daemon runs the handler: progress goes there.
        self._task_dir = task_dir
        self._progress: tuple[Any, Any, str, float] | None = None
        self._progress_due = 0.0  # monotonic time before which nothing is written
        self._progress_written = True

    @property
    def type(self) -> str:
        return self.claim.type

    @property
    def id(self) -> str:
        return self.claim.id

    def set_success(self, msg: str = "") -> None:
        """FINISHED (final); the task moves to done/."""
        self.flush_progress()  # the last progress before the task is final (after, it is refused)
        self.spool.set_state(self.claim, State.FINISHED, msg)

    def set_failure(self, msg: str = "") -> None:
        """FAILED (final); the task moves to done/."""
        self.flush_progress()
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
        self.flush_progress()
        return self.spool.retry(self.claim, delay, message)

    def log(self, message: str) -> None:
        """A free-text log record; the state does not change."""
        self.spool.log_message(self.claim, message)

    def store_response(self, data: bytes | str, mime_type: str | None = DEFAULT_RESPONSE_MIME) -> None:
        """Store or replace the response (str is stored as UTF-8)."""
        self.spool.store_response(self.claim, data, mime_type)

    def progress(self, done: float, total: float | None = None, message: str = "") -> None:
        """How far the handler got: *done* of *total* (None: unknown), with a
        short *message*. Adds no log record and changes no status; cheap
        enough for an inner loop: the value is written (to the task's
        ``progress`` file) at most every PROGRESS_INTERVAL seconds, and the
        last one when the run ends or the handler sets a final state.
        ``status --json`` shows it."""
        if type(done) not in _NUMBER or (total is not None and type(total) not in _NUMBER) or type(message) is not str:
            _bad_progress(done, total, message)
        now = time.monotonic()
        self._progress = (done, total, message, time.time())
        if now < self._progress_due:
            self._progress_written = False
            return
        self._progress_due = now + PROGRESS_INTERVAL
        self._write_progress()

    def flush_progress(self) -> None:
        """Write the last progress if it is not written yet (the runner calls
        it when the handler returns). Never raises: progress is no reason for
        a run to fail."""
        if not self._progress_written:
            try:
                self._write_progress()
            except Exception:  # noqa: BLE001 - disk full, task gone: the run goes on
                pass

    def _write_progress(self) -> None:
        self._progress_written = True
        if self._progress is None:
            return
        done, total, message, at = self._progress
        doc = progress_doc(_finite(done), _finite(total), str(message), iso(at))
        if self._task_dir is not None:
            try:
                write_progress(self._task_dir, doc)
            except OSError:
                pass  # not durable state; the next call tries again
        else:
            try:
                self.spool.store_progress(self.claim, doc)
            except (SpoolqError, OSError, AttributeError):
                pass

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

    def storeResponse(self, response: bytes | str, mimeType: str | None = DEFAULT_RESPONSE_MIME) -> None:
        self.store_response(response, mimeType)

    def getStatus(self) -> tuple[int, str]:
        state = self.info().state
        return int(state), state.name

    def getIdentifier(self) -> tuple[str, str]:
        return self.claim.type, self.claim.id

    def getInfo(self) -> tuple[str, str, int, str]:
        return (self.claim.type, self.claim.id, *self.getStatus())


def _finite(value: Any) -> Any:
    """*value*, or None for NaN and infinities (JSON has no such numbers)."""
    return value if value is None or value - value == 0 else None


def _bad_progress(done: Any, total: Any, message: Any) -> None:
    for name, value in (("done", done), ("total", total)):
        if value is None and name == "total":
            continue
        if isinstance(value, bool) or not isinstance(value, _NUMBER):
            raise TypeError(f"progress {name} must be a number, not {value!r}")
    raise TypeError(f"progress message must be a str, not {type(message).__name__}")
