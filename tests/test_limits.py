"""Per-type resource limits with the fork executor (contract §13.3): applied in
the handler process right before the handler runs; a failure names the limit;
nothing leaks into the next task, whatever its type."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest

from spoolq import Spool, State
from spoolq.errors import SpoolError
from test_daemon import Workers, stop, wait_until

FINAL = (State.FINISHED, State.FAILED)


@pytest.fixture
def env(tmp_path):
    root = tmp_path / "spool"
    spool = Spool.init(root, durable=False)
    workers = Workers(root)
    yield spool, workers
    workers.stop_all()


def final(spool, pairs):
    return all(spool.status(t, i).state in FINAL for t, i in pairs)


def test_each_limit_fails_its_handler_with_a_message_that_names_it(env):
    spool, workers = env
    spool.register_type("mem", "limit_handlers.allocate", memory_max=64 * 1024**2)
    spool.register_type("cpu", "limit_handlers.busy", cpu_time=1, timeout=60)
    spool.register_type("files", "limit_handlers.open_files", max_open_files=32)
    spool.register_type("nice", "limit_handlers.report", nice=10)
    spool.register_type("plain", "limit_handlers.report")
    spool.enqueue("mem", "t1", {"bytes": 512 * 1024**2})
    spool.enqueue("cpu", "t1", None)
    spool.enqueue("files", "t1", None)
    spool.enqueue("nice", "t1", None)
    spool.enqueue("plain", "t1", None)  # last: runs in a slot after the limited ones
    proc = workers.start(concurrency=1)
    pairs = [(t, "t1") for t in ("mem", "cpu", "files", "nice", "plain")]
    wait_until(lambda: final(spool, pairs), timeout=60, what="all tasks final")

    mem = spool.status("mem", "t1")
    assert mem.state == State.FAILED and mem.doc["message"] == "memory limit 64M exceeded (MemoryError)"
    cpu = spool.status("cpu", "t1")
    assert cpu.state == State.FAILED and cpu.doc["message"].startswith("CPU time limit 1 s exceeded")
    files = spool.status("files", "t1")
    assert files.state == State.FAILED and files.doc["message"].startswith("open files limit 32 reached")
    assert "EMFILE" in files.doc["message"] or "Too many open files" in files.doc["message"]

    nice = json.loads(spool.response("nice", "t1")[0])
    assert spool.status("nice", "t1").state == State.FINISHED and nice["nice"] == 10
    plain = json.loads(spool.response("plain", "t1")[0])
    assert plain["nice"] == 0, "niceness leaked into the next task"
    assert plain["as"][0] == resource.RLIM_INFINITY and plain["cpu"][0] == resource.RLIM_INFINITY
    assert plain["nofile"][0] > 32
    assert plain["pid"] != nice["pid"], "a slot that ran a limited task must be retired"
    code, err = stop(proc)
    assert code == 0
    # A type's own limits are not a handler's change to its process (.hygiene).
    assert "changed its process's" not in err, err


def test_a_handler_in_c_code_past_its_cpu_limit_is_killed_and_the_message_says_why(env):
    spool, workers = env
    # SIGXCPU's Python handler cannot run inside one long C call: the hard
    # limit, 1 s later, kills the process, and the death is explained.
    spool.register_type("c", "limit_handlers.busy_in_c", cpu_time=1, timeout=60)
    spool.enqueue("c", "t1", None)
    workers.start()
    wait_until(lambda: final(spool, [("c", "t1")]), timeout=60, what="task final")
    info = spool.status("c", "t1")
    assert info.state == State.FAILED, info.doc
    # Contract §13.3: the message starts with the limit, under every executor
    # (the fork executor said "handler process died of signal SIGKILL (the
    # CPU time limit 1 s kills at its hard limit; or ...)": it did not ask
    # the kernel how much CPU the process had used).
    assert info.doc["message"].startswith("CPU time limit 1 s exceeded"), info.doc["message"]


def test_register_validates_the_new_settings_in_python_too(tmp_path):
    spool = Spool.init(tmp_path / "s", durable=False)
    for kw, word in [({"executor": "nope"}, "executor"), ({"nice": 25}, "nice"), ({"nice": -1}, "nice"),
                     ({"memory_max": 0}, "memory_max"), ({"cpu_time": -1}, "cpu_time"),
                     ({"max_open_files": 0}, "max_open_files")]:
        with pytest.raises(SpoolError, match=word):
            spool.register_type("X", "a.b", **kw)
    assert spool.types() == []


def run_cli(root, *args):
    return subprocess.run([sys.executable, "-m", "spoolq", "--root", str(root), *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, words", [
    (["--memory-max", "12Q"], ["--memory-max", "'12Q' is not a size"]),
    (["--memory-max", "0"], ["--memory-max", "positive"]),
    (["--nice", "25"], ["--nice"]),
    (["--executor", "nope"], ["--executor", "nope"]),
    (["--cpu-time", "-1"], ["--cpu-time", "negative"]),
    (["--cpu-time", "5x"], ["--cpu-time", "'5x'"]),
    (["--max-open-files", "0"], ["--max-open-files"]),
])
def test_bad_register_options_are_one_line_and_register_nothing(tmp_path, args, words):
    root = tmp_path / "s"
    Spool.init(root, durable=False)
    done = run_cli(root, "register", "T", "a.b", *args)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spoolq: ") and "Traceback" not in done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert json.loads(run_cli(root, "types", "--json").stdout) == []


def test_types_json_shows_every_setting_and_old_type_files_read_as_defaults(tmp_path):
    root = tmp_path / "s"
    Spool.init(root, durable=False)
    done = run_cli(root, "register", "T", "a.b", "--executor", "dask", "--memory-max", "64M", "--cpu-time", "2m",
                   "--nice", "5", "--max-open-files", "100")
    assert done.returncode == 0, done.stderr
    (root / "types" / "Old.json").write_text('{"name": "Old", "handler": "a.b", "timeout": 60}\n')
    docs = {d["name"]: d for d in json.loads(run_cli(root, "types", "--json").stdout)}
    assert docs["T"] == {"name": "T", "handler": "a.b", "timeout": 3600.0, "retention": -1.0, "max_restarts": 2,
                         "executor": "dask", "memory_max": 64 * 1024**2, "cpu_time": 120.0, "nice": 5,
                         "max_open_files": 100, "retries": 0, "retry_backoff": 10.0, "retry_backoff_max": 3600.0, "priority": 0, "concurrency": 0, "held": False,
                         "max_output_bytes": 1 << 20}
    assert docs["Old"]["executor"] == "fork" and docs["Old"]["memory_max"] is None and docs["Old"]["nice"] is None
    assert docs["Old"]["max_output_bytes"] == 1 << 20
