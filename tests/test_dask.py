"""The dask executor against a real LocalCluster of worker *processes* started
here, with real worker daemons on real spools (contract §13.2, docs/scale-out.md).

One cluster (2 workers, 1 thread each) serves the module; the test that kills
a Dask worker runs after the others that use it (the nanny replaces it). The
cluster runs in a process of its own (tests/dask_cluster.py): Dask's threads
in the pytest process would race CPython 3.11's ast module (the architecture
test's ast.parse failed with "AST constructor recursion depth mismatch").
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

try:
    import distributed  # noqa: F401  (part of the test extra: CI installs it; never skip silently)
except ImportError:  # pragma: no cover
    pytest.fail("distributed is missing: pip install '.[test]' (the dask executor's tests need it)",
                allow_module_level=True)

from spoolq import Spool, State  # noqa: E402
from test_daemon import HERE, env, stderr_of, stop, wait_until  # noqa: E402,F401 (env: the daemon tests' fixture)

FINAL = (State.FINISHED, State.FAILED)


class Cluster:
    """A LocalCluster in a process of its own (tests/dask_cluster.py)."""

    def __init__(self, workers: int, port: int = 0, tmpdir: Path | None = None) -> None:
        # The checkout and tests/ first on the path of the cluster and its
        # worker processes: they run this tree's spoolq and the test handlers,
        # whatever copy of spoolq is installed. *tmpdir*, the cluster's TMPDIR
        # (Dask's scratch space goes there too): what the runs leave is seen.
        path = os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])
        environ = dict(os.environ, PYTHONPATH=path)
        if tmpdir is not None:
            environ["TMPDIR"] = str(tmpdir)
        self.tmpdir = tmpdir
        self.proc = subprocess.Popen([sys.executable, str(HERE / "dask_cluster.py"), str(workers), str(port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=environ)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"the Dask cluster did not start (exit {self.proc.wait(30)})")
        self.scheduler_address = json.loads(line)["address"]

    def ask(self, command: str):
        self.proc.stdin.write(command + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return json.loads(self.proc.stdout.readline())  # type: ignore[union-attr]

    def worker_pids(self) -> dict[str, int]:
        return self.ask("pids")

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(2, tmpdir=tmp_path_factory.mktemp("dask-tmp"))
    yield cluster
    cluster.close()


def final(spool, type_name, ids):
    return all(spool.status(type_name, i).state in FINAL for i in ids)


def records(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_200_sequence_sums_give_the_same_responses_and_logs_as_fork_and_ran_on_dask_workers(env, cluster):
    spool, workers, _ = env
    spool.register_type("SeqFork", "atp_demo.handler", timeout=60, retention=600, max_restarts=3)
    spool.register_type("SeqDask", "atp_demo.handler", timeout=60, retention=600, max_restarts=3, executor="dask")
    ids = [f"Task{i:03d}" for i in range(200)]
    for i, task_id in enumerate(ids):
        spool.enqueue("SeqFork", task_id, (1, 2, 3, 4, i))
        spool.enqueue("SeqDask", task_id, (1, 2, 3, 4, i))
    proc = workers.start(concurrency=2, dask_scheduler=cluster.scheduler_address)
    try:
        wait_until(lambda: final(spool, "SeqFork", ids) and final(spool, "SeqDask", ids), timeout=120,
                   what="400 tasks final")
    except AssertionError:
        print(spool.counts(), stderr_of(proc)[-6000:])
        raise
    for task_id in ids:
        fork, dask = spool.status("SeqFork", task_id), spool.status("SeqDask", task_id)
        assert fork.state == dask.state == State.FINISHED, (fork.doc, dask.doc)
        assert spool.response("SeqDask", task_id) == spool.response("SeqFork", task_id)
        assert ([(r.state, r.message) for r in spool.log_records("SeqDask", task_id)]
                == [(r.state, r.message) for r in spool.log_records("SeqFork", task_id)])
    assert spool.response("SeqDask", "Task007") == (b"17.0", "text/xml")
    # Where they ran: the daemon names the Dask worker and its pid for each run.
    ran = re.findall(r"running SeqDask:(\S+) on dask worker (\S+) \(worker pid (\d+), handler pid (\d+)\)",
                     stderr_of(proc))
    pids = cluster.worker_pids()
    assert sorted(r[0] for r in ran) == ids
    assert {r[1] for r in ran} == set(pids), "both Dask workers should have run some"
    assert all(int(r[2]) == pids[r[1]] for r in ran)
    assert proc.pid not in {int(r[2]) for r in ran} | {int(r[3]) for r in ran}
    assert stop(proc)[0] == 0


def test_a_remote_handler_past_its_timeout_is_killed_with_its_children(env, cluster):
    spool, workers, tmp = env
    spool.register_type("Hang", "dask_handlers.hang", timeout=1, max_restarts=0, executor="dask")
    pidfile = tmp / "pids"
    spool.enqueue("Hang", "t1", {"pidfile": str(pidfile)})
    workers.start(dask_scheduler=cluster.scheduler_address)
    handler, grandchild = map(int, wait_until(lambda: pidfile.exists() and pidfile.read_text().split(),
                                              what="handler started"))
    assert not gone(handler) and not gone(grandchild)
    wait_until(lambda: spool.status("Hang", "t1").state == State.FAILED, timeout=20, what="timed out")
    failed_at = time.monotonic()
    wait_until(lambda: gone(handler) and gone(grandchild), timeout=5, what="handler and grandchild killed")
    assert time.monotonic() - failed_at < 5
    info = spool.status("Hang", "t1")
    assert info.doc["message"] == "timed out after 1 s; gave up after 1 start(s)"


def test_limits_apply_in_the_remote_handler_process(env, cluster):
    spool, workers, _ = env
    spool.register_type("Mem", "limit_handlers.allocate", memory_max=64 * 1024**2, executor="dask")
    spool.register_type("Nice", "limit_handlers.report", nice=10, executor="dask")
    spool.enqueue("Mem", "t1", {"bytes": 512 * 1024**2})
    spool.enqueue("Nice", "t1", None)
    workers.start(dask_scheduler=cluster.scheduler_address)
    wait_until(lambda: final(spool, "Mem", ["t1"]) and final(spool, "Nice", ["t1"]), timeout=30, what="final")
    assert spool.status("Mem", "t1").doc["message"] == "memory limit 64M exceeded (MemoryError)"
    report = json.loads(spool.response("Nice", "t1")[0])
    assert report["nice"] == 10 and report["ppid"] in cluster.worker_pids().values()


def test_progress_of_a_remote_handler_reaches_the_task(env, cluster):
    spool, workers, _ = env
    spool.register_type("Prog", "dask_handlers.progress", executor="dask")
    spool.enqueue("Prog", "p1", {"n": 10_000})
    workers.start(dask_scheduler=cluster.scheduler_address)
    wait_until(lambda: final(spool, "Prog", ["p1"]), timeout=30, what="final")
    info = spool.status("Prog", "p1")
    assert info.state == State.FINISHED
    assert info.progress is not None
    assert (info.progress["done"], info.progress["total"], info.progress["message"]) == (10_000, 10_000, "remote done")


def test_output_of_a_remote_handler_reaches_the_task_capped_as_under_fork(env, cluster):
    spool, workers, _ = env
    spool.register_type("Out", "dask_handlers.printer", executor="dask", max_output_bytes=4096)
    spool.enqueue("Out", "small", {"lines": 2})
    spool.enqueue("Out", "big", {"lines": 5000, "fail": True})
    workers.start(dask_scheduler=cluster.scheduler_address)
    wait_until(lambda: final(spool, "Out", ["small", "big"]), timeout=30, what="final")
    assert spool.status("Out", "small").state == State.FINISHED
    assert spool.queries.output("Out", "small") == (b"remote line 000000\nremote line 000001\n"
                                                    b"echo on small\nstderr on big\n").replace(b"big", b"small")
    big = spool.queries.output("Out", "big")
    assert spool.status("Out", "big").state == State.FAILED
    assert big.startswith(b"remote line 000000\n") and big.endswith(b"echo on big\nstderr on big\n")
    assert b"bytes of output left out here]" in big and len(big) <= 4096 + 60


def test_a_remote_task_seen_final_has_its_output_and_output_follow_prints_it_all(env, cluster):
    """The output is applied before the message that makes the task final
    (the follower stops at the final state and reads the file last then);
    a handler that finished its task itself and printed on gets that too."""
    spool, workers, _ = env
    spool.register_type("Out", "dask_handlers.printer", executor="dask")
    spool.enqueue("Out", "plain", {"lines": 3})
    spool.enqueue("Out", "early", {"lines": 2, "succeed_first": True})
    follow = {i: subprocess.Popen([sys.executable, "-m", "spoolq", "--root", spool.root, "output", "Out", i,
                                   "--follow", "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
              for i in ("plain", "early")}
    workers.start(dask_scheduler=cluster.scheduler_address)
    printed = {i: proc.communicate(timeout=90) for i, proc in follow.items()}
    assert [follow[i].returncode for i in follow] == [0, 0], printed
    assert printed["plain"][0] == (b"remote line 000000\nremote line 000001\nremote line 000002\n"
                                   b"echo on plain\nstderr on plain\n"), printed["plain"]
    # What the early one printed after making its task final reaches the
    # file at the run's end; the follower had stopped at the final state.
    whole = (b"before success\nremote line 000000\nremote line 000001\necho on early\nstderr on early\n")
    wait_until(lambda: spool.queries.output("Out", "early") == whole, what="the rest")
    assert whole.startswith(printed["early"][0]), printed["early"]
    assert spool.status("Out", "early").doc["message"] == "done early"


def test_a_remote_runs_end_the_spool_host_cannot_write_is_written_by_the_loop(env, cluster):
    """The spool host's write of a remote run's FINISHED fails once (an I/O
    error: SPOOLQ_FAIL_AT, its second status write, the first being the
    start): the loop writes that end through the claim, as under fork; the
    task does not wait for its timeout."""
    spool, workers, _ = env
    spool.register_type("Out", "dask_handlers.printer", executor="dask", timeout=300)
    spool.enqueue("Out", "t1", {"lines": 1})
    proc = workers.start(dask_scheduler=cluster.scheduler_address,
                         env={"SPOOLQ_FAIL_AT": "status.tmp_written@2"})
    wait_until(lambda: final(spool, "Out", ["t1"]), timeout=30, what="final")
    info = spool.status("Out", "t1")
    assert info.state == State.FINISHED and info.doc["restarts"] == 0, info.doc
    assert spool.queries.output("Out", "t1").startswith(b"remote line 000000\n")
    code, err = stop(proc)
    assert code == 0 and "Traceback" not in err, err
    assert "cannot apply state of Out:t1" in err and "(injected at status.tmp_written)" in err, err
    assert "recording it as FINISHED here" in err, err


def test_the_daemon_killed_with_10_remote_runs_in_flight_then_restarted(env, cluster):
    """Each task ends exactly once in done/; what the lost claims report late
    is refused (and counted); no run overlaps another of the same task."""
    spool, workers, tmp = env
    spool.register_type("Ten", "dask_handlers.timed", max_restarts=2, executor="dask")
    rec = tmp / "runs"
    ids = [f"t{i}" for i in range(10)]
    for task_id in ids:
        spool.enqueue("Ten", task_id, {"record": str(rec), "seconds": 0.6})
    options = {"dask_scheduler": cluster.scheduler_address, "dask_concurrency": 10}
    first = workers.start(**options)
    wait_until(lambda: spool.counts()["RUNNING"] == 10 and records(rec), what="10 runs in flight")
    first.send_signal(signal.SIGSTOP)  # it can no longer read what the runs report
    wait_until(lambda: sum(r[0] == "end" for r in records(rec)) >= 4, timeout=30, what="4 remote runs done")
    first.kill()
    first.wait(10)
    finished_while_dead = {r[1] for r in records(rec) if r[0] == "end"}
    running = {int(r[2]) for r in records(rec) if r[0] == "start"} - {int(r[2]) for r in records(rec) if r[0] == "end"}
    # The remote runs of the dead daemon stop: its client is gone, the scheduler released their tasks.
    wait_until(lambda: all(gone(pid) for pid in running), timeout=10, what="orphaned remote handlers killed")
    assert all(spool.status("Ten", i).state == State.RUNNING for i in ids)
    second = workers.start(**options)
    wait_until(lambda: final(spool, "Ten", ids), timeout=60, what="all 10 final after the restart")
    for task_id in ids:
        info = spool.status("Ten", task_id)
        assert info.state == State.FINISHED and info.doc["restarts"] == 1, info.doc
        states = [r.state for r in spool.log_records("Ten", task_id)]
        assert states.count(State.FINISHED) == 1 and states[-1] == State.FINISHED, states
        assert spool.response("Ten", task_id)[0] == f"done {task_id}".encode()
    # (a final status is written just before the move into done/)
    wait_until(lambda: len(os.listdir(spool.root + "/done")) == 10, what="all 10 in done/")
    refused = re.findall(r"refused a late message from lost claim (\S+) \((\w+)\)", stderr_of(second))
    # Each run that finished while its daemon was dead sent its response and
    # FINISHED (and a log record); all of it arrives late and is refused.
    assert {c.split("#")[0] for c, _ in refused} >= finished_while_dead, (refused, finished_while_dead)
    assert Counter(kind for _, kind in refused)["state"] >= len(finished_while_dead)
    assert not [r for r in records(rec) if r[0] == "overlap"]
    assert stop(second)[0] == 0


def test_a_dask_worker_killed_mid_task_costs_one_restart_and_the_task_finishes(env, cluster):
    spool, workers, tmp = env
    spool.register_type("Slow", "dask_handlers.timed", max_restarts=2, executor="dask")
    rec = tmp / "runs"
    spool.enqueue("Slow", "t1", {"record": str(rec), "seconds": 3})
    proc = workers.start(dask_scheduler=cluster.scheduler_address)
    start = wait_until(lambda: [r for r in records(rec) if r[0] == "start"], what="first run started")[0]
    handler, dask_worker = int(start[2]), int(start[3])
    assert dask_worker in cluster.worker_pids().values()
    os.kill(dask_worker, signal.SIGKILL)
    wait_until(lambda: gone(handler), timeout=10, what="the handler died with its Dask worker")
    wait_until(lambda: spool.status("Slow", "t1").state in FINAL, timeout=60, what="finished after the loss")
    info = spool.status("Slow", "t1")
    assert info.state == State.FINISHED and info.doc["restarts"] == 1, info.doc
    assert any("was lost while it ran the task" in r.message for r in spool.log_records("Slow", "t1"))
    assert not [r for r in records(rec) if r[0] == "overlap"], records(rec)
    assert stop(proc)[0] == 0
    assert cluster.ask("wait 2") == "ok"  # the nanny replaced it
    # The killed run's output directory is not left behind: it was made in
    # the Dask worker's local directory, which Dask purged when the nanny
    # started the replacement (it used to stay in TMPDIR for good).
    assert not list(cluster.tmpdir.glob("spoolq-output-*")), sorted(cluster.tmpdir.iterdir())
    wait_until(lambda: not output_dirs_under(cluster.tmpdir), timeout=10,
               what="no run's output directory left anywhere in the cluster's TMPDIR")


def output_dirs_under(top: Path) -> list[str]:
    """Run output directories anywhere under *top*. os.walk, not rglob: Dask
    removes directories while it is walked, and os.walk skips those."""
    return [os.path.join(d, name) for d, subdirs, _ in os.walk(top) for name in subdirs
            if name.startswith("spoolq-output-")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_scheduler_pauses_dask_types_only_and_the_server_resumes_when_it_comes(env):
    spool, workers, _ = env
    port = free_port()
    spool.register_type("F", "atp_demo.handler")
    spool.register_type("D", "atp_demo.handler", executor="dask")
    spool.enqueue("F", "f1", (1, 2))
    spool.enqueue("D", "d1", (3, 4))
    proc = workers.start(dask_scheduler=f"tcp://127.0.0.1:{port}")
    wait_until(lambda: spool.status("F", "f1").state == State.FINISHED, what="fork task done")
    wait_until(lambda: "not claiming dask tasks: dask scheduler" in stderr_of(proc), timeout=30, what="says so")
    assert spool.status("D", "d1").state == State.ENQUEUED
    late = Cluster(1, port)
    try:
        wait_until(lambda: spool.status("D", "d1").state == State.FINISHED, timeout=60, what="resumed")
        assert "claiming dask tasks again" in stderr_of(proc)
        assert spool.response("D", "d1")[0] == b"7.0"
    finally:
        late.close()
    wait_until(lambda: stderr_of(proc).count("not claiming dask tasks") == 2, timeout=60, what="says so again")
    assert proc.poll() is None
    assert stop(proc)[0] == 0


def test_a_cluster_without_workers_gets_no_task_claimed_for_it(env):
    """Contract §13.2: a dask task is claimed only while the cluster has a
    free thread. With the scheduler up and no worker, one task a server was
    claimed and sat RUNNING, its timeout running, with nothing to run it."""
    spool, workers, _ = env
    spool.register_type("F", "atp_demo.handler")
    spool.register_type("D", "atp_demo.handler", executor="dask")
    bare = Cluster(0)
    try:
        spool.enqueue("D", "d1", (3, 4))
        proc = workers.start(dask_scheduler=bare.scheduler_address)
        # Fork tasks done after it: the loop went round with the scheduler
        # connected (it reads the cluster's threads every second).
        for i in range(3):
            spool.enqueue("F", f"f{i}", (1, 2))
            wait_until(lambda i=i: spool.status("F", f"f{i}").state == State.FINISHED, what="fork task done")
            time.sleep(0.5)  # a window for the wrong claim to happen, not a wait for a right one
        assert spool.status("D", "d1").state == State.ENQUEUED, spool.status("D", "d1").doc
        assert bare.ask("scale 1") == "ok"
        wait_until(lambda: spool.status("D", "d1").state == State.FINISHED, timeout=120, what="run once a worker came")
        assert spool.status("D", "d1").doc["restarts"] == 0
        assert stop(proc)[0] == 0
    finally:
        bare.close()


@pytest.mark.parametrize("address, exit_code, words", [
    ("nope://x", 78, "bad --dask-scheduler"),
    ("tcp://127.0.0.1", 78, "bad --dask-scheduler"),
])
def test_a_bad_scheduler_address_is_a_configuration_error(tmp_path, address, exit_code, words):
    root = tmp_path / "spool"
    Spool.init(root, durable=False)
    done = subprocess.run([sys.executable, "-m", "spoolq", "--root", str(root), "worker", "s1",
                           "--dask-scheduler", address], capture_output=True, text=True, timeout=60)
    assert done.returncode == exit_code, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in done.stderr, done.stderr
