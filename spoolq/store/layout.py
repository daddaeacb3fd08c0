"""The spool's directory tree: where everything is, its settings, and the
checks that make it safe to use.

::

    ROOT/spool.json                 settings (max_queue, durable, max_input_bytes)
    ROOT/types/<TYPE>.json          one file per registered task type
    ROOT/tmp/                       staging and trash; never read as tasks
    ROOT/enqueued/<TYPE>:<ID>/      waiting
    ROOT/scheduled/<SERVER>/<TYPE>:<ID>/   claimed by SERVER, not started
    ROOT/running/<TYPE>:<ID>/       started (RUNNING or PAUSED)
    ROOT/done/<TYPE>:<ID>/          FINISHED or FAILED; mtime = finishing time
    ROOT/quarantine/                what could not be trusted; never deleted
    ROOT/locks/                     enqueue.lock, servers/<SERVER>.lock

:func:`resolve_root` is the one place the spool root is chosen;
:func:`layout_problems` the one list of trust checks, which opening a spool
and ``spoolq fsck`` share.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ..errors import CrossDevice, NoSpool, SpoolError, UnsafeSpool
from ..lifecycle import Place
from . import fsutil

log = logging.getLogger("spoolq.store")

DEFAULT_ROOT = "/var/spool/spoolq"
ROOT_ENV = "SPOOLQ_ROOT"
STATE_DIRS = ("types", "tmp", "enqueued", "scheduled", "running", "done", "quarantine", "locks")
SETTINGS = "spool.json"
SPOOL_FORMAT = 1
DEFAULT_MAX_INPUT = 64 << 20
DIR_MODE = 0o2770  # group members produce; others get nothing; setgid keeps the spool's group


def resolve_root(root: str | os.PathLike[str] | None = None) -> str:
    """The spool root: *root* if given, else ``$SPOOLQ_ROOT``, else
    ``/var/spool/spoolq``; always absolute."""
    return os.path.abspath(os.fspath(root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT))


@dataclass(frozen=True)
class Settings:
    """``spool.json``."""

    max_queue: int = 0  # most ENQUEUED tasks at once; 0 = unlimited
    durable: bool = True  # fsync every change before it is acknowledged
    max_input_bytes: int = DEFAULT_MAX_INPUT

    def to_json(self) -> dict[str, Any]:
        return {
            "format": SPOOL_FORMAT,
            "max_queue": self.max_queue,
            "durable": self.durable,
            "max_input_bytes": self.max_input_bytes,
        }


@dataclass(frozen=True)
class LayoutProblem:
    """One thing wrong with the spool's skeleton. ``kind`` is one of
    missing-dir, unsafe-dir, cross-device, ownership, permissions; ``rel`` the
    path relative to the root ("." for the root); ``fix`` a command, if any."""

    kind: str
    rel: str
    message: str  # says what the path is: "writable by any user (…)", "a symlink: …"
    fix: str | None = None

    def as_error(self, root: str) -> SpoolError:
        path = os.path.normpath(os.path.join(root, self.rel))
        if self.kind == "missing-dir":
            return NoSpool(root, None if self.rel == "." else self.rel)
        error = CrossDevice if self.kind == "cross-device" else UnsafeSpool
        return error(path, f"{path} is {self.message}", self.fix)


def _mode_problem(rel: str, path: str, st: os.stat_result) -> LayoutProblem | None:
    if st.st_mode & stat.S_IWOTH:
        return LayoutProblem(
            "permissions", rel,
            f"writable by any user (mode {stat.S_IMODE(st.st_mode):04o}); pickles run as code in the worker",
            f"chmod o-w {path}",
        )
    return None


def layout_problems(root: str) -> list[LayoutProblem]:
    """Every problem of the spool's skeleton at *root*, in a fixed order:

    * the root and each state directory must exist and be real directories
      (not symlinks);
    * others may not write them (pickles are code);
    * all must share one filesystem (tasks move by rename, never by copy);
    * state directories are owned by the root's owner (or by root).
    """
    out: list[LayoutProblem] = []
    try:
        root_st = os.stat(root)
    except FileNotFoundError:
        return [LayoutProblem("missing-dir", ".", "missing")]
    if not stat.S_ISDIR(root_st.st_mode):
        return [LayoutProblem("unsafe-dir", ".", "not a directory: a spool root must be one")]
    problem = _mode_problem(".", root, root_st)
    if problem:
        out.append(problem)
    for name in STATE_DIRS:
        path = os.path.join(root, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            out.append(LayoutProblem("missing-dir", name, "missing"))
            continue
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
            out.append(LayoutProblem("unsafe-dir", name, f"{what}: it must be a real directory, not a symlink or file"))
            continue
        problem = _mode_problem(name, path, st)
        if problem:
            out.append(problem)
        if st.st_dev != root_st.st_dev:
            out.append(LayoutProblem(
                "cross-device", name,
                f"on another filesystem than {root}: tasks move by rename, so every spool directory "
                "must live on one filesystem",
                f"umount {path} (or move the spool onto one filesystem)",
            ))
        if st.st_uid != root_st.st_uid and st.st_uid != 0:
            out.append(LayoutProblem(
                "ownership", name, f"owned by uid {st.st_uid}, the spool root by uid {root_st.st_uid}",
                f"chown -R {root_st.st_uid} {root}",
            ))
    servers = os.path.join(root, "locks", "servers")
    if os.path.isdir(os.path.join(root, "locks")) and not os.path.lexists(servers):
        out.append(LayoutProblem("missing-dir", "locks/servers", "missing"))
    return out


class Layout:
    """The paths of one spool, and the few operations on the tree as a whole
    (settings, creating it, quarantining an entry)."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = resolve_root(root)
        self.tmp = self.path("tmp")
        self.enqueued = self.path("enqueued")
        self.scheduled = self.path("scheduled")
        self.running = self.path("running")
        self.done = self.path("done")
        self.quarantine_dir = self.path("quarantine")
        self.types = self.path("types")
        self.locks = self.path("locks")
        # The spool-wide lock (docs/design.md, "Locks"): one object per
        # Layout, so every user in this process shares its re-entrancy.
        self.enqueue_lock = fsutil.FlockLock(self.path("locks", "enqueue.lock"))
        self.settings_file = self.path(SETTINGS)

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def server_dir(self, server: str) -> str:
        return self.path("scheduled", server)

    def server_lock(self, server: str) -> str:
        return self.path("locks", "servers", f"{server}.lock")

    def place_dir(self, place: Place, server: str | None = None) -> str:
        """The directory of *place* (``scheduled/<server>`` for SCHEDULED)."""
        if place is Place.SCHEDULED:
            if server is None:
                raise ValueError("scheduled/ needs a server")
            return self.server_dir(server)
        return self.path(place.value)

    def task_path(self, place: Place, name: str, server: str | None = None) -> str:
        return os.path.join(self.place_dir(place, server), name)

    def place_of_path(self, path: str) -> tuple[Place, str | None] | None:
        """(place, server) of a task directory path in this spool, or None."""
        parent = os.path.dirname(path)
        if os.path.dirname(parent) == self.scheduled:
            return Place.SCHEDULED, os.path.basename(parent)
        for place in (Place.ENQUEUED, Place.RUNNING, Place.DONE):
            if parent == self.path(place.value):
                return place, None
        return None

    # ------------------------------------------------------------------ checks and settings

    def check(self) -> None:
        """Raise the first :func:`layout_problems` finding as an error
        (NoSpool, UnsafeSpool or CrossDevice): a spool is not used until it
        is complete and safe."""
        problems = layout_problems(self.root)
        if problems:
            raise problems[0].as_error(self.root)

    def read_settings(self) -> Settings:
        try:
            with open(self.settings_file, "rb") as fh:
                raw = dict(json.load(fh))
        except FileNotFoundError:
            return Settings()
        except (ValueError, TypeError) as exc:
            raise SpoolError(f"{self.settings_file} is not valid JSON ({exc})") from None
        return Settings(
            max_queue=int(raw.get("max_queue", 0)),
            durable=bool(raw.get("durable", True)),
            max_input_bytes=int(raw.get("max_input_bytes", DEFAULT_MAX_INPUT)),
        )

    def create(self) -> None:
        """Create the tree (idempotent). New directories get :data:`DIR_MODE`
        minus the umask; an existing directory keeps the mode its operator gave it."""
        mask = os.umask(0)
        os.umask(mask)
        for sub in ("", *STATE_DIRS, os.path.join("locks", "servers")):
            directory = self.path(sub) if sub else self.root
            try:
                os.mkdir(directory, 0o770)
            except FileExistsError:
                continue
            # mkdir ignores the setgid bit: set it so entries keep the spool's group.
            os.chmod(directory, DIR_MODE & ~mask)

    def write_settings(self, settings: Settings) -> None:
        """Replace ``spool.json`` atomically and durably (tmp + fsync + rename)."""
        dfd = fsutil.open_dir(self.root)
        try:
            data = json.dumps(settings.to_json(), indent=1).encode() + b"\n"
            fsutil.write_new_replacing(dfd, SETTINGS + ".tmp", data, sync=True)
            os.rename(SETTINGS + ".tmp", SETTINGS, src_dir_fd=dfd, dst_dir_fd=dfd)
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # ------------------------------------------------------------------ quarantine

    def quarantine(self, path: str, reason: str, *, now: float, durable: bool) -> str | None:
        """Move *path* (whatever it is; a symlink is moved, not followed) to
        ``quarantine/`` with a ``.reason`` note beside it. Never deletes.
        Returns the new path, or None if *path* was gone."""
        base = os.path.basename(path)[:200]  # room for the suffixes within NAME_MAX
        stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%S")
        dest = self.path("quarantine", f"{base}.{stamp}.{secrets.token_hex(3)}")
        try:
            os.rename(path, dest)
        except FileNotFoundError:
            return None
        with open(dest + ".reason", "w", encoding="utf-8", errors="backslashreplace") as fh:  # names may not be UTF-8
            fh.write(f"{path}: {reason}\n")
        if durable:
            fsutil.fsync_dir(os.path.dirname(path))
            fsutil.fsync_dir(self.quarantine_dir)
        log.warning("quarantined %s: %s", path, reason)
        return dest

    def trash_path(self, name: str) -> str:
        """A fresh name in ``tmp/`` to rename something into before removing
        it (so it vanishes from its place at once)."""
        return self.path("tmp", f".trash.{name}.{secrets.token_hex(6)}")
