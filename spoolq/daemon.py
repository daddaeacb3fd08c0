"""The worker daemon: ``spoolq worker SERVER`` (systemd: ``spoolq@SERVER``).

One process, one thread of control: a ``select()`` loop that wakes on

* file events in ``enqueued/`` (an inotify descriptor, :class:`DirWatcher`),
* signals (SIGCHLD, SIGTERM, SIGINT, SIGUSR1, through ``set_wakeup_fd``),
* the nearest deadline: a handler's time limit, the heartbeat, the sweep, the
  safety rescan of ``enqueued/``, the systemd watchdog ping.

Tasks run in a pool of ``concurrency`` handler processes ("slots"), each
forked by the daemon, in its own process group, and fed one claim at a time
over a pipe. A handler that raises or calls ``sys.exit`` costs nothing; one
that segfaults, calls ``os._exit`` or hangs costs its slot: the daemon reaps it,
gives the task the state it earned and forks a fresh slot. A slot is also
replaced after ``max_tasks_per_child`` tasks, so leaks stay bounded. (Forking
per task, as a first version did, cost 8 ms a task here: more than the whole
lifecycle on disk.) The daemon itself never unpickles input and never
imports handlers; slots do both.

Mechanism and caveats:

* Claims are made only when a slot is free, so nothing sits claimed while
  waiting for a slot (ATP claimed ahead and duplicated work on timeouts).
* The time limit runs from the claim (SPEC §5a). At the deadline the child's
  whole process group gets SIGKILL; the task is re-enqueued or FAILED by
  ``max_restarts``.
* The heartbeat touches each running task's directory. If the task vanished
  (deleted, or taken away by a sweeper), the child is killed: its claim is
  fenced anyway, this just stops wasted work.
* Slots die with the daemon (PR_SET_PDEATHSIG) and share its server lock
  while they live: a task of a dead server is never still running when
  another server, or the restarted one, recovers it.
* SIGTERM/SIGINT: stop claiming, give running handlers ``grace`` seconds,
  then kill them and hand their tasks back uncharged; exit 0. A second
  signal cuts the grace short. SIGUSR1 (or ``--drain``): claim nothing new,
  finish what is held, exit 0.
"""

from __future__ import annotations

import ctypes
import errno
import heapq
import importlib
import logging
import math
import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import faults
from .errors import CorruptTask, ServerBusy, SpoolqError, StaleClaim, TaskNotFound
from .names import check_server, split_task_name
from .spool import Claim, Spool, State
from .systemd import Notifier, setup_logging
from .tracker import TaskStatus
from .watch import DirWatcher

log = logging.getLogger("spoolq.daemon")

_PR_SET_PDEATHSIG = 1
EX_CONFIG = 78
CLAIM_RETRY = 1.0  # seconds claiming pauses after a claim failed with an OSError (disk full)


@dataclass
class _Job:
    claim: Claim
    pid: int
    claimed: float  # monotonic
    deadline: float  # monotonic; the type's timeout from the claim
    kill_reason: str | None = None
    charge: bool = True
    killed_at: float | None = None  # monotonic


@dataclass(order=True)
class _Waiting:
    key: tuple[int, str]
    name: str = field(compare=False)


def load_handler(path: str) -> Callable[..., Any]:
    """Import ``pkg.mod.func`` and return the function."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ImportError(f"handler {path!r} is not a dotted path")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"module {module_name!r} has no attribute {attr!r}") from None


def run_claim(spool: Spool, claim: Claim) -> str:
    """Run one claimed task to a final state in this process (a slot's
    body). Returns the outcome: "FINISHED", "FAILED" or "GONE" (the task was
    taken away or deleted)."""
    try:
        started = spool.start(claim)
    except (StaleClaim, TaskNotFound):
        return "GONE"  # taken away before it started: nothing to do
    except CorruptTask as exc:
        log.error("%s: %s", claim, exc)
        return _outcome(spool, claim)  # start() already failed or quarantined it
    context = TaskStatus(claim, spool=spool)
    try:
        try:
            handler = load_handler(started.handler)
        except Exception as exc:
            _fail(spool, claim, f"cannot import handler {started.handler!r}: {type(exc).__name__}: {exc}", exc)
            return "FAILED"
        try:
            handler(context, started.input)
        except SystemExit as exc:
            if exc.code not in (None, 0):
                spool.set_state(claim, State.FAILED, f"handler called sys.exit({exc.code!r})")
                return "FAILED"
        except StaleClaim:
            raise  # the handler's own status call found its task taken away
        except BaseException as exc:  # noqa: BLE001 - every failure becomes FAILED
            _fail(spool, claim, f"{type(exc).__name__}: {exc}", exc)
            return "FAILED"
        if spool.finish_if_not_finished(claim):
            return "FINISHED"
    except StaleClaim as exc:
        log.warning("%s: %s", claim, exc)
        return "GONE"
    return _outcome(spool, claim)


def _outcome(spool: Spool, claim: Claim) -> str:
    try:
        info = spool.status(claim.type, claim.id)
    except SpoolqError:
        return "GONE"
    if info.doc.get("claim") != claim.number or not info.state.terminal:
        return "GONE"
    return info.state.name


def _fail(spool: Spool, claim: Claim, message: str, exc: BaseException) -> None:
    """FAILED with a one-line message; the traceback goes in the log first."""
    trace = "".join(traceback.format_exception(exc)).rstrip()
    try:
        spool.log_message(claim, trace)
        spool.set_state(claim, State.FAILED, message)
    except StaleClaim:
        pass


class _Slot:
    """One handler process of the pool and the pipes to it.

    The daemon writes one claim per line to ``commands``; the slot answers
    one outcome per line on ``results``. A slot is its own process group, so
    killing the group also kills whatever its handler spawned.
    """

    def __init__(self, pid: int, commands: int, results: int) -> None:
        self.pid = pid
        self.commands = commands
        self.results = results
        self.buffer = b""
        self.job: _Job | None = None
        self.tasks = 0
        self.retiring = False

    def send(self, claim: Claim) -> None:
        os.write(self.commands, f"{claim}\n".encode())

    def close(self) -> None:
        for fd in (self.commands, self.results):
            try:
                os.close(fd)
            except OSError:
                pass
        self.commands = self.results = -1


class Worker:
    """A worker daemon for one server id on one spool.

    Keyword-only options: ``concurrency`` (handler processes, so tasks at
    once), ``drain`` (claim nothing; finish what the server holds, then exit),
    ``grace`` (seconds SIGTERM waits for running handlers), ``poll`` (no
    inotify: rescan every ``rescan_interval``), ``heartbeat_interval``,
    ``sweep_interval``, ``max_tasks_per_child`` (0: never recycle a slot).
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
        max_tasks_per_child: int = 1000,
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
        self.max_tasks_per_child = max(0, int(max_tasks_per_child))
        self.notifier = Notifier()
        self.slots: dict[int, _Slot] = {}
        self.stopping = False
        self.stop_deadline: float | None = None
        self._heap: list[_Waiting] = []
        self._known: set[str] = set()
        self._signals: list[int] = []
        self._sig_r, self._sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._watcher: DirWatcher | None = None
        self._next_heartbeat = 0.0
        self._next_sweep = 0.0
        self._next_rescan = 0.0
        self._next_status = 0.0
        self._claims_paused_until = 0.0
        self.finished = 0
        self.failed = 0

    @property
    def jobs(self) -> list[_Job]:
        return [slot.job for slot in self.slots.values() if slot.job is not None]

    # ------------------------------------------------------------------ life cycle

    def run(self) -> int:
        """Serve until stopped; returns the process exit status (0 on a clean
        stop, after every task was finished or handed back)."""
        # Signals first: a stop that arrives during recovery is then honoured
        # by the loop (clean exit 0) instead of killing the process.
        self._install_signals()
        self.spool.hold_server(self.server)  # ServerBusy if another process is this server
        held = self._recover()
        if not self.draining:
            self._watcher = DirWatcher(self.spool._p("enqueued"), poll=self.poll)
            self._rescan()
        for claim in held:
            self._launch(claim)
        watching = self._watcher is not None and self._watcher.watching
        mode = "draining" if self.draining else ("watching" if watching else "polling")
        log.info("server %s ready on %s (concurrency %d, %s)", self.server, self.spool.root, self.concurrency, mode)
        self.notifier.ready(self._status_text())
        try:
            self._loop()
        finally:
            self._close_slots()
            if self._watcher:
                self._watcher.close()
            self.spool.release_server(self.server)
        log.info("server %s stopped: %d finished, %d failed", self.server, self.finished, self.failed)
        return 0

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
            sdir = self.spool._p("scheduled", self.server)
            for name in sorted(os.listdir(sdir)):
                claim = self._claim_of(os.path.join(sdir, name))
                if claim is not None:
                    held.append(claim)
        for action in self.spool.recover_server(self.server, keep_scheduled=self.draining):
            log.warning("recovered %s:%s: %s (%s)", action.type, action.id, action.action, action.reason)
        return held

    def _claim_of(self, path: str) -> Claim | None:
        parts = split_task_name(os.path.basename(path))
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

    def _loop(self) -> None:
        while True:
            self._handle_signals()
            self._reap()
            now = time.monotonic()
            self._enforce_limits(now)
            busy = len(self.jobs)
            if self.stopping:
                if not busy:
                    return
                if self.stop_deadline is not None and now >= self.stop_deadline:
                    self._kill_all(f"interrupted: server {self.server} stopped before the handler finished")
            elif self.draining and not busy:
                log.info("server %s drained", self.server)
                self.stopping = True
                self.notifier.stopping("drained")
                return
            if not self.stopping and not self.draining:
                self._take_arrivals()
                if now >= self._next_rescan:
                    self._rescan()
                self._fill_slots()
            if now >= self._next_heartbeat:
                self._heartbeat()
            if now >= self._next_sweep:
                self._sweep()
            if now >= self._next_status:
                self.notifier.status(self._status_text())
                self._next_status = now + 2.0
            self.notifier.watchdog()
            faults.crashpoint("daemon.loop")
            self._wait(self._timeout(time.monotonic()))

    def _timeout(self, now: float) -> float:
        marks = [self._next_heartbeat, self._next_sweep, self._next_status]
        if not self.stopping and not self.draining:
            marks.append(self._next_rescan)
        jobs = self.jobs
        marks += [job.deadline for job in jobs if job.kill_reason is None]
        if self.stop_deadline is not None:
            marks.append(self.stop_deadline)
        if any(job.kill_reason for job in jobs):
            marks.append(now + 0.05)  # a killed slot is about to be reaped
        timeout = min(marks) - now
        ping = self.notifier.next_watchdog_in()
        if ping is not None:
            timeout = min(timeout, ping)
        return max(0.0, timeout)

    def _wait(self, timeout: float) -> None:
        fds = [self._sig_r]
        if self._watcher is not None and not self.stopping and not self.draining:
            fds.append(self._watcher.fileno())
        fds += [slot.results for slot in self.slots.values() if slot.results >= 0]
        try:
            ready, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            return
        for fd in ready:
            if fd == self._sig_r:
                _drain_pipe(fd)
        by_fd = {slot.results: slot for slot in self.slots.values()}
        for fd in ready:
            slot = by_fd.get(fd)
            if slot is not None:
                self._read_results(slot)

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT):
                if not self.stopping:
                    self.stopping = True
                    self.stop_deadline = time.monotonic() + self.grace
                    log.info(
                        "server %s stopping: %d running, waiting up to %g s",
                        self.server, len(self.jobs), self.grace,
                    )
                    self.notifier.stopping(f"stopping: {len(self.jobs)} running")
                else:
                    log.warning("server %s: second stop signal, interrupting handlers now", self.server)
                    self.stop_deadline = time.monotonic()
            elif signum == signal.SIGUSR1 and not self.draining:
                log.info("server %s draining: claiming nothing new", self.server)
                self.draining = True
                self.notifier.status("draining")

    # ------------------------------------------------------------------ claiming

    def _take_arrivals(self) -> None:
        if self._watcher is None:
            return
        names = self._watcher.drain()
        if self._watcher.overflowed:
            log.warning("inotify dropped events (queue overflow); rescanning enqueued/")
            self._watcher.clear_overflow()
            self._rescan()
            return
        for name in names:
            if name not in self._known:
                key = self.spool.fifo_key(name)
                if key is not None:
                    heapq.heappush(self._heap, _Waiting(key, name))
                    self._known.add(name)

    def _rescan(self) -> None:
        """Rebuild the index of ``enqueued/`` from the directory itself: the
        safety net for lost events, and the only source in poll mode."""
        if self._watcher is not None:
            self._watcher.drain()  # what arrives from now on is not lost
        self._heap = []
        with os.scandir(self.spool._p("enqueued")) as entries:
            for entry in entries:
                try:
                    key = (entry.stat(follow_symlinks=False).st_mtime_ns, entry.name)
                except FileNotFoundError:
                    continue
                self._heap.append(_Waiting(key, entry.name))
        heapq.heapify(self._heap)
        self._known = {w.name for w in self._heap}
        self._next_rescan = time.monotonic() + self.rescan_interval

    def _fill_slots(self) -> None:
        if time.monotonic() < self._claims_paused_until:
            return
        while len(self.jobs) < self.concurrency and self._heap:
            waiting = heapq.heappop(self._heap)
            self._known.discard(waiting.name)
            try:
                claim = self.spool.claim(self.server, names=[waiting.name])
            except SpoolqError as exc:
                log.error("cannot claim %s: %s", waiting.name, exc)
                continue
            except OSError as exc:
                # Disk full or the like: the claim was undone (the task waits
                # again); retry a little later instead of spinning on it.
                log.error("cannot claim %s: %s; claiming again in %g s", waiting.name, exc, CLAIM_RETRY)
                self._claims_paused_until = time.monotonic() + CLAIM_RETRY
                return
            if claim is not None:
                log.info("claimed %s:%s (claim %d)", claim.type, claim.id, claim.number)
                self._launch(claim)

    # ------------------------------------------------------------------ slots

    def _launch(self, claim: Claim) -> None:
        """Hand *claim* to an idle slot (forking one if needed)."""
        try:
            timeout = self.spool.get_type(claim.type).timeout
        except SpoolqError as exc:
            log.error("%s: %s; failing it", claim, exc)
            try:
                self.spool.set_state(claim, State.FAILED, str(exc))
            except SpoolqError:
                pass
            return
        slot = next((s for s in self.slots.values() if s.job is None and not s.retiring), None)
        if slot is None:
            slot = self._spawn()
        now = time.monotonic()
        # A timeout <= 0 means no time limit (the type's own rule).
        slot.job = _Job(claim, slot.pid, now, now + timeout if timeout > 0 else math.inf)
        slot.tasks += 1
        try:
            slot.send(claim)
        except OSError:
            # The slot died between tasks; its exit is reaped and the job
            # settled as a crash, which cannot happen to an unstarted claim:
            # hand it back instead.
            slot.job = None
            self.spool.hand_back(claim, "handler process was gone before the start")
            return
        log.info("started %s:%s in pid %d", claim.type, claim.id, slot.pid)

    def _spawn(self) -> _Slot:
        cmd_r, cmd_w = os.pipe2(os.O_CLOEXEC)
        res_r, res_w = os.pipe2(os.O_CLOEXEC)
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
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
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
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
        if os.getppid() != parent:
            os._exit(0)  # the daemon died before we could ask to die with it
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        for fd in (self._sig_r, self._sig_w):
            os.close(fd)
        for other in self.slots.values():
            other.close()
        if self._watcher is not None:
            self._watcher.close()
        # The slot keeps its inherited copy of the server-lock descriptor
        # (flock locks belong to the open file, shared across fork): the
        # server stays "alive" to sweepers until its last handler process
        # is gone, not just its main process. PR_SET_PDEATHSIG makes that
        # moment follow the daemon's death at once; without this, a sweeper
        # could re-enqueue a task whose handler was still being killed, and
        # another server could start it meanwhile (seen in the soak test).
        faults.reconfigure()

    def _read_results(self, slot: _Slot) -> None:
        try:
            data = os.read(slot.results, 4096)
        except OSError:
            data = b""
        if not data:
            return  # EOF: the slot is exiting; _reap settles it
        slot.buffer += data
        while b"\n" in slot.buffer:
            line, slot.buffer = slot.buffer.split(b"\n", 1)
            outcome = line.decode(errors="replace").strip()
            job, slot.job = slot.job, None
            if job is not None:
                self._report(job, outcome)
            if self.max_tasks_per_child and slot.tasks >= self.max_tasks_per_child:
                self._retire(slot)

    def _report(self, job: _Job, outcome: str) -> None:
        label = f"{job.claim.type}:{job.claim.id}"
        if outcome == "FINISHED":
            self.finished += 1
            log.info("finished %s in %.3f s", label, time.monotonic() - job.claimed)
        elif outcome == "FAILED":
            self.failed += 1
            try:
                message = self.spool.status(job.claim.type, job.claim.id).doc.get("message", "")
            except SpoolqError:
                message = ""
            log.error("failed %s: %s", label, message)
        else:
            log.info("%s was taken away or deleted while it ran", label)

    def _retire(self, slot: _Slot) -> None:
        """Let an idle slot exit (it reads EOF); a fresh one replaces it."""
        slot.retiring = True
        try:
            os.close(slot.commands)
        except OSError:
            pass
        slot.commands = -1

    def _reap(self) -> None:
        while self.slots:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = self.slots.pop(pid, None)
            if slot is None:
                continue
            # An outcome may still sit in the pipe: read it before judging.
            while slot.job is not None and slot.results >= 0:
                ready, _, _ = select.select([slot.results], [], [], 0)
                if not ready:
                    break
                before = slot.buffer
                self._read_results(slot)
                if slot.buffer == before and slot.job is not None:
                    break
            job = slot.job
            slot.close()
            if job is not None:
                self._settle(job, status)

    def _settle(self, job: _Job, status: int) -> None:
        """Give the task of a slot that died with it the state it earned."""
        claim = job.claim
        label = f"{claim.type}:{claim.id}"
        if job.kill_reason is not None:
            faults.crashpoint("daemon.handback")  # killed, not handed back yet
            result = self.spool.abandon(claim, job.kill_reason, charge=job.charge)
            if result == "failed":
                self.failed += 1
                log.error("failed %s: %s (no restarts left)", label, job.kill_reason)
            elif result == "reenqueued":
                log.warning("re-enqueued %s: %s", label, job.kill_reason)
            return
        if os.WIFSIGNALED(status):
            reason = f"handler process died of signal {signal.Signals(os.WTERMSIG(status)).name}"
        else:
            reason = f"handler process exited with status {os.WEXITSTATUS(status)} without finishing the task"
        try:
            self.spool.set_state(claim, State.FAILED, reason)
            self.failed += 1
            log.error("failed %s: %s", label, reason)
        except StaleClaim:
            # It reached a final state (or was taken away) before dying.
            self._report(job, _outcome(self.spool, claim))
        except (SpoolqError, OSError) as exc:
            # Disk full, or the task directory was tampered with: it stays
            # as it is until its timeout re-enqueues it; the daemon goes on.
            log.error("cannot record the end of %s (%s): %s", label, reason, exc)

    def _enforce_limits(self, now: float) -> None:
        for job in self.jobs:
            if job.kill_reason is None and now >= job.deadline:
                timeout = job.deadline - job.claimed
                self._kill(job, f"timed out after {timeout:g} s", charge=True)
            elif job.kill_reason is not None and job.killed_at is not None and now - job.killed_at > 5:
                # SIGKILL not reaped for 5 s: the slot is stuck in the kernel
                # (D state); keep the task claimed until it can be reaped.
                job.killed_at = now
                log.warning("pid %d (%s) does not die; still waiting", job.pid, job.claim)

    def _kill(self, job: _Job, reason: str, *, charge: bool) -> None:
        job.kill_reason = reason
        job.charge = charge
        job.killed_at = time.monotonic()
        slot = self.slots.get(job.pid)
        if slot is not None:
            slot.retiring = True  # it may still answer for this job, but gets no other
        try:
            os.killpg(job.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except PermissionError:
            os.kill(job.pid, signal.SIGKILL)

    def _kill_all(self, reason: str) -> None:
        for job in self.jobs:
            if job.kill_reason is None:
                self._kill(job, reason, charge=False)
        self.stop_deadline = None

    def _close_slots(self) -> None:
        """Idle slots read EOF and exit; reap them all before returning."""
        for slot in self.slots.values():
            self._retire(slot)
        deadline = time.monotonic() + 10
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

    # ------------------------------------------------------------------ housekeeping

    def _heartbeat(self) -> None:
        self._next_heartbeat = time.monotonic() + self.heartbeat_interval
        for job in self.jobs:
            if job.kill_reason is not None or self.spool.touch(job.claim):
                continue
            # Not in running/: not started yet, or taken away / deleted.
            try:
                info = self.spool.status(job.claim.type, job.claim.id)
                # Still ours when not started yet, or when it just reached a
                # final state whose outcome line is on its way to us.
                ours = info.doc.get("claim") == job.claim.number and info.doc.get("server") == self.server
            except SpoolqError:
                ours = False
            if not ours:
                log.warning("%s was deleted or taken away; stopping its handler", job.claim)
                self._kill(job, "task taken away", charge=False)

    def _sweep(self) -> None:
        self._next_sweep = time.monotonic() + self.sweep_interval
        try:
            for action in self.spool.reenqueue_zombies():
                log.warning("sweep: %s %s:%s (%s)", action.action, action.type, action.id, action.reason)
            for action in self.spool.delete_retired():
                log.info("sweep: retired %s:%s", action.type, action.id)
            self.spool.clean_tmp()
        except SpoolqError as exc:
            log.error("sweep failed: %s", exc)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.error("sweep failed: %s", exc)

    def _status_text(self) -> str:
        if self.stopping:
            return f"stopping: {len(self.jobs)} running"
        waiting = len(self._heap)
        prefix = "draining: " if self.draining else ""
        return f"{prefix}{len(self.jobs)}/{self.concurrency} running, {waiting} queued"


def _slot_main(spool: Spool, commands: int, results: int) -> int:
    """A slot's loop: read a claim per line, run it, answer its outcome."""
    reader = os.fdopen(commands, "rb", buffering=0)
    pending = b""
    while True:
        while b"\n" not in pending:
            chunk = reader.read(4096)
            if not chunk:
                return 0  # the daemon closed the pipe: retire
            pending += chunk
        line, pending = pending.split(b"\n", 1)
        claim = Claim.parse(line.decode())
        outcome = run_claim(spool, claim)
        os.write(results, f"{outcome}\n".encode())


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def run_worker(
    root: str | None,
    server: str,
    *,
    concurrency: int = 1,
    drain: bool = False,
    grace: float = 30.0,
    poll: bool = False,
) -> int:
    """Entry point of ``spoolq worker``. Configuration errors (bad spool,
    bad server id, server already running) raise SpoolqError; the command
    line turns them into exit status 78 (EX_CONFIG), which the systemd unit
    does not restart on."""
    setup_logging()
    check_server(server)
    spool = Spool(root)
    if drain and spool.server_alive(server):
        return _drain_running(spool, server)
    worker = Worker(spool, server, concurrency=concurrency, drain=drain, grace=grace, poll=poll)
    return worker.run()


def _drain_running(spool: Spool, server: str) -> int:
    """``--drain`` for a server that runs already: ask it (SIGUSR1) to finish
    what it holds and exit, and wait until it has."""
    path = spool._p("locks", "servers", f"{server}.lock")
    try:
        with open(path, encoding="ascii") as fh:
            pid = int(fh.read().strip() or "0")
    except (OSError, ValueError):
        pid = 0
    if pid <= 0:
        raise ServerBusy(f"server {server!r} is running but its pid is unknown; stop it instead")
    os.kill(pid, signal.SIGUSR1)
    log.info("asked server %s (pid %d) to drain; waiting for it to exit", server, pid)
    while spool.server_alive(server):
        time.sleep(0.2)
    log.info("server %s drained and exited", server)
    return 0
