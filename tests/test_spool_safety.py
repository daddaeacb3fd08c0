"""Bad input and untrusted content: names, inputs, corrupt or planted task
directories, symlinks, and spool roots others can write (docs/contract.md §1.6, §8)."""

from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from atp_demo import RaisesOnLoad
from spoolq import sweeps
from spoolq import (
    CorruptTask,
    InvalidInput,
    InvalidName,
    Spool,
    SpoolError,
    State,
    TaskNotFound,
    UnknownType,
    UnsafeSpool,
)


def snapshot(root: str | Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path under *root*: (mode, bytes or None for dirs and links)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            data = Path(p).read_bytes() if stat.S_ISREG(st.st_mode) else None
            out[os.path.relpath(p, root)] = (st.st_mode, data)
    return out


BAD_NAMES = ["../x", "a/b", "", ".hidden", "-opt", "a:b", "a b", "tab\t", "é", "x@y", "x#1", "nul\0", None, 7]


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize("bad", BAD_NAMES + ["x" * 65])
def test_bad_type_names_are_refused_before_anything_is_written(spool: Spool, bad) -> None:
    before = snapshot(spool.root)
    with pytest.raises(InvalidName):
        spool.register_type(bad, "atp_demo.handler")
    with pytest.raises(InvalidName):
        spool.enqueue(bad, "ok", 1)
    with pytest.raises(InvalidName):
        spool.status(bad, "ok")
    assert snapshot(spool.root) == before


@pytest.mark.parametrize("bad", BAD_NAMES + ["x" * 129])
def test_bad_task_ids_are_refused_before_anything_is_written(spool: Spool, bad) -> None:
    before = snapshot(spool.root)
    for enqueue in (spool.enqueue, spool.enqueue_json):
        with pytest.raises(InvalidName):
            enqueue("T", bad, 1)
    with pytest.raises(InvalidName):
        spool.enqueue_pickled("T", bad, pickle.dumps(1))
    with pytest.raises(InvalidName):
        spool.delete("T", bad)
    assert snapshot(spool.root) == before


@pytest.mark.parametrize("bad", BAD_NAMES + ["x" * 65])
def test_bad_server_ids_are_refused_before_anything_is_written(spool: Spool, bad) -> None:
    spool.enqueue("T", "a", 1)
    before = snapshot(spool.root)
    with pytest.raises(InvalidName):
        spool.claim(bad)
    with pytest.raises(InvalidName):
        spool.hold_server(bad)
    assert snapshot(spool.root) == before


def test_claim_strings_are_parsed_strictly(spool: Spool) -> None:
    from spoolq import Claim

    for text in ["", "T:a", "T:a#1", "T:a#x@s", "T:../a#1@s", "T:a#1@../s", "Ta#1@s"]:
        with pytest.raises(InvalidName):
            Claim.parse(text)


def test_the_longest_names_fit_every_file_name_the_spool_makes(spool: Spool) -> None:
    t, i, s = "T" * 64, "i" * 128, "s" * 64
    spool.register_type(t, "atp_demo.handler")
    spool.enqueue(t, i, 1)
    claim = spool.claim(s)
    assert claim is not None and Claim_str_ok(claim)
    spool.start(claim)
    spool.set_state(claim, State.FINISHED)
    spool.delete(t, i)  # the trash name has room too
    spool.enqueue(t, i, 1)
    Path(spool.root, "enqueued", f"{t}:{i}", "status.json").write_text("{")
    assert spool.claim(s) is None  # quarantined under a name that fits
    assert len(os.listdir(Path(spool.root, "quarantine"))) == 2  # the entry and its .reason


def Claim_str_ok(claim) -> bool:
    from spoolq import Claim

    return Claim.parse(str(claim)) == claim


# ----------------------------------------------------------------------------- inputs


def test_unpicklable_input_is_refused_and_nothing_is_written(spool: Spool) -> None:
    before = snapshot(spool.root)
    with pytest.raises(InvalidInput, match="cannot be pickled"):
        spool.enqueue("T", "a", lambda: 1)
    with pytest.raises(InvalidInput, match="not a valid pickle"):
        spool.enqueue_pickled("T", "a", b"definitely not a pickle")
    with pytest.raises(InvalidInput, match="JSON"):
        spool.enqueue_json("T", "a", {1, 2})
    with pytest.raises(InvalidInput, match="JSON"):
        spool.enqueue_json("T", "a", b"{not json")
    assert snapshot(spool.root) == before


def test_unknown_type_is_refused_and_nothing_is_written(spool: Spool) -> None:
    before = snapshot(spool.root)
    with pytest.raises(UnknownType, match="register it first"):
        spool.enqueue("Nope", "a", 1)
    assert snapshot(spool.root) == before


def test_oversized_input_is_refused(spool_root: Path) -> None:
    spool = Spool.init(spool_root, durable=False, max_input_bytes=100)
    spool.register_type("T", "atp_demo.handler")
    with pytest.raises(InvalidInput, match="over the spool's limit"):
        spool.enqueue("T", "a", b"x" * 200)
    assert os.listdir(Path(spool.root, "tmp")) == []


def test_a_pickle_that_raises_on_load_fails_the_task_with_the_reason(spool: Spool) -> None:
    spool.enqueue("T", "a", RaisesOnLoad())
    claim = spool.claim("s1")
    with pytest.raises(CorruptTask, match="cannot rebuild this input"):
        spool.start(claim)
    info = spool.status("T", "a")
    assert info.state == State.FAILED
    assert info.doc["message"] == "input cannot be loaded: RuntimeError: cannot rebuild this input"
    assert spool.log_records("T", "a")[-1].message == info.doc["message"]
    assert Path(info.path).parent.name == "done"


# ----------------------------------------------------------------------------- corrupt task directories


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda d: (d / "status.json").write_text("{truncated"), id="bad-json"),
        pytest.param(lambda d: (d / "status.json").write_text("[]"), id="not-an-object"),
        pytest.param(lambda d: (d / "status.json").write_text('{"state": "NOPE", "claim": 1}'), id="bad-state"),
        pytest.param(lambda d: (d / "status.json").unlink(), id="no-status"),
        pytest.param(
            lambda d: (d / "status.json").write_text(json.dumps({"state": "FINISHED", "claim": 1})),
            id="final-but-waiting",
        ),
    ],
)
def test_a_corrupt_waiting_task_is_quarantined_and_the_others_stay_claimable(spool: Spool, damage) -> None:
    spool.enqueue("T", "bad", 1)
    spool.enqueue("T", "good", 2)
    damage(Path(spool.root, "enqueued", "T:bad"))
    claims = [spool.claim("s1"), spool.claim("s1")]
    assert [c.id for c in claims if c is not None] == ["good"]
    assert spool.start(claims[0] or claims[1]).input == 2
    quarantined = sorted(os.listdir(Path(spool.root, "quarantine")))
    assert len(quarantined) == 2 and quarantined[0].startswith("T:bad.") and quarantined[1].endswith(".reason")
    reason = Path(spool.root, "quarantine", quarantined[1]).read_text()
    assert "T:bad" in reason
    with pytest.raises(TaskNotFound):
        spool.status("T", "bad")


def test_junk_in_enqueued_is_quarantined(spool: Spool) -> None:
    Path(spool.root, "enqueued", "not-a-task-name").mkdir()
    Path(spool.root, "enqueued", "T:plainfile").write_text("x")
    spool.enqueue("T", "good", 1)
    assert spool.claim("s1").id == "good"
    assert spool.claim("s1") is None
    assert os.listdir(Path(spool.root, "enqueued")) == []
    assert len(os.listdir(Path(spool.root, "quarantine"))) == 4


def test_a_task_whose_input_file_is_missing_is_quarantined_at_start(spool: Spool) -> None:
    spool.enqueue("T", "a", 1)
    claim = spool.claim("s1")
    Path(spool.root, "scheduled", "s1", "T:a", "input.pkl").unlink()
    with pytest.raises(CorruptTask, match="input.pkl is missing"):
        spool.start(claim)
    with pytest.raises(TaskNotFound):
        spool.status("T", "a")
    assert any(n.startswith("T:a.") and not n.endswith(".reason") for n in os.listdir(Path(spool.root, "quarantine")))


def test_a_status_naming_a_path_as_input_is_quarantined_not_read(spool: Spool, tmp_path: Path) -> None:
    secret = tmp_path / "secret.pkl"
    secret.write_bytes(pickle.dumps("secret"))
    spool.enqueue("T", "a", 1)
    claim = spool.claim("s1")
    status = Path(spool.root, "scheduled", "s1", "T:a", "status.json")
    doc = json.loads(status.read_text())
    doc["input"] = os.path.relpath(secret, status.parent)
    status.write_text(json.dumps(doc))
    with pytest.raises(CorruptTask, match="unknown input file"):
        spool.start(claim)
    with pytest.raises(TaskNotFound):
        spool.status("T", "a")


@pytest.mark.parametrize("log", ["missing", "fifo", "symlink"])
def test_a_claimed_task_whose_log_cannot_be_appended_to_is_quarantined_at_its_start(
        spool: Spool, tmp_path: Path, log: str) -> None:
    outside = tmp_path / "outside.log"
    outside.write_text("not the spool's\n")
    spool.enqueue("T", "a", 1)
    claim = spool.claim("s1")  # writes nothing: the start is the first to append to the log
    path = Path(spool.root, "scheduled", "s1", "T:a", "log")
    path.unlink()
    if log == "fifo":
        os.mkfifo(path)
    elif log == "symlink":
        path.symlink_to(outside)
    with pytest.raises(CorruptTask, match="log cannot be appended to.*moved to quarantine"):
        spool.start(claim)
    with pytest.raises(TaskNotFound):
        spool.status("T", "a")
    assert outside.read_text() == "not the spool's\n"
    reasons = [p.read_text() for p in Path(spool.root, "quarantine").glob("*.reason")]
    assert len(reasons) == 1 and "log cannot be appended to" in reasons[0]
    assert os.listdir(Path(spool.root, "running")) == []


class _Pwned:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("planted", ["writable-by-others", "foreign-owner-and-group"])
def test_a_task_planted_from_outside_the_spools_group_is_quarantined_not_loaded(
        spool: Spool, tmp_path: Path, planted: str) -> None:
    """While the spool's modes were wrong, an outsider planted a whole task;
    the operator fixed the modes as the worker's error said, and the next
    start unpickled the outsider's input (found by an outside tester: a
    task 0777 of a non-member ran as the service user)."""
    marker = tmp_path / "pwned"
    spool.enqueue("T", "victim", 1)
    stage = Path(spool.root, "enqueued", "T:victim")
    (stage / "input.pkl").write_bytes(pickle.dumps(_Pwned(str(marker))))
    if planted == "writable-by-others":
        for path in (stage, *stage.iterdir()):
            path.chmod(0o777 if path.is_dir() else 0o666)
    else:  # the outsider's own uid and group; writable by nobody else
        for path in (stage, *stage.iterdir()):
            os.chown(path, 65534, 65534)
            path.chmod(0o755 if path.is_dir() else 0o644)
    checked = subprocess.run([sys.executable, "-m", "spoolq", "--root", spool.root, "fsck"], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 1 and "would not be loaded" in checked.stdout, checked.stdout + checked.stderr
    claim = spool.claim("s1")
    with pytest.raises(CorruptTask, match="not loaded: .*(writable by any user|made outside the spool's group)"):
        spool.start(claim)
    assert not marker.exists()
    with pytest.raises(TaskNotFound):
        spool.status("T", "victim")
    reasons = [p.read_text() for p in Path(spool.root, "quarantine").glob("*.reason")]
    assert len(reasons) == 1 and "not loaded" in reasons[0], reasons


# ----------------------------------------------------------------------------- symlinks


def make_outside_task(tmp_path: Path) -> Path:
    """A complete-looking task directory outside the spool."""
    target = tmp_path / "outside"
    target.mkdir()
    (target / "input.pkl").write_bytes(pickle.dumps("planted"))
    (target / "status.json").write_text(json.dumps({"type": "T", "id": "evil", "state": "ENQUEUED", "claim": 0}))
    (target / "log").write_text("")
    return target


def test_a_symlink_planted_as_a_task_is_quarantined_and_its_target_untouched(spool: Spool, tmp_path: Path) -> None:
    target = make_outside_task(tmp_path)
    before = snapshot(target)
    os.symlink(target, Path(spool.root, "enqueued", "T:evil"))
    spool.enqueue("T", "good", 1)
    claim = spool.claim("s1")
    assert claim.id == "good"
    assert spool.claim("s1") is None  # the link was met, not claimed
    links = [p for p in Path(spool.root, "quarantine").iterdir() if p.is_symlink()]
    assert len(links) == 1 and os.readlink(links[0]) == str(target)
    assert snapshot(target) == before


def test_symlinked_files_inside_a_task_are_not_followed(spool: Spool, tmp_path: Path) -> None:
    target = make_outside_task(tmp_path)
    before = snapshot(target)
    spool.enqueue("T", "a", 1)
    status = Path(spool.root, "enqueued", "T:a", "status.json")
    status.unlink()
    os.symlink(target / "status.json", status)
    assert spool.claim("s1") is None
    with pytest.raises(TaskNotFound):
        spool.status("T", "a")
    assert snapshot(target) == before


def test_symlinked_input_is_not_followed(spool: Spool, tmp_path: Path) -> None:
    target = make_outside_task(tmp_path)
    spool.enqueue("T", "a", 1)
    claim = spool.claim("s1")
    inp = Path(spool.root, "scheduled", "s1", "T:a", "input.pkl")
    inp.unlink()
    os.symlink(target / "input.pkl", inp)
    with pytest.raises(CorruptTask):
        spool.start(claim)
    with pytest.raises(TaskNotFound):
        spool.status("T", "a")


def test_a_symlink_in_done_is_removed_as_a_link(spool: Spool, tmp_path: Path) -> None:
    target = make_outside_task(tmp_path)
    before = snapshot(target)
    os.symlink(target, Path(spool.root, "done", "T:evil"))
    with pytest.raises(CorruptTask):
        spool.status("T", "evil")
    spool.delete("T", "evil")
    assert not os.path.lexists(Path(spool.root, "done", "T:evil"))
    assert os.listdir(Path(spool.root, "tmp")) == []
    assert snapshot(target) == before


def test_a_symlinked_server_directory_is_refused(spool: Spool, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", Path(spool.root, "scheduled", "s1"))
    spool.enqueue("T", "a", 1)
    with pytest.raises(UnsafeSpool, match="symlink"):
        spool.claim("s1")
    assert spool.status("T", "a").state == State.ENQUEUED
    assert os.listdir(tmp_path / "elsewhere") == []
    assert not spool.server_alive("s1")  # the refused hold let go of the lock
    sweeps.reenqueue_zombies(spool)  # and a sweep moves the link out of the way
    assert not os.path.lexists(Path(spool.root, "scheduled", "s1"))
    assert spool.claim("s1").id == "a"


def test_lookups_never_go_through_a_symlink_planted_as_a_servers_directory(spool: Spool, tmp_path: Path) -> None:
    """A group member linked scheduled/serverQ to a directory of theirs
    holding a forged copy of a task: `status` showed the forgery, and root's
    `requeue` moved the outside directory into the spool (found by an
    outside tester)."""
    spool.enqueue("T", "a", 1)
    claim = spool.claim("s1")
    spool.start(claim)
    spool.set_state(claim, State.FAILED, "the real one")
    forged = make_outside_task(tmp_path)
    (tmp_path / "mine").mkdir()
    forged.rename(tmp_path / "mine" / "T:a")
    before = snapshot(tmp_path / "mine")
    os.symlink(tmp_path / "mine", Path(spool.root, "scheduled", "serverQ"))
    assert spool.status("T", "a").doc["message"] == "the real one"
    assert [t[1] for t in spool.iter_tasks()] == ["a"]
    spool.requeue("T", "a")
    assert spool.status("T", "a").state == State.ENQUEUED
    assert Path(spool.root, "enqueued", "T:a").is_dir() and not Path(spool.root, "enqueued", "T:a").is_symlink()
    assert snapshot(tmp_path / "mine") == before


# ----------------------------------------------------------------------------- the spool itself


def test_a_spool_others_can_write_is_refused_with_the_fix(spool: Spool) -> None:
    root = Path(spool.root)
    os.chmod(root, os.stat(root).st_mode | stat.S_IWOTH)
    with pytest.raises(UnsafeSpool, match=f"chmod o-w {root}"):
        Spool(root)
    os.chmod(root, os.stat(root).st_mode & ~stat.S_IWOTH)
    running = root / "running"
    os.chmod(running, os.stat(running).st_mode | stat.S_IWOTH)
    with pytest.raises(UnsafeSpool, match=f"chmod o-w {running}"):
        Spool(root)


def test_start_refuses_a_spool_that_became_writable_by_others(spool: Spool) -> None:
    spool.enqueue("T", "a", 1)
    claim = spool.claim("s1")
    root = Path(spool.root)
    os.chmod(root, os.stat(root).st_mode | stat.S_IWOTH)
    with pytest.raises(UnsafeSpool):
        spool.start(claim)
    os.chmod(root, os.stat(root).st_mode & ~stat.S_IWOTH)
    assert spool.start(claim).input == 1


def test_every_start_sees_a_change_made_since_the_last_one(spool: Spool, tmp_path: Path) -> None:
    """The check before a start is skipped only while the kernel reports no
    change (Layout.check_again): each change below comes after a start
    that passed, and the very next start must refuse."""
    import shutil
    import subprocess

    root = Path(spool.root)
    count = iter(range(100))

    def start():
        task_id = f"t{next(count)}"
        spool.enqueue("T", task_id, 1)
        return spool.start(spool.claim("s1"))

    def refused_once(change, undo):
        assert start().input == 1  # passes, and is now vouched for by the watch
        change()
        with pytest.raises(UnsafeSpool):
            start()
        undo()
        assert start().input == 1

    running, done = root / "running", root / "done"
    refused_once(lambda: os.chmod(running, 0o2777), lambda: os.chmod(running, 0o2770))
    refused_once(lambda: os.chmod(root, os.stat(root).st_mode | stat.S_IWOTH),
                 lambda: os.chmod(root, os.stat(root).st_mode & ~stat.S_IWOTH))
    above = root.parent
    refused_once(lambda: os.chmod(above, 0o777), lambda: os.chmod(above, 0o755))
    setfacl = shutil.which("setfacl")
    assert setfacl, "setfacl missing: run .ci/install-system-deps (acl)"
    refused_once(lambda: subprocess.run([setfacl, "-m", "u:nobody:rwx", str(root / "enqueued")], check=True),
                 lambda: subprocess.run([setfacl, "-b", str(root / "enqueued")], check=True))
    # Refused again and again: no watch (an inotify instance) is left behind.
    os.chmod(running, 0o2777)
    with pytest.raises(UnsafeSpool):
        start()  # the watch that vouched is closed
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(UnsafeSpool):
            start()
    assert len(os.listdir("/proc/self/fd")) == fds
    os.chmod(running, 0o2770)
    elsewhere = tmp_path / "done-elsewhere"
    refused_once(lambda: (done.rename(elsewhere), os.symlink(elsewhere, done)),
                 lambda: (done.unlink(), elsewhere.rename(done)))

    # A forked child shares its parent's inotify descriptor, so the parent
    # may read the events meant for both: the child must not trust it.
    assert start().input == 1
    spool.enqueue("T", "parent", 1)
    spool.enqueue("T", "child", 1)
    parents, childs = spool.claim("s1"), spool.claim("s1")
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.read(go_r, 1)  # until the parent has read the event
            spool.start(childs)
            os._exit(1)
        except UnsafeSpool:
            os._exit(0)
        except BaseException:
            os._exit(2)
    os.chmod(running, 0o2777)
    with pytest.raises(UnsafeSpool):
        spool.start(parents)
    os.write(go_w, b"x")
    assert os.waitpid(pid, 0)[1] == 0, "the child started a task in a spool others may write"
    os.chmod(running, 0o2770)


def test_a_state_directory_replaced_by_a_symlink_is_refused(spool: Spool, tmp_path: Path) -> None:
    done = Path(spool.root, "done")
    done.rename(tmp_path / "done-elsewhere")
    os.symlink(tmp_path / "done-elsewhere", done)
    with pytest.raises(UnsafeSpool, match="symlink"):
        Spool(spool.root)


def test_a_missing_or_incomplete_spool_says_how_to_fix_it(tmp_path: Path) -> None:
    with pytest.raises(SpoolError, match="spoolq init"):
        Spool(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    with pytest.raises(SpoolError, match="spoolq init"):
        Spool(tmp_path / "half")


def test_init_is_idempotent_and_keeps_tasks(spool: Spool) -> None:
    spool.enqueue("T", "a", 1)
    again = Spool.init(spool.root)
    assert again.status("T", "a").state == State.ENQUEUED
    mode = stat.S_IMODE(os.stat(Path(spool.root, "enqueued")).st_mode)
    assert mode & 0o007 == 0 and mode & stat.S_ISGID


def test_init_refuses_settings_that_would_refuse_every_task(tmp_path):
    from spoolq import SpoolError

    for bad in ({"max_input_bytes": -5}, {"max_input_bytes": 0}, {"max_queue": -1}):
        with pytest.raises(SpoolError):
            Spool.init(tmp_path / "s", **bad)


def test_careless_api_calls_get_their_documented_errors_and_change_nothing(spool: Spool, tmp_path: Path) -> None:
    """An outside tester's careless calls: cancel(reason=5) was an
    AttributeError, a bytes reason was stored as its repr, two pickles
    joined were enqueued (the handler got the first), durable='false' made a
    durable spool, list_tasks(state='RUNNING') a KeyError and
    list_tasks(type_name='nope') an empty list."""
    spool.enqueue("T", "a", 1)
    for reason in (5, ["x"], b"bytes"):
        with pytest.raises(InvalidInput, match="must be a str"):
            spool.cancel("T", "a", reason=reason)
    assert spool.status("T", "a").state == State.ENQUEUED
    with pytest.raises(InvalidInput, match="not one pickle"):
        spool.enqueue_pickled("T", "two", pickle.dumps("first") + pickle.dumps("second"))
    with pytest.raises(TaskNotFound):
        spool.status("T", "two")
    for flag in ("false", 0, []):
        with pytest.raises(SpoolError, match="durable must be True or False"):
            Spool.init(spool.root, durable=flag)
    assert Spool(spool.root).durable == spool.durable
    assert [t.id for t in spool.list_tasks(state="enqueued")] == ["a"] == [t.id for t in spool.list_tasks(state=1)]
    for state in ("bogus", 99, True):
        with pytest.raises(InvalidInput, match="not a task state"):
            spool.list_tasks(state=state)
    with pytest.raises(UnknownType):
        spool.list_tasks(type_name="nope")


def test_init_makes_missing_parents_0755_whatever_the_umask(tmp_path: Path) -> None:
    """Under umask 077 they came out 0700, and the spool's group could not
    reach the spool below them."""
    old = os.umask(0o077)
    try:
        Spool.init(tmp_path / "a" / "b" / "spool")
    finally:
        os.umask(old)
    for parent in (tmp_path / "a", tmp_path / "a" / "b"):
        assert stat.S_IMODE(os.stat(parent).st_mode) == 0o755, parent
