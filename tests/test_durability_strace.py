"""Durability at the syscall level: the order of writes, fsyncs and renames.

One task's lifecycle runs under ``strace -f -y`` and the trace is checked
against the rules a crash-consistent queue needs (ALICE-style: the order of
the calls, not their outcome on one filesystem, which may be more forgiving
than the next). The rules are described in docs/reliability.md, "Durability
at the syscall level"; in short, with paths from strace's ``-y``:

P. A file is fsynced (fsync or fdatasync on its descriptor) after its last
   write and before the rename that publishes it — itself, or the directory
   holding it (``status.json.tmp`` → ``status.json``; ``tmp/X`` →
   ``enqueued/X``). A directory renamed into place has its own entries
   fsynced first.
D. Every rename, mkdir, file creation or unlink is followed by an fsync of
   each directory whose entries it changed (both parents of a move) before
   the transition returns, and before the next transition (the next rename
   of a task directory between state directories) starts.
O. After a task directory moves between state directories, nothing inside
   it is made durable (fsynced) before both parents of the move are: a
   state written for the new place must not outlive a move that is lost.
C. The one exception to D: a claim without a message is its move alone and
   writes nothing, so it may return with that move's parents not yet
   fsynced. Its source must be before the task's next move starts; its
   destination, the source of that next move, falls under D with that
   move. (By O, both come before anything recorded inside the task.)

S. ``syncfs`` of the spool's filesystem makes everything written before it
   durable (a batch's one barrier): it counts as an fsync of every dirty
   directory, then of every dirty file.

``locks/`` is exempt (lock files carry no data), and so are what is not
durable state by design (docs/design.md, "Output", "Metrics"): ``metrics/``
and a task's run files (``output``, its ``output.tail.K`` parts,
``progress``), which are never fsynced. The same lifecycle with
``durable=False`` has no fsync at all, so the checker finds violations:
that run shows the check can fail.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from spoolq import Spool, State

HERE = Path(__file__).resolve().parent
SYSCALLS = "openat,mkdir,mkdirat,rename,renameat,renameat2,unlink,unlinkat,rmdir,fsync,fdatasync,syncfs,write,close"
STATE_DIRS = ("tmp", "enqueued", "scheduled", "running", "done", "quarantine")
TRANSITIONS = ("enqueue", "claim", "start", "store_response", "finish")


def _strace_or_skip() -> str:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (CI installs it with .ci/install-system-deps)")
    probe = subprocess.run([strace, "-f", "-qq", "-o", os.devnull, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here: {probe.stderr.strip()[:200]}")
    return strace


# ----------------------------------------------------------------------------- parsing

_LINE = re.compile(r"^(\d+)\s+(.*)$")
_CALL = re.compile(r"^(\w+)\((.*)\)\s+=\s+(-?\d+)(?:<(.*?)>)?(.*)$")
_ARG = re.compile(r'"(?:[^"\\]|\\.)*"(?:\.\.\.)?|[^,]+')
_FD = re.compile(r"^(-?\d+|AT_FDCWD)<(.*)>$")


@dataclass
class Call:
    index: int
    pid: int
    name: str
    args: list[str]
    ret: int
    ret_path: str | None

    def fd_path(self, i: int) -> str | None:
        m = _FD.match(self.args[i]) if i < len(self.args) else None
        return m.group(2) if m else None

    def string(self, i: int) -> str:
        text = self.args[i]
        return text[1:-1] if text.startswith('"') else text


def parse(trace: str) -> list[Call]:
    """strace -f -y -o output as calls in completion order; split calls
    (``<unfinished ...>`` / ``resumed``) are joined."""
    pending: dict[int, str] = {}
    calls: list[Call] = []
    for raw in trace.splitlines():
        m = _LINE.match(raw)
        if not m:
            continue
        pid, rest = int(m.group(1)), m.group(2)
        if rest.endswith("<unfinished ...>"):
            pending[pid] = rest[: -len("<unfinished ...>")].rstrip()
            continue
        resumed = re.match(r"^<\.\.\. (\w+) resumed>(.*)$", rest)
        if resumed:
            rest = pending.pop(pid, resumed.group(1) + "(") + resumed.group(2)
        c = _CALL.match(rest)
        if not c:
            continue
        args = [a.strip() for a in _ARG.findall(c.group(2))]
        calls.append(Call(len(calls), pid, c.group(1), args, int(c.group(3)), c.group(4)))
    return calls


# ----------------------------------------------------------------------------- checking


@dataclass
class Report:
    violations: list[str] = field(default_factory=list)
    fsyncs: Counter = field(default_factory=Counter)  # per transition (markers) or segment
    total_fsyncs: int = 0
    moves: list[tuple[str, str]] = field(default_factory=list)


class Checker:
    """Replays the calls that touch the spool and checks rules P, D and O."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self.dirty_files: dict[str, str] = {}  # path -> what wrote it
        self.dirty_dirs: dict[str, str] = {}  # directory -> what changed its entries
        self.unsynced_moves: list[tuple[str, set[str], str]] = []  # (task path, parents to sync, what)
        self.report = Report()
        self.segment = "setup"
        self.by_moves = False
        self.claim_carried: dict[str, str] = {}  # rule C: a claim's unsynced parents

    # -- paths

    def in_spool(self, path: str | None) -> bool:
        if not path or not (path == self.root or path.startswith(self.root + "/")):
            return False
        rel = path[len(self.root) + 1 :]
        if rel.split("/")[0] in ("locks", "metrics"):
            return False  # lock files carry no data; counters are not durable state
        name = os.path.basename(rel)
        return not (name in ("output", "progress", "progress.tmp") or name.startswith("output.tail."))

    def task_level(self, path: str) -> bool:
        """A task directory directly in a state directory (or scheduled/SERVER)."""
        rel = path[len(self.root) + 1 :].split("/")
        if rel[0] == "scheduled":
            return len(rel) == 3
        return rel[0] in STATE_DIRS and len(rel) == 2

    @staticmethod
    def under(path: str, top: str) -> bool:
        return path == top or path.startswith(top + "/")

    def _rekey(self, table: dict[str, str], src: str, dst: str) -> None:
        for key in [k for k in table if self.under(k, src)]:
            table[dst + key[len(src) :]] = table.pop(key)

    def _violate(self, text: str) -> None:
        self.report.violations.append(f"[{self.segment}] {text}")

    # -- events

    def boundary(self, what: str, *, claim: bool = False) -> None:
        """A transition ends (END marker) or the next one starts (a task
        directory moves): everything before must be durable (rule D). At
        the end of a claim, its move's parents may wait (rule C)."""
        if claim and not self.dirty_files:
            moved = {p for _, parents, _ in self.unsynced_moves for p in parents}
            self.claim_carried.update({d: why for d, why in self.dirty_dirs.items() if d in moved})
            for d in self.claim_carried:
                del self.dirty_dirs[d]
            claim_moves = self.unsynced_moves
        else:
            claim_moves = []
        for path, why in sorted(self.dirty_files.items()):
            self._violate(f"{path} written ({why}) but not fsynced before {what}")
        for path, why in sorted(self.dirty_dirs.items()):
            self._violate(f"directory {path} changed ({why}) but not fsynced before {what}")
        self.dirty_files.clear()
        self.dirty_dirs.clear()
        self.unsynced_moves = claim_moves

    def next_move(self, what: str, source: str | None = None) -> None:
        """Rule C: a claim's move is durable before the task moves on, but
        for the next move's *source*, which that move makes durable."""
        if source in self.claim_carried:
            self.dirty_dirs[source] = self.claim_carried.pop(source)
        for path, why in sorted(self.claim_carried.items()):
            self._violate(f"directory {path} changed ({why}) by a claim but not fsynced before {what}")
        self.claim_carried.clear()

    def write(self, path: str, call: Call) -> None:
        self.dirty_files[path] = f"write #{call.index}"

    def sync(self, path: str) -> None:
        self.report.total_fsyncs += 1
        self.report.fsyncs[self.segment] += 1
        for task, parents, what in self.unsynced_moves:
            if self.under(path, task) and parents:
                self._violate(f"{path} fsynced before the move {what} was durable (parents {sorted(parents)})")
        self.dirty_files.pop(path, None)
        self.dirty_dirs.pop(path, None)
        self.claim_carried.pop(path, None)
        for move in self.unsynced_moves:
            move[1].discard(path)
        self.unsynced_moves = [m for m in self.unsynced_moves if m[1]]

    def entry_changed(self, parent: str, why: str) -> None:
        if self.in_spool(parent):
            self.dirty_dirs[parent] = why

    def rename(self, src: str, dst: str, call: Call) -> None:
        top = self.task_level(src) and self.task_level(dst)
        if top:
            self.report.moves.append((src, dst))
            if self.by_moves:
                self.boundary(f"the move {src} -> {dst}", claim=self.segment == "into scheduled")
                self.segment = "into " + ("scheduled" if "/scheduled/" in dst else os.path.basename(os.path.dirname(dst)))
            self.next_move(f"the move {src} -> {dst}", os.path.dirname(src))
        for path, why in sorted(self.dirty_files.items()):
            if self.under(path, src):
                self._violate(f"{path} ({why}) published by rename #{call.index} before its fsync")
        if src in self.dirty_dirs:
            self._violate(f"directory {src} renamed into place before its entries were fsynced ({self.dirty_dirs[src]})")
        self._rekey(self.dirty_files, src, dst)
        self._rekey(self.dirty_dirs, src, dst)
        # O follows the task: what is inside it after this move is still
        # bound by an earlier move that is not durable yet.
        self.unsynced_moves = [(dst + t[len(src):] if self.under(t, src) else t, parents, w)
                               for t, parents, w in self.unsynced_moves]
        what = f"rename #{call.index} {src} -> {dst}"
        self.entry_changed(os.path.dirname(src), what)
        self.entry_changed(os.path.dirname(dst), what)
        if top:
            self.unsynced_moves.append((dst, {os.path.dirname(src), os.path.dirname(dst)}, what))

    def removed(self, path: str, call: Call) -> None:
        for key in [k for k in self.dirty_files if self.under(k, path)]:
            del self.dirty_files[key]
        self.entry_changed(os.path.dirname(path), f"unlink #{call.index} {path}")

    # -- driver

    def run(self, calls: list[Call], *, markers: str | None = None) -> Report:
        """Check *calls*. With *markers* (the path of the marker file the
        traced program writes ``BEGIN x`` / ``END x`` to), transitions are
        delimited by them; without, by the moves of the task directory."""
        self.by_moves = markers is None
        for call in calls:
            if call.ret < 0:
                continue
            n = call.name
            if n == "write":
                path = call.fd_path(0)
                if markers and path == markers:
                    text = call.string(1).replace("\\n", "")
                    kind, _, name = text.partition(" ")
                    if kind == "BEGIN":
                        self.segment = name
                    elif kind == "END":
                        self.boundary(f"{name} returned", claim=name == "claim")
                        self.segment = "between"
                elif self.in_spool(path) and call.ret > 0:
                    self.write(path, call)
            elif n in ("fsync", "fdatasync"):
                path = call.fd_path(0)
                if self.in_spool(path):
                    self.sync(path)
            elif n == "syncfs":
                # The whole filesystem at once (a batch's barrier): every
                # directory, then every file, is durable.
                if self.in_spool(call.fd_path(0)):
                    for path in [*self.dirty_dirs, *self.dirty_files]:
                        self.sync(path)
            elif n == "openat":
                flags = call.args[2] if len(call.args) > 2 else ""
                if "O_CREAT" in flags and call.ret_path and self.in_spool(call.ret_path):
                    self.entry_changed(os.path.dirname(call.ret_path), f"create #{call.index} {call.ret_path}")
            elif n in ("mkdir", "mkdirat"):
                path = self._resolve(call, 0) if n == "mkdir" else self._resolve(call, 1, dirfd=0)
                if self.in_spool(path):
                    self.entry_changed(os.path.dirname(path), f"mkdir #{call.index} {path}")
            elif n in ("rename", "renameat", "renameat2"):
                if n == "rename":
                    src, dst = self._resolve(call, 0), self._resolve(call, 1)
                else:
                    src, dst = self._resolve(call, 1, dirfd=0), self._resolve(call, 3, dirfd=2)
                if self.in_spool(src) or self.in_spool(dst):
                    self.rename(src, dst, call)
            elif n in ("unlink", "rmdir", "unlinkat"):
                path = self._resolve(call, 1, dirfd=0) if n == "unlinkat" else self._resolve(call, 0)
                if self.in_spool(path):
                    self.removed(path, call)
        self.boundary("the end of the trace")
        self.next_move("the end of the trace")
        return self.report

    def _resolve(self, call: Call, i: int, dirfd: int | None = None) -> str:
        name = call.string(i)
        if name.startswith("/") or dirfd is None:
            return os.path.normpath(name)
        return os.path.normpath(os.path.join(call.fd_path(dirfd) or "/", name))


# ----------------------------------------------------------------------------- the API path

LIFECYCLE = textwrap.dedent(
    """
    import os, sys
    from spoolq import Spool, State
    root, markers = sys.argv[1], sys.argv[2]
    sp = Spool(root)
    fd = os.open(markers, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    def step(name, fn, *args):
        os.write(fd, f"BEGIN {name}\\n".encode())
        out = fn(*args)
        os.write(fd, f"END {name}\\n".encode())
        return out
    step("enqueue", sp.enqueue, "T", "a", {"x": 1})
    claim = step("claim", sp.claim, "w1")
    step("start", sp.start, claim)
    step("store_response", sp.store_response, claim, b"42", "text/plain")
    step("finish", sp.set_state, claim, State.FINISHED, "done")
    """
)


def trace_lifecycle(tmp: Path, durable: bool) -> tuple[Report, Spool]:
    strace = _strace_or_skip()
    root = tmp / "spool"
    spool = Spool.init(root, durable=durable)
    spool.register_type("T", "crash_helpers.ok")
    script = tmp / "lifecycle.py"
    script.write_text(LIFECYCLE)
    markers, trace = tmp / "markers", tmp / "trace"
    subprocess.run(
        [strace, "-f", "-y", "-qq", "-s", "64", "-o", str(trace), "-e", f"trace={SYSCALLS}",
         sys.executable, str(script), str(root), str(markers)],
        check=True, timeout=120,
    )
    report = Checker(str(root)).run(parse(trace.read_text()), markers=str(markers))
    return report, spool


def test_durable_lifecycle_orders_every_fsync(tmp_path: Path) -> None:
    report, spool = trace_lifecycle(tmp_path, durable=True)
    assert spool.status("T", "a").state == State.FINISHED
    assert not report.violations, "\n".join(report.violations)
    # The task moved tmp -> enqueued -> scheduled -> running -> done.
    assert [os.path.basename(os.path.dirname(d)) if "scheduled" not in d else "scheduled" for _, d in report.moves] == [
        "enqueued", "scheduled", "running", "done",
    ]
    counts = {t: report.fsyncs[t] for t in TRANSITIONS}
    print(f"\nfsyncs per transition (durable, Spool API): {counts}, total {sum(counts.values())}")
    # A claim writes nothing (rule C): the start makes its move durable. Its
    # one fsync is of scheduled/, which gained the new server's directory.
    assert counts["claim"] == 1 and all(counts[t] > 0 for t in TRANSITIONS if t != "claim"), counts


def test_without_durability_there_is_no_fsync_and_the_check_fails(tmp_path: Path) -> None:
    report, spool = trace_lifecycle(tmp_path, durable=False)
    assert spool.status("T", "a").state == State.FINISHED
    assert sum(report.fsyncs[t] for t in TRANSITIONS) == 0, report.fsyncs
    assert report.violations, "the checker must find the missing fsyncs"
    joined = "\n".join(report.violations)
    assert "status.json.tmp" in joined and "before its fsync" in joined
    assert "renamed into place before its entries were fsynced" in joined


def _claim_then_start(*between: str) -> Report:
    """Rule C on a hand-written trace: a claim's move, its END, then
    *between*, then the start's move and its END."""
    lines = [
        'BEGIN claim',
        'renameat2(AT_FDCWD</r>, "/r/enqueued/T:a", AT_FDCWD</r>, "/r/scheduled/w1/T:a", RENAME_NOREPLACE) = 0',
        'END claim',
        'BEGIN start',
        *between,
        'renameat2(AT_FDCWD</r>, "/r/scheduled/w1/T:a", AT_FDCWD</r>, "/r/running/T:a", RENAME_NOREPLACE) = 0',
        'fsync(5</r/scheduled/w1>) = 0',
        'fsync(6</r/running>) = 0',
        'END start',
    ]
    marker = "write(3</m>, \"{}\\n\", 9) = 9"
    trace = "\n".join("100 " + (marker.format(line) if line.startswith(("BEGIN", "END")) else line) for line in lines)
    return Checker("/r").run(parse(trace), markers="/m")


def test_a_claims_move_must_be_durable_before_the_task_moves_on() -> None:
    synced = _claim_then_start("fsync(7</r/enqueued>) = 0")
    assert not synced.violations, synced.violations
    assert synced.fsyncs["claim"] == 0
    lost = _claim_then_start()
    assert any("by a claim but not fsynced before the move" in v for v in lost.violations), lost.violations
    early = _claim_then_start('write(8</r/scheduled/w1/T:a/status.json.tmp>, "x", 1) = 1',
                              "fsync(8</r/scheduled/w1/T:a/status.json.tmp>) = 0")
    assert any("fsynced before the move" in v for v in early.violations), early.violations


# ----------------------------------------------------------------------------- the daemon path


def test_daemon_lifecycle_orders_every_fsync(tmp_path: Path) -> None:
    strace = _strace_or_skip()
    root = tmp_path / "spool"
    spool = Spool.init(root, durable=True)
    spool.register_type("T", "crash_helpers.ok")
    spool.enqueue("T", "a", {"record": str(tmp_path / "runs")})
    trace = tmp_path / "trace"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOOLQ_CRASH") and k != "NOTIFY_SOCKET"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    options = '{"concurrency": 1, "heartbeat_interval": 0.2, "sweep_interval": 0.3}'
    with open(tmp_path / "worker.err", "w") as err:
        proc = subprocess.Popen(
            [strace, "-f", "-y", "-qq", "-s", "64", "-o", str(trace), "-e", f"trace={SYSCALLS}",
             sys.executable, str(HERE / "crash_helpers.py"), "worker", str(root), "w1", options],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
        )
    try:
        deadline = time.monotonic() + 60
        while spool.status("T", "a").state != State.FINISHED:
            assert proc.poll() is None, (tmp_path / "worker.err").read_text()
            assert time.monotonic() < deadline, "task not finished under strace within 60 s"
            time.sleep(0.05)
        pid = int((root / "locks" / "servers" / "w1.lock").read_text().split()[0])
        os.kill(pid, signal.SIGTERM)
        assert proc.wait(60) == 0, (tmp_path / "worker.err").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    report = Checker(str(root)).run(parse(trace.read_text()))
    assert not report.violations, "\n".join(report.violations)
    dests = [d.split("/")[-2] if "/scheduled/" not in d else "scheduled" for _, d in report.moves]
    assert dests == ["scheduled", "running", "done"], report.moves
    print(f"\nfsyncs per segment (durable, daemon; a segment starts at a move into that directory): "
          f"{dict(report.fsyncs)}, total {report.total_fsyncs}")


# ----------------------------------------------------------------------------- the second edition's writes

SCHEDULING = textwrap.dedent(
    """
    import os, sys
    from spoolq import Item, Spool, State
    root, markers = sys.argv[1], sys.argv[2]
    sp = Spool(root)
    fd = os.open(markers, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    def step(name, fn, *args, **kw):
        os.write(fd, f"BEGIN {name}\\n".encode())
        out = fn(*args, **kw)
        os.write(fd, f"END {name}\\n".encode())
        return out
    results = step("enqueue_many", sp.enqueue_many, "T", [Item(f"b{i}", i) for i in range(1, 4)])
    assert all(r.error is None for r in results), results
    first = step("claim", sp.claim, "w1")
    step("start", sp.start, first)
    assert step("retry", sp.set_state, first, State.FAILED, "boom") is State.ENQUEUED
    step("cancel_unstarted", sp.cancel, "T", "b2", "not wanted")
    third = step("claim", sp.claim, "w1")
    assert third.id == "b3", third
    step("start", sp.start, third)
    step("cancel_asked", sp.cancel, "T", "b3", "stop it")
    step("cancel_finished", sp.finish_cancel, sp.locate("T", "b3"))
    step("requeue", sp.requeue, "T", "b2", delay=60)
    step("hold", sp.hold, "T")
    step("release", sp.release, "T")
    """
)
SCHEDULING_STEPS = ("enqueue_many", "retry", "cancel_unstarted", "cancel_asked", "cancel_finished", "requeue",
                    "hold", "release")


def test_scheduling_writes_order_every_fsync(tmp_path: Path) -> None:
    """A batch, a retry, both kinds of cancel, a requeue, a hold and a
    release on a durable spool: each new write is durable before its step
    returns, and a batch's tasks are published only after its barrier."""
    strace = _strace_or_skip()
    root = tmp_path / "spool"
    spool = Spool.init(root, durable=True)
    spool.register_type("T", "crash_helpers.ok", retries=1)
    script = tmp_path / "scheduling.py"
    script.write_text(SCHEDULING)
    markers, trace = tmp_path / "markers", tmp_path / "trace"
    done = subprocess.run(
        [strace, "-f", "-y", "-qq", "-s", "64", "-o", str(trace), "-e", f"trace={SYSCALLS}",
         sys.executable, str(script), str(root), str(markers)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    calls = parse(trace.read_text())
    report = Checker(str(root)).run(calls, markers=str(markers))
    assert not report.violations, "\n".join(report.violations)
    assert all(report.fsyncs[step] > 0 for step in SCHEDULING_STEPS), dict(report.fsyncs)
    # Group commit: one syncfs for the batch, before the first task is published.
    names = [c.name for c in calls]
    barrier = names.index("syncfs")
    resolve = Checker(str(root))._resolve
    first_publish = next(i for i, c in enumerate(calls) if c.name == "renameat2"
                         and resolve(c, 1, dirfd=0).startswith(f"{root}/tmp/")
                         and resolve(c, 3, dirfd=2).startswith(f"{root}/enqueued/"))
    assert names.count("syncfs") == 1 and barrier < first_publish
    info = {i: spool.status("T", i) for i in ("b1", "b2", "b3")}
    assert info["b1"].doc["retries"] == 1 and info["b1"].doc["not_before"]
    assert info["b2"].state == State.ENQUEUED and info["b2"].doc["not_before"]
    assert info["b3"].state == State.FAILED and info["b3"].doc["cancelled"] is True
    print(f"\nfsyncs per step (durable): {dict(report.fsyncs)}")
