"""spoolq@.service under a real systemd user manager.

Why a user manager: in this environment systemd is not PID 1, so there is no
system manager to talk to and nspawn cannot boot one, but ``systemd --user``
runs.  It executes the same unit files with
the same service logic (Type=notify, watchdog, restarts, KillMode, sandbox),
so it proves what `systemd-analyze verify` cannot: that the worker really
becomes ``active (running)`` through READY=1 and survives the sandbox.

Safety first.  Started naively as root, ``systemd --user`` believes the whole
cgroup tree is its own and moves *every process on the host* (PID 1
included) into ``/init.scope``.  The harness therefore starts it inside a
fresh cgroup, at the same path in every mounted hierarchy (systemd assumes
identical paths), nested under the test process's own groups; it refuses to
start the manager at all if that cannot be arranged, checks afterwards that
PID 1 did not move, and removes the cgroups at the end.  ``systemd --user``
also exits unless /run/systemd/system exists; the harness creates that
directory only if it is missing, and removes it again as soon as the manager
is up (it is only looked at on start-up; leaving it would make other tools
believe systemd booted the machine).  A manager running as root also takes
the "inaccessible" nodes that ProtectHome=yes and friends mount over hidden
paths from /run/systemd/inaccessible/, which PID 1 creates at boot on a real
host; the harness creates them the same way when they are missing and leaves
them (nothing reads meaning into them, and a concurrent run may be using them).

The code runs the way docs/operating.md installs it: from a virtualenv made
from the distribution's /usr/bin/python3 (python3 + python3-venv, installed
by .ci/install-system-deps) with the checkout pip-installed into it, under
/opt like /opt/spoolq.  So the shipped sandbox runs as shipped --
ProtectHome=yes and PrivateTmp=yes included -- and ExecStart differs from the
shipped one only in the venv's directory (stage_user_units lists every
difference and why).  The test process's own interpreter (often under /root,
which ProtectHome=yes hides) only runs the producer side: init, enqueue, status.

Two groups of tests:

* harness tests (always, unless the manager cannot start): the real
  spoolq@.service, sandbox included, with ExecStart swapped for a tiny
  worker written with spoolq.systemd.Notifier -- READY=1, STATUS=,
  STOPPING=1 on SIGTERM and a watchdog that catches a hung main loop.
* daemon tests: the real worker with the shipped ExecStart, two instances
  on one spool, 50 tasks, stop-mid-task hand-back, watchdog, bad instance
  names (exit 78, no restart), and `systemctl stop spoolq.target` waiting
  for its workers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest
from system_python import build_venv

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "packaging" / "systemd"
SHIPPED_VENV = "/opt/spoolq"        # where docs/operating.md puts the code; ExecStart runs its bin/spoolq
SYSTEMD = next((p for p in ("/lib/systemd/systemd", "/usr/lib/systemd/systemd") if os.access(p, os.X_OK)), None)

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="systemd is Linux only"),
    pytest.mark.skipif(SYSTEMD is None or shutil.which("systemctl") is None,
                       reason="systemd is not installed (run .ci/install-system-deps)"),
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="the user-manager harness needs root (cgroup placement, /run/systemd/system)"),
]

# Short timings for the harness; each one's production value is in spoolq@.service.
WATCHDOG_SEC = 3        # production 30s: the worker pings every 1.5 s here
TIMEOUT_ABORT_SEC = 2   # production: TimeoutStopSec; how long a watchdog-aborted process may take to die
RESTART_SEC = 0.5       # production 2s


def wait_until(what: str, predicate: Callable[[], object], timeout: float,
               interval: float = 0.1, on_timeout: Callable[[], str] | None = None) -> object:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = on_timeout() if on_timeout else ""
            pytest.fail(f"timed out after {timeout}s waiting for {what}\n{extra}")
        time.sleep(interval)


# --- cgroup confinement --------------------------------------------------------


def _cgroup_dirs(pid: int | str = "self") -> dict[str, tuple[str, str]]:
    """hierarchy id -> (mount point, our path in it) for every mounted hierarchy.

    /proc/<pid>/cgroup says where the process is ("4:memory:/a/b",
    "0::/a" for cgroup2); /proc/self/mountinfo says where each hierarchy is
    mounted (v1 mounts carry their controllers or name= in the super options).
    Hierarchies that are not mounted cannot be touched by systemd either.
    """
    mounts: list[tuple[str, str, set[str]]] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(rfields) < 3 or rfields[0] not in ("cgroup", "cgroup2"):
            continue
        if fields[3] != "/":          # a bind mount of a sub-tree: paths would not match
            continue
        mounts.append((rfields[0], fields[4], set(rfields[2].split(","))))
    out: dict[str, tuple[str, str]] = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        hid, controllers, path = line.split(":", 2)
        for fstype, mountpoint, opts in mounts:
            if controllers == "" and fstype == "cgroup2":
                out[hid] = (mountpoint, path)
                break
            if controllers and fstype == "cgroup" and set(controllers.split(",")) <= opts:
                out[hid] = (mountpoint, path)
                break
    return out


class CgroupJail:
    """A cgroup at one path P in every mounted hierarchy, below our own groups.

    systemd (v1/hybrid) derives its cgroup from the name=systemd hierarchy and
    uses that same path in every controller hierarchy, so P must be the same
    everywhere and must lie below the test's current group in each (else the
    manager would move itself, and what it migrates, somewhere else).
    """

    def __init__(self) -> None:
        self.hierarchies = _cgroup_dirs()
        if not self.hierarchies:
            raise RuntimeError("no cgroup hierarchy is mounted")
        base = max((p for _, p in self.hierarchies.values()), key=len).rstrip("/")
        self.path = f"{base}/spoolq-it-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        for mountpoint, current in self.hierarchies.values():
            if current != "/" and not self.path.startswith(current.rstrip("/") + "/"):
                raise RuntimeError(f"our cgroups differ between hierarchies ({current} vs {base}); "
                                   "cannot give the manager one path everywhere")
        self.dirs = [Path(m + self.path) for m, _ in self.hierarchies.values()]
        # Every directory this creates, parents first, so remove() can undo
        # exactly that (intermediate levels may be new in some hierarchies).
        self.created: list[Path] = []
        try:
            for mountpoint, _ in self.hierarchies.values():
                d = Path(mountpoint)
                for part in self.path.strip("/").split("/"):
                    d = d / part
                    if not d.exists():
                        d.mkdir()
                        self.created.append(d)
                        self._init_cpuset(d)
        except OSError as exc:
            self.remove()
            raise RuntimeError(f"cannot create {self.path}: {exc}") from exc

    @staticmethod
    def _init_cpuset(d: Path) -> None:
        """A new v1 cpuset group has no CPUs or memory nodes: nobody can join
        it until they are copied from the parent."""
        for name in ("cpuset.cpus", "cpuset.mems"):
            f = d / name
            if f.exists() and not f.read_text().strip():
                f.write_text((d.parent / name).read_text())

    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs]

    def pids(self) -> set[int]:
        found: set[int] = set()
        for d in self.dirs:
            for procs in d.rglob("cgroup.procs") if d.exists() else []:
                try:
                    found.update(int(x) for x in procs.read_text().split())
                except OSError:
                    pass
        return found

    def contains(self, pid: int) -> bool:
        where = _cgroup_dirs(pid)
        return all(where[h][1].startswith(self.path) for h in self.hierarchies if h in where)

    def remove(self) -> None:
        """Kill what is left inside (all of it started by this harness), then rmdir."""
        deadline = time.monotonic() + 30
        while (left := self.pids()) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        for d in self.dirs:
            if d.exists():
                for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    try:
                        sub.rmdir()
                    except OSError:
                        pass
        for d in reversed(self.created):
            try:
                d.rmdir()
            except OSError:
                pass


# --- the user manager ------------------------------------------------------------

INACCESSIBLE = Path("/run/systemd/inaccessible")


def ensure_inaccessible_nodes() -> None:
    """/run/systemd/inaccessible/{dir,reg,fifo,sock,chr,blk}, mode 0000, as PID 1
    makes them at boot (systemd's make_inaccessible_nodes()).  A manager running
    as root bind-mounts these over what ProtectHome=yes (InaccessiblePaths=, ...)
    hides; without them such a service fails with 226/NAMESPACE."""
    INACCESSIBLE.mkdir(mode=0o755, parents=True, exist_ok=True)
    nodes = {"dir": None, "reg": None, "fifo": stat.S_IFIFO, "sock": stat.S_IFSOCK,
             "chr": stat.S_IFCHR, "blk": stat.S_IFBLK}
    old = os.umask(0o7777)
    try:
        for name, kind in nodes.items():
            path = INACCESSIBLE / name
            try:
                if name == "dir":
                    path.mkdir(mode=0)
                elif name == "reg":
                    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0))
                else:
                    os.mknod(path, kind | 0, os.makedev(0, 0))
            except FileExistsError:
                pass
            except PermissionError:
                if name not in ("chr", "blk"):     # device nodes may be refused in a container,
                    raise                          # as PID 1 also tolerates
    finally:
        os.umask(old)


class UserManager:
    """A private ``systemd --user`` and a ``systemctl --user`` bound to it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runtime = root / "xdg-runtime"
        self.config = root / "xdg-config"
        self.home = root / "home"
        self.unit_dir = self.config / "systemd" / "user"
        for d in (self.runtime, self.unit_dir, self.home):
            d.mkdir(parents=True, exist_ok=True)
        self.runtime.chmod(0o700)
        self.log = root / "manager.log"
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
            "XDG_RUNTIME_DIR": str(self.runtime),
            "XDG_CONFIG_HOME": str(self.config),
        }
        self.manager_args: list[str] = []   # e.g. ["--log-level=debug"] while debugging
        self.proc: subprocess.Popen[bytes] | None = None
        self.jail: CgroupJail | None = None

    def start(self) -> None:
        pid1_before = Path("/proc/1/cgroup").read_text()
        self.jail = CgroupJail()
        ensure_inaccessible_nodes()
        flag = Path("/run/systemd/system")
        created_flag = False
        if not flag.exists():
            flag.mkdir(parents=True)
            created_flag = True
        try:
            # The shell joins the jail in every hierarchy, then becomes systemd
            # (exec keeps the pid), so the manager never runs outside it.
            # Its log goes to manager.log (console = stderr for a user
            # manager), never to the kernel ring buffer.
            script = ('for f in $SPOOLQ_IT_CGROUP_PROCS; do echo $$ > "$f" || exit 99; done; '
                      'unset SPOOLQ_IT_CGROUP_PROCS; exec "$0" --user "$@"')
            env = {**self.env, "SPOOLQ_IT_CGROUP_PROCS": " ".join(self.jail.procs_files()),
                   "SYSTEMD_LOG_TARGET": "console"}
            with open(self.log, "wb") as log:
                self.proc = subprocess.Popen(
                    ["sh", "-c", script, SYSTEMD, "--log-target=console", *self.manager_args],
                    env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            state = ""
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self.proc.poll() is None:
                state = self.systemctl("is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    break
                time.sleep(0.1)
        finally:
            if created_flag:
                flag.rmdir()
        if self.proc.poll() is not None or state not in ("running", "degraded"):
            raise RuntimeError(f"user manager did not come up (exit {self.proc.poll()}, state {state!r}):\n"
                               + self.log.read_text(errors="replace")[-3000:])
        if Path("/proc/1/cgroup").read_text() != pid1_before:
            raise AssertionError("PID 1 changed cgroup after the user manager started: confinement failed")
        if not self.jail.contains(self.proc.pid):
            raise AssertionError("the user manager is not inside its cgroup jail")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if self.jail is not None:
            self.jail.remove()

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["systemctl", "--user", "--no-pager", *args], env=self.env, text=True,
                              capture_output=True, timeout=60)
        if check and done.returncode != 0:
            raise AssertionError(f"systemctl --user {' '.join(args)} -> exit {done.returncode}\n"
                                 f"{done.stdout}{done.stderr}")
        return done

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def install(self, name: str, text: str) -> None:
        (self.unit_dir / name).write_text(text)


@pytest.fixture(scope="module")
def manager(tmp_path_factory) -> Iterator[UserManager]:
    # The harness root (runtime dir with NOTIFY_SOCKET, spools, logs) must be
    # visible inside the sandbox: not under /tmp or /var/tmp (PrivateTmp=),
    # /home or /root (ProtectHome=), nor /run (the user manager mounts a
    # fresh tmpfs over /run in the service's namespace when /run is not a
    # mount point, as here).  /var/lib is none of those.
    try:
        root = Path(tempfile.mkdtemp(prefix="spoolq-it-", dir="/var/lib"))
    except OSError as exc:
        pytest.skip(f"cannot create the harness directory under /var/lib: {exc}")
    # Two attempts: a concurrent run of this harness may remove
    # /run/systemd/system just before our manager looks for it.
    for attempt in (1, 2):
        m = UserManager(root / f"m{attempt}")
        try:
            m.start()
            break
        except RuntimeError as exc:
            m.stop()
            if attempt == 2:
                shutil.rmtree(root, ignore_errors=True)
                pytest.skip(f"systemd user manager cannot start here: {exc}")
        except BaseException:
            m.stop()
            shutil.rmtree(root, ignore_errors=True)
            raise
    yield m
    m.stop()
    shutil.rmtree(root, ignore_errors=True)


# --- the code, installed as docs/operating.md installs it -----------------------------


@pytest.fixture(scope="module")
def venv() -> Iterator[Path]:
    """A venv like /opt/spoolq (tests/system_python.py). It lives under /opt
    (read-only but visible under ProtectSystem=strict, outside what
    ProtectHome= and PrivateTmp= hide), so the unit needs no sandbox change
    to run it."""
    yield from build_venv()


# --- staging the real units for the user manager ------------------------------------


def _set(text: str, key: str, values: list[str] | None, why: str) -> str:
    """Replace every ``key=`` line of ``text`` by ``values`` (None: drop it).

    The replacement carries a comment that says why, so a staged unit read
    while debugging explains how it differs from the shipped one.
    """
    pattern = re.compile(rf"^{re.escape(key)}=.*\n", re.M)
    lines = "".join(f"{key}={v}\n" for v in values or [])
    note = f"# harness: {key} {'changed' if values else 'removed'}: {why}\n"
    if pattern.search(text):
        first = True

        def repl(m: re.Match[str]) -> str:
            nonlocal first
            out = (note + lines) if first else ""
            first = False
            return out

        return pattern.sub(repl, text)
    if values is None:
        return text
    return text.replace("\n[Install]", f"\n{note}{lines}\n[Install]", 1)


# What the shipped sandbox hides from the service: ProtectHome=yes and
# PrivateTmp=yes (a private, empty /tmp and /var/tmp).  /run is left out: the
# user manager mounts its own over it.
HIDDEN = ("/root/", "/home/", "/run/user/", "/tmp/", "/var/tmp/")


def shipped_exec_start(venv: Path) -> str:
    """The shipped ExecStart= with the venv's directory in place of /opt/spoolq."""
    line = next(line for line in (UNITS / "spoolq@.service").read_text().splitlines()
                if line.startswith("ExecStart="))
    value = line.partition("=")[2]
    assert value.startswith(f"{SHIPPED_VENV}/bin/spoolq "), value
    return str(venv) + value[len(SHIPPED_VENV):]


def stage_user_units(m: UserManager, exec_start: str, *, rw_dir: Path, env_dir: Path,
                     code: list[Path], journal_namespace: str | None = None) -> None:
    """Copy the shipped units into the user manager, adapted as little as possible.

    ``code``: every path the service runs code from (venv, scripts, handler
    directories).  The sandbox is not loosened for them: a path it would hide
    fails the test here, instead of being papered over.

    Every difference from packaging/systemd, and why it cannot be avoided:
    - ExecStart: the test venv (or, for the harness tests, the probe script)
      instead of /opt/spoolq, which the test must not create on a shared host.
    - User=/Group= dropped: a user manager runs services as its own user and
      cannot switch to spoolq (and the host has no spoolq user).
    - EnvironmentFile= of the instance points at the harness's env directory
      instead of /etc/spoolq, which is the host's (the site-wide
      -/etc/default/spoolq is dropped for the same reason).
    - ReadWritePaths=/RequiresMountsFor= name the harness's spool directory,
      as the documented drop-in for "a spool somewhere else" does.
    - WatchdogSec/RestartSec shortened and TimeoutAbortSec added so watchdog
      scenarios take seconds, not minutes; StartLimitBurst raised because the
      scenarios restart on purpose.
    - StandardOutput/StandardError go to a file: this harness has no journald.
    - ExecStopPost= appends "$SERVICE_RESULT $EXIT_CODE $EXIT_STATUS" to
      <rw_dir>/<id>.exits: how each run ended, which `systemctl show` no
      longer knows once a stopped unit has been garbage-collected.
    - [Install] WantedBy=default.target (a user manager has no multi-user.target).
    Everything else -- the whole sandbox (ProtectHome=yes, PrivateTmp=yes
    included), Environment=, Type=notify, NotifyAccess=main, KillMode=mixed,
    Restart=, RestartPreventExitStatus=, TimeoutStopSec=, PartOf=, After= --
    is exercised as shipped.  Handler modules reach the worker the way
    docs/operating.md says: PYTHONPATH in the instance's environment file.
    """
    hidden = [p for p in code if str(p.resolve()).startswith(HIDDEN) or str(p).startswith(HIDDEN)]
    assert not hidden, f"the shipped sandbox hides {hidden} from the service (ProtectHome=/PrivateTmp=)"
    text = (UNITS / "spoolq@.service").read_text()
    text = _set(text, "ExecStart", [exec_start], "the test venv, not /opt/spoolq")
    text = _set(text, "User", None, "a user manager cannot switch users")
    text = _set(text, "Group", None, "a user manager cannot switch groups")
    text = _set(text, "EnvironmentFile", [f"-{env_dir}/%i.env"], "harness env files, not the host's /etc")
    text = _set(text, "ReadWritePaths", [str(rw_dir)], "the harness spools")
    text = _set(text, "RequiresMountsFor", [str(rw_dir)], "the harness spools")
    text = _set(text, "WatchdogSec", [f"{WATCHDOG_SEC}s"], "short, so hangs are caught in seconds")
    text = _set(text, "TimeoutAbortSec", [f"{TIMEOUT_ABORT_SEC}s"],
                "SIGKILL a watchdog-aborted process that does not die (e.g. SIGSTOPped) quickly")
    text = _set(text, "RestartSec", [f"{RESTART_SEC}s"], "quick restarts")
    text = _set(text, "StartLimitBurst", ["50"], "scenarios restart on purpose")
    if journal_namespace is None:
        text = _set(text, "StandardOutput", [f"append:{m.root}/%i.log"], "no journald in this harness")
        text = _set(text, "StandardError", ["inherit"], "same file as stdout")
    else:
        # The journal test: a journald of its own namespace (the host has
        # none), which the unit logs to as it would to the default one.
        text = _set(text, "StandardOutput", ["journal"], "the journal test's journald")
        text = _set(text, "LogNamespace", [journal_namespace], "the journal test's journald namespace")
    text = _set(text, "ExecStopPost",
                [f"/bin/sh -c 'echo \"$SERVICE_RESULT $EXIT_CODE $EXIT_STATUS\" >> {rw_dir}/%i.exits'"],
                "record how each run ended; systemd forgets it once an inactive unit is unloaded")
    text = _set(text, "WantedBy", ["default.target spoolq.target"], "no multi-user.target in a user manager")
    m.install("spoolq@.service", text)
    m.install("spoolq.target", (UNITS / "spoolq.target").read_text().replace(
        "WantedBy=multi-user.target", "WantedBy=default.target"))
    m.install("spoolq.slice", (UNITS / "spoolq.slice").read_text())
    m.systemctl("daemon-reload")


class Instances:
    """Helpers for spoolq@<id> units in one manager."""

    def __init__(self, m: UserManager, env_dir: Path, rw_dir: Path) -> None:
        self.m = m
        self.env_dir = env_dir
        self.rw_dir = rw_dir

    def unit(self, server: str) -> str:
        return f"spoolq@{server}.service"

    def write_env(self, server: str, **env: str) -> None:
        self.env_dir.mkdir(parents=True, exist_ok=True)
        (self.env_dir / f"{server}.env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))

    def exits(self, server: str) -> list[str]:
        """How each run ended, e.g. ["watchdog dumped ABRT", "success exited 0"]."""
        path = self.rw_dir / f"{server}.exits"
        return path.read_text().splitlines() if path.exists() else []

    def log(self, server: str) -> str:
        path = self.m.root / f"{server}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def diagnostics(self, *servers: str) -> str:
        out = []
        for s in servers:
            out.append(self.m.systemctl("status", self.unit(s), check=False).stdout)
            out.append(f"--- {s}.log (tail) ---\n" + self.log(s)[-4000:])
        return "\n".join(out)

    def start(self, *servers: str, enable: bool = False) -> None:
        """`systemctl start` (or `enable --now`) the instances; on failure show why."""
        args = ["enable", "--now"] if enable else ["start"]
        done = self.m.systemctl(*args, *(self.unit(s) for s in servers), check=False)
        if done.returncode != 0:
            pytest.fail(f"systemctl --user {' '.join(args)} failed: {done.stderr}\n{self.diagnostics(*servers)}")

    def state(self, server: str) -> dict[str, str]:
        return self.m.show(self.unit(server), "ActiveState", "SubState", "StatusText", "MainPID",
                           "NRestarts", "Result", "ExecMainStatus", "ExecMainCode")

    def wait_running(self, *servers: str, timeout: float = 60) -> dict[str, dict[str, str]]:
        def check() -> dict[str, dict[str, str]] | None:
            states = {s: self.state(s) for s in servers}
            for s, st in states.items():
                if st["ActiveState"] == "failed":
                    pytest.fail(f"{self.unit(s)} failed:\n{self.diagnostics(s)}")
            ok = all(st["ActiveState"] == "active" and st["SubState"] == "running" for st in states.values())
            return states if ok else None

        return wait_until(f"{servers} active (running)", check, timeout,
                          on_timeout=lambda: self.diagnostics(*servers))  # type: ignore[return-value]

    def wait_inactive(self, server: str, timeout: float = 60) -> dict[str, str]:
        return wait_until(f"{self.unit(server)} inactive",
                          lambda: (st := self.state(server))["ActiveState"] in ("inactive", "failed") and st,
                          timeout, on_timeout=lambda: self.diagnostics(server))  # type: ignore[return-value]

    def stop_all(self, *servers: str) -> None:
        units = [self.unit(s) for s in servers]
        self.m.systemctl("stop", *units, check=False)
        for s in servers:
            self.wait_inactive(s)
        self.m.systemctl("reset-failed", *units, check=False)


# --- harness tests: the shipped unit with a minimal notify worker ------------------------

PROBE = r'''
"""A minimal Type=notify worker built on spoolq.systemd, for the harness tests."""
import json, os, signal, sys, threading, time
from pathlib import Path
from spoolq.systemd import Notifier

server, out = sys.argv[1], Path(sys.argv[2])
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
n = Notifier()
starts = out / f"{server}.starts"
with open(starts, "a") as f:
    f.write(f"{os.getpid()}\n")
status = Path("/proc/self/status").read_text()
sandbox = {k: v.strip() for k, v in (l.split(":", 1) for l in status.splitlines())
           if k in ("NoNewPrivs", "Seccomp", "CapEff")}
(out / f"{server}.sandbox").write_text(json.dumps(sandbox))
n.ready(f"probe {server} ready")
hang_after = float(os.environ.get("PROBE_HANG_AFTER", "inf"))
t0 = time.monotonic()
while not stop.is_set():
    if time.monotonic() - t0 > hang_after:
        print("probe: main loop hangs now", flush=True)
        threading.Event().wait()          # a hung main loop: no more pings
    n.watchdog()
    stop.wait(min(n.next_watchdog_in() or 1.0, 1.0))
n.stopping(f"probe {server} stopping")
(out / f"{server}.stopped").write_text("clean")
sys.exit(0)
'''


@pytest.fixture(scope="module")
def probe(manager: UserManager, venv: Path) -> Iterator[tuple[Instances, Path]]:
    out = manager.root / "probe-out"
    out.mkdir()
    script = manager.root / "probe.py"
    script.write_text(PROBE)
    env_dir = manager.root / "probe-env"
    python = venv / "bin" / "python3"
    stage_user_units(manager, f"{python} {script} %i {out}", rw_dir=out, env_dir=env_dir,
                     code=[python, script])
    yield Instances(manager, env_dir, out), out


def test_probe_instances_become_active_via_ready(probe):
    inst, out = probe
    try:
        inst.start("p1", "p2")
        states = inst.wait_running("p1", "p2")
        assert states["p1"]["StatusText"] == "probe p1 ready"
        assert states["p2"]["StatusText"] == "probe p2 ready"
        # The sandbox is really applied: no new privileges, seccomp filter
        # mode, no effective capabilities even though the manager runs as root.
        sandbox = json.loads((out / "p1.sandbox").read_text())
        assert sandbox == {"NoNewPrivs": "1", "Seccomp": "2", "CapEff": "0000000000000000"}
        # Both stay up across several watchdog periods: the pings arrive.
        first = {s: states[s]["MainPID"] for s in ("p1", "p2")}
        deadline = time.monotonic() + 2 * WATCHDOG_SEC
        while time.monotonic() < deadline:
            now = inst.wait_running("p1", "p2")
            assert {s: now[s]["MainPID"] for s in ("p1", "p2")} == first
            assert all(now[s]["NRestarts"] == "0" for s in ("p1", "p2"))
            time.sleep(0.2)
    finally:
        inst.stop_all("p1", "p2")


def test_probe_stop_is_graceful(probe):
    inst, out = probe
    try:
        inst.start("p3")
        inst.wait_running("p3")
        inst.m.systemctl("stop", "spoolq@p3.service")
        st = inst.wait_inactive("p3")
        assert st["ActiveState"] == "inactive" and st["Result"] == "success", st
        # Exited by itself with status 0 -- systemd would also call death *by*
        # SIGTERM a success, so the exit code is what proves the handler ran.
        wait_until("the stop to be recorded", lambda: inst.exits("p3"), 10)
        assert inst.exits("p3") == ["success exited 0"]
        assert (out / "p3.stopped").read_text() == "clean"
    finally:
        inst.stop_all("p3")


def test_probe_hung_main_loop_is_restarted_by_the_watchdog(probe):
    inst, out = probe
    try:
        inst.write_env("p4", PROBE_HANG_AFTER="1")
        inst.start("p4")
        first = inst.wait_running("p4")["p4"]["MainPID"]

        def restarted() -> dict[str, str] | None:
            st = inst.state("p4")
            # SubState "running" again: the new process has sent READY=1.
            return st if (int(st["NRestarts"]) >= 1 and st["MainPID"] not in ("0", first)
                          and st["SubState"] == "running") else None

        wait_until("a watchdog restart", restarted, 4 * WATCHDOG_SEC + 30,
                   on_timeout=lambda: inst.diagnostics("p4"))
        assert len((out / "p4.starts").read_text().split()) >= 2
        assert inst.exits("p4")[0].startswith("watchdog "), inst.exits("p4")
        # PYTHONFAULTHANDLER=1 from the unit: the SIGABRT of the watchdog
        # dumps the stack of the hung loop, the evidence an operator needs.
        log = inst.log("p4")
        assert "probe: main loop hangs now" in log
        assert "Fatal Python error: Aborted" in log, log[-3000:]
    finally:
        inst.stop_all("p4")


# --- daemon tests ---------------------------------------------------------------------



HANDLERS = '''
"""Task handlers for the systemd integration tests."""
import time


def nap(task_status, input):
    """Sleep input["seconds"], then finish (the daemon marks it FINISHED)."""
    time.sleep(float(input["seconds"]))


def report(task_status, input):
    """The example timer's task: finish when given the timer unit's input."""
    if input != {"report": "daily"}:
        raise ValueError(f"unexpected input {input!r}")
'''

CLIENT = r'''
"""Enqueue tasks and wait for them through the ATP API (one process, not 50)."""
import json, sys, time
from spoolq import tracker

cmd = sys.argv[1]
if cmd == "enqueue":
    ttype, seconds, ids = sys.argv[2], float(sys.argv[3]), sys.argv[4:]
    for i in ids:
        tracker.enqueueTask(ttype, i, {"seconds": seconds})
elif cmd == "wait":
    ttype, timeout, ids = sys.argv[2], float(sys.argv[3]), sys.argv[4:]
    deadline = time.monotonic() + timeout
    while True:
        states = {i: tracker.getTaskStatusByIdentifier(ttype, i)[1] for i in ids}
        if all(s in ("FINISHED", "FAILED") for s in states.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    print(json.dumps(states))
'''


class Spool:
    """One spool root plus the commands the tests run against it."""

    def __init__(self, root: Path, handlers: Path, client: Path) -> None:
        self.root = root
        self.client = client
        self.env = {**os.environ, "SPOOLQ_ROOT": str(root),
                    "PYTHONPATH": os.pathsep.join([str(REPO), str(handlers)])}

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "spoolq", *args], env=self.env, text=True,
                              capture_output=True, timeout=120, check=check)

    def client_run(self, *args: str, timeout: float = 120) -> str:
        return subprocess.run([sys.executable, str(self.client), *args], env=self.env, text=True,
                              capture_output=True, timeout=timeout + 60, check=True).stdout

    def enqueue(self, seconds: float, *ids: str) -> None:
        self.client_run("enqueue", "nap", str(seconds), *ids)

    def wait(self, timeout: float, *ids: str) -> dict[str, str]:
        return json.loads(self.client_run("wait", "nap", str(timeout), *ids, timeout=timeout))

    def status(self, task_id: str) -> dict[str, object]:
        return json.loads(self.cli("status", "nap", task_id, "--json").stdout)


def stage_workers(manager: UserManager, venv: Path, base: Path, root: Path, env_name: str,
                  journal_namespace: str | None = None) -> tuple[Instances, Spool, Path]:
    """The real worker units staged for a fresh spool at *root* (under
    *base*, the units' writable directory), with the test handlers."""
    base.mkdir(exist_ok=True, mode=0o770)
    handlers = manager.root / "handlers"
    handlers.mkdir(exist_ok=True)
    (handlers / "spoolq_it_handlers.py").write_text(HANDLERS)
    client = manager.root / "client.py"
    client.write_text(CLIENT)
    env_dir = manager.root / env_name
    stage_user_units(manager, shipped_exec_start(venv), rw_dir=base, env_dir=env_dir,
                     code=[venv, handlers], journal_namespace=journal_namespace)
    spool = Spool(root, handlers, client)
    spool.cli("init")
    spool.cli("register", "nap", "spoolq_it_handlers.nap", "--timeout", "120")
    return Instances(manager, env_dir, base), spool, handlers


@pytest.fixture
def workers(manager: UserManager, venv: Path) -> Iterator[tuple[Instances, Spool]]:
    """A fresh spool and the real worker units staged for it; stopped afterwards.

    The unit runs the shipped ExecStart from the test venv.  The handler
    module is not installed in the venv: it reaches the worker through
    PYTHONPATH in the instance's environment file, one of the two ways
    docs/operating.md ("Where the handler code comes from") gives.
    """
    base = manager.root / "spools"
    inst, spool, handlers = stage_workers(manager, venv, base, base / uuid.uuid4().hex[:8], "worker-env")
    root = spool.root
    used: list[str] = []

    def write_env(server: str, **extra: str) -> None:
        used.append(server)
        inst.write_env(server, **{"SPOOLQ_ROOT": str(root), "PYTHONPATH": str(handlers),
                                  "SPOOLQ_WORKER_ARGS": "--concurrency 2 --grace 1", **extra})

    inst.prepare = write_env  # type: ignore[attr-defined]
    yield inst, spool
    inst.stop_all(*used)


def test_two_workers_share_a_spool_and_finish_50_tasks(workers):
    inst, spool = workers
    inst.prepare("w1")
    inst.prepare("w2")
    # What an operator runs (issue 4), against the user manager.
    inst.start("w1", "w2", enable=True)
    states = inst.wait_running("w1", "w2")
    assert states["w1"]["StatusText"] and states["w2"]["StatusText"], "no STATUS= from the worker"
    ids = [f"t{i:02d}" for i in range(50)]
    spool.enqueue(0.05, *ids)
    result = spool.wait(120, *ids)
    assert result == {i: "FINISHED" for i in ids}, inst.diagnostics("w1", "w2")
    inst.wait_running("w1", "w2")
    inst.m.systemctl("disable", "spoolq@w1", "spoolq@w2")


def test_stopping_a_worker_hands_its_task_to_the_other(workers):
    inst, spool = workers
    inst.prepare("s1")
    inst.prepare("s2")
    inst.start("s1", "s2")
    inst.wait_running("s1", "s2")
    spool.enqueue(8, "long")

    def running_on() -> str | None:
        doc = spool.status("long")
        return str(doc.get("server")) if doc["state"] == "RUNNING" else None

    holder = wait_until("the long task to run", running_on, 60,
                        on_timeout=lambda: inst.diagnostics("s1", "s2"))
    other = {"s1": "s2", "s2": "s1"}[holder]  # type: ignore[index]
    inst.m.systemctl("stop", f"spoolq@{holder}")
    st = inst.wait_inactive(holder)  # type: ignore[arg-type]
    # SIGTERM -> hand back -> exit 0: a clean stop, not a failure.  systemd
    # also counts death *by* SIGTERM as success, so check that the worker
    # exited by itself with status 0.
    assert st["ActiveState"] == "inactive" and st["Result"] == "success", inst.diagnostics(holder)
    wait_until("the stop to be recorded", lambda: inst.exits(holder), 10)  # type: ignore[arg-type]
    assert inst.exits(holder) == ["success exited 0"], inst.diagnostics(holder)  # type: ignore[arg-type]
    assert spool.wait(90, "long") == {"long": "FINISHED"}, inst.diagnostics("s1", "s2")
    assert spool.status("long").get("server") == other
    inst.wait_running(other)


def test_a_frozen_worker_is_restarted_by_the_watchdog(workers):
    inst, spool = workers
    inst.prepare("f1")
    inst.start("f1")
    first = inst.wait_running("f1")["f1"]["MainPID"]
    # SIGSTOP freezes every thread: no WATCHDOG=1 any more.  systemd sends
    # SIGABRT after WatchdogSec, SIGKILL after TimeoutAbortSec, then restarts.
    inst.m.systemctl("kill", "--kill-who=main", "--signal=SIGSTOP", "spoolq@f1")

    def restarted() -> bool:
        st = inst.state("f1")
        return int(st["NRestarts"]) >= 1 and st["MainPID"] not in ("0", first) \
            and st["SubState"] == "running"

    wait_until("a watchdog restart", restarted, 4 * WATCHDOG_SEC + TIMEOUT_ABORT_SEC + 30,
               on_timeout=lambda: inst.diagnostics("f1"))
    assert inst.exits("f1")[0].startswith("watchdog "), inst.exits("f1")
    # The restarted worker works.
    spool.enqueue(0, "after")
    assert spool.wait(60, "after") == {"after": "FINISHED"}, inst.diagnostics("f1")


# faults.crashpoint("daemon.loop") runs once per main-loop iteration; with
# SPOOLQ_HANG_AT it blocks the main loop there for good (spoolq/faults.py).
HANG_HOOK = "SPOOLQ_HANG_AT"


def test_a_hung_main_loop_is_restarted_by_the_watchdog(workers):
    """The realistic hang: the main loop blocks while the process lives on.

    The process is alive and its handler slots are idle but fine: only a
    watchdog fed from the main loop notices (a ping from a helper thread
    would keep systemd happy and the hang would go unnoticed). The main loop
    blocks at its 5th iteration after start.
    """
    inst, spool = workers
    inst.prepare("h1", **{HANG_HOOK: "daemon.loop@5"})
    inst.start("h1")
    first = inst.wait_running("h1")["h1"]["MainPID"]

    def restarted() -> bool:
        st = inst.state("h1")
        return int(st["NRestarts"]) >= 1 and st["MainPID"] not in ("0", first)

    wait_until("a watchdog restart", restarted, 4 * WATCHDOG_SEC + 30,
               on_timeout=lambda: inst.diagnostics("h1"))
    assert inst.exits("h1")[0].startswith("watchdog "), inst.exits("h1")
    assert "Fatal Python error: Aborted" in inst.log("h1"), inst.log("h1")[-3000:]


def test_a_bad_instance_name_exits_78_and_is_not_restarted(workers):
    """spoolq@-bad and friends: the instance name reaches the worker as the
    server id (the shipped ExecStart ends in "-- %i"), which refuses it with
    78 (EX_CONFIG); RestartPreventExitStatus=78 then leaves the unit failed.

    Before the "--", "-bad" was parsed as an option (usage error, exit 2,
    restarted by Restart=on-failure) and "--help" printed help and exited 0.
    """
    inst, spool = workers
    for server in ("-bad", "--help", "-h", ".hidden"):
        inst.prepare(server)
        done = inst.m.systemctl("start", inst.unit(server), check=False)
        assert done.returncode != 0, f"{server}: start succeeded\n{inst.diagnostics(server)}"
        st = inst.state(server)
        # "failed", not "activating (auto-restart)": no restart is pending.
        assert (st["ActiveState"], st["Result"], st["ExecMainStatus"], st["NRestarts"]) == \
            ("failed", "exit-code", "78", "0"), inst.diagnostics(server)
        wait_until(f"{server}'s exit to be recorded", lambda: inst.exits(server), 10)
        assert inst.exits(server) == ["exit-code exited 78"], inst.diagnostics(server)
        assert f"invalid server id '{server}'" in inst.log(server), inst.diagnostics(server)


@pytest.mark.parametrize("enabled", [True, False], ids=["enabled", "started-alone"])
def test_stopping_the_target_returns_once_its_workers_have_stopped(workers, enabled):
    """`systemctl stop spoolq.target` waits for every worker's hand-back.

    The worker runs a long task and has --grace 3: on SIGTERM it waits 3 s
    for the handler, kills it and hands the task back, so its stop takes
    seconds.  When `systemctl stop spoolq.target` returns, the worker must
    already be inactive (not "deactivating") with its task back in the
    queue -- the instances' After=spoolq.target makes the target's stop job
    wait for theirs.  Both ways an instance belongs to the target: enabled
    (the target wants it) and merely started (only its PartOf= links them).
    """
    inst, spool = workers
    server = "g1" if enabled else "g2"     # <rw_dir>/<server>.exits is per module: one name per case
    inst.prepare(server, SPOOLQ_WORKER_ARGS="--concurrency 1 --grace 3")
    try:
        if enabled:
            inst.m.systemctl("enable", inst.unit(server))
            inst.m.systemctl("start", "spoolq.target")
        else:
            inst.start(server)
        inst.wait_running(server)
        spool.enqueue(120, "slow")

        def running() -> bool:
            doc = spool.status("slow")
            return doc["state"] == "RUNNING" and doc.get("server") == server

        wait_until("the slow task to run", running, 60, on_timeout=lambda: inst.diagnostics(server))
        started = time.monotonic()
        inst.m.systemctl("stop", "spoolq.target")
        took = time.monotonic() - started
        st = inst.state(server)
        target = inst.m.show("spoolq.target", "ActiveState")["ActiveState"]
        print(f"systemctl stop spoolq.target ({'enabled' if enabled else 'started'} instance) "
              f"returned after {took:.2f} s; instance {st['ActiveState']}/{st['SubState']}")
        assert st["ActiveState"] == "inactive", \
            f"`systemctl stop spoolq.target` returned while the worker was {st}\n{inst.diagnostics(server)}"
        assert st["Result"] == "success" and target == "inactive", (st, target)
        assert inst.exits(server) == ["success exited 0"], inst.diagnostics(server)
        assert spool.status("slow")["state"] == "ENQUEUED", "the running task was not handed back"
    finally:
        if enabled:
            inst.m.systemctl("disable", inst.unit(server), check=False)


def test_the_example_timer_enqueues_tasks_that_a_worker_runs(workers, manager: UserManager, venv: Path):
    """packaging/systemd/spoolq-enqueue-example.{timer,service} under the user
    manager, next to a worker: the timer starts the service, the service
    enqueues a task of its own each run, the worker finishes them.  Staged
    as the worker's unit is (venv, no User=, the harness spool and env file),
    plus a schedule of every 2 s instead of daily at 06:00."""
    inst, spool = workers
    spool.cli("register", "Report", "spoolq_it_handlers.report")
    env_file = manager.root / "enqueue-example.env"
    env_file.write_text(f"SPOOLQ_ROOT={spool.root}\n")
    service = (UNITS / "spoolq-enqueue-example.service").read_text()
    assert f"exec {SHIPPED_VENV}/bin/spoolq " in service
    service = service.replace(f"exec {SHIPPED_VENV}/bin/spoolq ", f"exec {venv}/bin/spoolq ")
    service = _set(service, "User", None, "a user manager cannot switch users")
    service = _set(service, "Group", None, "a user manager cannot switch groups")
    service = _set(service, "EnvironmentFile", [str(env_file)], "the harness spool, not the host's /etc")
    service = _set(service, "ReadWritePaths", [str(spool.root.parent)], "the harness spools")
    service = _set(service, "RequiresMountsFor", [str(spool.root.parent)], "the harness spools")
    service = _set(service, "StandardOutput", [f"append:{manager.root}/enqueue-example.log"], "no journald here")
    service = _set(service, "StandardError", ["inherit"], "same file as stdout")
    timer = (UNITS / "spoolq-enqueue-example.timer").read_text()
    timer = _set(timer, "OnCalendar", ["*:*:0/2"], "every 2 s, not daily")
    timer = _set(timer, "AccuracySec", ["100ms"], "on time, so the test takes seconds")
    manager.install("spoolq-enqueue-example.service", service)
    manager.install("spoolq-enqueue-example.timer", timer)
    manager.systemctl("daemon-reload")
    inst.prepare("w1")
    inst.start("w1")
    inst.wait_running("w1")

    def log() -> str:
        path = manager.root / "enqueue-example.log"
        return manager.systemctl("status", "spoolq-enqueue-example.service", check=False).stdout + (
            path.read_text(errors="replace") if path.exists() else "")

    def finished() -> list[dict[str, object]]:
        tasks = json.loads(spool.cli("list", "--type", "Report", "--json").stdout)
        assert all(t["state"] != "FAILED" for t in tasks), tasks
        done = [t for t in tasks if t["state"] == "FINISHED"]
        return done if len(done) >= 3 else []

    manager.systemctl("start", "spoolq-enqueue-example.timer")
    try:
        tasks = wait_until("3 timer-enqueued tasks FINISHED", finished, 60,
                           on_timeout=lambda: log() + inst.diagnostics("w1"))
    finally:
        manager.systemctl("stop", "spoolq-enqueue-example.timer", check=False)
    assert len({t["id"] for t in tasks}) == len(tasks)
    assert all(re.fullmatch(r"daily-\d{8}T\d{6}\.\d{3}Z", str(t["id"])) for t in tasks), tasks
    assert manager.show("spoolq-enqueue-example.service", "Result")["Result"] == "success", log()


# --- the journal (contract §12.4) ------------------------------------------------------

# systemd's own units for a journald namespace (systemd-journald@.service(8)),
# staged in the user manager: the host runs no journald of its own. The
# service drops what a user manager cannot apply (Group=) and the sandbox a
# user manager refuses for it; ExecStart, sockets and Type= are systemd's.
JOURNALD_UNITS = {
    "systemd-journald@.socket": """[Unit]
Description=Journal Socket for Namespace %i

[Socket]
Service=systemd-journald@%i.service
ListenStream=/run/systemd/journal.%i/stdout
ListenDatagram=/run/systemd/journal.%i/socket
ListenDatagram=/run/systemd/journal.%i/dev-log
SocketMode=0666
PassCredentials=yes
PassSecurity=yes
ReceiveBuffer=8M
SendBuffer=8M
""",
    "systemd-journald-varlink@.socket": """[Unit]
Description=Journal Varlink Socket for Namespace %i

[Socket]
Service=systemd-journald@%i.service
ListenStream=/run/systemd/journal.%i/io.systemd.journal
SocketMode=0600
""",
    "systemd-journald@.service": """[Unit]
Description=Journal Service for Namespace %i
Requires=systemd-journald@%i.socket systemd-journald-varlink@%i.socket
After=systemd-journald@%i.socket systemd-journald-varlink@%i.socket

[Service]
ExecStart=/lib/systemd/systemd-journald %i
Sockets=systemd-journald@%i.socket systemd-journald-varlink@%i.socket
Type=notify
LimitNOFILE=524288
""",
}


def test_the_journal_has_each_tasks_lines_by_field(manager: UserManager, venv: Path) -> None:
    """The worker under the shipped unit, logging to a journald: every line
    about a task carries SPOOLQ_TYPE/ID/SERVER/STATE, so journalctl finds one
    task's history by its id (here in the namespace the unit logs to:
    `journalctl --namespace=NS SPOOLQ_ID=...`)."""
    if shutil.which("journalctl") is None or not Path("/lib/systemd/systemd-journald").exists():
        pytest.skip("systemd-journald/journalctl are not installed")
    namespace = f"spoolqit{uuid.uuid4().hex[:8]}"
    for name, text in JOURNALD_UNITS.items():
        manager.install(name, text)
    base = manager.root / "journal-spools"
    inst, spool, handlers = stage_workers(manager, venv, base, base / "spool", "journal-env",
                                          journal_namespace=namespace)
    inst.write_env("j1", SPOOLQ_ROOT=str(spool.root), PYTHONPATH=str(handlers), SPOOLQ_WORKER_ARGS="--concurrency 2")
    journal_dir = Path("/var/log/journal")
    # LogNamespace= bind-mounts the namespace's socket directory over
    # /run/systemd/journal in the service; the mount point is created on
    # the host when missing (this host runs no journald): removed again below.
    mount_point = Path("/run/systemd/journal")
    had_mount_point = mount_point.exists()
    sockets = [f"systemd-journald@{namespace}.socket", f"systemd-journald-varlink@{namespace}.socket"]
    try:
        # A system manager pulls these in for LogNamespace=; a user manager
        # does not: the namespace's journald is started first.
        manager.systemctl("start", *sockets)
        inst.start("j1")
        inst.wait_running("j1")
        spool.enqueue(0, "Task001", "Task002")
        assert spool.wait(60, "Task001", "Task002") == {"Task001": "FINISHED", "Task002": "FINISHED"}

        def entries(*match: str) -> list[dict[str, str]]:
            done = subprocess.run(["journalctl", f"--namespace={namespace}", "-o", "json", "--no-pager", *match],
                                  capture_output=True, text=True, timeout=60)
            return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]

        lines = wait_until("Task001's lines in the journal",
                           lambda: (found := entries("SPOOLQ_ID=Task001")) and
                           any(e.get("SPOOLQ_STATE") == "FINISHED" for e in found) and found,
                           30, on_timeout=lambda: str(entries()[-20:]))
        assert {e["SPOOLQ_ID"] for e in lines} == {"Task001"}
        assert {e["SPOOLQ_TYPE"] for e in lines} == {"nap"} and {e["SPOOLQ_SERVER"] for e in lines} == {"j1"}
        assert [e["SPOOLQ_STATE"] for e in lines] == ["SCHEDULED", "RUNNING", "FINISHED"], lines
        assert all(e["SYSLOG_IDENTIFIER"] == "spoolq" and e["PRIORITY"] == "6" for e in lines)
        assert "finished nap:Task001" in lines[-1]["MESSAGE"]
        # Lines about no task carry no task fields, and are there too.
        ready = entries("SYSLOG_IDENTIFIER=spoolq")
        assert any("server j1 ready" in e["MESSAGE"] and "SPOOLQ_ID" not in e for e in ready)
    finally:
        inst.stop_all("j1")
        manager.systemctl("stop", f"systemd-journald@{namespace}.service", *sockets, check=False)
        for d in journal_dir.glob(f"*.{namespace}"):
            shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(f"/run/systemd/journal.{namespace}", ignore_errors=True)
        if not had_mount_point:
            try:
                mount_point.rmdir()  # only if empty: another run may be using it
            except OSError:
                pass
