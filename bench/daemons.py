"""Daemons under test for bench/e2e.py and bench/wakeup.py, behind one interface.

    d = Daemon(root, durable, concurrency=2)
    d.start()                  # launch the daemon subprocess, wait until it works
    h = d.enqueue_noop(i)      # from this (producer) process; returns a handle
    d.is_done(h)               # has the task's result/final state landed?
    h = d.enqueue_stamp(i, path)   # task writes time.monotonic() into path
    d.stop()

time.monotonic() is CLOCK_MONOTONIC, one clock for every process on Linux, so
a stamp written by a worker process compares with the producer's clock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import common
from backends import missing

WARMUP_TIMEOUT = 60.0


def _env(**extra) -> dict:
    env = dict(os.environ)
    paths = [common.BENCH_DIR, common.REPO_DIR] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra)
    return env


class Daemon:
    name = "?"
    mode_note = ""

    def __init__(self, root: str, durable: bool, concurrency: int = 2):
        self.root = root
        self.durable = durable
        self.concurrency = concurrency
        self.proc: subprocess.Popen | None = None
        self._log = None

    requires: tuple[str, ...] = ()

    @classmethod
    def available(cls) -> str | None:
        return missing(cls.requires)

    def _spawn(self, cmd, env) -> None:
        self._log = open(os.path.join(self.root, f"{self.name}-daemon.log"), "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def _warm_up(self) -> None:
        """One task through the daemon: it is up and its workers are live."""
        h = self.enqueue_noop(-1)
        deadline = time.monotonic() + WARMUP_TIMEOUT
        while not self.is_done(h):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} daemon exited with {self.proc.returncode}; "
                                   f"see {self._log.name}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} daemon did not run a task in {WARMUP_TIMEOUT}s")
            time.sleep(0.01)

    def processes(self) -> list[int]:
        """The daemon's pid and its descendants' (worker processes, slots)."""
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            try:
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    todo += [int(x) for x in f.read().split()]
            except OSError:
                pass
        return out

    def pause(self) -> list[int]:
        """SIGSTOP the daemon and all its processes; returns them for resume()."""
        pids = self.processes()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        return pids

    def resume(self, pids) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def stop(self, sig=signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log:
            self._log.close()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


class HueyDaemon(Daemon):
    """huey_consumer with FileStorage, `-w N -k process`, default polling
    (-d 0.1 -b 1.15 -m 10). huey has no durable mode: `durable` is ignored."""

    name = "huey"
    mode_note = "huey_consumer -w 2 -k process, FileStorage (never fsyncs)"
    extra_args: list[str] = []

    requires = ("huey",)

    def start(self) -> None:
        import huey_app

        path = os.path.join(self.root, "huey")
        self.huey, self.noop, self.stamp = huey_app.make(path)  # producer side
        cmd = [sys.executable, "-m", "huey.bin.huey_consumer", "huey_app.huey",
               "-w", str(self.concurrency), "-k", "process", *self.extra_args]
        self._spawn(cmd, _env(SPOOLQ_BENCH_HUEY_PATH=path))
        self._warm_up()

    def enqueue_noop(self, i):
        return self.noop().id

    def enqueue_stamp(self, i, path):
        return self.stamp(path).id

    def is_done(self, handle) -> bool:
        return self.huey.storage.has_data_for_key(handle)

    def stop(self, sig=signal.SIGINT, timeout: float = 15.0) -> None:
        super().stop(sig, timeout)  # SIGINT: huey's graceful shutdown


# --------------------------------------------------------------------------
# SPOOLQ SIDE, checked against the current CLI and daemon:
#     python -m spoolq --root R worker S --concurrency 2
# (--root is the CLI's global option). The worker imports the handler by its
# dotted path ("benchtasks.noop", bench/ on PYTHONPATH) in its slots; SIGTERM
# stops claiming, hands back what is not started and exits 0; a task is done
# when Spool.status() says FINISHED. available() reports it unavailable while
# spoolq.cli does not import.
# --------------------------------------------------------------------------


class SpoolqDaemon(Daemon):
    name = "spoolq"
    mode_note = "spoolq --root R worker S --concurrency 2"
    SERVER = "bench"

    requires = ("spoolq", "spoolq.cli")

    def start(self) -> None:
        from spoolq import Spool, State

        self.State = State
        path = os.path.join(self.root, "spool")
        self.spool = Spool.init(path, durable=self.durable)
        self.spool.register_type("noop", "benchtasks.noop")
        self.spool.register_type("stamp", "benchtasks.stamp")
        cmd = [sys.executable, "-m", "spoolq", "--root", path,
               "worker", self.SERVER, "--concurrency", str(self.concurrency)]
        self._spawn(cmd, _env())
        self._warm_up()

    def enqueue_noop(self, i):
        tid = f"n{i + 1:08d}" if i >= 0 else "warmup"
        self.spool.enqueue("noop", tid, None)
        return ("noop", tid)

    def enqueue_stamp(self, i, path):
        tid = f"s{i:08d}"
        self.spool.enqueue("stamp", tid, {"path": path})
        return ("stamp", tid)

    def is_done(self, handle) -> bool:
        state = self.spool.status(*handle).state
        if state == self.State.FAILED:
            raise RuntimeError(f"spoolq task {handle} FAILED; see {self._log.name}")
        return state == self.State.FINISHED


class SpoolqDurableDaemon(SpoolqDaemon):
    """The same worker on a durable spool (every transition fsynced before
    it is acknowledged), run in the same rounds as the non-durable one so
    the cost of durability is a ratio taken under the same disk weather."""

    name = "spoolq-durable"
    mode_note = "spoolq --root R worker S --concurrency 2, spool durable"

    def __init__(self, root: str, durable: bool, concurrency: int = 2):
        super().__init__(root, True, concurrency)


DAEMONS = {"huey": HueyDaemon, "spoolq": SpoolqDaemon, "spoolq-durable": SpoolqDurableDaemon}
