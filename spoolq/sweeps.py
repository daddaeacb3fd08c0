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

import os
import stat
from collections.abc import Callable
from typing import Any

from .errors import CorruptTask
from .faults import crashpoint
from .lifecycle import Action, Judgement, Place, Verdict, judge, retired, timed_out
from .names import split_task_name
from .spool import Spool, SweepAction
from .store import codec, fsutil
from .store.codec import from_iso
from .store.registry import TaskType
from .store.taskdir import peek_status

TMP_GRACE = 900.0
"""Seconds a ``tmp/`` entry may live before it counts as abandoned."""


def verdict_for(
    spool: Spool, doc: dict[str, Any], place: Place, server_dir: str | None,
    alive: Callable[[str], bool], now: float,
) -> Judgement:
    """:func:`~spoolq.lifecycle.judge` plus the timeout rule: the one verdict
    on a task in scheduled/ or running/ (used under the lock again)."""
    verdict = judge(place, codec.state_of(doc), doc.get("server"), server_dir, alive)
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
    by the spool's size). *message* replaces the reason in the log."""
    now = spool.clock()
    actions: list[SweepAction] = []
    seen: dict[str, bool] = {}

    def alive(server: str) -> bool:
        if server not in seen:
            seen[server] = spool.server_alive(server)
        return seen[server]

    layout = spool.layout
    for server in spool.servers():
        sdir = layout.server_dir(server)
        try:
            if not stat.S_ISDIR(os.lstat(sdir).st_mode):
                spool.quarantine(sdir, "not a server directory (symlink or file)")
                continue
            names = os.listdir(sdir)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            action = _sweep_one(spool, os.path.join(sdir, name), Place.SCHEDULED, server, alive, now, message)
            if action:
                actions.append(action)
    for name in os.listdir(layout.running):
        action = _sweep_one(spool, os.path.join(layout.running, name), Place.RUNNING, None, alive, now, message)
        if action:
            actions.append(action)
    return actions


def _sweep_one(
    spool: Spool, path: str, place: Place, server_dir: str | None,
    alive: Callable[[str], bool], now: float, message: str,
) -> SweepAction | None:
    parts = split_task_name(os.path.basename(path))
    if not parts:
        spool.quarantine(path, "not a task name")
        return None
    try:
        doc = peek_status(path)
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
        return message or again.reason

    if verdict.verdict is Verdict.UNTRUSTED:
        spool.quarantine(path, verdict.reason)
        return SweepAction(parts[0], parts[1], Action.QUARANTINED, verdict.reason)
    result = spool.take_away(path, verdict.reason, charge=True, expect_claim=int(doc["claim"]), confirm=confirm)
    crashpoint("sweep.taken_away")
    if result is Action.GONE:
        return None
    return SweepAction(parts[0], parts[1], result, message or verdict.reason)


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
        result = spool.take_away(os.path.join(sdir, name), f"handed back: server {server} restarted", charge=False)
        if result is not Action.GONE:
            actions.append(SweepAction(parts[0], parts[1], result, "server restarted before start"))
    for name in os.listdir(layout.running):
        path = os.path.join(layout.running, name)
        parts = split_task_name(name)
        if not parts:
            continue
        try:
            doc = peek_status(path)
        except OSError:
            continue
        except CorruptTask as exc:
            spool.quarantine(path, str(exc))
            continue
        if doc.get("server") != server:
            continue
        reason = f"abandoned: server {server} restarted while it ran"
        result = spool.take_away(path, reason, charge=True, expect_claim=int(doc["claim"]))
        crashpoint("recover.taken_away")
        if result is not Action.GONE:
            actions.append(SweepAction(parts[0], parts[1], result, reason))
    return actions


def delete_retired(spool: Spool) -> list[SweepAction]:
    """Remove tasks in ``done/`` older than their type's retention (from the
    finishing time, the directory's mtime). One lstat per task, no status
    parsing; retention <= 0 keeps tasks forever."""
    now = spool.clock()
    layout = spool.layout
    actions = []
    types: dict[str, TaskType | None] = {}
    with os.scandir(layout.done) as it:
        entries = list(it)
    for entry in entries:
        parts = split_task_name(entry.name)
        if not parts:
            continue
        if parts[0] not in types:
            types[parts[0]] = spool.registry.find(parts[0])
        ttype = types[parts[0]]
        if ttype is None:
            continue
        try:
            finished = entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue
        if not retired(now, finished, ttype.retention):
            continue
        trash = layout.trash_path(entry.name)
        try:
            os.rename(entry.path, trash)
        except FileNotFoundError:
            continue  # another sweeper or a delete took it
        crashpoint("retire.renamed")
        spool.remove_trash(trash)
        crashpoint("sweep.retired")
        actions.append(SweepAction(parts[0], parts[1], Action.RETIRED, f"older than {ttype.retention:g} s"))
    if actions and spool.durable:
        fsutil.fsync_dir(layout.done)
    return actions


def clean_tmp(spool: Spool, *, grace: float = TMP_GRACE) -> int:
    """Remove staging leftovers older than *grace* seconds and any trash
    (interrupted deletes). Returns how many entries were removed."""
    now = spool.clock()
    removed = 0
    with os.scandir(spool.layout.tmp) as it:
        entries = list(it)
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if entry.name.startswith(".trash.") or now - st.st_mtime > grace:
            spool.remove_trash(entry.path)
            removed += 1
    return removed


def sweep(spool: Spool) -> tuple[list[SweepAction], int]:
    """One full maintenance pass: zombies, retirement, ``tmp/``; the actions
    and the number of ``tmp/`` leftovers removed."""
    actions = reenqueue_zombies(spool) + delete_retired(spool)
    return actions, clean_tmp(spool)
