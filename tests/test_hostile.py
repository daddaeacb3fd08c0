"""Hostile and broken input: bad names, symlinks, junk dropped by hand into
the state directories, corrupt status files, unloadable pickles, oversized
input, a full disk, unsafe modes, a state directory on another filesystem.

Each case ends in a clear error or in quarantine/, nothing is lost, and a
running daemon keeps running and keeps finishing good tasks. (A second
daemon with the same server id is refused: tests/test_daemon.py.)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spoolq import CrossDevice, InvalidInput, InvalidName, Spool, State, UnsafeSpool
from spoolq.fsck import check
from test_daemon import Workers, stderr_of, stop, wait_until
from test_fsck import snapshot

HERE = Path(__file__).parent

BAD_NAMES = [
    "../x", "..", ".", "a/b", "/abs", ".hidden", "-opt", "", "a b", "a:b", "a\x00b", "a\nb",
    "ünïcödé", "a\u200bb", "tab\tname", "x" * 129,
]


@pytest.fixture
def daemon_env(tmp_path):
    root = tmp_path / "spool"
    spool = Spool.init(root, durable=False)
    spool.register_type("T", "daemon_handlers.add")
    workers = Workers(root)
    yield spool, root, workers, tmp_path
    workers.stop_all()


def quarantined(root: Path) -> list[str]:
    return sorted(n for n in os.listdir(root / "quarantine") if not n.endswith(".reason"))


def finishes_good_work(spool: Spool, proc: subprocess.Popen, task_id: str) -> None:
    """The daemon is alive and still runs a good task to FINISHED."""
    spool.enqueue("T", task_id, [1, 2, 3])
    wait_until(lambda: spool.status("T", task_id).state == State.FINISHED, what=f"{task_id} finished")
    assert spool.response("T", task_id) == (b"6", "text/plain")
    assert proc.poll() is None, "the daemon must keep running"


# --------------------------------------------------------------------------- names


def test_bad_names_are_refused_before_anything_is_written(spool):
    root = Path(spool.root)
    spool.enqueue("T", "ok", None)
    before = snapshot(root)
    claim_text = "T:ok#1@server1"
    for bad in BAD_NAMES + ["x" * 65]:
        calls = [
            lambda: spool.register_type(bad, "pkg.mod.func"),
            lambda: spool.enqueue(bad, "id1", None),
            lambda: spool.enqueue_json(bad, "id1", {}),
            lambda: spool.claim(bad),
            lambda: spool.hold_server(bad),
            lambda: spool.status(bad, "ok"),
            lambda: spool.delete(bad, "ok"),
            lambda: spool.abandon(claim_text.replace("server1", bad), "x"),
        ]
        if bad in BAD_NAMES:  # "x" * 65 is a fine task id
            calls += [
                lambda: spool.enqueue("T", bad, None),
                lambda: spool.enqueue_pickled("T", bad, pickle.dumps(1)),
                lambda: spool.status("T", bad),
                lambda: spool.log_records("T", bad),
                lambda: spool.delete("T", bad),
                lambda: spool.start(claim_text.replace(":ok", ":" + bad)),
            ]
        for n, call in enumerate(calls):
            with pytest.raises(InvalidName) as err:
                call()
                pytest.fail(f"call {n} accepted {bad!r}")
            assert "\n" not in str(err.value).replace("\\n", "")
    assert snapshot(root) == before
    # The limits themselves are fine, and the longest pair still fits a file name.
    spool.register_type("y" * 64, "pkg.mod.func")
    info = spool.enqueue("y" * 64, "z" * 128, None)
    assert os.path.isdir(info.path)
    spool.hold_server("s" * 64)


# --------------------------------------------------------------------------- junk in the spool


class _Junk:
    """Builds hostile entries in a staging directory on the spool's
    filesystem, then renames each into enqueued/ whole (so the daemon never
    meets a half-built one)."""

    def __init__(self, spool: Spool, stage: Path) -> None:
        self.spool = spool
        self.stage = stage
        stage.mkdir()
        # Valid tasks are made in a spool of their own, which no daemon watches.
        self.factory = Spool.init(stage.parent / "factory", durable=False)
        self.factory.register_type("T", "daemon_handlers.add")
        self.names: list[str | bytes] = []
        self._n = 0

    def task(self, name: str) -> Path:
        """A complete, valid task directory under *name*, still staged."""
        self._n += 1
        info = self.factory.enqueue("T", f"junk{self._n}", [1])
        path = self.stage / name
        os.rename(info.path, path)
        doc = json.loads((path / "status.json").read_text())
        if ":" in name:
            doc["id"] = name.split(":", 1)[1]
            (path / "status.json").write_text(json.dumps(doc))
        return path

    def drop(self, path: Path | bytes) -> None:
        name = os.path.basename(path)
        os.rename(path, os.path.join(os.fsencode(self.spool.layout.enqueued) if isinstance(name, bytes)
                                     else self.spool.layout.enqueued, name))
        self.names.append(name)


def test_junk_dropped_into_enqueued_is_quarantined_and_the_daemon_goes_on(daemon_env):
    spool, root, workers, tmp = daemon_env
    proc = workers.start()
    finishes_good_work(spool, proc, "before")
    junk = _Junk(spool, tmp / "stage")
    outside = tmp / "outside"
    outside.mkdir()
    passwd = outside / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\n")
    marker = outside / "pwned"
    # Unpickling this would create the marker: it must never be read.
    evil = outside / "evil.pkl"
    evil.write_bytes(b"cos\nmkdir\n(S'" + str(marker).encode() + b"'\ntR.")
    outside_task = junk.task("T:outside")
    os.rename(outside_task, outside / "T:outside")
    before_outside = snapshot(outside)

    def with_status(name: str, data: bytes) -> Path:
        path = junk.task(name)
        (path / "status.json").write_bytes(data)
        return path

    plain = junk.stage / "README"
    plain.write_bytes(b"not a task")
    junk.drop(plain)
    plain = junk.stage / "T:plainfile"
    plain.write_bytes(b"a file with a task's name")
    junk.drop(plain)
    (junk.stage / "T:empty").mkdir()
    junk.drop(junk.stage / "T:empty")
    os.mkfifo(junk.stage / "T:fifo")
    junk.drop(junk.stage / "T:fifo")
    os.symlink(outside / "T:outside", junk.stage / "T:symlinked")
    junk.drop(junk.stage / "T:symlinked")
    weird = os.path.join(os.fsencode(junk.stage), b"T:\xff\xfe")
    os.mkdir(weird)
    junk.drop(weird)
    junk.drop(junk.task("T:new\nline"))

    path = junk.task("T:nostatus")
    (path / "status.json").unlink()
    junk.drop(path)
    junk.drop(with_status("T:truncated", b'{"state": "ENQ'))
    junk.drop(with_status("T:binary", b"\xff\xfe\x00garbage"))
    junk.drop(with_status("T:list", b"[]"))
    junk.drop(with_status("T:deep", b"[" * 100_000))
    junk.drop(with_status("T:finished", json.dumps({"type": "T", "id": "finished", "state": "FINISHED", "claim": 0}).encode()))
    for name, data in (("T:tmp-nodate", b'{"state": "RUNNING"}'), ("T:tmp-deep", b"{" * 100_000)):
        path = junk.task(name)  # a planted "interrupted status write": never logged, so dropped
        (path / "status.json.tmp").write_bytes(data)
        os.rename(path, root / "enqueued" / name)
    path = junk.task("T:badinputname")
    doc = json.loads((path / "status.json").read_text())
    doc["input"] = "../../../../etc/passwd"
    (path / "status.json").write_text(json.dumps(doc))
    junk.drop(path)
    path = junk.task("T:noinput")
    (path / "input.pkl").unlink()
    junk.drop(path)
    path = junk.task("T:nolog")
    (path / "log").unlink()
    junk.drop(path)
    for name in ("status.json", "log", "input.pkl"):
        path = junk.task(f"T:fifo-{name}")
        (path / name).unlink()
        os.mkfifo(path / name)
        junk.drop(path)
    path = junk.task("T:statuslink")
    (path / "status.json").unlink()
    os.symlink(passwd, path / "status.json")
    junk.drop(path)
    path = junk.task("T:inputlink")
    (path / "input.pkl").unlink()
    os.symlink(evil, path / "input.pkl")
    junk.drop(path)
    path = junk.task("T:loglink")
    (path / "log").unlink()
    os.symlink(passwd, path / "log")
    junk.drop(path)

    def settled() -> bool:
        # (A .reason file is written just after its entry is moved in.)
        reasons = all(os.path.exists(root / "quarantine" / (n + ".reason")) for n in quarantined(root))
        return reasons and not os.listdir(root / "enqueued") and not os.listdir(root / "scheduled/server1") \
            and not os.listdir(root / "running")

    try:
        wait_until(settled, what="every junk entry dealt with")
    except AssertionError:
        left = [os.listdir(root / d) for d in ("enqueued", "scheduled/server1", "running")]
        raise AssertionError(f"left: {left}; daemon exit {proc.poll()}: {stop(proc)[1][-3000:]}") from None
    finishes_good_work(spool, proc, "after")
    assert spool.status("T", "tmp-nodate").state == spool.status("T", "tmp-deep").state == State.FINISHED
    assert len(quarantined(root)) == len(junk.names)
    reasons = {}
    for name in quarantined(root):
        reason = (root / "quarantine" / (name + ".reason")).read_text(errors="replace")
        assert reason.strip(), name
        reasons[name.rsplit(".", 2)[0]] = reason
    assert "input.pkl is missing" in reasons["T:noinput"]  # found at start, not at claim
    assert "not a regular file" in reasons["T:fifo-status.json"]
    assert "log cannot be appended to" in reasons["T:loglink"]
    assert "status.json is corrupt" in reasons["T:deep"]
    assert "unknown input file" in reasons["T:badinputname"]
    assert "not a task name" in reasons["README"]
    # Nothing outside the spool was followed, read as a task or written.
    assert snapshot(outside) == before_outside
    assert not marker.exists()
    assert check(Spool(root)).ok
    code, err = stop(proc)
    assert code == 0 and "Traceback" not in err, err


def test_a_pickle_that_raises_on_load_fails_its_task_and_only_it(daemon_env):
    spool, root, workers, _ = daemon_env
    spool.enqueue_pickled("T", "badint", b"cbuiltins\nint\n(S'not a number'\ntR.")
    spool.enqueue_pickled("T", "nomodule", b"cno_such_module_xyz\nthing\n.")
    proc = workers.start()
    wait_until(lambda: spool.status("T", "nomodule").state == State.FAILED, what="nomodule FAILED")
    wait_until(lambda: spool.status("T", "badint").state == State.FAILED, what="badint FAILED")
    assert spool.status("T", "badint").doc["message"] == (
        "input cannot be loaded: ValueError: invalid literal for int() with base 10: 'not a number'")
    assert "ModuleNotFoundError" in spool.status("T", "nomodule").doc["message"]
    finishes_good_work(spool, proc, "good")
    code, err = stop(proc)
    assert code == 0


def test_a_bad_pickle_is_refused_at_enqueue(spool):
    root = Path(spool.root)
    before = snapshot(root)
    for payload in (b"", b"not a pickle", pickle.dumps([1, 2])[:-3], b"\x80\x05K"):
        with pytest.raises(InvalidInput):
            spool.enqueue_pickled("T", "p", payload)
    with pytest.raises(InvalidInput):
        spool.enqueue("T", "p", lambda: None)
    assert snapshot(root) == before


def test_an_input_over_the_limit_is_refused_and_nothing_is_written(tmp_path):
    spool = Spool.init(tmp_path / "spool", durable=False, max_input_bytes=1000)
    spool.register_type("T", "pkg.mod.func")
    root = Path(spool.root)
    before = snapshot(root)
    with pytest.raises(InvalidInput, match="over the spool's limit of 1000"):
        spool.enqueue("T", "big", b"x" * 1000)
    with pytest.raises(InvalidInput):
        spool.enqueue_json("T", "big", "x" * 1000)
    assert snapshot(root) == before
    spool.enqueue("T", "small", b"x" * 900)


# --------------------------------------------------------------------------- the filesystem


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str = "2m"):
    path.mkdir(exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0770", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root in the initial mount namespace): {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(path: Path) -> Path:
    """Fill the filesystem of *path* with one file; returns it."""
    filler = path / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    try:
        while True:  # and the last few bytes a small write may still find
            with open(path / f"crumb{os.urandom(4).hex()}", "wb") as fh:
                fh.write(b"\0" * 512)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    return filler


def test_a_full_disk_refuses_enqueues_cleanly_and_corrupts_nothing(tmp_path):
    with mounted_tmpfs(tmp_path / "fs") as fs:
        # The mount point is the root: the worker's log (beside the root)
        # stays off the filesystem the test fills.
        spool = Spool.init(fs, durable=False)
        spool.register_type("T", "daemon_handlers.add")
        spool.register_type("W", "hostile_handlers.wait_for_file", timeout=3, max_restarts=3)
        root = Path(spool.root)
        go, started = tmp_path / "go", tmp_path / "started"
        spool.enqueue("W", "inflight", {"go": str(go), "started": str(started)})
        workers = Workers(root)
        try:
            proc = workers.start(concurrency=1)
            wait_until(started.exists, what="the long task running")
            spool.enqueue("T", "waiting", [1, 2])  # behind it, for the one slot
            (fs / "junk").mkdir()
            fill(fs / "junk")

            waiting = snapshot(root / "enqueued")
            errors = []
            for i in range(10):
                try:
                    spool.enqueue("T", f"full{i}", list(range(2000)))
                except OSError as exc:
                    errors.append(exc.errno)
            assert errors == [errno.ENOSPC] * 10
            assert snapshot(root / "enqueued") == waiting  # nothing half-written
            assert os.listdir(root / "tmp") == []  # staging cleaned

            # The running task ends but cannot record it; the freed slot
            # claims the waiting task (a claim writes nothing) but cannot
            # start it (no room for a status). The daemon lives, and every
            # status stays whole.
            go.touch()
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                assert proc.poll() is None, "the daemon must survive a full disk"
                assert spool.status("W", "inflight").state == State.RUNNING
                # Waiting, or claimed for the moment before its start fails: never started.
                assert spool.status("T", "waiting").state in (State.ENQUEUED, State.SCHEDULED)
                time.sleep(0.05)

            shutil.rmtree(fs / "junk")
            wait_until(lambda: spool.status("T", "waiting").state == State.FINISHED, what="waiting task ran")
            wait_until(lambda: spool.status("W", "inflight").state == State.FINISHED, what="long task re-run")
            info = spool.status("W", "inflight")
            assert info.doc["restarts"] == 1 and "timed out" in spool.log_records("W", "inflight")[-4].message
            finishes_good_work(spool, proc, "after")
            assert check(Spool(root)).ok
            code, err = stop(proc)
            assert code == 0, err
            assert "cannot record the end of W:inflight" in err
            assert "T:waiting: cannot start it: No space left on device; claiming again in 1 s" in err
            assert "Traceback" not in err
        finally:
            workers.stop_all()


def test_world_writable_root_or_state_dir_is_refused_with_the_fix(spool, tmp_path):
    root = Path(spool.root)
    for target in (root, root / "enqueued", root / "scheduled"):
        os.chmod(target, 0o777)
        with pytest.raises(UnsafeSpool, match=f"chmod o-w {target}$"):
            Spool(root)
        os.chmod(target, 0o2770)
    Spool(root)


def test_a_state_dir_on_another_filesystem_is_refused_never_copied(tmp_path):
    spool = Spool.init(tmp_path / "spool", durable=False)
    spool.register_type("T", "daemon_handlers.add")
    root = Path(spool.root)
    spool.enqueue("T", "a", [1])
    spool.enqueue("T", "b", [1])
    claim = spool.claim("s1")
    spool.start(claim)
    with mounted_tmpfs(root / "done"):
        with pytest.raises(CrossDevice, match="done is on another filesystem"):
            Spool(root)
        proc = Workers(root).start()
        assert proc.wait(20) == 78
        assert "another filesystem" in stderr_of(proc)
        # A spool opened before the mount re-checks before it unpickles...
        with pytest.raises(CrossDevice):
            spool.start(spool.claim("s1"))
        # ...and a task started before it fails its finishing move (EXDEV)
        # instead of copying; the task stays whole where it was.
        with pytest.raises(OSError) as err:
            spool.set_state(claim, State.FINISHED)
        assert err.value.errno == errno.EXDEV
        assert os.listdir(root / "done") == []
        assert os.path.isfile(root / "running/T:a/input.pkl")
    spool.release_server("s1")
    report = check(Spool(root), repair=True)
    assert report.ok
    assert spool.status("T", "a").state == State.FINISHED  # the interrupted finish, completed
    assert spool.status("T", "b").state == State.ENQUEUED  # handed back


# --------------------------------------------------------------------------- the command line

_CLI_DRIVER = """
import contextlib, io, json, sys, traceback
from spoolq.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    sys.argv = ["spoolq", *argv]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        code = "escaped"
        err.write(traceback.format_exc())
    results.append([argv, code, err.getvalue()])
print(json.dumps(results))
"""


def test_bad_names_through_the_cli_are_one_line_errors_and_write_nothing(spool, tmp_path):
    """Every command that takes a name, with every bad name, in one real
    process calling the CLI's entry point in a loop (a process per case
    would cost a second each). A NUL cannot be passed in argv at all; a name
    starting with '-' is an option to the parser unless it follows '--'."""
    root = Path(spool.root)
    pickled = tmp_path / "in.pkl"
    pickled.write_bytes(pickle.dumps(1))
    spool.enqueue("T", "ok", None)
    before = snapshot(root)
    names = [n for n in BAD_NAMES if "\x00" not in n]
    cases = []
    for bad in names:  # each name as a task id, a type and a server id
        cases += [["enqueue", "T", "--", bad, str(pickled)], ["enqueue", "--", bad, "id1", str(pickled)],
                  ["worker", "--", bad]]
    others = [["status", "T", "--"], ["log", "T", "--"], ["result", "T", "--"], ["delete", "T", "--"],
              ["wait", "T", "--"], ["register", "--", None, "pkg.mod.func"]]
    for i, bad in enumerate(names * 2):  # and the other commands, a rotating share of the names each
        command = others[i % len(others)]
        cases.append([bad if a is None else a for a in command] + ([bad] if None not in command else []))
    cases = [["--root", str(root), *case] for case in cases]
    proc = subprocess.run([sys.executable, "-c", _CLI_DRIVER, json.dumps(cases)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for argv, code, err in json.loads(proc.stdout):
        command = argv[2]
        expected = {"wait": 2, "worker": 78}.get(command, 1)
        assert code == expected, (argv, code, err)
        assert err.startswith("spoolq: ") and err.count("\n") == 1, (argv, err)
        assert "invalid" in err or "must not be empty" in err or "longer than" in err, (argv, err)
    assert snapshot(root) == before


def test_a_file_whose_size_lies_is_still_read_whole_and_within_its_limit():
    """read_file reads a small file in one call, trusting fstat's size; a
    regular file whose size is not its length (here /proc, whose files say
    0 bytes) is read on to its end, and its limit still holds."""
    from spoolq.store import fsutil

    with open("/proc/self/mounts", "rb") as fh:
        whole = fh.read()
    assert os.stat("/proc/self/mounts").st_size == 0 and len(whole) > 100
    assert fsutil.read_file(None, "/proc/self/mounts") == whole
    with pytest.raises(OSError) as err:
        fsutil.read_file(None, "/proc/self/mounts", limit=50)
    assert err.value.errno == errno.EFBIG


def test_a_stale_claim_raised_by_the_handler_fails_its_task_like_any_exception(daemon_env):
    """A handler that raised StaleClaim (its own, or a context kept from an
    earlier task) was taken for a run whose task was taken away: the task
    sat RUNNING with nothing running it, until sweeps ran it again and
    again, "timed out" each time (an outside tester)."""
    spool, root, workers, tmp = daemon_env
    spool.register_type("S", "hostile_handlers.raise_stale_claim", timeout=60, max_restarts=2)
    spool.enqueue("S", "a", {})
    proc = workers.start("w1")
    wait_until(lambda: spool.status("S", "a").state.terminal, what="the task final")
    info = spool.status("S", "a")
    assert info.state == State.FAILED and info.doc["message"] == "StaleClaim: raised by the handler itself", info.doc
    assert info.doc["starts"] == 1 and info.doc["restarts"] == 0, info.doc
    assert "taken away" not in stderr_of(proc)
    finishes_good_work(spool, proc, "after-stale")


def test_a_forked_child_coming_back_out_of_the_handler_exits_and_runs_nothing(daemon_env):
    """A handler's forked child that raised went on into its process's loop:
    it recorded the task FAILED while the parent still ran it, then read and
    ran the next tasks meant for the parent; a parent waiting for that child
    waited for ever (an outside tester)."""
    spool, root, workers, tmp = daemon_env
    rec = tmp / "rec"
    spool.register_type("F", "hostile_handlers.fork_child_raises", timeout=60)
    spool.enqueue("F", "a", {"record": str(rec)})
    proc = workers.start("w1", concurrency=1)
    wait_until(lambda: spool.status("F", "a").state.terminal, what="the task final")
    info = spool.status("F", "a")
    assert info.state == State.FINISHED, info.doc
    assert [r[0] for r in (line.split() for line in rec.read_text().splitlines())] == ["parent-done"], rec.read_text()
    assert b"ValueError: the child raises" in spool.queries.output("F", "a")
    finishes_good_work(spool, proc, "after-fork")


def test_a_handler_process_failing_on_its_own_says_so_through_the_workers_log(daemon_env):
    """A handler process that failed in its own code (a handler had broken
    its json module) printed a bare traceback, with no time, level or logger,
    which journald could not give a priority."""
    spool, root, workers, tmp = daemon_env
    spool.register_type("J", "hostile_handlers.break_json", timeout=60, max_restarts=0)
    spool.enqueue("J", "a", {})
    proc = workers.start("w1")
    wait_until(lambda: "handler process" in stderr_of(proc) and "stopped on an error of its own" in stderr_of(proc),
               what="the handler process's line")
    err = stderr_of(proc).splitlines()
    first = next(i for i, line in enumerate(err) if "stopped on an error of its own" in line)
    assert " CRITICAL spoolq.executor: handler process " in err[first], err[first]
    assert err[first + 1] == "Traceback (most recent call last):", err[first:first + 2]
    finishes_good_work(spool, proc, "after-json")


def test_a_quarantine_on_a_full_disk_moves_nothing_and_leaves_no_empty_note(tmp_path):
    """`fsck --repair` on a full filesystem moved a leftover into quarantine/
    and then could not write its .reason: an empty note, no finding
    reported, and every later fsck clean (an outside tester)."""
    with mounted_tmpfs(tmp_path / "fs") as fs:
        spool = Spool.init(fs, durable=False)
        spool.register_type("T", "daemon_handlers.add")
        junk = fs / "enqueued" / "not-a-task-name"
        junk.mkdir()
        (fs / "junk").mkdir()
        fill(fs / "junk")
        done = subprocess.run([sys.executable, "-m", "spoolq", "--root", str(fs), "fsck", "--repair"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and "No space left on device" in done.stdout + done.stderr, done
        assert "Traceback" not in done.stderr, done.stderr
        assert junk.is_dir() and os.listdir(fs / "quarantine") == []  # nothing moved, no empty note
        shutil.rmtree(fs / "junk")
        done = subprocess.run([sys.executable, "-m", "spoolq", "--root", str(fs), "fsck", "--repair"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "bad-name" in done.stdout and "1 repaired" in done.stdout, done.stdout
        notes = [n for n in os.listdir(fs / "quarantine") if n.endswith(".reason")]
        assert len(notes) == 1 and (fs / "quarantine" / notes[0]).read_text().strip(), notes
