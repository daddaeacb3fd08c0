"""Where handlers run: the :class:`Executor` seam, and the fork pool behind it.

The worker loop owns claims, time limits and every state change; an
executor owns the processes that run handlers. The loop talks to it only
through :class:`Executor`:

* ``submit(claim, deadline)`` starts running one claim (the executor calls
  :func:`~spoolq.worker.runner.run_claim` wherever it runs handlers); the
  deadline (monotonic clock) is the loop's to enforce, and an executor may
  enforce it on its own as well, as a backstop for a loop that is stuck;
* ``fds()`` are descriptors that become readable when ``events()`` may have
  something; the loop also calls ``events()`` after SIGCHLD and on every
  turn, so an executor may rely on either, and tells it which of its fds
  were readable (``ready``; None after a signal: look at everything);
* ``events()`` returns, without blocking, each run that ended: with the
  outcome the runner reported (:class:`Ended` with an ``outcome``), or with
  the reason its process died without one (``outcome`` None);
* ``kill(claim)`` stops a run at once, with everything its handler started;
  its :class:`Ended` follows once that is done (never before);
* ``close()`` stops idle processes and waits for them;
* ``available()`` says whether it can take a run now (False: the loop claims
  no task of its types, logs why once, and claims again once it is True);
* ``capacity()`` is how many runs it takes at once (None: ``--concurrency``).

An :class:`Ended` with ``lost=True`` says the run ended because the host
that ran it was lost (a Dask worker died): the loop takes the task away and
charges a restart, as for a dead server. The loop routes each claim to the
executor its type names (``fork``, ``dask``: :mod:`.dask_executor`).

What an executor must guarantee (the loop's safety rests on it):

1. **Liveness.** Every process of a run holds the task's run lock (the
   runner takes it at the start; children inherit it), so no sweeper takes
   the task while any of them is alive; and runs stop when the worker dies.
2. **Killing.** After ``kill``, the handler and everything it started are
   stopped before ``events()`` reports the run ended.
3. **Outcomes.** Every submitted run is reported exactly once.
4. **Fencing.** Handlers write only through their claim, so a late write of
   a run that lost its task is refused by the spool, never applied.
"""

from __future__ import annotations

import logging
import math
import os
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

from .. import faults
from ..lifecycle import Claim, Outcome
from ..spool import Spool
from . import proctree
from .limits import Limits
from .hygiene import ProcessState
from .runner import HandlerUnavailable, NoRoom, NotRecorded, NotStarted, run_claim

log = logging.getLogger("spoolq.executor")

# How long past its deadline a handler process waits for the worker to kill
# it before it kills itself (the worker may be stopped, e.g. SIGSTOP).
SELF_KILL_MARGIN = 2.0
RETIRING = "retiring"  # a slot's answer ends with this word when it exits after the task


@dataclass(frozen=True)
class Ended:
    """A run that ended: its *outcome* as the runner reported it, or None
    when its process died first (*reason* says how). *lost*: the run ended
    because the host that ran it was lost (a remote executor's worker died);
    the loop then takes the task away and charges a restart, as for a dead
    server, instead of failing it."""

    claim: Claim
    outcome: Outcome | None
    reason: str = ""
    lost: bool = False


class Executor(Protocol):
    """What the worker loop needs from wherever handlers run."""

    def submit(self, claim: Claim, deadline: float = math.inf) -> None:
        """Start running *claim*, due to end by *deadline* (monotonic). OSError
        when it cannot (the claim is not running then, and the caller hands
        it back)."""

    def fds(self) -> list[int]:
        """Descriptors that become readable when :meth:`events` may have news."""

    def events(self, ready: Collection[int] | None = None) -> list[Ended]:
        """The runs that ended since the last call; never blocks. *ready*:
        which of :meth:`fds` the loop's wait found readable; None when it
        cannot tell (a signal came, SIGCHLD perhaps): then look everywhere."""

    def kill(self, claim: Claim) -> None:
        """Stop the run of *claim* and everything its handler started."""

    def pid(self, claim: Claim) -> int | None:
        """The process that runs *claim*, when there is one to name in logs."""

    def close(self) -> None:
        """Stop idle handler processes and wait for them."""

    def available(self) -> bool:
        """Whether it can take a run now (a remote executor: whether its
        cluster is reachable). The loop claims no task of its types while not."""

    def capacity(self) -> int | None:
        """How many runs it takes at once; None: the worker's --concurrency."""


class _Slot:
    """One handler process of the pool and the pipes to it.

    The daemon writes one claim per line to ``commands``; the slot answers
    one outcome per line on ``results``. A slot is its own process group, so
    killing the group also kills whatever its handler spawned in that group.
    """

    def __init__(self, pid: int, commands: int, results: int) -> None:
        self.pid = pid
        self.commands = commands
        self.results = results
        self.buffer = b""
        self.claim: Claim | None = None
        self.tasks = 0
        self.retiring = False

    def send(self, claim: Claim, deadline: float) -> None:
        os.write(self.commands, f"{claim} {deadline!r}\n".encode())

    def close(self) -> None:
        for fd in (self.commands, self.results):
            try:
                os.close(fd)
            except OSError:
                pass
        self.commands = self.results = -1


class ForkExecutor:
    """Handlers in a pool of processes forked by the worker ("slots").

    Each slot is forked by the worker, made its own process group, and fed
    one claim at a time over a pipe. A handler that raises or calls
    ``sys.exit`` costs nothing; one that segfaults, calls ``os._exit`` or is
    killed costs its slot, which is reaped and replaced on the next submit.
    A slot is also replaced after ``max_tasks_per_child`` tasks, so leaks
    stay bounded. (A fork per task cost 8 ms a task here: more than the whole
    lifecycle on disk.) The worker never unpickles input nor imports
    handlers; slots do both.

    The worker and every slot are child subreapers (:mod:`.proctree`): a
    slot kills whatever its handler left behind before the outcome is recorded, and when
    a slot dies the worker kills the orphans it inherits before it reports
    the run ended. Each slot also kills itself a little after its run's
    deadline, in case the worker is stopped and cannot. Slots die with the
    worker through PR_SET_PDEATHSIG (delivered asynchronously; the run lock
    covers the moment in between).

    *close_in_child* is called in each new slot, right after the fork, to
    close the worker's descriptors a handler must not inherit (the server
    lock above all: a handler's leftover must never keep a dead server
    looking alive).
    """

    def __init__(
        self,
        spool: Spool,
        *,
        max_tasks_per_child: int = 1000,
        close_in_child: Callable[[], None] = lambda: None,
    ) -> None:
        self.spool = spool
        self.max_tasks_per_child = max(0, int(max_tasks_per_child))
        self._close_in_child = close_in_child
        self.slots: dict[int, _Slot] = {}
        self._dying: list[Ended] = []  # runs whose slot died; reported once its orphans are gone
        proctree.become_subreaper()

    def _slot_of(self, claim: Claim) -> _Slot | None:
        return next((s for s in self.slots.values() if s.claim == claim), None)

    def submit(self, claim: Claim, deadline: float = math.inf) -> None:
        slot = next((s for s in self.slots.values() if s.claim is None and not s.retiring), None)
        if slot is None:
            slot = self._spawn()
        slot.claim = claim
        slot.tasks += 1
        try:
            slot.send(claim, deadline)
        except OSError:
            # The slot died between tasks; its exit is reaped as a death
            # without a claim.
            slot.claim = None
            raise

    def pid(self, claim: Claim) -> int | None:
        slot = self._slot_of(claim)
        return slot.pid if slot else None

    def available(self) -> bool:
        return True

    def capacity(self) -> int | None:
        return None  # the worker's --concurrency

    def fds(self) -> list[int]:
        return [slot.results for slot in self.slots.values() if slot.results >= 0]

    def events(self, ready: Collection[int] | None = None) -> list[Ended]:
        ended: list[Ended] = []
        if ready is None:
            readable, _, _ = select.select(self.fds(), [], [], 0)
        else:
            readable = [fd for fd in self.fds() if fd in ready]
        by_fd = {slot.results: slot for slot in self.slots.values()}
        for fd in readable:
            slot = by_fd.get(fd)
            if slot is not None:
                ended += self._read_results(slot)
        # A slot or an orphan that died sent SIGCHLD, and a signal means
        # ready is None: waitpid only then (or while orphans are awaited).
        if ready is None or self._dying:
            ended += self._reap()
        return ended

    def kill(self, claim: Claim) -> None:
        slot = self._slot_of(claim)
        if slot is None:
            return
        slot.retiring = True  # it may still answer for this claim, but gets no other
        try:
            os.killpg(slot.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except PermissionError:
            os.kill(slot.pid, signal.SIGKILL)

    def close(self, *, timeout: float = 10.0) -> None:
        """Idle slots read EOF and exit; reap them all before returning."""
        import time

        for slot in self.slots.values():
            self._retire(slot)
        deadline = time.monotonic() + timeout
        while self.slots and time.monotonic() < deadline:
            self._reap()
            if self.slots:
                time.sleep(0.01)
        for pid in list(self.slots):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            self.slots.pop(pid).close()

    # ------------------------------------------------------------------ slots

    def _spawn(self) -> _Slot:
        cmd_r, cmd_w = os.pipe2(os.O_CLOEXEC)
        try:
            res_r, res_w = os.pipe2(os.O_CLOEXEC)
        except OSError:
            os.close(cmd_r)
            os.close(cmd_w)
            raise
        parent = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the slot: never returns
            code = 70
            try:
                os.close(cmd_w)
                os.close(res_r)
                self._become_slot(parent)
                code = _slot_main(self.spool, cmd_r, res_w)
            except OSError as exc:
                # Disk full or an I/O error while recording a run: one line;
                # the worker says which task it could not settle.
                log.error("handler process %d: %s", os.getpid(), exc)
            except BaseException:  # noqa: BLE001
                # Through the worker's logging: a time, a level and (under
                # journald) a priority on each line of the traceback.
                try:
                    log.critical("handler process %d stopped on an error of its own", os.getpid(), exc_info=True)
                except Exception:  # noqa: BLE001 - logging itself broken by a handler: the bare traceback
                    traceback.print_exc()
            finally:
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except Exception:  # noqa: BLE001 - closed or replaced by a handler: exit all the same
                        pass
                os._exit(code)
        os.close(cmd_r)
        os.close(res_w)
        try:
            os.setpgid(pid, pid)  # also done by the slot; whoever is first wins
        except OSError:
            pass
        slot = _Slot(pid, cmd_w, res_r)
        self.slots[pid] = slot
        return slot

    def _become_slot(self, parent: int) -> None:
        os.setpgid(0, 0)
        proctree.die_with_parent()
        proctree.become_subreaper()
        if os.getppid() != parent:
            os._exit(0)  # the worker died before we could ask to die with it
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        for other in self.slots.values():
            other.close()
        self._close_in_child()
        faults.reconfigure()

    def _read_results(self, slot: _Slot) -> list[Ended]:
        try:
            data = os.read(slot.results, 4096)
        except OSError:
            data = b""
        if not data:
            return []  # EOF: the slot is exiting; _reap settles it
        slot.buffer += data
        ended = []
        while b"\n" in slot.buffer:
            line, slot.buffer = slot.buffer.split(b"\n", 1)
            claim, slot.claim = slot.claim, None
            word, _, rest = line.decode(errors="replace").partition("\t")
            flag, _, note = rest.partition("\t")
            if claim is not None:
                try:
                    outcome = Outcome(word)
                except ValueError:
                    outcome = Outcome.GONE
                ended.append(Ended(claim, outcome, note))
            if flag == RETIRING or (self.max_tasks_per_child and slot.tasks >= self.max_tasks_per_child):
                self._retire(slot)
        return ended

    def _retire(self, slot: _Slot) -> None:
        """Let an idle slot exit (it reads EOF); a fresh one replaces it."""
        slot.retiring = True
        try:
            os.close(slot.commands)
        except OSError:
            pass
        slot.commands = -1

    def _reap(self) -> list[Ended]:
        """Reap dead slots (and the orphans they left, which are the
        worker's children now); a dead slot's run is reported ended only
        once no orphan is left."""
        ended: list[Ended] = []
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)  # its CPU time tells a CPU-limit kill
            except ChildProcessError:
                break
            if pid == 0:
                break
            slot = self.slots.pop(pid, None)
            if slot is None:
                continue
            # An outcome may still sit in the pipe: read it before judging.
            while slot.claim is not None and slot.results >= 0:
                ready, _, _ = select.select([slot.results], [], [], 0)
                if not ready:
                    break
                before = slot.buffer
                ended += self._read_results(slot)
                if slot.buffer == before and slot.claim is not None:
                    break
            claim = slot.claim
            slot.close()
            if claim is not None:
                limits = Limits.for_type(self.spool, claim.type)
                cpu_used = usage.ru_utime + usage.ru_stime
                self._dying.append(Ended(claim, None, limits.explain_death(status, cpu_used) or _death(status)))
        if self._dying:
            # Orphans of the dead slots: every child that is not a slot.
            if proctree.kill_children(keep=frozenset(self.slots)):
                return ended  # their deaths (SIGCHLD) bring the loop back here
            ended += self._dying
            self._dying = []
        return ended


def _death(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"handler process died of signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"handler process exited with status {os.WEXITSTATUS(status)} without finishing the task"


class _SelfDeadline:
    """A slot's own time limit: a thread that kills the slot (and all it
    started) when a run is still going SELF_KILL_MARGIN seconds past its
    deadline, which the worker would have enforced had it been able to.

    The thread is woken only for a deadline earlier than the one it sleeps
    until (the first run's, or a shorter time limit's); a later deadline,
    the next run's usually, it finds when it wakes for the old one. So a
    run costs the thread nothing: no wake-up, no switch."""

    def __init__(self) -> None:
        self._deadline = math.inf
        self._sleeping_until = math.inf  # the deadline the thread waits for
        self._changed = threading.Condition()
        threading.Thread(target=self._watch, name="spoolq-deadline", daemon=True).start()

    def set(self, deadline: float) -> None:
        with self._changed:
            self._deadline = deadline
            if deadline < self._sleeping_until:
                self._changed.notify()

    def _watch(self) -> None:
        with self._changed:
            while True:
                wait = self._deadline + SELF_KILL_MARGIN - time.monotonic()
                if wait <= 0:
                    break
                self._sleeping_until = self._deadline
                self._changed.wait(None if math.isinf(wait) else wait)
        proctree.kill_descendants(timeout=2.0)
        os.kill(os.getpid(), signal.SIGKILL)


def _slot_main(spool: Spool, commands: int, results: int) -> int:
    """A slot's loop: read a claim and its deadline per line, run it (the
    runner kills what the handler left behind), answer the outcome."""
    reader = os.fdopen(commands, "rb", buffering=0)
    pending = b""
    deadline = _SelfDeadline()
    born = ProcessState.take()
    while True:
        while b"\n" not in pending:
            chunk = reader.read(4096)
            if not chunk:
                return 0  # the worker closed the pipe: retire
            pending += chunk
        line, pending = pending.split(b"\n", 1)
        text, _, due = line.decode().partition(" ")
        claim = Claim.parse(text)
        deadline.set(float(due or "inf"))
        limited = bool(Limits.for_type(spool, claim.type))
        note = ""
        try:
            outcome = run_claim(spool, claim, capture=True, hygiene=born)
        except HandlerUnavailable as exc:
            outcome, note = Outcome.NO_HANDLER, " ".join(str(exc).split())
        except NoRoom as exc:
            outcome, note = Outcome.NO_ROOM, str(exc)
        except NotStarted as exc:
            outcome, note = Outcome.NOT_STARTED, str(exc)
        except NotRecorded as exc:
            outcome, note = Outcome.UNRECORDED, exc.note
        deadline.set(math.inf)
        # Limits cannot all be lifted (niceness): after a limited task this
        # process retires; the worker replaces it (docs: spoolq.worker.limits).
        # So does a process whose handler changed what cannot be put back
        # (the runner put back the rest as the handler returned: .hygiene).
        # And one that could not import a handler: the module may be half
        # imported in sys.modules, and the retry after a fix of the code must
        # import it afresh (a fresh fork of the worker, which imports none).
        retire = limited or born.retire or outcome is Outcome.NO_HANDLER
        flag = RETIRING if retire else ""
        os.write(results, f"{outcome.value}\t{flag}\t{note}\n".encode())
        if retire:
            return 0
