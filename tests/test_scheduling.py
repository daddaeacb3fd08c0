"""Scheduling (contract §11): retries, delayed tasks, cancel, requeue,
priorities, lanes, per-type concurrency, hold/release, bulk enqueue. Real
worker processes on real spools; handlers record what they do
(tests/sched_handlers.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest

from spoolq import Spool, State, sweeps
from spoolq.errors import InvalidInput, QueueFull, WrongState
from conftest import pids_with_cmdline
from test_daemon import Workers, stderr_of, wait_until

HERE = Path(__file__).parent


@pytest.fixture
def env(tmp_path):
    root = tmp_path / "spool"
    spool = Spool.init(root, durable=False)
    workers = Workers(root)
    yield spool, root, workers, tmp_path
    workers.stop_all()


def register(spool: Spool, name: str, handler: str, **kw) -> None:
    spool.register_type(name, f"sched_handlers.{handler}", **kw)


def events(path: Path) -> list[tuple[str, str, str, int, float]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        event, task, server, pid, at = line.split()
        out.append((event, task, server, int(pid), float(at)))
    return out


def cli(root: Path, *args, stdin: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    return subprocess.run([sys.executable, "-m", "spoolq", "--root", str(root), *map(str, args)], input=stdin,
                          capture_output=True, timeout=timeout, env=env)


def one_line(proc: subprocess.CompletedProcess, code: int) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == code, (proc.returncode, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def final(spool: Spool, t: str, i: str) -> bool:
    return spool.status(t, i).state.terminal


# --------------------------------------------------------------------------- retries


def test_a_handler_that_fails_twice_then_succeeds_runs_three_times(env):
    spool, root, workers, tmp = env
    register(spool, "R", "fail_until", retries=3, retry_backoff=1.0)
    rec = tmp / "rec"
    spool.enqueue("R", "t", {"record": str(rec), "counter": str(tmp / "n"), "succeed_on": 3})
    workers.start("w1")
    wait_until(lambda: final(spool, "R", "t"), timeout=60, what="the task final")
    info = spool.status("R", "t")
    assert info.state == State.FINISHED and info.doc["retries"] == 2 and info.doc["restarts"] == 0
    starts = [at for event, *_, at in events(rec) if event == "start"]
    assert len(starts) == 3
    messages = [r.message for r in spool.log_records("R", "t") if r.state == State.ENQUEUED]
    assert messages[1].startswith("retry 1/3 in ") and "attempt 1 fails" in messages[1]
    assert messages[2].startswith("retry 2/3 in ") and "attempt 2 fails" in messages[2]
    failures = [r.time.timestamp() for r in spool.log_records("R", "t") if r.message.startswith("retry")]
    # backoff 1 s, jittered into [0.5, 1]: never before half of it
    assert starts[1] >= failures[0] + 0.5 and starts[2] >= failures[1] + 1.0


def test_a_handler_may_ask_for_a_retry_and_retries_end_in_failed(env):
    spool, root, workers, tmp = env
    register(spool, "A", "ask_retry", retries=1)
    register(spool, "F", "fail_until", retries=1, retry_backoff=0.1)
    rec = tmp / "rec"
    spool.enqueue("A", "t", {"record": str(rec), "marker": str(tmp / "m"), "delay": 0.3})
    spool.enqueue("F", "t", {"record": str(rec), "counter": str(tmp / "n"), "succeed_on": 99})
    workers.start("w1")
    wait_until(lambda: final(spool, "A", "t") and final(spool, "F", "t"), timeout=60, what="both final")
    assert spool.status("A", "t").state == State.FINISHED
    assert "retry 1/1 in 0.3 s: come back later" in [r.message for r in spool.log_records("A", "t")]
    failed = spool.status("F", "t")
    assert failed.state == State.FAILED and failed.doc["retries"] == 1 and "attempt 2 fails" in failed.doc["message"]


def test_a_retrys_due_time_survives_a_daemon_sigkill(env):
    spool, root, workers, tmp = env
    register(spool, "R", "fail_until", retries=1, retry_backoff=6.0)
    rec = tmp / "rec"
    spool.enqueue("R", "t", {"record": str(rec), "counter": str(tmp / "n"), "succeed_on": 2})
    w1 = workers.start("w1")
    wait_until(lambda: spool.status("R", "t").doc.get("retries") == 1, what="the retry scheduled")
    due = spool.status("R", "t").doc["not_before"]
    w1.kill()
    w1.wait(10)
    workers.start("w1")
    wait_until(lambda: final(spool, "R", "t"), timeout=60, what="the retried task final")
    second = [at for event, *_, at in events(rec) if event == "start"][1]
    from datetime import datetime
    assert second >= datetime.fromisoformat(due).timestamp()


# --------------------------------------------------------------------------- delayed tasks


def test_delayed_tasks_wait_for_their_time_with_two_servers_and_a_restart(env):
    spool, root, workers, tmp = env
    register(spool, "D", "run")
    rec = tmp / "rec"
    now = time.time()
    spool.enqueue("D", "late", {"record": str(rec)}, delay=3.0)
    spool.enqueue("D", "early", {"record": str(rec)}, delay=1.5)  # enqueued later, due earlier: runs first
    spool.enqueue("D", "now", {"record": str(rec)})
    assert [t.id for t in spool.list_tasks(state=State.ENQUEUED)] and os.listdir(root / "enqueued")  # ls shows them
    w1 = workers.start("w1")
    workers.start("w2")
    wait_until(lambda: spool.status("D", "now").state == State.FINISHED, what="the task due now")
    w1.kill()  # a restart in between
    w1.wait(10)
    workers.start("w1")
    wait_until(lambda: all(final(spool, "D", i) for i in ("late", "early")), timeout=30, what="the delayed ones")
    starts = {task: at for event, task, _, _, at in events(rec) if event == "start"}
    assert starts["D:early"] >= now + 1.5 and starts["D:late"] >= now + 3.0
    assert starts["D:early"] < starts["D:late"]
    assert starts["D:late"] - (now + 3.0) < 2.0  # promptly after (generous: a busy machine)


def test_the_queue_limit_counts_delayed_tasks_and_bad_times_are_refused(env):
    spool, root, workers, tmp = env
    Spool.init(root, max_queue=2)
    spool = Spool(root)
    register(spool, "D", "run")
    spool.enqueue("D", "a", {}, delay=3600)
    spool.enqueue("D", "b", {}, delay=3600)
    with pytest.raises(QueueFull):
        spool.enqueue("D", "c", {})
    with pytest.raises(InvalidInput):
        spool.enqueue("D", "d", {}, delay=-5)
    for args, code in ((["--in", "-5"], 2), (["--at", "yesterday"], 2), (["--at", "2001-01-01T00:00"], 2),
                       (["--at", "not-a-time"], 2), (["--in", "5x"], 2), (["--at", "2099-01-01", "--in", "5"], 2),
                       (["--priority", "101"], 2), (["--priority", "-101"], 2)):
        proc = cli(root, "enqueue", "D", "x", "-", "--json", *args, stdin=b"{}")
        one_line(proc, code)
    assert sorted(t.id for t in spool.list_tasks()) == ["a", "b"]


# --------------------------------------------------------------------------- due times spoolq can store

CENTURY = 36525 * 86400  # the most a due time may be from now (contract §11.2)


def test_a_due_time_over_100_years_ahead_is_refused_and_a_running_worker_loses_nothing(env):
    """The operator's report: `enqueue --in 3000000d` exited 0, then the
    worker quarantined the task, whose due time (year 10240) its status could
    not be read back with. Every way in now refuses such a time, writing
    nothing; one at the bound is stored, read back and left waiting."""
    spool, root, workers, tmp = env
    assert cli(root, "register", "Job", "spoolq.tracker.dummyHandler").returncode == 0
    register(spool, "F", "fail_until")
    one = tmp / "one.pkl"
    one.write_bytes(pickle.dumps(1))
    spool.enqueue("F", "failed", {"record": str(tmp / "rec"), "counter": str(tmp / "n"), "succeed_on": 2})
    workers.start("w1")
    wait_until(lambda: final(spool, "F", "failed"), what="the task to requeue FAILED")

    err = one_line(cli(root, "enqueue", "Job", "later", one, "--in", "3000000d"), 2)
    assert "'3000000d' is longer than 100 years" in err, err
    for args in (["--at", "2999-01-01T00:00"], ["--at", "10240-08-24T18:55:33+00:00"], ["--in", f"{CENTURY + 60}"]):
        one_line(cli(root, "enqueue", "Job", "later", one, *args), 2)
    for args in (["--in", "3000000d"], ["--at", "2999-01-01T00:00"]):
        one_line(cli(root, "requeue", "F", "failed", *args), 2)
    batch = b'{"id": "m1", "input": 1, "in": "3000000d"}\n{"id": "m2", "input": 1, "at": "2999-01-01T00:00"}\n'
    proc = cli(root, "enqueue-many", "Job", "-", stdin=batch)
    assert proc.returncode == 1 and proc.stdout == b"0\n", proc
    assert [line.split(":")[1] for line in proc.stderr.decode().splitlines()] == [" line 1", " line 2"], proc.stderr
    for when in ({"delay": 1e12}, {"delay": CENTURY + 60}, {"not_before": time.time() + CENTURY + 60},
                 {"not_before": datetime(9999, 12, 31)}, {"not_before": -1e12}):
        with pytest.raises(InvalidInput, match="100 years"):
            spool.enqueue("Job", "later", 1, **when)
        with pytest.raises(InvalidInput, match="100 years"):
            spool.requeue("F", "failed", **when)
    results = spool.enqueue_many("Job", [{"id": "m3", "input": 1, "delay": 1e12}])
    assert [r.error.__class__ for r in results] == [InvalidInput]

    # At the bound: stored, and the worker reads its due time and leaves it.
    assert cli(root, "enqueue", "Job", "edge", one, "--in", f"{CENTURY - 60}").returncode == 0
    assert cli(root, "enqueue", "Job", "now", one).returncode == 0
    wait_until(lambda: spool.status("Job", "now").state == State.FINISHED, what="the worker past the edge task")
    edge = spool.status("Job", "edge")
    assert edge.state == State.ENQUEUED
    assert datetime.fromisoformat(edge.doc["not_before"]).timestamp() > time.time() + CENTURY - 3600
    assert spool.status("F", "failed").state == State.FAILED
    proc = cli(root, "status", "Job", "later")
    assert proc.returncode == 1 and b"no task Job/later" in proc.stderr
    assert sorted(t.id for t in spool.list_tasks()) == ["edge", "failed", "now"]
    assert os.listdir(root / "quarantine") == [] and os.listdir(root / "tmp") == []


def test_a_retry_of_a_type_with_a_backoff_past_year_9999_stays_readable(env):
    """The operator's retry case: a type whose backoff puts a retry past the
    year 9999 (`--retry-backoff 99999999999d`, which register now refuses,
    test_cli.py; here stored by a spoolq before the bound) and whose handler
    fails. Its retry is due within 100 years, readable, not quarantined."""
    spool, root, workers, tmp = env
    old = {"handler": "sched_handlers.fail_until", "retries": 1, "retry_backoff": 99999999999 * 86400.0,
           "retry_backoff_max": 99999999999 * 86400.0, "timeout": 8.64e18, "max_restarts": 10**23}
    (root / "types" / "R.json").write_text(json.dumps(old))
    spool.enqueue("R", "t", {"record": str(tmp / "rec"), "counter": str(tmp / "n"), "succeed_on": 2})
    workers.start("w1")
    wait_until(lambda: spool.status("R", "t").doc.get("retries") == 1, what="the retry scheduled")
    register(spool, "D", "run")
    spool.enqueue("D", "after", {"record": str(tmp / "rec")})  # the worker has looked at the queue since
    wait_until(lambda: final(spool, "D", "after"), what="a task enqueued after the retry")
    proc = cli(root, "status", "R", "t", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["state"] == "ENQUEUED" and doc["retries"] == 1
    due = datetime.fromisoformat(doc["not_before"]).timestamp()
    assert time.time() + CENTURY / 2 - 3600 < due <= time.time() + CENTURY
    assert os.listdir(root / "quarantine") == []
    ttype = {t["name"]: t for t in json.loads(cli(root, "types", "--json").stdout)}["R"]  # read at the bounds
    assert (ttype["retry_backoff"], ttype["timeout"], ttype["max_restarts"]) == (CENTURY, CENTURY, 10_000)


def test_a_retry_is_never_due_more_than_100_years_ahead_whatever_its_type_says(env, monkeypatch):
    """Defence in depth: were a type's backoff past every bound (a TaskType
    built in code, not read from types/), the due time spoolq computes for
    its retry is still cut to 100 years, one a status holds and reads back."""
    spool, root, workers, tmp = env
    register(spool, "R", "fail_until", retries=1)
    huge = dataclasses.replace(spool.get_type("R"), retry_backoff=8.64e15, retry_backoff_max=8.64e15)
    monkeypatch.setattr(spool.registry, "find", lambda name: huge)
    spool.enqueue("R", "t", {})
    claim = spool.claim("s1")
    spool.start(claim)
    assert spool.retry(claim) == State.ENQUEUED
    doc = Spool(root).status("R", "t").doc  # another reader, from the disk
    due = datetime.fromisoformat(doc["not_before"]).timestamp()
    assert time.time() + CENTURY / 2 - 3600 < due <= time.time() + CENTURY
    assert os.listdir(root / "quarantine") == []


# --------------------------------------------------------------------------- cancel and requeue


def test_cancel_before_the_start_and_while_running(env):
    spool, root, workers, tmp = env
    register(spool, "C", "run")
    rec = tmp / "rec"
    spool.enqueue("C", "waiting", {"record": str(rec)}, delay=3600)
    proc = cli(root, "cancel", "C", "waiting", "--reason", "not needed", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["state"] == "FAILED" and doc["cancelled"] is True and doc["message"] == "cancelled: not needed"
    spool.enqueue("C", "long", {"record": str(rec), "seconds": 60})
    workers.start("w1", heartbeat_interval=30)
    wait_until(lambda: any(e == "start" and t == "C:long" for e, t, *_ in events(rec)), what="running")
    pid = next(p for e, t, _, p, _ in events(rec) if t == "C:long")
    began = time.monotonic()
    proc = cli(root, "cancel", "C", "long")
    assert proc.returncode == 0 and proc.stdout == b"FAILED\n", proc.stderr
    assert time.monotonic() - began < 5
    wait_until(lambda: not _alive(pid), timeout=5, what="the handler stopped")
    info = spool.status("C", "long")
    assert info.doc["cancelled"] is True and Path(info.path).parent.name == "done"
    assert [r.state for r in spool.log_records("C", "long")][-1] == State.FAILED
    # Final tasks: a one-line error, nothing changed.
    one_line(cli(root, "cancel", "C", "long"), 1)
    one_line(cli(root, "requeue", "C", "nope"), 1)
    # Requeue: history kept, counters reset, runs again.
    spool.register_type("C", "sched_handlers.run")
    proc = cli(root, "requeue", "C", "waiting")
    assert proc.returncode == 0, proc.stderr
    assert spool.status("C", "waiting").doc.get("cancelled") is None
    wait_until(lambda: spool.status("C", "waiting").state == State.FINISHED, what="the requeued task")
    log = [r.message for r in spool.log_records("C", "waiting")]
    assert "cancelled: not needed" in log and "requeued" in log
    one_line(cli(root, "requeue", "C", "waiting"), 1)  # FINISHED: not requeued


def test_a_cancel_request_survives_its_daemons_death(env):
    spool, root, workers, tmp = env
    register(spool, "C", "run")
    rec = tmp / "rec"
    spool.enqueue("C", "long", {"record": str(rec), "seconds": 60})
    w1 = workers.start("w1")
    wait_until(lambda: any(e == "start" for e, *_ in events(rec)), what="running")
    os.kill(w1.pid, signal.SIGSTOP)  # it cannot act on the request...
    try:
        proc = cli(root, "cancel", "C", "long", "--no-wait")
        assert proc.returncode == 0 and proc.stdout == b"RUNNING\n", proc.stderr
    finally:
        os.kill(w1.pid, signal.SIGKILL)  # ...and dies with it pending
    w1.wait(10)
    assert spool.status("C", "long").doc["cancel"] == "no reason given"
    wait_until(lambda: not spool.server_alive("w1"), what="w1 dead")
    actions = sweeps.reenqueue_zombies(spool)  # whoever finds the server dead carries it out
    assert [(a.id, a.action) for a in actions] == [("long", "failed")]
    info = spool.status("C", "long")
    assert info.state == State.FAILED and info.doc["cancelled"] is True


def test_cancel_racing_the_handlers_own_finish_has_one_outcome(env):
    """200 races: the handler returns after ~10 ms while a cancel arrives at
    a random moment. Always one final record, and no handler left alive."""
    spool, root, workers, tmp = env
    register(spool, "X", "short")
    rec = tmp / "rec"
    workers.start("w1", concurrency=2)
    outcomes: Counter = Counter()
    import random

    rng = random.Random(7)
    for n in range(200):
        task = f"r{n}"
        spool.enqueue("X", task, {"record": str(rec), "seconds": 0.01})
        time.sleep(rng.uniform(0, 0.03))
        try:
            spool.cancel("X", task, "race")
        except WrongState:
            pass  # finished first
        wait_until(lambda t=task: final(spool, "X", t), what=f"{task} final")
    for n in range(200):
        info = spool.status("X", f"r{n}")
        records = spool.log_records("X", f"r{n}")
        assert sum(1 for r in records if r.state.terminal) == 1, [(r.state.name, r.message) for r in records]
        outcomes["cancelled" if info.doc.get("cancelled") else info.state.name] += 1
    assert set(outcomes) <= {"cancelled", "FINISHED"} and outcomes["cancelled"] > 0
    pids = {p for _, _, _, p, _ in events(rec)}
    wait_until(lambda: not any(_alive(p) and p not in _slots(root) for p in pids), timeout=5,
               what="no handler of a cancelled run alive")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _slots(root: Path) -> set[int]:
    """The worker's live handler processes (idle ones are fine)."""
    return pids_with_cmdline(b"worker_runner.py", str(root).encode())


def test_requeue_failed_of_a_type(env):
    spool, root, workers, tmp = env
    register(spool, "F", "fail_until")
    register(spool, "G", "fail_until")
    rec = tmp / "rec"
    for t in ("F", "G"):
        for i in range(3):
            spool.enqueue(t, f"{t}{i}", {"record": str(rec), "counter": str(tmp / f"{t}{i}"), "succeed_on": 2})
    w = workers.start("w1")
    wait_until(lambda: all(final(spool, t, f"{t}{i}") for t in "FG" for i in range(3)), what="all failed")
    proc = cli(root, "requeue", "--failed", "--type", "F", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout) == {"requeued": 3}, proc.stderr
    wait_until(lambda: all(spool.status("F", f"F{i}").state == State.FINISHED for i in range(3)), what="rerun")
    assert all(spool.status("G", f"G{i}").state == State.FAILED for i in range(3))
    one_line(cli(root, "requeue", "--failed", "F", "x"), 2)
    one_line(cli(root, "requeue"), 2)
    assert w.poll() is None


# --------------------------------------------------------------------------- priorities, lanes, hold


def test_priorities_then_fifo_with_one_worker(env):
    spool, root, workers, tmp = env
    register(spool, "P", "run")
    rec = tmp / "rec"
    spool.hold("P")
    for n in range(300):
        priority = (n % 3 - 1) * 10  # -10, 0, 10, interleaved
        spool.enqueue("P", f"t{n:03d}", {"record": str(rec)}, priority=priority)
    workers.start("w1", concurrency=1)
    time.sleep(0.5)
    assert not events(rec), "a held type's task started"
    assert cli(root, "release", "P").returncode == 0
    wait_until(lambda: len([e for e in events(rec) if e[0] == "end"]) == 300, timeout=120, what="all 300")
    order = [task for event, task, *_ in events(rec) if event == "start"]
    expected = sorted((f"P:t{n:03d}" for n in range(300)), key=lambda t: (-((int(t[3:]) % 3 - 1) * 10), t))
    assert order == expected


def test_no_lower_priority_task_starts_while_a_higher_one_waits(env):
    spool, root, workers, tmp = env
    register(spool, "P", "run")
    rec = tmp / "rec"
    workers.start("w1", concurrency=1)
    workers.start("w2", concurrency=1)
    for n in range(60):
        spool.enqueue("P", f"lo{n:02d}", {"record": str(rec), "seconds": 0.02}, priority=-5)
    time.sleep(0.2)
    for n in range(20):  # arrivals during the run, higher priority
        spool.enqueue("P", f"hi{n:02d}", {"record": str(rec), "seconds": 0.02}, priority=5)
    wait_until(lambda: len([e for e in events(rec) if e[0] == "end"]) == 80, timeout=120, what="all 80")
    starts = [(at, task) for event, task, _, _, at in events(rec) if event == "start"]
    last_hi = max(at for at, task in starts if ":hi" in task)
    enq_hi = min(spool.status("P", f"hi{n:02d}").doc["enqueued_at"] for n in range(20))
    from datetime import datetime
    t_hi = datetime.fromisoformat(enq_hi).timestamp()
    # Once the high ones are there, a low one starts only if it was already
    # claimed (at most one per server) before the last high one started.
    lows_between = [task for at, task in starts if ":lo" in task and t_hi + 0.05 < at < last_hi]
    assert len(lows_between) <= 2, lows_between


def test_a_lane_claims_its_types_only(env):
    spool, root, workers, tmp = env
    register(spool, "A", "run")
    register(spool, "B", "run")
    rec = tmp / "rec"
    for t in "AB":
        for i in range(5):
            spool.enqueue(t, f"{t}{i}", {"record": str(rec)})
    workers.start("gpu", types=["A"])
    wait_until(lambda: all(final(spool, "A", f"A{i}") for i in range(5)), what="the lane's tasks")
    time.sleep(0.3)
    assert all(spool.status("B", f"B{i}").state == State.ENQUEUED for i in range(5))
    one_line(cli(root, "worker", "w9", "--types", "bad name"), 2)  # a usage error (contract §4.12)
    one_line(cli(root, "worker", "w9", "--types", ","), 2)


def test_hold_stops_new_starts_on_every_server_and_release_resumes_within_a_second(env):
    spool, root, workers, tmp = env
    register(spool, "H", "run")
    rec = tmp / "rec"
    workers.start("w1", concurrency=2)
    workers.start("w2", concurrency=2)
    for i in range(40):
        # 40 x 0.2 s on 4 slots: 2 s of work, longer than a `spoolq hold`
        # takes to start on a loaded machine (0.05 s each once let all 40 start first)
        spool.enqueue("H", f"h{i:02d}", {"record": str(rec), "seconds": 0.2})
    wait_until(lambda: any(e[0] == "start" for e in events(rec)), what="first starts")
    assert cli(root, "hold", "H").returncode == 0
    held_at = time.time()
    time.sleep(1.0)
    late = [t for e, t, _, _, at in events(rec) if e == "start" and at > held_at + 0.2]
    assert len(late) <= 4, late  # at most the claims that were in flight (2 servers x 2)
    started = len([e for e in events(rec) if e[0] == "start"])
    assert started < 40 and spool.get_type("H").held
    assert '"held": true' in cli(root, "types", "--json").stdout.decode()
    released = time.time()
    assert cli(root, "release", "H").returncode == 0
    written = time.time()  # the release is on disk by now; the CLI's own start-up is not the workers' delay
    wait_until(lambda: any(e == "start" and at > released for e, _, _, _, at in events(rec)), timeout=5,
               what="resumed")
    first_after = min(at for e, _, _, _, at in events(rec) if e == "start" and at > released)
    assert first_after - written < 1.0
    wait_until(lambda: all(final(spool, "H", f"h{i:02d}") for i in range(40)), timeout=60, what="all done")


# --------------------------------------------------------------------------- per-type concurrency


def test_per_type_concurrency_over_three_servers_and_a_sigkill(env):
    spool, root, workers, tmp = env
    register(spool, "E", "run", concurrency=2)
    rec = tmp / "rec"
    for i in range(30):
        spool.enqueue("E", f"e{i:02d}", {"record": str(rec), "seconds": 0.3})
    procs = [workers.start(f"w{k}", concurrency=4) for k in range(3)]
    wait_until(lambda: len([e for e in events(rec) if e[0] == "start"]) >= 4, timeout=30, what="some runs")
    victim = next(p for p in procs)  # kill one that runs something, if it does
    running_on = Counter(s for e, _, s, _, _ in events(rec) if e == "start")
    victim = procs[int(max(running_on, key=running_on.get)[1:])] if running_on else victim
    victim.kill()
    victim.wait(10)
    killed_at = time.time()
    wait_until(lambda: all(final(spool, "E", f"e{i:02d}") for i in range(30)), timeout=120, what="all 30")
    # Never more than 2 at once: replay the handlers' own start/end records
    # (a killed run ends at the kill).
    timeline = []
    open_runs: set[tuple[str, int]] = set()
    for event, task, server, pid, at in events(rec):
        timeline.append((at, +1 if event == "start" else -1))
        (open_runs.add if event == "start" else open_runs.discard)((task, pid))
    timeline += [(killed_at, -1) for _ in open_runs]  # runs of the killed worker, ended by the kill
    timeline.sort()
    running = peak = 0
    for _, delta in timeline:
        running += delta
        peak = max(peak, running)
    assert peak <= 2, peak
    # The slot of the killed worker was free at once: the next start came
    # well before any timeout (the type's is 3600 s).
    after = [at for e, *_, at in events(rec) if e == "start" and at > killed_at]
    assert after and after[0] - killed_at < 5.0


# --------------------------------------------------------------------------- bulk enqueue


def test_enqueue_many_ten_thousand_with_bad_lines(env):
    spool, root, workers, tmp = env
    register(spool, "B", "run")
    lines = [json.dumps({"id": f"b{i:05d}", "input": {"n": i}}) for i in range(9995)]
    lines.insert(100, json.dumps({"id": "b00001", "input": 1}))  # a duplicate in the file
    lines.insert(200, "{not json")
    lines.insert(300, json.dumps({"id": "b00002", "input": 2}))
    lines.insert(400, json.dumps({"input": 3}))  # no id
    spool.enqueue("B", "pre", 1)
    lines.insert(500, json.dumps({"id": "pre", "input": 4}))  # exists already
    path = tmp / "batch.jsonl"
    path.write_text("\n".join(lines) + "\n")
    proc = cli(root, "enqueue-many", "B", path, timeout=300)
    assert proc.returncode == 1
    errors = proc.stderr.decode().splitlines()
    assert [e.split(":")[1].strip() for e in errors] == ["line 101", "line 201", "line 301", "line 401",
                                                          "line 501"], errors
    assert proc.stdout == b"9995\n"
    waiting = os.listdir(root / "enqueued")
    assert len(waiting) == 9996 and not os.listdir(root / "tmp")
    for name in waiting[:50] + waiting[-50:]:
        assert sorted(os.listdir(root / "enqueued" / name)) in (["input.json", "log", "status.json"],
                                                                 ["input.pkl", "log", "status.json"])
    one_line(cli(root, "enqueue-many", "Nope", path), 1)
    bad = cli(root, "enqueue-many", "B", "-", stdin=b"[1, 2]\nhello\n")
    assert bad.returncode == 1 and bad.stdout == b"0\n"


def test_a_malformed_batch_item_is_its_own_invalid_input_and_the_good_ones_are_enqueued(env):
    """An item that is not an Item or a dict of its fields (no "input", not
    a dict, a key Item has not) is reported in its own result as
    InvalidInput with a one-line message, never a bare TypeError that drops
    the good items of the same call; the command line's lines follow the
    same rule (producer.check_item_keys)."""
    spool, root, workers, tmp = env
    register(spool, "B", "run")
    results = spool.enqueue_many("B", [{"id": "x1", "input": 1}, {"id": "x2"}, "notadict",
                                       {"id": "x3", "input": 1, "extra": 2}, {"input": 4}, None,
                                       {"id": "x4", "input": 5, "delay": 60}])
    assert [(r.index, r.id, type(r.error)) for r in results] == [
        (0, "x1", type(None)), (1, "x2", InvalidInput), (2, None, InvalidInput), (3, "x3", InvalidInput),
        (4, None, InvalidInput), (5, None, InvalidInput), (6, "x4", type(None))]
    messages = [str(r.error) for r in results if r.error is not None]
    assert messages == ['an item has no "input"', 'an item must be an object with "id" and "input", not str',
                        "an item has unknown key(s) 'extra'", 'an item has no "id"',
                        'an item must be an object with "id" and "input", not NoneType']
    assert sorted(t.id for t in spool.list_tasks()) == ["x1", "x4"]
    assert not os.listdir(root / "tmp")
    proc = cli(root, "enqueue-many", "B", "-",
               stdin=b'{"id": "y1", "input": 1}\n{"id": "y2"}\n"notadict"\n{"id": "y3", "input": 1, "x": 2}\n')
    assert proc.returncode == 1 and proc.stdout == b"1\n", proc
    assert proc.stderr.decode().splitlines() == [
        'spoolq: line 2: a line has no "input"', 'spoolq: line 3: a line must be an object with "id" and "input", '
        "not str", "spoolq: line 4: a line has unknown key(s) 'x'"]


def test_a_crash_in_the_middle_of_a_batch_leaves_only_whole_tasks(env):
    spool, root, workers, tmp = env
    register(spool, "B", "run")
    path = tmp / "batch.jsonl"
    path.write_text("".join(json.dumps({"id": f"b{i:04d}", "input": i}) + "\n" for i in range(3000)))
    env_vars = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]),
                    SPOOLQ_CRASH_AT="enqueue.published@1500")
    proc = subprocess.run([sys.executable, "-m", "spoolq", "--root", str(root), "enqueue-many", "B", str(path)],
                          env=env_vars, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    waiting = os.listdir(root / "enqueued")
    assert len(waiting) == 1500  # the 1500th rename is the crash point; every one whole
    for name in waiting:
        assert sorted(os.listdir(root / "enqueued" / name)) == ["input.json", "log", "status.json"]
    assert spool.counts()["ENQUEUED"] == 1500
    sweeps.clean_tmp(spool, grace=0)
    assert not os.listdir(root / "tmp")


def test_a_retry_asked_with_a_delay_spoolq_cannot_take_fails_with_a_reason(env):
    """raise spoolq.Retry(delay=-5) (or one past 100 years): the handler
    process used to die on the InvalidInput (exit 70, a traceback in the
    worker's log). The task fails with the reason instead."""
    spool, root, workers, tmp = env
    register(spool, "R", "ask_retry", max_restarts=0)
    spool.enqueue("R", "neg", {"record": str(tmp / "rec"), "marker": str(tmp / "m1"), "delay": -5})
    spool.enqueue("R", "far", {"record": str(tmp / "rec"), "marker": str(tmp / "m2"), "delay": 1e12})
    proc = workers.start("w1")
    for task_id in ("neg", "far"):
        wait_until(lambda t=task_id: spool.status("R", t).state == State.FAILED, what=f"{task_id} failed")
        message = spool.status("R", task_id).doc["message"]
        assert message.startswith("the handler asked for a retry spoolq cannot make: "), message
    assert "Traceback" not in stderr_of(proc)


def test_the_daemon_reports_a_retry_through_set_failure_as_a_retry_not_a_lost_task(env):
    """A handler that fails by calling set_failure, its retries not used up,
    sent its task back for a retry: the daemon said it "was taken away or
    deleted while it ran", a warning that hid the real ones. Likewise a
    handler that ended its task and then had a later status call refused."""
    spool, root, workers, tmp = env
    register(spool, "SF", "set_failure_then", retries=1, retry_backoff=0.1)
    register(spool, "SS", "set_failure_then")
    rec = tmp / "rec"
    spool.enqueue("SF", "t", {"record": str(rec)})
    spool.enqueue("SS", "t", {"record": str(rec), "then": "success"})
    proc = workers.start("w1")
    wait_until(lambda: final(spool, "SF", "t") and final(spool, "SS", "t"), timeout=60, what="both final")
    assert spool.status("SF", "t").doc["retries"] == 1
    assert spool.status("SS", "t").state == State.FAILED
    wait_until(lambda: stderr_of(proc).count("failed S") >= 2, timeout=30, what="both ends logged")
    err = stderr_of(proc)
    assert "taken away or deleted" not in err and "no longer owns" not in err, err
    assert "SF:t: retry 1/1 in " in err, err
    assert "refused" in err and "failed SS:t: asked to fail" in err, err


def test_a_handler_that_raises_after_asking_for_a_retry_is_reported_as_that_retry(env):
    """The raise comes after the task went back to the queue through this
    claim: the retry stands, and the daemon says so (it reported the run
    FAILED, while the task waited for its retry)."""
    spool, root, workers, tmp = env
    register(spool, "RR", "retry_then_raise", retries=2)
    spool.enqueue("RR", "t", {"record": str(tmp / "rec"), "marker": str(tmp / "m")})
    proc = workers.start("w1")
    wait_until(lambda: final(spool, "RR", "t"), timeout=60, what="the task final")
    info = spool.status("RR", "t")
    assert info.state == State.FINISHED and info.doc["retries"] == 1, info.doc
    wait_until(lambda: "finished RR:t" in stderr_of(proc), timeout=30, what="its end logged")
    err = stderr_of(proc)
    assert "already sent back for a retry: RuntimeError: after the retry" in err, err
    assert "failed RR:t" not in err, err


def test_a_type_at_its_concurrency_holds_up_neither_other_types_nor_its_own_order(env):
    """A type of concurrency 1 with a backlog, on a worker of concurrency 2:
    the free slot kept claiming the limited type (its run had not taken its
    slot yet, so the slot counted free), each such claim lost the slot and
    went to the back of the queue: the other type's tasks waited behind
    thousands, and the limited type ran out of order (an outside tester)."""
    spool, root, workers, tmp = env
    rec = tmp / "rec"
    register(spool, "R", "run", concurrency=1)
    register(spool, "F", "run")
    spool.enqueue_many("R", [{"id": f"r{i:03d}", "input": {"record": str(rec), "seconds": 0.02}} for i in range(40)])
    spool.enqueue_many("F", [{"id": f"f{i}", "input": {"record": str(rec)}} for i in range(5)])
    proc = workers.start("w1", concurrency=2)
    wait_until(lambda: all(final(spool, "R", f"r{i:03d}") for i in range(40)), timeout=60, what="every R task")
    started = [task for event, task, _, _, _ in events(rec) if event == "start"]
    r_order = [t for t in started if t.startswith("R:")]
    assert r_order == sorted(r_order), r_order  # in enqueue order
    # F ran beside R's one run, not after all of it.
    assert max(started.index(f"F:f{i}") for i in range(5)) < started.index("R:r010"), started
    assert "not started: all 1 slots of R are taken" not in stderr_of(proc)
