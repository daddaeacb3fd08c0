"""systemd glue: sd_notify, the watchdog and journald-friendly logging.

Why this module exists instead of a dependency: the sd_notify protocol is one
``AF_UNIX``/``SOCK_DGRAM`` datagram of ``KEY=VALUE`` lines, and upstream systemd
itself recommends re-implementing it rather than linking libsystemd (it ships a
self-contained Python example).  The PyPI options are either unmaintained
(``sdnotify``, 2017) or C extensions that need libsystemd headers
(``systemd-python``, ``cysystemd``).  So this is stdlib only, like Synapse's and
gunicorn's inline versions.

Everything here is a no-op when the process is not run by systemd: with
``$NOTIFY_SOCKET`` unset nothing is sent and no socket is created, and with
``$JOURNAL_STREAM`` unset (or pointing at another file) logging stays plain.
The protocol: sd_notify(3), sd_watchdog_enabled(3), systemd.exec(5)
($JOURNAL_STREAM); docs/operating.md says how the unit uses each message.
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import socket
import struct
import sys
import time
from datetime import datetime, timezone
from typing import Any, Callable, TextIO

__all__ = [
    "JournalHandler",
    "Notifier",
    "notify",
    "setup_logging",
    "task_fields",
    "under_journald",
    "watchdog_interval",
]

log = logging.getLogger("spoolq.systemd")


def _socket_address(value: str) -> str | None:
    """Translate ``$NOTIFY_SOCKET`` into an address ``socket.connect`` accepts.

    A leading ``@`` means the Linux abstract namespace, which Python spells
    with a leading NUL byte.  Newer systemd versions also hand out ``vsock:``
    addresses (for VMs); spoolq never runs there, so anything that is not a
    path or an abstract name is reported as unsupported rather than guessed at.
    """
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def notify(*lines: str) -> bool:
    """Send one sd_notify datagram made of ``lines`` joined by newlines.

    Returns True when the datagram was handed to the kernel, False when
    ``$NOTIFY_SOCKET`` is unset (nothing is sent: we are not run by systemd)
    or when sending failed.  A failure is logged as a warning and never
    raised: losing a status update must not take the worker down, and systemd
    will notice a genuinely broken notification path by itself (start-up
    timeout, watchdog).

    A fresh socket per call keeps this stateless and fork-safe; the cost
    (a socket()+connect()+send()) is negligible next to one spool operation,
    and callers that ping often go through :class:`Notifier`, which rate-limits.
    """
    value = os.environ.get("NOTIFY_SOCKET")
    if not value:
        return False
    address = _socket_address(value)
    if address is None:
        log.warning("unsupported NOTIFY_SOCKET address %r, not notifying systemd", value)
        return False
    payload = "\n".join(lines).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(payload)
    except OSError as exc:
        log.warning("could not notify systemd via %s: %s", value, exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings systemd expects from *this* process.

    That is half of ``$WATCHDOG_USEC`` (``sd_watchdog_enabled(3)`` recommends
    pinging at half the timeout so one late loop iteration is not fatal).
    None when the watchdog is disabled: the variable is unset, not a positive
    integer, or ``$WATCHDOG_PID`` names another process -- the variables are
    inherited by children, and only the process systemd watches should ping.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        micros = int(usec)
    except ValueError:
        return None
    if micros <= 0:
        return None
    return micros / 2e6


def _one_line(text: str) -> str:
    """Keep a STATUS= value on one line: a newline would start a new key."""
    return " ".join(text.splitlines())


class Notifier:
    """The daemon's handle on systemd: readiness, status, watchdog, stopping.

    The environment is read once, at construction: the worker builds one
    Notifier at start-up, and a process that is not run by systemd (tests,
    a foreground ``spoolq worker`` in a terminal) then pays one attribute
    check per call and nothing else.

    The watchdog is meant to be fed from the worker's main loop, never from a
    helper thread: a thread keeps pinging while the loop is stuck, which
    defeats the point.  Call :meth:`watchdog` on every iteration (it only
    sends when half of ``WatchdogSec=`` has passed) and bound the loop's
    blocking wait by :meth:`next_watchdog_in`.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        # ``clock`` is injectable so the rate limiting can be tested without
        # waiting; it must be monotonic (wall-clock jumps would either flood
        # systemd or starve the watchdog).
        self._clock = clock
        self.enabled: bool = bool(os.environ.get("NOTIFY_SOCKET"))
        self.interval: float | None = watchdog_interval() if self.enabled else None
        # No ping yet: the first watchdog() call sends at once.  systemd arms
        # the watchdog when the main process starts, so however long start-up
        # took, the first iteration of the loop must ping.
        self._last_ping: float | None = None

    def _send(self, *lines: str) -> bool:
        if not self.enabled:
            return False
        return notify(*lines)

    def ready(self, status: str) -> bool:
        """Tell systemd start-up is complete (``Type=notify``).

        Call it only once the spool is opened and this server's orphaned
        claims are recovered: that is what makes ``systemctl start`` wait for
        a worker that can really work, and fail when it cannot.  ``MAINPID=``
        is sent alongside so systemd tracks the right process even if the
        worker was started through a wrapper that forked.
        """
        return self._send("READY=1", f"MAINPID={os.getpid()}", f"STATUS={_one_line(status)}")

    def status(self, text: str) -> bool:
        """Free-form one-line status shown by ``systemctl status``."""
        return self._send(f"STATUS={_one_line(text)}")

    def next_watchdog_in(self) -> float | None:
        """Seconds until the next ping is due (0.0 when due now), None if disabled.

        Use it to bound a ``select()``/``Event.wait()`` timeout so an idle
        worker still wakes up in time to ping.
        """
        if self.interval is None:
            return None
        if self._last_ping is None:
            return 0.0
        return max(0.0, self._last_ping + self.interval - self._clock())

    def watchdog(self) -> bool:
        """Send ``WATCHDOG=1`` if the ping interval has elapsed; True if sent.

        Cheap enough to call on every loop iteration: when the watchdog is
        disabled it is one attribute test, otherwise one clock read.
        """
        if self.interval is None:
            return False
        now = self._clock()
        if self._last_ping is not None and now - self._last_ping < self.interval:
            return False
        # Record the attempt even if the send fails: retrying on every
        # iteration would only repeat the same warning in a tight loop.
        self._last_ping = now
        return self._send("WATCHDOG=1")

    def stopping(self, status: str) -> bool:
        """Announce a graceful shutdown (``STOPPING=1``) with a reason.

        ``systemctl status`` then shows "deactivating" and the status text
        (e.g. how many tasks are being handed back) while the worker drains.
        """
        return self._send("STOPPING=1", f"STATUS={_one_line(status)}")


def under_journald(fd: int = 2) -> bool:
    """True when ``fd`` is connected straight to systemd-journald.

    systemd sets ``$JOURNAL_STREAM`` to ``<st_dev>:<st_ino>`` of the stream it
    gave the service.  Comparing with ``fstat(fd)`` (rather than trusting the
    variable alone) gives the right answer when the variable was inherited
    but the stream was redirected, e.g. ``spoolq worker ... 2>file`` from a
    shell inside a systemd session.
    """
    value = os.environ.get("JOURNAL_STREAM")
    if not value:
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return value == f"{st.st_dev}:{st.st_ino}"


def syslog_priority(levelno: int) -> int:
    """Map a logging level to a syslog priority (``<N>`` prefix journald parses).

    Levels between the standard ones (custom levels) take the priority of the
    standard level just below them, so they are never reported as more severe
    than they are.
    """
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalFormatter(logging.Formatter):
    """Formatter for a stream that journald reads line by line.

    journald stamps each entry itself, so no timestamp; ``SyslogLevelPrefix=``
    (on by default) turns a leading ``<N>`` into the entry's PRIORITY and
    strips it.  Every stdout/stderr line becomes its own journal entry, so
    every line of a multi-line message (a traceback) gets the prefix, or the
    continuation lines would land at the default priority and escape
    ``journalctl -p err``.
    """

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        lines = super().format(record).splitlines() or [""]
        return "\n".join(prefix + line for line in lines)


class PlainFormatter(logging.Formatter):
    """Formatter for a terminal or a file: each line led by its time in UTC
    with its offset (``2026-12-04T23:56:16.068+00:00``), the form of the
    times in a task's log and status, so the daemon's lines and a task's
    records can be put side by side, whatever the host's time zone."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (logging's name)
        return datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")


class _SpoolqHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marker class so :func:`setup_logging` can find and replace its own handler."""


# --------------------------------------------------------------------------- the native journal protocol

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "spoolq"
_F_ADD_SEALS = 1033
_SEALS = 0x0001 | 0x0002 | 0x0004 | 0x0008  # F_SEAL_SEAL | SHRINK | GROW | WRITE


def task_fields(task: Any, state: str | None = None) -> dict[str, Any]:
    """``extra=`` for a log call about one task (a claim, or anything with
    ``type``, ``id`` and perhaps ``server``): under journald the line then
    carries SPOOLQ_TYPE, SPOOLQ_ID, SPOOLQ_SERVER and SPOOLQ_STATE
    (contract §12.4)."""
    return {"spoolq_task": task, "spoolq_state": state}


def journal_fields(record: logging.LogRecord, message: str) -> list[tuple[str, str]]:
    """The journal fields of one log record: MESSAGE (the formatted line,
    traceback included), PRIORITY, SYSLOG_IDENTIFIER, SYSLOG_PID, the
    logger's name and, for a line about a task, its SPOOLQ_* fields."""
    fields = [
        ("MESSAGE", message),
        ("PRIORITY", str(syslog_priority(record.levelno))),
        ("SYSLOG_IDENTIFIER", IDENTIFIER),
        ("SYSLOG_PID", str(os.getpid())),
        ("SPOOLQ_LOGGER", record.name),
        ("CODE_FILE", record.pathname),
        ("CODE_LINE", str(record.lineno)),
        ("CODE_FUNC", record.funcName),
    ]
    task = getattr(record, "spoolq_task", None)
    if task is not None:
        for name, attr in (("SPOOLQ_TYPE", "type"), ("SPOOLQ_ID", "id"), ("SPOOLQ_SERVER", "server")):
            value = getattr(task, attr, None)
            if value is not None:
                fields.append((name, str(value)))
        state = getattr(record, "spoolq_state", None)
        if state:
            fields.append(("SPOOLQ_STATE", str(state)))
    return fields


def encode_fields(fields: list[tuple[str, str]]) -> bytes:
    """One journal entry in the native protocol: ``NAME=value`` lines; a
    value with a newline as NAME, newline, its length (64-bit little
    endian), the value, newline."""
    out = []
    for name, value in fields:
        data = str(value if value is not None else "").encode("utf-8", errors="replace")
        if b"\n" in data:
            out.append(name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            out.append(name.encode() + b"=" + data + b"\n")
    return b"".join(out)


class JournalHandler(logging.Handler):
    """Log records as journal entries, sent to journald's native socket
    (systemd.journal-fields(7), "Native Journal Protocol"): one datagram per
    record, or, when it is too large for a datagram, a sealed memfd passed
    over the socket. When journald does not take it (its socket is gone),
    the record goes to *fallback* (the ``<N>``-prefixed line on stderr)."""

    def __init__(self, fallback: logging.Handler, path: str | None = None) -> None:
        super().__init__()
        self.path = path or JOURNAL_SOCKET
        self.fallback = fallback
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            data = encode_fields(journal_fields(record, message))
            try:
                self.sock.sendto(data, self.path)
            except OSError as exc:
                if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                    raise
                self._send_memfd(data)
        except OSError:
            self.fallback.handle(record)
        except Exception:  # noqa: BLE001 - as logging.Handler does
            self.handleError(record)

    def _send_memfd(self, data: bytes) -> None:
        fd = os.memfd_create("spoolq-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            fcntl.fcntl(fd, _F_ADD_SEALS, _SEALS)
            self.sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.sock.close()
        super().close()


def setup_logging(level: int = logging.INFO, *, stream: TextIO | None = None) -> None:
    """Configure the ``spoolq`` logger: one line per event on ``stream``.

    ``stream`` defaults to ``sys.stderr`` as it is at call time (not at import
    time, so test harnesses that swap stderr are honoured).  Under journald the
    lines carry ``<N>`` priority prefixes and no timestamp; otherwise they read
    ``2024-01-01 12:00:00,000 INFO spoolq.daemon: message``.

    Under journald, when its native socket is there, each record is sent as
    a journal entry with fields (:class:`JournalHandler`; a line about a
    task carries SPOOLQ_TYPE/ID/SERVER/STATE, contract §12.4).

    Idempotent: calling it again replaces the handler it installed before
    instead of adding a second one (which would print every line twice).
    Propagation to the root logger is left alone: the worker configures no
    root handler, and test tools that listen on the root logger keep working.
    """
    if stream is None:
        stream = sys.stderr
    try:
        journal = under_journald(stream.fileno())
    except (AttributeError, OSError, ValueError):
        # io.StringIO and friends have no descriptor: certainly not journald.
        journal = False
    logger = logging.getLogger("spoolq")
    for old in [h for h in logger.handlers if isinstance(h, (_SpoolqHandler, JournalHandler))]:
        logger.removeHandler(old)
    handler: logging.Handler = _SpoolqHandler(stream)
    handler.setFormatter(JournalFormatter() if journal else PlainFormatter())
    if journal and os.path.exists(JOURNAL_SOCKET):
        # Native protocol: the fields of a line about a task go with it;
        # the prefixed line on stderr is the fallback.
        native = JournalHandler(handler)
        native.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        handler = native
    logger.addHandler(handler)
    logger.setLevel(level)
