"""The filesystem floor: the least work the spoolq layout needs, as plain Python.

This is the yardstick of the lifecycle benchmark. It keeps spoolq's on-disk
layout and state machine and nothing else: no locking between processes, no
recovery, no validation, no type registry, no leases, no watchers.

Layout (as spoolq's)::

    ROOT/tmp/<id>/              a task being built
    ROOT/enqueued/<id>/         input.pkl, status.json, log
    ROOT/scheduled/<server>/<id>/
    ROOT/running/<id>/          + response after store_response
    ROOT/done/<id>/

Per task:

    enqueue   mkdir tmp/<id>; create input.pkl, status.json, log;
              rename tmp/<id> -> enqueued/<id>
    claim     rename enqueued/<id> -> scheduled/<S>/<id>
              (ids come from one listdir of enqueued/, refreshed when used up)
    start     rename scheduled/<S>/<id> -> running/<id>;
              status rewrite (status.json.tmp + rename); log append
    response  create response, its MIME type an extended attribute of it
              (as spoolq since 2026-12: no status rewrite)
    finish    status rewrite (with the response's type, remembered in
              memory); log append; rename running/<id> -> done/<id>

Durable mode adds, and only adds, the fsyncs that make each step survive a
power cut once it returns:

    * every file written: fsync(fd) before close (and before the rename
      of a status.json.tmp over status.json); fdatasync for a log append;
    * every directory whose entries changed: the task dir (new files,
      status.json replaced) once per step, and both parents of each rename
      of a task dir.

That is 20 fsyncs per task: enqueue 6 (3 files, task dir, tmp/, enqueued/),
claim 2, start 5 (status, log, task dir, scheduled/S/, running/),
response 2 (response, task dir), finish 5 (status, log, task dir,
running/, done/). The fixed parent directories are opened once and their fds
kept, so a parent fsync costs exactly one syscall.

Files are written with os.open/os.write/os.close (the built-in open() adds
fstat, ioctl and lseek calls), so the floor is also the syscall floor.
"""

from __future__ import annotations

import json
import os
import pickle
import time

O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL
O_REWRITE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
O_APPEND = os.O_WRONLY | os.O_APPEND
O_DIR = os.O_RDONLY | os.O_DIRECTORY


class Floor:
    SUBDIRS = ("tmp", "enqueued", "scheduled", "running", "done")

    def __init__(self, root: str, durable: bool, server: str = "S"):
        self.root = root
        self.durable = durable
        self.server = server
        self._mime: dict[str, str] = {}  # a stored response's type, for the final status
        self.d_tmp = os.path.join(root, "tmp")
        self.d_enq = os.path.join(root, "enqueued")
        self.d_sch = os.path.join(root, "scheduled", server)
        self.d_run = os.path.join(root, "running")
        self.d_done = os.path.join(root, "done")
        for d in (self.d_tmp, self.d_enq, self.d_sch, self.d_run, self.d_done):
            os.makedirs(d, exist_ok=True)
        # Parent dirs are fixed: open each once, fsync through the kept fd.
        self.fd = {}
        if durable:
            for d in (self.d_tmp, self.d_enq, self.d_sch, self.d_run, self.d_done):
                self.fd[d] = os.open(d, O_DIR)
            self.fd[os.path.dirname(self.d_sch)] = os.open(os.path.dirname(self.d_sch), O_DIR)
            self._sync_parents(root, os.path.dirname(self.d_sch))
        self._pending: list[str] = []

    def close(self) -> None:
        for fd in self.fd.values():
            os.close(fd)
        self.fd.clear()

    # -- primitives ------------------------------------------------------

    def _write(self, path: str, data: bytes, flags: int = O_NEW) -> None:
        fd = os.open(path, flags, 0o644)
        try:
            os.write(fd, data)
            if self.durable:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _append(self, path: str, data: bytes) -> None:
        fd = os.open(path, O_APPEND)
        try:
            os.write(fd, data)
            if self.durable:
                os.fdatasync(fd)  # enough for an append: it also flushes the new size
        finally:
            os.close(fd)

    def _status(self, task_dir: str, state: str, **extra) -> None:
        """Atomic status rewrite: write status.json.tmp, rename over status.json."""
        body = json.dumps({"state": state, "ts": time.time(), **extra}).encode()
        tmp = os.path.join(task_dir, "status.json.tmp")
        self._write(tmp, body, O_REWRITE)
        os.rename(tmp, os.path.join(task_dir, "status.json"))

    def _sync_task_dir(self, task_dir: str) -> None:
        if self.durable:
            fd = os.open(task_dir, O_DIR)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _sync_parents(self, *dirs: str) -> None:
        if self.durable:
            for d in dirs:
                fd = self.fd.get(d)
                if fd is None:  # only the root at init time
                    fd = os.open(d, O_DIR)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                else:
                    os.fsync(fd)

    @staticmethod
    def _log_line(event: str) -> bytes:
        return f"{time.time():.6f} {event}\n".encode()

    # -- lifecycle -------------------------------------------------------

    def enqueue(self, task_type: str, task_id: str, obj) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        t = os.path.join(self.d_tmp, task_id)
        os.mkdir(t)
        self._write(os.path.join(t, "input.pkl"), data)
        self._write(
            os.path.join(t, "status.json"),
            json.dumps({"state": "enqueued", "type": task_type, "id": task_id,
                        "ts": time.time()}).encode(),
        )
        self._write(os.path.join(t, "log"), self._log_line("enqueued"))
        self._sync_task_dir(t)
        os.rename(t, os.path.join(self.d_enq, task_id))
        self._sync_parents(self.d_tmp, self.d_enq)

    def claim(self) -> str | None:
        while True:
            if not self._pending:
                # Oldest first: ids sort in enqueue order; pop() takes the smallest.
                self._pending = sorted(os.listdir(self.d_enq), reverse=True)
                if not self._pending:
                    return None
            task_id = self._pending.pop()
            try:
                os.rename(os.path.join(self.d_enq, task_id), os.path.join(self.d_sch, task_id))
            except FileNotFoundError:
                continue  # taken by another claimer
            self._sync_parents(self.d_enq, self.d_sch)
            return task_id

    def start(self, task_id: str) -> None:
        t = os.path.join(self.d_run, task_id)
        os.rename(os.path.join(self.d_sch, task_id), t)
        self._status(t, "running", server=self.server)
        self._append(os.path.join(t, "log"), self._log_line("running"))
        self._sync_task_dir(t)
        self._sync_parents(self.d_sch, self.d_run)

    def store_response(self, task_id: str, data: bytes, mime: str) -> None:
        t = os.path.join(self.d_run, task_id)
        fd = os.open(os.path.join(t, "response"), O_NEW, 0o644)
        try:
            os.write(fd, data)
            os.setxattr(fd, "user.spoolq.response_mime", mime.encode())
            if self.durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        self._mime[task_id] = mime
        self._sync_task_dir(t)

    def finish(self, task_id: str) -> None:
        t = os.path.join(self.d_run, task_id)
        self._status(t, "done", server=self.server, response=self._mime.pop(task_id, None))
        self._append(os.path.join(t, "log"), self._log_line("done"))
        self._sync_task_dir(t)
        os.rename(t, os.path.join(self.d_done, task_id))
        self._sync_parents(self.d_run, self.d_done)

    def count_done(self) -> int:
        return len(os.listdir(self.d_done))
