"""Crash at every step of the lifecycle, then recover.

The list of crash points is generated from the package source (every
``crashpoint("…")`` call in ``spoolq/**/*.py``), so a new step is tested as soon
as it is marked. For each point a producer and a worker daemon run as real
processes on a durable spool; the process that reaches the point dies there
by SIGKILL (``SPOOLQ_CRASH_AT``). Then a worker is started again without
the crash: with the same server id (it recovers its own claims on start) or
with another one while the dead server stays dead (a sweep recovers the dead
server's claims, because its lock is free). Checked afterwards:

* every acknowledged task (and every task that exists) is FINISHED or FAILED,
  in ``done/``; nothing is left in ``enqueued/``, ``scheduled/``, ``running/``
  or ``quarantine/``;
* no handler ran twice at once, a handler completed at most once per
  recorded start, and never without a counted start (``status.json`` starts);
* the log agrees with the status: first record ENQUEUED, last record = the
  state, only allowed transitions, one SCHEDULED→RUNNING pair per counted
  start, restarts within ``max_restarts``;
* ``tmp/`` holds nothing but the crashed producer's staging directory (if
  any) and is empty after ``clean_tmp(grace=0)``.

A point that the scenario never reaches fails its test: give it a case in
``CASES_FOR`` with the scenario that reaches it.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import conftest
import spoolq
from crash_helpers import check_task, read_hits, read_records, runs_by_task, spawn
from spoolq import sweeps
from spoolq import Spool, State
from spoolq.names import task_name

PACKAGE = Path(spoolq.__file__).resolve().parent
DEADLINE = 40.0

# ----------------------------------------------------------------------------- the points


def _calls_named(tree: ast.AST, name: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if called == name:
                yield node


def discover_points() -> list[str]:
    """Every ``crashpoint("…")`` name in the package. Calls are found with
    the parser (docstrings and comments that mention crashpoint do not
    count); a call without a literal name is an error, since it could not
    be tested."""
    points = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for call in _calls_named(tree, "crashpoint"):
            if path.name == "faults.py":
                continue
            arg = call.args[0] if call.args else None
            if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
                raise AssertionError(f"{path.name}:{call.lineno}: crashpoint() needs a literal name")
            points.add(arg.value)
    return sorted(points)


POINTS = discover_points()


@dataclass(frozen=True)
class Case:
    """How a point is reached: which process gets ``SPOOLQ_CRASH_AT`` —
    "worker" (the daemon; its handler processes inherit it), "slot" (the
    daemon's handler processes only) or "producer" —, on which hit
    (``point@nth``, counted per process), and what the scenario adds."""

    point: str
    role: str = "worker"
    nth: int = 1
    sigterm: bool = False  # SIGTERM the worker while a long handler runs
    orphan: bool = False  # the worker finds a claim of its own to recover at start
    cancel: str | None = None  # "waiting" or "running": a canceller process cancels such a task

    @property
    def spec(self) -> str:
        return self.point if self.nth == 1 else f"{self.point}@{self.nth}"


# A status write or file write is first reached by the daemon at a claim; the
# slot cases reach the same step in a handler process, at the start (hit 1)
# and at the final status write (hit 3: after the response's status write).
_IN_SLOT = ("status.tmp_written", "status.logged", "status.replaced", "file.written", "file.appended")

# Points the default case (the worker, first hit) does not reach, or reaches
# in only one of several interesting places. Every other point gets Case(point).
CASES_FOR = {
    **{p: [Case(p), Case(p, role="slot"), Case(p, role="slot", nth=3)] for p in _IN_SLOT},
    # Only producers enqueue.
    "enqueue.staged": [Case("enqueue.staged", role="producer")],
    "enqueue.published": [Case("enqueue.published", role="producer")],
    # A producer writes the staged files too.
    "file.written": [Case("file.written", role=r, nth=n) for r, n in (("worker", 1), ("producer", 1), ("slot", 1), ("slot", 3))],
    # Fires on every loop iteration: die on the third, with work in flight.
    "daemon.loop": [Case("daemon.loop", nth=3)],
    # Only reached when SIGTERM's grace runs out with a handler still running.
    "daemon.handback": [Case("daemon.handback", sigterm=True)],
    # Only handler processes put a run's output together (contract §12.1).
    "output.parts_removed": [Case("output.parts_removed", role="slot")],
    # Only reached when a server restarts with a claim of its own left over.
    "recover.taken_away": [Case("recover.taken_away", orphan=True)],
    # Only the producer enqueues a batch.
    "enqueue.batch_synced": [Case("enqueue.batch_synced", role="producer")],
    # Cancels: the canceller ends a task not started itself, and records the
    # request for a running one, which the daemon carries out.
    "cancel.unstarted": [Case("cancel.unstarted", role="canceller", cancel="waiting")],
    "cancel.asked": [Case("cancel.asked", role="canceller", cancel="running")],
    "cancel.finished": [Case("cancel.finished", cancel="running")],
    # A user requeues a task that FAILED.
    "requeue.failed_moved": [Case("requeue.failed_moved", role="requeuer")],
}


def _params():
    out = []
    for point in POINTS:
        for case in CASES_FOR.get(point, [Case(point)]):
            # "live": the daemon outlives its handler process and settles the task itself.
            # "frozen": the daemon hangs at the point (as if SIGSTOPped there) while
            # another server works the spool; then it is killed, as systemd's watchdog does.
            restarts = {"worker": ("same", "other", "frozen"), "slot": ("live", "same"),
                        "producer": ("producer",), "canceller": ("canceller",), "requeuer": ("requeuer",)}[case.role]
            if case.sigterm or case.orphan or case.cancel:
                restarts = tuple(r for r in restarts if r != "frozen")
            for restart in restarts:
                out.append(pytest.param(case, restart, id=f"{case.spec}-{case.role}-{restart}"))
    return out


def test_points_are_generated_from_the_source():
    known = {
        "enqueue.staged", "enqueue.published", "claim.renamed", "move.renamed", "requeue.moved",
        "finish.status_written", "finish.moved", "retire.renamed", "status.tmp_written",
        "status.logged", "status.replaced", "start.running", "daemon.loop", "daemon.handback",
        "file.written", "file.appended", "response.stored", "sweep.taken_away", "sweep.retired",
    }
    assert POINTS, "no crashpoint() calls found in the package"
    assert known <= set(POINTS), f"missing: {sorted(known - set(POINTS))}"
    # The parser finds what a plain search finds (no call hidden from it).
    pattern = re.compile(r"""crashpoint\(\s*["']([^"']+)["']\s*\)""")
    by_regex = set()
    for path in PACKAGE.rglob("*.py"):
        if path.name != "faults.py":
            by_regex |= set(pattern.findall(path.read_text(encoding="utf-8")))
    assert by_regex == set(POINTS)
    assert set(CASES_FOR) <= set(POINTS), "CASES_FOR names a point that no longer exists"


# ----------------------------------------------------------------------------- the scenario


def wait_until(predicate, timeout: float = DEADLINE, what: str = "condition"):
    return conftest.wait_until(predicate, timeout=timeout, what=what)


class Scenario:
    """One spool, its processes and what they recorded."""

    WORKER_OPTIONS = {"concurrency": 2, "heartbeat_interval": 0.2, "sweep_interval": 0.3, "grace": 5.0}

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "spool"
        self.spool = Spool.init(self.root, durable=True)
        self.record = str(tmp / "runs")
        self.hits_path = tmp / "hits"
        self.procs: list[subprocess.Popen] = []
        self.logs: dict[int, Path] = {}
        self.tasks: list[list] = []
        self.planted: set[tuple[str, str]] = set()
        self.cancelled = False  # a canceller was run on the planted target
        self.retired: set[tuple[str, str]] = set()
        sp = self.spool
        sp.register_type("N", "crash_helpers.ok", timeout=30, max_restarts=2, max_output_bytes=64)
        sp.register_type("F", "crash_helpers.fail", timeout=30, max_restarts=2, retries=1, retry_backoff=0.1)
        sp.register_type("R", "crash_helpers.ok", timeout=30, retention=60, max_restarts=2)
        sp.register_type("S", "crash_helpers.slow_first", timeout=60, max_restarts=2)

    # -- setup

    def plant(self, *, orphan: bool, slow: bool, cancel: str | None = None) -> None:
        """What a sweep and a recovery find: a started claim of server
        "ghost" (dead: its lock is free), a task finished an hour ago whose
        type keeps tasks 60 s, and optionally a started claim of "w1" itself."""
        sp, inp = self.spool, {"record": self.record}
        sp.enqueue("N", "ghost", inp)
        sp.enqueue("R", "old", inp)
        zombie = sp.claim("ghost", names=[task_name("N", "ghost")])
        sp.start(zombie)
        old = sp.claim("ghost", names=[task_name("R", "old")])
        sp.start(old)
        sp.set_state(old, State.FINISHED, "planted")
        stamp = time.time() - 3600
        os.utime(self.root / "done" / task_name("R", "old"), (stamp, stamp))
        sp.release_server("ghost")
        self.planted |= {("N", "ghost")}
        self.retired |= {("R", "old")}
        if orphan:
            sp.enqueue("N", "orphan", inp)
            sp.start(sp.claim("w1", names=[task_name("N", "orphan")]))
            sp.release_server("w1")
            self.planted.add(("N", "orphan"))
        if slow or cancel == "running":
            sp.enqueue("S", "s0", {"record": self.record, "seconds": 30})
            self.planted.add(("S", "s0"))
        if cancel == "waiting":
            sp.enqueue("N", "later", inp, delay=3600)  # waits: the canceller ends it
            self.planted.add(("N", "later"))
        batch = {"record": self.record, "batch": True}
        self.tasks = [
            ["N", "t0", inp], ["F", "f0", inp], ["N", "t1", inp], ["N", "t2", inp],
            ["F", "f1", inp], ["N", "t3", inp], ["N", "t4", inp], ["N", "t5", inp],
            ["N", "b0", batch], ["N", "b1", batch], ["N", "b2", batch],
        ]

    # -- processes

    def _spawn(self, name: str, args: list[str], env: dict | None) -> subprocess.Popen:
        log_path = self.tmp / f"{name}.{len(self.procs)}.err"
        proc = spawn(args, log_path, env)
        self.procs.append(proc)
        self.logs[proc.pid] = log_path
        return proc

    def requeuer(self, target: tuple[str, str], env: dict | None = None) -> subprocess.Popen:
        return self._spawn("requeuer", ["requeue", str(self.root), *target], env)

    def canceller(self, target: tuple[str, str], env: dict | None = None) -> subprocess.Popen:
        self.cancelled = True
        return self._spawn("canceller", ["cancel", str(self.root), *target], env)

    def producer(self, env: dict | None = None) -> subprocess.Popen:
        tasks = self.tmp / "tasks.json"
        tasks.write_text(json.dumps(self.tasks))
        return self._spawn("producer", ["produce", str(self.root), str(self.tmp / "acks"), str(tasks)], env)

    def worker(self, server: str, env: dict | None = None, **options) -> subprocess.Popen:
        opts = {**self.WORKER_OPTIONS, **options}
        return self._spawn(f"worker-{server}", ["worker", str(self.root), server, json.dumps(opts)], env)

    def stderr(self, proc: subprocess.Popen) -> str:
        return self.logs[proc.pid].read_text(errors="replace")

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)

    # -- what happened

    def acked(self) -> set[tuple[str, str]]:
        path = self.tmp / "acks"
        if not path.exists():
            return set()
        out = set()
        for line in path.read_text().split():
            if line != "exists":
                t, _, i = line.partition(":")
                out.add((t, i))
        return out

    def present(self) -> set[tuple[str, str]]:
        return {(t, i) for t, i, _ in self.spool.iter_tasks()}

    def settled(self) -> bool:
        """Every task there is in done/, nothing waits or runs, the retired
        ones are gone."""
        sp = self.spool
        if os.listdir(self.root / "enqueued") or os.listdir(self.root / "running"):
            return False
        if any(os.listdir(self.root / "scheduled" / s) for s in sp.servers()):
            return False
        present = self.present()
        if present & self.retired:
            return False
        return all(sp.status(t, i).state.terminal for t, i in present)

    def hit(self, point: str) -> list[str] | None:
        return next((h for h in read_hits(self.hits_path) if h[0] == point), None)


# ----------------------------------------------------------------------------- checks

def verify(sc: Scenario, crashed_pid: int | None) -> None:
    sp = sc.spool
    present = sc.present()
    acked = sc.acked()
    lost = (acked | sc.planted) - present
    assert not lost, f"acknowledged tasks lost: {sorted(lost)}"
    made = {(t, i) for t, i, _ in sc.tasks} | sc.planted
    assert present <= made, f"tasks nobody made: {sorted(present - made)}"
    assert not os.listdir(sc.root / "quarantine"), os.listdir(sc.root / "quarantine")
    runs = runs_by_task(read_records(sc.record))
    for t, i in sorted(present):
        info = check_task(sp, t, i, runs.get(f"{t}:{i}", []))
        assert info.state.terminal, (t, i, info.doc)
        assert Path(info.path).parent == sc.root / "done", info.path
        assert info.doc["message"] or info.state == State.FINISHED, info.doc
        if t == "F":
            assert info.state == State.FAILED, info.doc
            # Retried once (type F has one retry), unless a crash took the run away first.
            assert info.doc.get("retries") == 1 or "gave up" in info.doc["message"], info.doc
        if t in ("N", "S") and info.state == State.FAILED:
            assert "ValueError" not in info.doc["message"], info.doc
        if t == "N" and info.state == State.FINISHED:
            assert sp.response(t, i) == (f"done {i}".encode(), "text/plain")
        if (t, i) in (("S", "s0"), ("N", "later")) and sc.cancelled:
            assert info.state == State.FAILED and info.doc.get("cancelled") is True, info.doc
    # tmp/: only what a crashed producer was staging (or trash), then nothing.
    for entry in os.listdir(sc.root / "tmp"):
        parts = entry.rsplit(".", 2)
        from_crash = crashed_pid is not None and len(parts) == 3 and parts[1] == str(crashed_pid)
        assert entry.startswith(".trash.") or from_crash, f"unexpected leftover in tmp/: {entry}"
    sweeps.clean_tmp(sp, grace=0)
    assert not os.listdir(sc.root / "tmp")


# ----------------------------------------------------------------------------- the test


@pytest.mark.parametrize("case,restart", _params())
def test_crash_then_recover(case: Case, restart: str, tmp_path: Path) -> None:
    sc = Scenario(tmp_path)
    try:
        _run(sc, case, restart)
    finally:
        sc.kill_all()


def _wait_for_hit(sc: Scenario, case: Case, proc: subprocess.Popen) -> list[str]:
    deadline = time.monotonic() + DEADLINE
    settled_since = None
    while True:
        hit = sc.hit(case.point)
        if hit is not None:
            return hit
        if proc.poll() is not None:
            pytest.fail(
                f"{case.spec}: the {case.role} exited ({proc.returncode}) without reaching the point:\n"
                + sc.stderr(proc)[-3000:]
            )
        if sc.settled() and (case.role != "producer" or proc.poll() is not None):
            settled_since = settled_since or time.monotonic()
            if time.monotonic() - settled_since > 2.0:
                pytest.fail(f"{case.spec} was never reached by the scenario: give it a case in CASES_FOR")
        else:
            settled_since = None
        if time.monotonic() > deadline:
            pytest.fail(f"{case.spec} not reached within {DEADLINE} s")
        time.sleep(0.02)


def _run(sc: Scenario, case: Case, restart: str) -> None:
    sc.plant(orphan=case.orphan, slow=case.sigterm, cancel=case.cancel)
    crash = {"SPOOLQ_CRASH_AT": case.spec, "SPOOLQ_CRASH_LOG": str(sc.hits_path), "CRASH_ROLE": case.role}
    target = ("S", "s0") if case.cancel == "running" else ("N", "later")
    if case.role == "requeuer":
        worker = sc.worker("w1")
        producer = sc.producer()
        assert producer.wait(DEADLINE) == 0, sc.stderr(producer)
        wait_until(lambda: sc.spool.status("F", "f0").state == State.FAILED, what="F:f0 FAILED")
        requeuer = sc.requeuer(("F", "f0"), crash)
        hit = _wait_for_hit(sc, case, requeuer)
        assert requeuer.wait(10) == -signal.SIGKILL
        assert sc.requeuer(("F", "f0")).wait(DEADLINE) == 0
    elif case.role == "canceller":
        worker = sc.worker("w1")
        producer = sc.producer()
        if case.cancel == "running":
            wait_until(lambda: any(r[0] == "start" and r[1] == "S:s0" for r in read_records(sc.record)),
                       what="the long handler to start")
        canceller = sc.canceller(target, crash)
        hit = _wait_for_hit(sc, case, canceller)
        assert canceller.wait(10) == -signal.SIGKILL
        again = sc.canceller(target)
        assert again.wait(DEADLINE) == 0, sc.stderr(again)
        assert producer.wait(DEADLINE) == 0, sc.stderr(producer)
    elif case.role == "producer":
        worker = sc.worker("w1")
        producer = sc.producer(crash)
        hit = _wait_for_hit(sc, case, producer)
        assert producer.wait(10) == -signal.SIGKILL
        again = sc.producer()
        assert again.wait(DEADLINE) == 0, sc.stderr(again)
    else:
        producer = sc.producer()
        if case.role == "slot":
            crash["SLOT_CRASH_AT"] = crash.pop("SPOOLQ_CRASH_AT")
        if restart == "frozen":
            crash["SPOOLQ_HANG_AT"] = crash.pop("SPOOLQ_CRASH_AT")
        worker = sc.worker("w1", crash, grace=0.3 if case.sigterm else 5.0)
        if case.cancel:
            wait_until(lambda: any(r[0] == "start" and r[1] == "S:s0" for r in read_records(sc.record)),
                       what="the long handler to start")
            assert sc.canceller(target).wait(DEADLINE) == 0
        if case.sigterm:
            wait_until(lambda: any(r[0] == "start" and r[1] == "S:s0" for r in read_records(sc.record)),
                       what="the long handler to start")
            worker.send_signal(signal.SIGTERM)
        hit = _wait_for_hit(sc, case, worker)
        if restart == "frozen":
            # Another server works the spool while w1 stays frozen mid-step:
            # it must take nothing w1 still holds (the run locks and the
            # handlers' overlap detector tell). (Frozen inside a move back to
            # the queue, w1 holds the spool-wide lock: then w2 waits for it
            # until w1 is killed, as producers would.)
            other = sc.worker("w2")
            time.sleep(1.5)  # a few of w2's sweeps (every 0.3 s) meet the frozen claims
            assert other.poll() is None, sc.stderr(other)
            worker.kill()  # what systemd's watchdog does to a hung worker
            assert worker.wait(10) == -signal.SIGKILL
            wait_until(lambda: not sc.spool.server_alive("w1"), what="w1's lock to be free")
            worker = other
        elif restart != "live":
            # A point reached in a handler process killed only that process:
            # now the whole server goes down too.
            if worker.poll() is None:
                worker.kill()
            assert worker.wait(10) == -signal.SIGKILL
            wait_until(lambda: not sc.spool.server_alive("w1"), what="w1's lock to be free")
            worker = sc.worker("w1" if restart == "same" else "w2")
        assert producer.wait(DEADLINE) == 0, sc.stderr(producer)
    print(f"\n{case.spec} [{case.role}/{restart}] hit: {' '.join(hit[1:])}")
    wait_until(sc.settled, what="every task to reach FINISHED or FAILED")
    if restart in ("other", "frozen"):
        assert not sc.spool.server_alive("w1")
    # A worker restarted just now may still be starting (before its signal
    # handlers, SIGTERM would kill it): stop it once it is ready.
    wait_until(lambda: "ready" in sc.stderr(worker), what="the worker ready")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(DEADLINE) == 0, sc.stderr(worker)
    assert "Traceback" not in sc.stderr(worker), sc.stderr(worker)
    verify(sc, int(hit[2]) if case.role == "producer" else None)


# ----------------------------------------------------------------------------- an I/O error instead of a crash

# The points a handler process reaches (hit 3 of a status or file write is
# the final status write, after the response's), where a failing disk can
# refuse one write while the process lives on.
_SLOT_FAILS = [(p, n) for p in _IN_SLOT for n in (1, 3)] + [
    (p, 1) for p in ("start.running", "response.stored", "finish.status_written", "finish.moved", "move.renamed",
                     "output.parts_removed")]


@pytest.mark.parametrize("point,nth", _SLOT_FAILS, ids=[f"{p}@{n}" for p, n in _SLOT_FAILS])
def test_an_io_error_in_a_handler_process_loses_nothing_and_is_one_line(point: str, nth: int,
                                                                          tmp_path: Path) -> None:
    """One write of a handler process fails with EIO (``SPOOLQ_FAIL_AT``), in
    its first handler process only; the daemon lives on. Every task still
    ends once, checked as after a crash; the error is reported in one line
    (the daemon's log or the task's message), never as a traceback. Only a
    handler whose own call met the error (its store_response) fails for it;
    a start or an end that could not be written is written again (by the
    next claim, by the daemon), so those tasks finish."""
    failed, hit = _with_io_error(tmp_path, Case(point, role="slot", nth=nth), "SLOT_FAIL_AT")
    if "store_response" in hit:
        assert len(failed) == 1 and "injected at" in next(iter(failed.values())), failed
    else:
        assert not failed, failed


# The points the daemon's main process reaches: the claims, the sweeps, the
# take-aways and hand-backs (their status and file writes), the loop.
_DAEMON_FAILS = ["claim.renamed", "move.renamed", "status.tmp_written", "status.logged", "status.replaced",
                 "file.written", "file.appended", "sweep.taken_away", "retire.renamed", "sweep.retired",
                 "daemon.loop"]


@pytest.mark.parametrize("point", _DAEMON_FAILS)
def test_an_io_error_in_the_daemon_loses_nothing_and_is_one_line(point: str, tmp_path: Path) -> None:
    """The same with the error in the daemon's main process (its first hit
    of the point; not inherited by its handler processes): it logs one line
    and goes on; no task fails for it."""
    failed, _ = _with_io_error(tmp_path, Case(point), "SPOOLQ_FAIL_AT")
    assert not failed, failed


def _with_io_error(tmp_path: Path, case: Case, variable: str) -> tuple[dict[tuple[str, str], str], list[str]]:
    """Run the scenario with one I/O error armed through *variable*; check
    what the crash cases check, one line for it and no timeout waited for.
    The FAILED no-op tasks (with their messages), and the hit."""
    sc = Scenario(tmp_path)
    try:
        sc.plant(orphan=False, slow=False)
        producer = sc.producer()
        worker = sc.worker("w1", {variable: case.spec, "SPOOLQ_CRASH_LOG": str(sc.hits_path),
                                  "CRASH_ROLE": case.role})
        hit = _wait_for_hit(sc, case, worker)
        assert producer.wait(DEADLINE) == 0, sc.stderr(producer)
        wait_until(sc.settled, what="every task to reach FINISHED or FAILED")
        assert worker.poll() is None, sc.stderr(worker)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(DEADLINE) == 0, sc.stderr(worker)
        err = sc.stderr(worker)
        print(f"\n{case.spec} hit: {' '.join(hit[1:])}\n{err}")
        assert "Traceback" not in err, err
        messages = [sc.spool.status(t, i).doc["message"] for t, i in sc.present()]
        reported = [line for line in err.splitlines() + messages if f"(injected at {case.point})" in line]
        assert reported, "the I/O error is reported nowhere"
        verify(sc, None)
        # (type N's timeout is 30 s, longer than any of these runs should need)
        timed_out = [(t, i) for t, i in sc.present()
                     if any("timed out" in r.message for r in sc.spool.log_records(t, i))]
        assert not timed_out, f"tasks waited for their timeout to get over the error: {timed_out}"
        return {(t, i): sc.spool.status(t, i).doc["message"] for t, i in sc.present()
                if t == "N" and sc.spool.status(t, i).state == State.FAILED}, hit
    finally:
        sc.kill_all()
