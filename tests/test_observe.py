"""Seeing what tasks do (contract §12.1-12.3): per-task output, follow,
progress. Real worker processes on real spools; the CLI as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import pids_with_cmdline, wait_until

from spoolq import Spool, State
from spoolq.store.output import marker

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FINAL = (State.FINISHED, State.FAILED)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE), env.get("PYTHONPATH", "")])
    env.pop("NOTIFY_SOCKET", None)
    env.pop("JOURNAL_STREAM", None)
    return env


class Env:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.spool = Spool.init(root, durable=False)
        self.procs: list[subprocess.Popen] = []

    def worker(self, server: str = "w1", **options) -> subprocess.Popen:
        options.setdefault("heartbeat_interval", 0.3)
        options.setdefault("sweep_interval", 0.5)
        log = open(self.root.parent / f"{server}.{len(self.procs)}.log", "w")
        proc = subprocess.Popen([sys.executable, str(HERE / "worker_runner.py"), str(self.root), server,
                                 json.dumps(options)], env=_env(), stderr=log)
        proc.log_path = Path(log.name)  # type: ignore[attr-defined]
        log.close()
        self.procs.append(proc)
        return proc

    def cli(self, *args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "spoolq", "--root", str(self.root), *args], env=_env(),
                              capture_output=True, timeout=timeout, **kw)

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "spoolq", "--root", str(self.root), *args], env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def final(self, type_name: str, task_id: str, timeout: float = 60) -> State:
        return wait_until(lambda: (s := self.spool.status(type_name, task_id).state) in FINAL and s, timeout,
                          f"{type_name}/{task_id} final")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path / "spool")
    yield e
    e.stop()


def register(env: Env, name: str, handler: str, **kw) -> None:
    env.spool.register_type(name, f"observe_handlers.{handler}", **kw)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --------------------------------------------------------------------------- output


def test_output_is_capped_keeps_both_ends_and_memory_stays_flat(env):
    cap = 64 << 10
    register(env, "P", "printer", max_output_bytes=cap)
    env.spool.enqueue_json("P", "warm", {"mib": 0})
    daemon = env.worker()
    env.final("P", "warm")
    daemon_before = rss_kib(daemon.pid)
    env.spool.enqueue_json("P", "three", {"mib": 3})
    assert env.final("P", "three") == State.FINISHED
    daemon_after_3 = rss_kib(daemon.pid)
    peak_3 = json.loads(env.spool.response("P", "three")[0])["peak_rss_kib"]

    out = env.cli("output", "P", "three")
    assert out.returncode == 0, out.stderr
    data = out.stdout
    assert len(data) <= cap + len(marker(3 << 20)), len(data)
    lines = data.splitlines()
    assert lines[0] == b"line 00000000 " + b"." * 49  # the first line
    assert b"LAST LINE" in lines  # the handler's last line
    assert b"echo says three" in lines  # a subprocess's output
    assert b"stderr says three" in lines  # fd 2 too
    skipped = [line for line in lines if line.startswith(b"[spoolq: ")]
    assert len(skipped) == 1 and b"bytes of output left out here" in skipped[0]
    # The file itself holds the same; no tail parts are left.
    task_dir = Path(env.spool.status("P", "three").path)
    assert (task_dir / "output").read_bytes() == data
    assert sorted(p.name for p in task_dir.iterdir() if p.name.startswith("output")) == ["output"]

    # Ten times the output: neither the daemon nor the handler process grows with it.
    env.spool.enqueue_json("P", "thirty", {"mib": 30})
    assert env.final("P", "thirty") == State.FINISHED
    daemon_after_30 = rss_kib(daemon.pid)
    peak_30 = json.loads(env.spool.response("P", "thirty")[0])["peak_rss_kib"]
    print(f"daemon RSS: {daemon_before} KiB before, {daemon_after_3} after 3 MiB, {daemon_after_30} after 30 MiB;"
          f" handler process peak RSS {peak_3} KiB after 3 MiB, {peak_30} KiB after 30 MiB")
    assert daemon_after_30 - daemon_before < 4096
    assert peak_30 - peak_3 < 4096
    assert len(env.cli("output", "P", "thirty").stdout) <= cap + len(marker(30 << 20))


def test_output_within_the_cap_is_whole_and_json_has_its_fields(env):
    register(env, "P", "printer")  # default cap: 1 MiB
    env.spool.enqueue_json("P", "small", {"mib": 0})
    env.worker()
    env.final("P", "small")
    plain = env.cli("output", "P", "small").stdout
    assert plain == b"LAST LINE\necho says small\nstderr says small\n"
    doc = json.loads(env.cli("output", "P", "small", "--json").stdout)
    assert doc == {"type": "P", "id": "small", "state": "FINISHED", "bytes": len(plain), "output": plain.decode()}
    types = json.loads(env.cli("types", "--json").stdout)
    assert types[0]["max_output_bytes"] == 1 << 20


def test_a_leftover_that_prints_without_end_neither_holds_the_run_nor_reaches_the_next_task(env):
    """A handler returns and leaves a process printing to its fds 1 and 2
    for ever: the run still ends (the capture takes what the pipe holds, at
    most twice its size, then closes it: the leftover gets EPIPE and the
    runner kills it), the output stays within its cap, and the next task
    run by the same process gets only its own output."""
    cap = 64 << 10
    register(env, "L", "leave_a_printer", max_output_bytes=cap)
    register(env, "S", "say")
    env.spool.enqueue_json("L", "leaves", {})
    env.spool.enqueue_json("S", "next", {"text": "only mine"})
    env.worker(concurrency=1)
    assert env.final("L", "leaves") == State.FINISHED
    assert env.final("S", "next") == State.FINISHED
    out = env.spool.queries.output("L", "leaves")
    assert out.startswith(b"before\n") and len(out) <= cap + len(marker(1 << 40)), len(out)
    assert env.spool.queries.output("S", "next") == b"only mine\n"
    # (it left the handler's session: looked for by its command line)
    wait_until(lambda: not pids_with_cmdline(b"sys.stdout.write('leftover"), what="the leftover printer to be gone")


def test_a_task_without_output_prints_nothing(env):
    register(env, "P", "printer")
    env.spool.enqueue_json("P", "waiting", {"mib": 0})
    done = env.cli("output", "P", "waiting")
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")


def test_a_run_killed_in_its_tail_leaves_output_that_reads_and_fsck_accepts(env, tmp_path):
    register(env, "H", "tail_then_hang", max_output_bytes=4096, timeout=300)
    ready = tmp_path / "ready"
    env.spool.enqueue_json("H", "k", {"lines": 2000, "ready": str(ready)})
    env.worker()
    wait_until(ready.exists, what="the handler to write its output")
    task_dir = Path(env.spool.status("H", "k").path)
    parts = sorted(p.name for p in task_dir.iterdir() if p.name.startswith("output.tail."))
    assert parts, sorted(p.name for p in task_dir.iterdir())
    # What sits in the pipe when the handler process dies is lost with it
    # (docs/design.md, "Output"): kill it once its output is on disk.
    wait_until(lambda: env.spool.queries.output("H", "k").endswith(b"line 00001999\n"), what="output on disk")
    os.kill(int(ready.read_text()), signal.SIGKILL)  # the handler process dies mid-run
    assert env.final("H", "k") == State.FAILED
    data = env.cli("output", "H", "k").stdout
    assert data.startswith(b"line 00000000\n")
    assert data.endswith(b"line 00001999\n")
    assert b"bytes of output left out here]" in data
    assert len(data) <= 4096 + len(marker(10 ** 6))
    check = env.cli("fsck", "--json")
    assert check.returncode == 0, check.stdout
    assert json.loads(check.stdout)["findings"] == []
    repaired = env.cli("fsck", "--repair")
    assert repaired.returncode == 0, repaired.stdout
    done_dir = Path(env.spool.status("H", "k").path)
    assert sorted(p.name for p in done_dir.iterdir() if p.name.startswith("output.tail.")), "parts quarantined"
    assert env.cli("output", "H", "k").stdout == data  # nothing was quarantined


# --------------------------------------------------------------------------- follow


def test_log_follow_started_before_the_run_prints_each_record_once_in_order(env):
    register(env, "C", "chatty")
    env.spool.enqueue_json("C", "c1", {"seconds": 1.0, "steps": 5})
    follow = env.popen("log", "C", "c1", "--follow")
    out_follow = env.popen("output", "C", "c1", "--follow")
    time.sleep(0.3)  # the follows are waiting on an ENQUEUED task (not needed for correctness)
    env.worker()
    out, err = follow.communicate(timeout=60)
    assert follow.returncode == 0, err
    logged = env.cli("log", "C", "c1").stdout.decode().splitlines()
    assert out.decode().splitlines() == logged  # every record once, in order: ENQUEUED through FINISHED
    assert [line.split()[1] for line in logged][:3] == ["ENQUEUED", "SCHEDULED", "RUNNING"]
    assert logged[-1].split()[1] == "FINISHED"
    out2, err2 = out_follow.communicate(timeout=60)
    assert out_follow.returncode == 0, err2
    assert out2 == b"".join(b"out %d\n" % i for i in range(5))


def test_follow_of_a_finished_task_prints_all_and_exits_at_once(env):
    register(env, "C", "chatty")
    env.spool.enqueue_json("C", "ok", {"seconds": 0.1, "steps": 2})
    env.spool.enqueue_json("C", "bad", {"seconds": 0.1, "steps": 2, "fail": True})
    env.worker()
    env.final("C", "ok")
    env.final("C", "bad")
    started = time.monotonic()
    ok = env.cli("log", "C", "ok", "--follow", timeout=10)
    bad = env.cli("log", "C", "bad", "--follow", "--json", timeout=10)
    out = env.cli("output", "C", "bad", "--follow", timeout=10)
    assert time.monotonic() - started < 10
    assert ok.returncode == 0 and bad.returncode == 1 and out.returncode == 1
    assert ok.stdout == env.cli("log", "C", "ok").stdout
    records = [json.loads(line) for line in bad.stdout.decode().splitlines()]
    assert records == json.loads(env.cli("log", "C", "bad", "--json").stdout)
    assert out.stdout == b"out 0\nout 1\n"


def test_follow_survives_the_moves_and_a_restart(env):
    """scheduled/ -> running/ -> back to enqueued/ (the run is killed at its
    timeout) -> running/ -> done/, all while one follow runs."""
    register(env, "S", "slow_progress", timeout=1.5, max_restarts=1)
    env.spool.enqueue_json("S", "s", {"steps": 2, "pause": 0.2, "hang": True})
    follow = env.popen("log", "S", "s", "--follow")
    env.worker()
    out, err = follow.communicate(timeout=60)
    assert follow.returncode == 1, err  # gave up after 2 starts: FAILED
    logged = env.cli("log", "S", "s").stdout.decode().splitlines()
    assert out.decode().splitlines() == logged
    states = [line.split()[1] for line in logged]
    assert states.count("RUNNING") == 2 and states[-1] == "FAILED"


def test_a_run_after_a_restart_starts_with_no_output_or_progress_of_the_first(env):
    """The first run fills output and its tail parts and reports progress,
    then is killed at its timeout; the second run's task shows only what
    the second run printed, and no progress."""
    register(env, "R", "noisy_first_run", timeout=1.5, max_restarts=1, max_output_bytes=4096)
    env.spool.enqueue_json("R", "r", {"marker": str(env.root.parent / "marker"), "lines": 2000})
    env.worker()
    assert env.final("R", "r") == State.FINISHED
    assert env.spool.status("R", "r").doc["starts"] == 2
    assert env.cli("output", "R", "r").stdout == b"second run\n"
    assert env.spool.status("R", "r").progress is None
    assert not [n for n in os.listdir(env.root / "done" / "R:r") if n.startswith("output.tail.")]


def test_a_wait_is_not_fooled_by_the_same_id_enqueued_again(env):
    """A task deleted and enqueued again under its id while `wait` waited:
    the wait reported the new task's end as its own (an outside tester)."""
    register(env, "C", "chatty")
    env.spool.enqueue_json("C", "d", {})
    waiter = env.popen("wait", "C", "d")
    wait_until(lambda: "poll" in Path(f"/proc/{waiter.pid}/wchan").read_text(), what="the wait asleep")
    env.spool.delete("C", "d")
    env.spool.enqueue_json("C", "d", {})
    env.worker()
    out, err = waiter.communicate(timeout=30)
    assert waiter.returncode == 2, (out, err)
    assert err.decode().strip() == "spoolq: task C/d was deleted while it was waited for"


def test_output_follow_says_on_stderr_where_a_new_run_starts(env):
    """A follow of a task that was restarted printed the second run's output
    straight after the first's, as if one run had printed both."""
    register(env, "R", "noisy_first_run", timeout=1.5, max_restarts=1)
    env.spool.enqueue_json("R", "r", {"marker": str(env.root.parent / "marker"), "lines": 2})
    follow = env.popen("output", "R", "r", "--follow")
    env.worker()
    out, err = follow.communicate(timeout=60)
    assert follow.returncode == 0, err
    assert out == b"first run 00000000\nfirst run 00000001\nsecond run\n", out
    assert err.decode() == "spoolq: a new run of R/r started; its output follows\n", err


def test_follow_errors_are_one_line_with_wait_exit_codes(env):
    register(env, "C", "chatty")
    env.spool.enqueue_json("C", "w", {})
    cases = [
        (("log", "C", "nope", "--follow"), 2, "no task C/nope"),
        (("output", "C", "nope", "--follow"), 2, "no task C/nope"),
        (("output", "C", "nope"), 1, "no task C/nope"),
        (("output", "Unknown", "x"), 1, "unknown task type 'Unknown'"),
        (("log", "Unknown", "x", "--follow"), 2, "unknown task type 'Unknown'"),
        (("log", "C", "w", "--timeout", "1"), 2, "--timeout goes with --follow"),
        (("output", "C", "w", "--follow", "--json"), 2, "exclude each other"),
        (("log", "C", "w", "--follow", "--timeout", "0.3"), 124, "timed out after 0.3 s following C/w"),
        (("output", "C", "w", "--follow", "--timeout", "0.3"), 124, "timed out"),
        (("log", "C", "w", "--follow", "--timeout", "soon"), 2, "--timeout"),
        (("output", "C", "../x"), 1, "invalid"),
    ]
    for args, code, text in cases:
        done = env.cli(*args)
        err = done.stderr.decode()
        assert done.returncode == code, (args, done.returncode, err)
        assert len(err.splitlines()) == 1 and err.startswith("spoolq: ") and text in err, (args, err)
        assert "Traceback" not in err


def test_a_deleted_task_ends_its_follow_with_exit_2(env):
    register(env, "C", "chatty")
    env.spool.enqueue_json("C", "d", {})
    follow = env.popen("log", "C", "d", "--follow")
    # Its first record printed: it found the task and follows it (a fixed
    # sleep lost the race on a loaded machine: "no task C/d").
    assert b"ENQUEUED" in follow.stdout.readline()
    assert follow.poll() is None
    env.spool.delete("C", "d")
    out, err = follow.communicate(timeout=20)
    assert follow.returncode == 2
    assert err.decode().strip() == "spoolq: task C/d was deleted while it was followed"


def test_a_task_deleted_while_waited_for_says_so_not_no_task(env):
    """`spoolq wait` said "no task C/d" for a task deleted while it waited,
    as if the id had been mistyped; `log --follow` said what happened."""
    register(env, "C", "chatty")
    env.spool.enqueue_json("C", "d", {})
    waiter = env.popen("wait", "C", "d")
    # Asleep in its select: it has read the task once, and waits for an event.
    # (select(2) sleeps in poll_schedule_timeout.)
    wait_until(lambda: "poll" in Path(f"/proc/{waiter.pid}/wchan").read_text(), what="the wait asleep")
    env.spool.delete("C", "d")
    out, err = waiter.communicate(timeout=20)
    assert waiter.returncode == 2, err
    assert err.decode().strip() == "spoolq: task C/d was deleted while it was waited for"


# --------------------------------------------------------------------------- progress


def test_progress_100000_calls_are_cheap_and_the_last_value_stays(env):
    register(env, "G", "progress_loop")
    env.spool.enqueue_json("G", "g", {"n": 100_000})
    env.worker()
    assert env.final("G", "g") == State.FINISHED
    seconds = json.loads(env.spool.response("G", "g")[0])["seconds"]
    print(f"100,000 progress calls took {seconds:.3f} s in the handler ({seconds * 10:.2f} µs a call)")
    # The bound, one second, is about ten times what it takes here
    # (bench/output.py measures it): loose enough for a loaded 2-core host.
    assert seconds < 1.0
    doc = json.loads(env.cli("status", "G", "g", "--json").stdout)
    assert doc["progress"]["done"] == 100_000 and doc["progress"]["total"] == 100_000
    assert doc["progress"]["message"] == "working" and doc["progress"]["at"]
    # No log record for it: ENQUEUED, SCHEDULED, RUNNING, FINISHED.
    assert len(env.spool.log_records("G", "g")) == 4


def test_progress_shows_in_status_and_list_while_running(env):
    register(env, "G", "slow_progress")
    env.spool.enqueue_json("G", "p", {"steps": 3, "pause": 0.2, "hang": True})
    env.spool.enqueue_json("G", "idle", {"steps": 1})
    doc = json.loads(env.cli("status", "G", "idle", "--json").stdout)
    assert doc["progress"] is None
    env.worker()
    wait_until(lambda: (env.spool.status("G", "p").progress or {}).get("done") == 3, what="progress 3/3")
    listing = env.cli("list", "--state", "running").stdout.decode().splitlines()
    assert "PROGRESS" in listing[0]
    assert "3/3 step 3" in listing[1] or "3/3 (100%) step 3" in listing[1], listing
    docs = json.loads(env.cli("list", "--json").stdout)
    assert {d["id"]: (d["progress"] or {}).get("done") for d in docs}["p"] == 3


def test_bad_progress_fails_the_task_with_a_clear_message(env):
    register(env, "B", "bad_progress")
    env.spool.enqueue_json("B", "b", {})
    env.worker()
    assert env.final("B", "b") == State.FAILED
    assert env.spool.status("B", "b").doc["message"] == "TypeError: progress done must be a number, not 'half'"


def test_register_max_output_bytes(env):
    done = env.cli("register", "R", "observe_handlers.printer", "--max-output-bytes", "64K", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["max_output_bytes"] == 64 << 10
    for bad in ("0", "abc", "-5", "1.5X"):
        done = env.cli("register", "R", "observe_handlers.printer", "--max-output-bytes", bad)
        err = done.stderr.decode()
        assert done.returncode == 2 and len(err.splitlines()) == 1 and "--max-output-bytes" in err, (bad, err)
    assert env.spool.get_type("R").max_output_bytes == 64 << 10  # unchanged by the bad calls
    with pytest.raises(Exception, match="max_output_bytes"):
        env.spool.register_type("R", "observe_handlers.printer", max_output_bytes=1)


def test_a_capture_that_cannot_start_leaves_fds_1_and_2_alone(tmp_path):
    """Out of descriptors (the pipe cannot be made): the handler runs with
    fds 1 and 2 as they were."""
    import resource

    from spoolq.worker.capture import Capture

    before = [os.fstat(fd) for fd in (1, 2)]
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    lowest_free = os.dup(0)
    os.close(lowest_free)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # the next open fails with EMFILE
    try:
        with Capture(dfd, 1024) as capture:
            after = [os.fstat(fd) for fd in (1, 2)]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        os.close(dfd)
    assert isinstance(capture.error, OSError)
    assert [(s.st_dev, s.st_ino) for s in after] == [(s.st_dev, s.st_ino) for s in before]
    assert [(s.st_dev, s.st_ino) for s in (os.fstat(1), os.fstat(2))] == [(s.st_dev, s.st_ino) for s in before]


def test_a_handler_that_closes_fds_1_and_2_keeps_its_output_and_spins_nothing(tmp_path):
    """Closing fds 1 and 2 mid-run leaves the pipe with no writer: the
    mover thread must stop watching it (a level-triggered hang-up would
    wake it forever: it then spent 1.0 s of CPU a second), the capture's
    files must not take the freed numbers 1 and 2, what was printed before
    is kept, and fds 1 and 2 come back for the next run."""
    import time

    from spoolq.worker.capture import Capture

    before = [os.fstat(fd) for fd in (1, 2)]
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with Capture(dfd, 1024) as capture:
            os.write(1, b"before\n")
            os.close(1)
            os.close(2)
            cpu = time.process_time()
            time.sleep(1.0)  # a window to measure a spin in, not a wait for something
            cpu = time.process_time() - cpu
        assert capture.error is None
        assert [(s.st_dev, s.st_ino) for s in (os.fstat(1), os.fstat(2))] == [(s.st_dev, s.st_ino) for s in before]
        assert (tmp_path / "output").read_bytes() == b"before\n"
        assert cpu < 0.2, f"the process spent {cpu:.2f} s of CPU in 1 s with nothing to do"
        with Capture(dfd, 1024) as capture:
            os.write(2, b"again\n")
        assert capture.error is None
        assert (tmp_path / "output").read_bytes() == b"again\n"
    finally:
        os.close(dfd)


def test_after_an_output_error_a_handler_that_prints_on_is_never_blocked(tmp_path):
    """The task directory is gone, so the output cannot be kept: from the
    error on, the run's bytes are read and dropped, so a handler that then
    prints three times the pipe's buffer does not wait for ever on a full
    pipe (the first design stopped reading at the error: it hung here)."""
    gone = tmp_path / "gone"
    gone.mkdir()
    script = (
        "import os, sys, time\n"
        "from spoolq.worker.capture import Capture, PIPE_SIZE\n"
        "dfd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)\n"
        "os.rmdir(sys.argv[1])\n"
        "with Capture(dfd, 1024) as capture:\n"
        "    os.write(1, b'first')\n"
        "    deadline = time.monotonic() + 30\n"
        "    while capture.error is None and time.monotonic() < deadline:\n"
        "        time.sleep(0.01)  # until the thread met the error\n"
        "    chunk = b'x' * 65536\n"
        "    for _ in range(3 * PIPE_SIZE // len(chunk)):\n"
        "        os.write(1, chunk)\n"
        "print(type(capture.error).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(gone)], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "FileNotFoundError\n", "")


def test_output_is_made_when_the_first_byte_comes_and_not_before(tmp_path):
    """A run that prints nothing leaves no output file (one inode less a
    task); one that prints makes it; a task directory that is gone by then
    loses the output, not the run, and fds 1 and 2 come back."""
    from spoolq.worker.capture import Capture

    quiet, loud = tmp_path / "quiet", tmp_path / "loud"
    quiet.mkdir()
    loud.mkdir()
    for path, text in ((quiet, b""), (loud, b"hello\n")):
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with Capture(dfd, 1024) as capture:
                os.write(1, text)
        finally:
            os.close(dfd)
        assert capture.error is None
    assert os.listdir(quiet) == []
    assert (loud / "output").read_bytes() == b"hello\n"

    before = [os.fstat(fd) for fd in (1, 2)]
    gone = tmp_path / "gone"
    gone.mkdir()
    dfd = os.open(gone, os.O_RDONLY | os.O_DIRECTORY)
    gone.rmdir()
    try:
        with Capture(dfd, 1024) as capture:
            os.write(1, b"nowhere to go\n")
    finally:
        os.close(dfd)
    assert isinstance(capture.error, OSError)
    assert [(s.st_dev, s.st_ino) for s in (os.fstat(1), os.fstat(2))] == [(s.st_dev, s.st_ino) for s in before]


def test_retry_refuses_a_message_that_is_not_a_str_where_it_is_raised():
    """Retry(message=12345) was a retry logged "12345" while retries lasted,
    and a failure about the message once they were used up."""
    from spoolq import InvalidInput, Retry

    with pytest.raises(InvalidInput, match="a message must be a str, not int"):
        Retry(message=12345)  # type: ignore[arg-type]


def test_progress_that_is_not_finite_is_stored_as_null(tmp_path):
    from spoolq.store.output import read_progress
    from spoolq.task import TaskContext

    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        context = TaskContext(None, "T:x#1@s", task_dir=dfd)  # type: ignore[arg-type]
        context.progress(float("nan"), float("inf"), "odd")
        assert read_progress(dfd) == {"done": None, "total": None, "message": "odd", "at": read_progress(dfd)["at"]}
        with pytest.raises(TypeError, match="progress total must be a number"):
            context.progress(1, "ten")
        with pytest.raises(TypeError, match="progress message must be a str, not int"):
            context.progress(1, 2, 3)  # was stored as "3"
        # A megabyte of message: cut as a status message is (it made the
        # progress vanish: a file too large to read back).
        fresh = TaskContext(None, "T:x#1@s", task_dir=dfd)  # type: ignore[arg-type]  # its first call writes at once
        fresh.progress(1, 2, "m" * 10**6)
        stored = read_progress(dfd)
        assert stored is not None and stored["done"] == 1 and stored["message"].endswith("more characters cut]")
    finally:
        os.close(dfd)
