"""Which waiting task a server may claim now: the gates in front of a claim.

The worker loop pops waiting tasks in claim order (priority, due time,
enqueue time) and asks :meth:`Gates.gate` whether this server may claim one
now. A task that may not is *parked* behind the gate that stops it, and goes
back into the waiting index when that gate opens; claim order is kept,
because the index orders it again. The gates, in the order they are asked:

* ``handler:T`` — type T's handler does not import here (a deployment
  error): closed with backoff (1 s doubling to 5 min), opened by a try that
  works;
* ``held:T`` — ``spoolq hold T``: opened by ``spoolq release T`` (the loop
  watches ``types/``, so within a second, without polling);
* ``slots:T`` — type T's concurrency limit is reached over every server:
  looked at again when a run of T here ends, and every second (a slot freed
  elsewhere shows no file event here);
* ``room:EXECUTOR`` — the executor that runs T's handlers is full, or
  unreachable (the dask scheduler is down: said once, and once more when it
  is back).

A worker's lanes (``--types A,B``) are not a gate: tasks of other types are
not indexed at all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..lifecycle import Claim
from ..names import split_task_name
from ..spool import Spool
from ..store.queue import WaitingIndex
from .executor import Executor

log = logging.getLogger("spoolq.daemon")

HANDLER_RETRY_MAX = 300.0  # seconds: the longest wait between tries of a handler that does not import
SLOTS_RECHECK = 1.0  # seconds between looks at a type whose concurrency limit is reached

# Why a type's tasks cannot start here: (what ends the wait, the hint for the operator).
_MISSING_CAUSES: dict[str, tuple[str, str]] = {
    "import": ("it imports", "; see worker --pythonpath"),
    "type file": ("its type's file reads again", ""),
}


@dataclass
class _Backoff:
    """A retry schedule: 1 s after the first failure, doubling up to 5 min."""

    delay: float = 0.5
    until: float = 0.0  # monotonic

    def fail(self) -> None:
        self.delay = min(HANDLER_RETRY_MAX, self.delay * 2)
        self.until = time.monotonic() + self.delay


class Gates:
    """The gates of one worker. *room(executor)* says how many more runs
    that executor may take now (the loop counts what it runs)."""

    def __init__(
        self, spool: Spool, server: str, executors: dict[str, Executor], room: Callable[[str], int],
        running: Callable[[str], int] = lambda type_name: 0,
    ) -> None:
        self.spool = spool
        self.server = server
        self.executors = executors
        self.room = room
        self.running = running  # how many runs of a type this server has under way
        self.parked: dict[str, list[tuple[str, Any]]] = {}  # gate -> waiting (name, index entry) behind it
        self._no_handler: dict[str, _Backoff] = {}  # type -> its handler does not import here
        self._unavailable: set[str] = set()
        self._said_unavailable: set[str] = set()
        self._told_missing: set[str] = set()

    # ------------------------------------------------------------------ asking

    def gate(self, name: str) -> str | None:
        """The gate that keeps waiting task *name* from being claimed by
        this server now; None when it may be."""
        parts = split_task_name(name)
        if parts is None:
            return None  # not a task: the claim quarantines it
        type_name = parts[0]
        block = self._no_handler.get(type_name)
        if block is not None and time.monotonic() < block.until:
            return f"handler:{type_name}"
        ttype = self.spool.registry.find(type_name)
        if ttype is None:
            return None  # unknown or corrupt type: the launch fails it with the reason
        if ttype.held:
            return f"held:{type_name}"
        if ttype.concurrency and not self._slots_free(type_name, ttype.concurrency):
            return f"slots:{type_name}"
        route = self.executor_of(type_name)
        if route not in self.executors and route not in self._told_missing:
            self._told_missing.add(route)
            log.warning("type %s runs on executor %s, which server %s does not have (--dask-scheduler or "
                        "SPOOLQ_DASK_SCHEDULER); leaving such tasks to other servers", type_name, route, self.server)
        if self.room(route) <= 0:
            return f"room:{route}"
        return None

    def is_open(self, gate: str) -> bool:
        kind, _, what = gate.partition(":")
        if kind == "handler":
            block = self._no_handler.get(what)
            return block is None or time.monotonic() >= block.until
        if kind in ("held", "slots"):
            ttype = self.spool.registry.find(what)
            if ttype is None:
                return True
            if kind == "held":
                return not ttype.held
            return not ttype.concurrency or self._slots_free(what, ttype.concurrency) > 0
        return self.room(what) > 0

    def _slots_free(self, type_name: str, limit: int) -> int:
        """Free slots of a type: the slot files no run holds, less this
        server's own runs that do not hold theirs yet (a run takes its slot
        in its handler process, a moment after its launch: counted free,
        the next claim of the type lost the race there and went back to the
        queue, again and again, starving what waited behind it)."""
        own = self.running(type_name)
        if own >= limit:
            return 0  # no probe: a probe takes each slot's lock for a moment, which a run taking it would meet
        taken = max(limit - self.spool.slots.free(type_name, limit), own)
        return max(limit - taken, 0)

    def executor_of(self, type_name: str) -> str:
        ttype = self.spool.registry.find(type_name)
        return ttype.executor if ttype is not None else "fork"

    def room_anywhere(self) -> bool:
        return any(self.room(route) > 0 for route in self.executors)

    def unavailable(self, route: str) -> bool:
        return route in self._unavailable

    # ------------------------------------------------------------------ parking

    def park(self, gate: str, name: str, entry: Any = None) -> None:
        """Keep waiting task *name* behind *gate*, with its index *entry*
        (:attr:`WaitingIndex.popped`) to put it back by."""
        self.parked.setdefault(gate, []).append((name, entry))

    def reopen(self, waiting: WaitingIndex, *, only: str | None = None) -> None:
        """Give the names behind every gate that opened (of kind *only*, e.g.
        "held") back to the waiting index."""
        for gate in list(self.parked):
            if (only is None or gate.startswith(only + ":")) and self.is_open(gate):
                for name, entry in self.parked.pop(gate):
                    waiting.put_back(name, entry)

    def next_look(self) -> float | None:
        """When (monotonic) a parked gate should be looked at again by time:
        a handler's next try, a full type's next look. None: no such gate."""
        marks = [block.until for block in self._no_handler.values()]
        if any(gate.startswith("slots:") for gate in self.parked):
            marks.append(time.monotonic() + SLOTS_RECHECK)
        return min(marks) if marks else None

    # ------------------------------------------------------------------ executors

    def check_executors(self, status: Callable[[str], object]) -> None:
        """Log each executor that becomes unavailable or available again
        (once each time); *status* gets a line for systemd's STATUS=."""
        for route, executor in self.executors.items():
            if executor.available():
                self._unavailable.discard(route)
                if route in self._said_unavailable:
                    self._said_unavailable.discard(route)
                    log.info("claiming %s tasks again: the %s executor is available", route, route)
                continue
            self._unavailable.add(route)
            why = getattr(executor, "unavailable_reason", lambda: "unavailable")()
            if why and route not in self._said_unavailable:  # nothing while it makes its first connection
                self._said_unavailable.add(route)
                log.warning("not claiming %s tasks: %s", route, why)
                status(f"{route} executor unavailable")

    # ------------------------------------------------------------------ handlers that do not import

    def handler_missing(self, claim: Claim, why: str, *, cause: str = "import") -> None:
        """The type's handler does not import here (*cause* "import") or its
        type's file cannot be read ("type file"): a deployment error, not the
        task's. Its claim goes back (uncharged, never started) and this
        server claims no task of the type until a retry, with backoff, finds
        it working. Said once, and once more when it works again."""
        until, hint = _MISSING_CAUSES[cause]
        self.spool.hand_back(claim, f"not started on server {self.server}: {why}")
        block = self._no_handler.get(claim.type)
        if block is None:
            block = self._no_handler[claim.type] = _Backoff()
            log.error("server %s: %s; not claiming %s tasks until %s (they wait; trying again with backoff%s)",
                      self.server, why, claim.type, until, hint)
        block.fail()

    def handler_found(self, type_name: str) -> None:
        if self._no_handler.pop(type_name, None) is not None:
            log.info("server %s: the handler of %s imports again; claiming its tasks", self.server, type_name)
