"""The ``spoolq`` command line (docs/contract.md §4), built with typer.

Every command opens the spool named by ``--root`` (or ``SPOOLQ_ROOT``) and
calls one or two methods of :class:`spoolq.Spool` (or of :mod:`spoolq.sweeps`,
:mod:`spoolq.fsck`, :mod:`spoolq.worker`); the logic lives there. This module
parses and prints, and adds the contract of a command line:

* every error is one line on stderr and a non-zero exit, never a traceback
  (:func:`main` turns each :class:`~spoolq.errors.SpoolqError` and
  ``OSError`` into that line, worded by :func:`_error_text`);
* exit codes scripts can rely on: 2 for a usage error, 75 (EX_TEMPFAIL) when
  the queue is full, 78 (EX_CONFIG) when the worker cannot start, and for
  ``wait`` 0 FINISHED, 1 FAILED, 124 timeout, 2 any other error;
* ``--root`` is taken before the command or after it (:func:`_hoist_root`);
* every command that prints something has ``--json`` (contract §12.6).

**Speed** (contract §12.7). Importing typer and building its commands costs
ten times what ``spoolq status`` itself does, so typer is imported only when a
call needs it. The commands are plain functions declared with
:func:`_command`; :func:`build_app` hands them to typer (their annotations,
which name ``typer``, are read only then). :func:`main` runs the plain calls
of the one-task commands (:data:`_QUICK`: ``status``, ``enqueue``, ``log``,
``result``, ``delete``, and ``--version``) by calling the very same functions
itself; every other call (help, completion, an option it does not know, a
malformed call) goes to typer. Tables are plain aligned text, not rich.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

from ._version import __version__
from .errors import (
    InvalidInput, InvalidName, NoSpool, QueueFull, SpoolError, SpoolqError, TypeInUse, UnknownType,
)
from .lifecycle import State
from .names import check_type, task_name
from .producer import check_due
from .queries import TaskInfo, format_log
from .spool import DELETE_WAIT, Spool
from .store import codec
from .store.layout import DEFAULT_ROOT, ROOT_ENV, check_setting, resolve_root
from .store.registry import DEFAULT_MAX_OUTPUT, EXECUTORS, MAX_COUNT, check_output_cap
from .units import parse_duration, parse_size

if TYPE_CHECKING:
    import typer

EX_FAILED = 1
EX_USAGE = 2
EX_WAIT_ERROR = 2
EX_TEMPFAIL = 75
EX_CONFIG = 78
EX_PIPE = 141  # 128 + SIGPIPE: the reader of the output went away
EX_TIMEOUT = 124
EX_INTERRUPTED = 130

ROOT_HELP = "The spool directory (before or after the command). Default: $SPOOLQ_ROOT, else /var/spool/spoolq."


class _Invocation:
    """What the call chose: the spool root and the command, so :func:`main`
    can pick the command's exit code for an error."""

    root: str = DEFAULT_ROOT
    command: str | None = None
    follow: bool = False  # a --follow: its errors exit 2, as wait's do
    # The command made its change (an enqueue, a cancel, a requeue: what a
    # script must not simply retry); an error after it is in the output.
    acted: bool = False


_run = _Invocation()


class UsageError(Exception):
    """A call the options allow one by one but not together (exit 2)."""


# The --state choices: the state names, matched case-insensitively.
StateName = Enum("StateName", {s.name: s.name for s in State}, type=str)  # type: ignore[misc]
# The --executor choices.
ExecutorName = Enum("ExecutorName", {e: e for e in EXECUTORS}, type=str)  # type: ignore[misc]


def _positive(parse: Any, text: str) -> Any:
    """*text* parsed by *parse* (a spoolq.units function); a bad or
    non-positive value is a usage error naming the text."""
    try:
        value = parse(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if value <= 0:
        raise typer.BadParameter(f"{text!r}: the value must be positive")
    return value


def _size_option(text: str) -> int:
    """--memory-max: bytes, or a number with K, M or G (powers of 1024)."""
    return _positive(parse_size, text)


def _duration_option(text: str) -> float:
    """--cpu-time: seconds, or a number with s, m, h or d."""
    return _positive(parse_duration, text)


def _signed_duration(text: str) -> float:
    """--timeout, --retention: a duration where 0 or less has a meaning (none, forever)."""
    try:
        return parse_duration(text, allow_negative=True)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _delay_option(text: str) -> float:
    """--in, and a wait's --timeout: a duration from now, 0 or more (nan or
    a negative value would wait forever or end at once, silently)."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _time_option(text: str) -> float:
    """--at: an ISO 8601 time (without an offset: local time), not in the
    past, nor further ahead than a due time may be (producer.check_due)."""
    from datetime import datetime
    import time

    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not an ISO 8601 time such as 2026-12-24T18:00 or "
                                 "2026-12-24T18:00:00+01:00") from None
    now = time.time()
    if when < now - 1:
        raise typer.BadParameter(f"{text!r} is in the past")
    try:
        return check_due(when, now, repr(text))
    except InvalidInput as exc:
        raise typer.BadParameter(str(exc)) from None

def _spool_setting(key: str) -> Callable[[Optional[int]], Optional[int]]:
    """The check of --max-queue or --max-input-bytes: a value the setting
    *key* does not allow (spoolq.store.layout.check_setting) is a usage error."""

    def check(value: Optional[int]) -> Optional[int]:
        try:
            return None if value is None else check_setting(key, value)
        except SpoolError as exc:
            raise typer.BadParameter(str(exc)) from None

    return check


def _output_cap_option(text: str) -> int:
    """--max-output-bytes: a size (as --memory-max) the output cap allows."""
    value = _size_option(text)
    try:
        check_output_cap(value)
    except SpoolError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


def _lane(text: Optional[str]) -> Optional[list[str]]:
    """--types A,B: the type names, each checked; a bad one is a usage error."""
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise typer.BadParameter("needs at least one type name")
    for name in names:
        try:
            check_type(name)
        except InvalidName as exc:
            raise typer.BadParameter(str(exc)) from None
    return names


def _lane_option(text: Optional[str]) -> Optional[str]:
    _lane(text)  # checked while parsing, so a bad name is a usage error (exit 2), not the worker's 78
    return text

# (function, typer settings) of every command, in the order of `spoolq --help`.
_COMMANDS: list[tuple[Callable[..., Any], dict[str, Any]]] = []


def _command(name: str | None = None, *, examples: list[str]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a command (typer's ``app.command``, applied by :func:`build_app`).
    *examples* are shell lines, shown under "Examples:" in its ``--help``."""

    def declare(func: Callable[..., Any]) -> Callable[..., Any]:
        _COMMANDS.append((func, {"name": name, "epilog": "\n".join(examples)}))
        return func

    return declare


class ReaderGone(Exception):
    """The reader of the output went away (EPIPE), carried out of typer."""


def _use_root(root: str | None, command: str | None) -> None:
    _run.command = command
    try:
        _run.root = resolve_root(root)
    except SpoolError as exc:  # only an empty root: a mistake in the call, not in the spool
        raise UsageError(str(exc)) from None
    # Handlers and child processes using spoolq.tracker find the same spool.
    os.environ[ROOT_ENV] = _run.root


def _spool() -> Spool:
    return Spool(_run.root)


def _table(columns: list[str], rows: list[list[Any]]) -> None:
    """Print aligned columns, one row a line. On a terminal a line too long
    is cut with an ellipsis, as ps(1) does; into a pipe nothing is cut.

    Not rich.table: it renders about 1 ms per row, so `spoolq list` on a
    spool of 3000 tasks took 4-5 s; this takes 5 ms."""
    import shutil

    cells = [columns] + [[codec.one_line(str(v)) for v in row] for row in rows]  # a tab would break the columns
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    limit = shutil.get_terminal_size().columns if sys.stdout.isatty() else 0
    lines = []
    for row in cells:
        line = "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()
        lines.append(line if not limit or len(line) <= limit else line[: limit - 1] + "…")
    print("\n".join(lines))


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=1, sort_keys=True))


def _short_time(iso: str | None) -> str:
    """'2024-05-01T12:00:00.123456+00:00' -> '2024-05-01 12:00:00' (UTC)."""
    return iso[:19].replace("T", " ") if iso else ""


def _seconds(value: float) -> str:
    return "forever" if value <= 0 else f"{value:g}"


def _task_json(info: TaskInfo) -> dict[str, Any]:
    return {"type": info.type, "id": info.id, "state": info.state.name, "path": info.path}


# Parameters several commands share: ``Annotated[…, typer.Argument/Option(…)]``
# types, which build_app() makes once it has imported typer.
JsonFlag: Any = None
TypeArg: Any = None
IdArg: Any = None


# --------------------------------------------------------------------------- spool and types


@_command(examples=["spoolq init", "SPOOLQ_ROOT=/srv/spool spoolq init --max-queue 1000",
                    "spoolq --root /tmp/spool init --no-durable --json"])
def init(
    max_queue: Annotated[
        Optional[int],
        typer.Option(metavar="N", callback=_spool_setting("max_queue"),
                     help="Most ENQUEUED tasks at once; 0: unlimited. Default: keep the stored value (0)."),
    ] = None,
    durable: Annotated[
        Optional[bool],
        typer.Option("--durable/--no-durable",
                     help="fsync every change before it returns. Default: keep the stored value (durable)."),
    ] = None,
    max_input_bytes: Annotated[
        Optional[int],
        typer.Option(metavar="N", callback=_spool_setting("max_input_bytes"),
                     help="Largest task input in bytes. Default: keep the stored value (64 MiB)."),
    ] = None,
    json_out: JsonFlag = False,
) -> None:
    """Create or check the spool; store its settings.

    Prints the spool's path. Idempotent: settings not given keep their stored value. Missing parent
    directories are created, as by mkdir -p, with mode 0755 (never writable
    by others); the spool's own directories get mode 2770.
    """
    spool = Spool.init(_run.root, max_queue=max_queue, durable=durable, max_input_bytes=max_input_bytes)
    if json_out:
        _print_json({"root": spool.root, "max_queue": spool.max_queue, "durable": spool.durable,
                     "max_input_bytes": spool.max_input_bytes})
    else:
        print(spool.root)


@_command(examples=["spoolq register SequenceSum spoolq.demo.sequence_sum",
                    "spoolq register Thumbnail myapp.tasks.thumbnail --timeout 10m --retention 1d --max-restarts 1",
                    "spoolq register Report myapp.tasks.report --retries 3 --retry-backoff 30s --priority 10",
                    "spoolq register Encode myapp.tasks.encode --concurrency 2"])
def register(
    type_name: Annotated[str, typer.Argument(metavar="TYPE", help="Task type name.")],
    handler: Annotated[str, typer.Argument(metavar="HANDLER",
                                           help="Dotted import path of the handler function, e.g. pkg.module.func.")],
    timeout: Annotated[float, typer.Option(
        metavar="DURATION", parser=_signed_duration,
        help="How long a task may be held, counted from its claim, before it is re-enqueued "
             "(FAILED once its restarts are used up): seconds or 30s, 5m, 2h, 1d; 0 or less: no limit.")] = 3600,
    retention: Annotated[float, typer.Option(
        metavar="DURATION", parser=_signed_duration,
        help="How long a FINISHED or FAILED task is kept; 0 or less: forever.")] = -1,
    max_restarts: Annotated[int, typer.Option(
        max=MAX_COUNT, metavar="N",
        help="How often a timed-out or abandoned task goes back to the queue before it FAILS.")] = 2,
    executor: Annotated[
        ExecutorName, typer.Option(case_sensitive=False, help="Where handlers run: fork (the worker's child processes) or dask.")
    ] = ExecutorName.fork,  # type: ignore[attr-defined]
    memory_max: Annotated[
        Optional[int],
        typer.Option(metavar="SIZE", parser=_size_option, help="Address space a handler may add: bytes or 512K, 64M, 2G."),
    ] = None,
    cpu_time: Annotated[
        Optional[float],
        typer.Option(metavar="S", parser=_duration_option, help="CPU time a handler may use: seconds or 30s, 5m, 2h."),
    ] = None,
    nice: Annotated[Optional[int], typer.Option(min=0, max=19, help="Niceness of the handler process, 0-19.")] = None,
    max_open_files: Annotated[Optional[int], typer.Option(min=1, metavar="N", help="Open files a handler process may hold.")] = None,
    retries: Annotated[int, typer.Option(
        min=0, max=MAX_COUNT, metavar="N",
        help="Runs again after a handler failure (raised, set FAILED, died); 0: a failure is final.")] = 0,
    retry_backoff: Annotated[float, typer.Option(
        metavar="DURATION", parser=_duration_option,
        help="Wait before the first retry, doubling each time (jittered into its upper half).")] = 10.0,
    retry_backoff_max: Annotated[float, typer.Option(
        metavar="DURATION", parser=_duration_option, help="The longest wait between retries.")] = 3600.0,
    priority: Annotated[int, typer.Option(
        min=-100, max=100, metavar="P", help="Priority of its tasks (-100 to 100, higher first) unless enqueued with one.")] = 0,
    concurrency: Annotated[int, typer.Option(
        min=0, max=MAX_COUNT, metavar="N",
        help="Most of its tasks RUNNING or PAUSED at once, over every server; 0: no limit.")] = 0,
    max_output_bytes: Annotated[
        int,
        typer.Option(metavar="SIZE", parser=_output_cap_option,
                     help="Output of a handler kept in the task's output file: its start and its latest end, "
                          "e.g. 64K, 1M. Default: 1M."),
    ] = DEFAULT_MAX_OUTPUT,
    json_out: JsonFlag = False,
) -> None:
    """Register or update a task type.

    Which handler runs its tasks, and their limits. A handler is called as handler(task_status, input) in a worker's
    handler process, or on a Dask worker with --executor dask (the worker needs --dask-scheduler). A handler that goes
    over a limit fails, with the limit named in its message. Prints nothing (with --json: the type's settings).
    """
    ttype = _spool().register_type(
        type_name, handler, timeout=timeout, retention=retention, max_restarts=max_restarts,
        executor=executor.value, memory_max=memory_max, cpu_time=cpu_time, nice=nice, max_open_files=max_open_files,
        retries=retries, retry_backoff=retry_backoff, retry_backoff_max=retry_backoff_max, priority=priority,
        concurrency=concurrency, max_output_bytes=max_output_bytes,
    )
    _warn_if_not_importable(handler)
    if json_out:
        _print_json(ttype.to_json())


def _warn_if_not_importable(handler: str) -> None:
    """A warning (the type is registered all the same) when the handler's
    module cannot be found from here: the worker will likely not find it
    either. Found, not imported: importing would run the module's code."""
    import importlib.util

    module = handler.rpartition(".")[0]
    try:
        found = importlib.util.find_spec(module) is not None
        why = "no such module"
    except (ImportError, ValueError) as exc:
        found, why = False, f"{type(exc).__name__}: {exc}"
    if not found:
        print(f"spoolq: warning: handler module {module!r} cannot be imported here ({why}); the worker must be "
              "able to import it: install it in the worker's environment or use worker --pythonpath DIR",
              file=sys.stderr)


@_command(examples=["spoolq unregister Thumbnail", "spoolq unregister Thumbnail --force"])
def unregister(
    type_name: Annotated[str, typer.Argument(metavar="TYPE", help="Registered task type.")],
    force: Annotated[bool, typer.Option("--force", help="Delete the type's tasks too, whatever their state.")] = False,
    json_out: JsonFlag = False,
) -> None:
    """Remove a task type.

    Refused while tasks of the type exist, unless --force, which deletes
    them first. Prints one line per task --force deleted (with --json: an object with
    "type" and "deleted", the ids).
    """
    removed = _spool().unregister_type(type_name, force=force)
    if json_out:
        _print_json({"type": type_name, "deleted": [a.id for a in removed]})
        return
    for action in removed:
        print(f"deleted {action.type}/{action.id}")


@_command("types", examples=["spoolq types", "spoolq types --json"])
def types_(json_out: JsonFlag = False) -> None:
    """List the registered task types.

    One a line: TYPE, HANDLER, TIMEOUT, RETENTION, MAX RESTARTS, RETRIES,
    PRIORITY, CONCURRENCY, HELD. With --json, an array of the type documents
    (as types/TYPE.json holds them: every setting, and "held")."""
    left_out: list[str] = []
    types = _spool().types(left_out=left_out)
    _warn_unreadable(left_out, what="type(s)", why="their file cannot be read")
    if json_out:
        _print_json([t.to_json() for t in types])
        return
    _table(
        ["TYPE", "HANDLER", "TIMEOUT (s)", "RETENTION (s)", "MAX RESTARTS", "RETRIES", "PRIORITY", "CONCURRENCY",
         "HELD"],
        [[t.name, t.handler, _seconds(t.timeout), _seconds(t.retention), t.max_restarts, t.retries, t.priority,
          t.concurrency or "", "held" if t.held else ""] for t in types],
    )


@_command(examples=["spoolq hold Import", "spoolq hold Import --json"])
def hold(type_name: TypeArg, json_out: JsonFlag = False) -> None:
    """Stop every server from claiming tasks of TYPE.

    Enqueues still work and started tasks go on; every worker obeys within a
    second. Undo with `spoolq release TYPE`. Prints nothing (with --json:
    the type's settings)."""
    ttype = _spool().hold(type_name)
    if json_out:
        _print_json(ttype.to_json())


@_command(examples=["spoolq release Import"])
def release(type_name: TypeArg, json_out: JsonFlag = False) -> None:
    """Let servers claim tasks of TYPE again (after `spoolq hold`).

    Prints nothing (with --json: the type's settings)."""
    ttype = _spool().release(type_name)
    if json_out:
        _print_json(ttype.to_json())


# --------------------------------------------------------------------------- one task


@_command(examples=["spoolq enqueue SequenceSum Task001 input.pkl",
                    "spoolq enqueue Report daily-0101 input.pkl --at 2026-01-01T06:00 --priority 10",
                    "spoolq enqueue Thumbnail img7 input.pkl --in 5m",
                    "python -c 'import pickle, sys; sys.stdout.buffer.write(pickle.dumps((1, 2)))' "
                    "| spoolq enqueue SequenceSum Task002 -",
                    "echo '[1, 2, 3]' | spoolq enqueue SequenceSum Task003 - --json"])
def enqueue(
    type_name: TypeArg,
    task_id: IdArg,
    input_path: Annotated[str, typer.Argument(metavar="INPUT", help="File holding the input; - reads stdin.")],
    json_in: Annotated[bool, typer.Option(
        "--json", help="INPUT holds JSON instead of a pickle; print the new task as JSON.")] = False,
    at: Annotated[Optional[float], typer.Option(
        "--at", metavar="TIME", parser=_time_option,
        help="Run it no earlier than TIME: ISO 8601, local time unless it has an offset.")] = None,
    in_: Annotated[Optional[float], typer.Option(
        "--in", metavar="DURATION", parser=_delay_option,
        help="Run it no earlier than DURATION from now: seconds or 30s, 5m, 2h, 1d.")] = None,
    priority: Annotated[Optional[int], typer.Option(
        min=-100, max=100, metavar="P", help="-100 to 100, higher first. Default: the type's priority.")] = None,
) -> None:
    """Enqueue task (TYPE, ID) with its input.

    INPUT holds one pickle (checked, not run) or, with --json, one JSON
    document. The task appears whole or not at all. Prints nothing (with
    --json: "type", "id", "state" and "path" of the new task). Exits 75 when
    the queue is full, so a script can retry later. A task enqueued --at or
    --in waits in enqueued/ (it counts toward the queue limit) and is never
    claimed before its time.
    """
    if at is not None and in_ is not None:
        raise UsageError("give --at or --in, not both")
    task_name(type_name, task_id)  # refuse bad names before reading stdin
    spool = _spool()
    spool.get_type(type_name)  # and an unknown type
    if input_path == "-":
        payload = spool.read_input(sys.stdin.fileno())
    else:
        fd = os.open(input_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            payload = spool.read_input(fd)
        except OSError as exc:  # a directory, say: name it
            raise OSError(exc.errno, exc.strerror, input_path) from None
        finally:
            os.close(fd)
    when = {"priority": priority, "not_before": at, "delay": in_}
    try:
        if json_in:
            info = spool.enqueue_json(type_name, task_id, payload, **when)
            _run.acted = True
            _print_json(_task_json(info))
        else:
            spool.enqueue_pickled(type_name, task_id, payload, **when)
    except InvalidInput as exc:
        if exc.limit is not None:
            raise
        raise InvalidInput(f"{exc}{_other_format_hint(payload, json_in)}") from None


def _other_format_hint(payload: bytes, json_in: bool) -> str:
    """A hint when the input looks like the other format than the one asked for."""
    head = payload.lstrip()[:1]
    if json_in and payload[:1] == b"\x80":  # every pickle of protocol 2 or later starts so
        return " (it looks like a pickle: leave out --json)"
    if not json_in and head and head in b'[{"-0123456789tfn':
        return " (it looks like JSON: add --json)"
    return ""


@_command(examples=["spoolq status SequenceSum Task001",
                    "spoolq status SequenceSum Task001 --json",
                    "spoolq status SequenceSum Task001 --root /srv/spool"])
def status(type_name: TypeArg, task_id: IdArg, json_out: JsonFlag = False) -> None:
    """Print the task's state.

    One of ENQUEUED, SCHEDULED, RUNNING, PAUSED, FINISHED or FAILED. With --json, the whole status document, with "state", "code" and "path" (its directory).
    """
    spool = _spool()
    info = spool.status(type_name, task_id)
    if json_out:
        _print_json(info.as_json())
    else:
        print(info.state.name)


FollowFlag: Any = None
FollowTimeout: Any = None


def _follow_exit(info: TaskInfo | None, timeout: float | None, type_name: str, task_id: str) -> int:
    """The exit status of a follow, as ``wait`` has them."""
    if info is None:
        _fail(f"timed out after {timeout:g} s following {type_name}/{task_id}", EX_TIMEOUT)
    return 0 if info.state == State.FINISHED else EX_FAILED


def _write_text(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _write_bytes(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


@_command("log", examples=["spoolq log SequenceSum Task001", "spoolq log SequenceSum Task001 --json",
                           "spoolq log SequenceSum Task001 --follow"])
def log_(type_name: TypeArg, task_id: IdArg, json_out: JsonFlag = False, follow: FollowFlag = False,
         timeout: FollowTimeout = None) -> int:
    """Print the task's log, oldest first.

    One record a line: UTC time, state, message. With --json, an array of objects with "time", "state" and "message".
    With --follow, keep printing records as they are written (with --json: one object a line) until the task is
    FINISHED (exit 0) or FAILED (exit 1); 124 when --timeout runs out, 2 on any other error.
    """
    _run.follow = follow
    spool = _spool()
    if follow:
        from .follow import follow_log

        info = follow_log(spool.queries, type_name, task_id, _write_text, as_json=json_out, timeout=timeout)
        return _follow_exit(info, timeout, type_name, task_id)
    if timeout is not None:
        raise UsageError("--timeout goes with --follow")
    records = spool.log_records(type_name, task_id)
    if json_out:
        _print_json([{"time": r.time.isoformat(), "state": r.state.name, "message": r.message} for r in records])
        return 0
    for line in format_log(records):
        print(line)
    return 0


@_command(examples=["spoolq output SequenceSum Task001", "spoolq output SequenceSum Task001 --follow",
                    "spoolq output SequenceSum Task001 --json"])
def output(type_name: TypeArg, task_id: IdArg, json_out: JsonFlag = False, follow: FollowFlag = False,
           timeout: FollowTimeout = None) -> int:
    """Print what the task's handler wrote to stdout and stderr.

    Raw bytes, as kept in the task's output file: its start and its latest end, with a marker line between them
    when the output was longer than the type's --max-output-bytes. With --json, an object with "type", "id",
    "state", "bytes" and "output" (text; undecodable bytes escaped). With --follow, keep printing as the handler
    writes until the task is FINISHED (exit 0) or FAILED (exit 1); 124 when --timeout runs out, 2 on any other
    error.
    """
    _run.follow = follow
    spool = _spool()
    if follow:
        if json_out:
            raise UsageError("--json and --follow exclude each other for output: give one")
        from .follow import follow_output

        def new_run() -> None:
            # On stderr: stdout carries the handler's bytes, untouched.
            sys.stdout.flush()
            print(f"spoolq: a new run of {type_name}/{task_id} started; its output follows", file=sys.stderr,
                  flush=True)

        info = follow_output(spool.queries, type_name, task_id, _write_bytes, timeout=timeout, new_run=new_run)
        return _follow_exit(info, timeout, type_name, task_id)
    if timeout is not None:
        raise UsageError("--timeout goes with --follow")
    data = spool.queries.output(type_name, task_id)
    if json_out:
        info = spool.status(type_name, task_id)
        _print_json({"type": type_name, "id": task_id, "state": info.state.name, "bytes": len(data),
                     "output": data.decode("utf-8", errors="backslashreplace")})
        return 0
    _write_bytes(data)
    return 0


@_command(examples=["spoolq result SequenceSum Task001", "spoolq result Thumbnail img7 > img7.png"])
def result(type_name: TypeArg, task_id: IdArg) -> None:
    """Write the task's response to stdout.

    Raw bytes, as the handler stored them. (Its MIME type is "response_mime" in `spoolq status --json`.)
    """
    spool = _spool()
    data, _mime = spool.response(type_name, task_id)
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


@_command(examples=["spoolq delete SequenceSum Task001"])
def delete(type_name: TypeArg, task_id: IdArg) -> None:
    """Remove a task, whatever its state.

    A handler still running it can no longer write to it."""
    spool = _spool()
    if spool.delete(type_name, task_id):
        print(f"spoolq: warning: deleted, but its handler still ran {DELETE_WAIT:g} s later (is its worker "
              "stopped?); the worker stops it when it goes on", file=sys.stderr)


@_command(examples=["spoolq cancel Report daily-0101", "spoolq cancel Encode v7 --reason 'wrong file' --json",
                    "spoolq cancel Encode v8 --no-wait"])
def cancel(
    type_name: TypeArg,
    task_id: IdArg,
    reason: Annotated[Optional[str], typer.Option(metavar="TEXT", help="Why; the task's message says it.")] = None,
    no_wait: Annotated[bool, typer.Option(
        "--no-wait", help="Return once the cancel is recorded; a worker carries it out within seconds.")] = False,
    json_out: JsonFlag = False,
) -> int:
    """Cancel a task that is not FINISHED or FAILED yet.

    A task not started yet ends FAILED at once; a running one's handler is
    stopped (with everything it started) and the task ends FAILED. Its
    message is "cancelled: REASON" and its status has "cancelled": true; its
    directory, log and response stay. Returns once it is FAILED (--no-wait:
    once the request is recorded). Exits 1, changing nothing, for a task
    already FINISHED or FAILED, or one that finishes before the cancel takes
    effect. With --json, the task's status document."""
    spool = _spool()
    info = spool.cancel(type_name, task_id, reason)
    if not no_wait and not info.state.terminal:
        info = spool.wait(type_name, task_id) or info
    _run.acted = True  # (after the wait: an error of the wait's own is not the output's)
    if json_out:
        _print_json(info.as_json())
    else:
        print(info.state.name)
    if info.state.terminal and not info.doc.get("cancelled"):
        _fail(f"task {type_name}/{task_id} ended {info.state.name} before the cancel took effect", EX_FAILED)
    return 0


@_command(examples=["spoolq requeue Report daily-0101", "spoolq requeue Report daily-0101 --in 1h",
                    "spoolq requeue --failed --type Report", "spoolq requeue --failed --json"])
def requeue(
    type_name: Annotated[Optional[str], typer.Argument(metavar="TYPE", help="The task's type.")] = None,
    task_id: Annotated[Optional[str], typer.Argument(metavar="ID", help="The task's id.")] = None,
    failed: Annotated[bool, typer.Option("--failed", help="Every FAILED task (of --type).")] = False,
    only_type: Annotated[Optional[str], typer.Option("--type", metavar="TYPE", help="With --failed: of this type only.")] = None,
    at: Annotated[Optional[float], typer.Option(
        "--at", metavar="TIME", parser=_time_option, help="Due at TIME (ISO 8601).")] = None,
    in_: Annotated[Optional[float], typer.Option(
        "--in", metavar="DURATION", parser=_delay_option, help="Due DURATION from now.")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Send a FAILED task round again.

    Back to ENQUEUED (now, --at or --in) with its retries and restarts reset;
    its log keeps its history plus a "requeued" record; its old response is
    dropped. --failed requeues every FAILED task (of --type) and prints how
    many. Exits 1, changing nothing, for a task that is not FAILED. With
    --json: the task's status document (--failed: {"requeued": N})."""
    spool = _spool()
    if failed:
        if type_name is not None or task_id is not None or at is not None or in_ is not None:
            raise UsageError("--failed takes no TYPE, ID, --at or --in (use --type)")
        count = spool.requeue_failed(only_type)
        _run.acted = True
        if json_out:
            _print_json({"requeued": count})
        else:
            print(count)
        return
    if type_name is None or task_id is None:
        raise UsageError("give TYPE and ID, or --failed")
    if only_type is not None or (at is not None and in_ is not None):
        raise UsageError("--type goes with --failed; give --at or --in, not both")
    info = spool.requeue(type_name, task_id, not_before=at, delay=in_)
    _run.acted = True
    if json_out:
        _print_json(info.as_json())


@_command("enqueue-many", examples=["spoolq enqueue-many Thumbnail tasks.jsonl",
                                    "find /srv/in -name '*.jpg' | jq -Rc '{id: (.|@base32|.[0:100]), input: .}' "
                                    "| spoolq enqueue-many Thumbnail -"])
def enqueue_many(
    type_name: TypeArg,
    input_path: Annotated[str, typer.Argument(metavar="FILE", help="JSON Lines; - reads stdin.")],
    json_out: JsonFlag = False,
) -> int:
    """Enqueue many tasks of TYPE from JSON Lines, with one durable barrier.

    One task a line: {"id": ..., "input": <any JSON>} with optional
    "priority", "at" (ISO 8601) and "in" (seconds, or a duration such as
    "2h"). Every task appears whole or not at all. A bad line, or an id that
    exists or comes twice, is reported ("line N: ..." on stderr) and skipped;
    the others are enqueued. Prints how many were enqueued; exits 0 when all
    were, 1 otherwise. With --json: {"enqueued": N, "errors": [{"line", "id",
    "error"}]}."""
    from .producer import Item

    spool = _spool()
    spool.get_type(type_name)
    # Bytes, each line decoded on its own: a line that is not UTF-8 is that
    # line's error, not silently altered (U+FFFD from a file, a lone
    # surrogate from stdin) into an input nobody sent.
    stream = sys.stdin.buffer if input_path == "-" else open(input_path, "rb")
    errors: list[dict[str, Any]] = []
    items: list[Item] = []
    lines: list[int] = []
    with stream:
        for number, raw in enumerate(stream, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                errors.append({"line": number, "id": None, "error": f"not UTF-8: byte {raw[exc.start]:#04x} at {exc.start}"})
                continue
            try:
                items.append(_batch_item(line))
                lines.append(number)
            except ValueError as exc:
                errors.append({"line": number, "id": _line_id(line), "error": str(exc)})
    results = spool.enqueue_many(type_name, items)
    _run.acted = True
    errors += [{"line": lines[r.index], "id": r.id, "error": str(r.error)} for r in results if r.error is not None]
    errors.sort(key=lambda e: e["line"])
    enqueued = sum(1 for r in results if r.error is None)
    if json_out:
        _print_json({"enqueued": enqueued, "errors": errors})
    else:
        for error in errors:
            print(f"spoolq: line {error['line']}: {error['error']}", file=sys.stderr)
        print(enqueued)
    return 0 if not errors else EX_FAILED


def _line_id(line: str) -> str | None:
    """The id a bad line of `enqueue-many` gives, for its error (None if none)."""
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError):
        return None
    task_id = doc.get("id") if isinstance(doc, dict) else None
    return task_id if isinstance(task_id, str) else None


def _batch_item(line: str) -> Any:
    """One line of `enqueue-many`: an Item; ValueError saying what is wrong."""
    from .producer import Item, check_item_keys

    try:
        doc = codec.loads_json(line)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON: {str(exc)[:200]}") from None
    check_item_keys(doc, ("priority", "at", "in"), "a line")  # InvalidInput, a ValueError
    if not isinstance(doc["id"], str):
        raise ValueError('"id" must be a string')
    at = doc.get("at")
    if at is not None:
        from datetime import datetime

        try:
            at = datetime.fromisoformat(str(at).replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f'"at": {at!r} is not an ISO 8601 time') from None
    delay = doc.get("in")
    if delay is not None:
        delay = parse_duration(delay)
    priority = doc.get("priority")
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
        raise ValueError('"priority" must be a whole number')
    return Item(doc["id"], doc["input"], priority=priority, not_before=at, delay=delay)


@_command("list", examples=["spoolq list", "spoolq list --state failed --type SequenceSum",
                            "spoolq list --state enqueued --json"])
def list_(
    state: Annotated[
        Optional[StateName], typer.Option(case_sensitive=False, metavar="STATE", help="Only tasks in this state.")
    ] = None,
    type_name: Annotated[Optional[str], typer.Option("--type", metavar="TYPE", help="Only tasks of this type.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON array of status documents.")] = False,
) -> None:
    """List tasks, one a line.

    Columns TYPE, ID, STATE, PRIORITY, SERVER, STARTS, UPDATED, MESSAGE (for
    a task waiting for its time: when it is due), PROGRESS (of running tasks:
    done/total and its message), in the order
    of the state directories: waiting, claimed, running, done. With --json,
    an array of the documents `spoolq status --json` prints. A --type that
    is not registered is an error."""
    if type_name is not None:
        check_type(type_name)
    spool = _spool()
    unreadable: list[str] = []
    infos = spool.list_tasks(state=State[state.value] if state else None, type_name=type_name, unreadable=unreadable)
    if type_name is not None and not infos:
        spool.get_type(type_name)  # an unknown type is an error, not an empty list
    _warn_unreadable(unreadable)
    if json_out:
        _print_json([i.as_json() for i in infos])
        return
    _table(
        ["TYPE", "ID", "STATE", "PRIORITY", "SERVER", "STARTS", "UPDATED", "MESSAGE", "PROGRESS"],
        [
            [i.type, i.id, i.state.name, i.doc.get("priority", 0), i.doc.get("server") or "",
             i.doc.get("starts", 0), _short_time(i.doc.get("updated_at")), _list_message(i),
             _progress_text(i.progress) if i.state.started and not i.state.terminal else ""]
            for i in infos
        ],
    )


def _warn_unreadable(paths: list[str], *, what: str = "task(s)", why: str = "their status cannot be read") -> None:
    """One warning line for the tasks (or types) a listing or a count left out."""
    if paths:
        print(f"spoolq: warning: {len(paths)} {what} left out, {why} "
              f"({paths[0]}{', …' if len(paths) > 1 else ''}): 'spoolq fsck' says why", file=sys.stderr)


def _progress_text(progress: dict[str, Any] | None) -> str:
    """'3/10 copying' (done/total and the message), '' without progress."""
    if not progress:
        return ""
    done, total, message = progress.get("done"), progress.get("total"), progress.get("message") or ""
    amount = f"{done:g}" if isinstance(done, (int, float)) else str(done)
    if isinstance(total, (int, float)):
        amount += f"/{total:g}"
    return f"{amount} {message}".strip()


def _list_message(info: TaskInfo) -> str:
    """The MESSAGE column: a waiting task's due time, else its last message."""
    not_before = info.doc.get("not_before")
    if info.state is State.ENQUEUED and not_before:
        return f"due {_short_time(not_before)}" + (f"; {info.doc['message']}" if info.doc.get("message") else "")
    return str(info.doc.get("message", ""))


# --------------------------------------------------------------------------- wait


@_command(examples=["spoolq wait SequenceSum Task001 && spoolq result SequenceSum Task001",
                    "spoolq wait SequenceSum Task001 --timeout 60 --json"])
def wait(
    type_name: TypeArg,
    task_id: IdArg,
    timeout: Annotated[
        Optional[float],
        typer.Option(metavar="SECONDS", parser=_delay_option,
                     help="Give up after this many seconds (exit 124). Default: wait forever."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the final status document.")] = False,
) -> int:
    """Wait until the task is FINISHED or FAILED.

    Prints that state; exits 0 when FINISHED, 1 when FAILED. Woken by file events, not a sleep loop. Exits 124 on timeout and 2 on any
    other error (unknown task, task deleted while waiting, ...). With --json,
    the final status document, as `spoolq status --json` prints it.
    """
    spool = _spool()
    try:
        info = spool.wait(type_name, task_id, timeout)
    except KeyboardInterrupt:
        return EX_INTERRUPTED  # not 1: that means FAILED
    if info is None:
        _fail(f"timed out after {timeout:g} s waiting for {type_name}/{task_id}", EX_TIMEOUT)
    if json_out:
        _print_json(info.as_json())
    else:
        print(info.state.name)
    return 0 if info.state == State.FINISHED else EX_FAILED


# --------------------------------------------------------------------------- worker and maintenance


@_command(examples=["spoolq worker server1", "spoolq worker server1 --concurrency 4",
                    "spoolq worker gpu1 --types Render,Encode", "spoolq worker server1 --pythonpath /srv/myapp",
                    "spoolq worker server1 --drain"])
def worker(
    server: Annotated[str, typer.Argument(metavar="SERVER",
                                          help="Server id: names this worker (systemd unit spoolq@SERVER).")],
    concurrency: Annotated[int, typer.Option(min=1, metavar="N",
                                             help="Handlers run at once, each in a handler process.")] = 1,
    drain: Annotated[bool, typer.Option("--drain",
                                        help="Claim nothing new; finish what this server holds, then exit.")] = False,
    grace: Annotated[float, typer.Option(min=0, metavar="SECONDS",
                                         help="How long SIGTERM waits for running handlers.")] = 30,
    poll: Annotated[bool, typer.Option("--poll",
                                       help="Rescan the queue every second instead of watching file events.")] = False,
    max_tasks_per_child: Annotated[
        int, typer.Option(min=0, metavar="N",
                          help="Tasks a handler process runs before a fresh one replaces it; 0: never replace.")
    ] = 1000,
    dask_scheduler: Annotated[
        Optional[str],
        typer.Option(envvar="SPOOLQ_DASK_SCHEDULER", metavar="ADDR",
                     help="Dask scheduler for types registered with --executor dask, e.g. tcp://host:8786."),
    ] = None,
    dask_concurrency: Annotated[
        int, typer.Option(min=0, metavar="N",
                          help="Most dask runs at once; 0: as many as the Dask cluster has threads.")
    ] = 0,
    pythonpath: Annotated[
        Optional[list[str]],
        typer.Option("--pythonpath", metavar="DIR",
                     help="A directory to import handler modules from, ahead of the rest (repeatable).")
    ] = None,
    types: Annotated[Optional[str], typer.Option(
        "--types", metavar="A,B", callback=_lane_option,
        help="Claim tasks of these types only (a lane); recovery and sweeps cover all.")] = None,
    allow_root: Annotated[bool, typer.Option(
        "--allow-root",
        help="Run handlers as root although others can write the spool (they could then run code as root).")] = False,
) -> int:
    """Run the worker daemon for SERVER.

    In the foreground: this is what systemd runs. Claims waiting tasks and runs their handlers; on SIGTERM it stops
    claiming, hands back what it did not start and exits 0. Exits 78 when it
    cannot start (bad server id, missing or unsafe spool, server already running).
    --drain while SERVER already runs asks that process to drain, and waits for it.
    """
    from .worker import run_worker  # a SpoolqError from here on is a configuration error: exit 78

    return run_worker(
        _run.root, server, concurrency=concurrency, drain=drain, grace=grace, poll=poll,
        max_tasks_per_child=max_tasks_per_child, dask_scheduler=dask_scheduler or None,
        dask_concurrency=dask_concurrency, pythonpath=pythonpath,
        types=_lane(types), allow_root=allow_root,
    )


@_command(examples=["spoolq sweep", "spoolq sweep --json"])
def sweep(json_out: JsonFlag = False) -> None:
    """Run one maintenance pass.

    Re-enqueues (or fails) zombie and timed-out tasks, removes finished tasks
    past their retention, clears stale staging leftovers. Says what it did, one line per action (ACTION TYPE/ID: REASON). With
    --json, an object with "actions" (each "action", "type", "id", "reason")
    and "removed" (leftovers removed from tmp/). Workers do this periodically too.
    """
    from .sweeps import sweep as sweep_once

    actions, removed = sweep_once(_spool())
    if json_out:
        _print_json({"actions": [{"action": str(a.action), "type": a.type, "id": a.id, "reason": a.reason}
                                 for a in actions], "removed": removed})
        return
    for a in actions:
        print(f"{a.action} {a.type}/{a.id}: {a.reason}")
    if removed:
        print(f"removed {removed} leftover(s) from tmp/")
    if not actions and not removed:
        print("nothing to do")


@_command(examples=["spoolq fsck", "spoolq fsck --repair", "spoolq fsck --json"])
def fsck(
    repair: Annotated[
        bool,
        typer.Option("--repair", help="Quarantine what cannot be trusted, re-enqueue orphans of dead servers, "
                     "complete interrupted moves. Never deletes task data."),
    ] = False,
    json_out: JsonFlag = False,
) -> int:
    """Check the spool's consistency.

    Like Postfix's postsuper -s. One line per problem (KIND: PATH: MESSAGE [-> ACTION]), then a summary.
    Exits 0 when the spool is consistent (after --repair), 1 when problems
    were found (or remain after --repair: permissions are only reported).
    With --json, an object with "root", "repair", "ok", "findings" and
    "remaining" (each "kind", "path", "message", "action") and "counts".
    """
    from . import fsck as checker

    if not json_out:
        return checker.run_fsck(_run.root, repair)
    spool, found = checker.open_spool(_run.root, repair=repair)
    if spool is None:  # the spool cannot be opened: its layout is what is wrong
        findings = remaining = found
        tasks = quarantined = 0
    else:
        report = checker.check(spool, repair=repair, found=found)
        findings, remaining = report.findings, report.remaining
        tasks, quarantined = report.tasks, report.quarantined

    def doc(f: Any) -> dict[str, Any]:
        return {"kind": f.kind, "path": f.path, "message": f.message, "action": f.action}

    repaired = sum(1 for f in findings if f.action is not None)
    _print_json({
        "root": _run.root, "repair": repair, "ok": not remaining,
        "findings": [doc(f) for f in findings], "remaining": [doc(f) for f in remaining],
        "counts": {"tasks": tasks, "problems": len(findings), "repaired": repaired,
                   "remaining": len(remaining), "quarantined": quarantined},
    })
    return 0 if not remaining else EX_FAILED


def _prometheus(spool: Spool) -> str:
    """The node_exporter textfile format (write it to a *.prom file), made
    by prometheus_client (imported here only: it costs tens of ms, which a
    scrape can afford and a quick command could not). The gauges come from
    the census; the counters and histograms that outlive daemons and
    retirement from ``metrics/`` (contract §12.5), summed over servers,
    read first: a task counted as ended is in done/ when the census walks
    it (read the other way round, a busy worker's ends made the counter of
    FINISHED tasks pass the FINISHED tasks there are)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    from .store.metrics import load_all

    counters, unreadable = load_all(spool.layout)
    for name in unreadable:
        print(f"spoolq: metrics/{name} cannot be read; left out of the sums ('spoolq fsck' reports it)",
              file=sys.stderr)
    census = spool.census()
    _warn_unreadable(census.unreadable)
    types = sorted({*census.types, *counters.types()})

    class Collector:
        def collect(self) -> Any:
            tasks = GaugeMetricFamily("spoolq_tasks", "Tasks in the spool, by state and type.", labels=["state", "type"])
            for type_name, row in census.types.items():
                for state, n in row.items():
                    tasks.add_metric([state.lower(), type_name], n)
            yield tasks
            yield GaugeMetricFamily("spoolq_oldest_waiting_seconds",
                                    "How long the ENQUEUED task waiting longest has been due: from its enqueue, or from the "
                                    "due time of one enqueued to run later (0 when none is due).",
                                    value=round(census.oldest_waiting_seconds or 0, 3))
            gauge = GaugeMetricFamily("spoolq_task_restarts", "Restarts charged to the tasks now running or done, "
                                      "by type.", labels=["type"])
            for type_name, n in census.restarts.items():
                gauge.add_metric([type_name], n)
            yield gauge
            completed = CounterMetricFamily("spoolq_tasks_completed", "Tasks that ended FINISHED or FAILED, by type "
                                            "and state (kept across daemon restarts and retirement).",
                                            labels=["type", "state"])
            restarts = CounterMetricFamily("spoolq_task_restarts", "Restarts spent, by type, counted when their "
                                           "task ends.", labels=["type"])
            retries = CounterMetricFamily("spoolq_task_retries", "Retries spent, by type, counted when their task "
                                          "ends.", labels=["type"])
            for type_name in types:
                row = counters.completed.get(type_name, {})
                for state in ("FINISHED", "FAILED"):  # the label in lower case, as spoolq_tasks has it
                    completed.add_metric([type_name, state.lower()], row.get(state, 0))
                restarts.add_metric([type_name], counters.restarts.get(type_name, 0))
                retries.add_metric([type_name], counters.retries.get(type_name, 0))
            yield from (completed, retries, restarts)
            for name, help_text, table in (
                ("spoolq_task_run_seconds", "Time from a task's start to its end, by type.", counters.run_seconds),
                ("spoolq_task_wait_seconds", "Time from a task's due time (its enqueue unless delayed) to its start, "
                 "by type.", counters.wait_seconds),
            ):
                family = HistogramMetricFamily(name, help_text, labels=["type"])
                for type_name, hist in sorted(table.items()):
                    family.add_metric([type_name], hist.cumulative(), sum_value=hist.sum)
                yield family

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    return text if text.endswith("\n") else text + "\n"


@_command(examples=["spoolq stats", "spoolq stats --json",
                    "spoolq stats --prometheus > /var/lib/node_exporter/textfile/spoolq.prom"])
def stats(
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
    prometheus: Annotated[bool, typer.Option("--prometheus", help="Print the node_exporter textfile format.")] = False,
) -> None:
    """Count tasks per state and type.

    Also the oldest waiting task's age and the restarts of the tasks in
    running/ and done/. --prometheus prints metrics for node_exporter's textfile collector:
    the gauges spoolq_tasks{state,type}, spoolq_oldest_waiting_seconds, spoolq_task_restarts{type}; the
    counters spoolq_tasks_completed_total{type,state}, spoolq_task_retries_total{type},
    spoolq_task_restarts_total{type} and the histograms spoolq_task_run_seconds{type},
    spoolq_task_wait_seconds{type}, which daemon restarts and retirement do not reset (summed over servers).
    --json and --prometheus exclude each other.
    """
    if json_out and prometheus:
        raise UsageError("--json and --prometheus exclude each other: give one")
    spool = _spool()
    if prometheus:
        sys.stdout.write(_prometheus(spool))
        return
    census = spool.census()
    _warn_unreadable(census.unreadable)
    if json_out:
        _print_json(census.as_json())
        return
    states = [s.name for s in State]
    rows = [[t, *(counts[s] for s in states), census.restarts.get(t, 0)] for t, counts in census.types.items()]
    rows.append(["(all)", *(census.states[s] for s in states), sum(census.restarts.values())])
    _table(["TYPE", *states, "RESTARTS"], rows)
    oldest = census.oldest_waiting_seconds
    print(f"oldest waiting: {'none' if oldest is None else f'{oldest:.1f} s'}")


@_command(examples=["spoolq demo"])
def demo() -> int:
    """Run the seed's SequenceSum example end to end.

    In a temporary spool, with a real worker process; prints a short
    transcript. Ignores --root."""
    from .demo import run_demo

    return run_demo()


# --------------------------------------------------------------------------- typer


def _version(value: bool) -> None:
    if value:
        print(f"spoolq {__version__}")
        raise typer.Exit()


def _global(
    ctx: typer.Context,
    # No envvar= here: click would take an empty $SPOOLQ_ROOT for an unset
    # one, which resolve_root refuses.
    root: Annotated[
        Optional[str], typer.Option("--root", metavar="PATH", show_default=False, help=ROOT_HELP)
    ] = None,
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """A crash-safe task queue in a directory tree, worked by a systemd-supervised daemon.

    Producers enqueue tasks of registered types; `spoolq worker SERVER` (one
    per systemd unit spoolq@SERVER) claims and runs them. Every error is one
    line on stderr. Try `spoolq demo`; `spoolq COMMAND --help` explains a
    command and shows examples.
    """
    _use_root(root, ctx.invoked_subcommand)


def build_app() -> typer.Typer:
    """The typer app of every command declared with :func:`_command`. Imports
    typer (only now: the annotations above name it)."""
    global typer, JsonFlag, TypeArg, IdArg, FollowFlag, FollowTimeout
    import typer
    import typer.core

    JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
    FollowFlag = Annotated[bool, typer.Option("--follow", "-f",
                                              help="Keep printing as it is written, until the task ends.")]
    FollowTimeout = Annotated[Optional[float], typer.Option(
        metavar="SECONDS", parser=_delay_option, help="With --follow: give up after this many seconds (exit 124).")]
    TypeArg = Annotated[str, typer.Argument(metavar="TYPE", help="The task's type.")]
    IdArg = Annotated[str, typer.Argument(metavar="ID", help="The task's id (unique within its type).")]

    class Command(typer.core.TyperCommand):
        """Help as the contract wants it: ``TYPE ID`` in the usage line,
        arguments without a type tag, ``--root`` listed, examples verbatim."""

        def invoke(self, ctx: Any) -> Any:
            try:
                return super().invoke(ctx)
            except BrokenPipeError:
                raise ReaderGone() from None  # not an OSError: click would end it with a silent exit 1

        def collect_usage_pieces(self, ctx: Any) -> list[str]:
            return [p[1:-1] if p.startswith("{") and p.endswith("}") else p
                    for p in super().collect_usage_pieces(ctx)]

        def format_options(self, ctx: Any, formatter: Any) -> None:
            arguments = [(p.metavar or (p.name or "").upper(), getattr(p, "help", None) or "")
                         for p in self.get_params(ctx) if p.param_type_name == "argument"]
            options = [r for p in self.get_params(ctx) if p.param_type_name == "option"
                       for r in [p.get_help_record(ctx)] if r is not None]
            options.insert(len(options) - 1, ("--root PATH", ROOT_HELP))  # before --help
            for title, rows in (("Arguments", arguments), ("Options", options)):
                if rows:
                    with formatter.section(title):
                        formatter.write_dl(rows)

        def format_epilog(self, ctx: Any, formatter: Any) -> None:
            if self.epilog:
                with formatter.section("Examples"):
                    for line in self.epilog.splitlines():
                        formatter.write(f"{'':>{formatter.current_indent}}{line}\n")

    app = typer.Typer(
        name="spoolq",
        add_completion=True,
        no_args_is_help=True,
        rich_markup_mode=None,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_global)
    for func, settings in _COMMANDS:
        app.command(cls=Command, **settings)(func)
    return app


def __getattr__(name: str) -> Any:
    if name == "app":  # spoolq.cli.app: the typer app (built on first use)
        return build_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- the quick path


# Commands main() runs without typer: (positional parameters, {flag: parameter}).
_QUICK: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "status": (("type_name", "task_id"), {"--json": "json_out"}),
    "enqueue": (("type_name", "task_id", "input_path"), {"--json": "json_in"}),
    "log": (("type_name", "task_id"), {"--json": "json_out", "--follow": "follow", "-f": "follow"}),
    "output": (("type_name", "task_id"), {"--json": "json_out", "--follow": "follow", "-f": "follow"}),
    "result": (("type_name", "task_id"), {}),
    "delete": (("type_name", "task_id"), {}),
}
_FUNCTIONS = {settings["name"] or func.__name__: func for func, settings in _COMMANDS}
# Global options that take a value (for finding the command word).
_GLOBAL_VALUE_OPTIONS = ("--root",)


def _hoist_root(args: list[str]) -> list[str]:
    """``--root PATH`` given after the command, moved before it (where the
    global option is parsed); the last one given wins. Nothing after ``--``
    moves."""
    i = _command_index(args)
    if i >= len(args) or args[i] == "--":
        return args
    head, command, rest = args[:i], args[i], args[i + 1:]
    moved: list[str] = []
    kept: list[str] = []
    j = 0
    while j < len(rest):
        arg = rest[j]
        if arg == "--":
            kept += rest[j:]
            break
        if arg == "--root":
            if j + 1 >= len(rest):
                raise UsageError("option '--root' requires an argument")
            moved += [arg, rest[j + 1]]
            j += 2
            continue
        if arg.startswith("--root="):
            moved.append(arg)
        else:
            kept.append(arg)
        j += 1
    return head + moved + [command] + kept


def _quick(args: list[str]) -> tuple[str | None, str, dict[str, Any]] | None:
    """(root, command, keyword arguments) of a plain call of a quick command,
    or None: typer takes every other call."""
    root = None
    i = 0
    while i < len(args) and (args[i] == "--root" or args[i].startswith("--root=")):
        if args[i] == "--root":
            if i + 1 >= len(args):
                return None
            root, i = args[i + 1], i + 2
        else:
            root, i = args[i][len("--root="):], i + 1
    if i >= len(args) or args[i] not in _QUICK:
        return None
    command = args[i]
    positional, flags = _QUICK[command]
    values: list[str] = []
    kwargs: dict[str, Any] = {}
    for arg in args[i + 1:]:
        if arg.startswith("-") and arg != "-":
            if arg not in flags:
                return None  # --help, --, an unknown option: typer says what to say
            kwargs[flags[arg]] = True
        else:
            values.append(arg)
    if len(values) != len(positional):
        return None
    kwargs.update(zip(positional, values))
    return root, command, kwargs


def _completing() -> bool:
    """A shell asks for completions (click's _SPOOLQ_COMPLETE protocol)."""
    return any(k.startswith("_") and k.endswith("_COMPLETE") for k in os.environ)


# --------------------------------------------------------------------------- errors and main


def _fail(message: str, code: int) -> NoReturn:
    print(f"spoolq: {message}", file=sys.stderr)
    sys.exit(code)


def _error_text(exc: BaseException) -> str:
    """One line for an error, with the command that would fix it where one does."""
    if isinstance(exc, OSError) and exc.strerror:
        if exc.filename == "":
            return f"{exc.strerror}: '' (an empty path)"
        where = exc.filename if exc.filename is not None else ""
        text = f"{exc.strerror}: {where}" if where else exc.strerror
        if isinstance(exc, PermissionError):
            text += _membership_hint()
        return text
    if isinstance(exc, NoSpool):
        what = f"{exc.root} is not a complete spool ({exc.missing}/ is missing)" if exc.missing else f"no spool at {exc.root}"
        return f"{what}: run 'spoolq init' (or set --root / SPOOLQ_ROOT)"
    if isinstance(exc, InvalidInput) and exc.limit is not None:
        return f"{exc} (spoolq init --max-input-bytes): pass large data by path instead"
    if isinstance(exc, UnknownType):
        return f"unknown task type {exc.type!r}: 'spoolq types' lists the registered ones"
    if isinstance(exc, TypeInUse):
        return (f"task type {exc.type!r} still has {exc.count} task(s): "
                f"'spoolq unregister {exc.type} --force' deletes them with it")
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _membership_hint() -> str:
    """Why a user may be refused the spool: not in its group (a shell opened
    before `usermod -aG` lacks it too). Empty when that is not the reason."""
    import grp

    try:
        st = os.stat(_run.root)
    except (OSError, TypeError):
        return ""
    if os.geteuid() in (0, st.st_uid) or st.st_gid == os.getegid() or st.st_gid in os.getgroups():
        return ""
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f" (this user is not in the spool's group {group}: ask to be added, then log in again)"


def _exit_code(exc: BaseException) -> int:
    if _run.command == "wait" or _run.follow:
        return EX_WAIT_ERROR
    if isinstance(exc, QueueFull):
        return EX_TEMPFAIL
    if _run.command == "worker" and isinstance(exc, SpoolqError):
        return EX_CONFIG
    return EX_FAILED


def _usage(message: str) -> NoReturn:
    where = f"spoolq {_run.command} --help" if _run.command else "spoolq --help"
    _fail(f"{message} (see '{where}')", EX_USAGE)


def _with_typer(args: list[str]) -> Any:
    """Run *args* through typer; its usage errors become one line too."""
    app = build_app()
    try:
        return app(args=args, prog_name="spoolq", standalone_mode=False)
    except typer.Abort:
        _fail("interrupted", EX_INTERRUPTED)
    except typer.TyperException as exc:
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            print(ctx.get_help(), file=sys.stderr)  # bare `spoolq`: the help, once; a usage error
            sys.exit(EX_USAGE)
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        # typer validates values with pydantic, whose messages lead with its
        # error kind: "Invalid value for '--state': Value error, 'x' is not ...".
        message = message.replace(": Value error, ", ": ", 1)
        top = ctx is None or ctx.parent is None
        if top and message.startswith("No such option:"):
            # `spoolq --json list`: the suggestion would be --version.
            message = message.split(" (Possible options:")[0] + "; a command's options go after its name"
        where = "spoolq --help" if top else f"spoolq {ctx.info_name} --help"
        _fail(f"{message} (see '{where}')", getattr(exc, "exit_code", EX_USAGE))


def main(argv: list[str] | None = None, *, quick: bool = True) -> NoReturn:
    """Entry point of the ``spoolq`` script and ``python -m spoolq``.

    A plain call of a quick command (:data:`_QUICK`) runs here without
    typer; *quick* False sends every call through typer (the tests compare
    the two). typer runs outside its standalone mode so that usage errors,
    like every other error, are one line on stderr (click would print a
    usage block).
    """
    args = sys.argv[1:] if argv is None else list(argv)
    _standard_streams()
    # A command says what it did itself, one line a finding (`fsck --repair`
    # printed each quarantine twice: its line and the library's warning).
    # The worker sets up its own logging (systemd.setup_logging).
    logging.getLogger("spoolq").addHandler(logging.NullHandler())
    if _command_of(args) == "worker":
        # Until the daemon installs its own handlers (Worker.run), a stop is
        # a clean exit 0, as after them: the defaults ended it by the signal
        # (143) in its first half second, which a unit or script counts as a failure.
        signal.signal(signal.SIGTERM, _stopped_while_starting)
    try:
        args = _hoist_root(args)
        plain = _quick(args) if quick and not _completing() else None
        if args == ["--version"] and quick:
            print(f"spoolq {__version__}")
            sys.exit(0)
        if plain is not None:
            root, command, kwargs = plain
            _use_root(root, command)
            result = _FUNCTIONS[command](**kwargs)
        else:
            result = _with_typer(args)
        sys.stdout.flush()  # here, so that a reader gone away is met below, not at exit
    except UsageError as exc:
        _usage(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted", EX_INTERRUPTED)
    except (BrokenPipeError, ReaderGone):
        # The reader went away (`spoolq list | head -1`): quietly, with the
        # status a shell shows for a tool SIGPIPE ended (128 + 13).
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nothing more to flush into the pipe at exit
        sys.exit(EX_PIPE)
    except (SpoolqError, OSError) as exc:
        if _run.acted and isinstance(exc, OSError):
            _fail(f"done, but its output could not be written: {_error_text(exc)}", EX_FAILED)
        _fail(_error_text(exc), _exit_code(exc))
    sys.exit(result if isinstance(result, int) else 0)


def _command_index(args: list[str]) -> int:
    """Where the command is in *args*: the first word that is not a global
    option or its value (``len(args)``, or a ``--``, when there is none)."""
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "--":
        i += 2 if args[i] in _GLOBAL_VALUE_OPTIONS else 1
    return i


def _command_of(args: list[str]) -> str | None:
    i = _command_index(args)
    return args[i] if i < len(args) and args[i] != "--" else None


def _stopped_while_starting(signum: int, frame: object) -> None:
    print("spoolq: stopped before the worker was ready", file=sys.stderr)
    sys.exit(0)


def _standard_streams() -> None:
    """Make fds 0-2 safe to use before anything else is opened.

    A descriptor closed at start (`spoolq worker >&-`) is opened on
    /dev/null: left free, the next file opened takes its number, and a print
    (or a handler's output) lands in a lock file or a task's file; Python
    itself starts with no sys.stdout then. And output that the locale cannot
    encode (a message with a snowman under LC_ALL=en_US.ISO-8859-1) is
    written escaped instead of failing the command."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            setattr(sys, name, open(fd, mode, closefd=False))  # noqa: SIM115 - the process's own stream
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
