"""``spoolq fsck``: every kind of damage built by hand (or by a real crash) on
a real spool; report-only changes nothing, --repair leaves a spool a second
fsck finds clean, deletes no task data and re-enqueues the orphans."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from spoolq import Spool, State
from spoolq.fsck import check, run_fsck

HERE = Path(__file__).parent
OLD = time.time() - 7200  # older than the tmp/ grace of 15 min


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything fsck could change: names, kinds, modes, sizes, mtimes,
    contents, link targets (not atimes: reading is allowed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", st.st_mode, st.st_mtime_ns)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", st.st_mode, st.st_mtime_ns, Path(path).read_bytes())
            else:  # a FIFO: never opened
                out[rel] = ("other", st.st_mode, st.st_mtime_ns)
    return out


def contents(root: Path) -> set[bytes]:
    """Digests of every regular file below *root*."""
    out = set()
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                out.add(hashlib.sha256(Path(path).read_bytes()).digest())
    return out


def digests_of(*paths: Path) -> set[bytes]:
    out = set()
    for path in paths:
        if path.is_symlink():
            continue
        if path.is_dir():
            out |= contents(path)
        else:
            out.add(hashlib.sha256(path.read_bytes()).digest())
    return out


def edit_status(task_dir: Path, **changes) -> None:
    """Rewrite a task's status.json by hand (as damage would)."""
    doc = json.loads((task_dir / "status.json").read_text())
    doc.update(changes)
    (task_dir / "status.json").write_text(json.dumps(doc))


def kinds(report) -> dict[str, str]:
    return {f.path: f.kind for f in report.findings}


def state_of(spool: Spool, task_id: str) -> State:
    return spool.status("T", task_id).state


def crash(root: Path, point: str, script: str) -> None:
    """Run *script* (with ``spool`` open on *root*) in a real process that
    dies with SIGKILL at crash point *point*."""
    code = f"from spoolq import Spool, State\nspool = Spool({str(root)!r})\n" + textwrap.dedent(script)
    env = dict(os.environ, SPOOLQ_CRASH_AT=point, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, f"expected a crash at {point}, got {proc.returncode}: {proc.stderr}"


@pytest.fixture
def damaged(spool: Spool, tmp_path: Path):
    """A spool with one of each kind of damage, plus healthy tasks that must
    come through untouched. Returns (spool, root, facts)."""
    root = Path(spool.root)
    for task_id in ("good", "garbage", "noinput", "nolog", "done_enq", "mismatch_src", "extra", "dupe", "fin"):
        spool.enqueue("T", task_id, {"id": task_id})
    facts: dict = {}

    # A waiting task that is fine, and a claim held by a live server.
    live = Spool(root)
    facts["live_claim"] = live.claim("alive", names=["T:fin"])
    live.start(facts["live_claim"])
    live.set_state(facts["live_claim"], State.FINISHED, "done")  # now in done/
    facts["live"] = live
    spool.enqueue("T", "held", None)
    facts["held"] = live.claim("alive", names=["T:held"])

    # Corrupt / incomplete task directories in enqueued/.
    (root / "enqueued/T:garbage/status.json").write_bytes(b"\x00{not json")
    (root / "enqueued/T:noinput/input.pkl").unlink()
    (root / "enqueued/T:nolog/log").unlink()
    (root / "enqueued/T:extra/notes.txt").write_bytes(b"an operator's note")
    # status.json names another task than its directory.
    shutil.copytree(root / "enqueued/T:mismatch_src", root / "enqueued/T:mismatch")
    # A done task's status rewritten to ENQUEUED.
    claim = spool.claim("worker1", names=["T:done_enq"])
    spool.start(claim)
    spool.set_state(claim, State.FAILED, "boom")
    edit_status(root / "done/T:done_enq", state="ENQUEUED")
    # The same task twice: a stale copy of a finished task in enqueued/.
    claim = spool.claim("worker1", names=["T:dupe"])
    shutil.copytree(root / "scheduled/worker1/T:dupe", tmp_path / "dupe-old")
    spool.start(claim)
    spool.set_state(claim, State.FINISHED, "ok")
    edit_status(tmp_path / "dupe-old", state="ENQUEUED", claim=0)
    shutil.copytree(tmp_path / "dupe-old", root / "enqueued/T:dupe")
    spool.release_server("worker1")

    # Hand-dropped things: a file, a file with a task name, a symlink to a
    # directory outside, a FIFO, junk at the root and in scheduled/.
    (root / "enqueued/README").write_bytes(b"not a task")
    (root / "enqueued/T:plainfile").write_bytes(b"a file named like a task")
    target = tmp_path / "outside"
    target.mkdir()
    (target / "status.json").write_text('{"state": "ENQUEUED"}')
    os.symlink(target, root / "enqueued/T:symlinked")
    os.mkfifo(root / "running/T:fifo")
    (root / "junk.bin").write_bytes(b"junk at the root")
    (root / "scheduled/-bad-server").mkdir()
    facts["outside"] = snapshot(target)
    facts["target"] = target

    # Orphans of dead servers: a claim never started, a started task, a
    # claim interrupted before its status write.
    spool.enqueue("T", "orphan_sched", None)
    spool.enqueue("T", "orphan_run", None)
    dead = Spool(root)
    dead.claim("deadserver", names=["T:orphan_sched"])
    dead.start(dead.claim("deadserver", names=["T:orphan_run"]))
    dead.release_server("deadserver")
    spool.enqueue("T", "orphan_rename", None)
    os.rename(root / "enqueued/T:orphan_rename", root / "scheduled/deadserver/T:orphan_rename")

    # A finish interrupted before its move: FINISHED in running/.
    spool.enqueue("T", "unmoved", None)
    crash(root, "finish.status_written", """
        claim = spool.claim("crasher", names=["T:unmoved"])
        spool.start(claim)
        spool.set_state(claim, State.FINISHED, "all done")
    """)

    # A re-enqueue interrupted before its move: ENQUEUED in running/ (the
    # status writes: the start, recording the claim, then the re-enqueue's).
    spool.enqueue("T", "unrequeued", None)
    crash(root, "status.replaced@2", """
        claim = spool.claim("crasher2", names=["T:unrequeued"])
        spool.start(claim)
        spool.abandon(claim, "timed out", charge=True)
    """)

    # Staging: old, trash, fresh; a corrupt type; an old register leftover.
    old = root / "tmp/T:x.123.abcdef"
    old.mkdir()
    (old / "input.pkl").write_bytes(b"half")
    os.utime(old, (OLD, OLD))
    (root / "tmp/.trash.T:y.abcdef").mkdir()
    (root / "tmp/T:z.456.fresh").mkdir()
    spool.register_type("Broken", "pkg.mod.func")
    (root / "types/Broken.json").write_bytes(b'{"handler": ')
    leftover = root / "types/.T.json.99.abcd"
    leftover.write_bytes(b"{}")
    os.utime(leftover, (OLD, OLD))
    (root / "types/notes.txt").write_bytes(b"x")

    facts["damaged_bytes"] = digests_of(
        root / "enqueued/T:garbage", root / "enqueued/T:noinput", root / "enqueued/T:nolog",
        root / "enqueued/T:extra/notes.txt", root / "enqueued/T:mismatch", root / "done/T:done_enq",
        root / "enqueued/T:dupe", root / "enqueued/README", root / "enqueued/T:plainfile", root / "junk.bin",
        root / "types/Broken.json", root / "types/notes.txt", leftover,
    )
    return spool, root, facts


EXPECTED = {
    "enqueued/T:garbage": "corrupt-status",
    "enqueued/T:noinput": "incomplete",
    "enqueued/T:nolog": "incomplete",
    "enqueued/T:extra/notes.txt": "unknown-entry",
    "enqueued/T:mismatch": "status-mismatch",
    "done/T:done_enq": "wrong-state",
    "enqueued/T:dupe": "duplicate",
    "enqueued/README": "bad-name",
    "enqueued/T:plainfile": "not-a-directory",
    "enqueued/T:symlinked": "symlink",
    "running/T:fifo": "not-a-directory",
    "junk.bin": "unknown-entry",
    "scheduled/-bad-server": "bad-name",
    "scheduled/deadserver/T:orphan_sched": "orphan",
    "scheduled/deadserver/T:orphan_rename": "orphan",
    "running/T:orphan_run": "orphan",
    "running/T:unmoved": "wrong-state",
    "running/T:unrequeued": "wrong-state",
    "tmp/T:x.123.abcdef": "stale-tmp",
    "tmp/.trash.T:y.abcdef": "stale-tmp",
    "types/Broken.json": "corrupt-type",
    "types/.T.json.99.abcd": "leftover-tmp",
    "types/notes.txt": "unknown-entry",
}


def test_report_only_finds_every_kind_and_changes_nothing(damaged):
    spool, root, _ = damaged
    before = snapshot(root)
    report = check(Spool(root))
    assert kinds(report) == EXPECTED
    assert not report.ok and report.problems_remaining == len(EXPECTED)
    assert all(f.action is None for f in report.findings)
    out = io.StringIO()
    assert run_fsck(str(root), repair=False, out=out) == 1
    lines = out.getvalue().splitlines()
    assert len(lines) == len(EXPECTED) + 1
    assert "running/T:unmoved: FINISHED but still in running/" in out.getvalue()
    assert snapshot(root) == before


def test_repair_quarantines_reenqueues_and_leaves_a_clean_spool(damaged):
    spool, root, facts = damaged
    out = io.StringIO()
    assert run_fsck(str(root), repair=True, out=out) == 0, out.getvalue()
    lines = out.getvalue().splitlines()
    assert all(" -> " in line for line in lines[:-1]), lines
    assert lines[-1].endswith(f"{len(EXPECTED)} problem(s), {len(EXPECTED)} repaired, 0 remain; 16 entries in quarantine/")

    again = check(Spool(root))
    assert again.ok and again.findings == []

    # Nothing deleted: every byte of damaged data is in quarantine/, each
    # entry with its reason; the symlink's target was never touched.
    assert facts["damaged_bytes"] <= contents(root / "quarantine")
    names = os.listdir(root / "quarantine")
    assert all(n + ".reason" in names for n in names if not n.endswith(".reason"))
    assert os.path.islink(next(root.glob("quarantine/T:symlinked.*[0-9a-f]")))
    assert snapshot(facts["target"]) == facts["outside"]
    assert stat.S_ISFIFO(os.lstat(next(root.glob("quarantine/T:fifo.*[0-9a-f]"))).st_mode)

    # Orphans are back in the queue: the started one charged a restart.
    assert state_of(spool, "orphan_sched") == State.ENQUEUED
    assert state_of(spool, "orphan_rename") == State.ENQUEUED
    run = spool.status("T", "orphan_run")
    assert run.state == State.ENQUEUED and run.doc["restarts"] == 1
    assert "server deadserver is gone" in spool.log_records("T", "orphan_run")[-1].message
    assert spool.status("T", "orphan_sched").doc["restarts"] == 0
    # The interrupted finish is completed, with its log intact.
    unmoved = spool.status("T", "unmoved")
    assert unmoved.state == State.FINISHED and unmoved.path == str(root / "done/T:unmoved")
    assert [r.state for r in spool.log_records("T", "unmoved")] == [
        State.ENQUEUED, State.SCHEDULED, State.RUNNING, State.FINISHED]
    requeued = spool.status("T", "unrequeued")
    assert requeued.state == State.ENQUEUED and requeued.path == str(root / "enqueued/T:unrequeued")
    assert requeued.doc["restarts"] == 1  # charged once, by the interrupted abandon
    # The newer copy of the duplicate stays; healthy tasks are untouched.
    assert spool.status("T", "dupe").path == str(root / "done/T:dupe")
    assert state_of(spool, "good") == State.ENQUEUED
    assert os.path.exists(root / "enqueued/T:extra/status.json")
    assert not os.path.exists(root / "enqueued/T:extra/notes.txt")
    # A live server's claims are left alone.
    held = spool.status("T", "held")
    assert held.state == State.SCHEDULED and held.path == str(root / "scheduled/alive/T:held")
    facts["live"].start(facts["held"])
    # Staging: stale and trash gone, the fresh one (an enqueue in flight) kept.
    assert sorted(os.listdir(root / "tmp")) == ["T:z.456.fresh"]
    assert "Broken" not in [t.name for t in spool.types()]


def test_interrupted_status_writes_are_completed_or_set_aside(spool):
    # Status writes of each script: the start (1, recording the claim), the PAUSED (2).
    root = Path(spool.root)
    for task_id in ("logged", "unlogged", "resp"):
        spool.enqueue("T", task_id, None)
    crash(root, "status.logged@2", """
        claim = spool.claim("s1", names=["T:logged"])
        spool.start(claim)
        spool.set_state(claim, State.PAUSED, "waiting")
    """)
    crash(root, "status.tmp_written@2", """
        claim = spool.claim("s2", names=["T:unlogged"])
        spool.start(claim)
        spool.set_state(claim, State.PAUSED, "never logged")
    """)
    claim = spool.claim("s3", names=["T:resp"])
    spool.start(claim)
    spool.set_state(claim, State.FINISHED)
    (root / "done/T:resp/response.tmp").write_bytes(b"half a response")
    spool.release_server("s3")
    unlogged_tmp = (root / "running/T:unlogged/status.json.tmp").read_bytes()

    report = check(Spool(root))
    assert {f.path: f.kind for f in report.findings} == {
        "running/T:logged/status.json.tmp": "leftover-tmp",
        "running/T:logged": "orphan",
        "running/T:unlogged/status.json.tmp": "leftover-tmp",
        "running/T:unlogged": "orphan",
        "done/T:resp/response.tmp": "leftover-tmp",
    }

    report = check(Spool(root), repair=True)
    assert report.ok, report.remaining
    actions = {f.path: f.action for f in report.findings}
    assert actions["running/T:logged/status.json.tmp"].startswith("completed")
    assert actions["running/T:unlogged/status.json.tmp"].startswith("never logged")
    # The logged PAUSED was put in place before the orphan was re-enqueued.
    assert [r.state for r in spool.log_records("T", "logged")][-2:] == [State.PAUSED, State.ENQUEUED]
    assert State.PAUSED not in [r.state for r in spool.log_records("T", "unlogged")]
    assert unlogged_tmp in [p.read_bytes() for p in (root / "quarantine").iterdir()]
    assert b"half a response" in [p.read_bytes() for p in (root / "quarantine").iterdir()]
    assert spool.status("T", "resp").state == State.FINISHED


def test_permissions_are_reported_with_the_fix_not_changed(spool):
    root = Path(spool.root)
    info = spool.enqueue("T", "a", None)
    os.chmod(info.path, 0o2777)
    os.chmod(Path(info.path) / "input.pkl", 0o666)
    out = io.StringIO()
    assert run_fsck(str(root), repair=True, out=out) == 1
    text = out.getvalue()
    assert f"permissions: enqueued/T:a: writable by any user: fix with: chmod o-w {info.path}" in text
    assert f"chmod o-w {info.path}/input.pkl" in text
    assert stat.S_IMODE(os.stat(info.path).st_mode) == 0o2777  # not chmod-ed behind the operator's back
    os.chmod(info.path, 0o2770)
    os.chmod(Path(info.path) / "input.pkl", 0o660)
    assert run_fsck(str(root), repair=False, out=io.StringIO()) == 0


def test_a_settings_change_in_progress_is_left_alone_and_an_old_one_set_aside(spool):
    """spool.json is staged under a name of its writer's own: fsck takes a
    fresh one for a change in progress, an old one (or the single name of
    earlier versions) for the leftover of an interrupted init."""
    root = Path(spool.root)
    fresh, stale, legacy = root / ".spool.json.123.abcd1234", root / ".spool.json.456.00ff00ff", root / "spool.json.tmp"
    for path in (fresh, stale, legacy):
        path.write_bytes(b"{}")
    for path in (stale, legacy):
        os.utime(path, (OLD, OLD))
    report = check(Spool(root), repair=True)
    assert kinds(report) == {stale.name: "leftover-tmp", legacy.name: "leftover-tmp"}
    assert all(f.action and f.action.startswith("quarantined") for f in report.findings)
    assert fresh.exists() and not stale.exists() and not legacy.exists()


def test_files_every_member_reads_must_be_the_groups_to_read(spool):
    """On a shared spool, spool.json, a type file or a lock file in another
    group, or that the group may not read, stops the members: reported with
    the fix; --repair adds the group's read to what fsck's user owns, and
    never changes a group."""
    root = Path(spool.root)
    gid = os.stat(root).st_gid
    os.chown(root / "spool.json", -1, gid + 4242)  # what init as root left in a root without setgid
    os.chmod(root / "types/T.json", 0o600)
    os.chmod(root / "locks/enqueue.lock", 0o600)
    out = io.StringIO()
    assert run_fsck(str(root), repair=True, out=out) == 1
    lines = out.getvalue().splitlines()
    assert lines[0] == (f"group-access: spool.json: not readable by the spool's group {gid} (group {gid + 4242}, "
                        f"mode 0660): every command of its members fails on it: fix with: chgrp {gid} {root}/spool.json")
    assert lines[1].startswith("group-access: types/T.json: ") and lines[1].endswith(" -> made group-readable")
    assert lines[2].startswith("group-access: locks/enqueue.lock: ") and lines[2].endswith(" -> made group-readable")
    assert os.stat(root / "spool.json").st_gid == gid + 4242  # reported, not changed
    assert stat.S_IMODE(os.stat(root / "types/T.json").st_mode) == 0o660
    os.chown(root / "spool.json", -1, gid)
    assert run_fsck(str(root), repair=False, out=io.StringIO()) == 0
    os.chown(root / "spool.json", -1, gid + 4242)
    os.chmod(root / "spool.json", 0o644)  # any user may read it: the members too (it was a false alarm)
    assert run_fsck(str(root), repair=False, out=io.StringIO()) == 0
    os.chmod(root / "spool.json", 0o660)
    os.chmod(root, 0o2700)  # not shared: the group's access does not count
    os.chown(root / "spool.json", -1, gid + 4242)
    assert run_fsck(str(root), repair=False, out=io.StringIO()) == 0


def test_repair_makes_missing_state_directories_as_init_does(spool):
    """A missing state directory keeps the spool from opening; --repair
    makes it (reliability.md: "creates it, as spoolq init does"), unless
    something else about the layout is wrong too."""
    root = Path(spool.root)
    spool.enqueue("T", "a", None)
    os.rmdir(root / "running")
    os.rmdir(root / "locks/servers")
    assert run_fsck(str(root), repair=False, out=io.StringIO()) == 1
    assert not (root / "running").exists()
    out = io.StringIO()
    assert run_fsck(str(root), repair=True, out=out) == 0, out.getvalue()
    lines = out.getvalue().splitlines()
    assert lines[:2] == [f"missing-dir: {rel}: missing: fix with: spoolq --root {root} init -> created (spoolq init)"
                         for rel in ("running", "locks/servers")]
    assert "1 task(s), 2 problem(s), 2 repaired, 0 remain" in lines[2]
    assert stat.S_IMODE(os.stat(root / "running").st_mode) == 0o2770
    os.rmdir(root / "done")  # the same through the command, with --json
    env = {k: v for k, v in os.environ.items() if k != "SPOOLQ_ROOT"}
    proc = subprocess.run([sys.executable, "-m", "spoolq", "--root", str(root), "fsck", "--repair", "--json"],
                          capture_output=True, text=True, env=env, timeout=60)
    doc = json.loads(proc.stdout)
    assert proc.returncode == 0 and doc["ok"], proc.stdout + proc.stderr
    assert [(f["kind"], f["path"], f["action"]) for f in doc["findings"]] == [
        ("missing-dir", "done", "created (spoolq init)")]
    os.rmdir(root / "running")  # with an unsafe root too: left to the operator, nothing made
    os.chmod(root, 0o2777)
    assert run_fsck(str(root), repair=True, out=io.StringIO()) == 1
    assert not (root / "running").exists()


def test_an_unsafe_layout_is_reported_whole_without_opening_the_spool(spool, tmp_path):
    root = Path(spool.root)
    os.chmod(root, 0o777)
    os.chmod(root / "done", 0o777)
    before = snapshot(root)
    out = io.StringIO()
    assert run_fsck(str(root), repair=True, out=out) == 1
    lines = out.getvalue().splitlines()
    assert lines[0] == f"permissions: .: writable by any user (mode 0777); pickles run as code in the worker: fix with: chmod o-w {root}"
    assert lines[1].startswith("permissions: done: ") and lines[1].endswith(f"chmod o-w {root / 'done'}")
    assert "fix them, then run fsck again" in lines[-1]
    assert snapshot(root) == before
    out = io.StringIO()
    assert run_fsck(str(tmp_path / "nowhere"), repair=False, out=out) == 1
    assert "spoolq --root" in out.getvalue() and "init" in out.getvalue()


def test_a_crash_during_a_claim_then_fsck_while_the_server_lives_and_after_it_died(spool):
    """An interrupted claim of a live server is in progress, not damage;
    once the server is gone it is an orphan and goes back to the queue."""
    root = Path(spool.root)
    spool.enqueue("T", "a", None)
    live = Spool(root)
    live.hold_server("srv")
    os.rename(root / "enqueued/T:a", root / "scheduled/srv/T:a")  # rename done, status not yet
    assert check(Spool(root), repair=True).findings == []
    live.release_server("srv")
    report = check(Spool(root), repair=True)
    assert [(f.kind, f.action) for f in report.findings] == [("orphan", "re-enqueued")]
    assert spool.status("T", "a").state == State.ENQUEUED


def test_the_cli_command_exits_1_on_problems_and_0_once_repaired(spool):
    root = Path(spool.root)

    def fsck(*args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "SPOOLQ_ROOT"}
        return subprocess.run([sys.executable, "-m", "spoolq", "--root", str(root), "fsck", *args],
                              capture_output=True, text=True, env=env, timeout=60)

    spool.enqueue("T", "orphan", None)
    dead = Spool(root)
    dead.claim("gone")
    dead.release_server("gone")
    (root / "enqueued/stray").write_bytes(b"x")
    proc = fsck()
    assert proc.returncode == 1 and proc.stderr == ""
    assert proc.stdout.splitlines()[:2] == [
        "bad-name: enqueued/stray: a file (1 bytes) not named TYPE:ID; not a task",
        "orphan: scheduled/gone/T:orphan: SCHEDULED: claimed by server gone, which is gone",
    ]
    assert "2 problem(s)" in proc.stdout.splitlines()[2]
    proc = fsck("--repair")
    assert proc.returncode == 0, proc.stdout
    assert "2 repaired, 0 remain" in proc.stdout
    assert fsck().returncode == 0
    os.chmod(root / "done", 0o2777)
    proc = fsck("--repair")
    assert proc.returncode == 1 and "chmod o-w" in proc.stdout and "Traceback" not in proc.stderr


def test_fsck_beside_a_running_worker_finds_nothing_and_takes_nothing(tmp_path):
    """A busy worker's claims, starts and finishes are never taken for
    damage: each task is read under its lock, live servers are left alone,
    and a task seen twice as it moves is one task."""
    from test_daemon import Workers

    root = tmp_path / "spool"
    spool = Spool.init(root, durable=False)
    spool.register_type("S", "daemon_handlers.sleep")
    ids = [f"t{i:02d}" for i in range(40)]
    for task_id in ids:
        spool.enqueue("S", task_id, {"seconds": 0.02})
    workers = Workers(root)
    try:
        proc = workers.start(concurrency=3)
        passes = 0
        while True:
            done = all(spool.status("S", i).state == State.FINISHED for i in ids)
            report = check(Spool(root), repair=True)
            assert report.findings == [], [str(f) for f in report.findings]
            passes += 1
            if done:
                break
            assert proc.poll() is None and passes < 2000
        assert passes > 1, passes
        assert os.listdir(root / "quarantine") == []
    finally:
        workers.stop_all()


def test_the_second_editions_fields_and_states(spool):
    """A due time in the past and a priority are no damage; a cancel request
    left by a dead daemon ends its task FAILED, cancelled; a cancelled task
    still in enqueued/ (its cancel stopped before the move) goes on to done/;
    a due time or a priority that is not one is a corrupt status."""
    root = Path(spool.root)
    spool.enqueue("T", "past", 1, delay=3600)
    edit_status(root / "enqueued/T:past", not_before="2020-01-01T00:00:00+00:00")
    spool.enqueue("T", "prio", 1, priority=7)
    spool.enqueue("T", "run", 1, priority=50)
    dead = Spool(root)
    dead.start(dead.claim("gone"))  # the highest priority: T:run
    spool.cancel("T", "run", "stop")  # its server lives: the request is written down
    assert spool.status("T", "run").doc["cancel"] == "stop"
    dead.release_server("gone")
    spool.enqueue("T", "half", 1)
    edit_status(root / "enqueued/T:half", state="FAILED", cancelled=True, message="cancelled: x")
    spool.enqueue("T", "badnb", 1)
    edit_status(root / "enqueued/T:badnb", not_before="soon")
    spool.enqueue("T", "badprio", 1)
    edit_status(root / "enqueued/T:badprio", priority="high")
    before = snapshot(root)
    assert kinds(check(Spool(root), repair=False)) == {
        "enqueued/T:badnb": "corrupt-status", "enqueued/T:badprio": "corrupt-status",
        "enqueued/T:half": "wrong-state", "running/T:run": "orphan"}
    assert snapshot(root) == before
    report = check(Spool(root), repair=True)
    actions = {f.path: f.action for f in report.findings}
    assert actions["running/T:run"] == "FAILED: cancelled" and actions["enqueued/T:half"] == "moved to done/"
    assert check(Spool(root), repair=False).findings == []
    run = spool.status("T", "run")
    assert run.state == State.FAILED and run.doc["cancelled"] is True and run.doc["message"] == "cancelled: stop"
    assert spool.status("T", "half").path.startswith(str(root / "done"))
    assert {spool.status("T", i).state for i in ("past", "prio")} == {State.ENQUEUED}
    assert sorted(p.name.split(".")[0] for p in (root / "quarantine").iterdir()
                  if not p.name.endswith(".reason")) == ["T:badnb", "T:badprio"]


def test_a_run_file_needs_only_the_groups_read(spool):
    """A run killed between an output part's create and its chmod leaves the
    part without the group's write (0640 under umask 022): fsck called that
    a problem (exit 1), though only the run ever writes it."""
    root = Path(spool.root)
    spool.enqueue("T", "out", 1)
    claim = spool.claim("s1")
    spool.start(claim)
    spool.set_state(claim, State.FINISHED)
    part = root / "done" / "T:out" / "output.tail.3"
    part.write_bytes(b"latest\n")
    part.chmod(0o640)
    assert run_fsck(str(root), repair=False, out=io.StringIO()) == 0
    part.chmod(0o600)  # the group cannot read it: that is one
    out = io.StringIO()
    assert run_fsck(str(root), repair=False, out=out) == 1
    assert f"fix with: chmod g+r {part}" in out.getvalue(), out.getvalue()
