"""The systemd packaging in packaging/systemd, checked with systemd's own tools.

Offline only (no running systemd needed): `systemd-analyze verify` parses the
units the way the manager would, `systemd-analyze security --offline=yes`
scores the sandbox, `systemctl --root` performs `enable` into a scratch tree,
and `systemd-sysusers`/`systemd-tmpfiles --root` create the user and the spool
in a scratch root.  The shipped ExecStart (/opt/spoolq/bin/spoolq) does not
exist on a test machine, and verify insists that it does, so the tests work on
a staged copy whose ExecStart runs this interpreter instead.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "packaging" / "systemd"
SERVICE = UNITS / "spoolq@.service"
SHIPPED_EXEC = "/opt/spoolq/bin/spoolq"
EXPOSURE_LIMIT = 2.0

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze not installed (run .ci/install-system-deps)")


def run(*cmd: str | Path, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], text=True, capture_output=True, timeout=120, **kw)


def settings(text: str) -> dict[str, list[str]]:
    """``Section.Key`` -> values, in order (systemd keys may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def one(conf: dict[str, list[str]], key: str) -> str:
    values = conf.get(key)
    assert values and len(values) == 1, f"{key}: expected one value, got {values}"
    return values[0]


def seconds(value: str) -> float:
    """systemd time span ("45s", "5min", "1min 30s", "90") in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


@pytest.fixture
def staged(tmp_path: Path) -> Path:
    """The units with ExecStart pointing at this interpreter (`-m spoolq`)."""
    out = tmp_path / "units"
    out.mkdir()
    for name in ("spoolq@.service", "spoolq.target", "spoolq.slice"):
        text = (UNITS / name).read_text()
        if name == "spoolq@.service":
            assert f"ExecStart={SHIPPED_EXEC} " in text
            text = text.replace(f"ExecStart={SHIPPED_EXEC} ", f"ExecStart={sys.executable} -m spoolq ")
        (out / name).write_text(text)
    return out


# --- the unit's contract, read from the file ---------------------------------------


def test_service_settings_required_by_issue_4():
    conf = settings(SERVICE.read_text())
    assert one(conf, "Service.Type") == "notify"
    assert one(conf, "Service.NotifyAccess") == "main"
    assert seconds(one(conf, "Service.WatchdogSec")) > 0
    assert one(conf, "Service.Restart") == "on-failure"
    assert "78" in one(conf, "Service.RestartPreventExitStatus").split()
    assert one(conf, "Service.KillMode") == "mixed"
    assert one(conf, "Service.User") == "spoolq"
    assert one(conf, "Service.SyslogIdentifier") == "spoolq@%i"
    assert one(conf, "Unit.PartOf") == "spoolq.target"
    assert "spoolq.target" in one(conf, "Install.WantedBy").split()
    assert conf["Service.EnvironmentFile"] == ["-/etc/default/spoolq", "-/etc/spoolq/%i.env"]
    exec_start = one(conf, "Service.ExecStart")
    assert exec_start.startswith(f"{SHIPPED_EXEC} worker ")
    # The instance name comes last, after "--": never read as an option.
    assert exec_start.split()[-2:] == ["--", "%i"], exec_start
    # Stop jobs run in reverse start order: instances after the target make
    # the target's stop wait for theirs (tests/test_systemd_integration.py).
    assert "spoolq.target" in " ".join(conf.get("Unit.After", [])).split()
    assert "spoolq.target" not in " ".join(conf.get("Unit.Before", [])).split()
    # %I would unescape "-" to "/" and change server ids like "server-1".
    assert not [k for k, vs in conf.items() for v in vs if "%I" in v]


def test_stop_timeout_covers_the_grace_period():
    conf = settings(SERVICE.read_text())
    grace = re.search(r"--grace[= ](\d+(?:\.\d+)?)", one(conf, "Service.ExecStart"))
    assert grace, "ExecStart must pass --grace so TimeoutStopSec can be matched to it"
    stop = seconds(one(conf, "Service.TimeoutStopSec"))
    # The worker needs its grace period plus time to kill, reap and re-enqueue;
    # a stop timeout far beyond that only delays shutdowns.
    assert float(grace.group(1)) + 5 <= stop <= float(grace.group(1)) + 60


def test_every_setting_has_a_reason():
    """Each setting sits in a paragraph that opens with a comment saying why."""
    undocumented = []
    paragraph_has_comment = False
    for number, line in enumerate(SERVICE.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            paragraph_has_comment = False
        elif stripped.startswith("#"):
            paragraph_has_comment = True
        elif stripped.startswith("["):
            paragraph_has_comment = False
        elif not paragraph_has_comment:
            undocumented.append(f"{number}: {stripped}")
    assert not undocumented, "settings without a comment:\n" + "\n".join(undocumented)


def test_env_example_is_all_comments_or_assignments():
    conf_vars = set()
    for line in (UNITS / "spoolq.env.example").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            uncommented = line.lstrip("#").strip()
            if re.fullmatch(r"[A-Z_]+=.*", uncommented):
                conf_vars.add(uncommented.split("=", 1)[0])
            continue
        assert re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", line), line
    assert {"SPOOLQ_ROOT", "SPOOLQ_WORKER_ARGS"} <= conf_vars
    assert "$SPOOLQ_WORKER_ARGS" in SERVICE.read_text()


# --- the shipped ExecStart, run offline ----------------------------------------------


def exec_argv(exec_start: str, instance: str, env: dict[str, str]) -> list[str]:
    """ExecStart= as systemd turns it into argv, for the forms this unit uses:
    words split like a shell's, %i replaced by the instance name, and an
    unbraced ``$VAR`` word replaced by the variable's value split on
    whitespace (nothing when unset).  Anything else fails, so the emulation
    cannot silently fall behind the unit."""
    argv: list[str] = []
    for word in shlex.split(exec_start):
        if re.fullmatch(r"\$[A-Za-z_][A-Za-z0-9_]*", word):
            argv.extend(env.get(word[1:], "").split())
            continue
        assert "$" not in word and "%" not in word.replace("%i", ""), f"unhandled expansion in {word!r}"
        argv.append(word.replace("%i", instance))
    return argv


# What systemctl would accept as an instance name but the worker must refuse.
BAD_IDS = ["-bad", "--help", "-h", "--drain", "--concurrency", ".hidden", "a" * 65, "a\\x2fb"]
GOOD_IDS = ["server1", "server-1", "a.b_c", "x" * 64]


def test_shipped_exec_start_refuses_every_bad_id_with_78(tmp_path: Path):
    """spoolq@<bad id> must exit 78 (EX_CONFIG, RestartPreventExitStatus=): run
    the shipped ExecStart's argv, with only /opt/spoolq/bin/spoolq swapped
    for this checkout's `python -m spoolq`, against a real spool.

    Before ExecStart put "--" before %i, "-bad" was a usage error (exit 2,
    which Restart=on-failure restarts) and "--help" printed help (exit 0).
    The good ids show the same line starts a worker: with --drain from
    $SPOOLQ_WORKER_ARGS it recovers nothing, holds nothing and exits 0.
    """
    exec_start = one(settings(SERVICE.read_text()), "Service.ExecStart")
    spool = tmp_path / "spool"
    env = {**os.environ, "PYTHONPATH": str(REPO), "SPOOLQ_ROOT": str(spool)}
    assert run(sys.executable, "-m", "spoolq", "init", env=env).returncode == 0

    def worker(instance: str, worker_args: str) -> subprocess.CompletedProcess[str]:
        argv = exec_argv(exec_start, instance, {"SPOOLQ_WORKER_ARGS": worker_args})
        assert argv[0] == SHIPPED_EXEC
        return run(sys.executable, "-m", "spoolq", *argv[1:], env=env)

    for bad in BAD_IDS:
        for worker_args in ("", "--concurrency 2", "--drain"):
            done = worker(bad, worker_args)
            assert done.returncode == 78, f"spoolq@{bad} with {worker_args!r}: exit {done.returncode}\n{done.stderr}"
            assert "server id" in done.stderr, done.stderr
    for good in GOOD_IDS:
        done = worker(good, "--drain")
        assert done.returncode == 0, f"spoolq@{good}: exit {done.returncode}\n{done.stderr}"
        assert f"server {good} stopped" in done.stderr, done.stderr


def test_documented_exec_start_overrides_keep_the_id_last():
    """A drop-in copied from docs/operating.md must not bring the bug back."""
    doc = (REPO / "docs" / "operating.md").read_text()
    overrides = re.findall(r"^\s*ExecStart=(\S.*)$", doc, re.M)
    assert overrides, "docs/operating.md shows no ExecStart= drop-in any more: update this test"
    for line in overrides:
        assert line.startswith(f"{SHIPPED_EXEC} worker ") and line.split()[-2:] == ["--", "%i"], line


# --- systemd's own checks ---------------------------------------------------------


@needs_analyze
def test_units_verify(staged: Path):
    done = run("systemd-analyze", "verify", "--man=no", "spoolq@server1.service", "spoolq.target",
               "spoolq.slice", cwd=staged)
    assert done.returncode == 0, done.stdout + done.stderr
    # verify reports unknown keys and bad values as warnings: there must be none.
    assert "ignoring" not in done.stderr, done.stderr


@needs_analyze
def test_verify_catches_a_broken_unit(staged: Path):
    """The check above is not vacuous: a typo in the unit fails it."""
    unit = staged / "spoolq@.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict"))
    done = run("systemd-analyze", "verify", "--man=no", "spoolq@server1.service", cwd=staged)
    assert done.returncode != 0 or "Unknown key" in done.stderr


@needs_analyze
def test_security_exposure(staged: Path):
    done = run("systemd-analyze", "security", "--offline=yes", "--no-pager",
               f"--threshold={int(EXPOSURE_LIMIT * 10)}", "spoolq@server1.service", cwd=staged)
    match = re.search(r"Overall exposure level for spoolq@server1\.service:\s*(\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    score = float(match.group(1))
    assert score <= EXPOSURE_LIMIT, done.stdout
    # --threshold is on the 0-100 scale; a non-zero exit means it was exceeded.
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("systemctl") is None, reason="systemctl not installed")
def test_enable_wires_instances_to_boot_and_target(tmp_path: Path):
    """`systemctl enable spoolq@server1 spoolq@server2` into a scratch root."""
    unit_dir = tmp_path / "etc" / "systemd" / "system"
    unit_dir.mkdir(parents=True)
    for name in ("spoolq@.service", "spoolq.target", "spoolq.slice"):
        shutil.copy(UNITS / name, unit_dir / name)
    done = run("systemctl", f"--root={tmp_path}", "enable", "spoolq@server1.service",
               "spoolq@server2.service", "spoolq.target")
    assert done.returncode == 0, done.stderr
    for wants in ("multi-user.target.wants", "spoolq.target.wants"):
        for server in ("server1", "server2"):
            link = unit_dir / wants / f"spoolq@{server}.service"
            assert link.is_symlink(), f"{link} missing"
            assert os.readlink(link).endswith("/spoolq@.service")
    assert (unit_dir / "multi-user.target.wants" / "spoolq.target").is_symlink()


# --- sysusers.d and tmpfiles.d on a scratch root ---------------------------------------


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
                    reason="systemd-sysusers/systemd-tmpfiles not installed")
def test_sysusers_and_tmpfiles_create_user_and_spool(tmp_path: Path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    done = run("systemd-sysusers", f"--root={root}", UNITS / "spoolq.sysusers.conf")
    assert done.returncode == 0, done.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (root / "etc/group").read_text().splitlines()}
    assert "spoolq" in passwd and "spoolq" in groups
    _, _, uid, gid, _gecos, home, shell = passwd["spoolq"]
    assert int(uid) < 1000, "a system user"
    assert gid == groups["spoolq"][2]
    assert home == "/var/lib/spoolq" and shell == "/usr/sbin/nologin"

    # tmpfiles resolves the user through the scratch root's /etc/passwd.
    done = run("systemd-tmpfiles", f"--root={root}", "--create", UNITS / "spoolq.tmpfiles.conf")
    assert done.returncode == 0, done.stderr
    spool = os.stat(root / "var/spool/spoolq")
    assert stat.S_ISDIR(spool.st_mode)
    assert stat.S_IMODE(spool.st_mode) == 0o2770  # setgid: spool.json made by a member stays the group's
    assert not spool.st_mode & stat.S_IWOTH
    assert (spool.st_uid, spool.st_gid) == (int(uid), int(gid))
    etc = os.stat(root / "etc/spoolq")
    assert stat.S_IMODE(etc.st_mode) == 0o755 and (etc.st_uid, etc.st_gid) == (0, 0)

    # Idempotent: running both again changes nothing and fails nothing.
    assert run("systemd-sysusers", f"--root={root}", UNITS / "spoolq.sysusers.conf").returncode == 0
    assert run("systemd-tmpfiles", f"--root={root}", "--create", UNITS / "spoolq.tmpfiles.conf").returncode == 0
    assert [line for line in (root / "etc/passwd").read_text().splitlines()
            if line.startswith("spoolq:")] == [":".join(passwd["spoolq"])]


# --- periodic work: the example timer ------------------------------------------------

TIMER = UNITS / "spoolq-enqueue-example.timer"
TIMER_SERVICE = UNITS / "spoolq-enqueue-example.service"


def unit_unescape(value: str) -> str:
    """What systemd hands to the program for a unit-file word without
    specifiers or variables of its own: "%%" is "%", "$$" is "$"."""
    assert not re.search(r"%[^%]|\$[A-Za-z{]", value.replace("%%", "").replace("$$", "")), value
    return value.replace("%%", "%").replace("$$", "$")


@needs_analyze
def test_timer_units_verify_and_the_service_is_sandboxed():
    done = run("systemd-analyze", "verify", "--man=no", TIMER, TIMER_SERVICE)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ignoring" not in done.stderr, done.stderr
    done = run("systemd-analyze", "security", "--offline=yes", "--no-pager", TIMER_SERVICE.name, cwd=UNITS)
    match = re.search(r"Overall exposure level for \S+:\s*(\d+\.\d+)", done.stdout)
    assert match and float(match.group(1)) <= EXPOSURE_LIMIT, done.stdout + done.stderr


@needs_analyze
def test_timer_schedule_parses_and_catches_up_missed_runs():
    conf = settings(TIMER.read_text())
    calendar = one(conf, "Timer.OnCalendar")
    done = run("systemd-analyze", "calendar", calendar)
    assert done.returncode == 0 and "Next elapse:" in done.stdout, done.stdout + done.stderr
    assert one(conf, "Timer.Persistent") == "true"
    # The timer starts the service of its own name (no Unit= to get wrong).
    assert "Timer.Unit" not in conf and TIMER_SERVICE.stem == TIMER.stem


@pytest.mark.skipif(shutil.which("systemctl") is None, reason="systemctl not installed")
def test_enable_wires_the_timer_to_timers_target(tmp_path: Path):
    unit_dir = tmp_path / "etc" / "systemd" / "system"
    unit_dir.mkdir(parents=True)
    for path in (TIMER, TIMER_SERVICE):
        shutil.copy(path, unit_dir / path.name)
    done = run("systemctl", f"--root={tmp_path}", "enable", TIMER.name)
    assert done.returncode == 0, done.stderr
    assert (unit_dir / "timers.target.wants" / TIMER.name).is_symlink()


def test_timer_service_exec_start_enqueues_a_new_task_each_run(tmp_path: Path):
    """The service's ExecStart and StandardInputText, run as systemd runs
    them (unescaped, the input on stdin), with only /opt/spoolq/bin/spoolq
    swapped for this checkout: each run enqueues a task of its own with the
    unit's input; with the type not registered it fails with one line and
    writes nothing."""
    conf = settings(TIMER_SERVICE.read_text())
    argv = shlex.split(unit_unescape(one(conf, "Service.ExecStart")))
    assert argv[:2] == ["/bin/sh", "-c"] and f"exec {SHIPPED_EXEC} " in argv[2], argv
    script = argv[2].replace(f"exec {SHIPPED_EXEC} ", f"exec {shlex.quote(sys.executable)} -m spoolq ")
    stdin = one(conf, "Service.StandardInputText") + "\n"
    spool = tmp_path / "spool"
    env = {**os.environ, "PYTHONPATH": str(REPO), "SPOOLQ_ROOT": str(spool)}
    assert run(sys.executable, "-m", "spoolq", "init", env=env).returncode == 0

    unregistered = run("/bin/sh", "-c", script, input=stdin, env=env)
    assert unregistered.returncode == 1 and unregistered.stderr.count("\n") == 1, unregistered.stderr
    assert "unknown task type 'Report'" in unregistered.stderr
    assert not os.listdir(spool / "enqueued") and not os.listdir(spool / "tmp")

    assert run(sys.executable, "-m", "spoolq", "register", "Report", "reports.daily", env=env).returncode == 0
    for _ in range(3):
        done = run("/bin/sh", "-c", script, input=stdin, env=env)
        assert done.returncode == 0, done.stderr
    tasks = sorted(os.listdir(spool / "enqueued"))
    assert len(tasks) == 3, tasks
    for name in tasks:
        assert re.fullmatch(r"Report:daily-\d{8}T\d{6}\.\d{3}Z", name), name
        task_input = json.loads((spool / "enqueued" / name / "input.json").read_text())
        assert task_input == {"report": "daily"}
