"""The ``spoolq`` command line (docs/contract.md §4), run as real processes.

Every test runs ``python -m spoolq`` on a fresh spool under tmp_path and
checks the exit status and output a script would rely on. Set-up that is
not the command under test goes through the Spool API directly.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from spoolq import Spool, SpoolError, State, TaskNotFound

TYPE = "SequenceSum"
HANDLER = "spoolq.demo.sequence_sum"
DEADLINE = 30.0



def spoolq(*args: str | Path, root: Path | None = None, stdin: bytes | None = None,
           env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    cmd = [sys.executable, "-m", "spoolq"]
    if root is not None:
        cmd += ["--root", str(root)]
    full_env = {k: v for k, v in os.environ.items() if k != "SPOOLQ_ROOT"}
    full_env.update(env or {})
    return subprocess.run(cmd + [str(a) for a in args], input=stdin, capture_output=True,
                          env=full_env, timeout=timeout)


def out(proc: subprocess.CompletedProcess[bytes]) -> str:
    return proc.stdout.decode()


def assert_one_line_error(proc: subprocess.CompletedProcess[bytes], code: int | None = None) -> str:
    err = proc.stderr.decode()
    if code is None:
        assert proc.returncode != 0, err
    else:
        assert proc.returncode == code, (proc.returncode, err)
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("spoolq: ")
    return err


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "spool"
    Spool.init(path, durable=False).register_type(TYPE, HANDLER, timeout=60, retention=600, max_restarts=3)
    return path


@pytest.fixture
def spool(root: Path) -> Spool:
    return Spool(root)


@pytest.fixture
def pickled(tmp_path: Path) -> Path:
    path = tmp_path / "input.pkl"
    path.write_bytes(pickle.dumps((1, 2, 3)))
    return path


def finish(spool: Spool, task_id: str, state: State = State.FINISHED, response: bytes | None = None,
           message: str = "done by the test") -> None:
    """Act as a worker: claim, start and finish the oldest waiting task."""
    claim = spool.claim("tester")
    assert claim is not None and claim.id == task_id
    spool.start(claim)
    if response is not None:
        spool.store_response(claim, response, "application/x-test")
    spool.set_state(claim, state, message)


# --------------------------------------------------------------------------- spool and types


def test_init_prints_the_path_and_keeps_settings(tmp_path: Path) -> None:
    path = tmp_path / "new"
    proc = spoolq("init", "--max-queue", "3", "--no-durable", "--max-input-bytes", "1000", root=path)
    assert proc.returncode == 0, proc.stderr
    assert out(proc).strip() == str(path)
    again = spoolq("init", env={"SPOOLQ_ROOT": str(path)})  # idempotent; the root from the environment
    assert again.returncode == 0 and out(again).strip() == str(path)
    spool = Spool(path)
    assert (spool.max_queue, spool.durable, spool.max_input_bytes) == (3, False, 1000)


def test_init_without_a_change_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    assert spoolq("init", "--max-queue", "3", root=path).returncode == 0
    settings = path / "spool.json"
    before = settings.stat()
    for args in (("init",), ("init", "--max-queue", "3", "--durable")):  # nothing new: spool.json untouched
        assert spoolq(*args, root=path).returncode == 0
        after = settings.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), args
    assert spoolq("init", "--max-queue", "4", root=path).returncode == 0
    assert settings.stat().st_ino != before.st_ino and Spool(path).max_queue == 4


def test_settings_changed_at_once_are_all_kept(tmp_path: Path) -> None:
    """Four inits at once, three of them each changing another setting:
    every one succeeds, no change is lost, no staging file is left."""
    path = tmp_path / "spool"
    Spool.init(path)
    env = {k: v for k, v in os.environ.items() if k != "SPOOLQ_ROOT"}
    for round_ in range(8):
        durable = round_ % 2 == 0
        calls = [("--max-queue", str(round_)), ("--max-input-bytes", str(1000 + round_)),
                 ("--durable" if durable else "--no-durable",), ()]
        procs = [subprocess.Popen([sys.executable, "-m", "spoolq", "--root", str(path), "init", *args],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env) for args in calls]
        for proc, args in zip(procs, calls):
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, (round_, args, err.decode())
        spool = Spool(path)
        assert (spool.max_queue, spool.max_input_bytes, spool.durable) == (round_, 1000 + round_, durable), round_
    assert sorted(os.listdir(path)) == sorted(["spool.json", "metrics", "types", "tmp", "enqueued", "scheduled",
                                               "running", "done", "quarantine", "locks"])


def test_register_and_types(root: Path) -> None:
    proc = spoolq("register", "Other", "pkg.mod.func", "--timeout", "5", "--retention", "10", "--max-restarts", "1",
                  root=root)
    assert proc.returncode == 0, proc.stderr
    assert spoolq("register", "Defaults", "pkg.mod.func", root=root).returncode == 0
    types = {t["name"]: t for t in json.loads(out(spoolq("types", "--json", root=root)))}
    assert types["Other"] == {"name": "Other", "handler": "pkg.mod.func", "timeout": 5.0, "retention": 10.0,
                              "max_restarts": 1, "executor": "fork", "memory_max": None, "cpu_time": None,
                              "nice": None, "max_open_files": None, "retries": 0, "retry_backoff": 10.0, "retry_backoff_max": 3600.0, "priority": 0, "concurrency": 0, "held": False,
                              "max_output_bytes": 1 << 20}
    assert (types["Defaults"]["timeout"], types["Defaults"]["retention"], types["Defaults"]["max_restarts"]) == (
        3600.0, -1.0, 2)
    table = out(spoolq("types", root=root))
    assert re.search(r"Defaults\s+pkg\.mod\.func\s+3600\s+forever\s+2", table), table


@pytest.mark.parametrize("args", [["../x", "pkg.mod.func"], ["Good", "nodots"]])
def test_register_refuses_bad_input(root: Path, args: list[str]) -> None:
    assert_one_line_error(spoolq("register", *args, root=root), 1)


@pytest.mark.parametrize("args", [
    ["--timeout", "99999999999999d"], ["--retention", "99999999999999d"], ["--retry-backoff", "99999999999d"],
    ["--retry-backoff-max", "99999999999d"], ["--cpu-time", "36526d"], ["--timeout", "36525.5d"],
    ["--max-restarts", "99999999999999999999999"], ["--retries", "10001"], ["--concurrency", "10001"],
])
def test_register_refuses_a_duration_over_100_years_or_a_count_over_10000(root: Path, args: list[str]) -> None:
    err = assert_one_line_error(spoolq("register", "Absurd", "pkg.mod.func", *args, root=root), 2)
    assert args[0] in err, err
    assert "Absurd" not in out(spoolq("types", root=root))
    setting = args[0][2:].replace("-", "_")
    value = 10**23 if setting in ("max_restarts", "retries", "concurrency") else 1e20
    with pytest.raises(SpoolError, match=setting):
        Spool(root).register_type("Absurd", "pkg.mod.func", **{setting: value})
    assert "Absurd" not in out(spoolq("types", root=root))


def test_register_takes_the_bounds_and_still_normalises(root: Path) -> None:
    proc = spoolq("register", "Edge", "pkg.mod.func", "--timeout", "36525d", "--retention", "36525d",
                  "--retry-backoff", "36525d", "--retry-backoff-max", "36525d", "--max-restarts", "10000",
                  "--retries", "10000", "--concurrency", "10000", root=root)
    assert proc.returncode == 0, proc.stderr
    assert spoolq("register", "Low", "pkg.mod.func", "--timeout", "-99999999999999d", "--retention", "0",
                  "--max-restarts", "-3", root=root).returncode == 0
    types = {t["name"]: t for t in json.loads(out(spoolq("types", "--json", root=root)))}
    century = 36525 * 86400.0
    assert [types["Edge"][k] for k in ("timeout", "retention", "retry_backoff", "retry_backoff_max")] == [century] * 4
    assert [types["Edge"][k] for k in ("max_restarts", "retries", "concurrency")] == [10_000] * 3
    assert (types["Low"]["timeout"], types["Low"]["retention"], types["Low"]["max_restarts"]) == (0.0, -1.0, 0)


@pytest.mark.parametrize("setting, value", [
    ("timeout", "abc"), ("timeout", "10"), ("timeout", None), ("timeout", float("nan")), ("timeout", float("inf")),
    ("timeout", True), ("retention", float("nan")), ("retention", "1d"), ("max_restarts", "x"), ("max_restarts", 2.7),
    ("max_restarts", True), ("retries", 2.5), ("retries", True), ("retry_backoff", float("nan")),
    ("retry_backoff_max", "1h"), ("concurrency", "3"), ("memory_max", 1.5), ("cpu_time", float("nan")),
    ("nice", True), ("max_open_files", 8.0), ("max_output_bytes", 4096.0), ("priority", 1.5),
])
def test_register_refuses_a_setting_that_is_not_a_number_of_its_kind(root: Path, setting: str, value: object) -> None:
    """Contract §5.2: a setting that is not a number (a str, None, a bool),
    not a whole one where the setting counts, or NaN or infinity where it is
    seconds, is a SpoolError with a one-line message naming it, through
    Spool.register_type and the tracker's registerTaskType alike; never a
    bare ValueError/TypeError, never stored rounded or as "no limit". The
    command line's parsers refuse such text as a usage error (exit 2)."""
    from spoolq import tracker

    with pytest.raises(SpoolError, match=f"^{setting} must be a (whole|finite) number, not ") as caught:
        Spool(root).register_type("Bad", "pkg.mod.func", **{setting: value})
    assert "\n" not in str(caught.value)
    atp = {"timeout": "timeout", "retention": "timeret", "max_restarts": "maxrestart"}
    if setting in atp:
        tracker.use_spool(Spool(root))
        try:
            with pytest.raises(SpoolError, match=f"^{setting} must be"):
                tracker.registerTaskType("Bad", "pkg.mod.func", **{atp[setting]: value})
        finally:
            tracker.use_spool(None)
        if str(value) in ("abc", "nan", "inf", "x", "2.7"):  # bad as text too ("10" and "1d" are good text)
            option = "--" + setting.replace("_", "-")
            err = assert_one_line_error(spoolq("register", "Bad", "pkg.mod.func", option, str(value), root=root), 2)
            assert option in err, err
    assert "Bad" not in out(spoolq("types", root=root))


@pytest.mark.parametrize("args, option", [
    (("init", "--max-queue", "-1"), "--max-queue"),
    (("init", "--max-input-bytes", "0"), "--max-input-bytes"),
    (("register", "Other", "pkg.mod.func", "--max-output-bytes", "1"), "--max-output-bytes"),
    (("worker", "w1", "--types", "Good,Bad Name"), "--types"),
    (("init", "--max-queue", "99999999999999999999999"), "--max-queue"),
    (("wait", TYPE, "x", "--timeout", "nan"), "--timeout"),  # waited forever
    (("wait", TYPE, "x", "--timeout", "-1"), "--timeout"),  # "timed out after -1 s"
    (("log", TYPE, "x", "--follow", "--timeout", "nan"), "--timeout"),
])
def test_a_value_out_of_range_is_a_usage_error_and_nothing_is_written(root: Path, tmp_path: Path,
                                                                      args: tuple[str, ...], option: str) -> None:
    """Contract §4.3 and §4.12: a bad option value is a usage error (exit 2),
    named in the line; nothing is created, stored or started."""
    before = (root / "spool.json").read_bytes(), sorted(os.listdir(root / "types"))
    err = assert_one_line_error(spoolq(*args, root=root), 2)
    assert option in err, err
    assert ((root / "spool.json").read_bytes(), sorted(os.listdir(root / "types"))) == before
    if args[0] == "init":  # on a new spool: nothing made
        assert_one_line_error(spoolq(*args, root=tmp_path / "new"), 2)
        assert not (tmp_path / "new").exists()


# --------------------------------------------------------------------------- enqueue and one task


def test_enqueue_from_file_stdin_and_json(root: Path, spool: Spool, pickled: Path) -> None:
    assert spoolq("enqueue", TYPE, "fromfile", pickled, root=root).returncode == 0
    assert spoolq("enqueue", TYPE, "fromstdin", "-", root=root, stdin=pickle.dumps([4, 5])).returncode == 0
    proc = spoolq("enqueue", TYPE, "json", "-", "--json", root=root, stdin=b'{"values": [1, 2]}')
    assert proc.returncode == 0, proc.stderr
    assert out(spoolq("status", TYPE, "fromfile", root=root)) == "ENQUEUED\n"
    doc = json.loads(out(spoolq("status", TYPE, "json", "--json", root=root)))
    assert doc["state"] == "ENQUEUED" and doc["type"] == TYPE and doc["id"] == "json"
    assert json.loads((Path(doc["path"]) / "input.json").read_text()) == {"values": [1, 2]}
    # The worker's view: FIFO order and the inputs as given.
    for task_id, value in [("fromfile", (1, 2, 3)), ("fromstdin", [4, 5]), ("json", {"values": [1, 2]})]:
        claim = spool.claim("tester")
        assert claim is not None and claim.id == task_id
        assert spool.start(claim).input == value


def test_enqueue_queue_full_exits_75_and_writes_nothing(tmp_path: Path, pickled: Path) -> None:
    path = tmp_path / "small"
    Spool.init(path, max_queue=1, durable=False).register_type(TYPE, HANDLER)
    assert spoolq("enqueue", TYPE, "one", pickled, root=path).returncode == 0
    err = assert_one_line_error(spoolq("enqueue", TYPE, "two", pickled, root=path), 75)
    assert "full" in err
    assert [i.id for i in Spool(path).list_tasks()] == ["one"]


def test_enqueue_errors_are_one_line(root: Path, pickled: Path, tmp_path: Path) -> None:
    assert spoolq("enqueue", TYPE, "dup", pickled, root=root).returncode == 0
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"this is not a pickle")
    cases = {
        "unknown type": spoolq("enqueue", "NoSuchType", "a", pickled, root=root),
        "bad id": spoolq("enqueue", TYPE, "../etc", pickled, root=root),
        "duplicate": spoolq("enqueue", TYPE, "dup", pickled, root=root),
        "missing input file": spoolq("enqueue", TYPE, "a", tmp_path / "missing.pkl", root=root),
        "input is a directory": spoolq("enqueue", TYPE, "a", tmp_path, root=root),
        "corrupt pickle": spoolq("enqueue", TYPE, "a", bad, root=root),
        "truncated pickle": spoolq("enqueue", TYPE, "a", "-", root=root, stdin=pickle.dumps((1, 2))[:-3]),
        "invalid JSON": spoolq("enqueue", TYPE, "a", "-", "--json", root=root, stdin=b"{nope"),
        "missing spool": spoolq("enqueue", TYPE, "a", pickled, root=tmp_path / "nowhere"),
        "empty path": spoolq("enqueue", TYPE, "a", "", root=root),
    }
    for what, proc in cases.items():
        assert proc.returncode == 1, (what, proc.stderr)
        assert_one_line_error(proc, 1)
    assert cases["input is a directory"].stderr.decode().rstrip().endswith(f": {tmp_path}")
    assert cases["empty path"].stderr.decode().rstrip().endswith(": '' (an empty path)")  # it named nothing
    # Input in the other format than the one asked for: the line says so.
    json_as_pickle = spoolq("enqueue", TYPE, "a", "-", root=root, stdin=b"[1, 2, 3]")
    assert assert_one_line_error(json_as_pickle, 1).rstrip().endswith("(it looks like JSON: add --json)")
    pickle_as_json = spoolq("enqueue", TYPE, "a", "-", "--json", root=root, stdin=pickle.dumps([1]))
    assert assert_one_line_error(pickle_as_json, 1).rstrip().endswith("(it looks like a pickle: leave out --json)")
    assert [i.id for i in Spool(root).list_tasks()] == ["dup"]


def test_nan_and_infinity_are_not_json_and_are_never_stored(root: Path, spool: Spool, tmp_path: Path) -> None:
    """Contract §3.2: input.json is one JSON document. Python's json writes
    and reads NaN, Infinity and -Infinity, which JSON has not: every way in
    (enqueue_json of a value or of JSON text, enqueue_many, the command
    line's enqueue --json and enqueue-many) refuses them as InvalidInput,
    and nothing is written."""
    from spoolq import InvalidInput

    for value in (float("nan"), [1, float("inf")], {"a": {"b": -float("inf")}}, b"NaN", b'{"a": Infinity}',
                  b"[-Infinity]"):
        with pytest.raises(InvalidInput, match="^input (is not JSON|cannot be stored as JSON): ") as caught:
            spool.enqueue_json(TYPE, "n", value)
        assert "\n" not in str(caught.value)
    results = spool.enqueue_many(TYPE, [{"id": "m1", "input": float("nan")}, {"id": "m2", "input": [1.5]}])
    assert [type(r.error) for r in results] == [InvalidInput, type(None)]
    assert [t.id for t in spool.list_tasks()] == ["m2"] and not os.listdir(root / "tmp")
    assert (root / "enqueued" / f"{TYPE}:m2" / "input.json").read_bytes() == b"[1.5]"

    nan_file = tmp_path / "nan.json"
    nan_file.write_bytes(b'{"x": NaN}')
    err = assert_one_line_error(spoolq("enqueue", TYPE, "c1", nan_file, "--json", root=root), 1)
    assert "input is not JSON: NaN is not allowed" in err, err
    proc = spoolq("enqueue-many", TYPE, "-", root=root, stdin=b'{"id": "c2", "input": Infinity}\n{"id": "c3", "input": 1}\n')
    assert proc.returncode == 1 and out(proc) == "1\n", proc
    assert proc.stderr.decode().splitlines() == ["spoolq: line 1: not JSON: Infinity is not allowed"]
    assert sorted(t.id for t in spool.list_tasks()) == ["c3", "m2"] and not os.listdir(root / "tmp")


def test_status_log_result_delete(root: Path, spool: Spool) -> None:
    spool.enqueue(TYPE, "t1", (1, 2))
    binary = bytes(range(256))
    finish(spool, "t1", response=binary)
    assert out(spoolq("status", TYPE, "t1", root=root)) == "FINISHED\n"
    doc = json.loads(out(spoolq("status", TYPE, "t1", "--json", root=root)))
    assert (doc["state"], doc["code"], doc["response_mime"]) == ("FINISHED", 5, "application/x-test")
    assert doc["path"] == str(root / "done" / f"{TYPE}:t1")
    lines = out(spoolq("log", TYPE, "t1", root=root)).splitlines()
    assert [line.split()[1] for line in lines] == ["ENQUEUED", "SCHEDULED", "RUNNING", "FINISHED"]
    assert lines[-1].endswith("done by the test")
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+\+00:00 ", line) for line in lines)
    result = spoolq("result", TYPE, "t1", root=root)
    assert result.returncode == 0 and result.stdout == binary
    assert spoolq("delete", TYPE, "t1", root=root).returncode == 0
    assert_one_line_error(spoolq("status", TYPE, "t1", root=root), 1)


def test_log_lines_escape_a_message_as_the_log_stores_it(root: Path, spool: Spool) -> None:
    """A tab or carriage return in a message printed raw broke the columns
    or overwrote the line on a terminal; a newline was escaped already."""
    spool.enqueue(TYPE, "esc", None)
    finish(spool, "esc", State.FAILED, message="a\tb\rc\\d\ne")
    last = out(spoolq("log", TYPE, "esc", root=root)).splitlines()[-1]
    assert last.endswith("FAILED     a\\tb\\rc\\\\d\\ne"), repr(last)
    doc = json.loads(out(spoolq("log", TYPE, "esc", "--json", root=root)))
    assert doc[-1]["message"] == "a\tb\rc\\d\ne"


def test_one_task_errors_are_one_line(root: Path, spool: Spool, tmp_path: Path) -> None:
    spool.enqueue(TYPE, "waiting", None)
    cases = [
        ("status", TYPE, "nope"),
        ("status", "NoSuchType", "x"),
        ("status", TYPE, "bad/id"),
        ("log", TYPE, "nope"),
        ("result", TYPE, "nope"),
        ("result", TYPE, "waiting"),  # no response stored
        ("delete", TYPE, "nope"),
        ("delete", TYPE, ".hidden"),
        ("list", "--type", "../x"),
    ]
    for args in cases:
        assert_one_line_error(spoolq(*args, root=root), 1)
    for args in [("status", TYPE, "x"), ("list",), ("types",), ("sweep",), ("stats",)]:
        err = assert_one_line_error(spoolq(*args, root=tmp_path / "nowhere"), 1)
        assert "spoolq init" in err


def test_list_filters_and_json(root: Path, spool: Spool) -> None:
    spool.register_type("Other", HANDLER)
    for task_id in ("a", "b", "c"):
        spool.enqueue(TYPE, task_id, None)
    spool.enqueue("Other", "x", None)
    finish(spool, "a")
    everything = json.loads(out(spoolq("list", "--json", root=root)))
    assert sorted((d["type"], d["id"], d["state"]) for d in everything) == [
        ("Other", "x", "ENQUEUED"), (TYPE, "a", "FINISHED"), (TYPE, "b", "ENQUEUED"), (TYPE, "c", "ENQUEUED")]
    waiting = json.loads(out(spoolq("list", "--state", "enqueued", "--type", TYPE, "--json", root=root)))
    assert sorted(d["id"] for d in waiting) == ["b", "c"]
    assert json.loads(out(spoolq("list", "--state", "FAILED", "--json", root=root))) == []
    table = out(spoolq("list", "--type", "Other", root=root))
    assert "x" in table and "ENQUEUED" in table and "FINISHED" not in table
    assert spoolq("list", "--state", "sleeping", root=root).returncode == 2  # a usage error, from typer


def test_list_keeps_one_task_a_line(root: Path, spool: Spool) -> None:
    spool.enqueue(TYPE, "t", None)
    finish(spool, "t", State.FAILED, message="first line\nsecond [bold]line[/bold]")
    lines = out(spoolq("list", root=root)).splitlines()
    assert len(lines) == 2, lines
    assert lines[1].endswith("first line\\nsecond [bold]line[/bold]")


# --------------------------------------------------------------------------- wait


def test_wait_exit_codes(root: Path, spool: Spool, tmp_path: Path) -> None:
    for task_id in ("ok", "bad", "slow"):
        spool.enqueue(TYPE, task_id, None)
    finish(spool, "ok")
    finish(spool, "bad", State.FAILED)
    proc = spoolq("wait", TYPE, "ok", root=root)
    assert (proc.returncode, out(proc)) == (0, "FINISHED\n")
    proc = spoolq("wait", TYPE, "bad", root=root)
    assert (proc.returncode, out(proc)) == (1, "FAILED\n")
    assert "timed out" in assert_one_line_error(spoolq("wait", TYPE, "slow", "--timeout", "0.2", root=root), 124)
    assert_one_line_error(spoolq("wait", TYPE, "unknown", root=root), 2)
    assert_one_line_error(spoolq("wait", TYPE, "../bad", root=root), 2)
    assert_one_line_error(spoolq("wait", TYPE, "ok", root=tmp_path / "nowhere"), 2)


def _watching_inotify(pid: int) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify":
                return True
        except OSError:
            continue
    return False


def start_waiter(root: Path, task_id: str) -> subprocess.Popen[bytes]:
    """`spoolq wait TYPE task_id` in the background, returned once it has set
    its inotify watch (so what the test does next happens while it waits)."""
    waiter = subprocess.Popen([sys.executable, "-m", "spoolq", "--root", str(root), "wait", TYPE, task_id],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + DEADLINE
    while not _watching_inotify(waiter.pid):
        if waiter.poll() is not None or time.monotonic() > deadline:
            waiter.kill()
            raise AssertionError(f"wait never set its watch: {waiter.communicate()}")
        time.sleep(0.02)
    assert waiter.poll() is None
    return waiter


@pytest.mark.parametrize("final", [State.FINISHED, State.FAILED])
def test_wait_is_woken_when_another_process_finishes_the_task(root: Path, spool: Spool, final: State) -> None:
    spool.enqueue(TYPE, "t", None)
    claim = spool.claim("tester")
    spool.start(claim)
    waiter = start_waiter(root, "t")
    try:
        spool.set_state(claim, final, "finished elsewhere")
        stdout, stderr = waiter.communicate(timeout=DEADLINE)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert waiter.returncode == (0 if final == State.FINISHED else 1), stderr
    assert stdout.decode() == f"{final.name}\n"
    assert stderr == b""


def test_wait_fails_with_2_when_the_task_is_deleted_meanwhile(root: Path, spool: Spool) -> None:
    spool.enqueue(TYPE, "t", None)
    waiter = start_waiter(root, "t")
    try:
        spool.delete(TYPE, "t")  # no event in done/: the safety re-check notices
        _, stderr = waiter.communicate(timeout=DEADLINE)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert waiter.returncode == 2
    # "no task" if the delete came before its first read, else what happened
    # (test_observe.py: test_a_task_deleted_while_waited_for_says_so_not_no_task).
    assert b"no task" in stderr or b"was deleted while it was waited for" in stderr, stderr
    assert b"Traceback" not in stderr


# --------------------------------------------------------------------------- maintenance


def test_sweep_reports_each_action(root: Path, spool: Spool) -> None:
    assert out(spoolq("sweep", root=root)) == "nothing to do\n"
    spool.register_type("Short", HANDLER, retention=1)
    spool.enqueue("Short", "old", None)
    finish(spool, "old")
    done = root / "done" / "Short:old"
    os.utime(done, (time.time() - 3600, time.time() - 3600))
    spool.enqueue(TYPE, "orphan", None)
    # A server that claims and starts the task, then dies: its lock is freed.
    script = textwrap.dedent(f"""
        from spoolq import Spool
        s = Spool({str(root)!r})
        s.start(s.claim("gone"))
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    proc = spoolq("sweep", root=root)
    assert proc.returncode == 0, proc.stderr
    lines = sorted(out(proc).splitlines())
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"reenqueued {TYPE}/orphan: abandoned")
    assert lines[1].startswith("retired Short/old: ")
    assert spool.status(TYPE, "orphan").state == State.ENQUEUED
    assert not done.exists()


def test_stats_json_table_and_prometheus(root: Path, spool: Spool) -> None:
    spool.register_type("Other", HANDLER)
    for task_id in ("a", "b", "c"):
        spool.enqueue(TYPE, task_id, None)
    finish(spool, "a")
    finish(spool, "b", State.FAILED)
    census = json.loads(out(spoolq("stats", "--json", root=root)))
    assert census["states"] == {"ENQUEUED": 1, "SCHEDULED": 0, "RUNNING": 0, "PAUSED": 0, "FINISHED": 1, "FAILED": 1}
    assert census["types"][TYPE]["FAILED"] == 1
    assert set(census["types"]["Other"].values()) == {0}
    assert census["oldest_waiting_seconds"] >= 0
    assert census["restarts"] == {TYPE: 0, "Other": 0}

    table = out(spoolq("stats", root=root))
    assert re.search(rf"{TYPE}\s+1\s+0\s+0\s+0\s+1\s+1\s+0", table), table
    assert "oldest waiting:" in table

    text = out(spoolq("stats", "--prometheus", root=root))
    samples = {}
    typed = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("#"):
            assert line.startswith("# HELP ")
            continue
        match = re.fullmatch(r'([a-z_]+)(\{(?:[a-z_]+="[^"]*",?)*\})? (-?[0-9.]+(?:e[+-]?\d+)?)', line)
        assert match, line
        samples[match[1] + (match[2] or "")] = float(match[3])
        family = re.sub(r"_(bucket|sum|count)$", "", match[1])  # a histogram's series
        assert match[1] in typed or family in typed, f"{match[1]} has no TYPE line before it"
    assert samples[f'spoolq_tasks{{state="enqueued",type="{TYPE}"}}'] == 1
    assert samples[f'spoolq_tasks{{state="failed",type="{TYPE}"}}'] == 1
    assert samples['spoolq_tasks{state="running",type="Other"}'] == 0
    assert samples["spoolq_oldest_waiting_seconds"] >= 0
    assert samples[f'spoolq_task_restarts{{type="{TYPE}"}}'] == 0


def test_stats_counts_restarts(root: Path, spool: Spool) -> None:
    spool.enqueue(TYPE, "t", None)
    claim = spool.claim("tester")
    spool.start(claim)
    spool.abandon(claim, "test abandon")  # one restart charged
    finish(spool, "t")
    census = json.loads(out(spoolq("stats", "--json", root=root)))
    assert census["restarts"][TYPE] == 1
    assert census["oldest_waiting_seconds"] is None


# --------------------------------------------------------------------------- worker and demo


def test_worker_configuration_errors_exit_78(root: Path, tmp_path: Path) -> None:
    assert "server id" in assert_one_line_error(spoolq("worker", "../x", root=root), 78)
    assert "spoolq init" in assert_one_line_error(spoolq("worker", "w1", root=tmp_path / "nowhere"), 78)


def test_worker_runs_a_task_and_stops_cleanly_on_sigterm(root: Path, spool: Spool) -> None:
    worker = subprocess.Popen([sys.executable, "-m", "spoolq", "--root", str(root), "worker", "w1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        spool.enqueue(TYPE, "t", (1, 2.5))
        proc = spoolq("wait", TYPE, "t", "--timeout", str(DEADLINE), root=root)
        assert (proc.returncode, out(proc)) == (0, "FINISHED\n"), proc.stderr
        assert spoolq("result", TYPE, "t", root=root).stdout == b"3.5"
        worker.terminate()
        _, stderr = worker.communicate(timeout=DEADLINE)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert worker.returncode == 0, stderr


def test_worker_drain_runs_what_the_server_holds_and_exits_0(root: Path, spool: Spool) -> None:
    spool.enqueue(TYPE, "held", (2, 3))
    spool.enqueue(TYPE, "other", (1,))
    script = f"from spoolq import Spool; Spool({str(root)!r}).claim('w1')"  # w1 claims, then dies
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    proc = spoolq("worker", "w1", "--drain", root=root, timeout=DEADLINE)
    assert proc.returncode == 0, proc.stderr
    assert spool.status(TYPE, "held").state == State.FINISHED
    assert spool.status(TYPE, "other").state == State.ENQUEUED  # nothing new was claimed


def test_worker_max_tasks_per_child_replaces_the_handler_process(root: Path, spool: Spool) -> None:
    for task_id in ("a", "b", "c"):
        spool.enqueue(TYPE, task_id, (1,))
    script = f"from spoolq import Spool; s = Spool({str(root)!r}); [s.claim('w1') for _ in range(3)]"
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)  # w1 claims three, then dies
    proc = spoolq("worker", "w1", "--drain", "--max-tasks-per-child", "1", root=root, timeout=DEADLINE)
    assert proc.returncode == 0, proc.stderr
    pids = re.findall(r"started SequenceSum:\w in pid (\d+)", proc.stderr.decode())
    assert len(pids) == 3 and len(set(pids)) == 3, proc.stderr.decode()  # one process per task
    assert all(spool.status(TYPE, t).state == State.FINISHED for t in ("a", "b", "c"))
    assert_one_line_error(spoolq("worker", "w1", "--max-tasks-per-child", "-1", root=root), 2)


def test_demo_runs_the_seed_example(tmp_path: Path) -> None:
    env = {"TMPDIR": str(tmp_path)}  # the demo's temporary spool lands here
    proc = spoolq("demo", env=env, timeout=120)
    assert proc.returncode == 0, (out(proc), proc.stderr.decode())
    text = out(proc)
    assert "15.0  (text/plain)" in text
    assert "FAILED" in text and "Input must be a sequence of numbers!" in text
    assert "SIGTERM: exit 0" in text
    assert list(tmp_path.iterdir()) == [], "the demo left its spool behind"


def test_sequence_sum_handler() -> None:
    from spoolq.demo import sequence_sum

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[str, tuple[str, ...]]] = []

        def setFailure(self, msg: str = "") -> None:
            self.calls.append(("failure", (msg,)))

        def storeResponse(self, data: str, mimeType: str = "text/xml") -> None:
            self.calls.append(("response", (data, mimeType)))

    for value, expected in [
        ((1, 2, 3, 4, 5), ("response", ("15.0", "text/plain"))),
        (["1.5", 2], ("response", ("3.5", "text/plain"))),
        (("a",), ("failure", ("Input must be a sequence of numbers!",))),
        ((None,), ("failure", ("Input must be a sequence of numbers!",))),
        (5, ("failure", ("Input must be a sequence of numbers!",))),
    ]:
        recorder = Recorder()
        sequence_sum(recorder, value)
        assert recorder.calls == [expected], value


# --------------------------------------------------------------------------- the command line itself


COMMANDS = ["init", "register", "unregister", "types", "enqueue", "status", "log", "result", "delete", "list",
            "wait", "worker", "sweep", "stats", "fsck", "demo"]


def test_every_command_has_help() -> None:
    proc = spoolq("--help")
    assert proc.returncode == 0
    for command in COMMANDS:
        assert command in out(proc)
    for command in COMMANDS:
        proc = spoolq(command, "--help")
        assert proc.returncode == 0, (command, proc.stderr)
        assert "Usage:" in out(proc) and len(out(proc).splitlines()) > 4, command


def test_root_comes_from_the_environment(root: Path) -> None:
    proc = spoolq("types", "--json", env={"SPOOLQ_ROOT": str(root)})
    assert [t["name"] for t in json.loads(out(proc))] == [TYPE]


def test_the_console_script_is_the_same_cli(root: Path) -> None:
    script = Path(sys.executable).with_name("spoolq")
    if not script.exists():
        pytest.skip("spoolq is not installed as a script next to this interpreter")
    proc = subprocess.run([script, "--root", root, "types", "--json"], capture_output=True, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout)[0]["name"] == TYPE


def test_usage_errors_are_one_line_too(root: Path) -> None:
    """Even click's own errors (unknown option or command, a missing or
    malformed argument, an id that looks like an option) are one line."""
    cases = [
        (("enqueue", "-x"), "No such option"),
        (("bogus",), "No such command"),
        (("enqueue", TYPE), "Missing argument"),
        (("wait", TYPE, "a", "--timeout", "abc"), "--timeout"),
        (("status", TYPE, "-leading-dash"), "No such option"),
    ]
    for args, expected in cases:
        message = assert_one_line_error(spoolq(*args, root=root), 2)
        assert expected in message, message



# --------------------------------------------------------------------------- first use (issue 11)


def test_init_creates_missing_parents_writable_by_their_owner_only(tmp_path: Path) -> None:
    """The tour's first command: the spool's parents do not exist yet. They
    are created as by mkdir -p, but never group- or world-writable, whatever
    the umask (a writable parent would let others swap the spool)."""
    path = tmp_path / "x" / "y" / "spool"
    proc = subprocess.run([sys.executable, "-m", "spoolq", "init"], capture_output=True, timeout=60, umask=0,
                          env={**os.environ, "SPOOLQ_ROOT": str(path)})
    assert (proc.returncode, out(proc), proc.stderr) == (0, f"{path}\n", b"")
    for parent in (tmp_path / "x", tmp_path / "x" / "y"):
        assert stat.S_IMODE(parent.stat().st_mode) == 0o755, parent
    assert stat.S_IMODE(path.stat().st_mode) == 0o2770
    assert Spool(path).max_queue == 0
    blocked = tmp_path / "file"
    blocked.write_text("")
    err = assert_one_line_error(spoolq("init", root=blocked / "spool"), 1)
    assert "Not a directory" in err and str(blocked) in err


def test_init_refuses_a_spool_others_may_write_before_making_anything(tmp_path: Path) -> None:
    """A root, or a directory above it, that any user may write is refused
    (exit 1) with nothing made: not a whole layout left behind."""
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)  # not sticky: others could swap whatever is made inside
    for root in (open_dir, open_dir / "spool", open_dir / "a" / "b" / "spool"):
        err = assert_one_line_error(spoolq("init", root=root), 1)
        assert "any user" in err and "chmod o-w" in err, err
        assert os.listdir(open_dir) == [], root
    open_dir.chmod(0o1777)  # sticky, as /tmp: others cannot rename what is not theirs
    assert spoolq("init", root=open_dir / "spool").returncode == 0


ROOT_AFTER_THE_COMMAND = [
    ("types",), ("status", TYPE, "t"), ("log", TYPE, "t"), ("list",), ("stats",), ("sweep",), ("fsck",),
    ("register", "Other", "pkg.mod.func"), ("init",), ("wait", TYPE, "done", "--timeout", "5"),
    ("result", TYPE, "done"), ("enqueue", TYPE, "new", "-", "--json"), ("delete", TYPE, "t"),
    ("unregister", "Spare"), ("worker", "w1", "--drain"),
]


@pytest.mark.parametrize("args", ROOT_AFTER_THE_COMMAND, ids=lambda a: a[0])
@pytest.mark.parametrize("form", ["--root PATH", "--root=PATH"])
def test_root_is_taken_after_the_command_too(root: Path, spool: Spool, tmp_path: Path, args: tuple[str, ...],
                                             form: str) -> None:
    spool.register_type("Spare", HANDLER)
    spool.enqueue(TYPE, "t", (1, 2))
    spool.enqueue(TYPE, "done", (1,))
    spool.claim("tester")  # "t" first (FIFO), then "done"
    claim = spool.claim("tester")
    spool.start(claim)
    spool.store_response(claim, b"3", "text/plain")
    spool.set_state(claim, State.FINISHED)
    after = [f"--root={root}"] if form == "--root=PATH" else ["--root", str(root)]
    stdin = b"[1]" if args[0] == "enqueue" else None
    # SPOOLQ_ROOT and a global --root name other places: the option after the command wins.
    env = {"SPOOLQ_ROOT": str(tmp_path / "elsewhere")}
    proc = spoolq("--root", tmp_path / "nowhere", *args, *after, env=env, stdin=stdin)
    assert proc.returncode == 0, (args, proc.stderr.decode())
    assert b"Traceback" not in proc.stderr
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "elsewhere").exists()


def test_root_values_and_errors(root: Path, spool: Spool, tmp_path: Path) -> None:
    spool.enqueue(TYPE, "t", None)
    assert out(spoolq("status", TYPE, "t", env={"SPOOLQ_ROOT": str(root)})) == "ENQUEUED\n"
    assert out(spoolq("--root", root, "status", TYPE, "t")) == "ENQUEUED\n"
    # The last --root given wins, wherever it stands.
    assert out(spoolq("status", "--root", tmp_path / "no", TYPE, "--root", root, "t")) == "ENQUEUED\n"
    err = assert_one_line_error(spoolq("status", TYPE, "t", "--root"), 2)
    assert "--root" in err
    # After `--` nothing is an option: "--root" is then a (bad) task id.
    assert_one_line_error(spoolq("status", TYPE, "--", "--root", root=root), 1)


@pytest.mark.parametrize("args, env_root", [
    (("--root", "", "types"), "spool"),  # typer's path; SPOOLQ_ROOT names a real spool
    (("types", "--root="), "spool"),  # after the command
    (("--root=", "status", TYPE, "t"), "spool"),  # the quick path
    (("types",), ""),  # SPOOLQ_ROOT set but empty
    (("status", TYPE, "t"), ""),
])
def test_an_empty_root_is_a_usage_error_never_another_spool(root: Path, spool: Spool, monkeypatch: pytest.MonkeyPatch,
                                                             args: tuple[str, ...], env_root: str) -> None:
    """An empty variable in a script must not send it to $SPOOLQ_ROOT or to
    the default spool (the production one)."""
    spool.enqueue(TYPE, "t", None)
    env = {"SPOOLQ_ROOT": str(root) if env_root else ""}
    err = assert_one_line_error(spoolq(*args, env=env), 2)
    assert "empty" in err
    monkeypatch.setenv("SPOOLQ_ROOT", str(root))
    with pytest.raises(SpoolError, match="empty"):
        Spool("")
    monkeypatch.setenv("SPOOLQ_ROOT", "")
    with pytest.raises(SpoolError, match="SPOOLQ_ROOT is set but empty"):
        Spool()


def test_bare_spoolq_prints_the_help_once_as_a_usage_error() -> None:
    proc = spoolq()
    assert proc.returncode == 2
    assert proc.stdout == b""
    err = proc.stderr.decode()
    assert err.count("Usage: spoolq") == 1 and err.count("Commands:") == 1, err
    assert "Traceback" not in err


def _help(*command: str) -> str:
    proc = spoolq(*command, "--help")
    assert proc.returncode == 0, (command, proc.stderr)
    return out(proc)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_commands_help_has_examples_and_plain_usage(command: str) -> None:
    text = _help(command)
    usage = text.splitlines()[0]
    assert usage.startswith(f"Usage: spoolq {command} [OPTIONS]"), usage
    assert "{" not in usage and "<" not in usage, usage  # TYPE ID, not {TYPE} {ID}
    assert "<bool>" not in text and "<str>" not in text, text
    examples = [line.strip() for line in text.split("\nExamples:\n", 1)[1].splitlines() if line.strip()]
    assert examples and all("spoolq " in line for line in examples), examples
    assert any(re.search(rf"spoolq (--root \S+ )?{command}\b", line) for line in examples), examples
    assert "--root PATH" in text and "-h, --help" in text


def test_help_texts_say_what_the_values_mean() -> None:
    assert "Usage: spoolq status [OPTIONS] TYPE ID\n" in _help("status")
    assert "Usage: spoolq enqueue [OPTIONS] TYPE ID INPUT\n" in _help("enqueue")
    assert "Usage: spoolq register [OPTIONS] TYPE HANDLER\n" in _help("register")
    register = " ".join(_help("register").split())
    assert "--timeout DURATION" in register and "0 or less: no limit" in register
    init = " ".join(_help("init").split())
    assert "--durable / --no-durable fsync" in init  # a flag, no value shown
    top = _help()
    assert "--version" in top and "--install-completion" in top and "--root PATH" in top


@pytest.mark.parametrize("args", [("status", "Nope", "x"), ("log", "Nope", "x"), ("result", "Nope", "x"),
                                  ("delete", "Nope", "x"), ("wait", "Nope", "x"), ("list", "--type", "Nope"),
                                  ("unregister", "Nope")], ids=lambda a: a[0])
def test_an_unknown_type_is_named_as_such(root: Path, args: tuple[str, ...]) -> None:
    err = assert_one_line_error(spoolq(*args, root=root), 2 if args[0] == "wait" else 1)
    assert err.startswith("spoolq: unknown task type 'Nope'"), err
    assert "no task" not in err


def test_an_unknown_task_of_a_known_type_is_still_no_task(root: Path) -> None:
    err = assert_one_line_error(spoolq("status", TYPE, "nope", root=root), 1)
    assert err == f"spoolq: no task {TYPE}/nope\n"


def test_stats_json_and_prometheus_exclude_each_other(root: Path) -> None:
    err = assert_one_line_error(spoolq("stats", "--json", "--prometheus", root=root), 2)
    assert "--json" in err and "--prometheus" in err


def test_unregister_refuses_a_type_with_tasks_unless_forced(root: Path, spool: Spool) -> None:
    spool.register_type("Empty", HANDLER)
    assert (spoolq("unregister", "Empty", root=root).returncode, out(spoolq("types", root=root)).count("Empty")) == (0, 0)
    spool.enqueue(TYPE, "a", None)
    spool.enqueue(TYPE, "b", None)
    finish(spool, "a")
    err = assert_one_line_error(spoolq("unregister", TYPE, root=root), 1)
    assert "2 task(s)" in err and f"spoolq unregister {TYPE} --force" in err, err
    assert {i.id for i in spool.list_tasks()} == {"a", "b"}  # nothing deleted
    proc = spoolq("unregister", TYPE, "--force", root=root)
    assert proc.returncode == 0, proc.stderr
    assert sorted(out(proc).splitlines()) == [f"deleted {TYPE}/a", f"deleted {TYPE}/b"]
    assert spool.list_tasks() == [] and spool.types() == []
    assert_one_line_error(spoolq("unregister", "../x", root=root), 1)
    assert_one_line_error(spoolq("unregister", root=root), 2)
    assert_one_line_error(spoolq("unregister", TYPE, "--forse", root=root), 2)


def test_version(tmp_path: Path) -> None:
    import spoolq as package

    proc = spoolq("--version")
    assert (proc.returncode, out(proc), proc.stderr) == (0, f"spoolq {package.__version__}\n", b"")
    assert re.fullmatch(r"\d+\.\d+\.\d+", package.__version__)
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'version = { attr = "spoolq._version.__version__" }' in pyproject  # one place for the version
    assert out(typer_path("--version")) == out(proc)


def test_shell_completion(tmp_path: Path) -> None:
    script = spoolq("--show-completion", "bash")
    assert script.returncode == 0 and "_SPOOLQ_COMPLETE=complete_bash" in out(script), script.stderr
    proc = spoolq(env={"_SPOOLQ_COMPLETE": "complete_bash", "COMP_WORDS": "spoolq sta", "COMP_CWORD": "1"})
    assert proc.returncode == 0 and out(proc).split() == ["status", "stats"], (out(proc), proc.stderr)
    proc = spoolq(env={"_SPOOLQ_COMPLETE": "complete_bash", "COMP_WORDS": "spoolq status T x --j",
                       "COMP_CWORD": "4"})
    assert out(proc).split() == ["--json"], proc.stderr  # the quick path leaves completion to typer
    home = tmp_path / "home"
    home.mkdir()
    proc = spoolq("--install-completion", "bash", env={"HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    assert "spoolq" in (home / ".bashrc").read_text()


# --------------------------------------------------------------------------- the quick path


def typer_path(*args: str | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """The same call with every argument parsed by typer (no quick path)."""
    code = "import sys; from spoolq.cli import main; main(sys.argv[1:], quick=False)"
    env = {k: v for k, v in os.environ.items() if k != "SPOOLQ_ROOT"}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], input=stdin, capture_output=True,
                          env=env, timeout=60)


QUICK_CALLS = [
    ("status", TYPE, "t"), ("status", TYPE, "t", "--json"), ("status", "--json", TYPE, "t"),
    ("status", TYPE, "nope"), ("status", "Nope", "t"), ("status", TYPE, "../x"), ("status", TYPE),
    ("status", TYPE, "t", "extra"), ("status", TYPE, "t", "--jsn"), ("status", "-h"),
    ("log", TYPE, "t"), ("log", TYPE, "t", "--json"), ("log", TYPE, "nope"),
    ("result", TYPE, "t"), ("result", TYPE, "w"), ("result", TYPE, "t", "--json"),
    ("delete", TYPE, "nope"), ("delete", TYPE, "w"),
    ("enqueue", TYPE, "n1", "-"), ("enqueue", TYPE, "n2", "-", "--json"), ("enqueue", TYPE, "t", "-"),
    ("enqueue", "Nope", "n3", "-"), ("enqueue", TYPE, "n4"), ("enqueue", TYPE, "n5", "/no/such/file"),
    ("enqueue", TYPE, "-x", "-"),
]


def test_the_quick_path_answers_as_typer_does(tmp_path: Path) -> None:
    """status, enqueue, log, result and delete run without typer when the call
    is plain; every answer (exit status, stdout, stderr) is typer's own."""
    import shutil

    quick_root, typer_root = tmp_path / "a", tmp_path / "b"
    sp = Spool.init(quick_root, durable=False)
    sp.register_type(TYPE, HANDLER)
    sp.enqueue(TYPE, "t", None)
    sp.enqueue(TYPE, "w", None)
    finish(sp, "t", response=b"\x00\xffbytes")
    shutil.copytree(quick_root, typer_root, symlinks=True)
    for args in QUICK_CALLS:
        stdin = b"[1, 2]" if "--json" in args else pickle.dumps((1, 2))
        fast = spoolq(*args, "--root", quick_root, stdin=stdin)
        slow = typer_path("--root", typer_root, *args, stdin=stdin)
        same = [fast.returncode, fast.stdout.replace(bytes(quick_root), b"ROOT"), fast.stderr.replace(bytes(quick_root), b"ROOT")]
        assert same == [slow.returncode, slow.stdout.replace(bytes(typer_root), b"ROOT"),
                        slow.stderr.replace(bytes(typer_root), b"ROOT")], args
    assert sorted(i.id for i in Spool(quick_root).list_tasks()) == sorted(i.id for i in Spool(typer_root).list_tasks())


# --------------------------------------------------------------------------- the standard streams (outside testing, round 3)


def _spoolq_with_closed(fd: int, *args: str | Path, root: Path, timeout: float = 60,
                        stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """spoolq run the way `spoolq ... >&-` (fd 1) or `<&-` (fd 0) runs it."""
    env = {k: v for k, v in os.environ.items() if k != "SPOOLQ_ROOT"}
    return subprocess.run([sys.executable, "-m", "spoolq", "--root", str(root), *map(str, args)],
                          input=stdin, capture_output=fd != 1, stderr=subprocess.PIPE if fd == 1 else None,
                          preexec_fn=lambda: os.close(fd), env=env, timeout=timeout)


def test_a_worker_started_with_stdout_closed_runs_its_tasks(root: Path, spool: Spool, tmp_path: Path) -> None:
    """`spoolq worker w1 >&-`: the worker crashed with a traceback on its
    first task and left it SCHEDULED (sys.stdout was None; and fd 1 was the
    next file opened, where a print would have gone)."""
    spool.enqueue(TYPE, "t", [1, 2, 3])
    env = {k: v for k, v in os.environ.items() if k != "SPOOLQ_ROOT"}
    log_path = tmp_path / "w.log"
    with open(log_path, "wb") as log_file:
        worker = subprocess.Popen([sys.executable, "-m", "spoolq", "--root", str(root), "worker", "w1"],
                                  stderr=log_file, preexec_fn=lambda: os.close(1), env=env)
    try:
        deadline = time.monotonic() + DEADLINE
        while spool.status(TYPE, "t").state is not State.FINISHED:
            assert worker.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
    finally:
        worker.terminate()
        assert worker.wait(30) == 0, log_path.read_text()
    assert "Traceback" not in log_path.read_text()


def test_commands_with_a_closed_stdout_or_stdin_end_in_one_line_at_most(root: Path, spool: Spool) -> None:
    spool.enqueue(TYPE, "t", 4)
    finish(spool, "t", response=b"r")
    for args in (("list",), ("types",), ("stats",), ("stats", "--prometheus"), ("result", TYPE, "t"),
                 ("output", TYPE, "t"), ("status", TYPE, "t", "--json")):
        done = _spoolq_with_closed(1, *args, root=root)
        assert done.returncode == 0 and done.stderr == b"", (args, done.returncode, done.stderr)
    refused = _spoolq_with_closed(0, "enqueue", TYPE, "n", "-", "--json", root=root)
    assert_one_line_error(refused, 1)
    assert "is not JSON" in refused.stderr.decode()
    with pytest.raises(TaskNotFound):
        spool.status(TYPE, "n")


def test_output_the_locale_cannot_encode_is_escaped_not_a_traceback(root: Path, spool: Spool) -> None:
    spool.enqueue(TYPE, "t", 4)
    finish(spool, "t", State.FAILED, message="snow \u2603")
    for args in (("log", TYPE, "t"), ("list",)):
        done = spoolq(*args, root=root, env={"PYTHONIOENCODING": "latin-1"})
        assert done.returncode == 0 and b"snow \\u2603" in done.stdout, (args, done.stderr)


def test_a_message_argument_that_is_not_utf8_is_kept_readable(root: Path, spool: Spool) -> None:
    """Python passes the bytes of such an argument on as lone surrogates,
    which UTF-8 cannot hold: the log write raised a traceback."""
    spool.enqueue(TYPE, "t", 4)
    env = {k: v for k, v in os.environ.items() if k != "SPOOLQ_ROOT"}
    done = subprocess.run([sys.executable.encode(), b"-m", b"spoolq", b"--root", bytes(root), b"cancel",
                           TYPE.encode(), b"t", b"--reason", b"a\xffb"], capture_output=True, env=env, timeout=60)
    assert done.returncode == 0 and done.stdout == b"FAILED\n", done.stderr
    assert spool.log_records(TYPE, "t")[-1].message == "cancelled: a\ufffdb"
    assert spool.status(TYPE, "t").doc["message"] == "cancelled: a\ufffdb"


def test_a_reader_that_goes_away_ends_the_command_quietly_with_141(root: Path, spool: Spool) -> None:
    # More output than a pipe holds (64 KiB), so that the writer meets the closed pipe.
    for i in range(1200):
        spool.enqueue(TYPE, f"t{i:04d}", 4)
    env = {k: v for k, v in os.environ.items() if k != "SPOOLQ_ROOT"}
    for args in (("list",), ("list", "--json")):
        proc = subprocess.Popen([sys.executable, "-m", "spoolq", "--root", str(root), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.read(10)
        proc.stdout.close()  # `| head -c 10`
        err = proc.stderr.read()
        assert proc.wait(60) == 141 and err == b"", (args, proc.returncode, err)


def test_list_says_when_it_leaves_out_a_task_it_cannot_read(root: Path, spool: Spool) -> None:
    for i in ("a", "b", "c"):
        spool.enqueue(TYPE, i, 4)
    (root / "enqueued" / f"{TYPE}:b" / "status.json").write_text("junk")
    done = spoolq("list", root=root)
    assert done.returncode == 0
    assert [line.split()[1] for line in out(done).splitlines()[1:]] == ["a", "c"]
    err = done.stderr.decode()
    assert err.startswith("spoolq: warning: 1 task(s) left out") and f"{TYPE}:b" in err and "fsck" in err, err
    assert len(err.splitlines()) == 1


def test_a_worker_lane_of_an_unregistered_type_is_said(root: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SPOOLQ_ROOT"}
    log_path = tmp_path / "w.log"
    with open(log_path, "wb") as log_file:
        worker = subprocess.Popen([sys.executable, "-m", "spoolq", "--root", str(root), "worker", "w1",
                                   "--types", f"{TYPE},Nope"], stderr=log_file, env=env)
    try:
        deadline = time.monotonic() + DEADLINE
        while " ready on " not in log_path.read_text():
            assert worker.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
    finally:
        worker.terminate()
        worker.wait(30)
    text = log_path.read_text()
    assert "--types names unknown task type 'Nope'" in text and TYPE + "'" not in text.split("unknown task type")[1][:20]


def test_output_that_cannot_be_written_says_the_command_was_done(root: Path, spool: Spool, tmp_path: Path) -> None:
    """`spoolq enqueue ... --json > out` on a full disk: the task was
    enqueued, and the one line said only "No space left on device", so a
    script retried into TaskExists."""
    from test_hostile import fill, mounted_tmpfs

    (tmp_path / "in.json").write_text("[1, 2]")
    with mounted_tmpfs(tmp_path / "full", size="64k") as full:
        fill(full)
        env = {k: v for k, v in os.environ.items() if k != "SPOOLQ_ROOT"}
        with open(full / "out.json", "wb") as sink:
            done = subprocess.run([sys.executable, "-m", "spoolq", "--root", str(root), "enqueue", TYPE, "e",
                                   str(tmp_path / "in.json"), "--json"], stdout=sink, stderr=subprocess.PIPE,
                                  env=env, timeout=60)
    err = assert_one_line_error(done, 1)
    assert "done, but its output could not be written: No space left on device" in err, err
    assert spool.status(TYPE, "e").state is State.ENQUEUED


def test_enqueue_many_refuses_a_line_that_is_not_utf8_and_names_the_id_of_a_bad_line(root: Path, spool: Spool,
                                                                                     tmp_path: Path) -> None:
    """Such a line was enqueued altered (U+FFFD from a file, a lone surrogate
    from stdin), while `enqueue --json` refused the same bytes."""
    lines = b'{"id": "u", "input": "\xff"}\n{"id": "neg", "input": 1, "in": "-5"}\n{"id": "ok", "input": [1]}\n'
    (tmp_path / "f.jsonl").write_bytes(lines)
    for source, stdin in ((str(tmp_path / "f.jsonl"), None), ("-", lines)):
        done = spoolq("enqueue-many", TYPE, source, "--json", root=root, stdin=stdin)
        assert done.returncode == 1, done.stderr
        report = json.loads(out(done))
        assert [(e["line"], e["id"]) for e in report["errors"]] == [(1, None), (2, "neg")], report
        assert report["errors"][0]["error"].startswith("not UTF-8: byte 0xff")
        with pytest.raises(TaskNotFound):
            spool.status(TYPE, "u")
        spool.delete(TYPE, "ok")


def test_stats_counts_around_a_task_it_cannot_read_and_says_so(root: Path, spool: Spool) -> None:
    """A done task whose status.json was garbage made every form of `stats`
    a traceback (the listing had learnt to skip it, the count had not)."""
    for i in ("a", "b"):
        spool.enqueue(TYPE, i, [1])
        finish(spool, i)
    (root / "done" / f"{TYPE}:a" / "status.json").write_text("garbage{")
    for args in (("stats",), ("stats", "--json"), ("stats", "--prometheus")):
        done = spoolq(*args, root=root)
        err = done.stderr.decode()
        assert done.returncode == 0 and "Traceback" not in err, (args, err)
        assert err.startswith("spoolq: warning: 1 task(s) left out") and len(err.splitlines()) == 1, err
    assert json.loads(out(spoolq("stats", "--json", root=root)))["states"]["FINISHED"] == 1


def test_stats_does_not_count_a_file_or_symlink_planted_under_a_waiting_tasks_name(root: Path, spool: Spool) -> None:
    """A file or a symlink named like a task in enqueued/ (or a server's
    scheduled/) was counted as a waiting (or claimed) task: no worker would
    ever run it, and the queue never looked empty."""
    spool.enqueue(TYPE, "real", [1])
    (root / "enqueued" / f"{TYPE}:planted-file").write_text("x")
    (root / "enqueued" / f"{TYPE}:planted-link").symlink_to(root / "enqueued" / f"{TYPE}:real")
    (root / "scheduled" / "s1").mkdir()
    (root / "scheduled" / "s1" / f"{TYPE}:planted-too").write_text("x")
    for args in (("stats",), ("stats", "--json"), ("stats", "--prometheus")):
        done = spoolq(*args, root=root)
        err = done.stderr.decode()
        assert done.returncode == 0 and err.startswith("spoolq: warning: 3 task(s) left out"), (args, err)
    states = json.loads(out(spoolq("stats", "--json", root=root)))["states"]
    assert states["ENQUEUED"] == 1 and states["SCHEDULED"] == 0, states
    # Nor does a planted file's old mtime make the oldest waiting age (alerts fired on years).
    os.utime(root / "enqueued" / f"{TYPE}:planted-file", (1, 1))
    (root / "enqueued" / "junk").write_text("x")
    os.utime(root / "enqueued" / "junk", (1, 1))
    age = json.loads(out(spoolq("stats", "--json", root=root)))["oldest_waiting_seconds"]
    assert age is not None and age < 3600, age


def test_usage_errors_speak_of_the_call_not_of_the_validator(root: Path) -> None:
    """typer's validation led a bad --state with pydantic's "Value error, ",
    and an option put before the command was answered with "Possible
    options: --version"."""
    err = assert_one_line_error(spoolq("list", "--state", "bogus", root=root), 2)
    assert "Value error" not in err and "'bogus' is not one of 'enqueued'" in err, err
    err = assert_one_line_error(spoolq("--json", "list", root=root), 2)
    assert "--version" not in err and "a command's options go after its name" in err, err


def test_types_says_which_type_it_leaves_out(root: Path, spool: Spool) -> None:
    """A type file edited into garbage made its type vanish from `spoolq
    types` without a word (an outside tester), where `list` and `stats`
    warn about what they leave out."""
    spool.register_type("Broken", "atp_demo.handler")
    (root / "types" / "Broken.json").write_text("garbage")
    (root / "types" / "Dir.json").mkdir()  # a directory, not a file: it stopped `types` and `stats` whole
    for args in (("types",), ("types", "--json")):
        done = spoolq(*args, root=root)
        err = done.stderr.decode()
        assert done.returncode == 0, err
        assert err.startswith("spoolq: warning: 2 type(s) left out, their file cannot be read") and "Broken.json" in err
        assert len(err.splitlines()) == 1, err
    assert "Broken" not in out(spoolq("types", root=root))


def test_the_oldest_waiting_age_leaves_out_tasks_not_due_yet(root: Path, spool: Spool) -> None:
    """A task enqueued to run in an hour made `oldest waiting` (and its
    gauge) grow from its enqueue: an alert on it fired for every delayed task."""
    spool.enqueue(TYPE, "later", [1], delay=3600)
    assert json.loads(out(spoolq("stats", "--json", root=root)))["oldest_waiting_seconds"] is None
    assert "oldest waiting: none" in out(spoolq("stats", root=root))
    prom = out(spoolq("stats", "--prometheus", root=root))
    assert "\nspoolq_oldest_waiting_seconds 0.0\n" in prom, prom
    spool.enqueue(TYPE, "now", [1])
    age = json.loads(out(spoolq("stats", "--json", root=root)))["oldest_waiting_seconds"]
    assert age is not None and 0 <= age < 3600  # the due one counts


def test_register_refuses_a_file_path_or_a_colon_for_a_handler_and_shows_the_form(root: Path) -> None:
    """`myapp/tasks.py` and `myapp.tasks:add` were registered with a warning
    that named the wrong module; the worker then never ran their tasks."""
    for handler, hint in (("myapp/tasks.py", "not its file"), ("myapp.tasks:add", "write 'myapp.tasks.add'"),
                          ("a.b-c", "dotted import path")):
        err = assert_one_line_error(spoolq("register", "Typo", handler, root=root), 1)
        assert hint in err, err
    assert not (root / "types" / "Typo.json").exists()
