"""Running one claim: start the task, import its handler, call it, end it.

This is the body of a handler process, whatever executor hosts it: the
fork executor calls :func:`run_claim` in its slot processes. The handler gets
a :class:`~spoolq.task.TaskContext` (spoolq's own; it carries ATP's method
names too). The outcome says how the run ended:

* FINISHED / FAILED: the task reached that state through this claim (a
  handler that returns without a final state is FINISHED; one that raises,
  or calls ``sys.exit`` with a non-zero code, is FAILED with the traceback
  in the log first);
* GONE: the task was taken away or deleted before or while it ran.

The run lock (docs/design.md, "The run lock") is held from the start until
the run ends, so no sweeper takes the task from a run that is still alive.

The type's resource limits (:mod:`.limits`) are applied right before the
handler is called, and a failure they cause names the limit.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from ..errors import CorruptTask, InvalidInput, SpoolqError, StaleClaim, TaskNotFound, UnsafeSpool, describe, safe_text
from ..lifecycle import Claim, Outcome, Place, State
from ..spool import Spool
from ..store.output import clear_run_files
from ..store.registry import TaskType
from ..task import Retry, TaskContext
from . import proctree
from .capture import Capture, task_dir_of_run
from .hygiene import ProcessState
from .limits import Limits

log = logging.getLogger("spoolq.runner")

RETRY_ASKED = "the handler asked for a retry"  # the failure a retry without a message is written as, if it must be


def load_handler(path: str) -> Callable[..., Any]:
    """Import ``pkg.mod.func`` and return the function."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ImportError(f"handler {path!r} is not a dotted path")
    if module_name not in sys.modules:
        importlib.invalidate_caches()  # a module installed since the last try is found
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"module {module_name!r} has no attribute {attr!r}") from None


class HandlerUnavailable(Exception):
    """The type's handler cannot be imported here: a deployment error, not a
    failure of the task. The claim is left as it was (not started)."""


class NoRoom(Exception):
    """Every slot of the type's concurrency limit is taken (by runs on any
    server): the claim is left as it was (not started)."""


class NotRecorded(Exception):
    """The run ended but its end could not be written (an I/O error, a full
    disk): *state* is what the run came to (FINISHED, or FAILED with
    *message*), *why* the error. The run lock is let go on the way out; the
    worker loop writes that end through the claim, which is still the
    task's (a status half written is completed or undone by the next lock,
    so writing it again is safe)."""

    def __init__(self, state: State, message: str, why: str) -> None:
        super().__init__(f"cannot record the end of its run: {why}")
        self.state, self.message, self.why = state, message, why

    @property
    def note(self) -> str:
        """One line for the slot's report: the state, the error, the message."""
        return "\t".join((self.state.name, " ".join(self.why.split()), " ".join(self.message.split())))

    @classmethod
    def from_note(cls, note: str) -> NotRecorded:
        name, _, rest = note.partition("\t")
        why, _, message = rest.partition("\t")
        return cls(State.FAILED if name != State.FINISHED.name else State.FINISHED, message, why)


class NotStarted(Exception):
    """The start could not be written (disk full, an I/O error): the task
    was never started. It is left where the start stopped: its claim, or
    ENQUEUED in ``running/`` (a start of a claim not recorded yet that
    moved it first), which the sweep sends back to the queue."""


def run_claim(
    spool: Spool, claim: Claim, *, import_first: bool = True, take_slot: bool = True, capture: bool = False,
    output_dir: int | None = None, hygiene: ProcessState | None = None,
) -> Outcome:
    """Run one claimed task to a final state in this process, holding its
    run lock throughout. With *import_first*, the handler is imported before
    the task is started: HandlerUnavailable when it cannot be, with the
    task untouched (the worker hands it back and stops claiming its type
    until the import works). With *take_slot*, a slot of the type's
    concurrency limit is taken for the run (NoRoom when none is free).
    NotStarted when the start cannot be written, NotRecorded when the end
    cannot be.
    (The dask executor's remote side does neither: the spool host does.)
    With *capture* (a handler process of the daemon), the handler's fds 1
    and 2 go to the task's ``output`` while it runs, and its progress to the
    task's ``progress`` (:mod:`.capture`). With *output_dir* (a directory
    fd; the dask executor's remote side), the output is captured there
    instead. With *hygiene* (a process that runs task after task), what the
    handler changed in its process is put back as it returns
    (:mod:`.hygiene`), unless the type has limits (the process retires
    after such a task)."""
    try:
        ttype: TaskType | None = spool.get_type(claim.type)
    except SpoolqError:
        ttype = None  # start() below reports the type's trouble
    if import_first and ttype is not None:
        try:
            load_handler(ttype.handler)  # cached in sys.modules for the run
        except Exception as exc:  # noqa: BLE001 - whatever the import raises
            raise HandlerUnavailable(
                f"handler {ttype.handler!r} cannot be imported: {describe(exc)}"
            ) from None
    slot = None
    if take_slot and ttype is not None and ttype.concurrency:
        # Held for the run by this process (and what it forks): the kernel
        # gives it back when the last of them is gone (spoolq.store.slots).
        slot = spool.slots.acquire(claim.type, ttype.concurrency)
        if slot is None:
            raise NoRoom(f"all {ttype.concurrency} slots of {claim.type} are taken")
    try:
        try:
            started = spool.start(claim, hold_run_lock=True)
        except (StaleClaim, TaskNotFound, BlockingIOError):
            return Outcome.GONE  # taken away before it started: nothing to do
        except OSError as exc:
            raise NotStarted(f"cannot start it: {exc.strerror or exc}") from None
        except UnsafeSpool as exc:
            # Modes slipped for a moment (a chmod o+w): not the task's fault;
            # it goes back unstarted and claims pause, as for a full disk.
            raise NotStarted(f"cannot start it: {exc}") from None
        except CorruptTask as exc:
            log.error("%s: %s", claim, exc)
            return outcome_of(spool, claim)  # start() already failed or quarantined it
        task_dir = None
        if capture and started.run_lock is not None:
            task_dir = task_dir_of_run(spool.layout.task_path(Place.RUNNING, claim.name), started.run_lock)
        try:
            if task_dir is not None and started.starts > 1:
                clear_run_files(task_dir)  # an earlier run's output and progress
            return _run_started(spool, claim, started.handler, started.input, task_dir, output_dir, hygiene)
        finally:
            if task_dir is not None:
                os.close(task_dir)
            if started.run_lock is not None:
                os.close(started.run_lock)
    finally:
        if slot is not None:
            os.close(slot)


def _output(spool: Spool, claim: Claim, directory: int | None) -> contextlib.AbstractContextManager[Any]:
    """The capture of the handler's fds 1 and 2 into *directory*, or nothing to do."""
    if directory is None:
        return contextlib.nullcontext()
    return Capture(directory, spool.get_type(claim.type).max_output_bytes)


def _run_started(
    spool: Spool, claim: Claim, handler_path: str, value: Any, task_dir: int | None = None,
    output_dir: int | None = None, hygiene: ProcessState | None = None,
) -> Outcome:
    context = TaskContext(spool, claim, task_dir=task_dir)
    try:
        try:
            handler = load_handler(handler_path)
        except Exception as exc:
            return _outcome_for(fail(
                spool, claim, f"cannot import handler {handler_path!r}: {describe(exc)}", exc))
        limits = Limits.for_type(spool, claim.type)
        # The output is captured from before the limits are applied (the
        # capture's thread and pipes count against none of them) until the
        # handler returned; the outcome is recorded after that.
        caught: BaseException | None = None
        lift: Callable[[], None] | None = None
        with _output(spool, claim, task_dir if output_dir is None else output_dir) as capture:
            try:
                lift = limits.apply()
            except OSError as exc:
                caught = exc
            else:
                if hygiene is not None:
                    hygiene.before_run()
                me = os.getpid()
                try:
                    handler(context, value)
                except BaseException as exc:  # noqa: BLE001 - judged below
                    if os.getpid() != me:
                        _leave_fork(exc)
                    caught = exc
                else:
                    if os.getpid() != me:
                        _leave_fork(None)
        # First what the handler changed in its own process (a lowered
        # open-files limit would keep the leftover kill below from reading
        # /proc), then its leftovers die, before its outcome is recorded:
        # once the task is final, a worker killed now would leave them
        # running with nobody to kill them (its task needs no taking back).
        if lift is not None:
            lift()
        if hygiene is not None and not limits:  # (with limits, the process retires after the task)
            hygiene.put_back(claim)
        try:
            proctree.kill_descendants()
        except OSError as exc:
            # Not knowing what it left running, this process cannot vouch for
            # the run's end: it exits unrecorded, and the worker, whose
            # children its orphans become, kills them and settles the task.
            raise OSError(exc.errno, f"cannot see what the handler left running: {exc.strerror}") from None
        context.flush_progress()
        if isinstance(capture, Capture) and capture.error is not None:
            # Not durable state, no reason to fail the run; but said once.
            log.warning("%s: its output is not kept whole: %s", claim, safe_text(capture.error))
        if isinstance(caught, StaleClaim):
            # The handler's own status call was refused: its task was taken
            # away, or it had ended the task itself already (setSuccess, then
            # setFailure), and that end stands. Unless the task is still this
            # run's: then the StaleClaim was about another claim (a context
            # the handler kept from an earlier task, or one it raised
            # itself), and it fails the run like any exception (it was taken
            # for "taken away": the task sat RUNNING until a sweep ran it again).
            done = outcome_of(spool, claim)
            if done is not Outcome.GONE:
                log.warning("%s: a status call of the handler after it ended the task (%s) was refused: %s",
                            claim, done.value, caught)
                return done
            if not still_running(spool, claim):
                raise caught
        if lift is not None:
            failure = _failure_of(caught, limits)
        else:  # the limits could not be applied: the handler never ran
            assert isinstance(caught, OSError)
            failure = str(caught.strerror or caught)
        try:
            return _record_end(spool, claim, caught, failure)
        except CorruptTask as exc:
            # The handler broke its own task's files (its log a symlink, its
            # status gone or garbage): nothing there can be trusted any more.
            log.error("%s: %s; quarantining it", claim, exc)
            spool.quarantine(exc.path, str(exc))
            return Outcome.QUARANTINED
        except OSError as exc:
            raise NotRecorded(State.FAILED if failure else State.FINISHED, failure,
                              exc.strerror or str(exc)) from None
    except StaleClaim as exc:
        done = outcome_of(spool, claim)
        if done is Outcome.GONE:
            log.warning("%s: %s", claim, exc)
        return done


def _failure_of(caught: BaseException | None, limits: Limits) -> str:
    """The one-line message a run that raised *caught* fails with ("" for a
    run that succeeded: it returned, or called sys.exit(0))."""
    if caught is None or (isinstance(caught, SystemExit) and caught.code in (None, 0)):
        return ""
    if isinstance(caught, Retry):
        return caught.message or RETRY_ASKED
    if isinstance(caught, SystemExit):
        return f"handler called sys.exit({caught.code!r})"
    return limits.explain(caught) or describe(caught)


def _record_end(spool: Spool, claim: Claim, caught: BaseException | None, failure: str) -> Outcome:
    """Write how the run ended (*failure*, from :func:`_failure_of`) through
    its claim; the outcome the task is left with."""
    if isinstance(caught, Retry):
        try:
            return _outcome_for(spool.retry(claim, caught.delay, caught.message))
        except InvalidInput as exc:  # Retry(delay=-5), or one past the longest spoolq takes
            return _failed(spool, claim, f"the handler asked for a retry spoolq cannot make: {exc}", None)
    if isinstance(caught, SystemExit) and failure:
        return _failed(spool, claim, failure, None)
    if failure:
        assert caught is not None
        return _failed(spool, claim, failure, caught)
    if spool.finish_if_not_finished(claim):
        return Outcome.FINISHED
    return outcome_of(spool, claim)


def _failed(spool: Spool, claim: Claim, message: str, exc: BaseException | None) -> Outcome:
    """The handler failed: FAILED with *message* (the traceback first), unless
    it had already given the task its final state, or sent it back for a
    retry, through this claim (then that stands, and the failure after it is
    only logged)."""
    done = outcome_of(spool, claim)
    if done is not Outcome.GONE:
        ended = "sent back for a retry" if done is Outcome.RETRY else done.value  # (outcome_of: RETRY, or a final state)
        log.warning("%s: the handler failed after the task was already %s: %s", claim, ended, message)
        return done
    if exc is None:
        return _outcome_for(spool.set_state(claim, State.FAILED, message))
    return _outcome_for(fail(spool, claim, message, exc))


def _outcome_for(state: State) -> Outcome:
    """The outcome of a run whose failure left the task in *state*."""
    return Outcome.RETRY if state is State.ENQUEUED else Outcome.FAILED


def outcome_of(spool: Spool, claim: Claim) -> Outcome:
    """The outcome *claim* ended with, read from the task's status: its final
    state through this very claim; RETRY when it went back to the queue from
    this claim (its handler asked for a retry, or failed with retries left:
    nobody else takes a task from a run that holds its run lock); else GONE."""
    try:
        info = spool.status(claim.type, claim.id)
    except SpoolqError:
        return Outcome.GONE
    if claim.owns(info.doc) and info.state.terminal:
        return Outcome(info.state.name)
    if claim.sent_back(info.doc):
        return Outcome.RETRY
    return Outcome.GONE


def still_running(spool: Spool, claim: Claim) -> bool:
    """Whether *claim* still holds its task, started (RUNNING or PAUSED)."""
    try:
        info = spool.status(claim.type, claim.id)
    except SpoolqError:
        return False
    return claim.owns(info.doc) and info.state.started


def _leave_fork(exc: BaseException | None) -> NoReturn:
    """A process the handler forked came back out of the handler (it
    returned, or raised): it is not the run, and must not go on into this
    process's loop, where it would record the run's end and read the next
    tasks meant for its parent. It exits, its traceback on its stderr."""
    if exc is not None and not isinstance(exc, SystemExit):
        traceback.print_exception(exc)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - closed by the handler: exit all the same
            pass
    os._exit(0 if exc is None or (isinstance(exc, SystemExit) and exc.code in (None, 0)) else 1)


def fail(spool: Spool, claim: Claim, message: str, exc: BaseException) -> State:
    """FAILED (or a retry, while the type's retries last) with a one-line
    message; the traceback goes in the log first. The state it is in now."""
    try:
        trace = "".join(traceback.format_exception(exc)).rstrip()
    except Exception:  # noqa: BLE001 - an exception whose str() fails
        trace = "".join(traceback.format_tb(exc.__traceback__)).rstrip() + f"\n{describe(exc)}"
    try:
        spool.log_message(claim, trace)
        return spool.set_state(claim, State.FAILED, message)
    except StaleClaim:
        return State.FAILED
