"""docs/operating.md's install and removal steps, run as written.

The shell blocks under "Installing on a host" and "Removing spoolq from a
host" are taken from the document and run with ``bash -euxo pipefail`` in
``chroot R``, where R is a scratch root that starts like a fresh Debian:

* /etc holds base-passwd's passwd and group (what a new Debian system starts
  from) and the few files that runuser, name resolution, the dynamic loader
  and TLS need (pam.d, security, login.defs, nsswitch.conf, resolv.conf,
  ld.so.*, ssl, alternatives) -- and nothing else: in particular no
  /etc/sysusers.d, which Debian 12 does not ship.
* /usr is the host's, bound read-only: the distribution's programs,
  /usr/bin/python3 among them.  /proc, /dev and a private /tmp are mounted.
* everything happens in a private mount namespace (``unshare --mount``), so
  the host's /etc, /opt and /var are never touched and the mounts vanish
  with the process.

So a step that needs a directory nobody created, runs tmpfiles before the
user exists, or leaves the spoolq user unable to run the code or import the
handler fails here as it would on a new machine.  (An interpreter outside
/usr, such as a pyenv one under /root, does not exist in R at all; the last
test shows, on the host, what the document's check reports for one.)

What differs from a real host, and why:

* SYSTEMD_OFFLINE=1: there is no system manager to talk to (systemd is not
  PID 1 here, and a chroot must not talk to the host's anyway).  systemctl
  then does what it does in a chroot: enable/disable edit the links under
  R/etc/systemd/system; daemon-reload, start, stop and reset-failed print
  "Running in chroot, ignoring command" and succeed.  Only ``enable --now``
  would still try to reach a manager for its start half (systemd 252), so a
  stand-in systemctl drops --now and runs the real one.  Starting and
  stopping the workers is tested in tests/test_systemd_integration.py.
* apt-get is a stand-in that records what it was asked for; the test checks
  that those packages are installed on the host, whose /usr the block runs
  on (.ci/install-system-deps installs them).
* /path/to/spoolq holds a copy of this checkout and /path/to/your-handlers a
  one-module handler package (mypkg.tasks.convert), so that the document's
  placeholders are real paths and pip really installs both, from the
  package index, reached as the host reaches it (resolv.conf, certificates,
  proxy and index variables).
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "operating.md"
INSTALL = "## Installing on a host"
REMOVE = "## Removing spoolq from a host"


# --- reading the document -------------------------------------------------------------


def section(heading: str) -> str:
    text = DOC.read_text()
    start = text.index(heading + "\n")
    following = text.find("\n## ", start + len(heading))
    return text[start: following if following != -1 else len(text)]


def sh_blocks(heading: str) -> list[str]:
    """The ```sh blocks of one section, in order."""
    return re.findall(r"^```sh\n(.*?)^```$", section(heading), re.S | re.M)


def commands(script: str) -> list[list[str]]:
    """Each command of a block as words: comments dropped, continuations joined."""
    out = []
    for line in script.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(words)
    return out


def test_every_install_creates_its_destination_directory():
    """`install` without -D fails when the target directory is missing, as
    /etc/sysusers.d is on a fresh Debian 12.  Checked in every block of the
    document (this runs anywhere; the tests below run the blocks as root)."""
    text = DOC.read_text()
    blocks = re.findall(r"^```sh\n(.*?)^```$", text, re.S | re.M)
    installs = [words for block in blocks for words in commands(block) if words[0] == "install"]
    assert len(installs) >= 5, installs
    for words in installs:
        assert "-D" in words, f"install without -D: {' '.join(words)}"


def test_install_steps_create_the_user_before_tmpfiles_needs_it():
    cmds = [words[0] for words in commands(sh_blocks(INSTALL)[0])]
    assert cmds.index("systemd-sysusers") < cmds.index("systemd-tmpfiles")
    # and the checks run as spoolq only once the user exists
    assert cmds.index("systemd-sysusers") < cmds.index("runuser")


def test_venv_is_made_from_the_distribution_python():
    venvs = [words for words in commands(sh_blocks(INSTALL)[0]) if words[1:3] == ["-m", "venv"]]
    assert venvs == [["/usr/bin/python3", "-m", "venv", "/opt/spoolq"]], venvs


# --- running the blocks in a scratch root -------------------------------------------

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("chroot"),
    reason="running the blocks needs root, unshare and chroot (a private mount namespace)")

# Host files a new Debian system has in /etc too, and the block needs.
ETC_FROM_HOST = ["alternatives", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "nsswitch.conf", "hosts",
                 "host.conf", "resolv.conf", "ssl", "ca-certificates.conf", "pam.d", "security", "login.defs",
                 "environment", "default/useradd"]
# Variables that say how to reach the package index (proxies, certificates,
# pip's index settings), passed into the chroot; nothing else is (host paths
# such as PIP_FIND_LINKS would not exist there).
PASS_ENV = re.compile(r"(?i)^(https?_proxy|no_proxy|all_proxy|ssl_cert_file|ssl_cert_dir|requests_ca_bundle"
                      r"|pip_(index_url|extra_index_url|trusted_host|cert|default_timeout|retries))$")

RUNNER = r'''
set -eu
R=$1; shift
mount --rbind /usr "$R/usr"
mount -o remount,bind,ro "$R/usr"
mount --rbind /dev "$R/dev"
mount -t proc proc "$R/proc"
mount -t tmpfs -o mode=1777 tmpfs "$R/tmp"
exec chroot "$R" /usr/bin/env -i "$@"
'''

APT_GET = '''#!/bin/sh
# stand-in for apt-get: records the request; the test checks the host has the packages
echo "$*" >> /shim/apt-get.log
'''

SYSTEMCTL = '''#!/bin/sh
# stand-in for systemctl: offline, --now has nothing to start; the rest is the real one
for arg; do
  shift
  [ "$arg" = "--now" ] || set -- "$@" "$arg"
done
exec /usr/bin/systemctl "$@"
'''

HANDLERS_PYPROJECT = '''[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "mypkg-handlers"
version = "1.0"

[tool.setuptools]
packages = ["mypkg"]
'''

HANDLERS_TASKS = '''def convert(task_status, input):
    task_status.store_response(str(input).encode(), "text/plain")
'''


def make_root(base: Path) -> Path:
    root = base / "root"
    for d in ("usr", "proc", "dev", "tmp", "etc", "root", "var/tmp", "run", "opt", "shim", "path/to"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "var/tmp").chmod(0o1777)
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = Path("/") / top
        if host.is_symlink():                     # merged /usr: /bin -> usr/bin
            (root / top).symlink_to(os.readlink(host))
        elif host.is_dir():
            pytest.skip(f"/{top} is not merged into /usr on this host")
    shutil.copy(Path("/usr/share/base-passwd/passwd.master"), root / "etc/passwd")
    shutil.copy(Path("/usr/share/base-passwd/group.master"), root / "etc/group")
    for name in ETC_FROM_HOST:
        src = Path("/etc") / name
        dst = root / "etc" / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, dst, symlinks=True)
        elif src.exists() or src.is_symlink():
            shutil.copy2(src, dst, follow_symlinks=False)
    assert not (root / "etc/sysusers.d").exists()
    for name, text in (("apt-get", APT_GET), ("systemctl", SYSTEMCTL)):
        shim = root / "shim" / name
        shim.write_text(text)
        shim.chmod(0o755)

    checkout = root / "path/to/spoolq"
    checkout.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, checkout / name)
    for name in ("spoolq", "packaging"):
        shutil.copytree(REPO / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    handlers = root / "path/to/your-handlers"
    (handlers / "mypkg").mkdir(parents=True)
    (handlers / "pyproject.toml").write_text(HANDLERS_PYPROJECT)
    (handlers / "mypkg" / "__init__.py").write_text("")
    (handlers / "mypkg" / "tasks.py").write_text(HANDLERS_TASKS)
    return root


def in_root(root: Path, script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with bash -euxo pipefail in ``chroot root``, from the checkout."""
    env = [f"{k}={v}" for k, v in os.environ.items() if PASS_ENV.match(k)]
    env += ["PATH=/shim:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root",
            "LANG=C.UTF-8", "SYSTEMD_OFFLINE=1"]
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "bash", "-c", RUNNER, "runner", str(root),
         *env, "/bin/bash", "-euxo", "pipefail", "-c", "cd /path/to/spoolq\n" + script],
        text=True, capture_output=True, timeout=900, stdin=subprocess.DEVNULL)


def passwd_of(root: Path) -> dict[str, list[str]]:
    return {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}


def groups_of(root: Path) -> dict[str, list[str]]:
    return {line.split(":")[0]: line.split(":") for line in (root / "etc/group").read_text().splitlines()}


@dataclass
class Run:
    root: Path
    install: subprocess.CompletedProcess[str] | None = None
    remove: subprocess.CompletedProcess[str] | None = None
    after_install: dict[str, object] = field(default_factory=dict)


def snapshot(root: Path) -> dict[str, object]:
    """What the install left behind, read from the host side."""
    users, groups = passwd_of(root), groups_of(root)
    out: dict[str, object] = {"passwd": users, "group": groups}
    for rel in ("var/spool/spoolq", "var/spool/spoolq/spool.json", "var/spool/spoolq/types/convert.json",
                "etc/spoolq", "etc/spoolq/server1.env", "etc/default/spoolq", "opt/spoolq/bin/spoolq"):
        p = root / rel
        out[rel] = os.stat(p) if p.exists() else None
    out["links"] = sorted(str(p.relative_to(root / "etc/systemd/system"))
                          for p in (root / "etc/systemd/system").rglob("*") if p.is_symlink())
    out["units"] = sorted(p.name for p in (root / "etc/systemd/system").glob("spoolq*") if p.is_file())
    cfg = root / "opt/spoolq/pyvenv.cfg"
    out["pyvenv.cfg"] = cfg.read_text() if cfg.exists() else ""
    apt = root / "shim/apt-get.log"
    out["apt-get"] = apt.read_text().split() if apt.exists() else []
    return out


@pytest.fixture(scope="module")
def doc_run() -> Iterator[Run]:
    """The install block, then a producer joins the spoolq group, then the
    removal blocks: one scratch root, snapshots between the steps."""
    base = Path(tempfile.mkdtemp(prefix="spoolq-doc-", dir="/var/tmp"))
    try:
        root = make_root(base)
        run = Run(root)
        run.install = in_root(root, sh_blocks(INSTALL)[0])
        run.after_install = snapshot(root)
        if run.install.returncode == 0:
            # What an operator does next: a producer joins the spoolq group
            # (`usermod -aG spoolq alice`, as the document says; userdel then
            # leaves the group behind), and drop-ins from `systemctl edit`.
            used = in_root(root, "useradd --system --no-create-home alice\n"
                                 "usermod -aG spoolq alice\n"
                                 "for d in spoolq@.service.d spoolq@server1.service.d spoolq.slice.d; do\n"
                                 "  install -D -m 0644 /dev/null /etc/systemd/system/$d/override.conf\n"
                                 "done\n")
            assert used.returncode == 0, used.stderr
            run.remove = in_root(root, "\n".join(sh_blocks(REMOVE)))
        yield run
    finally:
        root = base / "root"
        # The mounts lived in the runner's namespace only: here these are the
        # empty directories they were made on.  Refuse to delete through a mount.
        mounted = [d for d in ("usr", "proc", "dev", "tmp") if os.path.ismount(root / d)]
        if not mounted:
            shutil.rmtree(base, ignore_errors=True)


@needs_root
def test_install_block_runs_as_written(doc_run: Run):
    done = doc_run.install
    assert done is not None
    assert done.returncode == 0, f"exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr[-6000:]}"
    # Both checks print "ok" (a failing check prints its error, not "ok";
    # `a && echo ok` does not stop the block under set -e, so count them).
    assert done.stdout.split().count("ok") == 2, done.stdout + done.stderr[-4000:]


@needs_root
def test_install_block_leaves_a_working_host(doc_run: Run):
    snap = doc_run.after_install
    assert doc_run.install is not None and doc_run.install.returncode == 0, "install block failed"
    users, groups = snap["passwd"], snap["group"]
    assert "spoolq" in users and "spoolq" in groups          # type: ignore[operator]
    uid, gid = int(users["spoolq"][2]), int(users["spoolq"][3])  # type: ignore[index]
    assert gid == int(groups["spoolq"][2]) and uid < 1000     # type: ignore[index]
    spool = snap["var/spool/spoolq"]
    assert spool is not None and (spool.st_uid, spool.st_gid) == (uid, gid)      # type: ignore[union-attr]
    assert stat.S_IMODE(spool.st_mode) & 0o777 == 0o770       # type: ignore[union-attr]
    # `spoolq init` and `register` ran as spoolq: the spool's files are its own.
    for rel in ("var/spool/spoolq/spool.json", "var/spool/spoolq/types/convert.json"):
        st = snap[rel]
        assert st is not None and st.st_uid == uid, rel          # type: ignore[union-attr]
    for rel in ("etc/spoolq/server1.env", "etc/default/spoolq"):
        assert snap[rel] is not None, rel
    assert snap["units"] == ["spoolq.slice", "spoolq.target", "spoolq@.service"]
    assert snap["links"] == [f"{wants}/spoolq@{s}.service" for wants in ("multi-user.target.wants",
                                                                          "spoolq.target.wants")
                             for s in ("server1", "server2")]
    # "Which Python": the venv points at the distribution's interpreter.
    assert re.search(r"^home = /usr/bin$", str(snap["pyvenv.cfg"]), re.M), snap["pyvenv.cfg"]


@needs_root
def test_packages_the_install_asks_for_are_installed(doc_run: Run):
    asked = doc_run.after_install["apt-get"]
    assert asked[:1] == ["install"] and {"python3", "python3-venv"} <= set(asked), asked  # type: ignore[index]
    for pkg in asked[1:]:                                    # type: ignore[index]
        if pkg.startswith("-"):
            continue
        done = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}", pkg], text=True, capture_output=True)
        assert done.stdout == "installed", f"{pkg} is not installed: run .ci/install-system-deps"


@needs_root
def test_removal_blocks_leave_nothing_behind(doc_run: Run):
    done = doc_run.remove
    assert done is not None, "install block failed"
    assert done.returncode == 0, f"exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr[-6000:]}"
    root = doc_run.root
    for rel in ("var/spool/spoolq", "var/lib/spoolq", "opt/spoolq", "etc/spoolq", "etc/default/spoolq",
                "etc/sysusers.d/spoolq.conf", "etc/tmpfiles.d/spoolq.conf"):
        assert not (root / rel).exists(), f"/{rel} is left"
    left = [str(p.relative_to(root)) for p in (root / "etc/systemd/system").rglob("*spoolq*")]
    assert not left, left
    for name in ("passwd", "group", "shadow", "gshadow"):
        path = root / "etc" / name
        entries = [line for line in path.read_text().splitlines() if line.startswith("spoolq:")] if path.exists() else []
        assert not entries, f"/etc/{name}: {entries}"
    # The producer stays, and in no spoolq group; userdel alone had left the
    # group (it had a member), so the document's groupdel line really ran.
    assert "alice" in passwd_of(root)
    assert "+ groupdel spoolq" in done.stderr, done.stderr[-3000:]


# --- the failure "Which Python" warns about, shown on this host -----------------------


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runuser"), reason="needs root and runuser")
def test_a_venv_from_an_interpreter_under_root_is_unusable_by_another_user(tmp_path: Path):
    """What step 2's check catches: a venv points at the interpreter it was
    made from, and a Python under /root (pyenv, conda) cannot be run by
    another user.  The same check on a venv from /usr/bin/python3 passes."""
    here = Path(sys.executable).resolve()
    home = next((h for h in (Path("/root"), Path("/home")) if h in here.parents), None)
    if home is None or os.stat(home).st_mode & stat.S_IXOTH:
        pytest.skip(f"this interpreter ({here}) is not in a home directory others cannot enter")
    base = Path(tempfile.mkdtemp(prefix="spoolq-venvcheck-", dir="/var/tmp"))
    try:
        base.chmod(0o755)
        nobody = pwd.getpwnam("nobody").pw_name
        results = {}
        for name, python in (("home", sys.executable), ("system", "/usr/bin/python3")):
            venv = base / name
            subprocess.run([python, "-m", "venv", "--without-pip", str(venv)], check=True,
                           env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")})
            results[name] = subprocess.run(["runuser", "-u", nobody, "--", str(venv / "bin" / "python3"), "-c", "0"],
                                           text=True, capture_output=True, cwd="/")
        assert results["home"].returncode != 0 and "Permission denied" in results["home"].stderr, results["home"]
        assert results["system"].returncode == 0, results["system"]
    finally:
        shutil.rmtree(base, ignore_errors=True)
