"""The worker daemon, run as a real process on a real spool."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from spoolq import Spool, State

HERE = Path(__file__).parent
FINAL = (State.FINISHED, State.FAILED)


def wait_until(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class Workers:
    """Starts worker processes and makes sure none outlives its test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen] = []

    def start(self, server: str = "server1", env: dict | None = None, **options) -> subprocess.Popen:
        options.setdefault("heartbeat_interval", 0.3)
        options.setdefault("sweep_interval", 0.5)
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join([str(HERE), full_env.get("PYTHONPATH", "")])
        full_env["SPOOLQ_TEST_SERVER"] = server
        full_env.pop("NOTIFY_SOCKET", None)
        full_env.update(env or {})
        # stderr goes to a file: a pipe nobody reads fills up (64 KiB, a few
        # hundred tasks' log lines) and then blocks the daemon's logging.
        log_path = self.root.parent / f"{server}.{len(self.procs)}.log"
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(
                [sys.executable, str(HERE / "worker_runner.py"), str(self.root), server, json.dumps(options)],
                env=full_env,
                stderr=log_file,
            )
        proc.log_path = log_path  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


@pytest.fixture
def env(tmp_path):
    root = tmp_path / "spool"
    spool = Spool.init(root, durable=False)
    workers = Workers(root)
    yield spool, workers, tmp_path
    workers.stop_all()


def register(spool: Spool, name: str, handler: str, **kw) -> None:
    spool.register_type(name, f"daemon_handlers.{handler}", **kw)


def state(spool: Spool, type_name: str, task_id: str) -> State:
    return spool.status(type_name, task_id).state


def all_final(spool: Spool, pairs) -> bool:
    return all(state(spool, t, i) in FINAL for t, i in pairs)


def records(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines()]


def stop(proc: subprocess.Popen, timeout: float = 30) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout)
    return code, stderr_of(proc)


def stderr_of(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text()  # type: ignore[attr-defined]


def test_fifo_order_with_one_slot(env):
    spool, workers, tmp = env
    register(spool, "T", "noop")
    rec = tmp / "runs"
    ids = [f"t{i:02d}" for i in range(12)]
    for task_id in ids:
        spool.enqueue("T", task_id, {"record": str(rec)})
    workers.start(concurrency=1)
    wait_until(lambda: all_final(spool, [("T", i) for i in ids]), what="all tasks final")
    started = [r[1].split(":")[1] for r in records(rec) if r[0] == "start"]
    assert started == ids


def test_concurrency_limit_holds_and_is_used(env):
    spool, workers, tmp = env
    register(spool, "T", "sleep")
    rec = tmp / "runs"
    ids = [f"t{i}" for i in range(6)]
    for task_id in ids:
        spool.enqueue("T", task_id, {"record": str(rec), "seconds": 0.4})
    workers.start(concurrency=2)
    wait_until(lambda: all_final(spool, [("T", i) for i in ids]), what="all tasks final")
    running, peak = 0, 0
    for event, *_ in records(rec):
        running += 1 if event == "start" else -1
        peak = max(peak, running)
    assert peak == 2
    assert all(state(spool, "T", i) == State.FINISHED for i in ids)


def test_every_failure_mode_gets_a_final_state(env):
    spool, workers, _ = env
    cases = {
        "ok": ("add", State.FINISHED, ""),
        "boom": ("boom", State.FAILED, "ValueError: boom"),
        "abort": ("abort", State.FAILED, "handler process died of signal SIGABRT"),
        "exit3": ("exit3", State.FAILED, "handler called sys.exit(3)"),
        "exit0": ("exit0", State.FINISHED, ""),
        "hardexit": ("hard_exit", State.FAILED, "handler process exited with status 0 without finishing the task"),
        "paused": ("pause_then_return", State.FINISHED, ""),
    }
    for name, (handler, _, _) in cases.items():
        register(spool, name, handler)
        spool.enqueue(name, "t1", [1, 2, 3])
    spool.register_type("noimport", "no_such_module_xyz.handler")
    spool.enqueue("noimport", "t1", None)
    spool.register_type("noattr", "daemon_handlers.no_such_function")
    spool.enqueue("noattr", "t1", None)
    proc = workers.start(concurrency=3)
    wait_until(lambda: all_final(spool, [(n, "t1") for n in cases]), what="all tasks final")
    for name, (_, expected, message) in cases.items():
        info = spool.status(name, "t1")
        assert info.state == expected, (name, info.doc)
        assert info.doc["message"] == message, name
    assert spool.response("ok", "t1") == (b"6", "text/plain")
    boom_log = spool.log_records("boom", "t1")
    assert "Traceback" in boom_log[-2].message and 'raise ValueError("boom")' in boom_log[-2].message
    assert [r.state for r in spool.log_records("paused", "t1")] == [
        State.ENQUEUED, State.SCHEDULED, State.RUNNING, State.PAUSED, State.PAUSED, State.FINISHED,
    ]
    # A handler that does not import is a deployment error: its tasks wait
    # (never started) until it imports (tests/test_hardening.py).
    wait_until(lambda: stderr_of(proc).count("cannot be imported") == 2, what="both import errors said")
    for name in ("noimport", "noattr"):
        info = spool.status(name, "t1")
        assert info.state == State.ENQUEUED and info.doc["starts"] == 0, info.doc
    assert proc.poll() is None, "the daemon must survive every handler failure"
    code, err = stop(proc)
    assert code == 0
    assert "Traceback" not in err
    # Its "started" line is followed by one that says it went back (it said
    # RUNNING and nothing more, so a trace by task told the wrong story).
    assert "handed back noimport:t1, not started: its handler does not import here" in err, err


def test_timeout_kills_the_process_group_and_restarts_are_limited(env):
    spool, workers, tmp = env
    register(spool, "H", "hang_with_grandchild", timeout=1, max_restarts=1)
    pidfile = tmp / "grandchild.pid"
    spool.enqueue("H", "t1", {"pidfile": str(pidfile)})
    proc = workers.start()
    first = int(wait_until(lambda: pidfile.exists() and pidfile.read_text(), what="grandchild pid"))
    wait_until(lambda: state(spool, "H", "t1") == State.FAILED, timeout=30, what="FAILED after restarts")
    # The daemon says it gave up in the task's own words (it said "no
    # restarts left" where the task said "gave up after 2 start(s)").
    wait_until(lambda: "failed H:t1: timed out after 1 s; gave up" in stderr_of(proc), what="the daemon's line")

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie (reparented, not yet reaped) counts as dead.
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
        except FileNotFoundError:
            return True

    wait_until(lambda: gone(first), what="grandchild killed with its group")
    info = spool.status("H", "t1")
    assert info.doc["starts"] == 2 and info.doc["restarts"] == 1
    assert "timed out after 1 s" in info.doc["message"] and "2 start(s)" in info.doc["message"]
    messages = [r.message for r in spool.log_records("H", "t1") if r.state == State.ENQUEUED]
    assert any("timed out after 1 s" in m for m in messages)


def test_sigterm_hands_back_a_long_task_without_charging_it(env):
    spool, workers, tmp = env
    register(spool, "H", "hang", max_restarts=0)
    rec = tmp / "runs"
    spool.enqueue("H", "t1", {"record": str(rec)})
    proc = workers.start(grace=0.5)
    wait_until(lambda: records(rec), what="handler started")
    code, err = stop(proc)
    assert code == 0, err
    info = spool.status("H", "t1")
    assert info.state == State.ENQUEUED
    assert info.doc["restarts"] == 0
    assert "interrupted: server server1 stopped" in info.doc["message"]
    # and the handler process is gone with it
    pid = int(records(rec)[0][3])
    wait_until(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2])


def test_sigterm_lets_a_short_task_finish_within_grace(env):
    spool, workers, tmp = env
    register(spool, "S", "sleep")
    rec = tmp / "runs"
    spool.enqueue("S", "t1", {"record": str(rec), "seconds": 1.0})
    spool.enqueue("S", "t2", {"record": str(rec), "seconds": 1.0})
    proc = workers.start(grace=20)
    wait_until(lambda: records(rec), what="handler started")
    code, _ = stop(proc)
    assert code == 0
    assert state(spool, "S", "t1") == State.FINISHED
    assert state(spool, "S", "t2") == State.ENQUEUED  # never claimed after the signal


def test_kill9_then_restart_recovers_and_charges_one_restart(env):
    spool, workers, tmp = env
    register(spool, "H", "hang_first_time", max_restarts=2)
    rec = tmp / "runs"
    spool.enqueue("H", "t1", {"record": str(rec), "marker": str(tmp / "marker")})
    proc = workers.start()
    wait_until(lambda: records(rec), what="first run started")
    handler_pid = int(records(rec)[0][3])
    proc.kill()
    proc.wait(10)
    # The handler dies with its daemon (PR_SET_PDEATHSIG): no second copy can overlap.
    wait_until(lambda: not Path(f"/proc/{handler_pid}").exists(), what="handler died with the daemon")
    assert state(spool, "H", "t1") == State.RUNNING
    workers.start()
    wait_until(lambda: state(spool, "H", "t1") == State.FINISHED, what="finished after recovery")
    info = spool.status("H", "t1")
    assert info.doc["starts"] == 2 and info.doc["restarts"] == 1
    assert any("restarted while it ran" in r.message for r in spool.log_records("H", "t1"))


def test_a_second_worker_with_the_same_server_id_is_refused(env):
    spool, workers, _ = env
    first = workers.start()
    wait_until(lambda: spool.server_alive("server1"), what="first worker up")
    second = workers.start()
    assert second.wait(20) == 78
    assert "already running" in stderr_of(second)
    assert first.poll() is None


def test_two_servers_share_500_tasks_each_run_exactly_once(env):
    spool, workers, tmp = env
    register(spool, "N", "noop")
    rec = tmp / "runs"
    a = workers.start("server1", concurrency=2)
    b = workers.start("server2", concurrency=2)
    ids = [f"t{i:03d}" for i in range(500)]
    for task_id in ids:
        spool.enqueue("N", task_id, {"record": str(rec)})
    try:
        wait_until(lambda: spool.counts()["FINISHED"] == 500, timeout=240, what="500 finished")
    except AssertionError:
        stuck = [(t.id, t.state.name, t.path) for t in spool.list_tasks() if t.state != State.FINISHED]
        for proc in (a, b):
            proc.kill()
        logs = [stderr_of(proc)[-3000:] for proc in (a, b)]
        raise AssertionError(f"not all finished: {spool.counts()} {stuck[:10]} {logs}") from None
    starts = [r for r in records(rec) if r[0] == "start"]
    per_task = Counter(r[1] for r in starts)
    assert len(per_task) == 500 and set(per_task.values()) == {1}
    per_server = Counter(r[2] for r in starts)
    assert set(per_server) == {"server1", "server2"}
    for proc in (a, b):
        assert stop(proc)[0] == 0


def test_wakes_on_a_plain_mv_of_a_complete_task_directory(env):
    spool, workers, tmp = env
    register(spool, "T", "add")
    proc = workers.start(rescan_interval=3600)  # only the file event can wake it
    wait_until(lambda: spool.server_alive("server1"))
    # Build a complete task in another spool on the same filesystem, then mv it in.
    other = Spool.init(tmp / "other", durable=False)
    register(other, "T", "add")
    other.enqueue("T", "moved", [2, 3])
    os.rename(other.locate("T", "moved"), spool.root + "/enqueued/T:moved")
    wait_until(lambda: state(spool, "T", "moved") == State.FINISHED, timeout=10, what="woken by inotify")
    assert spool.response("T", "moved")[0] == b"5"
    assert stop(proc)[0] == 0


def test_poll_mode_finds_work_by_rescanning(env):
    spool, workers, _ = env
    register(spool, "T", "add")
    workers.start(poll=True, rescan_interval=0.2)
    wait_until(lambda: spool.server_alive("server1"))
    spool.enqueue("T", "p1", [1])
    wait_until(lambda: state(spool, "T", "p1") == State.FINISHED, what="found by rescan")


def test_deleting_a_running_task_stops_its_handler(env):
    spool, workers, tmp = env
    register(spool, "H", "hang")
    rec = tmp / "runs"
    spool.enqueue("H", "t1", {"record": str(rec)})
    proc = workers.start()
    wait_until(lambda: records(rec), what="handler started")
    pid = int(records(rec)[0][3])
    spool.delete("H", "t1")
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), what="handler killed")
    assert proc.poll() is None


def test_drain_finishes_what_runs_and_claims_nothing_more(env):
    spool, workers, tmp = env
    register(spool, "S", "sleep")
    rec = tmp / "runs"
    spool.enqueue("S", "t1", {"record": str(rec), "seconds": 1.0})
    proc = workers.start()
    wait_until(lambda: records(rec), what="first task started")
    spool.enqueue("S", "t2", {"record": str(rec), "seconds": 1.0})
    drain = subprocess.run(
        [sys.executable, "-c",
         "import sys; from spoolq.worker import run_worker; sys.exit(run_worker(sys.argv[1], 'server1', drain=True))",
         spool.root],
        capture_output=True, text=True, timeout=60,
    )
    assert drain.returncode == 0, drain.stderr
    assert proc.wait(20) == 0
    assert state(spool, "S", "t1") == State.FINISHED
    assert state(spool, "S", "t2") == State.ENQUEUED


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_sd_notify_ready_status_watchdog_stopping(env, abstract):
    spool, workers, tmp = env
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"spoolq-test-{os.getpid()}-{time.monotonic_ns()}"
        sock.bind("\0" + name)
        address = "@" + name
    else:
        address = str(tmp / "notify.sock")
        sock.bind(address)
    sock.settimeout(0.2)
    messages: list[str] = []

    def received(prefix: str) -> bool:
        try:
            while True:
                messages.append(sock.recv(4096).decode())
        except (socket.timeout, BlockingIOError):
            pass
        return any(line.startswith(prefix) for m in messages for line in m.split("\n"))

    proc = workers.start(env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"})
    wait_until(lambda: received("READY=1"), what="READY=1")
    ready = next(m for m in messages if "READY=1" in m)
    assert "STATUS=0/1 running, 0 queued" in ready and f"MAINPID={proc.pid}" in ready
    wait_until(lambda: received("WATCHDOG=1"), what="WATCHDOG=1")
    watchdogs_before = sum(m.count("WATCHDOG=1") for m in messages)
    wait_until(lambda: received("WATCHDOG=1") and sum(m.count("WATCHDOG=1") for m in messages) >= watchdogs_before + 2,
               what="repeated WATCHDOG=1 while idle")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    wait_until(lambda: received("STOPPING=1"), what="STOPPING=1")
    sock.close()


def test_ready_comes_before_the_first_pass_over_a_backlog_and_claims_wait_for_its_end(env, tmp_path):
    """The first rescan of enqueued/ (an lstat and a status read per task:
    tens of seconds for a few hundred thousand with a cold cache) is spread
    over the loop's turns, so READY and the watchdog do not wait for it (a
    start-up past WatchdogSec or TimeoutStartSec would get the daemon killed); no
    task is claimed before the pass has seen them all, so the first to start
    is still the first in the queue."""
    spool, workers, _ = env
    register(spool, "T", "noop")
    n = 2000
    rec = tmp_path / "runs"
    spool.enqueue_many("T", [{"id": f"t{i}", "input": {"record": str(rec)}} for i in range(n)])
    spool.enqueue("T", "urgent", {"record": str(rec)}, priority=10)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = str(tmp_path / "notify.sock")
    sock.bind(address)
    sock.settimeout(20)
    proc = workers.start(env={"NOTIFY_SOCKET": address}, concurrency=1, pass_slice=0.001)
    ready = ""
    while "READY=1" not in ready:
        ready = sock.recv(4096).decode()
    sock.close()
    queued = int(ready.split(" running, ")[1].split(" queued")[0])
    assert queued < n + 1, ready  # ready before the pass had indexed the backlog
    assert "queued so far (scanning)" in ready, ready  # and says the count is partial
    wait_until(lambda: rec.exists() and len(rec.read_text().splitlines()) >= 4, what="two tasks run")
    assert rec.read_text().split()[1] == "T:urgent"  # the first started is the first in the queue
    assert stop(proc)[0] == 0


def test_no_notify_socket_means_nothing_is_sent_and_it_still_works(env):
    spool, workers, _ = env
    register(spool, "T", "add")
    proc = workers.start()
    spool.enqueue("T", "n1", [4])
    wait_until(lambda: state(spool, "T", "n1") == State.FINISHED)
    assert stop(proc)[0] == 0


def test_handler_processes_are_recycled_after_max_tasks_per_child(env):
    spool, workers, tmp = env
    register(spool, "T", "noop")
    rec = tmp / "runs"
    ids = [f"t{i}" for i in range(6)]
    for task_id in ids:
        spool.enqueue("T", task_id, {"record": str(rec)})
    proc = workers.start(concurrency=1, max_tasks_per_child=2)
    wait_until(lambda: all_final(spool, [("T", i) for i in ids]), what="all tasks final")
    pids = [r[3] for r in records(rec) if r[0] == "start"]
    # one slot at a time, replaced after every 2 tasks: 3 processes, 2 tasks each
    assert len(set(pids)) == 3 and Counter(pids).most_common(1)[0][1] == 2, pids
    assert all(state(spool, "T", i) == State.FINISHED for i in ids)
    assert stop(proc)[0] == 0


def copy_finished_task(spool: Spool, template: str, type_name: str, count: int, *, age: float) -> None:
    """*count* copies of the finished task *template* (a name in done/), as
    TYPE:old<i>, all of them and the template finished *age* seconds ago: a
    backlog of expired tasks made in a second instead of a full lifecycle
    each."""
    done = Path(spool.root, "done")
    files = {p.name: p.read_bytes() for p in (done / template).iterdir()}
    when = time.time() - age
    os.utime(done / template, (when, when))
    for i in range(count):
        task = done / f"{type_name}:old{i}"
        task.mkdir()
        for name, data in files.items():
            (task / name).write_bytes(data)
        os.utime(task, (when, when))


def test_a_long_retirement_pass_does_not_hold_up_new_tasks(env):
    """Thousands of tasks expiring together are retired a slice at a time
    between the loop's other duties: a task enqueued meanwhile starts at
    once. (The whole pass used to run in one turn: the task waited for all of
    it, and a pass longer than WatchdogSec would get the daemon killed.)"""
    spool, workers, _ = env
    register(spool, "T", "noop")
    register(spool, "O", "noop", retention=1)
    spool.enqueue("O", "template", None)
    claim = spool.claim("elsewhere")
    spool.start(claim)
    spool.set_state(claim, State.FINISHED)
    n = 3000
    copy_finished_task(spool, "O:template", "O", n, age=100)
    done = Path(spool.root, "done")
    proc = workers.start(sweep_interval=3600, pass_slice=0.01)
    wait_until(lambda: len(os.listdir(done)) <= n, what="the retirement pass to begin")
    spool.enqueue("T", "probe", None)
    wait_until(lambda: state(spool, "T", "probe") == State.FINISHED, what="the probe task to finish")
    wait_until(lambda: os.listdir(done) == ["T:probe"], timeout=120, what="the retirement pass to end")
    code, log_text = stop(proc)
    assert code == 0, log_text
    lines = log_text.splitlines()
    started = next(i for i, line in enumerate(lines) if "started T:probe" in line)
    retired_later = sum("sweep: retired O:" in line for line in lines[started:])
    assert retired_later > 0, "the probe started only after the whole pass"
    assert sum("sweep: retired O:" in line for line in lines) == n + 1


def test_a_worker_refused_an_inotify_watch_rescans_often_and_watches_again_when_it_can(env):
    """Each Spool.wait() of a busy web process holds an inotify instance;
    past the per-user limit, a worker started then lost its watch for good
    and saw each new task only at its 30 s rescan (an outside tester: 28-30 s
    for every task, until the worker was restarted)."""
    import ctypes

    spool, workers, tmp = env
    register(spool, "T", "noop")
    libc = ctypes.CDLL(None, use_errno=True)
    held = []
    try:
        while len(held) < 10_000:  # every instance this user may have
            fd = libc.inotify_init1(os.O_CLOEXEC)
            if fd < 0:
                break
            held.append(fd)
        proc = workers.start()  # rescan_interval: the default 30 s
        wait_until(lambda: "cannot create an inotify instance" in stderr_of(proc), what="the refused watch")
        wait_until(lambda: "ready on" in stderr_of(proc), what="the worker ready")
        spool.enqueue("T", "unwatched", {})
        # Seen by a rescan a second later, not 30 s later.
        wait_until(lambda: state(spool, "T", "unwatched") == State.FINISHED, timeout=15, what="the task seen")
    finally:
        for fd in held:
            os.close(fd)
    wait_until(lambda: "watching" in stderr_of(proc) and "again: new tasks are seen at once" in stderr_of(proc),
               timeout=15, what="the watch set again")
    spool.enqueue("T", "watched", {})
    wait_until(lambda: state(spool, "T", "watched") == State.FINISHED, timeout=15, what="the next task")


def test_sigterm_before_the_worker_is_ready_is_a_clean_exit_0(env):
    """A SIGTERM in a worker's first half second (before the daemon set its
    own handlers) ended it by the signal, exit 143, which a unit or a script
    counts as a failure. Here the second `spoolq worker` waits, before it is
    ready, for a draining server of the same name."""
    spool, workers, tmp = env
    register(spool, "H", "hang")
    rec = tmp / "runs"
    spool.enqueue("H", "t1", {"record": str(rec)})
    first = workers.start(grace=0.5)
    wait_until(lambda: records(rec), what="handler started")
    env_vars = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    waiting = subprocess.Popen([sys.executable, "-m", "spoolq", "--root", spool.root, "worker", "server1", "--drain"],
                               env=env_vars, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: "drain" in stderr_of(first) or "draining" in stderr_of(first), what="the first drains")
        waiting.send_signal(signal.SIGTERM)
        _, err = waiting.communicate(timeout=30)
        assert waiting.returncode == 0, err
        assert err.decode().strip().endswith("spoolq: stopped before the worker was ready"), err
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
        first.kill()
        first.wait()


def test_delete_of_a_running_task_returns_once_its_handler_is_stopped(env):
    """`spoolq delete` of a running task returned while its handler still ran
    (for some 40 ms): the task enqueued again at once under the same id ran
    beside the old run, 6 times out of 6 (an outside tester)."""
    spool, workers, tmp = env
    register(spool, "H", "hang")
    rec = tmp / "runs"
    spool.enqueue("H", "t1", {"record": str(rec)})
    workers.start()
    wait_until(lambda: records(rec), what="handler started")
    pid = int(records(rec)[0][3])
    spool.delete("H", "t1")

    def stopped() -> bool:
        """Gone, a zombie, or exiting (PF_EXITING, 0x4, in stat's flags:
        killed, its files closed, no more of its code runs)."""
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            return True
        return fields[0] in ("Z", "X") or bool(int(fields[6]) & 0x4)

    assert stopped(), "the handler still runs after delete returned"


def test_a_run_whose_task_was_deleted_and_enqueued_again_is_stopped(env):
    """A frozen worker could not stop its run while `delete` waited, so the
    delete gave up after 10 s; the same id enqueued again then ran under
    another worker, and the old run, once its worker woke, was left beside
    it for good: its task's name was in running/ again (an outside tester)."""
    spool, workers, tmp = env
    register(spool, "H", "hang")
    rec = tmp / "runs"
    spool.enqueue("H", "t1", {"record": str(rec)})
    first = workers.start("w1")
    wait_until(lambda: records(rec), what="the first run")
    old = int(records(rec)[0][3])
    first.send_signal(signal.SIGSTOP)
    try:
        assert spool.delete("H", "t1") is True  # gave up waiting after 10 s: the worker is frozen
        spool.enqueue("H", "t1", {"record": str(rec)})
        workers.start("w2")
        wait_until(lambda: len(records(rec)) == 2, what="the new life running")
    finally:
        first.send_signal(signal.SIGCONT)

    def gone(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except FileNotFoundError:
            return True

    wait_until(lambda: gone(old), timeout=15, what="the old run stopped")
    assert spool.status("H", "t1").state == State.RUNNING  # the new life goes on
