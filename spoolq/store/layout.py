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

import dataclasses
import errno
import json
import logging
import os
import stat
import struct
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from ..errors import CrossDevice, NoSpool, SpoolError, UnsafeSpool
from ..lifecycle import Place
from . import fsutil

if TYPE_CHECKING:
    from ..watch import ChangeWatch

log = logging.getLogger("spoolq.store")

DEFAULT_ROOT = "/var/spool/spoolq"
ROOT_ENV = "SPOOLQ_ROOT"
STATE_DIRS = ("types", "tmp", "enqueued", "scheduled", "running", "done", "quarantine", "locks")
SETTINGS = "spool.json"
SPOOL_FORMAT = 1
DEFAULT_MAX_INPUT = 64 << 20
DIR_MODE = 0o2770  # group members produce; others get nothing; setgid keeps the spool's group
PARENT_MODE = 0o755  # missing parents `init` creates: only their owner writes them


def resolve_root(root: str | os.PathLike[str] | None = None) -> str:
    """The spool root: *root* if given, else ``$SPOOLQ_ROOT``, else
    ``/var/spool/spoolq``; always absolute.

    An empty path, given or in a set ``$SPOOLQ_ROOT``, is refused
    (SpoolError), not taken for "the default": it is far more often a
    script's empty variable than a wish, and the default is the production
    spool."""
    if root is None:
        root = os.environ.get(ROOT_ENV)
        if root == "":
            raise SpoolError(f"{ROOT_ENV} is set but empty: set it to the spool's directory, or unset it "
                             f"for the default ({DEFAULT_ROOT})")
        if root is None:
            return DEFAULT_ROOT
    try:
        path = os.fsdecode(root)  # bytes, as os.listdir(b".") gives, are a path too
    except TypeError:
        raise SpoolError(f"the spool root must be a path, not {type(root).__name__}") from None
    if not path:
        raise SpoolError("the spool root given is empty: name the spool's directory")
    return os.path.abspath(path)


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
    missing-dir, unsafe-dir, cross-device, ownership, permissions,
    group-access; ``rel`` the path relative to the root ("." for the root);
    ``fix`` a command, if any. A *fatal* problem makes the spool unsafe or
    unusable (opening it is refused); the others only keep some of its users
    from working (fsck reports them)."""

    kind: str
    rel: str
    message: str  # says what the path is: "writable by any user (…)", "a symlink: …"
    fix: str | None = None
    fatal: bool = True

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
    writers = acl_writers(path, st)
    if writers:
        return LayoutProblem(
            "permissions", rel,
            f"writable by {', '.join(writers)} through an ACL; pickles run as code in the worker",
            f"setfacl -b -k {path}",
        )
    return None


def task_trust_problem(path: str, st: os.stat_result, root_st: os.stat_result) -> str | None:
    """Why a task's directory or input file at *path* (*st*: its stat) may
    hold what someone outside the spool's users put there, so its input must
    not be loaded; None if it may be trusted. The spool's own directories'
    rule (nobody else may write it, by mode bits or an ACL), and it belongs
    to the spool's group (which whatever a member makes inside the spool
    inherits), to the spool's owner, to root or to this process: a task planted by
    an outsider while the spool's modes were wrong keeps that outsider's
    group once the modes are fixed, and the fix must not make it run."""
    problem = _mode_problem(path, path, st)
    if problem is not None:
        return f"{path} is {problem.message}: fix with: {problem.fix}"
    if st.st_gid != root_st.st_gid and st.st_uid not in (root_st.st_uid, os.geteuid(), 0):
        return (f"{path} belongs to uid {st.st_uid} and group {st.st_gid}, neither the spool's "
                f"(uid {root_st.st_uid}, group {root_st.st_gid}): it was made outside the spool's group")
    return None


def root_writers(root: str) -> str | None:
    """Who, besides root, may write the spool at *root*: its owner when that
    is not root, and the members of its group when the group may write and
    is not root's; None when only root may. (Others, by mode bits or an
    ACL, are refused for everyone: :func:`layout_problems`.)"""
    import grp
    import pwd

    st = os.stat(root)
    who = []
    if st.st_uid != 0:
        try:
            who.append(f"its owner {pwd.getpwuid(st.st_uid).pw_name}")
        except KeyError:
            who.append(f"its owner uid {st.st_uid}")
    if st.st_gid != 0 and st.st_mode & stat.S_IWGRP:
        try:
            who.append(f"the members of group {grp.getgrgid(st.st_gid).gr_name}")
        except KeyError:
            who.append(f"the members of group {st.st_gid}")
    return " and ".join(who) or None


# POSIX ACLs in their extended-attribute form (linux/posix_acl_xattr.h):
# a 4-byte version (2), then 8-byte entries of tag (u16), perm (u16), id (u32).
_ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")
_ACL_USER, _ACL_GROUP, _ACL_MASK = 0x02, 0x08, 0x10
_ACL_WRITE = 0x02


def acl_writers(path: str, st: os.stat_result) -> list[str]:
    """Named users and groups that an ACL on *path* (*st*: its stat; its
    own ACL, or the default one new entries inherit) lets write: permissions
    the mode bits do not show. Its own owner and group, named again (as
    ``setfacl -m d:g:spoolq:rwx`` does to keep new files the group's), are
    no one new. Empty when there is no ACL, or the filesystem has none."""
    writers = []
    for name in _ACL_XATTRS:
        try:
            raw = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue  # no ACL (ENODATA), or none supported here
        entries = [struct.unpack_from("<HHI", raw, off) for off in range(4, len(raw) - 7, 8)]
        mask = next((perm for tag, perm, _ in entries if tag == _ACL_MASK), 0o7)
        for tag, perm, ident in entries:
            if tag in (_ACL_USER, _ACL_GROUP) and perm & mask & _ACL_WRITE:
                if ident == (st.st_uid if tag == _ACL_USER else st.st_gid):
                    continue
                writers.append(f"{'uid' if tag == _ACL_USER else 'gid'} {ident}")
    return writers


def _ancestor_problems(root: str) -> list[LayoutProblem]:
    """A directory above the root that others may write (and is not sticky)
    lets them move the whole spool aside and put their own in its place."""
    out = []
    parent = os.path.dirname(root)
    while True:
        try:
            st: os.stat_result | None = os.stat(parent)
        except OSError:
            st = None  # not made yet (init makes it): those above it count all the same
        if st is not None and st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            out.append(LayoutProblem(
                "permissions", ".",
                f"inside {parent}, which any user may write (mode {stat.S_IMODE(st.st_mode):04o}, not sticky): "
                "they could replace the whole spool",
                f"chmod o-w {parent} (or chmod +t {parent})",
            ))
        if parent == os.path.dirname(parent):
            break
        parent = os.path.dirname(parent)
    return out


# Watches that vouch for a passed layout check, by spool root, in this
# process (Layout.check_again); few, since each is an inotify instance and
# the kernel allows a user 128 of them by default.
_TRUST_WATCHES: dict[str, "ChangeWatch"] = {}
_TRUST_WATCHES_MAX = 4


def _trust_paths(root: str) -> dict[str, bool]:
    """What :func:`layout_problems` reads, as directories to watch and
    whether their entries count: the root's do (they are the state
    directories), the directories above it count only themselves."""
    paths = {root: True}
    parent = os.path.dirname(root)
    while True:
        paths[parent] = False
        if parent == os.path.dirname(parent):
            return paths
        parent = os.path.dirname(parent)


def _root_problems(root: str, root_st: os.stat_result | None) -> list[LayoutProblem]:
    """The problems of the root (*root_st*: its stat, None if it is not made
    yet) and of the directories above it: those that need no state
    directory to be seen, so `init` looks for them before it makes any."""
    if root_st is not None and not stat.S_ISDIR(root_st.st_mode):
        return [LayoutProblem("unsafe-dir", ".", "not a directory: a spool root must be one")]
    problem = _mode_problem(".", root, root_st) if root_st is not None else None
    return ([problem] if problem else []) + _ancestor_problems(root)


def layout_problems(root: str) -> list[LayoutProblem]:
    """Every problem of the spool's skeleton at *root*, in a fixed order:

    * the root and each state directory must exist and be real directories
      (not symlinks);
    * others may not write them (pickles are code);
    * all must share one filesystem (tasks move by rename, never by copy);
    * state directories are owned by the root's owner (or by root).
    """
    try:
        root_st = os.stat(root)
    except FileNotFoundError:
        return [LayoutProblem("missing-dir", ".", "missing")]
    out = _root_problems(root, root_st)
    if not stat.S_ISDIR(root_st.st_mode):
        return out
    shared = root_st.st_mode & 0o070 == 0o070  # the group may use the spool: so it must use all of it
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
            # Which of the two changed, only the operator knows: a root given
            # to root by mistake must not lead to giving root the whole spool.
            out.append(LayoutProblem(
                "ownership", name, f"owned by uid {st.st_uid}, the spool root by uid {root_st.st_uid}",
                f"chown {st.st_uid} {root} if the root's owner is the one that is wrong, "
                f"else chown -R {root_st.st_uid} {root}",
            ))
        if st.st_gid != root_st.st_gid and st.st_mode & stat.S_IWGRP:
            out.append(LayoutProblem(
                "ownership", name,
                f"writable by group {st.st_gid}, which is not the spool's group ({root_st.st_gid})",
                f"chgrp -R {root_st.st_gid} {root}",
            ))
        if shared and st.st_mode & 0o070 != 0o070:
            out.append(LayoutProblem(
                "group-access", name,
                f"not usable by the spool's group (mode {stat.S_IMODE(st.st_mode):04o}) although the spool root is: "
                "its members cannot enqueue or work there",
                f"chmod g+rwx {path}", fatal=False,
            ))
    servers = os.path.join(root, "locks", "servers")
    if os.path.isdir(os.path.join(root, "locks")) and not os.path.lexists(servers):
        out.append(LayoutProblem("missing-dir", "locks/servers", "missing"))
    return out


# The least value of each whole-number setting: max_queue 0 is "no limit".
_SETTING_MINIMUM = {"max_queue": 0, "max_input_bytes": 1}
# Far past any real use, but a bound: spool.json stays a file every JSON
# reader takes (`--max-queue 99999999999999999999999` was stored as is).
_SETTING_MAXIMUM = {"max_queue": 10**12, "max_input_bytes": 1 << 40}


def check_setting(key: str, value: object) -> int:
    """*value* if it is allowed for the whole-number setting *key*, else
    SpoolError: the one rule for ``spool.json``, ``Spool.init`` and the
    options of ``spoolq init``."""
    minimum, maximum = _SETTING_MINIMUM[key], _SETTING_MAXIMUM[key]
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise SpoolError(f"{key} must be a whole number from {minimum} to {maximum:,}, not {str(value)[:40]}")
    return value


def _setting(path: str, raw: dict[str, Any], key: str, default: int) -> int:
    try:
        return check_setting(key, raw.get(key, default))
    except SpoolError as exc:
        raise SpoolError(f"{path}: {exc}: fix or remove it") from None


def _flag(path: str, raw: dict[str, Any], key: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise SpoolError(f"{path}: {key} must be true or false, not {str(value)[:40]}: fix or remove it")
    return value


def _make_dir(path: str, owner: tuple[int, int] | None) -> None:
    """Make directory *path* unless it is there: mode :data:`DIR_MODE`
    whatever the umask and, with *owner* (uid, gid), theirs. An existing
    one keeps the mode and owner its operator gave it."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    # Through a descriptor, never the path: in a root its group may write,
    # a member could swap the new directory for a symlink to root's files.
    fd = fsutil.open_dir(path)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        # mkdir ignores the setgid bit and applies the umask: set the mode
        # outright (after the chown, which may clear setgid).
        os.fchmod(fd, DIR_MODE)
    finally:
        os.close(fd)


class Layout:
    """The paths of one spool, and the few operations on the tree as a whole
    (settings, creating it, quarantining an entry)."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = resolve_root(root)
        self.tmp = self.path("tmp")
        self.enqueued = self.path("enqueued")
        self.scheduled = self.path("scheduled")
        self._scheduled_prefix = self.scheduled + "/"
        self.running = self.path("running")
        self.done = self.path("done")
        self.quarantine_dir = self.path("quarantine")
        self.types = self.path("types")
        self.locks = self.path("locks")
        # The spool-wide lock (docs/design.md, "Locks"): one object per
        # Layout, so every user in this process shares its re-entrancy.
        self.enqueue_lock = fsutil.FlockLock(self.path("locks", "enqueue.lock"))
        self.settings_file = self.path(SETTINGS)
        # Every task path is made from these (a string concatenation, not an
        # os.path.join: names are checked and never hold a slash).
        self._place_dirs = {place: self.path(place.value) for place in Place if place is not Place.SCHEDULED}
        self._server_dirs: dict[str, str] = {}
        self._settings_seen: tuple[tuple[int, int, int] | None, Settings] | None = None

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def server_dir(self, server: str) -> str:
        path = self._server_dirs.get(server)
        if path is None:
            if len(self._server_dirs) > 1024:
                self._server_dirs.clear()
            path = self._server_dirs[server] = self.path("scheduled", server)
        return path

    def server_lock(self, server: str) -> str:
        return self.path("locks", "servers", f"{server}.lock")

    def place_dir(self, place: Place, server: str | None = None) -> str:
        """The directory of *place* (``scheduled/<server>`` for SCHEDULED)."""
        if place is Place.SCHEDULED:
            if server is None:
                raise ValueError("scheduled/ needs a server")
            return self.server_dir(server)
        return self._place_dirs[place]

    def task_path(self, place: Place, name: str, server: str | None = None) -> str:
        return self.place_dir(place, server) + "/" + name

    def server_of_path(self, path: str) -> str | None:
        """The server when *path* is in ``scheduled/<server>/``, else None."""
        if not path.startswith(self._scheduled_prefix):
            return None
        server, slash, name = path[len(self._scheduled_prefix):].partition("/")
        return server if slash and server and name and "/" not in name else None

    def place_of_path(self, path: str) -> tuple[Place, str | None] | None:
        """(place, server) of a task directory path in this spool, or None."""
        server = self.server_of_path(path)
        if server is not None:
            return Place.SCHEDULED, server
        parent = os.path.dirname(path)
        for place in (Place.ENQUEUED, Place.RUNNING, Place.DONE):
            if parent == self.path(place.value):
                return place, None
        return None

    # ------------------------------------------------------------------ checks and settings

    def check(self) -> None:
        """Raise the first fatal :func:`layout_problems` finding as an error
        (NoSpool, UnsafeSpool or CrossDevice): a spool is not used until it
        is complete and safe."""
        for problem in layout_problems(self.root):
            if problem.fatal:
                raise problem.as_error(self.root)

    def check_again(self) -> None:
        """:meth:`check` again, before input is unpickled: skipped when the
        last check in this process passed and the kernel has reported no
        change since to the root, a state directory or a directory above
        the root (mode, owner, ACL, a rename or removal, an entry of the
        root replaced). The watch is set before the check it vouches for,
        so a change during that check is reported to the next one. Where
        no watch can be set, every call checks."""
        from ..watch import ChangeWatch  # here: the quick CLI commands never start a task

        watch = _TRUST_WATCHES.get(self.root)
        if watch is not None and not watch.changed():
            return
        if watch is not None:
            watch.close()
        _TRUST_WATCHES.pop(self.root, None)
        watch = ChangeWatch(_trust_paths(self.root))
        try:
            self.check()
        except BaseException:
            watch.close()  # the next call checks again
            raise
        if watch.watching:
            if len(_TRUST_WATCHES) >= _TRUST_WATCHES_MAX:
                _TRUST_WATCHES.pop(next(iter(_TRUST_WATCHES))).close()
            _TRUST_WATCHES[self.root] = watch
        else:
            watch.close()

    def read_settings(self) -> Settings:
        """``spool.json``, every value checked (a symlink, FIFO or huge file
        there is refused, not followed, waited on or read whole)."""
        try:
            raw = json.loads(fsutil.read_file(None, self.settings_file, limit=1 << 16))
        except FileNotFoundError:
            return Settings()
        except (OSError, ValueError, RecursionError) as exc:
            what = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
                what = "it is a symlink, never followed"
            if isinstance(exc, PermissionError):
                # Its settings are fine, only its group or mode is not: never "remove it".
                try:
                    gid = os.stat(self.root).st_gid
                except OSError:
                    gid = None
                fix = f"chgrp {gid} {self.settings_file}; chmod g+r {self.settings_file}" if gid is not None else "fix its modes"
                raise SpoolError(f"{self.settings_file} cannot be read ({what}): give it to the spool's group "
                                 f"(its owner or root: {fix})") from None
            raise SpoolError(f"{self.settings_file} cannot be read ({what}): fix or remove it") from None
        if not isinstance(raw, dict):
            raise SpoolError(f"{self.settings_file} must hold a JSON object: fix or remove it")
        return Settings(
            max_queue=_setting(self.settings_file, raw, "max_queue", 0),
            durable=_flag(self.settings_file, raw, "durable", True),
            max_input_bytes=_setting(self.settings_file, raw, "max_input_bytes", DEFAULT_MAX_INPUT),
        )

    def settings_now(self) -> Settings:
        """:meth:`read_settings` as ``spool.json`` is now, read again only
        when the file changed (one ``lstat``): every change replaces it
        whole, as a new inode. A long-lived producer (a web application)
        applies a new queue limit from its next enqueue, not its restart."""
        try:
            st = os.lstat(self.settings_file)
            identity: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            identity = None
        seen = self._settings_seen
        if seen is not None and seen[0] == identity:
            return seen[1]
        settings = self.read_settings()
        self._settings_seen = (identity, settings)
        return settings

    def create(self) -> None:
        """Create the tree (idempotent). New directories get :data:`DIR_MODE`
        whatever the umask (the group shares the spool, as the docs promise);
        an existing directory keeps the mode its operator gave it.

        Missing parents of the root are created first, as ``mkdir -p`` does,
        but with mode :data:`PARENT_MODE` whatever the umask:
        only their owner may write them, so nobody else can rename the spool
        away and put a directory of their own in its place.

        Run as root on a root someone else owns (the spool's user, which
        packaging makes it with ``install -d``), what it makes is given to
        that owner and the root's group (:meth:`owner_of_new`).

        A root, or a directory above it, that others may write is refused
        (UnsafeSpool) before anything is made: a spool there could not be
        opened, and what was made would be left for the operator to remove."""
        try:
            root_st: os.stat_result | None = os.stat(self.root)
        except FileNotFoundError:
            root_st = None
        for problem in _root_problems(self.root, root_st):
            if problem.fatal:
                raise problem.as_error(self.root)
        missing = []
        parent = os.path.dirname(self.root)
        while not os.path.lexists(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        for directory in reversed(missing):
            try:
                os.mkdir(directory, PARENT_MODE)
            except FileExistsError:
                continue
            # Whatever the umask (077 made them 0700: the group could not reach the spool).
            fd = fsutil.open_dir(directory)
            try:
                os.fchmod(fd, PARENT_MODE)
            finally:
                os.close(fd)
        _make_dir(self.root, None)
        owner = self.owner_of_new()
        # metrics/ (contract §12.5) is not a state directory: a spool made
        # before it existed is complete without it, and gets it on first use.
        for sub in (*STATE_DIRS, os.path.join("locks", "servers"), "metrics"):
            _make_dir(self.path(sub), owner)
        # The spool-wide lock file, made now with the group's access, so that
        # no member's umask decides who may lock it later.
        try:
            fd = os.open(self.enqueue_lock.path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o660)
        except FileExistsError:
            return
        try:
            if owner is not None:
                os.fchown(fd, *owner)
            os.fchmod(fd, 0o660)
        finally:
            os.close(fd)

    def owner_of_new(self) -> tuple[int, int] | None:
        """Whom what this process makes in the spool must be given to, as
        (uid, gid) for ``fchown`` (-1: unchanged): as root, the root
        directory's owner and group, since its users cannot use what belongs
        to root. Anyone else may only give a file to a group of theirs: the
        root's group, where the root lacks the setgid bit that would give it
        (a root made by ``install -d``, or by an older tmpfiles.d line), so
        that a member whose own group is another (``spoolq init`` by a
        producer) does not leave ``spool.json`` unreadable to the others.
        None: nothing to change."""
        st = os.stat(self.root)
        if os.geteuid() == 0:
            return st.st_uid, st.st_gid
        if st.st_mode & stat.S_ISGID or st.st_gid == os.getegid() or st.st_gid not in os.getgroups():
            return None
        return -1, st.st_gid

    def change_settings(self, **changes: Any) -> Settings:
        """Store the settings of *changes* that are not None (the others keep
        their stored value) and return them all. Under the spool-wide lock,
        so changes made at once are made one after the other and none is
        lost. ``spool.json`` is written only when a value changes, or when
        there is none yet: a call that changes nothing writes nothing."""
        with self.enqueue_lock:
            stored = self.read_settings()
            wanted = dataclasses.replace(stored, **{k: v for k, v in changes.items() if v is not None})
            if wanted != stored or not os.path.lexists(self.settings_file):
                self._write_settings(wanted)
        return wanted

    def _write_settings(self, settings: Settings) -> None:
        """Replace ``spool.json`` atomically and durably (a staging file of
        this writer's own + fsync + rename); the caller holds the
        spool-wide lock (:meth:`change_settings`)."""
        dfd = fsutil.open_dir(self.root)
        tmp = fsutil.staging_name(SETTINGS)
        try:
            data = json.dumps(settings.to_json(), indent=1).encode() + b"\n"
            fsutil.write_new(dfd, tmp, data, sync=True, owner=self.owner_of_new())
            os.rename(tmp, SETTINGS, src_dir_fd=dfd, dst_dir_fd=dfd)
            os.fsync(dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)  # nothing half-written left behind
            except FileNotFoundError:
                pass  # never made, or already published
            raise
        finally:
            os.close(dfd)

    # ------------------------------------------------------------------ quarantine

    def quarantine(self, path: str, reason: str, *, now: float, durable: bool) -> str | None:
        """Move *path* (whatever it is; a symlink is moved, not followed) to
        ``quarantine/`` with a ``.reason`` note beside it. Never deletes.
        Returns the new path, or None if *path* was gone."""
        base = os.path.basename(path)[:200]  # room for the suffixes within NAME_MAX
        stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%S")
        dest = self.path("quarantine", f"{base}.{stamp}.{os.urandom(3).hex()}")
        # The note first: on a full disk it cannot be written, and then
        # nothing is moved (the item moved first was left beside an empty
        # note, and nothing said what it was or why).
        note = dest + ".reason"
        try:
            with open(note, "w", encoding="utf-8", errors="backslashreplace") as fh:  # names may not be UTF-8
                fh.write(f"{path}: {reason}\n")
            os.rename(path, dest)
        except BaseException as exc:
            try:
                os.unlink(note)
            except OSError:
                pass
            if isinstance(exc, FileNotFoundError) and exc.filename == path:
                return None
            raise
        if durable:
            fsutil.fsync_dir(os.path.dirname(path))
            fsutil.fsync_dir(self.quarantine_dir)
        log.warning("quarantined %s: %s", path, reason)
        return dest

    def trash_path(self, name: str) -> str:
        """A fresh name in ``tmp/`` to rename something into before removing
        it (so it vanishes from its place at once)."""
        return self.path("tmp", f".trash.{name}.{os.urandom(6).hex()}")
