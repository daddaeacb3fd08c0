"""Property-based test of the task lifecycle: random sequences of every
operation, from several servers (each its own Spool, so each its own server
lock), against a small model; after every step the spool on disk must agree
with the model and with itself.

Invariants checked after every step:

* every task is in exactly one state directory, and nothing else is
  anywhere (no staging leftovers, nothing quarantined);
* the directory agrees with status.json (scheduled/<server>/ with that
  server) and status.json with the model;
* the log has one record per state change, the last one naming the state;
* FINISHED/FAILED never change except by delete (the model never moves them);
* restarts never exceed max_restarts; starts and restarts match the model;
* counts() equals the model.

A write through a claim that lost its task (or to a final task) must raise
StaleClaim and change no byte of the spool.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from conftest import FakeClock
from spoolq import sweeps
from spoolq import Claim, Spool, StaleClaim, State, TaskExists, TaskNotFound, WrongState

SERVERS = ["s1", "s2", "s3"]
IDS = ["a", "b", "c", "d", "e"]
# Clock steps are whole seconds, so no difference ever equals these limits.
TIMEOUT = 100.5
RETENTION = 50.5
LIVE = (State.SCHEDULED, State.RUNNING, State.PAUSED)
STARTED = (State.RUNNING, State.PAUSED)


@dataclass
class Model:
    state: State
    log: int = 1
    claim: Claim | None = None  # the latest claim; None once re-enqueued
    claimed_at: float = 0.0
    starts: int = 0
    restarts: int = 0
    finished_at: float = 0.0
    response: bool = False


class SpoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="spoolq-sm-")
        self.root = Path(self.tmp) / "spool"
        self.clock = FakeClock(1_700_000_000.0)
        Spool.init(self.root, durable=False)
        # The admin (producer, sweeper) holds no server lock; each server
        # claims through its own Spool, as its own daemon would.
        self.admin = Spool(self.root, clock=self.clock)
        self.spools = {s: Spool(self.root, clock=self.clock) for s in SERVERS}
        self.alive = dict.fromkeys(SERVERS, False)
        self.tasks: dict[str, Model] = {}
        self.claims: list[Claim] = []
        self.max_restarts = 0

    def teardown(self) -> None:
        for server, spool in self.spools.items():
            spool.release_server(server)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------------ helpers

    def snapshot(self) -> dict[str, bytes]:
        out = {}
        for dirpath, dirnames, files in os.walk(self.root):
            for name in files + dirnames:
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, self.root)
                out[rel] = b"<dir>" if os.path.isdir(path) else Path(path).read_bytes()
        return out

    def refused(self, call, task: Model | None) -> None:
        """*call* must be refused and change nothing on disk: StaleClaim when
        the claim lost its task (*task* None) or the task is final, WrongState
        when the claim holds a task whose state forbids the change."""
        event("refused a stale or disallowed write")
        before = self.snapshot()
        with pytest.raises(StaleClaim if task is None or task.state.terminal else WrongState):
            call()
        assert self.snapshot() == before

    def pick(self, data) -> Claim:
        """A claim: as often one that still holds its task as any ever made
        (most claims soon go stale, and stale ones are refused quickly)."""
        live = [t.claim for t in self.tasks.values() if t.claim is not None]
        if live:
            return data.draw(st.one_of(st.sampled_from(live), st.sampled_from(self.claims)))
        return data.draw(st.sampled_from(self.claims))

    def current(self, claim: Claim) -> Model | None:
        """The task's model if *claim* is its latest claim (even if final)."""
        task = self.tasks.get(claim.id)
        return task if task is not None and task.claim == claim else None

    def take_away(self, task: Model, charge: bool) -> str:
        """The model of Spool._take_away on a claimed task."""
        if task.state in STARTED and charge:
            if task.restarts >= self.max_restarts:
                self.finish(task, State.FAILED)
                return "failed"
            task.restarts += 1
        task.state, task.claim = State.ENQUEUED, None
        task.log += 1
        return "reenqueued"

    def finish(self, task: Model, state: State) -> None:
        task.state, task.finished_at = state, self.clock.now
        task.log += 1

    # ------------------------------------------------------------------ rules

    @rule(task_id=st.sampled_from(IDS))
    def enqueue(self, task_id: str) -> None:
        if task_id in self.tasks:
            before = self.snapshot()
            with pytest.raises(TaskExists):
                self.admin.enqueue("T", task_id, None)
            assert self.snapshot() == before
            return
        self.admin.enqueue("T", task_id, None)
        self.tasks[task_id] = Model(State.ENQUEUED)

    @rule(server=st.sampled_from(SERVERS))
    def claim(self, server: str) -> None:
        waiting = {i for i, t in self.tasks.items() if t.state == State.ENQUEUED}
        claim = self.spools[server].claim(server)
        self.alive[server] = True
        if not waiting:
            assert claim is None
            return
        assert claim is not None and claim.id in waiting and claim.server == server
        assert all(claim.number != c.number for c in self.claims), "claim numbers are unique"
        task = self.tasks[claim.id]
        task.state, task.claim, task.claimed_at = State.SCHEDULED, claim, self.clock.now
        task.log += 1
        self.claims.append(claim)

    @initialize(
        max_restarts=st.integers(0, 2),
        count=st.integers(2, len(IDS)),
        servers=st.lists(st.sampled_from(SERVERS), max_size=4),
        starts=st.integers(0, 4),
    )
    def some_tasks_waiting_claimed_and_running(self, max_restarts: int, count: int, servers: list[str],
                                               starts: int) -> None:
        """Start from an interesting spool rather than an empty one."""
        self.max_restarts = max_restarts
        self.admin.register_type("T", "pkg.mod.func", timeout=TIMEOUT, retention=RETENTION, max_restarts=max_restarts)
        for task_id in IDS[:count]:
            self.enqueue(task_id)
        for server in servers:
            self.claim(server)
        for claim in self.claims[:starts]:
            self.do_start(claim)

    @precondition(lambda self: self.claims)
    @rule(data=st.data())
    def start(self, data) -> None:
        self.do_start(self.pick(data))

    def do_start(self, claim: Claim) -> None:
        task = self.current(claim)
        spool = self.spools[claim.server]
        if task is None or task.state != State.SCHEDULED:
            self.refused(lambda: spool.start(claim), task)
            return
        assert spool.start(claim).input is None
        task.state = State.RUNNING
        task.starts += 1
        task.log += 1

    @precondition(lambda self: self.claims)
    @rule(data=st.data(), state=st.sampled_from([State.RUNNING, State.PAUSED, State.FINISHED, State.FAILED]))
    def set_state(self, data, state: State) -> None:
        claim = self.pick(data)
        task = self.current(claim)
        spool = self.spools[claim.server]
        allowed = task is not None and (task.state in STARTED or (task.state == State.SCHEDULED and state == State.FAILED))
        if not allowed:
            self.refused(lambda: spool.set_state(claim, state, "x"), task)
            return
        spool.set_state(claim, state, "x")
        if state.terminal:
            self.finish(task, state)
        else:
            task.state = state
            task.log += 1

    @precondition(lambda self: self.claims)
    @rule(data=st.data())
    def store_response(self, data) -> None:
        claim = self.pick(data)
        task = self.current(claim)
        spool = self.spools[claim.server]
        if task is None or task.state not in LIVE:
            self.refused(lambda: spool.store_response(claim, b"r", "text/plain"), task)
            return
        spool.store_response(claim, b"r", "text/plain")
        task.response = True

    @precondition(lambda self: self.claims)
    @rule(data=st.data())
    def finish_if_not_finished(self, data) -> None:
        claim = self.pick(data)
        task = self.current(claim)
        spool = self.spools[claim.server]
        if task is not None and task.state in STARTED:
            assert spool.finish_if_not_finished(claim) is True
            self.finish(task, State.FINISHED)
        elif task is not None and task.state.terminal:
            before = self.snapshot()
            assert spool.finish_if_not_finished(claim) is False
            assert self.snapshot() == before
        else:
            self.refused(lambda: spool.finish_if_not_finished(claim), task)

    @precondition(lambda self: self.claims)
    @rule(data=st.data(), charge=st.booleans(), hand_back=st.booleans())
    def abandon(self, data, charge: bool, hand_back: bool) -> None:
        claim = self.pick(data)
        task = self.current(claim)
        if hand_back:
            charge = False

        def call() -> str:
            if hand_back:
                return self.admin.hand_back(claim, "handed back")
            return self.admin.abandon(claim, "abandoned", charge=charge)

        if task is None or task.state.terminal:
            before = self.snapshot()
            assert call() == "gone"
            assert self.snapshot() == before
            return
        result = self.take_away(task, charge)
        event(f"abandon: {result}")
        assert call() == result

    @rule(seconds=st.sampled_from([1, 30, 120]))
    def advance_clock(self, seconds: int) -> None:
        self.clock.advance(seconds)

    @rule(server=st.sampled_from(SERVERS))
    def server_dies(self, server: str) -> None:
        self.spools[server].release_server(server)
        self.alive[server] = False

    @rule()
    def reenqueue_zombies(self) -> None:
        expected = {}
        for task_id, task in self.tasks.items():
            if task.state in LIVE:
                dead = not self.alive[task.claim.server]
                late = self.clock.now - task.claimed_at > TIMEOUT
                if dead or late:
                    expected[task_id] = self.take_away(task, charge=True)
        actions = sweeps.reenqueue_zombies(self.admin)
        assert {a.id: a.action for a in actions} == expected
        for action in expected.values():
            event(f"sweep: {action}")

    @rule()
    def delete_retired(self) -> None:
        expected = {i for i, t in self.tasks.items() if t.state.terminal and self.clock.now - t.finished_at > RETENTION}
        assert {a.id for a in sweeps.delete_retired(self.admin)} == expected
        if expected:
            event("retired")
        for task_id in expected:
            del self.tasks[task_id]

    @rule(task_id=st.sampled_from(IDS))
    def delete(self, task_id: str) -> None:
        if task_id not in self.tasks:
            with pytest.raises(TaskNotFound):
                self.admin.delete("T", task_id)
            return
        self.admin.delete("T", task_id)
        del self.tasks[task_id]

    # ------------------------------------------------------------------ invariants

    @invariant()
    def disk_agrees_with_the_model(self) -> None:
        places: dict[str, list[tuple[str, str | None]]] = {}
        for where in ("enqueued", "running", "done"):
            for name in os.listdir(self.root / where):
                places.setdefault(name, []).append((where, None))
        for server in os.listdir(self.root / "scheduled"):
            for name in os.listdir(self.root / "scheduled" / server):
                places.setdefault(name, []).append(("scheduled", server))
        assert sorted(places) == sorted(f"T:{i}" for i in self.tasks)
        assert os.listdir(self.root / "tmp") == [] and os.listdir(self.root / "quarantine") == []
        for task_id, task in self.tasks.items():
            [(where, server)] = places[f"T:{task_id}"]  # exactly one place
            info = self.admin.status("T", task_id)
            assert info.state == task.state, task_id
            expected_where = {State.ENQUEUED: "enqueued", State.SCHEDULED: "scheduled", State.RUNNING: "running",
                              State.PAUSED: "running", State.FINISHED: "done", State.FAILED: "done"}[task.state]
            assert where == expected_where, (task_id, where, task.state)
            if where == "scheduled":
                assert server == task.claim.server == info.doc["server"]
            records = self.admin.log_records("T", task_id)
            assert len(records) == task.log, (task_id, [r.state.name for r in records])
            assert records[-1].state == task.state
            assert info.doc["starts"] == task.starts
            assert info.doc["restarts"] == task.restarts <= self.max_restarts
            assert (Path(info.path) / "response").exists() == task.response
        model_counts = Counter(t.state.name for t in self.tasks.values())
        assert self.admin.counts() == {s.name: model_counts[s.name] for s in State}


TestSpoolLifecycle = SpoolMachine.TestCase
TestSpoolLifecycle.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
