"""The deployment docs/operating.md describes, with real users: the worker
user owns the spool, producers are members of its group, each with its own
umask. Every task a group member enqueues runs to done/, the worker's
heartbeat, recovery and sweeps work on tasks producers own, and producers
can read, sweep and fsck the spool.

Users and a group are created for the test (useradd; root needed, as in CI)
and run an installation made from /usr/bin/python3 (tests/system_python.py),
since the test's own interpreter may live where other users cannot go."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spoolq import Spool, State
from system_python import build_venv, clean_env

HERE = Path(__file__).parent
GROUP, WORKER, PRODUCER = "sqmu", "sqmu-worker", "sqmu-prod"
ROOT = "root"  # the operator, running spoolq as root (Site.spoolq's who)

HANDLERS = '''
import os, time

def work(ts, inp):
    marker = inp.get("marker")
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(600)  # the first run hangs (killed with its worker)
    time.sleep(inp.get("seconds", 0))
    ts.store_response("ok " + str(inp.get("n")), "text/plain")
'''


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def users() -> Iterator[dict[str, int]]:
    if os.geteuid() != 0:
        pytest.fail("the multi-user tests create users: run them as root (CI does)")
    created = []
    try:
        grp.getgrnam(GROUP)
    except KeyError:
        _run("groupadd", "--system", GROUP)
        created.append(("groupdel", GROUP))
    for user, args in ((WORKER, ["-g", GROUP]), (PRODUCER, ["-U", "-G", GROUP])):
        try:
            pwd.getpwnam(user)
        except KeyError:
            _run("useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", *args, user)
            created.insert(0, ("userdel", user))
    try:
        yield {"gid": grp.getgrnam(GROUP).gr_gid, "worker": pwd.getpwnam(WORKER).pw_uid,
               "producer": pwd.getpwnam(PRODUCER).pw_uid}
    finally:
        for cmd, name in created:
            subprocess.run([cmd, name], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def venv() -> Iterator[Path]:
    yield from build_venv()


class Site:
    """A spool owned by the worker user, shared with the group."""

    def __init__(self, venv: Path, users: dict[str, int]) -> None:
        self.venv = venv
        self.users = users
        self.base = Path(tempfile.mkdtemp(prefix="spoolq-mu-", dir="/var/tmp"))
        self.base.chmod(0o755)
        self.root = self.base / "spool"  # made the way tmpfiles makes /var/spool/spoolq
        self.root.mkdir()
        os.chown(self.root, users["worker"], users["gid"])
        self.root.chmod(0o2770)
        code = self.base / "code"
        code.mkdir()
        (code / "mu_handlers.py").write_text(HANDLERS)
        shutil.copy(HERE / "worker_runner.py", code / "worker_runner.py")
        code.chmod(0o755)
        self.code = code
        self.scratch = self.base / "scratch"  # where handlers leave marker files
        self.scratch.mkdir()
        self.scratch.chmod(0o1777)
        self.procs: list[subprocess.Popen] = []

    def env(self) -> dict[str, str]:
        return dict(clean_env(), PYTHONPATH=str(self.code), HOME="/nonexistent")

    def as_user(self, who: str, umask: int) -> dict:
        if who == ROOT:
            return {"umask": umask, "env": self.env()}
        uid = self.users["worker" if who == WORKER else "producer"]
        return {"user": uid, "group": self.users["gid"] if who == WORKER else uid,
                "extra_groups": [self.users["gid"]], "umask": umask, "env": self.env()}

    def spoolq(self, who: str, *args: str, umask: int = 0o007, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([str(self.venv / "bin" / "spoolq"), "--root", str(self.root), *args],
                              capture_output=True, text=True, timeout=120, **self.as_user(who, umask))
        if check:
            assert done.returncode == 0, (who, args, done.stdout, done.stderr)
        return done

    def start_worker(self) -> subprocess.Popen:
        log = open(self.base / f"worker{len(self.procs)}.log", "w")
        options = json.dumps({"heartbeat_interval": 0.3, "sweep_interval": 0.5})
        proc = subprocess.Popen([str(self.venv / "bin" / "python3"), str(self.code / "worker_runner.py"),
                                 str(self.root), "w1", options], stderr=log, **self.as_user(WORKER, 0o007))
        proc.log = log  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        if os.environ.get("KEEP_MU") is None:
            shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def site(venv, users) -> Iterator[Site]:
    s = Site(venv, users)
    yield s
    s.close()


def wait_until(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def state(root: Path, task_id: str) -> State:
    return Spool(root).status("W", task_id).state


@pytest.mark.parametrize("producer_umask", [0o007, 0o022, 0o077])
def test_tasks_of_every_group_member_run_whatever_their_umask(site, producer_umask):
    site.spoolq(WORKER, "init", umask=0o022)  # root's usual umask: init must still give 2770
    for sub in ("", "enqueued", "scheduled", "running", "done", "tmp", "quarantine", "types", "locks"):
        mode = stat.S_IMODE(os.stat(site.root / sub).st_mode)
        assert mode == 0o2770, (sub, oct(mode))
    site.spoolq(WORKER, "register", "W", "mu_handlers.work", "--max-restarts", "2")
    worker = site.start_worker()
    inputs = site.base / "inputs"
    inputs.mkdir()
    inputs.chmod(0o755)
    tasks = {"quick1": {"n": 1}, "quick2": {"n": 2}, "slow": {"n": 3, "seconds": 1.5}}
    for task_id, inp in tasks.items():
        (inputs / f"{task_id}.json").write_text(json.dumps(inp))
        (inputs / f"{task_id}.json").chmod(0o644)
        site.spoolq(PRODUCER, "enqueue", "W", task_id, str(inputs / f"{task_id}.json"), "--json",
                    umask=producer_umask)
    wait_until(lambda: all(state(site.root, t) == State.FINISHED for t in tasks), what="every task FINISHED")
    # The producer reads what the worker wrote.
    assert site.spoolq(PRODUCER, "result", "W", "slow").stdout == "ok 3"
    assert "FINISHED" in site.spoolq(PRODUCER, "log", "W", "quick1").stdout
    # A task the producer owns survives its worker's death: recovery re-runs it.
    (inputs / "hang.json").write_text(json.dumps({"n": 4, "marker": str(site.scratch / "hang")}))
    (inputs / "hang.json").chmod(0o644)
    site.spoolq(PRODUCER, "enqueue", "W", "hang", str(inputs / "hang.json"), "--json", umask=producer_umask)
    wait_until(lambda: (site.scratch / "hang").exists(), what="the hanging first run")
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(10)
    site.start_worker()
    wait_until(lambda: state(site.root, "hang") == State.FINISHED, what="the recovered task")
    assert Spool(site.root).status("W", "hang").doc["restarts"] == 1
    # Producers sweep and check the spool they share.
    assert site.spoolq(PRODUCER, "sweep", umask=producer_umask).returncode == 0
    done = site.spoolq(PRODUCER, "fsck", "--repair", umask=producer_umask, check=False)
    assert done.returncode == 0 and "0 problem(s)" in done.stdout, done.stdout + done.stderr
    done = site.spoolq(WORKER, "fsck", check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_fsck_finds_what_the_group_cannot_use_and_the_owner_repairs_it(site):
    site.spoolq(WORKER, "init", umask=0o022)
    site.spoolq(WORKER, "register", "W", "mu_handlers.work")
    inp = site.base / "in.json"
    inp.write_text('{"n": 9}')
    inp.chmod(0o644)
    os.unlink(site.root / "locks" / "enqueue.lock")  # a spool from before init made it
    site.spoolq(PRODUCER, "enqueue", "W", "strict", str(inp), "--json", umask=0o077)
    assert stat.S_IMODE(os.stat(site.root / "locks" / "enqueue.lock").st_mode) & 0o060 == 0o060
    task = site.root / "enqueued" / "W:strict"
    subprocess.run(["chmod", "-R", "g-w", str(task)], check=True, **site.as_user(PRODUCER, 0o007))
    found = site.spoolq(WORKER, "fsck", check=False)
    assert found.returncode == 1 and "group-access: enqueued/W:strict" in found.stdout, found.stdout
    repaired = site.spoolq(PRODUCER, "fsck", "--repair", check=False)  # the owner can chmod
    assert repaired.returncode == 0, repaired.stdout
    site.start_worker()
    wait_until(lambda: state(site.root, "strict") == State.FINISHED, what="the repaired task")
    # A state directory the group cannot write is reported too.
    os.chmod(site.root / "enqueued", 0o2750)
    found = site.spoolq(WORKER, "fsck", check=False)
    assert found.returncode == 1 and "group-access: enqueued:" in found.stdout, found.stdout
    refused = site.spoolq(PRODUCER, "enqueue", "W", "x", str(inp), "--json", check=False)
    assert refused.returncode == 1 and "Permission denied" in refused.stderr


def owners(root: Path) -> dict[str, tuple[int, int]]:
    """(uid, gid) of everything below *root*, by relative path."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            out[str(path.relative_to(root))] = (st.st_uid, st.st_gid)
    return out


def test_init_as_root_on_the_workers_spool_keeps_it_theirs(site):
    """The spool as packaging makes it (install -d -m 0770 -o spoolq -g
    spoolq: no setgid bit), initialised by its user, then `spoolq init` as
    root: without a setting it writes nothing; with one, spool.json stays
    the spool's, so its users can go on (it used to become root:root and
    stop every one of them, while root's fsck found nothing)."""
    os.chmod(site.root, 0o770)
    site.spoolq(WORKER, "init", umask=0o022)
    settings = site.root / "spool.json"
    before = settings.stat()
    site.spoolq(ROOT, "init", umask=0o022)
    assert settings.stat().st_ino == before.st_ino  # not rewritten
    site.spoolq(ROOT, "init", "--max-queue", "5", umask=0o022)
    theirs = (site.users["worker"], site.users["gid"])
    assert set(owners(site.root).values()) == {theirs}, owners(site.root)
    assert stat.S_IMODE(settings.stat().st_mode) & 0o040
    for who in (WORKER, PRODUCER):
        assert json.loads(site.spoolq(who, "init", "--json").stdout)["max_queue"] == 5
    assert site.spoolq(ROOT, "fsck").returncode == 0
    os.chown(settings, 0, 0)  # what init as root used to leave
    refused = site.spoolq(PRODUCER, "types", check=False)
    assert refused.returncode == 1 and "Permission denied" in refused.stderr
    found = site.spoolq(ROOT, "fsck", check=False)
    assert found.returncode == 1 and "group-access: spool.json: not readable by the spool's group" in found.stdout
    assert f"chgrp {site.users['gid']} {settings}" in found.stdout, found.stdout


def test_init_as_root_first_gives_the_whole_spool_to_its_owner(site):
    """Root makes the layout in the spool user's root: every directory, the
    lock file and spool.json are the spool user's and group's, and the
    spool works for its worker and producers."""
    os.chmod(site.root, 0o770)
    site.spoolq(ROOT, "init", umask=0o022)
    made = owners(site.root)
    assert {"types", "locks/enqueue.lock", "locks/servers", "metrics", "spool.json"} <= set(made)
    assert set(made.values()) == {(site.users["worker"], site.users["gid"])}, made
    for sub in ("enqueued", "locks", "locks/servers"):
        assert stat.S_IMODE(os.stat(site.root / sub).st_mode) == 0o2770, sub
    site.spoolq(WORKER, "register", "W", "mu_handlers.work")
    inp = site.base / "in.json"
    inp.write_text('{"n": 1}')
    inp.chmod(0o644)
    site.spoolq(PRODUCER, "enqueue", "W", "t1", str(inp), "--json")
    site.start_worker()
    wait_until(lambda: state(site.root, "t1") == State.FINISHED, what="the task")
    assert site.spoolq(WORKER, "fsck").returncode == 0


def test_a_worker_whose_user_may_not_write_the_spool_exits_78(site):
    """A spool its user may not enter will not become one it may by a
    restart: exit 78, which systemd does not restart on (it was 1, and
    systemd restarted it in a loop). Here the user is not in the spool's
    group."""
    site.spoolq(WORKER, "init", umask=0o022)
    nobody = pwd.getpwnam("nobody")
    denied = subprocess.run([str(site.venv / "bin" / "spoolq"), "--root", str(site.root), "worker", "w8"],
                            capture_output=True, text=True, timeout=120, user=nobody.pw_uid,
                            group=nobody.pw_gid, extra_groups=[], env=site.env())
    assert denied.returncode == 78, (denied.returncode, denied.stderr)
    assert "Permission denied" in denied.stderr and "Traceback" not in denied.stderr, denied.stderr
    assert len(denied.stderr.splitlines()) == 1, denied.stderr


def test_root_will_not_run_the_handlers_of_a_spool_others_can_write_unless_told(site):
    """A worker started by hand as root (operating.md's drain, a debugging
    session) ran a group member's pickle as root: whoever may enqueue could
    become root. It now refuses, saying who can write and what to do."""
    site.spoolq(WORKER, "init", umask=0o022)
    site.spoolq(WORKER, "register", "W", "mu_handlers.work")
    refused = site.spoolq(ROOT, "worker", "w9", check=False)
    assert refused.returncode == 78, (refused.returncode, refused.stderr)
    assert refused.stderr.startswith("spoolq: refusing to run handlers as root: its owner sqmu-worker and the "
                                     "members of group sqmu can write the spool"), refused.stderr
    assert "--allow-root" in refused.stderr and len(refused.stderr.splitlines()) == 1, refused.stderr
    # Told: it runs (and, draining with nothing held, ends at once).
    allowed = site.spoolq(ROOT, "worker", "w9", "--drain", "--allow-root", check=False)
    assert allowed.returncode == 0, allowed.stderr


def test_a_task_the_worker_cannot_move_is_said_once_and_holds_up_no_other(site):
    """A task made by hand by a producer whose umask took the group's write
    permission (0755) cannot be moved by the worker's user: the claim failed
    with a bare "Permission denied", paused all claims for a second, and was
    logged again at every rescan, forever."""
    site.spoolq(WORKER, "init", umask=0o022)
    site.spoolq(WORKER, "register", "W", "mu_handlers.work")
    inp = site.base / "in.json"
    inp.write_text(json.dumps({"n": 1}))
    inp.chmod(0o644)
    for task_id in ("stuck", "good1"):
        site.spoolq(PRODUCER, "enqueue", "W", task_id, str(inp), "--json")
    stuck = site.root / "enqueued" / "W:stuck"
    for path in (stuck, *stuck.iterdir()):
        os.chown(path, site.users["producer"], pwd.getpwuid(site.users["producer"]).pw_gid)
        path.chmod(0o755 if path.is_dir() else 0o644)
    log = site.base / "worker0.log"
    options = json.dumps({"heartbeat_interval": 0.3, "sweep_interval": 0.5, "rescan_interval": 0.3})
    with open(log, "w") as err:
        proc = subprocess.Popen([str(site.venv / "bin" / "python3"), str(site.code / "worker_runner.py"),
                                 str(site.root), "w1", options], stderr=err, **site.as_user(WORKER, 0o007))
    site.procs.append(proc)
    wait_until(lambda: state(site.root, "good1") == State.FINISHED, what="the good task")
    site.spoolq(PRODUCER, "enqueue", "W", "good2", str(inp), "--json")
    wait_until(lambda: state(site.root, "good2") == State.FINISHED, what="a task enqueued after it")
    time.sleep(1.5)  # a few rescans (0.3 s) offer the stuck task again: nothing more is said
    lines = [line for line in log.read_text().splitlines() if "cannot claim W:stuck" in line]
    assert len(lines) == 1, lines
    assert "ERROR" in lines[0] and f"chmod -R g+rwX {stuck}" in lines[0], lines
    assert state(site.root, "stuck") == State.ENQUEUED


def test_init_by_a_member_of_another_primary_group_leaves_spool_json_to_the_group(site):
    """On a root without the setgid bit (as the tmpfiles.d line made it), a
    producer's `spoolq init --max-queue 200` left spool.json in the
    producer's own group: every other member's command, and the worker's
    restart, failed on it ("fix or remove it")."""
    site.spoolq(WORKER, "init", umask=0o022)
    site.spoolq(WORKER, "register", "W", "mu_handlers.work")
    site.root.chmod(0o770)
    site.spoolq(PRODUCER, "init", "--max-queue", "200", umask=0o007)
    st = os.stat(site.root / "spool.json")
    assert st.st_gid == site.users["gid"], st
    assert json.loads(site.spoolq(WORKER, "stats", "--json").stdout)["states"]["ENQUEUED"] == 0
    # Were it unreadable all the same (a hand-made one), the message says how to fix it, keeping it.
    own_group = pwd.getpwuid(site.users["producer"]).pw_gid
    os.chown(site.root / "spool.json", site.users["producer"], own_group)
    (site.root / "spool.json").chmod(0o640)
    assert os.stat(site.root / "spool.json").st_mode & 0o777 == 0o640
    inp = site.base / "in.json"
    inp.write_text("{}")
    inp.chmod(0o644)
    done = site.spoolq(WORKER, "enqueue", "W", "x", str(inp), "--json", check=False)
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "give it to the spool's group" in done.stderr and "remove it" not in done.stderr, done.stderr


def test_fsck_names_a_task_directory_the_group_cannot_open_and_repairs_the_rest(site):
    """A member's task directory at mode 2700 was reported as "not-a-
    directory", and `fsck --repair` stopped at it with "Permission denied",
    repairing nothing after it."""
    site.spoolq(WORKER, "init", umask=0o022)
    site.spoolq(WORKER, "register", "W", "mu_handlers.work")
    inp = site.base / "in.json"
    inp.write_text("{}")
    inp.chmod(0o644)
    site.spoolq(PRODUCER, "enqueue", "W", "private", str(inp), "--json")
    private = site.root / "enqueued" / "W:private"
    os.chown(private, site.users["producer"], pwd.getpwuid(site.users["producer"]).pw_gid)
    private.chmod(0o2700)
    junk = site.root / "enqueued" / "not-a-task-name"
    junk.mkdir()
    os.chown(junk, site.users["worker"], site.users["gid"])
    for args in (("fsck",), ("fsck", "--repair")):
        done = site.spoolq(WORKER, *args, check=False)
        assert done.returncode == 1 and "Traceback" not in done.stderr, (args, done.stdout, done.stderr)
        assert "group-access" in done.stdout and f"chmod -R g+rwX {private}" in done.stdout, done.stdout
        assert "not-a-directory" not in done.stdout, done.stdout
    assert not junk.exists()  # the repair went on past the task it could not open


def test_one_type_file_the_group_cannot_read_stops_only_its_own_type(site):
    """A member's types/evil.json at 0600 made `stats`, `types` and every
    enqueue fail for every user ("Permission denied: evil.json"), and
    registering the type again failed too."""
    site.spoolq(WORKER, "init", umask=0o022)
    site.spoolq(WORKER, "register", "W", "mu_handlers.work")
    site.spoolq(PRODUCER, "register", "Evil", "mu_handlers.work", umask=0o077)
    evil = site.root / "types" / "Evil.json"
    evil.chmod(0o600)  # as a strict umask without spoolq's care would leave it
    os.chown(evil, site.users["producer"], pwd.getpwuid(site.users["producer"]).pw_gid)
    inp = site.base / "in.json"
    inp.write_text("{}")
    inp.chmod(0o644)
    assert "W" in site.spoolq(WORKER, "types").stdout
    json.loads(site.spoolq(WORKER, "stats", "--json").stdout)
    site.spoolq(WORKER, "enqueue", "W", "fine", str(inp), "--json")
    refused = site.spoolq(WORKER, "enqueue", "Evil", "x", str(inp), "--json", check=False)
    assert refused.returncode == 1 and f"{evil} cannot be read" in refused.stderr, refused.stderr
    assert "register the type again" in refused.stderr, refused.stderr
    site.spoolq(WORKER, "register", "Evil", "mu_handlers.work")  # the way out it names
    site.spoolq(WORKER, "enqueue", "Evil", "x", str(inp), "--json")


def test_a_user_outside_the_group_is_told_so(site):
    """Every command of a user outside the spool's group said only
    "Permission denied: .../types", with no word of the group."""
    site.spoolq(WORKER, "init", umask=0o022)
    nobody = pwd.getpwnam("nobody")
    for args in (("types",), ("stats",), ("list",)):
        done = subprocess.run([str(site.venv / "bin" / "spoolq"), "--root", str(site.root), *args],
                              capture_output=True, text=True, timeout=120, user=nobody.pw_uid,
                              group=nobody.pw_gid, extra_groups=[], env=site.env())
        assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, (args, done.stderr)
        assert done.stderr.strip().endswith(f"(this user is not in the spool's group {GROUP}: ask to be added, "
                                            "then log in again)"), (args, done.stderr)
