"""What the spool asks of the kernel, seen with strace: which files and
directories each transition fsyncs (and that durable=False turns it off),
that a lookup by (type, id) touches a fixed number of paths whatever the
spool holds, and that sweeps never read enqueued/.

A traced script marks the stretch to look at with a stat of a path that
cannot exist (``/spoolq-mark-NAME``); only syscalls between two marks are
counted, so Python's start-up does not matter. Skipped without strace."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from spoolq import Spool, State

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")

PRELUDE = """
import os, sys
from spoolq import Spool, State, sweeps
root = sys.argv[1]
def mark(name):
    try:
        os.stat("/spoolq-mark-" + name)
    except FileNotFoundError:
        pass
"""
MARK = re.compile(r'"/spoolq-mark-([\w-]+)"')
SYSCALL = re.compile(r"^\d+\s+(\w+)\((.*)$")


def traced(script: str, root: str | Path, tmp_path: Path, trace: str) -> dict[str, list[tuple[str, str]]]:
    """Run *script* under ``strace -f -y``; return, for each mark, the
    (syscall, arguments) that followed it up to the next mark."""
    out = tmp_path / f"trace.{os.getpid()}.{len(list(tmp_path.iterdir()))}"
    cmd = ["strace", "-f", "-y", "-qq", "-o", str(out), "-e", f"trace={trace}",
           sys.executable, "-c", PRELUDE + script, str(root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "ptrace" in proc.stderr.lower():
        pytest.skip(f"strace cannot trace here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    segments: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in out.read_text().splitlines():
        mark = MARK.search(line)
        if mark:
            current = mark.group(1)
            segments[current] = []
            continue
        m = SYSCALL.match(line)
        if current is not None and m:
            segments[current].append((m.group(1), m.group(2)))
    return segments


def synced_paths(calls: list[tuple[str, str]], root: str) -> Counter:
    """fsync/fdatasync targets, as paths relative to the spool root, with
    the random stage suffix and the claim's server left as they are."""
    out: Counter = Counter()
    for name, args in calls:
        if name in ("fsync", "fdatasync"):
            path = re.match(r"\d+<(.*)>\)", args).group(1)
            rel = os.path.relpath(path, root)
            rel = re.sub(r"^tmp/T:a\.\d+\.[0-9a-f]+", "tmp/STAGE", rel)
            out[(name, rel)] += 1
    return out


LIFECYCLE = """
sp = Spool(root)
sp.hold_server("s1")
sp.enqueue("T", "warm", 1)
mark("enqueue"); sp.enqueue("T", "a", 1)
mark("claim"); c = sp.claim("s1", names=["T:a"])
mark("start"); sp.start(c)
mark("store"); sp.store_response(c, b"r")
mark("log"); sp.log_message(c, "x")
mark("pause"); sp.set_state(c, State.PAUSED)
mark("finish"); sp.set_state(c, State.FINISHED)
mark("end")
"""

EXPECTED_DURABLE = {
    # Each file before the rename that publishes it, the stage directory,
    # then both parents of the rename.
    "enqueue": {
        ("fsync", "tmp/STAGE/input.pkl"): 1,
        ("fsync", "tmp/STAGE/status.json"): 1,
        ("fsync", "tmp/STAGE/log"): 1,
        ("fsync", "tmp/STAGE"): 1,
        ("fsync", "enqueued"): 1,
        ("fsync", "tmp"): 1,
    },
    # A claim is its move and writes nothing: the start makes the move
    # durable (enqueued/ before its own move, scheduled/s1 as its source).
    "claim": {},
    "start": {
        ("fsync", "enqueued"): 1,
        ("fsync", "scheduled/s1"): 1,
        ("fsync", "running"): 1,
        ("fsync", "running/T:a/status.json.tmp"): 1,
        ("fdatasync", "running/T:a/log"): 1,
        ("fsync", "running/T:a"): 1,
    },
    # The response and its MIME type (an attribute of the file) are one
    # file: no status rewrite.
    "store": {
        ("fsync", "running/T:a/response.tmp"): 1,
        ("fsync", "running/T:a"): 1,
    },
    "log": {("fdatasync", "running/T:a/log"): 1},
    "pause": {
        ("fsync", "running/T:a/status.json.tmp"): 1,
        ("fdatasync", "running/T:a/log"): 1,
        ("fsync", "running/T:a"): 1,
    },
    "finish": {
        ("fsync", "running/T:a/status.json.tmp"): 1,
        ("fdatasync", "running/T:a/log"): 1,
        ("fsync", "running/T:a"): 1,
        ("fsync", "running"): 1,
        ("fsync", "done"): 1,
    },
}


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "not-durable"])
def test_each_transition_fsyncs_what_it_publishes_unless_durability_is_off(
    make_spool, tmp_path: Path, durable: bool
) -> None:
    spool = make_spool(durable=durable)
    assert spool.durable is durable
    segments = traced(LIFECYCLE, spool.root, tmp_path, "%file,fsync,fdatasync")
    got = {step: dict(synced_paths(segments[step], spool.root)) for step in EXPECTED_DURABLE}
    if durable:
        assert got == EXPECTED_DURABLE
    else:
        assert got == {step: {} for step in EXPECTED_DURABLE}


def test_the_durable_setting_is_kept_in_the_spool(spool_root: Path) -> None:
    assert Spool.init(spool_root).durable is True  # durable by default
    assert Spool.init(spool_root, durable=False).durable is False
    assert Spool(spool_root).durable is False
    assert Spool.init(spool_root).durable is False  # not given: kept


def _fill(directory: Path, n: int, prefix: str = "T:filler") -> None:
    existing = len(os.listdir(directory))
    for k in range(existing, n):
        os.mkdir(directory / f"{prefix}{k:05d}")


LOOKUP = """
sp = Spool(root)
sp.get_type("T")
mark("status"); sp.status("T", "target")
mark("log"); sp.log_records("T", "target")
mark("response"); sp.response("T", "target")
mark("end")
"""


def test_a_lookup_touches_the_same_paths_whatever_the_spool_holds(spool: Spool, tmp_path: Path) -> None:
    spool.enqueue("T", "target", 1)
    claim = spool.claim("s1")
    spool.start(claim)
    spool.store_response(claim, b"r")
    spool.set_state(claim, State.FINISHED)
    spool.release_server("s1")
    trace = "%file,getdents64"
    counts = {}
    for n in (200, 2000):
        _fill(Path(spool.root, "done"), n)
        # scheduled/ unchanged for a while in both runs: its listing is then
        # remembered between lookups (Queries._server_names), in both alike.
        old = time.time() - 60
        os.utime(Path(spool.root, "scheduled"), (old, old))
        segments = traced(LOOKUP, spool.root, tmp_path, trace)
        counts[n] = {step: [c for c, _ in segments[step]] for step in ("status", "log", "response")}
        for step in ("status", "log", "response"):
            listed = {args.split(">")[0] for c, args in segments[step] if c == "getdents64"}
            assert {d.split("<", 1)[1] for d in listed} <= {os.path.join(spool.root, "scheduled")}
    assert counts[200] == counts[2000]
    assert len(counts[200]["status"]) < 20


SWEEP = """
sp = Spool(root)
sp.get_type("T")
c = sp.claim("s1", names=["T:run"]); sp.start(c)
mark("zombies"); sweeps.reenqueue_zombies(sp)
mark("retired"); sweeps.delete_retired(sp)
mark("end")
"""


def test_sweeps_never_read_enqueued(spool: Spool, tmp_path: Path) -> None:
    for i in ("run", "fin"):
        spool.enqueue("T", i, 1)
    claim = spool.claim("s0", names=["T:fin"])
    spool.start(claim)
    spool.set_state(claim, State.FINISHED)
    spool.release_server("s0")
    counts = {}
    for n in (10, 2000):
        _fill(Path(spool.root, "enqueued"), n)
        segments = traced(SWEEP, spool.root, tmp_path, "%file,getdents64")
        for step in ("zombies", "retired"):
            assert not any("enqueued" in args for _, args in segments[step]), step
        counts[n] = {step: [c for c, _ in segments[step]] for step in ("zombies", "retired")}
        spool.hand_back(_claim_of(spool, "run"), "next run")  # for the second run
    assert counts[10] == counts[2000]


def _claim_of(spool: Spool, task_id: str):
    from spoolq import Claim

    info = spool.status("T", task_id)
    return Claim("T", task_id, info.doc["claim"], info.doc["server"])
