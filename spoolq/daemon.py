"""The worker daemon: ``spoolq worker SERVER`` (systemd: ``spoolq@SERVER``).

One process, one thread of control: a ``select()`` loop that wakes on

* file events in ``enqueued/`` (watchdog/inotify, via :class:`DirWatcher`),
* signals (SIGCHLD, SIGTERM, SIGINT, SIGUSR1, through ``set_wakeup_fd``),
* the nearest deadline: a handler's time limit, the heartbeat, the sweep, the
  safety rescan of ``enqueued/``, the systemd watchdog ping.

Each task runs in a forked child in its own process group, so a handler that
raises, exits, segfaults, leaks or hangs costs only its child: the parent
reaps it and gives the task the state it earned. The parent never unpickles
input and never imports handlers (the child does both).

Mechanism and caveats:

* Claims are made only when a slot is free, so nothing sits claimed while
  waiting for a slot (ATP claimed ahead and duplicated work on timeouts).
* The time limit runs from the claim (SPEC §5a). At the deadline the child's
  whole process group gets SIGKILL; the task is re-enqueued or FAILED by
  ``max_restarts``.
* The heartbeat touches each running task's directory. If the task vanished
  (deleted, or taken away by a sweeper), the child is killed: its claim is
  fenced anyway, this just stops wasted work.
* Children die with the parent (PR_SET_PDEATHSIG): a task of a dead server is
  never still running when the next server recovers it.
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
from .watch import DirWatcher

log = logging.getLogger("spoolq.daemon")

_PR_SET_PDEATHSIG = 1
EX_CONFIG = 78


@dataclass
class _Job:
    claim: Claim
    pid: int
    claimed: float  # monotonic
    deadline: float  # monotonic; the type's timeout from the claim
    kill_reason: str | None = None
    charge: bool = True
    killed_at: float | None = None


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


def run_claim(spool: Spool, claim: Claim) -> int:
    """Run one claimed task to a final state in this process; the child's
    body. Returns the exit status for the child."""
    from .tracker import TaskStatus

    try:
        started = spool.start(claim)
    except (StaleClaim, TaskNotFound):
        return 0  # taken away before it started: nothing to do
    except CorruptTask as exc:
        log.error("%s: %s", claim, exc)
        return 0  # start() already failed or quarantined it
    context = TaskStatus(claim, spool=spool)
    try:
        try:
            handler = load_handler(started.handler)
        except Exception as exc:
            _fail(spool, claim, f"cannot import handler {started.handler!r}: {type(exc).__name__}: {exc}", exc)
            return 0
        try:
            handler(context, started.input)
        except SystemExit as exc:
            if exc.code not in (None, 0):
                spool.set_state(claim, State.FAILED, f"handler called sys.exit({exc.code!r})")
                return 0
        except BaseException as exc:  # noqa: BLE001 - every failure becomes FAILED
            _fail(spool, claim, f"{type(exc).__name__}: {exc}", exc)
            return 0
        spool.finish_if_not_finished(claim)
    except StaleClaim as exc:
        log.warning("%s: %s", claim, exc)
    return 0


def _fail(spool: Spool, claim: Claim, message: str, exc: BaseException) -> None:
    """FAILED with a one-line message; the traceback goes in the log first."""
    trace = "".join(traceback.format_exception(exc)).rstrip()
    try:
        spool.log_message(claim, trace)
        spool.set_state(claim, State.FAILED, message)
    except StaleClaim:
        pass


class Worker:
    """A worker daemon for one server id on one spool.

    Keyword-only options: ``concurrency`` (handlers at once), ``drain`` (claim
    nothing; finish what the server holds, then exit), ``grace`` (seconds
    SIGTERM waits for running handlers), ``poll`` (no inotify: rescan every
    ``rescan_interval``), ``heartbeat_interval``, ``sweep_interval``.
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
        self.notifier = Notifier()
        self.jobs: dict[int, _Job] = {}
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
        self.finished = 0
        self.failed = 0

    # ------------------------------------------------------------------ life cycle

    def run(self) -> int:
        """Serve until stopped; returns the process exit status (0 on a clean
        stop, after every task was finished or handed back)."""
        self.spool.hold_server(self.server)  # ServerBusy if another process is this server
        self._install_signals()
        held = self._recover()
        if not self.draining:
            self._watcher = DirWatcher(self.spool._p("enqueued"), poll=self.poll)
            self._rescan()
        for claim in held:
            self._launch(claim)
        mode = "draining" if self.draining else ("polling" if self.poll or not self._watcher.watching else "watching")
        log.info("server %s ready on %s (concurrency %d, %s)", self.server, self.spool.root, self.concurrency, mode)
        self.notifier.ready(self._status_text())
        try:
            self._loop()
        finally:
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
            if self.stopping:
                if not self.jobs:
                    return
                if self.stop_deadline is not None and now >= self.stop_deadline:
                    self._kill_all("interrupted: server %s stopped before the handler finished" % self.server)
            elif self.draining and not self.jobs:
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
        marks += [job.deadline for job in self.jobs.values() if job.kill_reason is None]
        if self.stop_deadline is not None:
            marks.append(self.stop_deadline)
        if any(job.kill_reason for job in self.jobs.values()):
            marks.append(now + 0.05)  # a killed child is about to be reaped
        timeout = min(marks) - now
        ping = self.notifier.next_watchdog_in()
        if ping is not None:
            timeout = min(timeout, ping)
        return max(0.0, timeout)

    def _wait(self, timeout: float) -> None:
        fds = [self._sig_r]
        if self._watcher is not None:
            fds.append(self._watcher.fileno())
        try:
            ready, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            return
        if self._sig_r in ready:
            try:
                while os.read(self._sig_r, 512):
                    pass
            except BlockingIOError:
                pass

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
        for name in self._watcher.drain():
            if name not in self._known:
                key = self.spool.fifo_key(name)
                if key is not None:
                    heapq.heappush(self._heap, _Waiting(key, name))
                    self._known.add(name)

    def _rescan(self) -> None:
        """Rebuild the index of ``enqueued/`` from the directory itself: the
        safety net for lost events, and the only source in poll mode."""
        names = self.spool.waiting()
        self._heap = []
        for name in names:
            key = self.spool.fifo_key(name)
            if key is not None:
                self._heap.append(_Waiting(key, name))
        heapq.heapify(self._heap)
        self._known = {w.name for w in self._heap}
        self._next_rescan = time.monotonic() + self.rescan_interval
        if self._watcher is not None:
            self._watcher.drain()

    def _fill_slots(self) -> None:
        while len(self.jobs) < self.concurrency and self._heap:
            waiting = heapq.heappop(self._heap)
            self._known.discard(waiting.name)
            try:
                claim = self.spool.claim(self.server, names=[waiting.name])
            except SpoolqError as exc:
                log.error("cannot claim %s: %s", waiting.name, exc)
                continue
            if claim is not None:
                log.info("claimed %s:%s (claim %d)", claim.type, claim.id, claim.number)
                self._launch(claim)

    # ------------------------------------------------------------------ children

    def _launch(self, claim: Claim) -> None:
        try:
            timeout = self.spool.get_type(claim.type).timeout
        except SpoolqError as exc:
            log.error("%s: %s; failing it", claim, exc)
            try:
                self.spool.set_state(claim, State.FAILED, str(exc))
            except SpoolqError:
                pass
            return
        parent = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 70
            try:
                self._become_child(parent)
                code = run_claim(self.spool, claim)
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        try:
            os.setpgid(pid, pid)  # also done by the child; whoever is first wins
        except OSError:
            pass
        now = time.monotonic()
        self.jobs[pid] = _Job(claim, pid, now, now + timeout)
        log.info("started %s:%s in pid %d", claim.type, claim.id, pid)

    def _become_child(self, parent: int) -> None:
        os.setpgid(0, 0)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
        if os.getppid() != parent:
            os._exit(0)  # the parent died before we could ask to die with it
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        os.close(self._sig_r)
        os.close(self._sig_w)
        if self._watcher is not None:
            self._watcher.close_in_child()
        self.spool.forget_servers_after_fork()
        faults.reconfigure()

    def _reap(self) -> None:
        while self.jobs:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            job = self.jobs.pop(pid, None)
            if job is not None:
                self._settle(job, status)

    def _settle(self, job: _Job, status: int) -> None:
        """Give the task of a child that ended the state it earned."""
        claim = job.claim
        label = f"{claim.type}:{claim.id}"
        elapsed = time.monotonic() - job.claimed
        if job.kill_reason is not None:
            result = self.spool.abandon(claim, job.kill_reason, charge=job.charge)
            if result == "failed":
                self.failed += 1
                log.error("failed %s: %s (no restarts left)", label, job.kill_reason)
            elif result == "reenqueued":
                log.warning("re-enqueued %s: %s", label, job.kill_reason)
            return
        try:
            info = self.spool.status(claim.type, claim.id)
        except SpoolqError:
            log.info("%s is gone (deleted)", label)
            return
        if info.doc.get("claim") != claim.number:
            return  # taken away meanwhile; its new owner reports on it
        if info.state == State.FINISHED:
            self.finished += 1
            log.info("finished %s in %.3f s", label, elapsed)
            return
        if info.state == State.FAILED:
            self.failed += 1
            log.error("failed %s: %s", label, info.doc.get("message", ""))
            return
        if info.state == State.ENQUEUED:
            return
        # The child ended without a final state: it crashed or exited hard.
        if os.WIFSIGNALED(status):
            signame = signal.Signals(os.WTERMSIG(status)).name
            reason = f"handler process died of signal {signame}"
        else:
            reason = f"handler process exited with status {os.WEXITSTATUS(status)} without finishing the task"
        try:
            self.spool.set_state(claim, State.FAILED, reason)
            self.failed += 1
            log.error("failed %s: %s", label, reason)
        except StaleClaim:
            pass

    def _enforce_limits(self, now: float) -> None:
        for job in self.jobs.values():
            if job.kill_reason is None and now >= job.deadline:
                timeout = job.deadline - job.claimed
                self._kill(job, f"timed out after {timeout:g} s", charge=True)
            elif job.kill_reason is not None and job.killed_at is not None and now - job.killed_at > 5:
                # SIGKILL not reaped for 5 s: the child is stuck in the kernel
                # (D state); keep the task claimed until it can be reaped.
                job.killed_at = now
                log.warning("pid %d (%s) does not die; still waiting", job.pid, job.claim)

    def _kill(self, job: _Job, reason: str, *, charge: bool) -> None:
        job.kill_reason = reason
        job.charge = charge
        job.killed_at = time.monotonic()
        try:
            os.killpg(job.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except PermissionError:
            os.kill(job.pid, signal.SIGKILL)

    def _kill_all(self, reason: str) -> None:
        for job in self.jobs.values():
            if job.kill_reason is None:
                self._kill(job, reason, charge=False)
        self.stop_deadline = None

    # ------------------------------------------------------------------ housekeeping

    def _heartbeat(self) -> None:
        self._next_heartbeat = time.monotonic() + self.heartbeat_interval
        for job in list(self.jobs.values()):
            if job.kill_reason is not None or self.spool.touch(job.claim):
                continue
            # Not in running/: not started yet, or taken away / deleted.
            try:
                info = self.spool.status(job.claim.type, job.claim.id)
                ours = info.doc.get("claim") == job.claim.number and not info.state.terminal
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
