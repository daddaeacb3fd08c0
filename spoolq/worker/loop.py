"""The worker daemon: ``spoolq worker SERVER`` (systemd: ``spoolq@SERVER``).

One process, one thread of control: a ``select()`` loop that wakes on

* file events in ``enqueued/`` (an inotify descriptor, :class:`DirWatcher`),
* signals (SIGCHLD, SIGTERM, SIGINT, SIGUSR1, through ``set_wakeup_fd``),
* news from the executor that runs the handlers (:mod:`.executor`),
* the nearest deadline: a handler's time limit, the heartbeat, the sweep, the
  safety rescan of ``enqueued/``, the systemd watchdog ping.

The loop owns claims, time and every state change; the executor owns the
processes. Mechanism and caveats:

* Claims are made only when the executor has room, so nothing sits claimed
  while waiting for a handler process (ATP claimed ahead and duplicated work
  on timeouts).
* The time limit runs from the claim, on the monotonic clock; this daemon is
  its authority for the claims it holds (docs/design.md, "Timeouts"). At the
  deadline the run is killed and the task re-enqueued or FAILED by
  ``max_restarts``.
* A watch on ``running/`` notices at once when one of this server's tasks
  leaves it (``spoolq delete``); the heartbeat touches each running task's
  directory and catches the rest. A task that vanished or was taken away
  gets its run killed: its claim is fenced anyway, this stops wasted work.
* One bad task never stops the server: an error while handling one task is
  logged (and a task that cannot be trusted is quarantined), and the loop
  goes on. Only a spool that disappears ends it.
* SIGTERM/SIGINT: stop claiming, give running handlers ``grace`` seconds,
  then kill them and hand their tasks back uncharged; exit 0. A second
  signal cuts the grace short. SIGUSR1 (or ``--drain``): claim nothing new,
  finish what is held, exit 0.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import resource
import select
import signal
import sys
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import TypeVar

from .. import faults, sweeps
from ..errors import CorruptTask, ServerBusy, SpoolError, SpoolqError, StaleClaim, TaskNotFound, UnknownType
from ..lifecycle import Action, Claim, Outcome, Place, State
from ..names import check_server, check_type, split_task_name
from ..spool import Spool, SweepAction
from ..store import codec
from ..store.layout import root_writers
from ..store.metrics import ServerCounters
from ..store.queue import WaitingIndex
from ..systemd import Notifier, setup_logging, task_fields
from ..watch import ARRIVALS, DEPARTURES, DirWatcher, TaskWatches
from .executor import Ended, Executor, ForkExecutor
from .gates import Gates
from .runner import NotRecorded, outcome_of

log = logging.getLogger("spoolq.daemon")

EX_CONFIG = 78
UNWATCHED_RESCAN = 1.0  # seconds between rescans while enqueued/ cannot be watched
CANNOT_CLAIM_MEMORY = 10_000  # tasks whose refused claim was logged, not to be logged again
CLAIM_RETRY = 1.0  # seconds claiming pauses after a claim failed with an OSError (disk full)
KILL_PATIENCE = 5.0  # seconds between complaints about a killed run that does not end
SETTLE_RETRY = 0.2  # seconds between tries to settle a run whose leftovers still hold it
# Seconds a file event about a running task waits before the loop looks at the
# task: most runs end within it (their own moves caused the events), so their
# answer settles them and nothing is read. A cancel or a delete is still acted
# on well within a second.
TASK_EVENT_DELAY = 0.05
# Seconds a turn of the loop spends at most on a long pass over a directory
# (the maintenance sweep, a rescan of enqueued/), after at least one step of
# it; the pass goes on in the next turns, with claims, time limits, file
# events and the watchdog in between.
PASS_SLICE = 0.05
T = TypeVar("T")
FDS_PER_SLOT = 4  # descriptors a handler process costs the worker (two pipes), with room to spare
FDS_RESERVED = 32  # the worker's own: spool, locks, inotify, signals, logging, a sweep


def fd_budget() -> int:
    """Handler processes this worker can afford with its descriptor limit,
    after raising the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(0, (soft - FDS_RESERVED) // FDS_PER_SLOT)


@dataclass
class _Job:
    claim: Claim
    claimed: float  # monotonic
    deadline: float  # monotonic; the type's timeout from the claim
    kill_reason: str | None = None
    charge: bool = True
    killed_at: float | None = None  # monotonic
    unsettled_since: float | None = None  # monotonic: ended, but its leftovers still hold the task
    executor: str = "fork"  # the name of the executor that runs it
    cancel: bool = False  # killed because its cancel was asked for
    watched: bool = False  # its task directory is watched for a cancel request
    check_at: float | None = None  # monotonic: a file event asked for a look at its task then

    @property
    def label(self) -> str:
        return f"{self.claim.type}:{self.claim.id}"


class Worker:
    """A worker daemon for one server id on one spool.

    Keyword-only options: ``concurrency`` (runs at once), ``drain`` (claim
    nothing; finish what the server holds, then exit), ``grace`` (seconds
    SIGTERM waits for running handlers), ``poll`` (no inotify: rescan every
    ``rescan_interval``), ``heartbeat_interval``, ``sweep_interval``,
    ``pass_slice`` (most seconds of a sweep or rescan pass one turn does),
    ``max_tasks_per_child`` (for the fork executor; 0: never recycle a
    handler process), ``executor`` (default: a :class:`ForkExecutor`),
    ``dask_scheduler`` (the address for types whose executor is ``dask``),
    ``dask_concurrency`` (most dask runs at once; 0: the cluster's threads)
    and ``types`` (lanes: claim tasks of these types only; recovery and
    sweeps still cover everything).
    """

    def __init__(
        self,
        spool: Spool,
        server: str,
        *,
        concurrency: int = 1,
        drain: bool = False,
        grace: float = 30.0,
        poll: bool = False,
        rescan_interval: float | None = None,
        heartbeat_interval: float = 5.0,
        sweep_interval: float = 15.0,
        pass_slice: float = PASS_SLICE,
        max_tasks_per_child: int = 1000,
        executor: Executor | None = None,
        dask_scheduler: str | None = None,
        dask_concurrency: int = 0,
        types: list[str] | None = None,
    ) -> None:
        self.spool = spool
        self.server = check_server(server)
        self.concurrency = max(1, int(concurrency))
        self.draining = drain
        self.grace = max(0.0, float(grace))
        self.poll = poll
        self.rescan_interval = rescan_interval if rescan_interval is not None else (1.0 if poll else 30.0)
        self.heartbeat_interval = heartbeat_interval
        self.sweep_interval = sweep_interval
        self.pass_slice = pass_slice
        self.executor: Executor = executor or ForkExecutor(
            spool, max_tasks_per_child=max_tasks_per_child, close_in_child=self._close_in_child
        )
        self.executors: dict[str, Executor] = {"fork": self.executor}
        if dask_scheduler:
            from .dask_executor import DaskExecutor  # imports distributed: only when asked for

            self.executors["dask"] = DaskExecutor(spool, self.server, dask_scheduler, concurrency=dask_concurrency)
        self.gates = Gates(spool, self.server, self.executors, self._room,
                           lambda type_name: sum(claim.type == type_name for claim in self.jobs))
        self.notifier = Notifier()
        self.jobs: dict[Claim, _Job] = {}
        self.unsettled: list[tuple[_Job, Ended]] = []  # ended runs whose task cannot be settled yet
        self._reports: list[tuple[_Job, Outcome]] = []  # ended runs to count and log at the end of the turn
        self.stopping = False
        self.stop_deadline: float | None = None
        self.lanes = frozenset(check_type(t) for t in types) if types else None
        self.waiting = WaitingIndex(spool.layout, accept=self._in_lanes if self.lanes else None)
        self._signals: list[int] = []
        self._sig_r, self._sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # What the last wait watched and found readable; None: not known
        # (the first turn, a signal), look at every source.
        self._ready: frozenset[int] | None = None
        self._selected: frozenset[int] = frozenset()
        self._watcher: DirWatcher | None = None
        self._departures: DirWatcher | None = None
        self._types_watch: DirWatcher | None = None  # holds and releases
        self._task_watches: TaskWatches | None = None  # cancel requests of our running tasks
        self._next_heartbeat = 0.0
        self.lost_server = False  # another process took the server's lock file over
        self._next_sweep = 0.0
        self._sweeping: Generator[SweepAction | None, None, int] | None = None  # a pass under way
        self._rescanning: Iterator[None] | None = None  # likewise
        self._next_rescan = 0.0
        self._next_status = 0.0
        self._claims_paused_until = 0.0
        self._unsafe: str | None = None  # why the spool is unsafe, once said
        self._cannot_claim: dict[str, str] = {}  # name -> why its last claim was refused (said once)
        self.finished = 0
        self.failed = 0
        # Counters that outlive this process (contract §12.5): metrics/SERVER.json.
        self.counters = ServerCounters(spool.layout, self.server)

    # ------------------------------------------------------------------ life cycle

    def run(self) -> int:
        """Serve until stopped; returns the process exit status (0 on a clean
        stop, after every task was finished or handed back)."""
        # Signals first: a stop that arrives during recovery is then honoured
        # by the loop (clean exit 0) instead of killing the process.
        self._install_signals()
        self._fit_concurrency()
        try:
            self.spool.hold_server(self.server)  # ServerBusy if another process is this server
        except OSError as exc:
            raise startup_error(exc) from None
        held = self._recover()
        self._departures = DirWatcher(self.spool.layout.running, poll=self.poll, events=ARRIVALS | DEPARTURES)
        self._task_watches = TaskWatches(poll=self.poll)
        self._types_watch = DirWatcher(self.spool.layout.types, poll=self.poll)
        if not self.draining:
            self._watcher = DirWatcher(self.spool.layout.enqueued, poll=self.poll)
            self._rescan()  # its first slice: the rest in the loop, which claims once it is complete
        for claim in held:
            self._launch(claim)
        watching = self._watcher is not None and self._watcher.watching
        mode = "draining" if self.draining else ("watching" if watching else "polling")
        log.info("server %s ready on %s (concurrency %d, %s)", self.server, self.spool.root, self.concurrency, mode)
        self.notifier.ready(self._status_text())
        code = 0
        try:
            self._loop()
            if self.lost_server:
                code = EX_CONFIG  # a second server of this name: not to be restarted into a fight
        except SpoolGone as exc:
            log.error("%s; stopping", exc)
            code = 1
            self.counters.dirty = False  # nothing written into a spool being removed
        finally:
            self.counters.close()
            for executor in self.executors.values():
                executor.close()
            for watcher in self._watchers():
                watcher.close()
            self._end_passes()
            self.spool.release_server(self.server)
        log.info("server %s stopped: %d finished, %d failed", self.server, self.finished, self.failed)
        return code

    def _fit_concurrency(self) -> None:
        """Fewer handler processes than asked when the descriptor limit
        cannot feed them all: a clear line instead of a crash at the Nth."""
        budget = fd_budget()
        if budget < self.concurrency:
            log.warning(
                "server %s: the open-files limit allows %d handler process(es), not %d; "
                "running %d (raise LimitNOFILE= / ulimit -n)", self.server, budget, self.concurrency, max(1, budget),
            )
            self.concurrency = max(1, budget)

    def _close_in_child(self) -> None:
        """In a new handler process: close the loop's own descriptors, the
        server lock first (a handler's leftover must not keep a dead server
        looking alive, nor release its lock)."""
        self.spool.server_locks.close_in_child()
        for fd in (self._sig_r, self._sig_w):
            try:
                os.close(fd)
            except OSError:
                pass
        for watcher in self._watchers():
            watcher.close()
        self._end_passes()

    def _end_passes(self) -> None:
        """Drop the passes under way (they hold ``done/`` and ``enqueued/`` open)."""
        if self._sweeping is not None:
            self._sweeping.close()
            self._sweeping = None
        self._end_rescan()

    def _watchers(self) -> list[DirWatcher | TaskWatches]:
        return [w for w in (self._watcher, self._departures, self._types_watch, self._task_watches) if w is not None]

    def _in_lanes(self, name: str) -> bool:
        return self.lanes is None or name.partition(":")[0] in self.lanes

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._sig_w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGCHLD):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        # Runs between bytecodes of the main thread; only record it here.
        self._signals.append(signum)

    def _recover(self) -> list[Claim]:
        """Tasks this server held when it last died: re-enqueue the ones it was
        running (a restart is charged), hand back unstarted claims (free) —
        or, when draining, keep the unstarted claims to run them."""
        held: list[Claim] = []
        if self.draining:
            sdir = self.spool.layout.server_dir(self.server)
            for name in sorted(os.listdir(sdir)):
                claim = self._claim_of(name)
                if claim is not None:
                    held.append(claim)
        for action in sweeps.recover_server(self.spool, self.server, keep_scheduled=self.draining):
            if action.action is Action.FAILED:
                self.counters.ended(action.type, action.id)
            log.warning("recovered %s:%s: %s (%s)", action.type, action.id, action.action, action.reason,
                        extra=task_fields(action))
        return held

    def _claim_of(self, name: str) -> Claim | None:
        """The claim this server holds on ``scheduled/SERVER/name``, if any."""
        parts = split_task_name(name)
        if not parts:
            return None
        try:
            info = self.spool.status(*parts)
        except SpoolqError:
            return None
        if info.state != State.SCHEDULED or info.doc.get("server") != self.server:
            return None
        return Claim(parts[0], parts[1], int(info.doc["claim"]), self.server)

    # ------------------------------------------------------------------ the loop

    def _guard(self, what: str, action: Callable[[], object], claim: Claim | None = None) -> None:
        """Run one piece of work on one task; an error there is logged (a
        task that cannot be trusted is quarantined) and the loop goes on."""
        try:
            action()
        except CorruptTask as exc:
            log.error("%s: %s; quarantining it", what, exc)
            self.spool.quarantine(exc.path, str(exc))
        except (SpoolqError, OSError) as exc:
            self._check_spool()
            log.error("%s: %s", what, exc)

    def _check_spool(self) -> None:
        if not os.path.isdir(self.spool.layout.running) or not os.path.isdir(self.spool.layout.enqueued):
            raise SpoolGone(f"the spool at {self.spool.root} is gone")

    def _loop(self) -> None:
        while True:
            try:
                # A turn looks at each type's file once: a type registered
                # again, held or released is seen from the next turn on.
                with self.spool.registry.moment():
                    stop = self._turn()
                    self._flush_reports()  # what a turn that returned early did not say
                if stop:
                    return
            except OSError as exc:
                # Whatever a turn meets that no step guarded: the spool gone
                # ends the loop; anything else is logged and the loop goes on.
                self._check_spool()
                log.error("server %s: %s", self.server, exc)
                self._wait(CLAIM_RETRY)

    def _turn(self) -> bool:
        """One turn of the loop; True when the worker should stop."""
        self._handle_signals()
        for executor in self.executors.values():
            for ended in executor.events(self._ready):
                self._guard(f"settling {ended.claim}", lambda e=ended: self._settle(e))
        self._retry_unsettled()
        now = time.monotonic()
        self._enforce_limits(now)
        if self.stopping:
            if not self.jobs and not self.unsettled:
                return True
            if self.stop_deadline is not None and now >= self.stop_deadline:
                self._kill_all(f"interrupted: server {self.server} stopped before the handler finished")
        elif self.draining and not self.jobs and not self.unsettled:
            log.info("server %s drained", self.server)
            self.stopping = True
            self.notifier.stopping("drained")
            return True
        self._take_task_events(now)
        if not self.stopping and not self.draining:
            self._take_type_changes()
            self._take_arrivals()
            if now >= self._next_rescan:
                self._guard("rescanning enqueued/", self._rescan)
            self._fill_slots()
        # Said only now: a free slot gets its next task first.
        self._flush_reports()
        if now >= self._next_heartbeat:
            self._heartbeat()
        if now >= self._next_sweep:
            self._sweep()
        if now >= self._next_status:
            self._keep_server_lock()
            self.notifier.status(self._status_text())
            self._next_status = now + 2.0
        self.notifier.watchdog()
        self.counters.tick()
        faults.crashpoint("daemon.loop")
        self._wait(self._timeout(time.monotonic()))
        return False

    def _timeout(self, now: float) -> float:
        marks = [self._next_heartbeat, self._next_sweep, self._next_status]
        if not self.stopping and not self.draining:
            marks.append(self._next_rescan)
        marks += [job.deadline for job in self.jobs.values() if job.kill_reason is None]
        marks += [job.check_at for job in self.jobs.values() if job.check_at is not None]
        if self.stop_deadline is not None:
            marks.append(self.stop_deadline)
        if any(job.kill_reason for job in self.jobs.values()):
            marks.append(now + 0.05)  # a killed run is about to end
        if self.unsettled:
            marks.append(now + SETTLE_RETRY)
        look = self.gates.next_look()
        if look is not None and not self.stopping and not self.draining:
            marks.append(max(look, now))
        due = self.waiting.next_due()  # a task enqueued for later, or a retry after its backoff
        if due is not None and not self.stopping and not self.draining:
            marks.append(now + max(0.0, due - time.time()))
        timeout = min(marks) - now
        ping = self.notifier.next_watchdog_in()
        if ping is not None:
            timeout = min(timeout, ping)
        return max(0.0, timeout)

    def _wait(self, timeout: float) -> None:
        fds = [self._sig_r, *(fd for executor in self.executors.values() for fd in executor.fds())]
        if self.jobs:
            fds += [w.fileno() for w in (self._departures, self._task_watches) if w is not None]
        if self._types_watch is not None and self.gates.parked:
            fds.append(self._types_watch.fileno())
        if self._watcher is not None and not self.stopping and not self.draining:
            fds.append(self._watcher.fileno())
        self._ready, self._selected = None, frozenset(fds)
        try:
            ready, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            return
        if self._sig_r in ready:
            _drain_pipe(self._sig_r)  # a signal, SIGCHLD perhaps: the next turn looks everywhere
        else:
            self._ready = frozenset(ready)

    def _quiet(self, fd: int) -> bool:
        """Whether the last wait watched *fd* and found nothing to read there
        (its source need not be read this turn: a file event or result that
        comes later makes the next wait return at once)."""
        return self._ready is not None and fd in self._selected and fd not in self._ready

    def _keep_server_lock(self) -> None:
        """Put the server's lock file back if someone removed or replaced it
        (two system calls every two seconds when nobody did); stop when
        another process holds the file now there."""
        try:
            kept = self.spool.server_locks.keep(self.server)
        except (OSError, SpoolqError) as exc:
            log.error("server %s: cannot check its lock file: %s", self.server, exc)
            return
        if kept or self.stopping:
            return
        log.error("server %s: its lock file was replaced and another process holds it now: stopping", self.server)
        self.lost_server = True
        self._begin_stop("another process took over the server")

    def _begin_stop(self, status: str) -> None:
        """Stop claiming and give the running handlers the grace period;
        *status* is what systemd is told."""
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.grace
        self.notifier.stopping(status)

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT):
                if not self.stopping:
                    log.info(
                        "server %s stopping: %d running, waiting up to %g s",
                        self.server, len(self.jobs), self.grace,
                    )
                    self._begin_stop(f"stopping: {len(self.jobs)} running")
                else:
                    log.warning("server %s: second stop signal, interrupting handlers now", self.server)
                    self.stop_deadline = time.monotonic()
            elif signum == signal.SIGUSR1 and not self.draining:
                log.info("server %s draining: claiming nothing new", self.server)
                self.draining = True
                self.notifier.status("draining")

    # ------------------------------------------------------------------ claiming

    def _take_arrivals(self) -> None:
        if self._watcher is None or self._quiet(self._watcher.fileno()):
            return
        names = self._watcher.drain()
        if self._watcher.overflowed:
            log.warning("inotify dropped events (queue overflow); rescanning enqueued/")
            self._watcher.clear_overflow()
            self._end_rescan()
            self._guard("rescanning enqueued/", self._rescan)
            return
        for name in names:
            self.waiting.add(name)

    def _rescan(self) -> None:
        """A slice of a pass that rebuilds the index of ``enqueued/`` from
        the directory itself (WaitingIndex.rescan_steps): the safety net for
        lost events, and the only source in poll mode. At most
        ``pass_slice`` seconds of it a turn; the rest in the next turns,
        which then do not wait (the rescan is due again at once). A new pass
        starts ``rescan_interval`` after the last one ended."""
        if self._rescanning is None:
            if self._watcher is not None:
                if not self._watcher.watching and not self.poll and self._watcher.rewatch():
                    log.info("server %s: watching %s again: new tasks are seen at once", self.server,
                             self.spool.layout.enqueued)
                self._watcher.drain()  # what arrives from now on is not lost
            self._rescanning = self.waiting.rescan_steps()
        try:
            ended = self._advance(self._rescanning)
        except BaseException:
            self._rescanning = None
            raise
        if ended:
            self._rescanning = None
            # Without the watch the kernel refused (inotify limits), rescans
            # are all there is: as often as in poll mode, not once in 30 s.
            unwatched = self._watcher is not None and not self._watcher.watching
            self._next_rescan = time.monotonic() + (min(self.rescan_interval, UNWATCHED_RESCAN) if unwatched
                                                    else self.rescan_interval)
        # else _next_rescan stays in the past: the pass goes on next turn

    def _advance(self, steps: Iterator[T], on_step: Callable[[T], object] | None = None) -> bool:
        """Take steps of a pass for at most ``pass_slice`` seconds (at least
        one), calling *on_step* with each; True if the pass ended."""
        until = time.monotonic() + self.pass_slice
        for step in steps:
            if on_step is not None:
                on_step(step)
            if time.monotonic() >= until:
                return False
        return True

    def _end_rescan(self) -> None:
        """Drop a rescan under way (it holds ``enqueued/`` open)."""
        if self._rescanning is not None:
            self._rescanning.close()
            self._rescanning = None

    def _fill_slots(self) -> None:
        if time.monotonic() < self._claims_paused_until or not self.waiting.complete:
            return  # (until the first rescan is complete, a task claimed might not be the first)
        if len(self.waiting) and self.gates.room_anywhere() and not self._spool_safe():
            return  # (looked at only when a claim may follow: without inotify the look is a full check)
        self.gates.check_executors(self.notifier.status)
        self.gates.reopen(self.waiting)
        while self.gates.room_anywhere():
            name = self.waiting.pop()
            if name is None:
                return
            gate = self.gates.gate(name)
            if gate is not None:
                self.gates.park(gate, name, self.waiting.popped)  # back in the index when the gate opens
                continue
            try:
                claim = self.spool.claim(self.server, names=[name])
            except SpoolqError as exc:
                # Said once per task and reason: each rescan offers it again
                # until someone fixes it, and the log must not fill with it.
                said = self._cannot_claim.get(name) == str(exc)
                log.log(logging.DEBUG if said else logging.ERROR, "cannot claim %s: %s", name, exc)
                if len(self._cannot_claim) >= CANNOT_CLAIM_MEMORY:
                    self._cannot_claim.clear()  # bounded: at worst a reason is said again
                self._cannot_claim[name] = str(exc)
                continue
            except OSError as exc:
                # Disk full or the like: the claim was undone (the task waits
                # again); retry a little later instead of spinning on it.
                self._check_spool()
                log.error("cannot claim %s: %s; claiming again in %g s", name, exc, CLAIM_RETRY)
                self._claims_paused_until = time.monotonic() + CLAIM_RETRY
                return
            if claim is not None:
                self._cannot_claim.pop(name, None)
                log.info("claimed %s:%s (claim %d)", claim.type, claim.id, claim.number,
                         extra=task_fields(claim, "SCHEDULED"))
                self._guard(f"starting {claim}", lambda c=claim: self._launch(c))

    def _spool_safe(self) -> bool:
        """Whether the spool may be worked now (the check every start makes,
        made before claiming: one read while nothing changed). While it is
        unsafe (a chmod o+w), nothing is claimed, and that is said once:
        each claim used to be started, refused and handed back every second,
        a "started" line and an error each time, its claim number climbing."""
        try:
            self.spool.layout.check_again()
        except (SpoolqError, OSError) as exc:  # unsafe, on two filesystems, a state directory missing
            self._check_spool()  # gone for good: the loop ends
            if self._unsafe != str(exc):
                log.error("server %s claims nothing while the spool is unsafe: %s", self.server, exc)
                self._unsafe = str(exc)
            self._claims_paused_until = time.monotonic() + CLAIM_RETRY
            return False
        if self._unsafe is not None:
            log.info("server %s: the spool is safe again; claiming", self.server)
            self._unsafe = None
        return True

    # ------------------------------------------------------------------ executors

    def _room(self, route: str) -> int:
        """How many more runs executor *route* may take now."""
        executor = self.executors.get(route)
        if executor is None or self.gates.unavailable(route):
            return 0
        limit = executor.capacity()
        if limit is None:
            limit = self.concurrency
        held = [job for job in self.jobs.values() if job.executor == route]
        held += [job for job, _ in self.unsettled if job.executor == route]
        return limit - len(held)

    def _launch(self, claim: Claim) -> None:
        """Hand *claim* to the executor, with its deadline."""
        try:
            timeout = self.spool.get_type(claim.type).timeout
        except SpoolqError as exc:
            # Its type's file hand-edited into garbage, say: a deployment
            # error like a handler that does not import; the tasks wait.
            self.gates.handler_missing(claim, str(exc), cause="type file")
            return
        now = time.monotonic()
        route = self.gates.executor_of(claim.type)
        executor = self.executors.get(route)
        if executor is None:  # a recovered claim of a type this server cannot run
            self.spool.hand_back(claim, f"server {self.server} has no {route} executor")
            return
        # A timeout <= 0 means no time limit (the type's own rule).
        job = _Job(claim, now, now + timeout if timeout > 0 else math.inf, executor=route)
        try:
            executor.submit(claim, job.deadline)
        except OSError as exc:
            # No handler process for it (it died between tasks, or none can
            # be started: out of descriptors or processes): the unstarted
            # claim goes back, uncharged; with less room, run fewer at once.
            self.spool.hand_back(claim, f"no handler process to run it: {exc.strerror or exc}")
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM) and self.concurrency > 1:
                self.concurrency = max(1, len(self.jobs))
                log.warning("server %s: cannot start a handler process (%s); running %d at once from now on",
                            self.server, exc.strerror, self.concurrency)
            self._claims_paused_until = time.monotonic() + CLAIM_RETRY
            return
        self.jobs[claim] = job
        log.info("started %s %s", job.label, self._where(job), extra=task_fields(claim, "RUNNING"))

    # ------------------------------------------------------------------ ends

    def _settle(self, ended: Ended) -> None:
        """Give the task of a run that ended the state it earned."""
        job = self.jobs.pop(ended.claim, None)
        if job is None:
            return
        self._unwatch(job)
        if ended.outcome in (Outcome.NO_HANDLER, Outcome.NO_ROOM):
            # The "started" line said its handler process had it; this one
            # says it went back (a trace by SPOOLQ_ID reads right).
            why = "its handler does not import here" if ended.outcome is Outcome.NO_HANDLER else ended.reason
            log.info("handed back %s, not started: %s", job.label, why, extra=task_fields(job.claim, "ENQUEUED"))
        if ended.outcome is Outcome.NO_HANDLER:
            self.gates.handler_missing(job.claim, ended.reason)
            return
        if ended.outcome is Outcome.NO_ROOM:
            # Its type's concurrency limit filled up between our look and the
            # start: back it goes, never started; the gate holds the rest.
            self.spool.hand_back(job.claim, f"not started on server {self.server}: {ended.reason}")
            return
        if ended.outcome is Outcome.NOT_STARTED:
            # Disk full or the like: claims pause as after a failed claim.
            # Back it goes if it can (else the sweep sends it back later).
            log.error("%s: %s; claiming again in %g s", job.label, ended.reason, CLAIM_RETRY,
                      extra=task_fields(job.claim, "ENQUEUED"))
            self._claims_paused_until = time.monotonic() + CLAIM_RETRY
            self._guard(f"handing back {job.claim}", lambda: self.spool.hand_back(
                job.claim, f"not started on server {self.server}: {ended.reason}"))
            return
        self.gates.reopen(self.waiting, only="slots")  # a run ended: a slot of its type may be free
        if ended.outcome is Outcome.UNRECORDED:
            # The run ended, but its handler process could not write how (an
            # I/O error, a full disk): write it from here, through the claim.
            end = NotRecorded.from_note(ended.reason)
            log.error("%s: %s; recording it as %s here", job.label, end, end.state.name)
            self._record_end(job, end.state, end.message)
            return
        if ended.outcome is not None:  # it reached its end (even if a kill was on its way)
            self.gates.handler_found(job.claim.type)
            self._report(job, ended.outcome)
            return
        if job.cancel:
            self._finish_cancel(job)
            return
        if job.kill_reason is None and not ended.lost and time.monotonic() >= job.deadline:
            # Past its deadline before this loop could enforce it (the worker
            # was stopped): the handler process killed itself. A timeout.
            job.kill_reason, job.charge = self._timeout_reason(job), True
        if job.kill_reason is not None or ended.lost:
            faults.crashpoint("daemon.handback")  # killed, not handed back yet
            reason = job.kill_reason if job.kill_reason is not None else ended.reason
            charge = job.charge if job.kill_reason is not None else True
            result = self.spool.abandon(job.claim, reason, charge=charge)
            if result is Action.BUSY:
                self._unsettle(job, ended)
            elif result is Action.FAILED:
                self.failed += 1
                self.counters.ended(job.claim.type, job.claim.id, job.claim.number)
                # Worded like the task's own message ("...; gave up after N start(s)"),
                # so one grep finds both in the journal and in `spoolq log`.
                log.error("failed %s: %s; gave up, no restarts left", job.label, reason,
                          extra=task_fields(job.claim, "FAILED"))
            elif result is Action.REENQUEUED:
                log.warning("re-enqueued %s: %s", job.label, reason, extra=task_fields(job.claim, "ENQUEUED"))
            else:
                # Nothing to take away: its handler gave it its final state
                # before it was killed (and then hung), or it was deleted.
                self._report(job, outcome_of(self.spool, job.claim))
            return
        self._record_end(job, State.FAILED, ended.reason)

    def _record_end(self, job: _Job, state: State, message: str) -> None:
        """Write the end of a run whose handler process did not (FAILED with
        *message*, or FINISHED) through its claim, and report it."""
        try:
            if state is State.FINISHED:
                self.spool.finish_if_not_finished(job.claim)
                self._report(job, outcome_of(self.spool, job.claim))
                return
            now = self.spool.set_state(job.claim, State.FAILED, message)
            self._report(job, Outcome.RETRY if now is State.ENQUEUED else Outcome.FAILED)
        except StaleClaim:
            # It reached a final state (or was taken away) before dying.
            self._report(job, outcome_of(self.spool, job.claim))
        except CorruptTask as exc:
            # Tampered with (by its handler, say): set aside, not left running.
            log.error("cannot record the end of %s (%s): %s; quarantining it", job.label, message or state.name,
                      exc, extra=task_fields(job.claim))
            self.spool.quarantine(exc.path, str(exc))
        except (SpoolqError, OSError) as exc:
            # Disk full, say: it stays as it is until its timeout re-enqueues
            # it; the daemon goes on.
            log.error("cannot record the end of %s (%s): %s", job.label, message or state.name, exc)

    def _finish_cancel(self, job: _Job) -> None:
        """A run stopped for its cancel: the task ends FAILED, cancelled
        (unless it reached its end first, or leftovers still hold it)."""
        result = self.spool.finish_cancel(self.spool.layout.task_path(Place.RUNNING, job.claim.name),
                                          expect_claim=job.claim.number)
        if result is Action.BUSY:
            self._unsettle(job, Ended(job.claim, None, "cancelled"))
        elif result is Action.FAILED:
            self.failed += 1
            self.counters.ended(job.claim.type, job.claim.id, job.claim.number)
            log.warning("cancelled %s", job.label, extra=task_fields(job.claim, "FAILED"))
        else:
            self._report(job, outcome_of(self.spool, job.claim))

    def _unsettle(self, job: _Job, ended: Ended) -> None:
        """The run ended, but processes it started (and the executor could
        not reach) still hold the task: kill them, settle it when they are gone."""
        now = time.monotonic()
        if job.unsettled_since is None:
            job.unsettled_since = now
        pids = self.spool.run_holders(self.spool.layout.task_path(Place.RUNNING, job.claim.name))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if now - job.unsettled_since > KILL_PATIENCE:
            job.unsettled_since = now
            log.warning("%s: processes of its run still hold it (pids %s); waiting", job.claim, pids or "unknown")
        self.unsettled.append((job, ended))

    def _retry_unsettled(self) -> None:
        retry, self.unsettled = self.unsettled, []
        for job, ended in retry:
            self.jobs[job.claim] = job
            self._guard(f"settling {job.claim}", lambda e=ended: self._settle(e))

    def _report(self, job: _Job, outcome: Outcome) -> None:
        """Count and log how a run ended, once the turn has refilled the
        slots (:meth:`_flush_reports`)."""
        self._reports.append((job, outcome))

    def _flush_reports(self) -> None:
        reports, self._reports = self._reports, []
        for job, outcome in reports:
            self._guard(f"reporting {job.claim}", lambda j=job, o=outcome: self._say_outcome(j, o))

    def _say_outcome(self, job: _Job, outcome: Outcome) -> None:
        if outcome in (Outcome.FINISHED, Outcome.FAILED):
            self.counters.ended(job.claim.type, job.claim.id, job.claim.number)
        if outcome is Outcome.FINISHED:
            self.finished += 1
            log.info("finished %s in %.3f s", job.label, time.monotonic() - job.claimed,
                     extra=task_fields(job.claim, "FINISHED"))
        elif outcome in (Outcome.FAILED, Outcome.RETRY):
            try:
                message = self.spool.status(job.claim.type, job.claim.id).doc.get("message", "")
            except SpoolqError:
                message = ""
            message = codec.one_line(str(message))  # one line per event, whatever the handler raised
            if outcome is Outcome.RETRY:
                log.warning("%s: %s", job.label, message,  # "retry k/N in X s: why"
                            extra=task_fields(job.claim, "ENQUEUED"))
            else:
                self.failed += 1
                log.error("failed %s: %s", job.label, message, extra=task_fields(job.claim, "FAILED"))
        elif outcome is Outcome.QUARANTINED:
            log.error("quarantined %s: its task directory could not be trusted when it ended", job.label,
                      extra=task_fields(job.claim))
        else:
            log.info("%s was taken away or deleted while it ran", job.label, extra=task_fields(job.claim))

    @staticmethod
    def _timeout_reason(job: _Job) -> str:
        return f"timed out after {job.deadline - job.claimed:g} s"

    def _enforce_limits(self, now: float) -> None:
        for job in list(self.jobs.values()):
            if job.kill_reason is None and now >= job.deadline:
                self._kill(job, self._timeout_reason(job), charge=True)
            elif job.kill_reason is not None and job.killed_at is not None and now - job.killed_at > KILL_PATIENCE:
                # Killed but not ended for a while: stuck in the kernel (D
                # state); the task stays claimed until its run ends.
                job.killed_at = now
                log.warning("%s, run %s, does not end; still waiting", job.claim, self._where(job))

    def _where(self, job: _Job) -> str:
        """Where a run is, for the log: its handler process here, or the
        executor whose host runs it (dask: a worker elsewhere)."""
        pid = self.executors[job.executor].pid(job.claim)
        return f"in pid {pid}" if pid is not None else f"on the {job.executor} executor"

    def _kill(self, job: _Job, reason: str, *, charge: bool) -> None:
        job.kill_reason = reason
        job.charge = charge
        job.killed_at = time.monotonic()
        self.executors[job.executor].kill(job.claim)

    def _kill_all(self, reason: str) -> None:
        for job in list(self.jobs.values()):
            if job.kill_reason is None:
                self._kill(job, reason, charge=False)
        self.stop_deadline = None

    # ------------------------------------------------------------------ housekeeping

    def _take_task_events(self, now: float) -> None:
        """A task of ours that arrived in running/ (started: watch it for a
        cancel request), left it without our doing (deleted, taken away), or
        had its status replaced (a cancel asked for): look at it shortly
        (:data:`TASK_EVENT_DELAY`), not at the next heartbeat."""
        names: set[str] = set()
        if self._departures is not None and not self._quiet(self._departures.fileno()):
            names |= set(self._departures.drain())
        if self._task_watches is not None and not self._quiet(self._task_watches.fileno()):
            names |= {str(key) for key, file in self._task_watches.drain() if file == "status.json"}
        for job in list(self.jobs.values()):
            if job.claim.name in names and job.check_at is None:
                job.check_at = now + TASK_EVENT_DELAY
            elif job.check_at is not None and job.check_at <= now:
                job.check_at = None
                self._guard(f"checking {job.claim}", lambda j=job: self._check_job(j))

    def _take_type_changes(self) -> None:
        """A type file replaced (held, released, registered again): tasks
        parked behind a hold that was lifted go back to the index."""
        watch = self._types_watch
        if watch is not None and not self._quiet(watch.fileno()) and watch.drain():
            self.gates.reopen(self.waiting, only="held")

    def _unwatch(self, job: _Job) -> None:
        if job.watched and self._task_watches is not None:
            self._task_watches.remove(job.claim.name)
            job.watched = False

    def _heartbeat(self) -> None:
        self._next_heartbeat = time.monotonic() + self.heartbeat_interval
        for job in list(self.jobs.values()):
            self._guard(f"heartbeat of {job.claim}", lambda j=job: self._check_job(j, heartbeat=True))
            # A pass costs a few file operations a running task: on a disk that
            # takes 200 ms each, 16 tasks outlast WatchdogSec=30s. A slow disk
            # is not a hung worker.
            self.notifier.watchdog()

    def _check_job(self, job: _Job, *, heartbeat: bool = False) -> None:
        """Look at the job's task: watch it for a cancel request once it is
        started; kill its run if its cancel was asked for, or if the task is
        no longer ours. The heartbeat also touches it."""
        if job.kill_reason is not None:
            return
        path = self.spool.layout.task_path(Place.RUNNING, job.claim.name)
        there = os.path.isdir(path)
        if there and not job.watched and self._task_watches is not None:
            job.watched = self._task_watches.add(path, job.claim.name)
        cancel = self.spool.cancel_asked(job.claim) if there else None
        if cancel is not None:
            log.warning("%s: cancel asked for (%s); stopping its handler", job.claim, cancel,
                        extra=task_fields(job.claim))
            job.cancel = True
            self._kill(job, f"cancelled: {cancel}", charge=False)
            return
        if there and heartbeat and self.spool.touch(job.claim):
            return
        # Not in running/, or an event there, or not ours there: not started
        # yet, finished or sent back for a retry by its own handler (whose
        # answer is on its way), or deleted, perhaps with its id enqueued
        # again (a task in running/ under the same name, another life).
        # Only a delete (or a quarantine) needs the run stopped: nobody else
        # takes a task from a run that holds its run lock.
        try:
            doc = self.spool.status(job.claim.type, job.claim.id).doc
        except (TaskNotFound, UnknownType):  # (its type unregistered with --force, tasks and all)
            doc = None
        claim = job.claim
        if doc is not None and (claim.owns(doc) or claim.sent_back(doc) or claim.not_recorded_yet(doc)):
            return
        # (A task of the same id that is not this claim's: the old run was
        # left running beside the new one while a frozen worker's delete
        # gave up waiting.)
        log.warning("%s was deleted; stopping its handler", job.claim, extra=task_fields(job.claim))
        self._kill(job, "task deleted", charge=False)

    def _sweep(self) -> None:
        """A slice of the maintenance pass (sweeps.sweep_steps): at most
        ``pass_slice`` seconds of it; the rest in the next turns, which then
        do not wait (the pass is due again at once). A new pass starts
        ``sweep_interval`` after the last one ended."""
        if self._sweeping is None:
            self._sweeping = sweeps.sweep_steps(self.spool)
        try:
            ended = self._advance(self._sweeping, self._report_sweep)
        except (SpoolqError, OSError) as exc:
            self._check_spool()
            log.error("sweep failed: %s", exc)
            ended = True
        if ended:
            self._sweeping = None
            self._next_sweep = time.monotonic() + self.sweep_interval
        # else _next_sweep stays in the past: the pass goes on next turn

    def _report_sweep(self, action: SweepAction | None) -> None:
        if action is None:  # an entry looked at, nothing done
            return
        if action.action is Action.FAILED:  # gave up on a task (no restarts left): it ended here
            self.counters.ended(action.type, action.id)
        if action.action is Action.RETIRED:
            log.info("sweep: retired %s:%s", action.type, action.id, extra=task_fields(action))
        else:
            log.warning("sweep: %s %s:%s (%s)", action.action, action.type, action.id, action.reason,
                        extra=task_fields(action))

    def _status_text(self) -> str:
        if self.stopping:
            return f"stopping: {len(self.jobs)} running"
        prefix = "draining: " if self.draining else ""
        # While the first pass over a backlog runs, the index holds only what
        # it has seen: "614 queued" of 20,000 would mislead at 3 a.m.
        queued = f"{len(self.waiting)} queued" if self.waiting.complete else f"{len(self.waiting)} queued so far (scanning)"
        return f"{prefix}{len(self.jobs)}/{self.concurrency} running, {queued}"


class SpoolGone(Exception):
    """The spool's directories disappeared under the worker."""


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


# A worker that cannot start for one of these will not start on a retry
# either: a configuration error (exit 78, not restarted). A full disk or an
# I/O error may pass, and stays an error systemd restarts on.
_CONFIG_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def startup_error(exc: OSError) -> Exception:
    """What a worker that met *exc* while starting raises: SpoolError (exit
    78) for a spool it may not or cannot write, else *exc* itself."""
    if exc.errno not in _CONFIG_ERRNOS:
        return exc
    where = f": {exc.filename}" if exc.filename else ""
    return SpoolError(f"cannot start: {exc.strerror}{where} (the worker's user needs to write the spool)")


def run_worker(
    root: str | None,
    server: str,
    *,
    concurrency: int = 1,
    drain: bool = False,
    grace: float = 30.0,
    poll: bool = False,
    max_tasks_per_child: int = 1000,
    dask_scheduler: str | None = None,
    dask_concurrency: int = 0,
    pythonpath: list[str] | None = None,
    types: list[str] | None = None,
    allow_root: bool = False,
) -> int:
    """Entry point of ``spoolq worker``. Configuration errors (bad spool,
    bad server id, server already running, a *pythonpath* entry that is not
    a directory) raise SpoolqError; the command line turns them into exit
    status 78 (EX_CONFIG), which the systemd unit does not restart on.

    *pythonpath*: directories put first on the import path, where handler
    modules are found (handler processes inherit it). *allow_root*: run
    as root although others can write the spool (:func:`root_writers`)."""
    setup_logging()
    check_server(server)
    for directory in reversed(pythonpath or []):
        path = os.path.abspath(directory)
        if not os.path.isdir(path):
            raise SpoolError(f"--pythonpath {directory}: not a directory")
        sys.path.insert(0, path)
    try:
        spool = Spool(root)
    except OSError as exc:
        raise startup_error(exc) from None
    if drain and spool.server_alive(server):
        return drain_running(spool, server)
    if os.geteuid() == 0 and not allow_root:
        others = root_writers(spool.root)
        if others:
            # A pickle is code: whoever may enqueue would run it as root.
            raise SpoolError(
                f"refusing to run handlers as root: {others} can write the spool, and their input would run as "
                f"root; run the worker as the spool's owner (as its unit does: User=), or give --allow-root")
    if types is not None and not types:
        raise SpoolError("--types needs at least one type name")
    for name in types or []:
        if spool.registry.find(name) is None:  # a typo, or registered later by the deployment: said, not refused
            log.warning("server %s: --types names unknown task type %r: none of its tasks is claimed until it is "
                        "registered ('spoolq types' lists the registered ones)", server, name)
    worker = Worker(
        spool, server, concurrency=concurrency, drain=drain, grace=grace, poll=poll,
        max_tasks_per_child=max_tasks_per_child, dask_scheduler=dask_scheduler, dask_concurrency=dask_concurrency,
        types=types,
    )
    return worker.run()


def drain_running(spool: Spool, server: str) -> int:
    """``--drain`` for a server that runs already: ask it (SIGUSR1) to finish
    what it holds and exit, and wait until it has."""
    pid = spool.server_locks.pid_of(server)
    if pid <= 0:
        raise ServerBusy(server, f"server {server!r} is running but its pid is unknown; stop it instead")
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        raise ServerBusy(
            server, f"server {server!r} holds its lock but its pid {pid} is gone; find the holder with: "
            f"fuser {spool.layout.server_lock(server)}",
        ) from None
    log.info("asked server %s (pid %d) to drain; waiting for it to exit", server, pid)
    while spool.server_alive(server):
        time.sleep(0.2)
    log.info("server %s drained and exited", server)
    return 0
