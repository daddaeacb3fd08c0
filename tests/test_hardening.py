"""Regression tests for what outside testing broke (docs/reliability.md,
"Hardening"): a frozen worker, handlers that escape their process group or
leave helpers behind, corrupt tasks, hostile spool files, endless input,
moving counts, too few descriptors, and smaller ones. Real worker processes
on real spools; the multi-user findings are in tests/test_multiuser.py."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spoolq import Spool, State, UnsafeSpool, sweeps
from spoolq.errors import SpoolError
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
    spool.register_type(name, f"hostile_handlers.{handler}", **kw)


def notes(path: Path) -> list[tuple[str, int, float]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            out.append((parts[0], int(parts[1]), float(parts[2])))
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def spoolq_cli(*args, root, timeout=60, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE)])
    return subprocess.run([sys.executable, "-m", "spoolq", "--root", str(root), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env, **kw)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    return proc.stderr


# --------------------------------------------------------------------------- 2. a frozen worker


@pytest.mark.parametrize("before", ["nothing", "a run with an hour's limit"])
def test_a_frozen_workers_task_never_runs_on_two_servers_at_once(env, before):
    """w1 runs a task (timeout 2 s) and is SIGSTOPped. Its handler kills
    itself shortly after the deadline (the worker cannot); only then may w2's
    sweep take the task and start it: the two runs never overlap. Also when
    the same handler process ran a task with a far deadline just before
    (its deadline thread sleeps until that one and must be woken)."""
    spool, root, workers, tmp = env
    register(spool, "F", "tick_first_time", timeout=2, max_restarts=2)
    rec, marker = tmp / "rec", tmp / "marker"
    w1 = workers.start("w1", concurrency=1)
    if before != "nothing":
        spool.register_type("Long", "daemon_handlers.add", timeout=3600)
        spool.enqueue("Long", "first", [1, 2])
        wait_until(lambda: spool.status("Long", "first").state == State.FINISHED, what="the long-limit task done")
    spool.enqueue("F", "t", {"record": str(rec), "marker": str(marker)})
    wait_until(lambda: any(e == "tick" for e, _, _ in notes(rec)), what="w1's handler ticking")
    os.kill(w1.pid, signal.SIGSTOP)
    try:
        workers.start("w2")
        wait_until(lambda: spool.status("F", "t").state == State.FINISHED, timeout=60, what="w2 finished it")
        first_pid = next(p for e, p, _ in notes(rec) if e == "start")
        second_start = [t for e, p, t in notes(rec) if e == "start" and p != first_pid][0]
        last_tick = max(t for e, p, t in notes(rec) if e == "tick" and p == first_pid)
        assert last_tick < second_start, "the frozen worker's handler ran on after w2 started the task"
        assert not alive(first_pid)
        info = spool.status("F", "t")
        assert info.doc["server"] == "w2" and info.doc["restarts"] == 1
    finally:
        os.kill(w1.pid, signal.SIGCONT)
    # Thawed, w1 finds its run gone and goes on: nothing written, no crash.
    time.sleep(0.5)  # let it take a turn of its loop (a crash would show below)
    assert w1.poll() is None, stderr_of(w1)
    assert spool.status("F", "t").state == State.FINISHED


# --------------------------------------------------------------------------- 3. escaping the process group


@pytest.mark.parametrize("then", ["return", "hang"])
def test_every_descendant_of_a_handler_dies_with_its_run(env, then):
    """A handler's grandchild leaves its process group (setsid + double
    fork). Whether the handler returns or is killed at its timeout, the
    grandchild is dead before the task leaves running/."""
    spool, root, workers, tmp = env
    register(spool, "E", "escape_group", timeout=2, max_restarts=0)
    rec, pidfile = tmp / "rec", tmp / "pid"
    spool.enqueue("E", "t", {"record": str(rec), "pidfile": str(pidfile), "then": then})
    workers.start("w1")
    wait_until(lambda: pidfile.exists() and pidfile.read_text(), what="the escaped grandchild")
    escaped = int(pidfile.read_text())
    final = State.FINISHED if then == "return" else State.FAILED
    wait_until(lambda: spool.status("E", "t").state == final, timeout=30, what=f"task {final.name}")
    wait_until(lambda: not alive(escaped), timeout=5, what="the escaped grandchild to be dead")
    if then == "hang":
        # The claim was released (the task left running/) only after the
        # grandchild was dead: its last tick comes before the final record.
        ended = spool.log_records("E", "t")[-1].time.timestamp()
        last_tick = max(t for e, p, t in notes(rec) if e == "escaped")
        assert last_tick <= ended


def test_a_handlers_leftovers_are_dead_before_its_task_is_final(env):
    """The slot freezes right after it moved the finished task to done/
    (SPOOLQ_HANG_AT=finish.moved), as a worker killed at that moment would
    leave it: the grandchild must already be dead, because once the task is
    final nobody takes it back, so nobody would kill the holder of its run
    lock. (The soak found one alive when the kill came after the finish.)"""
    spool, root, workers, tmp = env
    register(spool, "E", "escape_group", timeout=30, max_restarts=0)
    rec, pidfile = tmp / "rec", tmp / "pid"
    spool.enqueue("E", "t", {"record": str(rec), "pidfile": str(pidfile), "then": "return"})
    workers.start("w1", env={"SPOOLQ_HANG_AT": "finish.moved"})
    wait_until(lambda: pidfile.exists() and pidfile.read_text(), what="the escaped grandchild")
    escaped = int(pidfile.read_text())
    # FINISHED is written in running/ just before the move to done/ (where
    # the slot hangs): wait for the move, not for the state.
    wait_until(lambda: Path(root, "done", "E:t").is_dir(), timeout=30, what="task moved to done/")
    assert spool.status("E", "t").state == State.FINISHED
    assert not alive(escaped), "the handler's grandchild outlived the finish of its task"


# --------------------------------------------------------------------------- 4. leftovers of a dead worker


def test_a_forked_helper_does_not_keep_a_dead_server_alive(env):
    """A handler forks a helper (no exec) and hangs; the worker is
    SIGKILLed. The helper does not hold the server lock: the server is dead
    at once, the same server restarts, kills the leftover that still holds
    the task's run lock, and runs the task again."""
    spool, root, workers, tmp = env
    register(spool, "H", "fork_helper_then_hang", timeout=600, max_restarts=2)
    pidfile, marker = tmp / "pid", tmp / "marker"
    spool.enqueue("H", "t", {"pidfile": str(pidfile), "marker": str(marker)})
    w1 = workers.start("w1")
    wait_until(lambda: pidfile.exists() and pidfile.read_text(), what="the forked helper")
    helper = int(pidfile.read_text())
    os.kill(w1.pid, signal.SIGKILL)
    w1.wait(10)
    wait_until(lambda: not spool.server_alive("w1"), timeout=5, what="w1 seen dead")
    assert alive(helper), "the helper outlived its worker (what this test is about)"
    w1b = workers.start("w1")  # the same server id starts again
    wait_until(lambda: spool.status("H", "t").state == State.FINISHED, timeout=30, what="the task rerun")
    assert w1b.poll() is None, stderr_of(w1b)
    assert not alive(helper)
    assert spool.status("H", "t").doc["restarts"] == 1


def test_a_sweep_from_elsewhere_kills_a_dead_servers_leftovers(env):
    spool, root, workers, tmp = env
    register(spool, "H", "fork_helper_then_hang", timeout=600, max_restarts=2)
    pidfile, marker = tmp / "pid", tmp / "marker"
    spool.enqueue("H", "t", {"pidfile": str(pidfile), "marker": str(marker)})
    w1 = workers.start("w1")
    wait_until(lambda: pidfile.exists() and pidfile.read_text(), what="the forked helper")
    helper = int(pidfile.read_text())
    os.kill(w1.pid, signal.SIGKILL)
    w1.wait(10)
    done = spoolq_cli("sweep", root=root)
    assert done.returncode == 0, done.stderr
    assert "reenqueued H/t" in done.stdout
    assert not alive(helper)
    assert spool.status("H", "t").state == State.ENQUEUED


def test_a_handler_that_drops_every_flock_cannot_let_a_second_worker_in(env):
    spool, root, workers, tmp = env
    register(spool, "U", "release_all_flocks_then_hang", timeout=600)
    started = tmp / "started"
    spool.enqueue("U", "t", {"started": str(started)})
    w1 = workers.start("w1")
    wait_until(started.exists, what="the handler dropped its flocks")
    assert spool.server_alive("w1")
    second = workers.start("w1")
    assert second.wait(30) == 78, stderr_of(second)
    assert "already running" in stderr_of(second)
    assert w1.poll() is None


# --------------------------------------------------------------------------- 5. one corrupt task


def test_a_handler_that_clobbers_its_status_does_not_stop_the_server(env):
    spool, root, workers, tmp = env
    register(spool, "C", "clobber_own_status")
    spool.register_type("T", "daemon_handlers.add")
    spool.enqueue("C", "bad", None)
    proc = workers.start("w1")
    wait_until(lambda: any(n.startswith("C:bad") for n in os.listdir(root / "quarantine")), what="quarantined")
    spool.enqueue("T", "good", [1, 2])
    wait_until(lambda: spool.status("T", "good").state == State.FINISHED, what="the next task")
    assert proc.poll() is None, stderr_of(proc)


def test_a_task_without_its_log_does_not_stop_the_sweeps(env, make_clock):
    """A running task's log is deleted: every other part of the sweep still
    happens (a dead server's task re-enqueued, a retired task removed), and
    the damaged task is quarantined."""
    spool, root, workers, tmp = env
    spool.register_type("Z", "atp_demo.handler", retention=1)
    for task_id in ("damaged", "orphan", "old"):
        spool.enqueue("Z", task_id, 1)
    script = f"""
import os
from spoolq import Spool
s = Spool({str(root)!r})
for t in ("damaged", "orphan", "old"):
    c = s.claim("gone", names=["Z:" + t]); s.start(c)
    if t == "old":
        s.set_state(c, 5)
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)  # server "gone" dies
    os.unlink(root / "running" / "Z:damaged" / "log")
    clock = make_clock(time.time() + 3600)
    later = Spool(root, clock=clock)
    actions = {a.id: a.action for a in sweeps.reenqueue_zombies(later) + sweeps.delete_retired(later)}
    assert actions.get("orphan") == "reenqueued"
    assert actions.get("old") == "retired"
    assert any(n.startswith("Z:damaged") for n in os.listdir(root / "quarantine"))


# --------------------------------------------------------------------------- 6. hostile spool files


def test_hostile_spool_json_is_refused_in_one_line(env):
    spool, root, workers, tmp = env
    spool.register_type("T", "daemon_handlers.add")
    settings = root / "spool.json"
    os.unlink(settings)
    os.mkfifo(settings)
    assert "not a regular file" in one_line_error(spoolq_cli("types", root=root, timeout=20))
    os.unlink(settings)
    os.symlink("/dev/zero", settings)
    assert "symlink" in one_line_error(spoolq_cli("types", root=root, timeout=20))
    os.unlink(settings)
    settings.write_text('{"max_queue": 1e400}')
    assert "max_queue" in one_line_error(spoolq_cli("types", root=root, timeout=20))
    settings.write_text('{"durable": "yes"}')
    assert "durable" in one_line_error(spoolq_cli("types", root=root, timeout=20))
    settings.write_text("[1, 2]")
    with pytest.raises(SpoolError, match="JSON object"):
        Spool(root)


def test_write_granted_by_an_acl_is_refused_like_a_world_writable_mode(env):
    spool, root, workers, tmp = env
    setfacl = shutil.which("setfacl")
    assert setfacl, "setfacl missing: run .ci/install-system-deps (acl)"
    subprocess.run([setfacl, "-m", "u:nobody:rwx", str(root / "enqueued")], check=True)
    with pytest.raises(UnsafeSpool, match="through an ACL"):
        Spool(root)
    subprocess.run([setfacl, "-b", str(root / "enqueued")], check=True)
    subprocess.run([setfacl, "-d", "-m", "g:nogroup:rwx", str(root / "running")], check=True)
    with pytest.raises(UnsafeSpool, match="through an ACL"):
        Spool(root)
    subprocess.run([setfacl, "-b", "-k", str(root / "running")], check=True)
    Spool(root)
    # The spool's own group and owner, named in an ACL (to keep new files the
    # group's), are no new writers: that was refused as "writable by gid N".
    group, owner = os.stat(root).st_gid, os.stat(root).st_uid
    for where in ("enqueued", "."):
        subprocess.run([setfacl, "-m", f"g:{group}:rwx,u:{owner}:rwx", str(root / where)], check=True)
        subprocess.run([setfacl, "-d", "-m", f"g:{group}:rwx", str(root / where)], check=True)
    Spool(root)


def test_a_state_dir_of_another_owner_is_refused_with_both_fixes(env):
    """Told only "chown -R 0 SPOOL" for a root given to root by mistake, an
    operator would have given root the whole spool of a service user."""
    spool, root, workers, tmp = env
    os.chown(root / "types", 65534, -1)
    with pytest.raises(UnsafeSpool) as refused:
        Spool(root)
    assert (f"chown 65534 {root} if the root's owner is the one that is wrong, else chown -R 0 {root}"
            in str(refused.value)), refused.value
    os.chown(root / "types", 0, -1)
    Spool(root)


def test_a_state_dir_writable_by_another_group_is_refused(env):
    spool, root, workers, tmp = env
    os.chown(root / "done", -1, 65534)  # nogroup
    os.chmod(root / "done", 0o2770)
    with pytest.raises(UnsafeSpool, match="not the spool's group"):
        Spool(root)


def test_a_spool_inside_a_directory_anyone_may_write_is_refused(tmp_path):
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    Spool.init(open_dir / "spool", durable=False)
    os.chmod(open_dir, 0o777)  # not sticky: anyone could move the spool aside
    with pytest.raises(UnsafeSpool, match="could replace the whole spool"):
        Spool(open_dir / "spool")
    os.chmod(open_dir, 0o1777)  # sticky, like /tmp: only the owner may rename it
    Spool(open_dir / "spool")


# --------------------------------------------------------------------------- 7. endless input


def test_enqueue_stops_reading_at_the_input_limit(env):
    spool, root, workers, tmp = env
    Spool.init(root, max_input_bytes=1000)
    spool.register_type("T", "daemon_handlers.add")
    err = one_line_error(spoolq_cli("enqueue", "T", "zero", "/dev/zero", root=root, timeout=30))
    assert "over the spool's limit of 1000 bytes" in err
    producer = subprocess.Popen(["head", "-c", "300000000", "/dev/zero"], stdout=subprocess.PIPE)
    try:
        done = spoolq_cli("enqueue", "T", "stdin", "-", root=root, timeout=30, stdin=producer.stdout)
    finally:
        producer.stdout.close()
        producer.kill()
        producer.wait()
    assert "over the spool's limit of 1000 bytes" in one_line_error(done)
    assert spool.list_tasks() == [] and os.listdir(root / "tmp") == []


# --------------------------------------------------------------------------- 8. counts while tasks move


def test_listings_and_counts_show_each_task_once_while_tasks_move(env):
    spool, root, workers, tmp = env
    spool.register_type("T", "daemon_handlers.add", retention=-1)
    n = 600
    for i in range(n):
        spool.enqueue("T", f"t{i:04d}", [i])
    workers.start("w1", concurrency=2)
    workers.start("w2", concurrency=2)
    samples = 0
    while True:
        tasks = spool.list_tasks()
        ids = [t.id for t in tasks]
        assert len(ids) == len(set(ids)) == n, (len(ids), len(set(ids)))
        census = spool.census()
        assert sum(census.states.values()) == n, census.states
        samples += 1
        if census.states["FINISHED"] == n:
            break
    cli = spoolq_cli("list", "--json", root=root)
    assert len(json.loads(cli.stdout)) == n
    assert samples >= 2


# --------------------------------------------------------------------------- 9. too few descriptors


def test_a_tight_open_files_limit_means_fewer_handler_processes_not_a_crash(env):
    spool, root, workers, tmp = env
    spool.register_type("T", "daemon_handlers.add")
    for i in range(5):
        spool.enqueue("T", f"t{i}", [i])

    def tight() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (24, 24))

    env_vars = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    log = tmp / "tight.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "spoolq", "--root", str(root), "worker", "w1",
                                 "--concurrency", "16"], preexec_fn=tight, env=env_vars, stderr=fh)
    try:
        wait_until(lambda: all(spool.status("T", f"t{i}").state == State.FINISHED for i in range(5)),
                   timeout=60, what="the tasks, run with fewer processes")
        assert proc.poll() is None, log.read_text()
        assert "open-files limit allows" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()


# --------------------------------------------------------------------------- 10. smaller ones


def test_an_exception_whose_str_raises_keeps_its_traceback_and_the_slot(env):
    spool, root, workers, tmp = env
    register(spool, "X", "raise_unprintable")
    rec = tmp / "rec"
    spool.enqueue("X", "a", {"record": str(rec)})
    spool.enqueue("X", "b", {"record": str(rec)})
    workers.start("w1")
    wait_until(lambda: all(spool.status("X", t).state == State.FAILED for t in "ab"), what="both FAILED")
    log = "\n".join(r.message for r in spool.log_records("X", "a"))
    assert "Traceback" in log and "_Unprintable" in log
    pids = {p for e, p, _ in notes(rec) if e == "start"}
    assert len(pids) == 1, "the handler process survived the first task"


CHANGES = ["streams", "fd 0", "environment", "umask", "working directory", "signal handlers", "timers", "logging",
           "niceness", "resource limits", "thread", "sys.modules", "warnings", "spoolq logger", "interpreter", "time zone"] + (
    ["user ids"] if os.geteuid() == 0 else [])
# What the worker's line names, where it is not the change's own name.
LABELS = {"streams": "sys.stdout, sys.stderr", "spoolq logger": "logging", "time zone": "environment",
          "warnings": "interpreter settings (warnings)",
          "interpreter": "interpreter settings (sys.path, garbage collection, int digits, socket timeout)"}
RETIRING = {"resource limits": "resource limits", "thread": "threads (one left running)",  # cannot be put back
            "user ids": "user or group ids"}


def _stdin_identity() -> list[int] | None:
    """What fd 0 of this process is open on (the worker and its handler
    processes inherit it); None if it is closed."""
    try:
        st = os.fstat(0)
    except OSError:
        return None
    return [st.st_dev, st.st_ino]


def test_what_a_handler_changes_in_its_process_never_reaches_the_next_task(env):
    """One handler process runs task after task: each change a handler makes
    to it (a closed sys.stdout, an alarm, a cleared environment, …) is put
    back before the next task, said in one line; what cannot be put back (a
    lowered hard limit) retires the process instead."""
    spool, root, workers, tmp = env
    register(spool, "Change", "change_process")
    register(spool, "Check", "check_process")
    rec = tmp / "rec"
    mask = os.umask(0o022)
    os.umask(mask)
    fresh = {"record": str(rec), "umask": mask, "cwd": os.getcwd(), "nice": os.getpriority(os.PRIO_PROCESS, 0),
             "core": list(resource.getrlimit(resource.RLIMIT_CORE)), "seconds": 0, "stdin": _stdin_identity()}
    for what in CHANGES:
        spool.enqueue("Change", what.replace(" ", "-"), {"what": what})
        # (1.2 s: a pending alarm of 1 s would go off during the check)
        spool.enqueue("Check", f"after-{what.replace(' ', '-')}", {**fresh, "seconds": 1.2 if what == "timers" else 0})
    proc = workers.start("w1", concurrency=1)
    checks = [f"after-{what.replace(' ', '-')}" for what in CHANGES]
    wait_until(lambda: all(spool.status("Check", c).state.terminal for c in checks), timeout=60, what="all checked")
    for what, check in zip(CHANGES, checks):
        info = spool.status("Check", check)
        assert info.state == State.FINISHED, (what, info.doc["message"])
        assert spool.queries.output("Check", check) == b"stdout works\n", what
        assert spool.status("Change", what.replace(" ", "-")).state == State.FINISHED, what
    # The umask was put back: the next task's files are its owner's to read
    # (a umask of 0777 left them ----rw----).
    for name in os.listdir(root / "done" / "Check:after-umask"):
        mode = (root / "done" / "Check:after-umask" / name).stat().st_mode
        assert mode & 0o660 == 0o660, (name, oct(mode))
    err = stderr_of(proc)
    assert "Traceback" not in err and "Logging error" not in err, err
    for what in CHANGES:
        label = LABELS.get(what, what)
        if what in RETIRING:
            assert f"changed its process's {RETIRING[what]}, which cannot be put back: the process retires" in err, err
        else:
            assert f"its handler changed its process's {label}; put back" in err, (what, err)
    # The check after a change runs in the process that made it, unless that
    # change retired it.
    pids = [pid for event, pid, _ in notes(rec) if event == "check"]
    assert len(pids) == len(CHANGES), pids
    assert [pids[i] != pids[i - 1] for i in range(1, len(pids))] == [w in RETIRING for w in CHANGES[1:]], pids


def test_success_then_raise_stays_finished_and_is_reported_so(env):
    spool, root, workers, tmp = env
    register(spool, "S", "succeed_then_raise")
    spool.enqueue("S", "a", None)
    proc = workers.start("w1")
    wait_until(lambda: spool.status("S", "a").state == State.FINISHED, what="FINISHED")
    wait_until(lambda: "finished S:a" in stderr_of(proc), what="the daemon's line")
    assert "failed S:a" not in stderr_of(proc)


def test_deleting_the_spool_under_a_worker_ends_it_with_one_line(env):
    spool, root, workers, tmp = env
    spool.register_type("T", "daemon_handlers.add")
    proc = workers.start("w1")
    wait_until(lambda: "ready" in stderr_of(proc), what="ready")
    # Two ends within the counters' save interval (2 s): the second is not
    # saved yet, so a stopping worker saves it on its way out.
    spool.enqueue("T", "counted1", [1, 2])
    spool.enqueue("T", "counted2", [1, 2])
    wait_until(lambda: all(spool.status("T", f"counted{i}").state == State.FINISHED for i in (1, 2)), what="finished")
    for entry in root.iterdir():  # `rm -rf SPOOL/*`, or `rm -rf SPOOL` caught half way
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    assert proc.wait(30) == 1
    err = stderr_of(proc)
    assert "is gone; stopping" in err and "Traceback" not in err
    # Nothing made again in it on the way out (metrics/w1.json kept `rm -rf` from ending).
    assert os.listdir(root) == []


def test_a_finishing_time_in_the_future_still_retires(env, make_clock):
    spool, root, workers, tmp = env
    spool.register_type("Z", "atp_demo.handler", retention=60)
    spool.enqueue("Z", "t", 1)
    claim = spool.claim("s1", names=["Z:t"])
    spool.start(claim)
    spool.set_state(claim, State.FINISHED)
    spool.release_server("s1")
    future = time.time() + 86400
    os.utime(root / "done" / "Z:t", (future, future))  # the clock stepped back a day since
    assert sweeps.delete_retired(spool) == []  # its retention starts now...
    clock = make_clock(time.time() + 61)
    assert [a.id for a in sweeps.delete_retired(Spool(root, clock=clock))] == ["t"]  # ...and ends


def test_a_queue_stamp_in_the_future_does_not_starve_the_task(env):
    spool, root, workers, tmp = env
    spool.register_type("T", "daemon_handlers.add")
    spool.enqueue("T", "early", [1])
    future = time.time() + 86400
    os.utime(root / "enqueued" / "T:early", (future, future))
    spool.enqueue("T", "before", [2])
    assert spool.waiting() == ["T:before", "T:early"]  # seen now: its stamp is set to now, once
    spool.enqueue("T", "after", [3])
    assert spool.waiting() == ["T:before", "T:early", "T:after"]  # and stays put


# --------------------------------------------------------------------------- first use (issue 11): handlers


def test_a_handler_that_does_not_import_makes_its_tasks_wait_not_fail(env):
    """A deployment error: the server says so once, claims no more tasks of
    the type, retries the import with backoff, and runs the tasks once the
    module appears (in a --pythonpath directory)."""
    spool, root, workers, tmp = env
    code = tmp / "code"
    code.mkdir()
    spool.register_type("M", "late_module.handler")
    spool.register_type("T", "daemon_handlers.add")
    for i in range(3):
        spool.enqueue("M", f"m{i}", i)
    log = tmp / "worker.log"
    env_vars = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "spoolq", "--root", str(root), "worker", "w1",
                                 "--pythonpath", str(code)], env=env_vars, stderr=fh)
    try:
        wait_until(lambda: "cannot be imported" in log.read_text(), what="the import error, said")
        spool.enqueue("T", "other", [1, 2])  # other types go on meanwhile
        wait_until(lambda: spool.status("T", "other").state == State.FINISHED, what="another type's task")
        assert all(spool.status("M", f"m{i}").state == State.ENQUEUED for i in range(3))
        assert log.read_text().count("cannot be imported") == 1, log.read_text()
        (code / "late_module.py").write_text("def handler(ts, inp):\n    ts.store_response(str(inp), 'text/plain')\n")
        wait_until(lambda: all(spool.status("M", f"m{i}").state == State.FINISHED for i in range(3)),
                   timeout=60, what="the tasks, once the module is there")
        assert all(spool.status("M", f"m{i}").doc["starts"] == 1 for i in range(3))  # never started before
        assert "imports again" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()


def test_a_function_added_to_a_module_already_imported_is_found_without_a_restart(env):
    """The module imports but lacks the function (a newcomer adds it after
    registering): the handler process that tried has the old module in
    sys.modules, so it retires and the retry imports the module afresh."""
    spool, root, workers, tmp = env
    code = tmp / "code"
    code.mkdir()
    module = code / "jobs_in_progress.py"
    module.write_text("def other(ts, inp):\n    pass\n")
    spool.register_type("N", "jobs_in_progress.newfn")
    spool.enqueue("N", "n1", 5)
    log = tmp / "worker.log"
    env_vars = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "spoolq", "--root", str(root), "worker", "w1",
                                 "--pythonpath", str(code), "--concurrency", "1"], env=env_vars, stderr=fh)
    try:
        wait_until(lambda: "cannot be imported" in log.read_text(), what="the import error, said")
        with open(module, "a") as fh:
            fh.write("def newfn(ts, inp):\n    ts.store_response(str(inp * 2), 'text/plain')\n")
        wait_until(lambda: spool.status("N", "n1").state == State.FINISHED, timeout=60, what="the task, once the "
                   "function is there")
        assert spool.response("N", "n1") == (b"10", "text/plain")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()


def test_register_warns_about_a_handler_it_cannot_find_and_worker_refuses_a_bad_pythonpath(env):
    spool, root, workers, tmp = env
    done = spoolq_cli("register", "N", "no_such_module_here.func", root=root)
    assert done.returncode == 0 and "warning: handler module 'no_such_module_here' cannot be imported" in done.stderr
    assert spool.get_type("N").handler == "no_such_module_here.func"
    quiet = spoolq_cli("register", "D", "spoolq.demo.sequence_sum", root=root)
    assert quiet.returncode == 0 and quiet.stderr == ""
    bad = spoolq_cli("worker", "w1", "--pythonpath", str(tmp / "nowhere"), root=root)
    assert bad.returncode == 78 and "not a directory" in one_line_error(bad)


def test_deleting_a_running_task_stops_its_handler_within_a_second(env):
    """Seen through the watch on running/, not the heartbeat (30 s here)."""
    spool, root, workers, tmp = env
    register(spool, "F", "tick_first_time", timeout=600)
    rec, marker = tmp / "rec", tmp / "marker"
    spool.enqueue("F", "t", {"record": str(rec), "marker": str(marker)})
    workers.start("w1", heartbeat_interval=30)
    wait_until(lambda: any(e == "tick" for e, _, _ in notes(rec)), what="ticking")
    pid = next(p for e, p, _ in notes(rec) if e == "start")
    spool.delete("F", "t")
    deleted = time.time()
    wait_until(lambda: not alive(pid), timeout=5, what="the handler to stop")
    last_tick = max(t for e, p, t in notes(rec) if e == "tick")
    assert last_tick - deleted < 1.0, f"the handler ran {last_tick - deleted:.2f} s past the delete"


# --------------------------------------------------------------------------- a hostile handler (outside test, round 2)


def test_a_failure_message_of_megabytes_leaves_a_readable_task(env):
    """A 20 MB exception text, or a 17 MB RUNNING message, once made a
    status.json over the read limit: the task dropped out of status, list,
    stats and wait, and the second one was never finished. The status keeps
    the message's first STATUS_MESSAGE_MAX characters, the log's record the
    first LOG_MESSAGE_MAX, each saying how much was cut."""
    from spoolq.store.codec import LOG_MESSAGE_MAX, STATUS_MESSAGE_MAX

    spool, root, workers, tmp = env
    register(spool, "Big", "huge_failure", max_restarts=0)
    register(spool, "Run", "huge_running_message")
    spool.enqueue("Big", "x", None)
    spool.enqueue("Run", "y", None)
    proc = workers.start("w1")
    wait_until(lambda: spool.status("Big", "x").state.terminal and spool.status("Run", "y").state.terminal,
               timeout=60, what="both ended")
    failed, finished = spool.status("Big", "x"), spool.status("Run", "y")
    assert failed.state == State.FAILED and finished.state == State.FINISHED
    message = failed.doc["message"]
    assert message.startswith("ValueError: zzz") and message.endswith("more characters cut]"), message[-80:]
    assert STATUS_MESSAGE_MAX <= len(message) < STATUS_MESSAGE_MAX + 100
    assert os.path.getsize(root / "done" / "Big:x" / "status.json") < 16 << 10
    assert max(len(r.message) for r in spool.log_records("Run", "y")) < LOG_MESSAGE_MAX + 100
    listed = spoolq_cli("list", "--json", root=root)
    assert listed.returncode == 0 and "Big" in listed.stdout, listed.stderr
    assert spoolq_cli("status", "Big", "x", root=root).returncode == 0
    err = stderr_of(proc)
    assert "Traceback" not in err, err[-2000:]
    assert "failed Big:x: ValueError: zzz" in err
    assert "cannot be read" not in err


def test_a_handler_that_breaks_its_own_log_gets_its_task_quarantined_in_one_line(env):
    spool, root, workers, tmp = env
    register(spool, "L", "symlink_own_log")
    spool.register_type("T", "daemon_handlers.add")
    victim = tmp / "victim.txt"
    victim.write_text("untouched\n")
    spool.enqueue("L", "bad", {"victim": str(victim)})
    proc = workers.start("w1")
    wait_until(lambda: any(n.startswith("L:bad") for n in os.listdir(root / "quarantine")), what="quarantined")
    assert not (root / "running" / "L:bad").exists()
    assert victim.read_text() == "untouched\n"
    spool.enqueue("T", "good", [1, 2])
    wait_until(lambda: spool.status("T", "good").state == State.FINISHED, what="the next task")
    err = stderr_of(proc)
    assert "Traceback" not in err, err
    assert "quarantined L:bad" in err, err


def test_a_task_finished_by_its_handler_before_a_timeout_kill_is_reported(env):
    """set_success, then a hang past the time limit: the kill finds nothing
    to take back, and the run is still counted and logged as finished."""
    spool, root, workers, tmp = env
    register(spool, "H", "success_then_hang", timeout=1, max_restarts=0)
    spool.enqueue("H", "z", None)
    proc = workers.start("w1")
    wait_until(lambda: "finished H:z" in stderr_of(proc), timeout=30, what="the daemon's line")
    info = spool.status("H", "z")
    assert info.state == State.FINISHED and info.doc["restarts"] == 0
    wait_until(lambda: '"FINISHED": 1' in (root / "metrics" / "w1.json").read_text()
               if (root / "metrics" / "w1.json").exists() else False, timeout=30, what="counted")


def test_a_handler_that_lowers_its_open_files_limit_still_has_its_leftovers_killed(env):
    """With a soft limit of 3 descriptors, /proc could not be read: the
    leftover kill saw no child, waited 10 s, and the child outlived the
    task. What the handler changed is put back first."""
    spool, root, workers, tmp = env
    register(spool, "F", "leave_child_with_few_fds")
    pidfile = tmp / "pid"
    spool.enqueue("F", "n", {"pidfile": str(pidfile)})
    workers.start("w1")
    wait_until(lambda: Path(root, "done", "F:n").is_dir(), timeout=30, what="task moved to done/")
    assert spool.status("F", "n").state == State.FINISHED
    assert not alive(int(pidfile.read_text())), "the handler's child outlived its task"


# --------------------------------------------------------------------------- an operator (outside test, round 2)


def test_a_removed_server_lock_file_is_put_back_and_a_second_server_still_refused(env):
    """`rm locks/servers/w1.lock` under a live worker made it look dead: a
    sweep took its tasks and killed its handlers, a second w1 started. The
    worker locks a new file within seconds."""
    spool, root, workers, tmp = env
    spool.register_type("T", "daemon_handlers.add")
    proc = workers.start("w1")
    lock = root / "locks" / "servers" / "w1.lock"
    wait_until(lambda: spool.server_alive("w1"), what="w1 alive")
    lock.unlink()
    assert not spool.server_alive("w1")
    wait_until(lambda: lock.exists() and spool.server_alive("w1"), timeout=10, what="the lock file put back")
    assert lock.read_text().strip() == str(proc.pid)
    second = workers.start("w1")
    assert second.wait(30) == 78, stderr_of(second)
    assert "already running" in stderr_of(second)
    spool.enqueue("T", "after", [1, 2])
    wait_until(lambda: spool.status("T", "after").state == State.FINISHED, what="work goes on")
    assert proc.poll() is None


def test_a_worker_whose_lock_file_another_process_took_over_stops_with_78(env):
    import fcntl

    spool, root, workers, tmp = env
    proc = workers.start("w1")
    lock = root / "locks" / "servers" / "w1.lock"
    wait_until(lambda: spool.server_alive("w1"), what="w1 alive")
    deadline = time.monotonic() + 10
    while True:  # the worker may put its own file back between the rm and our lock
        lock.unlink(missing_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o660)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            os.close(fd)
            assert time.monotonic() < deadline
    try:
        assert proc.wait(30) == 78, stderr_of(proc)
        assert "another process holds it now: stopping" in stderr_of(proc)
    finally:
        os.close(fd)


def test_a_moment_of_unsafe_modes_sends_tasks_back_instead_of_failing_them(env):
    """`chmod o+w enqueued/` for a few seconds: each start refused (as it
    must: unpickling runs code) used to kill the handler process with a
    traceback and fail its task with 'exited with status 70'; then each
    task was claimed, "started", refused and handed back every second, its
    claim number climbing. Now nothing is claimed meanwhile, said once."""
    spool, root, workers, tmp = env
    spool.register_type("T", "daemon_handlers.add")
    for i in range(3):
        spool.enqueue("T", f"u{i}", [i, 1], delay=2)
    claims = {i: spool.status("T", f"u{i}").doc["claim"] for i in range(3)}
    proc = workers.start("w1")
    wait_until(lambda: " ready on " in stderr_of(proc), what="ready")
    os.chmod(root / "enqueued", 0o2777)  # after the worker's own check at its start, which refuses
    wait_until(lambda: "claims nothing while the spool is unsafe" in stderr_of(proc), what="claims stopped")
    time.sleep(3)  # past the tasks' due time: each second would have claimed and handed back
    assert stderr_of(proc).count("claims nothing while the spool is unsafe") == 1
    assert {i: spool.status("T", f"u{i}").doc["claim"] for i in range(3)} == claims
    assert "started" not in stderr_of(proc)
    os.chmod(root / "enqueued", 0o2770)
    wait_until(lambda: all(spool.status("T", f"u{i}").state == State.FINISHED for i in range(3)), timeout=30,
               what="all finished once the modes are right again")
    assert all(spool.status("T", f"u{i}").doc["restarts"] == 0 for i in range(3))
    err = stderr_of(proc)
    assert "Traceback" not in err, err


def test_a_type_file_edited_into_garbage_makes_its_tasks_wait_not_fail(env):
    spool, root, workers, tmp = env
    spool.register_type("T", "daemon_handlers.add")
    spool.enqueue("T", "w", [2, 3])
    path = root / "types" / "T.json"
    good = path.read_text()
    path.write_text(good.replace(",", "", 1))
    proc = workers.start("w1")
    wait_until(lambda: "not claiming T tasks until its type's file reads again" in stderr_of(proc), what="said")
    assert spool.status("T", "w").state == State.ENQUEUED
    path.write_text(good)
    wait_until(lambda: spool.status("T", "w").state == State.FINISHED, timeout=30, what="finished once it reads")
    assert "Traceback" not in stderr_of(proc)


def test_a_status_whose_message_is_null_still_takes_a_cancel_request(env):
    """Messages are checked to be text where they are written (codec.bounded);
    a status written elsewhere with "message": null must not make the next
    change that keeps the message fail."""
    spool, root, workers, tmp = env
    spool.register_type("T", "daemon_handlers.add")
    spool.enqueue("T", "a", [1])
    claim = spool.claim("S", message="claimed")
    spool.start(claim)
    path = root / "running" / "T:a" / "status.json"
    doc = json.loads(path.read_text())
    doc["message"] = None
    (root / "running" / "T:a" / "status.json.new").write_text(json.dumps(doc))
    os.rename(root / "running" / "T:a" / "status.json.new", path)
    spool.hold_server("S")
    spool.cancel("T", "a", reason="changed my mind")
    assert spool.status("T", "a").doc["cancel"] == "changed my mind"
