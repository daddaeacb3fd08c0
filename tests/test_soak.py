"""Soak with faults: many tasks, several servers, random SIGKILLs.

4 producer processes enqueue ``SPOOLQ_SOAK_TASKS`` tasks (default 5,000)
while 3 worker daemons (w1..w3, 2 handler processes each) run them and a
chaos loop, every 1.5–3 s, either SIGKILLs a random daemon and starts it
again with the same server id, or SIGSTOPs one for 2.5–4 s (longer than the
hanging tasks' timeout plus the handler processes' own 2 s margin) and then
SIGCONTs it. The mix: mostly no-ops, some sleeping 50–300 ms, some raising,
some hanging past a 0.5 s type timeout, some leaving a grandchild behind that
escapes their process group. ``SPOOLQ_SOAK_SECONDS``
spreads the enqueues over that many seconds (default: as fast as the
producers go), to soak longer.

At the end (with deadlines): every acknowledged task is FINISHED or FAILED
and nothing is lost; no task ever ran twice at once — by the handlers' run
lock (exact, killed runs included) and by their timestamps, a killed run
ending when its daemon and handler processes were seen dead; restarts never
exceed max_restarts; each FAILED task says why, and says the right thing;
no escaped grandchild outlives its run.

The spool is not durable (no fsync): these are process crashes, which fsync
does not change; durability is tests/test_durability_strace.py's subject.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import wait_until
from crash_helpers import check_task, read_records, runs_by_task, spawn
from spoolq import Spool, State

TASKS = int(os.environ.get("SPOOLQ_SOAK_TASKS", "5000"))
SPREAD = float(os.environ.get("SPOOLQ_SOAK_SECONDS", "0"))
SERVERS = ("w1", "w2", "w3")
PRODUCERS = 4
WORKER_OPTIONS = {"concurrency": 2, "heartbeat_interval": 0.5, "sweep_interval": 1.0, "grace": 10.0}
MAX_RESTARTS = {"Q": 3, "TO": 1}


def plan(n: int, rng: random.Random) -> list[list]:
    """[type, id, input] for n tasks: 86% no-op, 6% sleep, 4% raise, 2% hang,
    2% escape."""
    out = []
    for k in range(n):
        r = rng.random()
        if r < 0.02:
            out.append(["TO", f"hang{k}", {"kind": "hang"}])
        elif r < 0.04:
            out.append(["Q", f"escape{k}", {"kind": "escape", "seconds": round(rng.uniform(0, 0.2), 3)}])
        elif r < 0.08:
            out.append(["Q", f"fail{k}", {"kind": "fail"}])
        elif r < 0.14:
            out.append(["Q", f"sleep{k}", {"kind": "sleep", "seconds": round(rng.uniform(0.05, 0.3), 3)}])
        else:
            out.append(["Q", f"noop{k}", {"kind": "noop"}])
    return out


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] == "Z" else int(fields[1])


def _alive(pid: int) -> bool:
    """Running (a zombie is dead: it runs nothing and holds no lock)."""
    return _ppid(pid) is not None


def _children(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _ppid(int(entry)) == pid:
            out.add(int(entry))
    return out


class Soak:
    def __init__(self, tmp: Path, seed: int) -> None:
        self.tmp = tmp
        self.root = tmp / "spool"
        self.record = str(tmp / "runs")
        self.rng = random.Random(seed)
        self.spool = Spool.init(self.root, durable=False)
        self.spool.register_type("Q", "crash_helpers.work", timeout=30, max_restarts=MAX_RESTARTS["Q"])
        self.spool.register_type("TO", "crash_helpers.work", timeout=0.5, max_restarts=MAX_RESTARTS["TO"])
        self.workers: dict[str, object] = {}
        self.logs: dict[str, Path] = {}
        self.producers: list = []
        self.all_procs: list = []
        # handler pid alive at a chaos kill -> monotonic ns when it and its daemon were seen dead
        self.killed_at: dict[int, int] = {}
        self.stopped: dict[str, float] = {}  # server SIGSTOPped -> monotonic time to SIGCONT it
        self.tasks = plan(TASKS, self.rng)
        for task in self.tasks:
            task[2]["record"] = self.record

    def start_worker(self, server: str) -> None:
        log_path = self.tmp / f"{server}.{len(self.all_procs)}.err"
        proc = spawn(["worker", str(self.root), server, json.dumps(WORKER_OPTIONS)], log_path)
        self.workers[server] = proc
        self.logs[server] = log_path
        self.all_procs.append(proc)

    def start_producers(self) -> None:
        for k in range(PRODUCERS):
            share = self.tmp / f"tasks{k}.json"
            share.write_text(json.dumps(self.tasks[k::PRODUCERS]))
            args = ["produce", str(self.root), str(self.tmp / "acks"), str(share), str(SPREAD)]
            proc = spawn(args, self.tmp / f"producer{k}.err")
            self.producers.append(proc)
            self.all_procs.append(proc)

    def chaos(self) -> str:
        """One chaos event: a kill (70%) or a stop; what it was."""
        if self.rng.random() < 0.7:
            self.chaos_kill()
            return "kill"
        server = self.rng.choice([s for s in SERVERS if s not in self.stopped])
        self.workers[server].send_signal(signal.SIGSTOP)
        self.stopped[server] = time.monotonic() + self.rng.uniform(2.5, 4.0)
        return "stop"

    def thaw(self, force: bool = False) -> None:
        """SIGCONT the stopped daemons whose time is up (all, with *force*)."""
        now = time.monotonic()
        for server, until in list(self.stopped.items()):
            if force or now >= until:
                self.workers[server].send_signal(signal.SIGCONT)
                del self.stopped[server]

    def chaos_kill(self) -> None:
        """SIGKILL a random daemon; once it and its handler processes are
        dead, note the time and start it again under the same server id."""
        server = self.rng.choice(SERVERS)
        self.stopped.pop(server, None)  # a stopped daemon dies of SIGKILL too
        proc = self.workers[server]
        victims = _children(proc.pid)  # its handler processes alive now
        proc.kill()
        proc.wait(30)
        handlers = victims | {int(r[3]) for r in read_records(self.record) if r[4] == str(proc.pid)}
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in handlers):
            assert time.monotonic() < deadline, f"handlers of a killed daemon still alive: {handlers}"
            time.sleep(0.01)
        now = time.monotonic_ns()
        self.killed_at.update({pid: now for pid in victims})
        self.start_worker(server)

    def done_count(self) -> int:
        return len(os.listdir(self.root / "done"))

    def stop_all(self) -> None:
        for proc in self.all_procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)


def test_soak_with_random_kills(tmp_path: Path) -> None:
    soak = Soak(tmp_path, seed=int(os.environ.get("SPOOLQ_SOAK_SEED", "5")))
    began = time.monotonic()
    deadline = began + SPREAD + max(240.0, TASKS / 10)
    try:
        for server in SERVERS:
            soak.start_worker(server)
        soak.start_producers()
        events: Counter = Counter()
        next_event = time.monotonic() + soak.rng.uniform(1.5, 3.0)
        while True:
            soak.thaw()
            producing = any(p.poll() is None for p in soak.producers)
            if not producing and soak.done_count() >= TASKS:
                break
            now = time.monotonic()
            if now > deadline:
                pytest.fail(f"soak not done after {now - began:.0f} s: {soak.spool.counts()}, {dict(events)}")
            if now >= next_event:
                events[soak.chaos()] += 1
                next_event = time.monotonic() + soak.rng.uniform(1.5, 3.0)
            time.sleep(0.05)
        soak.thaw(force=True)
        kills = events["kill"]
        elapsed = time.monotonic() - began
        assert all(p.wait(30) == 0 for p in soak.producers)
        for server, proc in soak.workers.items():
            # A daemon the chaos just restarted may still be starting: stop
            # it once it is ready (before, SIGTERM's default action applies).
            ready = f"server {server} ready"
            wait_until(lambda: ready in soak.logs[server].read_text(errors="replace"), timeout=60, what=ready)
            proc.send_signal(signal.SIGTERM)
        for server, proc in soak.workers.items():
            assert proc.wait(60) == 0, f"{server} did not stop cleanly"
    finally:
        soak.stop_all()

    # ------------------------------------------------------------------ the books
    sp = soak.spool
    acked = {tuple(line.split(":", 1)) for line in (tmp_path / "acks").read_text().split() if line != "exists"}
    assert len(acked) == TASKS
    present = {(t, i) for t, i, _ in sp.iter_tasks()}
    lost = acked - present
    assert not lost, f"lost: {sorted(lost)[:20]}"
    assert present == acked
    counts = sp.counts()
    assert counts["FINISHED"] + counts["FAILED"] == TASKS, counts
    assert not os.listdir(soak.root / "quarantine")

    records = read_records(soak.record)
    runs = runs_by_task(records)
    kinds = {f"{t}:{i}": inp["kind"] for t, i, inp in soak.tasks}
    outcome: Counter = Counter()
    for t, i in sorted(present):
        info = check_task(sp, t, i, runs.get(f"{t}:{i}", []))
        kind = kinds[f"{t}:{i}"]
        assert info.doc["restarts"] <= MAX_RESTARTS[t], info.doc
        assert info.doc["starts"] <= MAX_RESTARTS[t] + 1, info.doc
        message = info.doc["message"]
        if info.state == State.FAILED:
            assert message, f"FAILED without a reason: {info.doc}"
        if kind == "fail":
            assert info.state == State.FAILED and ("ValueError: planned failure" in message or "gave up" in message)
        elif kind == "hang":
            assert info.state == State.FAILED and "gave up after" in message, info.doc
            assert info.doc["restarts"] == MAX_RESTARTS[t], info.doc
        elif info.state == State.FAILED:  # a no-op or sleeper: only the chaos can fail it
            assert "gave up after" in message or "died of signal" in message, info.doc
        outcome[f"{kind} {info.state.name}"] += 1

    # Timestamps: no two runs of a task overlap. A run without an end was
    # killed: with its daemon, if it was its process's last run and that
    # process was alive at a chaos kill (it ends when all were seen dead), or
    # by its own daemon at a timeout (its end is unknown here; the run lock
    # above covers it).
    last_start: dict[str, int] = {}
    for event, _, _, pid, _, ns in records:
        if event == "start":
            last_start[pid] = max(last_start.get(pid, 0), int(ns))
    overlaps = []
    timed_by_chaos = 0
    for name, lines in runs.items():
        spans = []
        for event, _, server, pid, ppid, ns in lines:
            if event == "start":
                end = next((int(e[5]) for e in lines if e[0] == "end" and e[3] == pid and int(e[5]) >= int(ns)), None)
                if end is None and last_start[pid] == int(ns):
                    end = soak.killed_at.get(int(pid))
                    timed_by_chaos += end is not None
                spans.append((int(ns), end, server))
        spans.sort()
        for (s1, e1, srv1), (s2, _, srv2) in zip(spans, spans[1:]):
            if e1 is not None and s2 < e1:
                overlaps.append((name, srv1, srv2))
    assert not overlaps, overlaps[:10]

    escaped = [int(pid) for pid in Path(soak.record + ".escaped").read_text().split()] if os.path.exists(
        soak.record + ".escaped") else []
    assert escaped, "the mix has escaping handlers: none ran?"
    survivors = [pid for pid in escaped if _alive(pid)]
    assert not survivors, f"grandchildren that escaped their process group outlived their run: {survivors}"

    runs_killed = sum(1 for r in records if r[0] == "start") - sum(1 for r in records if r[0] == "end")
    print(
        f"\nsoak: {TASKS} tasks in {elapsed:.0f} s, {kills} daemons SIGKILLed and restarted, "
        f"{events['stop']} SIGSTOPped for 2.5-4 s, {len(escaped)} escaped grandchildren all killed, "
        f"lost 0, overlaps 0, {runs_killed} handler runs killed mid-way "
        f"({timed_by_chaos} of them with their daemon, ended at the kill); "
        f"FINISHED {counts['FINISHED']}, FAILED {counts['FAILED']}; {dict(sorted(outcome.items()))}"
    )
