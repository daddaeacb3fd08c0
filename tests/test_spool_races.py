"""Races between real processes (fork), each its own Spool object and, where
it claims, its own server id. No mocks, no threads: the kernel arbitrates.

Every process writes what it saw to a file and exits with os._exit; the test
joins with a deadline and checks the spool on disk afterwards."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import time
import traceback
from collections import Counter
from pathlib import Path

import pytest

from spoolq import sweeps
from spoolq import QueueFull, Spool, SpoolqError, StaleClaim, State, TaskExists, TaskNotFound

FORK = multiprocessing.get_context("fork")
PROCS = 8


def run_procs(target, args_list, timeout: float = 120.0) -> None:
    """Start one process per args tuple, join them all by a deadline and
    require a clean exit from each."""
    procs = [FORK.Process(target=_guard, args=(target, *args)) for args in args_list]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    stuck = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    assert not stuck, f"processes {stuck} did not finish within {timeout} s"
    assert [p.exitcode for p in procs] == [0] * len(procs)


def _guard(target, *args) -> None:
    code = 0
    try:
        target(*args)
    except BaseException:  # noqa: BLE001 - report and fail the process
        traceback.print_exc()
        code = 1
    os._exit(code)


def read_json(path: Path):
    return json.loads(path.read_text())


def complete_entries(spool: Spool, sub: str) -> list[str]:
    """Names in ROOT/sub that are whole task directories (all three files,
    readable status)."""
    out = []
    for name in os.listdir(Path(spool.root, sub)):
        files = set(os.listdir(Path(spool.root, sub, name)))
        assert {"status.json", "log"} <= files and ({"input.pkl"} & files), (name, files)
        json.loads(Path(spool.root, sub, name, "status.json").read_bytes())
        out.append(name)
    return out


# ----------------------------------------------------------------------------- claims


def _claimer(root: str, server: str, barrier, out: str) -> None:
    spool = Spool(root)
    spool.hold_server(server)  # a server id is held by one process
    barrier.wait(60)
    got = []
    while True:
        claim = spool.claim(server)
        if claim is None:
            break
        got.append([claim.id, claim.number])
    Path(out).write_text(json.dumps(got))


def test_racing_claimers_take_every_task_exactly_once(spool: Spool, tmp_path: Path) -> None:
    n = 2000
    ids = [f"t{i:04d}" for i in range(n)]
    for i in ids:
        spool.enqueue("T", i, i)
    barrier = FORK.Barrier(PROCS)
    outs = [tmp_path / f"claims{k}.json" for k in range(PROCS)]
    run_procs(_claimer, [(spool.root, f"srv{k}", barrier, str(outs[k])) for k in range(PROCS)])
    per_server = {f"srv{k}": [i for i, _ in read_json(outs[k])] for k in range(PROCS)}
    everything = [i for got in per_server.values() for i in got]
    dupes = [i for i, c in Counter(everything).items() if c > 1]
    assert dupes == [], f"claimed more than once: {dupes[:10]}"
    assert sorted(everything) == ids, f"lost: {sorted(set(ids) - set(everything))[:10]}"
    assert spool.count_enqueued() == 0
    for server, got in per_server.items():
        assert sorted(os.listdir(Path(spool.root, "scheduled", server))) == sorted(f"T:{i}" for i in got)
    for server, got in per_server.items():
        for i in got[:: max(1, len(got) // 20)]:  # a sample: status and log agree with the claim
            info = spool.status("T", i)
            assert info.state == State.SCHEDULED and info.doc["server"] == server
            assert [r.state for r in spool.log_records("T", i)] == [State.ENQUEUED, State.SCHEDULED]
    # Each claimer took its tasks oldest first.
    for got in per_server.values():
        assert got == sorted(got)


def _claim_and_delete(root: str, server: str, barrier, out: str, ids: list[str] | None) -> None:
    spool = Spool(root)
    barrier.wait(60)
    if ids is None:  # a claimer
        got = []
        while (claim := spool.claim(server)) is not None:
            got.append(claim.id)
        Path(out).write_text(json.dumps(got))
    else:  # the deleter
        gone = 0
        for i in ids:
            try:
                spool.delete("T", i)
                gone += 1
            except TaskNotFound:
                pass
        Path(out).write_text(json.dumps(gone))


def test_claims_racing_deletes_never_fail_and_never_duplicate(spool: Spool, tmp_path: Path) -> None:
    ids = [f"t{i:03d}" for i in range(400)]
    for i in ids:
        spool.enqueue("T", i, i)
    shuffled = ids[:]
    random.shuffle(shuffled)
    barrier = FORK.Barrier(4)
    outs = [tmp_path / f"o{k}.json" for k in range(4)]
    args = [(spool.root, f"s{k}", barrier, str(outs[k]), None) for k in range(3)]
    args.append((spool.root, "deleter", barrier, str(outs[3]), shuffled))
    run_procs(_claim_and_delete, args)
    claimed = [i for k in range(3) for i in read_json(outs[k])]
    assert len(claimed) == len(set(claimed))
    assert read_json(outs[3]) == len(ids)  # the deleter found every task, wherever it was
    assert list(spool.iter_tasks()) == []
    assert [n for n in os.listdir(Path(spool.root, "tmp"))] == []


# ----------------------------------------------------------------------------- enqueue: uniqueness and the limit


def _same_id_producer(root: str, barrier, out: str, rounds: int) -> None:
    spool = Spool(root)
    results = []
    for r in range(rounds):
        barrier.wait(60)
        try:
            spool.enqueue("T", f"same{r}", os.getpid())
            results.append("ok")
        except TaskExists:
            results.append("exists")
    Path(out).write_text(json.dumps(results))


def test_the_same_task_enqueued_by_racing_producers_exists_once(spool: Spool, tmp_path: Path) -> None:
    rounds = 10
    barrier = FORK.Barrier(PROCS)
    outs = [tmp_path / f"p{k}.json" for k in range(PROCS)]
    run_procs(_same_id_producer, [(spool.root, barrier, str(outs[k]), rounds) for k in range(PROCS)])
    per_round = list(zip(*(read_json(o) for o in outs)))
    for r, results in enumerate(per_round):
        assert sorted(results) == ["exists"] * (PROCS - 1) + ["ok"], f"round {r}: {results}"
    assert sorted(complete_entries(spool, "enqueued")) == sorted(f"T:same{r}" for r in range(rounds))
    assert os.listdir(Path(spool.root, "tmp")) == []


def _limited_producer(root: str, k: int, barrier, out: str, per_proc: int) -> None:
    spool = Spool(root)
    barrier.wait(60)
    results = []
    for i in range(per_proc):
        try:
            spool.enqueue("T", f"p{k}-{i}", i)
            results.append("ok")
        except QueueFull:
            results.append("full")
    Path(out).write_text(json.dumps(results))


def test_the_queue_limit_holds_exactly_under_racing_producers(make_spool, tmp_path: Path) -> None:
    spool = make_spool(max_queue=50)
    barrier = FORK.Barrier(PROCS)
    outs = [tmp_path / f"p{k}.json" for k in range(PROCS)]
    run_procs(_limited_producer, [(spool.root, k, barrier, str(outs[k]), 20) for k in range(PROCS)])
    results = Counter(r for o in outs for r in read_json(o))
    assert results == {"ok": 50, "full": PROCS * 20 - 50}
    assert len(complete_entries(spool, "enqueued")) == 50 == spool.count_enqueued()
    assert os.listdir(Path(spool.root, "tmp")) == []  # QueueFull left nothing behind


# ----------------------------------------------------------------------------- sweeps and fencing


def _sweeper(root: str, barrier, out: str, now: float) -> None:
    spool = Spool(root, clock=lambda: now)
    barrier.wait(60)
    Path(out).write_text(json.dumps([[a.id, a.action] for a in sweeps.reenqueue_zombies(spool)]))


def _start_many(root: str, server: str, n: int) -> None:
    spool = Spool(root)
    for _ in range(n):
        spool.start(spool.claim(server))


def test_racing_sweepers_take_each_zombie_once(spool: Spool, tmp_path: Path) -> None:
    spool.register_type("Z", "atp_demo.handler", timeout=60, max_restarts=5)
    n = 40
    for i in range(n):
        spool.enqueue("Z", f"z{i}", i)
    run_procs(_start_many, [(spool.root, "dead", n)])  # its server dies with it
    barrier = FORK.Barrier(4)
    outs = [tmp_path / f"s{k}.json" for k in range(4)]
    later = time.time() + 3600  # also past the timeout
    run_procs(_sweeper, [(spool.root, barrier, str(outs[k]), later) for k in range(4)])
    taken = [tuple(a) for o in outs for a in read_json(o)]
    assert sorted(taken) == sorted((f"z{i}", "reenqueued") for i in range(n))
    for i in range(n):
        info = spool.status("Z", f"z{i}")
        assert info.state == State.ENQUEUED and info.doc["restarts"] == 1
        states = [r.state for r in spool.log_records("Z", f"z{i}")]
        assert states == [State.ENQUEUED, State.SCHEDULED, State.RUNNING, State.ENQUEUED]


VALID_NEXT = {
    State.ENQUEUED: {State.SCHEDULED},
    State.SCHEDULED: {State.RUNNING, State.FAILED, State.ENQUEUED},
    State.RUNNING: {State.RUNNING, State.PAUSED, State.FINISHED, State.FAILED, State.ENQUEUED},
    State.PAUSED: {State.RUNNING, State.PAUSED, State.FINISHED, State.FAILED, State.ENQUEUED},
    State.FINISHED: set(),
    State.FAILED: set(),
}


def _busy_worker(root: str, server: str, deadline: float) -> None:
    spool = Spool(root)
    while time.time() < deadline:
        claim = spool.claim(server)
        if claim is None:
            if all(info.state.terminal for info in spool.list_tasks()):
                return
            continue
        try:
            spool.start(claim)
            spool.set_state(claim, State.PAUSED, "pause")
            spool.set_state(claim, State.RUNNING, "resume")
            spool.store_response(claim, b"r")
            spool.set_state(claim, State.FINISHED, "ok")
        except StaleClaim:
            continue  # the sweeper took it: the next run owns it now


def _busy_sweeper(root: str, deadline: float) -> None:
    spool = Spool(root, clock=lambda: time.time() + 3600)  # every claim has timed out
    while time.time() < deadline:
        sweeps.reenqueue_zombies(spool)
        if all(info.state.terminal for info in spool.list_tasks()):
            return


def test_writes_racing_a_sweeper_never_land_after_a_take_away(spool: Spool) -> None:
    spool.register_type("Z", "atp_demo.handler", timeout=60, max_restarts=3)
    n = 60
    for i in range(n):
        spool.enqueue("Z", f"z{i}", i)
    deadline = time.time() + 60
    run_procs(
        lambda kind, *a: _busy_worker(*a) if kind == "w" else _busy_sweeper(*a),
        [("w", spool.root, "w1", deadline), ("w", spool.root, "w2", deadline), ("s", spool.root, deadline)],
    )
    outcomes = Counter()
    for i in range(n):
        records = spool.log_records("Z", f"z{i}")
        states = [r.state for r in records]
        for a, b in zip(states, states[1:]):
            assert b in VALID_NEXT[a], f"z{i}: {a.name} -> {b.name} in {[s.name for s in states]}"
        info = spool.status("Z", f"z{i}")
        assert info.state.terminal and info.state == states[-1]
        outcomes[info.state] += 1
        assert info.doc["starts"] <= 4  # max_restarts=3: at most 4 starts
    assert sum(outcomes.values()) == n


# ----------------------------------------------------------------------------- lookups during moves


def _mover(root: str, cycles: int) -> None:
    spool = Spool(root)
    for _ in range(cycles):
        claim = spool.claim("mover")
        spool.start(claim)
        spool.hand_back(claim, "again")
    claim = spool.claim("mover")
    spool.start(claim)
    spool.set_state(claim, State.FINISHED)


def test_a_task_is_never_reported_missing_while_it_moves(spool: Spool) -> None:
    spool.enqueue("T", "moving", 1)
    proc = FORK.Process(target=_guard, args=(_mover, spool.root, 150))
    proc.start()
    seen = Counter()
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                seen[spool.status("T", "moving").state] += 1
                spool.log_records("T", "moving")
            except SpoolqError as exc:  # TaskNotFound would be the bug
                pytest.fail(f"lookup failed while the task moved: {exc!r}")
            if not proc.is_alive() or time.monotonic() > deadline:
                break
    finally:
        proc.join(30)
    assert proc.exitcode == 0
    assert spool.status("T", "moving").state == State.FINISHED
    assert len(seen) >= 2, seen  # the lookups did overlap the moves


# ----------------------------------------------------------------------------- locks across fork


def _can_lock(path: str) -> bool:
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.mark.parametrize("which", ["enqueue-lock", "task-lock"])
def test_a_child_forked_while_a_thread_holds_a_lock_does_not_keep_it(spool: Spool, wait_until, which: str) -> None:
    import threading

    from spoolq.store.taskdir import TaskDir

    spool.enqueue("T", "a", 1)
    task_path = os.path.join(spool.root, "enqueued", "T:a")
    lock_path = os.path.join(spool.root, "locks", "enqueue.lock") if which == "enqueue-lock" else task_path
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        lock = spool.layout.enqueue_lock if which == "enqueue-lock" else TaskDir(task_path, clock=spool.clock, durable=spool.durable)
        with lock:
            held.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(30)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child lives on until told to go
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    try:
        assert not _can_lock(lock_path)  # the thread holds it
        release.set()
        thread.join(30)
        wait_until(lambda: _can_lock(lock_path), timeout=10, what=f"the {which} to be free while the child lives")
    finally:
        os.close(w)
        os.waitpid(pid, 0)


def test_children_forked_while_threads_enqueue_never_hang_on_the_enqueue_lock(spool: Spool) -> None:
    """A pre-forking server with threads that enqueue: a child forked while
    one of them had opened the enqueue lock's file and not yet recorded it
    kept that lock for good, and its own enqueue (and every later one of
    the parent) waited forever: 27 of 60 children, found by an outside tester."""
    import threading

    stop = threading.Event()

    def busy(k: int) -> None:
        i = 0
        while not stop.is_set():
            spool.enqueue("T", f"bg{k}-{i}", i)
            i += 1

    threads = [threading.Thread(target=busy, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    stuck = []
    try:
        for child in range(40):
            time.sleep(0.005)
            pid = os.fork()
            if pid == 0:
                try:
                    spool.enqueue("T", f"child{child}", child)
                finally:
                    os._exit(0)
            deadline = time.monotonic() + 20
            while os.waitpid(pid, os.WNOHANG)[0] == 0:
                if time.monotonic() > deadline:
                    stuck.append(child)
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.005)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert stuck == [], f"children stuck in enqueue: {stuck}"
    assert all(spool.status("T", f"child{c}").state == State.ENQUEUED for c in range(40))


def test_no_task_of_an_unregistered_type_survives_enqueues_racing_the_unregister(spool: Spool) -> None:
    """An enqueue that checked the type, then published after `unregister
    --force` had deleted the type's tasks, left a task of no type, which a
    worker with the type cached then ran (5 rounds of 7, an outside tester)."""
    import threading

    from spoolq import UnknownType

    survivors = []
    for round_ in range(15):
        spool.register_type("R", "daemon_handlers.add")
        refused = threading.Event()

        def produce() -> None:
            for i in range(10_000):
                try:
                    spool.enqueue("R", f"r{round_}-{i}", [i])
                except UnknownType:
                    refused.set()
                    return

        thread = threading.Thread(target=produce)
        thread.start()
        while not list(spool.iter_tasks()):
            time.sleep(0.001)
        spool.unregister_type("R", force=True)
        thread.join(60)
        assert refused.is_set()
        survivors += [t for t in spool.iter_tasks() if t[0] == "R"]
    assert survivors == [], survivors
