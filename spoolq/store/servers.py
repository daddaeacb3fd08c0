"""Server liveness: ``locks/servers/<SERVER>.lock``.

A server is alive while some process holds an exclusive ``flock`` on its
lock file; the kernel drops the lock the moment the holder dies, so a dead
server is seen at once, never after a timeout. The holder writes its pid
into the file (for ``worker --drain`` of a running server); the pid is a
hint, the lock is the truth.
"""

from __future__ import annotations

import fcntl
import os
import stat
import time

from ..errors import ServerBusy, UnsafeSpool
from ..names import check_server
from . import fsutil
from .layout import Layout


class ServerLocks:
    """The server locks this process holds on one spool, and probes of others."""

    def __init__(self, layout: Layout, enqueue_lock: fsutil.FlockLock, *, durable: bool) -> None:
        self.layout = layout
        self.durable = durable
        self._enqueue_lock = enqueue_lock
        self._held: dict[str, int] = {}

    def hold(self, server: str, *, wait: float = 2.0) -> None:
        """Become *server*: take its lock for the life of this process and
        make sure ``scheduled/SERVER/`` exists. Raises ServerBusy when another
        process holds it; a sweeper's momentary probe is waited out for up to
        *wait* seconds."""
        check_server(server)
        if server in self._held:
            return
        fd = self._open_lock(server)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise ServerBusy(server, f"server {server!r} is already running on {self.layout.root}") from None
                time.sleep(0.02)
        try:
            _write_pid(fd)
            self._make_server_dir(server)
        except BaseException:
            os.close(fd)
            raise
        self._held[server] = fd

    def _open_lock(self, server: str) -> int:
        """Open (or create) *server*'s lock file; one the group can open,
        whatever this process's umask (the next holder may be another member,
        or the service user after root ran the worker by hand)."""
        path = self.layout.server_lock(server)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o660)
        except PermissionError:
            owner = _owner_of(path)
            raise ServerBusy(server, f"{path} cannot be opened (Permission denied; it belongs to {owner}): "
                                     f"remove it (rm {path}) while no server {server!r} runs") from None
        try:
            if os.fstat(fd).st_uid == os.geteuid():
                fsutil.share_with_group(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def keep(self, server: str) -> bool:
        """Check that the file at *server*'s lock path is still the one this
        process locked, and lock the new one when someone removed or replaced
        it (else the server looks dead: a sweep would take its tasks and kill
        its handlers, a second worker could start as it). False when another
        process holds the file now there: it took the server over."""
        fd = self._held.get(server)
        if fd is None:
            return False
        mine = os.fstat(fd)
        try:
            there = os.stat(self.layout.server_lock(server), follow_symlinks=False)
            if (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
                return True
        except FileNotFoundError:
            pass
        new = self._open_lock(server)
        try:
            fcntl.flock(new, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _write_pid(new)
        except BlockingIOError:
            os.close(new)
            return False
        except BaseException:
            os.close(new)
            raise
        self._held[server] = new
        os.close(fd)
        return True

    def _make_server_dir(self, server: str) -> None:
        """Create ``scheduled/SERVER/`` if missing, under the enqueue lock: so
        the set of server directories never changes while that lock is held,
        and a lookup under the lock cannot miss a task claimed into a
        brand-new server directory. A symlink there is refused."""
        path = self.layout.server_dir(server)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            with self._enqueue_lock:
                try:
                    # Plain 0770: the setgid bit is inherited from scheduled/,
                    # and asking for it is refused under RestrictSUIDSGID=yes.
                    os.mkdir(path, 0o770)
                    dfd = fsutil.open_dir(path)
                    try:
                        fsutil.share_with_group(dfd, directory=True)  # producers delete from it
                    finally:
                        os.close(dfd)
                except FileExistsError:
                    pass
                st = os.lstat(path)
            if self.durable:
                fsutil.fsync_dir(self.layout.scheduled)
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeSpool(path, f"{path} must be a real directory, not a symlink or file: move it away")

    def holds(self, server: str) -> bool:
        return server in self._held

    def release(self, server: str) -> None:
        """Stop being *server*: its lock is free, so sweepers treat what it
        still holds as abandoned."""
        fd = self._held.pop(server, None)
        if fd is not None:
            os.close(fd)

    def release_all(self) -> None:
        for server in list(self._held):
            self.release(server)

    def close_in_child(self) -> None:
        """In a process forked from the holder: close the inherited lock
        descriptors. The holder's locks stay (they belong to the open file,
        which the holder still has open); the child can no longer release
        them (flock LOCK_UN), nor keep a dead server looking alive."""
        for fd in self._held.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._held.clear()

    def alive(self, server: str) -> bool:
        """True while some process holds *server*'s lock."""
        if server in self._held:
            return True
        try:
            fd = os.open(self.layout.server_lock(server), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (OSError, ValueError):
            return False
        try:
            return fsutil.lock_taken(fd, exclusive=False)
        finally:
            os.close(fd)

    def pid_of(self, server: str) -> int:
        """The pid the live *server* wrote into its lock file (0 if unknown)."""
        try:
            with open(self.layout.server_lock(server), encoding="ascii") as fh:
                return int(fh.read().strip() or "0")
        except (OSError, ValueError):
            return 0

    def known(self) -> list[str]:
        """Every server that ever claimed here (has a scheduled/ directory)."""
        return sorted(os.listdir(self.layout.scheduled))


def _write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _owner_of(path: str) -> str:
    try:
        uid = os.stat(path, follow_symlinks=False).st_uid
    except OSError:
        return "another user"
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
