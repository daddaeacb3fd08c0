"""Zombie re-enqueue, server recovery, retirement and tmp/ cleaning.

Time is a FakeClock injected into the spool, so a 60 s timeout or a 600 s
retention is crossed with ``clock.advance`` instead of sleeping. Dead
servers are real: a process that held the server's lock and exited."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spoolq import sweeps
from spoolq import ServerBusy, Spool, State, TaskNotFound

FORK = multiprocessing.get_context("fork")


@pytest.fixture
def clock(make_clock):
    return make_clock()  # starts at the real time: files other processes write agree with it


@pytest.fixture
def sp(make_spool, clock) -> Spool:
    spool = make_spool(clock=clock)
    spool.register_type("Z", "atp_demo.handler", timeout=60, retention=600, max_restarts=1)
    return spool


def started(spool: Spool, task_id: str, server: str = "s1"):
    spool.enqueue("Z", task_id, 1)
    claim = spool.claim(server, names=[f"Z:{task_id}"])
    spool.start(claim)
    return claim


def actions(result) -> list[tuple[str, str, str]]:
    return sorted((a.type, a.id, a.action) for a in result)


def _claim_in_child(root: str, server: str, task_id: str, start: bool) -> None:
    """Become *server* in this process, claim (and start) a task, then exit:
    the server's lock goes with the process."""
    spool = Spool(root)
    claim = spool.claim(server, names=[f"Z:{task_id}"])
    assert claim is not None
    if start:
        spool.start(claim)
    os._exit(0)


def claim_in_dead_process(spool: Spool, server: str, task_id: str, *, start: bool = True) -> None:
    proc = FORK.Process(target=_claim_in_child, args=(spool.root, server, task_id, start))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0


# ----------------------------------------------------------------------------- timeouts


def test_a_task_past_its_timeout_is_reenqueued_from_the_claim(sp: Spool, clock) -> None:
    sp.enqueue("Z", "a", 1)
    clock.advance(1000)  # time waiting in the queue does not count
    claim = sp.claim("s1")
    sp.start(claim)
    clock.advance(59)
    assert sweeps.reenqueue_zombies(sp) == []
    sp.set_state(claim, State.PAUSED, "waiting")  # PAUSED time counts
    clock.advance(2)
    assert actions(sweeps.reenqueue_zombies(sp)) == [("Z", "a", "reenqueued")]
    info = sp.status("Z", "a")
    assert info.state == State.ENQUEUED and info.doc["restarts"] == 1
    assert Path(sp.root, "enqueued", "Z:a").is_dir()
    last = sp.log_records("Z", "a")[-1]
    assert (last.state, last.message) == (State.ENQUEUED, "timed out after 60 s")
    assert sweeps.reenqueue_zombies(sp) == []  # waiting tasks are not zombies


def test_a_claim_never_started_times_out_from_its_claim_uncharged(sp: Spool, clock) -> None:
    sp.enqueue("Z", "a", 1)
    clock.advance(1000)  # time waiting in the queue does not count
    claim = sp.claim("s1")  # recorded by its move alone
    clock.advance(59)
    assert sweeps.reenqueue_zombies(sp) == []
    clock.advance(2)
    assert actions(sweeps.reenqueue_zombies(sp)) == [("Z", "a", "reenqueued")]
    info = sp.status("Z", "a")
    assert info.state == State.ENQUEUED and info.doc["restarts"] == 0 and info.doc["claim"] == claim.number
    assert [r.state for r in sp.log_records("Z", "a")] == [State.ENQUEUED, State.SCHEDULED, State.ENQUEUED]


def test_restarts_run_out_then_the_task_fails_saying_why(sp: Spool, clock) -> None:
    started(sp, "a")
    clock.advance(61)
    assert actions(sweeps.reenqueue_zombies(sp)) == [("Z", "a", "reenqueued")]
    sp.start(sp.claim("s1"))
    clock.advance(61)
    assert actions(sweeps.reenqueue_zombies(sp)) == [("Z", "a", "failed")]
    info = sp.status("Z", "a")
    assert info.state == State.FAILED and Path(info.path).parent.name == "done"
    assert info.doc["message"] == "timed out after 60 s; gave up after 2 start(s)"
    assert [r.state.name for r in sp.log_records("Z", "a")] == [
        "ENQUEUED", "SCHEDULED", "RUNNING", "ENQUEUED", "SCHEDULED", "RUNNING", "FAILED",
    ]


def test_max_restarts_zero_fails_at_the_first_timeout(sp: Spool, clock) -> None:
    sp.register_type("Z", "atp_demo.handler", timeout=60, max_restarts=0)
    started(sp, "a")
    clock.advance(61)
    assert actions(sweeps.reenqueue_zombies(sp)) == [("Z", "a", "failed")]


def test_a_scheduled_task_past_its_timeout_goes_back_without_using_a_restart(sp: Spool, clock) -> None:
    sp.enqueue("Z", "a", 1)
    sp.claim("s1")
    clock.advance(61)
    assert actions(sweeps.reenqueue_zombies(sp)) == [("Z", "a", "reenqueued")]
    assert sp.status("Z", "a").doc["restarts"] == 0


def test_timeout_zero_means_no_time_limit(sp: Spool, clock) -> None:
    sp.register_type("Z", "atp_demo.handler", timeout=0)
    started(sp, "a")
    clock.advance(10 * 365 * 86400)
    assert sweeps.reenqueue_zombies(sp) == []


def test_finished_waiting_and_fresh_tasks_are_left_alone(sp: Spool, clock) -> None:
    done = started(sp, "done")
    sp.set_state(done, State.FINISHED)
    failed = started(sp, "failed")
    sp.set_state(failed, State.FAILED)
    sp.enqueue("Z", "waiting", 1)
    clock.advance(10_000)
    started(sp, "fresh")
    before = {i: sp.log_records("Z", i) for i in ("done", "failed", "waiting", "fresh")}
    assert sweeps.reenqueue_zombies(sp) == []
    assert {i: sp.log_records("Z", i) for i in before} == before


# ----------------------------------------------------------------------------- dead servers


def test_a_dead_servers_tasks_are_reenqueued_without_waiting_for_the_timeout(sp: Spool) -> None:
    sp.enqueue("Z", "run", 1)
    sp.enqueue("Z", "sched", 1)
    claim_in_dead_process(sp, "gone1", "run", start=True)
    claim_in_dead_process(sp, "gone1", "sched", start=False)
    assert sp.status("Z", "run").state == State.RUNNING
    assert not sp.server_alive("gone1")
    result = sweeps.reenqueue_zombies(sp)  # no clock advance at all
    assert actions(result) == [("Z", "run", "reenqueued"), ("Z", "sched", "reenqueued")]
    assert {a.reason for a in result} == {"abandoned: server gone1 is gone"}
    assert sp.status("Z", "run").doc["restarts"] == 1  # it had started: a restart used
    assert sp.status("Z", "sched").doc["restarts"] == 0  # never started: free
    assert sp.log_records("Z", "run")[-1].message == "abandoned: server gone1 is gone"


def test_release_server_makes_its_claims_abandoned(sp: Spool, clock) -> None:
    other = Spool(sp.root, clock=clock)
    sp.enqueue("Z", "a", 1)
    other.start(other.claim("s2"))
    assert other.server_alive("s2") and sp.server_alive("s2")
    assert sweeps.reenqueue_zombies(sp) == []  # alive and in time: left alone
    other.release_server("s2")
    assert not sp.server_alive("s2")
    assert actions(sweeps.reenqueue_zombies(sp)) == [("Z", "a", "reenqueued")]


def test_a_live_server_keeps_its_claims(sp: Spool) -> None:
    started(sp, "a", server="s1")
    sp.enqueue("Z", "b", 1)
    sp.claim("s1")
    assert sp.server_alive("s1")
    assert sweeps.reenqueue_zombies(sp) == []
    assert sp.status("Z", "a").state == State.RUNNING
    assert sp.status("Z", "b").state == State.SCHEDULED


def test_a_server_id_is_held_by_one_process(sp: Spool) -> None:
    sp.hold_server("s1")
    code = (
        "import sys; from spoolq import Spool, ServerBusy\n"
        f"sp = Spool({sp.root!r})\n"
        "try:\n    sp.hold_server('s1', wait=0.05)\nexcept ServerBusy as e:\n    print(e); sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert "already running" in proc.stdout
    with pytest.raises(ServerBusy):  # another open of the lock in this process too
        Spool(sp.root).hold_server("s1", wait=0.05)
    sp.release_server("s1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_busy_server_is_refused_after_two_seconds_and_a_probe_never_makes_one_look_taken(sp: Spool) -> None:
    """Contract §5.1: claim raises ServerBusy for a server another live
    process is only after trying for 2 seconds, because a probe of its lock
    (server_alive, as a sweep or fsck makes) holds it for an instant; with
    another process probing all the time, becoming the server still works."""
    code = (f"import sys; from spoolq import Spool\nsp = Spool({sp.root!r})\n"
            "if sys.argv[1] == 'hold':\n    sp.hold_server('s1'); print('ready', flush=True); sys.stdin.read()\n"
            "else:\n    print('ready', flush=True)\n    while True: sp.server_alive('s2')\n")
    holder = subprocess.Popen([sys.executable, "-c", code, "hold"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    prober = subprocess.Popen([sys.executable, "-c", code, "probe"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"ready\n" and prober.stdout.readline() == b"ready\n"
        begun = time.monotonic()
        with pytest.raises(ServerBusy, match="already running"):
            sp.claim("s1")
        assert time.monotonic() - begun >= 2.0  # (a lower bound only: an upper one would be a timing test)
        for _ in range(200):  # each a moment the prober may hold the lock
            sp.hold_server("s2")
            sp.release_server("s2")
    finally:
        prober.kill()
        holder.stdin.close()
        holder.wait(timeout=60)
        prober.wait(timeout=60)


def test_recover_server_hands_back_free_and_abandons_started(sp: Spool) -> None:
    sp.enqueue("Z", "run", 1)
    sp.enqueue("Z", "sched", 1)
    claim_in_dead_process(sp, "s9", "run", start=True)
    claim_in_dead_process(sp, "s9", "sched", start=False)
    result = sweeps.recover_server(sp, "s9")
    assert actions(result) == [("Z", "run", "reenqueued"), ("Z", "sched", "reenqueued")]
    assert sp.status("Z", "sched").doc["restarts"] == 0
    assert sp.status("Z", "run").doc["restarts"] == 1
    assert sp.server_alive("s9")  # this process is s9 now


def test_recover_server_keep_scheduled(sp: Spool) -> None:
    sp.enqueue("Z", "sched", 1)
    claim_in_dead_process(sp, "s9", "sched", start=False)
    assert sweeps.recover_server(sp, "s9", keep_scheduled=True) == []
    assert sp.status("Z", "sched").state == State.SCHEDULED


# ----------------------------------------------------------------------------- interrupted transitions


def _crash_at(root: str, point: str, script: str) -> None:
    env = dict(os.environ, SPOOLQ_CRASH_AT=point)
    code = f"from spoolq import Spool, State\nsp = Spool({root!r})\n{script}\n"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()


def test_a_claim_interrupted_right_after_its_move_is_reenqueued(sp: Spool) -> None:
    sp.enqueue("Z", "a", 1)
    before = sp.status("Z", "a").doc["claim"]
    _crash_at(sp.root, "claim.renamed", "sp.claim('dead')")
    assert Path(sp.root, "scheduled", "dead", "Z:a").is_dir()
    # Stored: still ENQUEUED; read: the dead server's claim (a claim is its move).
    assert json.loads(Path(sp.root, "scheduled", "dead", "Z:a", "status.json").read_text())["state"] == "ENQUEUED"
    info = sp.status("Z", "a")
    assert (info.state, info.doc["server"], info.doc["claim"]) == (State.SCHEDULED, "dead", before + 1)
    result = sweeps.reenqueue_zombies(sp)
    assert actions(result) == [("Z", "a", "reenqueued")]
    info = sp.status("Z", "a")
    assert info.doc["restarts"] == 0 and info.doc["claim"] == before + 1
    assert [r.state for r in sp.log_records("Z", "a")] == [State.ENQUEUED, State.SCHEDULED, State.ENQUEUED]
    assert sp.claim("s1").number == before + 2


def test_a_start_interrupted_between_its_move_and_its_status_write_is_reenqueued_uncharged(sp: Spool) -> None:
    sp.enqueue("Z", "a", 1)
    # moves: the claim's (not marked: claim.renamed), the start's (1)
    _crash_at(sp.root, "move.renamed", "c = sp.claim('s1'); sp.start(c)")
    assert Path(sp.root, "running", "Z:a").is_dir()
    assert sp.status("Z", "a").state == State.ENQUEUED  # a claim not recorded, in running/
    assert actions(sweeps.reenqueue_zombies(sp)) == [("Z", "a", "reenqueued")]
    info = sp.status("Z", "a")
    assert Path(info.path).parent.name == "enqueued" and info.doc["restarts"] == 0 and info.doc["starts"] == 0
    claim = sp.claim("s2")
    assert claim.id == "a"
    assert sp.start(claim).input == 1


def test_a_finish_interrupted_before_its_move_is_completed(sp: Spool) -> None:
    sp.enqueue("Z", "a", 1)
    _crash_at(sp.root, "finish.status_written", "c = sp.claim('dead'); sp.start(c); sp.set_state(c, State.FINISHED)")
    assert Path(sp.root, "running", "Z:a").is_dir()
    assert actions(sweeps.reenqueue_zombies(sp)) == [("Z", "a", "finished move")]
    info = sp.status("Z", "a")
    assert info.state == State.FINISHED and Path(info.path).parent.name == "done"


def test_a_reenqueue_interrupted_before_its_move_is_completed(sp: Spool) -> None:
    sp.enqueue("Z", "a", 1)
    # status writes: the start (1, recording the claim too), the re-enqueue (2)
    _crash_at(sp.root, "status.replaced@2", "c = sp.claim('s1'); sp.start(c); sp.abandon(c, 'x')")
    assert Path(sp.root, "running", "Z:a").is_dir()
    assert sp.status("Z", "a").state == State.ENQUEUED
    assert actions(sweeps.reenqueue_zombies(sp)) == [("Z", "a", "reenqueued")]
    assert Path(sp.root, "enqueued", "Z:a").is_dir()
    assert sp.claim("s2").id == "a"


# ----------------------------------------------------------------------------- retirement


def test_terminal_tasks_are_retired_after_their_retention(sp: Spool, clock) -> None:
    ok = started(sp, "ok")
    sp.set_state(ok, State.FINISHED)
    bad = started(sp, "bad")
    sp.set_state(bad, State.FAILED)
    running = started(sp, "running")
    clock.advance(600)
    assert sweeps.delete_retired(sp) == []
    clock.advance(1)
    assert actions(sweeps.delete_retired(sp)) == [("Z", "bad", "retired"), ("Z", "ok", "retired")]
    for i in ("ok", "bad"):
        with pytest.raises(TaskNotFound):
            sp.status("Z", i)
    assert sp.status("Z", "running").state == State.RUNNING  # never retired
    assert os.listdir(Path(sp.root, "tmp")) == []
    del running


def test_a_retirement_pass_goes_one_task_at_a_time_and_may_stop_between_any_two(sp: Spool, clock) -> None:
    for i in range(3):
        sp.set_state(started(sp, f"r{i}"), State.FINISHED)
    clock.advance(601)
    young = started(sp, "young2")
    sp.set_state(young, State.FINISHED)
    steps = sweeps.retire_steps(sp)
    first = next(a for a in steps if a is not None)  # None: an entry looked at and kept
    assert (first.type, first.action) == ("Z", "retired")
    done = sorted(os.listdir(Path(sp.root, "done")))
    assert len(done) == 3 and "Z:young2" in done  # one retired so far, nothing else touched
    steps.close()  # stopped midway: the rest stays, and the next pass finds it
    assert sorted(os.listdir(Path(sp.root, "done"))) == done
    assert len(sweeps.delete_retired(sp)) == 2
    assert os.listdir(Path(sp.root, "done")) == ["Z:young2"]


def test_a_long_retirement_pass_reads_the_clock_at_each_task(make_spool, tmp_path) -> None:
    """A pass spread over minutes meets tasks finished after it began: they
    are not taken for tasks from the future (a clock stepped back), which
    would restamp them and log a warning."""
    base = time.time() - 10_000  # every time here is long past for the real clock
    ticks = {"armed": False, "n": 0}

    def clock() -> float:
        """base until armed; then 0, 120, 240 ... s later, one step a reading."""
        if not ticks["armed"]:
            return base
        ticks["n"] += 1
        return base + 120.0 * (ticks["n"] - 1)

    sp = make_spool(clock=clock)
    for name in ("a", "b"):
        task = Path(sp.root, "done", f"T:{name}")
        task.mkdir()
        when = base + 90  # finished 90 s after the pass began: in the future only for its first look
        os.utime(task, (when, when))
    ticks["armed"] = True  # the pass begins: 0 s for its first reading
    steps = sweeps.retire_steps(sp)
    assert list(steps) == [None, None]  # kept (retention 600 s)
    restamped = [e.name for e in os.scandir(Path(sp.root, "done")) if e.stat().st_mtime > base + 1_000]
    assert len(restamped) == 1, restamped  # only the first, looked at when the clock said 0 s


def test_retention_counts_from_the_finish_not_the_enqueue(sp: Spool, clock) -> None:
    claim = started(sp, "a")
    clock.advance(550)
    sp.set_state(claim, State.FINISHED)
    clock.advance(590)
    assert sweeps.delete_retired(sp) == []


def test_retention_zero_or_less_keeps_tasks_forever(sp: Spool, clock) -> None:
    sp.register_type("K", "atp_demo.handler", retention=0)
    sp.register_type("K2", "atp_demo.handler", retention=-1)
    for t in ("K", "K2"):
        sp.enqueue(t, "a", 1)
        claim = sp.claim("s1", names=[f"{t}:a"])
        sp.start(claim)
        sp.set_state(claim, State.FINISHED)
    clock.advance(100 * 365 * 86400)
    assert sweeps.delete_retired(sp) == []
    assert sp.status("K", "a").state == sp.status("K2", "a").state == State.FINISHED


# ----------------------------------------------------------------------------- tmp/


def test_a_crash_mid_enqueue_leaves_no_task_and_clean_tmp_removes_the_stage(sp: Spool, clock) -> None:
    _crash_at(sp.root, "enqueue.staged", "sp.enqueue('Z', 'a', [1, 2])")
    with pytest.raises(TaskNotFound):
        sp.status("Z", "a")
    assert os.listdir(Path(sp.root, "enqueued")) == []
    stages = os.listdir(Path(sp.root, "tmp"))
    assert len(stages) == 1 and stages[0].startswith("Z:a.")
    assert sweeps.clean_tmp(sp, grace=900) == 0  # maybe still being written: kept
    clock.advance(901)
    assert sweeps.clean_tmp(sp, grace=900) == 1
    assert os.listdir(Path(sp.root, "tmp")) == []
    sp.enqueue("Z", "a", [1, 2])  # the id is free
    assert sp.status("Z", "a").state == State.ENQUEUED


def test_cleaning_tmp_goes_one_entry_at_a_time_and_may_stop_between_any_two(sp: Spool) -> None:
    tmp = Path(sp.root, "tmp")
    for i in range(3):
        (tmp / f".trash.{i}").mkdir()  # an interrupted delete's leftover: removed at once
    steps = sweeps.clean_tmp_steps(sp)
    assert next(steps) is True
    assert len(os.listdir(tmp)) == 2
    steps.close()
    assert len(os.listdir(tmp)) == 2
    pass_steps = list(sweeps.sweep_steps(sp))  # the daemon's pass: a step per entry of tmp/ too
    assert pass_steps.count(None) >= 2 and os.listdir(tmp) == []


def test_clean_tmp_removes_trash_at_once_and_young_stages_never(sp: Spool) -> None:
    tmp = Path(sp.root, "tmp")
    (tmp / ".trash.Z:x.abc").mkdir()
    (tmp / ".trash.Z:x.abc" / "status.json").write_text("{}")
    (tmp / "Z:y.123.abcdef").mkdir()
    os.symlink("/etc", tmp / ".trash.link")
    assert sweeps.clean_tmp(sp, grace=900) == 2
    assert sorted(os.listdir(tmp)) == ["Z:y.123.abcdef"]
    assert Path("/etc").is_dir()
