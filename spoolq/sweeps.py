"""Maintenance passes over a spool: zombies, recovery, retirement, ``tmp/``.

Each pass finds candidates with cheap unlocked reads, then acts through the
spool's take-away, which re-checks everything under the enqueue lock and the
task's lock (with a fresh look at the server's lock): several sweepers, a
sweeper and a restarting server, or a sweeper and fsck can run at once, and
each task is acted on once. The rules themselves are in
:mod:`spoolq.lifecycle` (:func:`~spoolq.lifecycle.judge`,
:func:`~spoolq.lifecycle.timed_out`, :func:`~spoolq.lifecycle.retired`).
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

from .errors import CorruptTask, SpoolqError
from .faults import crashpoint
from .lifecycle import Action, Judgement, Place, Verdict, judge, retired, timed_out
from .names import split_task_name
from .spool import Spool, SweepAction
from .store import codec, fsutil
from .store.codec import from_iso
from .store.registry import TaskType
from .store.taskdir import peek_status

log = logging.getLogger("spoolq.sweeps")

TMP_GRACE = 900.0
"""Seconds a ``tmp/`` entry may live before it counts as abandoned."""
CLOCK_SLACK = 60.0
"""Seconds a finishing time may lie in the future before the clock is
taken to have stepped back (the task's retention then starts now)."""
LEFTOVER_WAIT = 2.0
"""Seconds a sweep waits for the leftovers of a dead server's run to die."""


def verdict_for(
    spool: Spool, doc: dict[str, Any], place: Place, server_dir: str | None,
    alive: Callable[[str], bool], now: float,
) -> Judgement:
    """:func:`~spoolq.lifecycle.judge` plus the timeout rule: the one verdict
    on a task in scheduled/ or running/ (used under the lock again)."""
    verdict = judge(place, codec.state_of(doc), doc.get("server"), server_dir, alive,
                    cancel_asked=doc.get("cancel") is not None)
    if not verdict.ok:
        return verdict
    ttype = spool.registry.find(str(doc.get("type")))
    claimed_at = doc.get("claimed_at")
    if ttype is not None and timed_out(now, from_iso(claimed_at) if claimed_at else None, ttype.timeout):
        return Judgement(Verdict.TAKE_AWAY, f"timed out after {ttype.timeout:g} s", charge=True)
    return verdict


def reenqueue_zombies(spool: Spool, message: str = "") -> list[SweepAction]:
    """One pass over ``scheduled/`` and ``running/``: a task whose server is
    dead, or that runs past its type's timeout (from the claim), is
    re-enqueued while restarts remain, else FAILED; interrupted finishes and
    re-enqueues are completed; what cannot be trusted is quarantined. Reads
    the status of just these tasks (bounded by the servers' concurrency, not
    by the spool's size). *message* goes in the log before the reason."""
    now = spool.clock()
    actions: list[SweepAction] = []
    seen: dict[str, bool] = {}

    def alive(server: str) -> bool:
        if server not in seen:
            seen[server] = spool.server_alive(server)
        return seen[server]

    layout = spool.layout
    candidates: list[tuple[str, Place, str | None]] = []
    for server in spool.servers():
        sdir = layout.server_dir(server)
        try:
            if not stat.S_ISDIR(os.lstat(sdir).st_mode):
                spool.quarantine(sdir, "not a server directory (symlink or file)")
                continue
            names = os.listdir(sdir)
        except (FileNotFoundError, NotADirectoryError):
            continue
        candidates += [(os.path.join(sdir, name), Place.SCHEDULED, server) for name in names]
    candidates += [(os.path.join(layout.running, name), Place.RUNNING, None) for name in os.listdir(layout.running)]
    for path, place, server_dir in candidates:
        action = guarded(spool, path, lambda p=path, pl=place, sd=server_dir: _sweep_one(
            spool, p, pl, sd, alive, now, message))
        if action:
            actions.append(action)
    return actions


def guarded(spool: Spool, path: str, action: Callable[[], SweepAction | None]) -> SweepAction | None:
    """One task's part of a pass: an error there is logged, a task that
    cannot be trusted quarantined, and the pass goes on to the next task."""
    try:
        return action()
    except CorruptTask as exc:
        spool.quarantine(exc.path if os.path.lexists(exc.path) else path, str(exc))
        return None
    except (SpoolqError, OSError) as exc:
        if not os.path.isdir(spool.layout.running):
            raise  # the spool itself is gone: nothing to go on with
        log.error("sweep: %s: %s", path, exc)
        return None


def _sweep_one(
    spool: Spool, path: str, place: Place, server_dir: str | None,
    alive: Callable[[str], bool], now: float, message: str,
) -> SweepAction | None:
    parts = split_task_name(os.path.basename(path))
    if not parts:
        spool.quarantine(path, "not a task name")
        return None
    try:
        doc = peek_status(path, claimed_in=server_dir)
    except FileNotFoundError:
        return None
    except OSError as exc:
        spool.quarantine(path, f"not a task directory: {exc.strerror}")
        return None
    except CorruptTask as exc:
        spool.quarantine(path, str(exc))
        return None
    verdict = verdict_for(spool, doc, place, server_dir, alive, now)
    if verdict.ok:
        return None

    def confirm(locked: dict[str, Any]) -> str | None:
        # Under the task's lock, with a fresh look at the server's lock: a
        # server that came back meanwhile keeps its claim.
        again = verdict_for(spool, locked, place, server_dir, spool.server_alive, now)
        if again.verdict is not verdict.verdict:
            return None
        return _with_message(message, again.reason)

    if verdict.verdict is Verdict.UNTRUSTED:
        spool.quarantine(path, verdict.reason)
        return SweepAction(parts[0], parts[1], Action.QUARANTINED, verdict.reason)
    if verdict.verdict is Verdict.CANCEL:
        result = finish_cancel(spool, path, expect_claim=int(doc["claim"]))
        return SweepAction(parts[0], parts[1], result, f"cancelled: {doc.get('cancel')}") if result is Action.FAILED else None
    server = doc.get("server")
    server_dead = isinstance(server, str) and not alive(server)
    result = take_from_run(spool, path, verdict.reason, expect_claim=int(doc["claim"]), confirm=confirm,
                           kill_leftovers=server_dead)
    crashpoint("sweep.taken_away")
    if result in (Action.GONE, Action.BUSY):
        return None
    return SweepAction(parts[0], parts[1], result, _with_message(message, verdict.reason))


def _with_message(message: str, reason: str) -> str:
    """The log's reason for a take-away, after the caller's *message*
    (ATP's ``reenqueueZombieTasks(message)``): the record still says why."""
    return f"{message}: {reason}" if message else reason


def finish_cancel(spool: Spool, path: str, *, expect_claim: int) -> Action:
    """End a dead server's task whose cancel was asked for: FAILED,
    cancelled, once the leftovers of its run (if any) are killed."""
    result = spool.finish_cancel(path, expect_claim=expect_claim)
    if result is Action.BUSY:
        _kill_leftovers(spool, path)
        deadline = time.monotonic() + LEFTOVER_WAIT
        while result is Action.BUSY and time.monotonic() < deadline:
            time.sleep(0.02)
            result = spool.finish_cancel(path, expect_claim=expect_claim)
    return result


def _kill_leftovers(spool: Spool, path: str) -> None:
    pids = spool.run_holders(path)
    log.warning("%s: killing what is left of its run (pids %s) before taking it back", path, pids or "none visible")
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def take_from_run(
    spool: Spool, path: str, reason: str, *, expect_claim: int, kill_leftovers: bool,
    confirm: Callable[[dict[str, Any]], str | None] | None = None,
) -> Action:
    """A charged take-away of the task at *path*. When a process of its run
    still holds it (BUSY) and *kill_leftovers* (its server is dead, so no
    worker will ever end that run), those processes are killed first: they
    are what is left of a run nobody owns any more."""
    result = spool.take_away(path, reason, charge=True, expect_claim=expect_claim, confirm=confirm)
    if result is not Action.BUSY or not kill_leftovers:
        return result
    _kill_leftovers(spool, path)
    deadline = time.monotonic() + LEFTOVER_WAIT
    while result is Action.BUSY and time.monotonic() < deadline:
        time.sleep(0.02)
        result = spool.take_away(path, reason, charge=True, expect_claim=expect_claim, confirm=confirm)
    return result


def recover_server(spool: Spool, server: str, *, keep_scheduled: bool = False) -> list[SweepAction]:
    """Recover what *server* held when it died; becomes *server* first
    (ServerBusy if it is alive). Unstarted claims go back to the queue for
    free (unless *keep_scheduled*: a draining server runs them itself);
    started ones are abandoned (a restart is charged)."""
    spool.hold_server(server)
    layout = spool.layout
    actions = []
    sdir = layout.server_dir(server)
    for name in [] if keep_scheduled else os.listdir(sdir):
        parts = split_task_name(name)
        if not parts:
            spool.quarantine(os.path.join(sdir, name), "not a task name")
            continue
        path = os.path.join(sdir, name)
        result = guarded(spool, path, lambda p=path, t=parts: _hand_back(spool, server, p, t))
        if result:
            actions.append(result)
    for name in os.listdir(layout.running):
        path = os.path.join(layout.running, name)
        parts = split_task_name(name)
        if not parts:
            continue
        action = guarded(spool, path, lambda p=path, t=parts: _recover_running(spool, server, p, t))
        if action:
            actions.append(action)
    return actions


def _recover_running(spool: Spool, server: str, path: str, parts: tuple[str, str]) -> SweepAction | None:
    try:
        doc = peek_status(path)
    except FileNotFoundError:
        return None
    if doc.get("server") != server:
        return None
    reason = f"abandoned: server {server} restarted while it ran"
    # Leftovers of this server's previous life are nobody's: kill them.
    result = take_from_run(spool, path, reason, expect_claim=int(doc["claim"]), kill_leftovers=True)
    crashpoint("recover.taken_away")
    if result in (Action.GONE, Action.BUSY):
        return None
    return SweepAction(parts[0], parts[1], result, reason)


def _hand_back(spool: Spool, server: str, path: str, parts: tuple[str, str]) -> SweepAction | None:
    result = spool.take_away(path, f"handed back: server {server} restarted", charge=False)
    if result in (Action.GONE, Action.BUSY):
        return None
    return SweepAction(parts[0], parts[1], result, "server restarted before start")


def delete_retired(spool: Spool) -> list[SweepAction]:
    """Remove tasks in ``done/`` older than their type's retention (from the
    finishing time, the directory's mtime). One lstat per task, no status
    parsing; retention <= 0 keeps tasks forever."""
    return [action for action in retire_steps(spool) if action is not None]


def retire_steps(spool: Spool) -> Iterator[SweepAction | None]:
    """:func:`delete_retired` one task at a time: yields the action for each
    task retired and None for each entry of ``done/`` looked at and kept, so
    a caller may stop between any two (the daemon spreads a long pass over
    its loop's turns: removing a task's files is a disk write each, and tens
    of thousands of them expiring together must not hold up claims, time
    limits or the watchdog). ``done/`` is read as the pass goes, not listed
    up front; an entry retired meanwhile by another sweeper is skipped.
    Each entry is judged by the clock when it is reached: a pass may last
    longer than the slack for a clock stepping back, and a task finished
    since the pass began is not from the future."""
    layout = spool.layout
    types: dict[str, TaskType | None] = {}
    retired_any = False
    with os.scandir(layout.done) as it:
        for entry in it:
            action = _retire_entry(spool, entry, spool.clock(), types)
            retired_any = retired_any or action is not None
            yield action
    if retired_any and spool.durable:
        fsutil.fsync_dir(layout.done)


def _retire_entry(spool: Spool, entry: os.DirEntry[str], now: float,
                  types: dict[str, TaskType | None]) -> SweepAction | None:
    """Retire the ``done/`` entry *entry* if its retention is over; the action, else None."""
    parts = split_task_name(entry.name)
    if not parts:
        return None
    if parts[0] not in types:
        types[parts[0]] = spool.registry.find(parts[0])
    ttype = types[parts[0]]
    if ttype is None:
        return None
    try:
        finished = entry.stat(follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return None
    if finished > now + CLOCK_SLACK:
        _restamp(entry.path)  # the clock stepped back: its retention starts now
        return None
    if not retired(now, finished, ttype.retention):
        return None
    trash = spool.layout.trash_path(entry.name)
    try:
        os.rename(entry.path, trash)
    except FileNotFoundError:
        return None  # another sweeper or a delete took it
    crashpoint("retire.renamed")
    spool.remove_trash(trash)
    crashpoint("sweep.retired")
    return SweepAction(parts[0], parts[1], Action.RETIRED, f"older than {ttype.retention:g} s")


def _restamp(path: str) -> None:
    """Set a directory's times to now (allowed to anyone who may write it)."""
    try:
        dfd = fsutil.open_dir(path)
    except OSError:
        return
    try:
        os.utime(dfd)
        log.warning("%s finished in the future (the clock stepped back?); its retention starts now", path)
    except OSError:
        pass
    finally:
        os.close(dfd)


def clean_tmp(spool: Spool, *, grace: float = TMP_GRACE) -> int:
    """Remove staging leftovers older than *grace* seconds and any trash
    (interrupted deletes). Returns how many entries were removed."""
    return sum(clean_tmp_steps(spool, grace=grace))


def clean_tmp_steps(spool: Spool, *, grace: float = TMP_GRACE) -> Iterator[bool]:
    """:func:`clean_tmp` one entry of ``tmp/`` at a time, as
    :func:`retire_steps`: yields True for each entry removed, False for each
    kept (a batch enqueue killed midway can leave tens of thousands of
    stages, each a directory to remove)."""
    with os.scandir(spool.layout.tmp) as it:
        for entry in it:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                yield False
                continue
            gone = entry.name.startswith(".trash.") or spool.clock() - st.st_mtime > grace
            if gone:
                spool.remove_trash(entry.path)
            yield gone


def sweep(spool: Spool) -> tuple[list[SweepAction], int]:
    """One full maintenance pass: zombies, retirement, ``tmp/``; the actions
    and the number of ``tmp/`` leftovers removed."""
    steps = sweep_steps(spool)
    actions = []
    while True:
        try:
            action = next(steps)
        except StopIteration as end:
            return actions, end.value
        if action is not None:
            actions.append(action)


def sweep_steps(spool: Spool) -> Generator[SweepAction | None, None, int]:
    """:func:`sweep` a step at a time, as :func:`retire_steps`; returns the
    number of ``tmp/`` leftovers removed."""
    yield from reenqueue_zombies(spool)
    yield from retire_steps(spool)
    removed = 0
    for gone in clean_tmp_steps(spool):
        removed += gone
        yield None
    return removed
