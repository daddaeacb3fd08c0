"""Counters that outlive daemons and tasks (contract §12.5): ``ROOT/metrics/``.

Each worker daemon keeps its own counters in ``metrics/<SERVER>.json``
(only one live process is a given server, so each file has one writer),
loads them when it starts and replaces the file whole (tmp + rename) at most
every :data:`SAVE_INTERVAL` seconds and when it stops. ``spoolq stats
--prometheus`` sums every server's file. Retiring or deleting tasks does not
touch them, and a server that is never started again keeps counting in the
sum.

What is counted, once per task that reaches FINISHED or FAILED in a daemon
(:class:`Metrics.ended`), from its final status:

* ``completed[type][state]``;
* ``restarts[type]`` and ``retries[type]``: the task's ``restarts`` and
  ``retries`` fields (restarts and retries it spent over its life, charged by
  whoever took it away), added when it ends; so a restart is counted once,
  when its task has ended;
* ``run_seconds[type]``: ``finished_at - started_at``; ``wait_seconds[type]``:
  ``started_at`` less the due time (``not_before``, contract §11.2, else
  ``enqueued_at``), as histograms.

Not durable state: the file is not fsynced, and a daemon that is killed
(SIGKILL, power loss) loses the increments of its last few seconds
(docs/design.md, "Metrics").
"""

from __future__ import annotations

import errno
import json
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..lifecycle import Place
from ..names import task_name
from . import fsutil
from .codec import state_of
from .layout import DIR_MODE, Layout
from .taskdir import peek_status

METRICS_DIR = "metrics"
SAVE_INTERVAL = 2.0  # seconds between saves while counts change
FORMAT = 1
# Upper bounds of the histogram buckets, in seconds (+Inf is implied).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0)


@dataclass
class Histogram:
    """Non-cumulative bucket counts (one more than BUCKETS: the last is
    +Inf), their sum and count."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    sum: float = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)

    def observe(self, value: float) -> None:
        if not math.isfinite(value):
            return
        value = max(0.0, value)
        for i, bound in enumerate(BUCKETS):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.sum += value

    def add(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.sum += other.sum

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound as Prometheus writes it, cumulative count) per bucket."""
        out, total = [], 0
        for bound, n in zip([*BUCKETS, math.inf], self.counts):
            total += n
            out.append(("+Inf" if math.isinf(bound) else repr(float(bound)), total))
        return out

    def to_json(self) -> dict[str, Any]:
        return {"counts": self.counts, "sum": self.sum}

    @classmethod
    def from_json(cls, raw: Any) -> Histogram:
        counts = [int(c) for c in raw["counts"]]
        if len(counts) != len(BUCKETS) + 1 or min(counts, default=0) < 0:
            raise ValueError("histogram buckets do not match")
        return cls(counts, float(raw["sum"]))


@dataclass
class Metrics:
    """Counters per type (see the module's docstring)."""

    completed: dict[str, dict[str, int]] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    retries: dict[str, int] = field(default_factory=dict)
    run_seconds: dict[str, Histogram] = field(default_factory=dict)
    wait_seconds: dict[str, Histogram] = field(default_factory=dict)

    def ended(self, doc: dict[str, Any]) -> None:
        """Count a task that ended, from its final status document."""
        type_name, state = str(doc.get("type")), str(doc.get("state"))
        row = self.completed.setdefault(type_name, {"FINISHED": 0, "FAILED": 0})
        row[state] = row.get(state, 0) + 1
        self.restarts[type_name] = self.restarts.get(type_name, 0) + _count(doc.get("restarts"))
        self.retries[type_name] = self.retries.get(type_name, 0) + _count(doc.get("retries"))
        enqueued, started, finished = (_time(doc.get(k)) for k in ("enqueued_at", "started_at", "finished_at"))
        due = _time(doc.get("not_before"))  # a delayed or retried task waits from its due time
        if due is None:
            due = enqueued
        if started is not None and finished is not None:
            self.run_seconds.setdefault(type_name, Histogram()).observe(finished - started)
        if due is not None and started is not None:
            self.wait_seconds.setdefault(type_name, Histogram()).observe(started - due)

    def add(self, other: Metrics) -> None:
        for type_name, row in other.completed.items():
            mine = self.completed.setdefault(type_name, {"FINISHED": 0, "FAILED": 0})
            for state, n in row.items():
                mine[state] = mine.get(state, 0) + n
        for mine_counts, theirs in ((self.restarts, other.restarts), (self.retries, other.retries)):
            for type_name, n in theirs.items():
                mine_counts[type_name] = mine_counts.get(type_name, 0) + n
        for mine_hist, theirs_hist in ((self.run_seconds, other.run_seconds), (self.wait_seconds, other.wait_seconds)):
            for type_name, hist in theirs_hist.items():
                mine_hist.setdefault(type_name, Histogram()).add(hist)

    def types(self) -> list[str]:
        return sorted({*self.completed, *self.restarts, *self.retries, *self.run_seconds, *self.wait_seconds})

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "completed": self.completed,
            "restarts": self.restarts,
            "retries": self.retries,
            "run_seconds": {t: h.to_json() for t, h in self.run_seconds.items()},
            "wait_seconds": {t: h.to_json() for t, h in self.wait_seconds.items()},
        }

    @classmethod
    def from_json(cls, raw: Any) -> Metrics:
        """ValueError (or KeyError/TypeError) when *raw* is not such a document."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError("not a spoolq metrics document")
        return cls(
            completed={str(t): {str(s): _count(n) for s, n in row.items()} for t, row in raw["completed"].items()},
            restarts={str(t): _count(n) for t, n in raw["restarts"].items()},
            retries={str(t): _count(n) for t, n in raw["retries"].items()},
            run_seconds={str(t): Histogram.from_json(h) for t, h in raw["run_seconds"].items()},
            wait_seconds={str(t): Histogram.from_json(h) for t, h in raw["wait_seconds"].items()},
        )


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return 0
    return value


def _time(value: Any) -> float | None:
    try:
        return datetime.fromisoformat(value).timestamp()
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- files


def metrics_dir(layout: Layout) -> str:
    return layout.path(METRICS_DIR)


def file_name(server: str) -> str:
    return f"{server}.json"


def server_of(name: str) -> str | None:
    """The server whose counters the file *name* holds; None for any other name."""
    if name.endswith(".json") and not name.startswith("."):
        return name[: -len(".json")]
    return None


def ensure_dir(layout: Layout) -> str:
    """``ROOT/metrics``, created (mode 2770, like the state directories)
    when missing: spools made before it existed get it on first use."""
    path = metrics_dir(layout)
    if not os.path.isdir(path) and not os.path.isdir(layout.enqueued):
        # The spool is being removed: making a directory in it again would
        # keep `rm -rf SPOOL` from ending (a stopping worker's last save).
        raise FileNotFoundError(errno.ENOENT, "the spool is gone", layout.root)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return path
    os.chmod(path, DIR_MODE)
    return path


def load(layout: Layout, server: str) -> Metrics:
    """*server*'s counters; empty when it has none yet. ValueError when its
    file cannot be read (the caller decides: the daemon sets it aside)."""
    try:
        raw = fsutil.read_file(None, os.path.join(metrics_dir(layout), file_name(server)), limit=16 << 20)
    except FileNotFoundError:
        return Metrics()
    except OSError as exc:
        raise ValueError(f"cannot read it: {exc.strerror}") from None
    try:
        return Metrics.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise ValueError(f"not a metrics document ({exc})") from None


def save(layout: Layout, server: str, metrics: Metrics) -> None:
    """Replace *server*'s file whole (tmp + rename); not fsynced."""
    directory = ensure_dir(layout)
    dfd = fsutil.open_dir(directory)
    try:
        tmp = f".{server}.json.tmp"
        try:
            os.unlink(tmp, dir_fd=dfd)
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o660, dir_fd=dfd)
        try:
            fsutil.share_with_group(fd)
            data = json.dumps(metrics.to_json(), sort_keys=True).encode() + b"\n"
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.rename(tmp, file_name(server), src_dir_fd=dfd, dst_dir_fd=dfd)
    finally:
        os.close(dfd)


def load_all(layout: Layout) -> tuple[Metrics, list[str]]:
    """Every server's counters summed, and the files that could not be read
    (left out of the sum)."""
    total = Metrics()
    bad = []
    try:
        names: Iterable[str] = sorted(os.listdir(metrics_dir(layout)))
    except FileNotFoundError:
        names = []
    for name in names:
        server = server_of(name)
        if server is None:
            continue
        try:
            total.add(load(layout, server))
        except ValueError:
            bad.append(name)
    return total, bad


# --------------------------------------------------------------------------- a daemon's counters


class ServerCounters:
    """A worker daemon's own counters: loaded at start, counted as its
    tasks end, saved now and then (:meth:`tick`) and at its stop
    (:meth:`close`)."""

    def __init__(self, layout: Layout, server: str, *, clock: Any = None) -> None:
        self.layout = layout
        self.server = server
        self.clock = clock or time.monotonic
        self.dirty = False
        self.next_save = 0.0
        self.error: str | None = None  # the last save's failure, if it failed
        self._seen: dict[tuple[str, str, int], None] = {}  # tasks counted lately (a task ends once per life)
        try:
            self.metrics = load(layout, server)
        except ValueError as exc:
            # Unreadable: set aside (never deleted), and count from zero.
            self.metrics = Metrics()
            path = os.path.join(metrics_dir(layout), file_name(server))
            try:
                layout.quarantine(path, f"metrics file {exc}", now=time.time(), durable=False)
            except OSError as err:  # cannot move it: the next save replaces it
                self.error = str(err.strerror or err)

    def ended(self, type_name: str, task_id: str, claim: int | None = None) -> bool:
        """Count task (type, id), which ended (through claim number *claim*,
        when given): its final status is read in ``done/``. False when it is
        not there, not final through that claim, or was counted already."""
        try:
            doc = peek_status(self.layout.task_path(Place.DONE, task_name(type_name, task_id)))
            if not state_of(doc).terminal or (claim is not None and doc.get("claim") != claim):
                return False
        except Exception:  # noqa: BLE001 - gone, corrupt: nothing to count
            return False
        key = (type_name, task_id, _count(doc.get("claim")))
        if key in self._seen:
            return False
        self._seen[key] = None
        if len(self._seen) > 4096:
            del self._seen[next(iter(self._seen))]
        self.metrics.ended(doc)
        self.dirty = True
        return True

    def tick(self) -> None:
        """Save if something changed and the last save is old enough."""
        now = self.clock()
        if self.dirty and now >= self.next_save:
            self.next_save = now + SAVE_INTERVAL
            self.save()

    def close(self) -> None:
        if self.dirty:
            self.save()

    def save(self) -> None:
        try:
            save(self.layout, self.server, self.metrics)
            self.dirty = False
            self.error = None
        except OSError as exc:  # disk full: kept in memory, tried again at the next tick
            self.error = str(exc.strerror or exc)
