"""The ``spoolq`` command line (docs/contract.md §4), built with typer.

Every command opens the spool named by the global ``--root`` (or
``SPOOLQ_ROOT``) and calls one or two methods of :class:`spoolq.Spool` (or of
:mod:`spoolq.sweeps`, :mod:`spoolq.fsck`, :mod:`spoolq.worker`); the logic
lives there. This module parses and prints, and adds the contract of a
command line:

* every error is one line on stderr and a non-zero exit, never a traceback
  (:func:`main` turns each :class:`~spoolq.errors.SpoolqError` and
  ``OSError`` into that line);
* exit codes scripts can rely on: 75 (EX_TEMPFAIL) when the queue is full,
  78 (EX_CONFIG) when the worker cannot start, and for ``wait`` 0 FINISHED,
  1 FAILED, 124 timeout, 2 any other error;
* ``spoolq enqueue`` stays quick to start: the inotify watch is set up
  only by ``wait``, and tables are plain aligned text.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from enum import Enum
from typing import Annotated, Any, NoReturn, Optional

import typer

from .errors import InvalidInput, NoSpool, QueueFull, SpoolqError
from .lifecycle import State
from .names import check_type, task_name
from .queries import Census, format_log
from .spool import Spool
from .store.layout import DEFAULT_ROOT, ROOT_ENV, resolve_root
from .store.registry import EXECUTORS
from .units import parse_duration, parse_size

EX_FAILED = 1
EX_WAIT_ERROR = 2
EX_TEMPFAIL = 75
EX_CONFIG = 78
EX_TIMEOUT = 124

app = typer.Typer(
    name="spoolq",
    help="A crash-safe task queue in a directory tree, worked by a systemd-supervised daemon.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class _Invocation:
    """What the global callback learnt: the spool root and the command, so
    :func:`main` can pick the command's exit code for an error."""

    root: str = DEFAULT_ROOT
    command: str | None = None


_run = _Invocation()

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


@app.callback()
def _global(
    ctx: typer.Context,
    root: Annotated[
        str,
        typer.Option("--root", envvar="SPOOLQ_ROOT", metavar="PATH", help="The spool directory."),
    ] = DEFAULT_ROOT,
) -> None:
    """spoolq: a crash-safe task queue in a directory tree.

    Producers enqueue tasks of registered types; `spoolq worker SERVER` (one
    per systemd unit spoolq@SERVER) claims and runs them. Try `spoolq demo`.
    """
    _run.root = resolve_root(root)
    _run.command = ctx.invoked_subcommand
    # Handlers and child processes using spoolq.tracker find the same spool.
    os.environ[ROOT_ENV] = _run.root


def _spool() -> Spool:
    return Spool(_run.root)


def _table(columns: list[str], rows: list[list[Any]]) -> None:
    """Print aligned columns, one row a line. On a terminal a line too long
    is cut with an ellipsis, as ps(1) does; into a pipe nothing is cut.

    Not rich.table: it renders about 1 ms per row, so `spoolq list` on a
    spool of 3000 tasks took 4-5 s; this takes 5 ms."""
    cells = [columns] + [[str(v).replace("\n", "\\n") for v in row] for row in rows]
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


# --------------------------------------------------------------------------- spool and types


@app.command()
def init(
    max_queue: Annotated[
        Optional[int], typer.Option(help="Most ENQUEUED tasks at once; 0 = unlimited. Default: keep the stored value.")
    ] = None,
    durable: Annotated[
        Optional[bool],
        typer.Option("--durable/--no-durable", help="fsync every change (default on). Default: keep the stored value."),
    ] = None,
    max_input_bytes: Annotated[
        Optional[int], typer.Option(help="Largest task input in bytes (default 64 MiB). Default: keep the stored value.")
    ] = None,
) -> None:
    """Create the spool layout, or check an existing one, and store its settings.

    Idempotent: settings not given keep their stored value. Prints the spool's path.
    """
    spool = Spool.init(_run.root, max_queue=max_queue, durable=durable, max_input_bytes=max_input_bytes)
    print(spool.root)


@app.command()
def register(
    type_name: Annotated[str, typer.Argument(metavar="TYPE", help="Task type name.")],
    handler: Annotated[str, typer.Argument(help="Dotted import path of the handler, e.g. pkg.module.func.")],
    timeout: Annotated[float, typer.Option(help="Seconds a task may take from its claim before it is re-enqueued.")] = 3600,
    retention: Annotated[float, typer.Option(help="Seconds a finished task is kept; <= 0 keeps it forever.")] = -1,
    max_restarts: Annotated[int, typer.Option(help="Re-enqueues of a timed-out or abandoned task before it FAILS.")] = 2,
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
    max_open_files: Annotated[Optional[int], typer.Option(min=1, help="Open files a handler process may hold.")] = None,
) -> None:
    """Register a task type, or update it: which handler runs its tasks, and their limits.

    A handler is called as handler(task_status, input) in a worker's child
    process, or on a Dask worker with --executor dask (the worker needs
    --dask-scheduler). A handler that goes over a limit fails, with the limit
    named in its message.
    """
    _spool().register_type(
        type_name, handler, timeout=timeout, retention=retention, max_restarts=max_restarts,
        executor=executor.value, memory_max=memory_max, cpu_time=cpu_time, nice=nice, max_open_files=max_open_files,
    )


@app.command("types")
def types_(json_out: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False) -> None:
    """List the registered task types with their handler and limits."""
    types = _spool().types()
    if json_out:
        _print_json([t.to_json() for t in types])
        return
    _table(
        ["TYPE", "HANDLER", "TIMEOUT (s)", "RETENTION (s)", "MAX RESTARTS"],
        [[t.name, t.handler, _seconds(t.timeout), _seconds(t.retention), t.max_restarts] for t in types],
    )


# --------------------------------------------------------------------------- one task


@app.command()
def enqueue(
    type_name: Annotated[str, typer.Argument(metavar="TYPE", help="Registered task type.")],
    task_id: Annotated[str, typer.Argument(metavar="ID", help="Task id, unique within its type.")],
    input_path: Annotated[str, typer.Argument(metavar="INPUT", help="File holding the input; '-' reads stdin.")],
    json_in: Annotated[bool, typer.Option("--json", help="INPUT holds JSON instead of a pickle.")] = False,
) -> None:
    """Enqueue task (TYPE, ID) with the input read from INPUT.

    INPUT holds one pickle (checked, not run) or, with --json, a JSON document.
    The task appears whole or not at all. Exits 75 when the queue is full, so
    a script can retry later.
    """
    task_name(type_name, task_id)  # refuse bad names before reading stdin
    spool = _spool()
    spool.get_type(type_name)  # and an unknown type
    if input_path == "-":
        payload = spool.read_input(sys.stdin.fileno())
    else:
        fd = os.open(input_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            payload = spool.read_input(fd)
        finally:
            os.close(fd)
    if json_in:
        spool.enqueue_json(type_name, task_id, payload)
    else:
        spool.enqueue_pickled(type_name, task_id, payload)


@app.command()
def status(
    type_name: Annotated[str, typer.Argument(metavar="TYPE")],
    task_id: Annotated[str, typer.Argument(metavar="ID")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the whole status document.")] = False,
) -> None:
    """Print the task's state: ENQUEUED, SCHEDULED, RUNNING, PAUSED, FINISHED or FAILED.

    With --json, the whole status document, with "state" and "path" (its directory).
    """
    info = _spool().status(type_name, task_id)
    if json_out:
        _print_json(info.as_json())
    else:
        print(info.state.name)


@app.command("log")
def log_(
    type_name: Annotated[str, typer.Argument(metavar="TYPE")],
    task_id: Annotated[str, typer.Argument(metavar="ID")],
) -> None:
    """Print the task's log, oldest first: one record a line (UTC time, state, message)."""
    for line in format_log(_spool().log_records(type_name, task_id)):
        print(line)


@app.command()
def result(
    type_name: Annotated[str, typer.Argument(metavar="TYPE")],
    task_id: Annotated[str, typer.Argument(metavar="ID")],
) -> None:
    """Write the task's stored response to stdout, raw bytes as stored.

    (The MIME type is in `spoolq status --json` as "response_mime".)
    """
    data, _mime = _spool().response(type_name, task_id)
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


@app.command()
def delete(
    type_name: Annotated[str, typer.Argument(metavar="TYPE")],
    task_id: Annotated[str, typer.Argument(metavar="ID")],
) -> None:
    """Remove the task, whatever its state. A running handler's later writes are refused."""
    _spool().delete(type_name, task_id)


@app.command("list")
def list_(
    state: Annotated[
        Optional[StateName], typer.Option(case_sensitive=False, help="Only tasks in this state.")
    ] = None,
    type_name: Annotated[Optional[str], typer.Option("--type", metavar="TYPE", help="Only tasks of this type.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON array of status documents.")] = False,
) -> None:
    """List tasks, one a line (or a JSON array), by state directory: waiting, claimed, running, done."""
    if type_name is not None:
        check_type(type_name)
    infos = _spool().list_tasks(state=State[state.value] if state else None, type_name=type_name)
    if json_out:
        _print_json([i.as_json() for i in infos])
        return
    _table(
        ["TYPE", "ID", "STATE", "SERVER", "STARTS", "UPDATED", "MESSAGE"],
        [
            [i.type, i.id, i.state.name, i.doc.get("server") or "", i.doc.get("starts", 0),
             _short_time(i.doc.get("updated_at")), i.doc.get("message", "")]
            for i in infos
        ],
    )


# --------------------------------------------------------------------------- wait


@app.command()
def wait(
    type_name: Annotated[str, typer.Argument(metavar="TYPE")],
    task_id: Annotated[str, typer.Argument(metavar="ID")],
    timeout: Annotated[
        Optional[float], typer.Option(help="Give up after this many seconds (exit 124). Default: wait forever.")
    ] = None,
) -> None:
    """Block until the task is FINISHED (exit 0) or FAILED (exit 1); print that state.

    Woken by file events, not a sleep loop. Exits 124 on timeout and 2 on any
    other error (unknown task, task deleted while waiting, ...).
    """
    try:
        info = _spool().wait(type_name, task_id, timeout)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None  # not 1: that means FAILED
    if info is None:
        _fail(f"timed out after {timeout:g} s waiting for {type_name}/{task_id}", EX_TIMEOUT)
    print(info.state.name)
    raise typer.Exit(0 if info.state == State.FINISHED else EX_FAILED)


# --------------------------------------------------------------------------- worker and maintenance


@app.command()
def worker(
    server: Annotated[str, typer.Argument(metavar="SERVER", help="Server id: names this worker (systemd unit spoolq@SERVER).")],
    concurrency: Annotated[int, typer.Option(min=1, help="Handlers run at once, each in a handler process.")] = 1,
    drain: Annotated[bool, typer.Option("--drain", help="Claim nothing new; finish what this server holds, then exit.")] = False,
    grace: Annotated[float, typer.Option(min=0, help="Seconds SIGTERM waits for running handlers.")] = 30,
    poll: Annotated[bool, typer.Option("--poll", help="Rescan the queue periodically instead of watching file events.")] = False,
    max_tasks_per_child: Annotated[
        int, typer.Option(min=0, help="Tasks a handler process runs before a fresh one replaces it; 0: never replace.")
    ] = 1000,
    dask_scheduler: Annotated[
        Optional[str],
        typer.Option(envvar="SPOOLQ_DASK_SCHEDULER", metavar="ADDR",
                     help="Dask scheduler for types registered with --executor dask, e.g. tcp://host:8786."),
    ] = None,
    dask_concurrency: Annotated[
        int, typer.Option(min=0, help="Most dask runs at once; 0: as many as the Dask cluster has threads.")
    ] = 0,
) -> None:
    """Run the worker daemon for SERVER in the foreground (what systemd runs).

    Claims waiting tasks and runs their handlers; on SIGTERM it stops
    claiming, hands back what it did not start and exits 0. Exits 78 when it
    cannot start (bad server id, missing or unsafe spool, server already running).
    --drain while SERVER already runs asks that process to drain, and waits for it.
    """
    from .worker import run_worker  # a SpoolqError from here on is a configuration error: exit 78

    raise typer.Exit(
        run_worker(
            _run.root, server, concurrency=concurrency, drain=drain, grace=grace, poll=poll,
            max_tasks_per_child=max_tasks_per_child, dask_scheduler=dask_scheduler or None,
            dask_concurrency=dask_concurrency,
        )
    )


@app.command()
def sweep() -> None:
    """One maintenance pass: re-enqueue (or fail) zombie and timed-out tasks,
    remove finished tasks past their retention, clear stale staging leftovers.

    Says what it did, one line per action. Workers do this periodically too.
    """
    from .sweeps import sweep as sweep_once

    actions, removed = sweep_once(_spool())
    for a in actions:
        print(f"{a.action} {a.type}/{a.id}: {a.reason}")
    if removed:
        print(f"removed {removed} leftover(s) from tmp/")
    if not actions and not removed:
        print("nothing to do")


@app.command()
def fsck(
    repair: Annotated[
        bool,
        typer.Option("--repair", help="Quarantine what cannot be trusted, re-enqueue orphans of dead servers, "
                     "complete interrupted moves. Never deletes task data."),
    ] = False,
) -> None:
    """Check the spool's consistency (like Postfix's postsuper -s).

    One line per problem (KIND: PATH: MESSAGE [-> ACTION]), then a summary.
    Exits 0 when the spool is consistent (after --repair), 1 when problems
    were found (or remain after --repair: permissions are only reported).
    """
    from .fsck import run_fsck

    raise typer.Exit(run_fsck(_run.root, repair))


def _prometheus(census: Census) -> str:
    """The node_exporter textfile format (write it to a *.prom file)."""
    lines = [
        "# HELP spoolq_tasks Tasks in the spool, by state and type.",
        "# TYPE spoolq_tasks gauge",
    ]
    for type_name, counts in census.types.items():
        for state, n in counts.items():
            lines.append(f'spoolq_tasks{{state="{state.lower()}",type="{type_name}"}} {n}')
    lines += [
        "# HELP spoolq_oldest_waiting_seconds Age of the oldest ENQUEUED task (0 when none waits).",
        "# TYPE spoolq_oldest_waiting_seconds gauge",
        f"spoolq_oldest_waiting_seconds {census.oldest_waiting_seconds or 0:.3f}",
        "# HELP spoolq_task_restarts Restarts charged to the tasks now running or done, by type.",
        "# TYPE spoolq_task_restarts gauge",
    ]
    for type_name, n in census.restarts.items():
        lines.append(f'spoolq_task_restarts{{type="{type_name}"}} {n}')
    return "\n".join(lines) + "\n"


@app.command()
def stats(
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
    prometheus: Annotated[bool, typer.Option("--prometheus", help="Print the node_exporter textfile format.")] = False,
) -> None:
    """Counts per state and per type, the oldest waiting task's age, restarts.

    --prometheus prints metrics for node_exporter's textfile collector:
    spoolq_tasks{state,type}, spoolq_oldest_waiting_seconds, spoolq_task_restarts{type}.
    """
    census = _spool().census()
    if json_out:
        _print_json(census.as_json())
        return
    if prometheus:
        sys.stdout.write(_prometheus(census))
        return
    states = [s.name for s in State]
    rows = [[t, *(counts[s] for s in states), census.restarts.get(t, 0)] for t, counts in census.types.items()]
    rows.append(["(all)", *(census.states[s] for s in states), sum(census.restarts.values())])
    _table(["TYPE", *states, "RESTARTS"], rows)
    oldest = census.oldest_waiting_seconds
    print(f"oldest waiting: {'none' if oldest is None else f'{oldest:.1f} s'}")


@app.command()
def demo() -> None:
    """Run the seed's SequenceSum example end to end in a temporary spool,
    with a real worker process; prints a short transcript. Ignores --root."""
    from .demo import run_demo

    raise typer.Exit(run_demo())


# --------------------------------------------------------------------------- errors


def _fail(message: str, code: int) -> NoReturn:
    print(f"spoolq: {message}", file=sys.stderr)
    raise typer.Exit(code)


def _error_text(exc: BaseException) -> str:
    """One line for an error, with the command that would fix it where one does."""
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename if exc.filename is not None else ""
        return f"{exc.strerror}: {where}" if where else exc.strerror
    if isinstance(exc, NoSpool):
        what = f"{exc.root} is not a complete spool ({exc.missing}/ is missing)" if exc.missing else f"no spool at {exc.root}"
        return f"{what}: run 'spoolq init' (or set --root / SPOOLQ_ROOT)"
    if isinstance(exc, InvalidInput) and exc.limit is not None:
        return f"{exc} (spoolq init --max-input-bytes): pass large data by path instead"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _exit_code(exc: BaseException) -> int:
    if _run.command == "wait":
        return EX_WAIT_ERROR
    if isinstance(exc, QueueFull):
        return EX_TEMPFAIL
    if _run.command == "worker" and isinstance(exc, SpoolqError):
        return EX_CONFIG
    return 1


def main() -> None:
    """Entry point of the ``spoolq`` script and ``python -m spoolq``.

    Runs typer outside its standalone mode so that usage errors, like every
    other error, are one line on stderr (click would print a usage block).
    typer's exceptions are caught through its public base class
    ``typer.TyperException``; the attributes used are click's.
    """
    try:
        result = app(standalone_mode=False)
    except typer.Abort:
        print("spoolq: interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as exc:
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            print(ctx.get_help(), file=sys.stderr)
            sys.exit(2)
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        where = f"spoolq {ctx.info_name} --help" if ctx is not None and ctx.parent is not None else "spoolq --help"
        print(f"spoolq: {message} (see '{where}')", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))
    except (SpoolqError, OSError) as exc:
        print(f"spoolq: {_error_text(exc)}", file=sys.stderr)
        sys.exit(_exit_code(exc))
    sys.exit(result if isinstance(result, int) else 0)

