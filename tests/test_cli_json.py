"""``--json`` on every command that prints something (docs/contract.md §12.6).

Each test runs ``python -m spoolq … --json`` on a real spool, parses what it
prints and checks the fields the README's "Command line" section documents.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from spoolq import Spool, State
from test_cli import HANDLER, TYPE, finish, root, spool  # noqa: F401 - the fixtures, shared

TYPE_FIELDS = {"name", "handler", "timeout", "retention", "max_restarts", "executor", "memory_max", "cpu_time", "nice",
               "max_open_files", "retries", "retry_backoff", "retry_backoff_max", "priority", "concurrency", "held",
               "max_output_bytes"}
TASK_FIELDS = {"type", "id", "state", "path"}
STATUS_FIELDS = TASK_FIELDS | {"code", "message", "starts", "updated_at", "progress"}
FINDING_FIELDS = {"kind", "path", "message", "action"}


def spoolq_json(*args: str | Path, root: Path, code: int = 0, stdin: bytes | None = None, quiet: bool = True) -> Any:
    env = {k: v for k, v in os.environ.items() if k != "SPOOLQ_ROOT"}
    proc = subprocess.run([sys.executable, "-m", "spoolq", "--root", str(root), *map(str, args)], input=stdin,
                          capture_output=True, env=env, timeout=60)
    assert proc.returncode == code, (args, proc.returncode, proc.stderr.decode())
    assert proc.stderr == b"" or not quiet, proc.stderr
    return json.loads(proc.stdout)


def test_init_and_register(tmp_path: Path) -> None:
    path = tmp_path / "new"
    doc = spoolq_json("init", "--json", "--max-queue", "5", "--no-durable", root=path)
    assert doc == {"root": str(path), "max_queue": 5, "durable": False, "max_input_bytes": 64 << 20}
    doc = spoolq_json("register", "T", "pkg.mod.func", "--timeout", "-3", "--json", root=path, quiet=False)  # warns: no pkg
    assert doc == {"name": "T", "handler": "pkg.mod.func", "timeout": 0.0, "retention": -1.0, "max_restarts": 2,
                   "executor": "fork", "memory_max": None, "cpu_time": None, "nice": None, "max_open_files": None,
                   "retries": 0, "retry_backoff": 10.0, "retry_backoff_max": 3600.0, "priority": 0, "concurrency": 0, "held": False,
                              "max_output_bytes": 1 << 20}
    (listed,) = spoolq_json("types", "--json", root=path)
    assert listed == doc and set(listed) == TYPE_FIELDS


def test_unregister(root: Path, spool: Spool) -> None:
    spool.enqueue(TYPE, "a", None)
    assert spoolq_json("unregister", TYPE, "--force", "--json", root=root) == {"type": TYPE, "deleted": ["a"]}
    spool.register_type("Empty", HANDLER)
    assert spoolq_json("unregister", "Empty", "--json", root=root) == {"type": "Empty", "deleted": []}


def test_enqueue_prints_the_new_task(root: Path) -> None:
    doc = spoolq_json("enqueue", TYPE, "t1", "-", "--json", root=root, stdin=b"[1, 2]")
    assert doc == {"type": TYPE, "id": "t1", "state": "ENQUEUED", "path": str(root / "enqueued" / f"{TYPE}:t1")}
    assert json.loads((Path(doc["path"]) / "input.json").read_text()) == [1, 2]


def test_status_log_list_and_wait(root: Path, spool: Spool) -> None:
    spool.enqueue(TYPE, "t1", (1, 2), message="first")
    finish(spool, "t1")
    status = spoolq_json("status", TYPE, "t1", "--json", root=root)
    assert STATUS_FIELDS <= set(status) and (status["state"], status["code"]) == ("FINISHED", 5)
    log = spoolq_json("log", TYPE, "t1", "--json", root=root)
    assert [set(r) for r in log] == [{"time", "state", "message"}] * 4
    assert [(r["state"], r["message"]) for r in log] == [
        ("ENQUEUED", "first"), ("SCHEDULED", ""), ("RUNNING", ""), ("FINISHED", "done by the test")]
    times = [datetime.fromisoformat(r["time"]) for r in log]
    assert times == sorted(times) and all(t.utcoffset() == timezone.utc.utcoffset(None) for t in times)
    (listed,) = spoolq_json("list", "--json", root=root)
    assert listed == status
    assert spoolq_json("wait", TYPE, "t1", "--json", root=root) == status
    spool.enqueue(TYPE, "t2", None)
    finish(spool, "t2", State.FAILED)
    assert spoolq_json("wait", TYPE, "t2", "--json", root=root, code=1)["state"] == "FAILED"


def test_sweep(root: Path, spool: Spool) -> None:
    assert spoolq_json("sweep", "--json", root=root) == {"actions": [], "removed": 0}
    spool.register_type("Short", HANDLER, retention=1)
    spool.enqueue("Short", "old", None)
    finish(spool, "old")
    old = time.time() - 3600
    os.utime(root / "done" / "Short:old", (old, old))
    doc = spoolq_json("sweep", "--json", root=root)
    assert doc["removed"] == 0
    (action,) = doc["actions"]
    assert set(action) == {"action", "type", "id", "reason"}
    assert (action["action"], action["type"], action["id"]) == ("retired", "Short", "old")


def test_fsck(root: Path, spool: Spool, tmp_path: Path) -> None:
    doc = spoolq_json("fsck", "--json", root=root)
    assert set(doc) == {"root", "repair", "ok", "findings", "remaining", "counts"}
    assert (doc["ok"], doc["findings"], doc["remaining"]) == (True, [], [])
    spool.enqueue(TYPE, "t", None)
    (root / "enqueued" / "junk").write_text("not a task")
    doc = spoolq_json("fsck", "--json", root=root, code=1)
    assert (doc["ok"], doc["repair"]) == (False, False)
    (finding,) = doc["findings"]
    assert set(finding) == FINDING_FIELDS and finding["path"] == "enqueued/junk" and finding["action"] is None
    assert doc["remaining"] == doc["findings"]
    assert doc["counts"] == {"tasks": 1, "problems": 1, "repaired": 0, "remaining": 1, "quarantined": 0}
    doc = spoolq_json("fsck", "--repair", "--json", root=root, quiet=False)  # the library logs what it quarantines
    assert (doc["ok"], doc["repair"], doc["remaining"]) == (True, True, [])
    assert doc["findings"][0]["action"] and doc["counts"]["repaired"] == 1 and doc["counts"]["quarantined"] == 1
    doc = spoolq_json("fsck", "--json", root=tmp_path / "nowhere", code=1)
    assert doc["ok"] is False and doc["findings"][0]["kind"] == "missing-dir"


def test_stats(root: Path, spool: Spool) -> None:
    spool.enqueue(TYPE, "a", None)
    doc = spoolq_json("stats", "--json", root=root)
    assert set(doc) == {"states", "types", "restarts", "oldest_waiting_seconds"}
    assert doc["states"]["ENQUEUED"] == 1 and doc["types"][TYPE]["ENQUEUED"] == 1


@pytest.mark.parametrize("args, code", [
    (("init", "--max-queue", "-1", "--json"), 2),  # a usage error (contract §4.2)
    (("register", "T", "nodots", "--json"), 1),
    (("unregister", "Nope", "--json"), 1),
    (("enqueue", TYPE, "bad", "-", "--json"), 1),  # not JSON on stdin
    (("log", TYPE, "nope", "--json"), 1),
    (("wait", TYPE, "waiting", "--timeout", "0.1", "--json"), 124),
    (("wait", TYPE, "nope", "--json"), 2),
    (("stats", "--json", "--prometheus"), 2),
    (("status", TYPE, "waiting", "--json=yes"), 2),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) else str(v))
def test_a_failing_json_call_prints_no_json_and_one_error_line(root: Path, spool: Spool, args: tuple[str, ...],
                                                               code: int) -> None:
    spool.enqueue(TYPE, "waiting", None)
    env = {k: v for k, v in os.environ.items() if k != "SPOOLQ_ROOT"}
    proc = subprocess.run([sys.executable, "-m", "spoolq", "--root", str(root), *args], input=b"{not json",
                          capture_output=True, env=env, timeout=60)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == b""
    err = proc.stderr.decode()
    assert len(err.splitlines()) == 1 and err.startswith("spoolq: ") and "Traceback" not in err, err
