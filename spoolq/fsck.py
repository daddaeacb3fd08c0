"""``spoolq fsck [--repair]``: check a spool's structure, repair what can be.

The spool's own code trusts nothing it reads (it quarantines what it cannot
use, when it meets it), but it only looks at what it is about to use. fsck
looks at everything, like Postfix's ``postsuper -s``: after a power loss, a
disk that filled up, a restore from backup or hands in the tree.

What it checks, and what ``--repair`` does about each (``kind`` of finding):

========================  ===============================================  =========================================
kind                      what is wrong                                    repair
========================  ===============================================  =========================================
``missing-dir``           a state directory is missing                     ``spoolq init`` (creates it)
``unsafe-dir``            a state directory is a symlink or a file         none: fix by hand
``cross-device``          a state directory on another filesystem          none: fix by hand
``ownership``             a state directory owned by another uid           none: the message names the ``chown``
``permissions``           writable by any user, by mode bits or through    none: the message names the ``chmod``
                          an ACL (root, a directory above it that is not   or ``setfacl``
                          sticky, a state, server or task directory, a
                          task file); a task directory or input of
                          neither the spool's group nor its owner, whose
                          input a start would not load (it quarantines it)
``group-access``          on a spool its group shares, a state directory,  the modes of what this user owns are
                          task directory or task file the group cannot     fixed; others: the message names the
                          use; spool.json, a type or lock file the group   ``chmod`` (or the ``chgrp``: fsck
                          cannot read, or of another group                 changes no owner)
``unknown-entry``         something that is not part of a spool            quarantined
``bad-name``              not a ``TYPE:ID`` (or server) name               quarantined
``symlink``               a symlink where a task or one of its files       quarantined (the link; never followed)
                          belongs
``not-a-directory``       a file where a task directory belongs            quarantined
``incomplete``            a task without status.json, input or log         quarantined
``corrupt-status``        status.json unreadable or malformed              quarantined
``status-mismatch``       status.json names another type, id or server     quarantined
``wrong-state``           the state disagrees with the directory           an interrupted finish or re-enqueue is
                                                                           completed (moved on to done/ or enqueued/);
                                                                           anything else is quarantined
``orphan``                a claim of a dead server                         re-enqueued like ``recover_server`` does
                                                                           (started: a restart is charged; claimed:
                                                                           free) or FAILED when no restarts remain;
                                                                           processes left of its run are killed first
``duplicate``             the same task in two places                      the newer copy is kept, the others
                                                                           quarantined
``leftover-tmp``          status.json.tmp / response.tmp in a task,        an interrupted status write is completed
                          a ``types/`` or ``spool.json`` staging file      if it was logged (the spool's own
                                                                           roll-forward), else set aside; other
                                                                           leftovers are quarantined
``stale-tmp``             ``tmp/`` staging older than the grace            removed (never published: its enqueue
                          (15 min), ``.trash.*`` of interrupted deletes    never returned; trash was deleted)
``corrupt-type``          ``types/<T>.json`` unreadable                    quarantined (register the type again)
``unregistered-type``     a waiting or claimed task of an unknown type     none: the message names the ``register``
========================  ===============================================  =========================================

Nothing is ever deleted except ``tmp/`` leftovers: what cannot be trusted
goes to ``quarantine/`` with a ``.reason`` file beside it. Claims of live
servers (their lock is held) are left alone, and every repair of a task
holds that task's lock and re-checks it, as the daemon does: fsck may run
while workers run.

After a repair, a second, read-only pass decides whether the spool is now
consistent (:attr:`FsckReport.ok`).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import stat
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TextIO

from . import sweeps
from .errors import CorruptTask, SpoolError, SpoolqError
from .lifecycle import Action, Judgement, Place, State, Verdict, judge
from .names import check_server, check_type, split_task_name
from .spool import Spool
from .store import fsutil
from .store.codec import INPUT_NAMES, INPUT_PICKLE, LOG, RESPONSE, STATUS, state_of
from .store.layout import SETTINGS, STATE_DIRS, layout_problems, resolve_root, task_trust_problem
from .store.metrics import METRICS_DIR, load, server_of
from .store.output import PROGRESS, PROGRESS_TMP, is_output_file
from .store.taskdir import read_status, roll_forward
from .sweeps import TMP_GRACE

ROOT_ENTRIES = frozenset({*STATE_DIRS, SETTINGS, "lost+found", METRICS_DIR})
TASK_FILES = frozenset({STATUS, LOG, RESPONSE, *INPUT_NAMES})
TASK_LEFTOVERS = frozenset({STATUS + ".tmp", RESPONSE + ".tmp"})
# A run's output (with the tail parts a run that is still in its tail, or
# died there, leaves) and progress: not durable state, never quarantined
# while they are regular files (contract §12.1, §12.3).
RUN_FILES = frozenset({PROGRESS, PROGRESS_TMP})
_LOCK_WAIT = 5.0


@dataclass
class Finding:
    """One problem: its kind, the path (relative to the spool root), what is
    wrong, and what ``--repair`` did about it (None: nothing)."""

    kind: str
    path: str
    message: str
    action: str | None = None

    def __str__(self) -> str:
        line = f"{self.kind}: {self.path}: {self.message}"
        return f"{line} -> {self.action}" if self.action else line


@dataclass
class FsckReport:
    """The result of :func:`check`.

    ``findings``: what the (first) pass found, with the action taken on each
    when repairing. ``remaining``: what is still wrong afterwards (without
    repair, every finding; with repair, what a fresh read-only pass found).
    """

    root: str
    repair: bool
    findings: list[Finding]
    remaining: list[Finding]
    tasks: int = 0
    quarantined: int = 0  # entries in quarantine/ afterwards (.reason files not counted)

    @property
    def problems_remaining(self) -> int:
        return len(self.remaining)

    @property
    def ok(self) -> bool:
        return not self.remaining

    @property
    def repaired(self) -> int:
        return sum(1 for f in self.findings if f.action is not None)


# --------------------------------------------------------------------------- layout


def layout_findings(root: str) -> list[Finding]:
    """Problems of the spool's skeleton (the same checks that opening a
    :class:`Spool` applies, :func:`spoolq.store.layout.layout_problems`),
    every one reported, not just the first."""
    out = []
    for problem in layout_problems(root):
        if problem.kind == "missing-dir":
            what = f"no spool at {root}" if problem.rel == "." else "missing"
            message = f"{what}: fix with: spoolq --root {root} init"
        elif problem.kind == "unsafe-dir":
            message = f"is {problem.message}" + (" (move it away, then spoolq init)" if problem.rel != "." else "")
        else:
            message = f"{problem.message}: fix with: {problem.fix}" if problem.fix else problem.message
        out.append(Finding(problem.kind, problem.rel, message))
    return out


def _make_missing(root: str, findings: list[Finding]) -> None:
    """--repair of the missing-dir findings of state directories: they are
    made, as ``spoolq init`` makes them."""
    missing = [f for f in findings if f.kind == "missing-dir" and f.path != "."]
    if missing:
        Spool.init(root)
        for finding in missing:
            finding.action = "created (spoolq init)"


def open_spool(root: str, *, repair: bool) -> tuple[Spool | None, list[Finding]]:
    """The spool at *root*, opened to be checked, and the layout findings to
    report. A spool kept from opening only by missing state directories
    gets them with *repair* (reported as made: pass them to :func:`check`).
    A spool that cannot be opened is None, with every layout finding (or
    the error) as what is wrong."""
    made: list[Finding] = []
    if repair and all(p.kind == "missing-dir" and p.rel != "." for p in layout_problems(root) if p.fatal):
        made = [f for f in layout_findings(root) if f.kind == "missing-dir"]
        _make_missing(root, made)
    try:
        return Spool(root), made
    except SpoolError as exc:
        return None, made + (layout_findings(root) or [Finding("spool", ".", str(exc))])


# --------------------------------------------------------------------------- the check


@dataclass
class _Place:
    """A task directory that passed the structural checks."""

    where: str  # enqueued, scheduled, running, done
    path: str
    name: str
    type: str
    id: str
    server_dir: str | None  # the <server> of scheduled/<server>/
    inode: tuple[int, int]  # (st_dev, st_ino): a directory keeps it across renames
    doc: dict[str, Any] = field(repr=False)

    @property
    def state(self) -> State:
        return state_of(self.doc)


_ORDER = {"enqueued": 0, "scheduled": 1, "running": 2, "done": 3}


class _Checker:
    def __init__(self, spool: Spool, repair: bool, grace: float) -> None:
        self.spool = spool
        self.repair = repair
        self.grace = grace
        self.root = spool.root
        self.findings: list[Finding] = []
        self.places: dict[str, list[_Place]] = defaultdict(list)
        # The group shares the spool (the root is group rwx): then it must be
        # able to use every task in it.
        root_st = self.root_st = os.stat(self.root)
        self.shared = root_st.st_mode & 0o070 == 0o070
        self.group = root_st.st_gid
        self.types: set[str] = set()
        self._alive: dict[str, bool] = {}

    # ------------------------------------------------------------------ helpers

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    def add(self, kind: str, path: str, message: str) -> Finding:
        finding = Finding(kind, self.rel(path), message)
        self.findings.append(finding)
        return finding

    def quarantine(self, finding: Finding, path: str) -> None:
        """Move *path* (a symlink is moved, not followed) to quarantine/."""
        if not self.repair:
            return
        try:
            dest = self.spool.quarantine(path, f"fsck: {finding.kind}: {finding.message}")
        except PermissionError as exc:  # not this user's to move: the others are still repaired
            finding.action = f"not quarantined: {exc.strerror} (its owner or root can)"
            return
        finding.action = f"quarantined as {self.rel(dest)}" if dest else "gone meanwhile"

    def alive(self, server: str) -> bool:
        if server not in self._alive:
            self._alive[server] = self.spool.server_alive(server)
        return self._alive[server]

    def sound(self, path: str, st: os.stat_result, named: bool, bad_name: tuple[str, str], belongs: str,
              wrong_kind: str) -> bool:
        """The checks every entry gets: its name, its kind (a directory for
        servers and tasks, a regular file for types; a symlink is never
        followed) and its mode. False, after quarantining it, when the entry
        cannot be used."""
        if not named:
            self.quarantine(self.add(bad_name[0], path, f"{_what(path)} {bad_name[1]}"), path)
            return False
        want_dir = belongs != "a type file"
        if not (stat.S_ISDIR(st.st_mode) if want_dir else stat.S_ISREG(st.st_mode)):
            kind = "symlink" if stat.S_ISLNK(st.st_mode) else wrong_kind
            self.quarantine(self.add(kind, path, f"{_what(path)} where {belongs} belongs; never followed"), path)
            return False
        if st.st_mode & stat.S_IWOTH:
            self.add("permissions", path, f"writable by any user: fix with: chmod o-w {path}")
        return True

    # ------------------------------------------------------------------ passes

    def run(self) -> None:
        layout = layout_findings(self.root)
        if self.repair:
            _make_missing(self.root, layout)
        self.findings += layout
        self.check_root()
        self.check_types()
        self.check_tmp()
        self.check_locks()
        self.check_metrics()
        # Lifecycle order: a task moving forward meanwhile is seen again
        # further on (the same inode), never missed.
        self.check_tasks_in("enqueued")
        self.check_scheduled()
        self.check_tasks_in("running")
        self.check_tasks_in("done")
        self.settle_duplicates()
        for places in self.places.values():
            for place in places:
                self.check_state(place)

    def check_root(self) -> None:
        for name, path, st in _entries(self.root):
            if name == SETTINGS and stat.S_ISREG(st.st_mode):
                self.readable_by_group(path, st, "every command of its members fails on it")
            if name in ROOT_ENTRIES:
                continue
            # SETTINGS + ".tmp": what earlier versions staged it as (one name for every writer).
            if fsutil.is_staging(name, SETTINGS) or name == SETTINGS + ".tmp":
                self.staging(path, st, "spoolq init")
                continue
            finding = self.add("unknown-entry", path, f"{_what(path)} that is not part of a spool")
            self.quarantine(finding, path)

    def staging(self, path: str, st: os.stat_result, command: str) -> None:
        """A staging file of *command* (a write not yet renamed in place): in
        progress while it is younger than the grace; older, a leftover of
        an interrupted write, quarantined."""
        if self.spool.clock() - st.st_mtime <= self.grace:
            return
        finding = self.add("leftover-tmp", path, f"staging file of an interrupted '{command}'")
        self.quarantine(finding, path)

    def check_types(self) -> None:
        for name, path, st in _entries(self.spool.layout.types):
            if name.startswith("."):
                self.staging(path, st, "spoolq register")
                continue
            type_name = name[:-5]
            named = name.endswith(".json") and _valid(check_type, type_name)
            if not self.sound(path, st, named, ("unknown-entry", "that is not a type file (<TYPE>.json)"),
                              "a type file", "corrupt-type"):
                continue
            self.readable_by_group(path, st, "its members' commands and workers cannot read the type")
            try:
                self.spool.get_type(type_name)
            except (SpoolError, OSError) as exc:
                if isinstance(exc, SpoolError):
                    message = str(exc).replace(path + " ", "")
                else:
                    message = f"cannot be read ({exc.strerror}): register the type again"
                finding = self.add("corrupt-type", path, message)
                self.quarantine(finding, path)
                continue
            self.types.add(type_name)

    def check_tmp(self) -> None:
        now = self.spool.clock()
        stale = []
        for name, path, st in _entries(self.spool.layout.tmp):
            if name.startswith(".trash."):
                stale.append(self.add("stale-tmp", path, "left by an interrupted delete"))
            elif now - st.st_mtime > self.grace:
                age = now - st.st_mtime
                stale.append(self.add("stale-tmp", path, f"staging never published ({age:.0f} s old; grace {self.grace:g} s)"))
        if stale and self.repair:
            sweeps.clean_tmp(self.spool, grace=self.grace)
            for finding in stale:
                gone = not os.path.lexists(os.path.join(self.root, finding.path))
                finding.action = "removed" if gone else None

    def check_locks(self) -> None:
        """Lock files the spool's group cannot open would stop its members
        at their first enqueue (or a worker at its start)."""
        locks = self.spool.layout.locks
        for name, path, st in [*_entries(locks), *_entries(os.path.join(locks, "servers"))]:
            if stat.S_ISREG(st.st_mode):
                self.readable_by_group(path, st, "its members cannot lock it")

    def readable_by_group(self, path: str, st: os.stat_result, why: str) -> None:
        """On a spool its group shares, a file all its members read (spool.json,
        a type file, a lock file) must be in the spool's group and readable
        by it, or *why*. --repair gives the group access to what this user
        owns; a file in another group is reported with the chgrp (fsck
        changes no owner)."""
        mode = stat.S_IMODE(st.st_mode)
        if not self.shared or (st.st_gid == self.group and mode & 0o040) or mode & 0o004:
            return  # (readable by everyone: the members too, whatever its group)
        fixes = [f"chgrp {self.group} {path}"] if st.st_gid != self.group else []
        fixes += [] if mode & 0o040 else [f"chmod g+r {path}"]
        finding = self.add(
            "group-access", path,
            f"not readable by the spool's group {self.group} (group {st.st_gid}, mode {mode:04o}): {why}: "
            f"fix with: {' && '.join(fixes)}",
        )
        if self.repair and st.st_gid == self.group and st.st_uid == os.geteuid():
            os.chmod(path, mode | 0o060, follow_symlinks=False)
            finding.action = "made group-readable"

    def check_metrics(self) -> None:
        """``metrics/<SERVER>.json``: each server's counters (contract §12.5),
        and the staging file of a save in progress (``.<SERVER>.json.tmp``)."""
        directory = self.spool.layout.path(METRICS_DIR)
        st = _lstat(directory)
        if st is None:
            return  # made on first use
        if not stat.S_ISDIR(st.st_mode):
            kind = "symlink" if stat.S_ISLNK(st.st_mode) else "unknown-entry"
            self.quarantine(self.add(kind, directory, f"{_what(directory)} where the metrics directory belongs"),
                            directory)
            return
        if st.st_mode & stat.S_IWOTH:
            self.add("permissions", directory, f"writable by any user: fix with: chmod o-w {directory}")
        for name, path, est in _entries(directory):
            if name.startswith(".") and name.endswith(".json.tmp") and stat.S_ISREG(est.st_mode):
                continue  # a save in progress, or interrupted: the next save replaces it
            server = server_of(name)
            if server is None or not _valid(check_server, server) or not stat.S_ISREG(est.st_mode):
                what = "not a metrics file (<SERVER>.json)" if stat.S_ISREG(est.st_mode) else "never followed"
                kind = "symlink" if stat.S_ISLNK(est.st_mode) else "unknown-entry"
                self.quarantine(self.add(kind, path, f"{_what(path)}: {what}"), path)
                continue
            try:
                load(self.spool.layout, server)
            except ValueError as exc:
                finding = self.add("corrupt-metrics", path, f"{exc}: its server counts from zero once it is set aside")
                self.quarantine(finding, path)

    def check_tasks_in(self, where: str) -> None:
        directory = self.spool.layout.path(where)
        for name in _listdir(directory):
            self.check_task(where, os.path.join(directory, name), None)

    def check_scheduled(self) -> None:
        for server, sdir, st in _entries(self.spool.layout.scheduled):
            if not self.sound(sdir, st, _valid(check_server, server), ("bad-name", "that is not named like a server"),
                              "a server directory", "not-a-directory"):
                continue
            for name in _listdir(sdir):
                self.check_task("scheduled", os.path.join(sdir, name), server)

    # ------------------------------------------------------------------ one task directory

    def check_task(self, where: str, path: str, server_dir: str | None) -> None:
        name = os.path.basename(path)
        parts = split_task_name(name)
        st = _lstat(path)
        if st is None:
            return
        if not self.sound(path, st, parts is not None, ("bad-name", "not named TYPE:ID; not a task"),
                          "a task directory", "not-a-directory"):
            return
        assert parts is not None
        try:
            dfd = fsutil.open_dir(path)
        except FileNotFoundError:
            return
        except PermissionError:
            # A directory all the same: its owner's umask kept the group out.
            self.add("group-access", path,
                     f"not usable by the spool's group (mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}): "
                     f"its owner or root must run: chmod -R g+rwX {path}")
            return
        except OSError as exc:
            finding = self.add("not-a-directory", path, f"cannot be opened: {exc.strerror}")
            self.quarantine(finding, path)
            return
        try:
            if not _lock(dfd, fcntl.LOCK_EX if self.repair else fcntl.LOCK_SH):
                pass  # a writer holds it for long: look anyway, repairs re-check under the lock
            if _moved(path, dfd):
                return  # a worker moved it on meanwhile
            verdict = self._inspect(path, dfd, where, parts, server_dir)
            st = os.fstat(dfd)
        finally:
            os.close(dfd)  # releases the lock
        if verdict is None:
            return
        if isinstance(verdict, Finding):
            self.quarantine(verdict, path)
            return
        inode = (st.st_dev, st.st_ino)
        self.places[name].append(_Place(where, path, name, parts[0], parts[1], server_dir, inode, verdict))

    def _inspect(
        self, path: str, dfd: int, where: str, parts: tuple[str, str], server_dir: str | None,
    ) -> Finding | dict[str, Any] | None:
        """Look into a task directory (opened and locked as *dfd*): the
        finding that condemns it as a whole, or its status document (a claim
        made by its move alone read as recorded, as the spool reads it)."""
        if self.repair:
            self._settle_leftovers(path, dfd)
        entries = {}
        for entry in os.listdir(dfd):
            try:
                entries[entry] = os.stat(entry, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
        dir_st = os.fstat(dfd)
        self._group_access(path, dir_st, dfd, directory=True)
        root_st = self.root_st
        # What a start checks before it loads the input (it quarantines such a task then).
        problem = task_trust_problem(path, dir_st, root_st)
        if problem is not None:
            self.add("permissions", path, f"its input would not be loaded: {problem}")
        for entry, st in sorted(entries.items()):
            epath = os.path.join(path, entry)
            if entry in TASK_FILES:
                if stat.S_ISLNK(st.st_mode):
                    return self.add("symlink", path, f"{entry} is a symlink (to {_target(epath)}); never followed")
                if not stat.S_ISREG(st.st_mode):
                    return self.add("incomplete", path, f"{entry} is {_what(epath)}, not a regular file")
                if entry in INPUT_NAMES:
                    problem = task_trust_problem(epath, st, root_st)
                    if problem is not None:
                        self.add("permissions", epath, f"would not be loaded: {problem}")
                elif st.st_mode & stat.S_IWOTH:
                    self.add("permissions", epath, f"writable by any user: fix with: chmod o-w {epath}")
                self._group_access(epath, st, dfd, name=entry)
            elif (entry in RUN_FILES or is_output_file(entry)) and stat.S_ISREG(st.st_mode):
                if st.st_mode & stat.S_IWOTH:
                    self.add("permissions", epath, f"writable by any user: fix with: chmod o-w {epath}")
                # Only its run writes it: the group needs to read it. (A run
                # killed between a part's create and its chmod leaves it
                # without the group's write, which nobody needs.)
                self._group_access(epath, st, dfd, name=entry, need=0o040)
            elif entry in TASK_LEFTOVERS:
                what = "an interrupted status write" if entry.startswith(STATUS) else "an interrupted response write"
                self.add("leftover-tmp", epath, f"left by {what}")
            else:
                finding = self.add("unknown-entry", epath, f"{_what(epath)} that is not part of a task")
                self.quarantine(finding, epath)
        if STATUS not in entries:
            return self.add("incomplete", path, "no status.json")
        try:
            doc = read_status(dfd, path, claimed_in=server_dir)
        except CorruptTask as exc:
            return self.add("corrupt-status", path, str(exc).replace(path + "/", "").replace(path + " ", ""))
        if (doc.get("type"), doc.get("id")) != parts:
            return self.add(
                "status-mismatch", path,
                f"status.json is for {doc.get('type')!r}/{doc.get('id')!r}, the directory for {parts[0]}/{parts[1]}",
            )
        input_name = doc.get("input") or INPUT_PICKLE
        if input_name not in INPUT_NAMES:
            return self.add("corrupt-status", path, f"status.json names an unknown input file {str(input_name)[:40]!r}")
        if input_name not in entries:
            return self.add("incomplete", path, f"no {input_name}")
        if LOG not in entries:
            return self.add("incomplete", path, "no log")
        return doc

    def _group_access(self, path: str, st: os.stat_result, dfd: int, *, name: str | None = None,
                      directory: bool = False, need: int | None = None) -> None:
        """On a spool its group shares, every task directory and file must
        be usable by the group (*need*: the mode bits it needs; read and
        write, and search for a directory, unless given): a worker that
        cannot write a task fails it forever, a producer that cannot read it
        cannot see it. --repair fixes the modes of what this user owns."""
        if need is None:
            need = 0o070 if directory else 0o060
        if not self.shared or st.st_mode & need == need:
            return
        finding = self.add(
            "group-access", path,
            f"not usable by the spool's group (mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}): "
            f"fix with: chmod g+{''.join(c for c, bit in (('r', 0o040), ('w', 0o020), ('x', 0o010)) if need & bit)} {path}",
        )
        if self.repair and st.st_uid == os.geteuid():
            mode = stat.S_IMODE(st.st_mode) | need
            if directory:
                os.fchmod(dfd, mode)
            else:
                os.chmod(name or path, mode, dir_fd=dfd, follow_symlinks=False)
            finding.action = f"mode set to {mode:04o}"

    def _settle_leftovers(self, path: str, dfd: int) -> None:
        """Under the task's exclusive lock: an interrupted status write is
        put in place if it was logged (the spool's roll-forward), else set
        aside in quarantine/; a response.tmp is quarantined."""
        try:
            tmp_st = os.stat(STATUS + ".tmp", dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            tmp_st = None
        if tmp_st is not None and stat.S_ISREG(tmp_st.st_mode):
            finding = self.add("leftover-tmp", os.path.join(path, STATUS + ".tmp"), "left by an interrupted status write")
            copy = self._link_aside(dfd, STATUS + ".tmp", os.path.basename(path))
            roll_forward(dfd, durable=self.spool.durable)
            try:
                applied = os.stat(STATUS, dir_fd=dfd, follow_symlinks=False).st_ino == tmp_st.st_ino
            except FileNotFoundError:
                applied = False
            if applied:
                os.unlink(copy)
                finding.action = "completed: the write was logged, so it is now status.json"
            else:
                with open(copy + ".reason", "w", encoding="utf-8", errors="backslashreplace") as fh:
                    fh.write(f"{path}/{STATUS}.tmp: fsck: a status write that was never logged (never happened)\n")
                finding.action = f"never logged, so never happened: set aside as {self.rel(copy)}"
        elif tmp_st is not None:
            finding = self.add("leftover-tmp", os.path.join(path, STATUS + ".tmp"), f"{_what(os.path.join(path, STATUS + '.tmp'))}")
            self.quarantine(finding, os.path.join(path, STATUS + ".tmp"))
        leftover = os.path.join(path, RESPONSE + ".tmp")
        if os.path.lexists(leftover):
            finding = self.add("leftover-tmp", leftover, "left by an interrupted response write")
            self.quarantine(finding, leftover)

    def _link_aside(self, dfd: int, name: str, task: str) -> str:
        stamp = datetime.fromtimestamp(self.spool.clock(), timezone.utc).strftime("%Y%m%dT%H%M%S")
        dest = self.spool.layout.path("quarantine", f"{task[:180]}.{name}.{stamp}.{secrets.token_hex(3)}")
        os.link(name, dest, src_dir_fd=dfd, follow_symlinks=False)
        return dest

    # ------------------------------------------------------------------ across directories

    def settle_duplicates(self) -> None:
        """The same task in two places: keep the newest life (highest claim
        number, then latest update, then furthest along), quarantine the rest."""
        for name, places in self.places.items():
            if len(places) < 2:
                continue
            # One directory met twice (it moved on during the scan): keep
            # the later sighting.
            seen: dict[tuple[int, int], _Place] = {}
            for place in places:
                seen[place.inode] = place
            places[:] = list(seen.values())
            if len(places) < 2:
                continue
            places.sort(key=lambda p: (_int(p.doc.get("claim")), str(p.doc.get("updated_at")), _ORDER[p.where]))
            keep = places[-1]
            for place in places[:-1]:
                finding = self.add(
                    "duplicate", place.path,
                    f"another copy of {name} is at {self.rel(keep.path)} (kept: it is the newer one)",
                )
                self.quarantine(finding, place.path)
            places[:] = [keep]

    def check_state(self, place: _Place) -> None:
        """The spool's own verdict on the task's state and place
        (:func:`spoolq.lifecycle.judge`, as the zombie sweep applies it),
        worded for fsck."""
        state, doc = place.state, place.doc
        if place.type not in self.types and not state.terminal:
            self.add(
                "unregistered-type", place.path,
                f"a {state.name} task of unregistered type {place.type}: it fails when claimed; "
                f"fix with: spoolq register {place.type} HANDLER",
            )
        verdict = judge(Place(place.where), state, doc.get("server"), place.server_dir, self.alive,
                        cancel_asked=doc.get("cancel") is not None)
        if verdict.verdict is Verdict.OK:
            return
        if verdict.verdict is Verdict.UNTRUSTED:
            self._untrusted(place, verdict.reason)
        elif verdict.verdict is Verdict.CANCEL:
            finding = self.add("orphan", place.path, f"{state.name}: cancel asked for, but server "
                               f"{doc.get('server')} is gone before it could carry it out")
            if self.repair:
                result = sweeps.finish_cancel(self.spool, place.path, expect_claim=_int(doc.get("claim")))
                finding.action = "FAILED: cancelled" if result is Action.FAILED else _ACTION_TEXT.get(result, str(result))
        elif verdict.verdict is Verdict.FINISH_MOVE:
            self._take(place, "wrong-state", f"{state.name} but still in {self.rel(os.path.dirname(place.path))}/: "
                       "a finish was interrupted before its move", verdict)
        elif place.where == "running" and state == State.ENQUEUED:
            self._take(place, "wrong-state", "ENQUEUED but still in running/: a re-enqueue was interrupted "
                       "before its move", verdict)
        else:
            server = place.server_dir if place.where == "scheduled" else doc.get("server")
            what = {
                State.SCHEDULED: "claimed" if place.where == "scheduled" else "being started",
            }.get(state, "started")
            self._take(place, "orphan", f"{state.name}: {what} by server {server}, which is gone", verdict)

    def _untrusted(self, place: _Place, message: str) -> None:
        finding = self.add("wrong-state", place.path, message)
        self.quarantine(finding, place.path)

    def _take(self, place: _Place, kind: str, message: str, verdict: Judgement) -> None:
        """Re-enqueue (or fail, or complete the finish of) a task through the
        spool's take-away, which locks the task and re-checks its claim."""
        finding = self.add(kind, place.path, message)
        if not self.repair:
            return
        try:
            if verdict.charge:  # a dead server's run: its leftovers are nobody's, kill them
                result = sweeps.take_from_run(
                    self.spool, place.path, verdict.reason, expect_claim=_int(place.doc.get("claim")),
                    kill_leftovers=True,
                )
            else:
                result = self.spool.take_away(
                    place.path, verdict.reason, charge=False, expect_claim=_int(place.doc.get("claim")),
                )
        except CorruptTask as exc:
            finding.message += f" (and now: {exc})"
            self.quarantine(finding, place.path)
            return
        except OSError as exc:
            finding.message += f" (repair failed: {exc})"
            return
        finding.action = _ACTION_TEXT.get(result, str(result))


_ACTION_TEXT = {
    Action.BUSY: "processes of its run are still alive; left alone",
    Action.REENQUEUED: "re-enqueued",
    Action.FAILED: "FAILED: no restarts left",
    Action.FINISHED_MOVE: "moved to done/",
    Action.GONE: "changed meanwhile; left alone",
}


# --------------------------------------------------------------------------- entry points


def check(spool: Spool, *, repair: bool = False, tmp_grace: float = TMP_GRACE,
          found: list[Finding] | None = None) -> FsckReport:
    """Check *spool*; with *repair*, fix what can be fixed (see the module
    docstring), then check again read-only to tell what remains. *found*:
    what :func:`open_spool` found (and repaired) before, reported first."""
    checker = _Checker(spool, repair, tmp_grace)
    checker.findings += found or []
    checker.run()
    if repair:
        again = _Checker(spool, False, tmp_grace)
        again.run()
        remaining, tasks = again.findings, sum(len(p) for p in again.places.values())
    else:
        remaining, tasks = list(checker.findings), sum(len(p) for p in checker.places.values())
    quarantined = sum(1 for n in _listdir(spool.layout.quarantine_dir) if not n.endswith(".reason"))
    return FsckReport(spool.root, repair, checker.findings, remaining, tasks, quarantined)


def run_fsck(root: str | None, repair: bool, out: TextIO = sys.stdout) -> int:
    """``spoolq fsck``: one line per finding (``kind: path: message[ ->
    action]``) and a summary; 0 when the spool is consistent (after repair),
    1 otherwise."""
    path = resolve_root(root)
    spool, found = open_spool(path, repair=repair)
    if spool is None:
        for finding in found:
            print(finding, file=out)
        print(f"fsck {path}: {len(found)} problem(s) in the spool's layout; fix them, then run fsck again", file=out)
        return 1
    report = check(spool, repair=repair, found=found)
    for finding in report.findings:
        print(finding, file=out)
    printed = {(f.kind, f.path) for f in report.findings if f.action is None}
    if repair:
        for finding in report.remaining:
            if (finding.kind, finding.path) not in printed:
                print(f"{finding} (found after repair)", file=out)
    summary = f"fsck {path}: {report.tasks} task(s), {len(report.findings)} problem(s)"
    if repair:
        summary += f", {report.repaired} repaired, {report.problems_remaining} remain"
    summary += f"; {report.quarantined} entr{'y' if report.quarantined == 1 else 'ies'} in quarantine/"
    if not report.ok and not repair:
        summary += "; 'spoolq fsck --repair' fixes what it can"
    print(summary, file=out)
    return 0 if report.ok else 1


# --------------------------------------------------------------------------- small helpers


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _entries(directory: str) -> Iterator[tuple[str, str, os.stat_result]]:
    """(name, path, lstat) of each entry still there, sorted by name."""
    for name in _listdir(directory):
        path = os.path.join(directory, name)
        st = _lstat(path)
        if st is not None:
            yield name, path, st


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _what(path: str) -> str:
    st = _lstat(path)
    if st is None:
        return "an entry (gone)"
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return f"a symlink (to {_target(path)})"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return f"a file ({st.st_size} bytes)"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device node"


def _target(path: str) -> str:
    try:
        return repr(os.readlink(path))
    except OSError:
        return "?"


def _int(value: Any) -> int:
    return value if isinstance(value, int) else -1


def _valid(check: Any, value: Any) -> bool:
    try:
        check(value)
        return True
    except SpoolqError:
        return False


def _lock(fd: int, how: int) -> bool:
    """flock *fd*, waiting at most a few seconds for a writer to finish."""
    deadline = time.monotonic() + _LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)


def _moved(path: str, dfd: int) -> bool:
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return True
    st = os.fstat(dfd)
    return (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev)


__all__ = ["Finding", "FsckReport", "TMP_GRACE", "check", "layout_findings", "open_spool", "run_fsck"]
