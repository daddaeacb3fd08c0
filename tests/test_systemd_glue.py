"""spoolq.systemd against real sockets and real file descriptors.

The notification tests bind an actual AF_UNIX datagram socket (a path in
tmp_path and an abstract-namespace name) and check the exact bytes that
arrive; the journald tests run a child whose stderr is a real file and whose
$JOURNAL_STREAM does or does not name that file.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from spoolq import systemd
from spoolq.systemd import Notifier, notify, setup_logging, under_journald, watchdog_interval

REPO = Path(__file__).resolve().parents[1]


class Receiver:
    """The systemd side of sd_notify: a bound datagram socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def recv(self, timeout: float = 5.0) -> bytes:
        self.sock.settimeout(timeout)
        return self.sock.recv(65536)

    def pending(self) -> list[bytes]:
        """Every datagram already queued, without waiting.

        Sends on a local AF_UNIX datagram socket are queued synchronously, so
        once notify() has returned its datagram is either here or never sent.
        """
        self.sock.setblocking(False)
        out = []
        try:
            while True:
                out.append(self.sock.recv(65536))
        except BlockingIOError:
            return out
        finally:
            self.sock.setblocking(True)


def _bind(tmp_path: Path, kind: str) -> Receiver:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if kind == "path":
        path = tmp_path / "notify.sock"
        sock.bind(str(path))
        return Receiver(sock, str(path))
    name = f"spoolq-test-{os.getpid()}-{uuid.uuid4().hex}"
    sock.bind("\0" + name)
    return Receiver(sock, "@" + name)


@pytest.fixture(params=["path", "abstract"])
def receiver(request, tmp_path, monkeypatch):
    r = _bind(tmp_path, request.param)
    monkeypatch.setenv("NOTIFY_SOCKET", r.env_value)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield r
    r.sock.close()


@pytest.fixture
def quiet_env(monkeypatch):
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def restore_spoolq_logger():
    logger = logging.getLogger("spoolq")
    saved = (list(logger.handlers), logger.level)
    yield logger
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])


# --- notify() --------------------------------------------------------------


def test_notify_sends_lines_as_one_datagram(receiver):
    assert notify("READY=1", "STATUS=ok") is True
    assert receiver.recv() == b"READY=1\nSTATUS=ok"
    assert receiver.pending() == []


def test_notify_encodes_utf8(receiver):
    assert notify("STATUS=draining \u2026") is True
    assert receiver.recv() == "STATUS=draining \u2026".encode()


def test_nothing_sent_when_notify_socket_unset(tmp_path, quiet_env):
    r = _bind(tmp_path, "path")
    try:
        assert notify("READY=1") is False
        n = Notifier()
        assert not n.enabled
        assert n.ready("x") is False
        assert n.status("x") is False
        assert n.stopping("x") is False
        assert n.watchdog() is False
        assert n.next_watchdog_in() is None
        assert r.pending() == []
    finally:
        r.sock.close()


def test_empty_notify_socket_counts_as_unset(monkeypatch, quiet_env):
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert notify("READY=1") is False
    assert not Notifier().enabled


def test_send_failure_is_a_warning_not_an_exception(tmp_path, monkeypatch, quiet_env, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    with caplog.at_level(logging.WARNING, logger="spoolq.systemd"):
        assert notify("READY=1") is False
    assert [r.name for r in caplog.records] == ["spoolq.systemd"]
    assert "nobody-listens.sock" in caplog.records[0].getMessage()


def test_unsupported_address_is_a_warning(monkeypatch, quiet_env, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    with caplog.at_level(logging.WARNING, logger="spoolq.systemd"):
        assert notify("READY=1") is False
    assert any("unsupported" in r.getMessage() for r in caplog.records)


# --- Notifier messages -----------------------------------------------------


def test_ready_status_stopping_extend(receiver):
    n = Notifier()
    assert n.enabled
    assert n.ready("recovered 0 tasks")
    assert receiver.recv() == f"READY=1\nMAINPID={os.getpid()}\nSTATUS=recovered 0 tasks".encode()
    assert n.status("running 2 of 4")
    assert receiver.recv() == b"STATUS=running 2 of 4"
    assert n.stopping("handing back 1 task")
    assert receiver.recv() == b"STOPPING=1\nSTATUS=handing back 1 task"
    assert receiver.pending() == []


def test_status_is_kept_on_one_line(receiver):
    # A newline inside STATUS= would start a new KEY=VALUE line.
    Notifier().status("line one\nREADY=1")
    assert receiver.recv() == b"STATUS=line one READY=1"


# --- watchdog --------------------------------------------------------------


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("200000", None, 0.1),
        ("30000000", "self", 15.0),
        ("200000", "other", None),
        ("0", None, None),
        ("-5", None, None),
        ("banana", None, None),
        ("200000", "banana", None),
    ],
)
def test_watchdog_interval(monkeypatch, quiet_env, usec, pid, expected):
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid == "self":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    elif pid == "other":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    elif pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", pid)
    assert watchdog_interval() == expected


def test_watchdog_pid_of_another_process_sends_nothing(receiver, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    n = Notifier()
    assert n.interval is None
    assert n.watchdog() is False
    assert n.next_watchdog_in() is None
    assert receiver.pending() == []


def test_watchdog_pid_inherited_by_child_is_ignored(receiver):
    # A task subprocess inherits WATCHDOG_PID=<worker pid>: it must not ping.
    env = {**os.environ, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid()),
           "PYTHONPATH": str(REPO)}
    code = "from spoolq.systemd import Notifier; import sys; sys.exit(Notifier().watchdog())"
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode == 0
    assert receiver.pending() == []


def test_watchdog_is_rate_limited(receiver, monkeypatch):
    # 250 ms -> a 0.125 s interval; the steps below are exact binary fractions.
    monkeypatch.setenv("WATCHDOG_USEC", "250000")
    now = [1000.0]
    n = Notifier(clock=lambda: now[0])
    assert n.interval == 0.125
    # Nothing sent yet: the first ping is due immediately.
    assert n.next_watchdog_in() == 0.0
    assert n.watchdog() is True
    assert receiver.recv() == b"WATCHDOG=1"
    assert n.next_watchdog_in() == 0.125
    for _ in range(100):
        assert n.watchdog() is False
    now[0] += 0.0625
    assert n.watchdog() is False
    assert n.next_watchdog_in() == 0.0625
    now[0] += 0.0625
    assert n.next_watchdog_in() == 0.0
    assert n.watchdog() is True
    assert receiver.recv() == b"WATCHDOG=1"
    # Late loop: the next ping is due one interval after the late one.
    now[0] += 1.0
    assert n.watchdog() is True and n.next_watchdog_in() == 0.125
    assert receiver.recv() == b"WATCHDOG=1"
    assert receiver.pending() == []


def test_watchdog_with_the_real_clock(receiver, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    n = Notifier()
    assert n.watchdog() and not n.watchdog()
    assert receiver.recv() == b"WATCHDOG=1"
    deadline = time.monotonic() + 10
    sent = 0
    while not sent and time.monotonic() < deadline:
        sent = n.watchdog()
    assert sent, "second ping never became due"
    assert receiver.recv() == b"WATCHDOG=1"
    assert receiver.pending() == []


def test_watchdog_disabled_without_notify_socket(monkeypatch, quiet_env):
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    n = Notifier()
    assert n.interval is None and n.next_watchdog_in() is None and n.watchdog() is False


# --- reference sender ------------------------------------------------------


@pytest.mark.skipif(shutil.which("systemd-notify") is None, reason="systemd-notify not installed")
def test_bytes_match_systemd_notify(receiver):
    # --no-block: systemd 252's systemd-notify otherwise waits for a barrier
    # reply our fake socket never sends.
    subprocess.run(
        ["systemd-notify", "--no-block", "--ready", "--status=x"],
        check=True, timeout=60, env=os.environ.copy(),
    )
    reference = receiver.recv()
    assert notify("READY=1", "STATUS=x")
    assert receiver.recv() == reference


# --- journald detection and logging ----------------------------------------


def _dev_ino(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def test_under_journald_compares_dev_and_inode(tmp_path, monkeypatch, quiet_env):
    mine, other = tmp_path / "mine", tmp_path / "other"
    mine.touch()
    other.touch()
    with open(mine, "w") as f:
        fd = f.fileno()
        assert not under_journald(fd)
        monkeypatch.setenv("JOURNAL_STREAM", _dev_ino(mine))
        assert under_journald(fd)
        monkeypatch.setenv("JOURNAL_STREAM", _dev_ino(other))
        assert not under_journald(fd)
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert not under_journald(fd)
        monkeypatch.setenv("JOURNAL_STREAM", _dev_ino(mine))
    # A closed descriptor is simply "not journald".
    assert not under_journald(fd)


CHILD = r"""
import logging
from spoolq.systemd import setup_logging
setup_logging(logging.DEBUG)
setup_logging(logging.DEBUG)   # idempotent: still one line per event
log = logging.getLogger("spoolq.child")
log.debug("dbg")
log.info("claimed task t1")
log.warning("slow")
try:
    raise ValueError("boom\nsecond line")
except ValueError:
    log.exception("handler failed")
log.critical("fatal")
"""


def _run_child(tmp_path: Path, journal_stream: str | None) -> list[str]:
    err = tmp_path / "stderr.txt"
    err.touch()
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    env["PYTHONPATH"] = str(REPO)
    env["TZ"] = "EST+5"  # a host off UTC: the plain lines must still say UTC
    if journal_stream == "match":
        env["JOURNAL_STREAM"] = _dev_ino(err)
    elif journal_stream == "other":
        other = tmp_path / "other"
        other.touch()
        env["JOURNAL_STREAM"] = _dev_ino(other)
    with open(err, "w") as f:
        subprocess.run([sys.executable, "-c", CHILD], stderr=f, env=env, check=True, timeout=60)
    return err.read_text().splitlines()


def test_journald_lines_carry_priority_prefixes(tmp_path):
    lines = _run_child(tmp_path, "match")
    assert lines[:3] == ["<7>spoolq.child: dbg", "<6>spoolq.child: claimed task t1",
                         "<4>spoolq.child: slow"]
    assert lines[-1] == "<2>spoolq.child: fatal"
    traceback = lines[3:-1]
    assert traceback[0] == "<3>spoolq.child: handler failed"
    assert "<3>Traceback (most recent call last):" in traceback
    assert traceback[-2:] == ["<3>ValueError: boom", "<3>second line"]
    # Every line, traceback included, is prefixed and has no timestamp.
    assert all(line.startswith("<3>") for line in traceback)
    assert not any(line[3:7].isdigit() for line in lines)


@pytest.mark.parametrize("journal_stream", [None, "other"])
def test_plain_lines_outside_journald(tmp_path, journal_stream):
    lines = _run_child(tmp_path, journal_stream)
    assert not any(line.startswith("<") for line in lines)
    head = [line.split(" ", 1)[1] for line in lines[:3]]
    assert head == ["DEBUG spoolq.child: dbg", "INFO spoolq.child: claimed task t1",
                    "WARNING spoolq.child: slow"]
    # "2026-12-04T23:56:16.068+00:00 INFO ..." -- the time in UTC, with its
    # offset, leads the line (it was the host's local time, with no zone).
    stamp = datetime.fromisoformat(lines[0].split(" ", 1)[0])
    assert stamp.utcoffset() == timedelta(0)
    assert abs((datetime.now(timezone.utc) - stamp).total_seconds()) < 600
    assert "Traceback (most recent call last):" in lines
    assert lines[-1].endswith("CRITICAL spoolq.child: fatal")


def test_setup_logging_is_idempotent(restore_spoolq_logger, quiet_env):
    buf = io.StringIO()
    setup_logging(stream=buf)
    setup_logging(stream=buf)
    logging.getLogger("spoolq.x").info("once")
    logging.getLogger("spoolq.x").debug("filtered at INFO")
    assert buf.getvalue().count("once") == 1
    assert "filtered" not in buf.getvalue()
    # Re-configuring moves output to the new stream instead of adding one.
    buf2 = io.StringIO()
    setup_logging(logging.DEBUG, stream=buf2)
    logging.getLogger("spoolq.x").debug("moved")
    assert "moved" in buf2.getvalue() and "moved" not in buf.getvalue()


def test_setup_logging_in_process_under_journald(restore_spoolq_logger, tmp_path, monkeypatch):
    path = tmp_path / "journal"
    path.touch()
    monkeypatch.setenv("JOURNAL_STREAM", _dev_ino(path))
    with open(path, "w") as f:
        setup_logging(stream=f)
        logging.getLogger("spoolq.x").error("two\nlines")
    assert path.read_text() == "<3>spoolq.x: two\n<3>lines\n"


@pytest.mark.parametrize(
    ("level", "prio"),
    [(logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6),
     (logging.DEBUG, 7), (25, 6), (45, 3), (5, 7)],
)
def test_syslog_priority(level, prio):
    assert systemd.syslog_priority(level) == prio
