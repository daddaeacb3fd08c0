"""The rules of a task's life, as data and pure functions.

Nothing here touches the disk, a clock or a process: the spool, the sweeps,
the daemon and fsck read their rules from this module and apply them. A rule
that changes changes here, once, and the table-driven tests in
``tests/test_lifecycle.py`` go through every state × place × liveness.

* :class:`State`: the six states with their ATP codes; :class:`Place`: the
  state directories; :data:`PLACE_OF` says where each state lives.
* :data:`HOLDER_MOVES`: which state changes a claim holder may ask for.
* :class:`Claim` and :meth:`Claim.owns`: the one ownership check (fencing).
* :func:`claimed_by_move` and :func:`as_claimed`: a claim not yet recorded.
* :func:`judge`: the consistency verdict for a task found in a place, used by
  the zombie sweep and by fsck alike.
* :func:`timed_out`, :func:`gives_up`, :func:`retired`: timeouts, restart
  charging and retention; :func:`retry_delay`: the backoff between retries.
* :func:`wait_order_key`: the order in which waiting tasks are claimed.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidInput, InvalidName
from .names import check_id, check_server, check_type, split_task_name, task_name


class State(enum.IntEnum):
    """Task states with the ATP status codes."""

    ENQUEUED = 1
    SCHEDULED = 2
    RUNNING = 3
    PAUSED = 4
    FINISHED = 5
    FAILED = 6

    def __str__(self) -> str:
        return self.name

    @property
    def terminal(self) -> bool:
        return self in (State.FINISHED, State.FAILED)

    @property
    def started(self) -> bool:
        """A handler was given the task (it used up a start)."""
        return self in (State.RUNNING, State.PAUSED)


def state_named(value: object) -> State:
    """The State *value* names: a State, its ATP code, or its name in any
    case ("running"); InvalidInput for anything else."""
    if isinstance(value, State):
        return value
    if isinstance(value, str) and value.upper() in State.__members__:
        return State[value.upper()]
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return State(value)
        except ValueError:
            pass
    raise InvalidInput(f"not a task state: {str(value)[:40]!r} (one of {', '.join(State.__members__)})")


class Place(enum.Enum):
    """The state directories a task directory lives in."""

    ENQUEUED = "enqueued"
    SCHEDULED = "scheduled"  # scheduled/<server>/
    RUNNING = "running"
    DONE = "done"


# Where a task in each state belongs.
PLACE_OF: Mapping[State, Place] = {
    State.ENQUEUED: Place.ENQUEUED,
    State.SCHEDULED: Place.SCHEDULED,
    State.RUNNING: Place.RUNNING,
    State.PAUSED: Place.RUNNING,
    State.FINISHED: Place.DONE,
    State.FAILED: Place.DONE,
}

# The order a task moves forward through the places. Probing places in this
# order cannot miss a task that only moves forward meanwhile.
PLACE_ORDER: tuple[Place, ...] = (Place.ENQUEUED, Place.SCHEDULED, Place.RUNNING, Place.DONE)

# State changes a claim holder may ask for, by current state. A SCHEDULED task
# becomes RUNNING only by being started (a move to running/), so its holder
# may only fail it. Everything else is refused.
HOLDER_MOVES: Mapping[State, frozenset[State]] = {
    State.SCHEDULED: frozenset({State.FAILED}),
    State.RUNNING: frozenset({State.RUNNING, State.PAUSED, State.FINISHED, State.FAILED}),
    State.PAUSED: frozenset({State.RUNNING, State.PAUSED, State.FINISHED, State.FAILED}),
}

# The states a holder may write from (log records, responses) while it holds the task.
HELD_STATES: frozenset[State] = frozenset(HOLDER_MOVES)


def sources_of(target: State) -> frozenset[State]:
    """The states from which a holder may move to *target*."""
    return frozenset(s for s, targets in HOLDER_MOVES.items() if target in targets)


@dataclass(frozen=True)
class Claim:
    """One claim of a task by a server: the ATP ``task_id``.

    Its string form ``TYPE:ID#N@SERVER`` is what ``dequeueTask`` returns.
    ``number`` is the task's claim counter at the time of the claim: once the
    task is claimed again, taken away or deleted, :meth:`owns` is false for
    every later status of it, and writes through this claim are refused.
    """

    type: str
    id: str
    number: int
    server: str

    def __str__(self) -> str:
        return f"{self.type}:{self.id}#{self.number}@{self.server}"

    @property
    def name(self) -> str:
        """The task directory's name."""
        return task_name(self.type, self.id)

    def owns(self, doc: Mapping[str, Any]) -> bool:
        """Whether a task whose status is *doc* is still held by this claim.

        Every take-away sets the server to None and every claim raises the
        number, so no later status of the task matches an old claim."""
        return doc.get("claim") == self.number and doc.get("server") == self.server

    def not_recorded_yet(self, doc: Mapping[str, Any]) -> bool:
        """Whether a task whose stored status is *doc* is this claim's, made
        by its move alone and not recorded yet (:func:`claimed_by_move`): it
        still says ENQUEUED, with the number before this claim's. A start
        moves it to running/ before it writes its status, so it is met so
        there too, for that moment."""
        return doc.get("state") == State.ENQUEUED.name and doc.get("claim") == self.number - 1

    def sent_back(self, doc: Mapping[str, Any]) -> bool:
        """Whether a task whose status is *doc* went back to the queue from
        this claim and nobody claimed it since (a re-enqueue keeps the number
        and clears the server)."""
        return doc.get("state") == State.ENQUEUED.name and doc.get("claim") == self.number and doc.get("server") is None

    @classmethod
    def parse(cls, text: str | Claim) -> Claim:
        if isinstance(text, Claim):
            return text
        try:
            rest, server = str(text).rsplit("@", 1)
            name, number = rest.rsplit("#", 1)
            type_name, task_id = split_task_name(name) or ("", "")
            return cls(check_type(type_name), check_id(task_id), int(number), check_server(server))
        except (ValueError, InvalidName):
            raise InvalidName("task claim", text, f"not a task claim: {text!r} (expected TYPE:ID#N@SERVER)") from None


class Outcome(enum.Enum):
    """How one run of a handler ended, as its executor reports it."""

    FINISHED = "FINISHED"
    FAILED = "FAILED"
    GONE = "GONE"  # the task was taken away or deleted while it ran
    RETRY = "RETRY"  # the handler failed (or asked for a retry): back to the queue, due later
    NO_HANDLER = "NO_HANDLER"  # never started: its handler cannot be imported where it was to run
    NO_ROOM = "NO_ROOM"  # never started: its type's concurrency limit was reached meanwhile
    NOT_STARTED = "NOT_STARTED"  # never started: the start could not be written (disk full, I/O error)
    UNRECORDED = "UNRECORDED"  # the run ended, but its end could not be written: the worker loop writes it
    QUARANTINED = "QUARANTINED"  # its task directory could not be trusted at the end: set aside in quarantine/


class Action(str, enum.Enum):
    """What a take-away, sweep or repair did to one task (a str, so it
    prints and compares as its value)."""

    REENQUEUED = "reenqueued"
    FAILED = "failed"
    FINISHED_MOVE = "finished move"
    RETIRED = "retired"
    DELETED = "deleted"
    QUARANTINED = "quarantined"
    BUSY = "busy"  # left alone: a process of its run is still alive (the run lock is held)
    GONE = "gone"  # nothing to do: the task changed or went meanwhile

    def __str__(self) -> str:
        return self.value


# --------------------------------------------------------------------------- consistency verdicts


class Verdict(enum.Enum):
    """What must happen to a task found in a place (see :func:`judge`)."""

    OK = "ok"
    FINISH_MOVE = "finish move"  # terminal, not in done/: a finish was interrupted before its move
    TAKE_AWAY = "take away"  # back to the queue (or FAILED, if charged and out of restarts)
    CANCEL = "cancel"  # a dead server's task whose cancel was asked for: FAILED, cancelled
    UNTRUSTED = "untrusted"  # a state no crash can leave in this place: quarantine


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    reason: str = ""
    charge: bool = False  # whether a take-away uses up a restart

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.OK


_OK = Judgement(Verdict.OK)


def _valid_server(server: object) -> bool:
    try:
        check_server(server)
        return True
    except InvalidName:
        return False


def cancelled_while_waiting(place: Place, state: State) -> bool:
    """Whether a task in *place* whose status says *state* is one whose
    cancel stopped between its two steps: a cancel of a waiting task writes
    FAILED, then moves it to ``done/``. Whoever meets it next completes the
    move (a claim, another cancel, the sweep, fsck)."""
    return place is Place.ENQUEUED and state is State.FAILED


def claimed_by_move(place: Place, state: State) -> bool:
    """Whether a task in *place* whose status says *state* is claimed by its
    move alone. A claim (without a message) is only the rename into
    ``scheduled/<server>/``: the status keeps saying ENQUEUED, and the first
    write through the claim, normally the start, records it (status and a
    SCHEDULED log record) together with its own change. Only the server's
    one process claims into its directory, and a crash leaves what a dead
    server's claim leaves, so the place alone says who holds the task."""
    return place is Place.SCHEDULED and state is State.ENQUEUED


def as_claimed(doc: Mapping[str, Any], server: str, claimed_at: str) -> dict[str, Any]:
    """The status of a task claimed by its move alone (:func:`claimed_by_move`),
    as every reader sees it and as its first write records it: SCHEDULED by
    *server*, its claim number one up (as a recorded claim raises it), claimed
    at *claimed_at* (the time the claim stamped)."""
    return {**doc, "state": State.SCHEDULED.name, "server": server, "claim": int(doc["claim"]) + 1,
            "claimed_at": claimed_at, "message": ""}


def judge(
    place: Place,
    state: State,
    server: object,
    server_dir: str | None,
    alive: Callable[[str], bool],
    *,
    cancel_asked: bool = False,
) -> Judgement:
    """The verdict on a task in *place* whose status says *state* and
    *server*; *server_dir* is the ``<server>`` of ``scheduled/<server>/``.
    *alive(server)* tells whether a server's lock is held; *cancel_asked*
    whether a cancel of the (running) task was asked for.

    Every state change writes the status and moves the directory in an order
    chosen so that a crash between the two leaves a state this function
    recognises as interrupted (and completes); anything else is UNTRUSTED.
    Claims of live servers are left alone: timeouts are a separate rule
    (:func:`timed_out`)."""
    if place is Place.ENQUEUED:
        # A move back writes ENQUEUED first; a claim moves first; a cancel of
        # a waiting task writes FAILED first. Nothing else leaves a task here.
        if state is State.ENQUEUED:
            return _OK
        if cancelled_while_waiting(place, state):
            return Judgement(Verdict.FINISH_MOVE, "completing an interrupted cancel")
        return Judgement(Verdict.UNTRUSTED, f"status says {state.name} but it waits in enqueued/")
    if place is Place.DONE:
        if state.terminal:
            return _OK
        return Judgement(Verdict.UNTRUSTED, f"status says {state.name} but it is in done/")
    if state.terminal:
        return Judgement(Verdict.FINISH_MOVE, "completing an interrupted finish")
    if place is Place.RUNNING:
        if state is State.ENQUEUED:
            # A re-enqueue writes its status before its move; the start of a
            # claim made by its move alone moves before its first write.
            return Judgement(Verdict.TAKE_AWAY, "completing an interrupted re-enqueue or start")
        if not _valid_server(server):
            return Judgement(Verdict.UNTRUSTED, f"status says {state.name} (server {server!r}) but it is in running/")
        if alive(str(server)):
            return _OK
        if cancel_asked and state.started:
            # Its server died before it could carry the cancel out.
            return Judgement(Verdict.CANCEL, f"server {server} is gone")
        # SCHEDULED here: a start moved it and died before its status write.
        return Judgement(Verdict.TAKE_AWAY, f"abandoned: server {server} is gone", charge=state.started)
    # scheduled/<server_dir>/
    if state.started:
        return Judgement(Verdict.UNTRUSTED, f"status says {state.name} but it is in scheduled/{server_dir}/ (never started)")
    if state is State.SCHEDULED and server != server_dir:
        return Judgement(Verdict.UNTRUSTED, f"claimed by {server!r} but in scheduled/{server_dir}/")
    if server_dir is not None and alive(server_dir):
        return _OK  # claimed (ENQUEUED: claimed by its move, recorded by its start)
    if state is State.ENQUEUED:
        return Judgement(Verdict.TAKE_AWAY, "claim was interrupted")
    return Judgement(Verdict.TAKE_AWAY, f"abandoned: server {server_dir} is gone")


# --------------------------------------------------------------------------- time and restarts


def timed_out(now: float, claimed_at: float | None, timeout: float) -> bool:
    """A claim held past its type's *timeout* (seconds from the claim, PAUSED
    time included). A timeout <= 0 means no time limit."""
    return timeout > 0 and claimed_at is not None and now - claimed_at > timeout


def charges_restart(state: State, charge: bool) -> bool:
    """Whether taking a task in *state* away uses up a restart: only a started
    task does, and only when the take-away is charged (timeouts and dead
    servers are; a graceful hand-back is not)."""
    return charge and state.started


def gives_up(restarts: int, max_restarts: int) -> bool:
    """A charged take-away of a task that already used *restarts* fails it
    instead: a task starts at most ``max_restarts + 1`` times."""
    return restarts >= max_restarts


def retry_delay(attempt: int, backoff: float, backoff_max: float, jitter: float) -> float:
    """Seconds before retry number *attempt* (1, 2, …): ``d = min(backoff_max,
    backoff * 2**(attempt-1))``, spread over ``[d/2, d]`` by *jitter* in
    [0, 1] (so that tasks that failed together do not come back together)."""
    # Doubled at most 1023 times: 2**1024 is past every float, and a count of
    # retries may go higher (registry.MAX_COUNT); the cap has long been reached.
    d = min(backoff_max, backoff * 2.0 ** min(attempt - 1, 1023))
    return d / 2 + min(1.0, max(0.0, jitter)) * d / 2


def retired(now: float, finished_at: float, retention: float) -> bool:
    """A task in done/ since *finished_at* is past its type's retention.
    A retention <= 0 keeps tasks forever."""
    return retention > 0 and now - finished_at > retention


# --------------------------------------------------------------------------- waiting order


WaitKey = tuple[int, int, int, str]


def wait_order_key(queued_ns: int, name: str, *, priority: int = 0, due_ns: int | None = None) -> WaitKey:
    """The claim order of waiting tasks: the highest *priority* first; within
    one priority FIFO by due time (*due_ns*, for a task enqueued to run
    later or retried after a backoff; otherwise the time it was queued),
    then by the time it was (re-)enqueued, in nanoseconds, then by name.
    Every index of ``enqueued/`` sorts by this key and nothing else; a
    task is claimable once its due time has come (:func:`due`)."""
    return (-priority, queued_ns if due_ns is None else due_ns, queued_ns, name)


def due(key: WaitKey, now_ns: int) -> bool:
    """Whether a waiting task with *key* may be claimed at *now_ns*."""
    return key[1] <= now_ns


__all__ = [
    "Action", "Claim", "HELD_STATES", "HOLDER_MOVES", "Judgement", "Outcome", "PLACE_OF", "PLACE_ORDER",
    "Place", "State", "Verdict", "WaitKey", "charges_restart", "due", "gives_up", "judge", "retired",
    "retry_delay", "sources_of", "state_named", "timed_out", "wait_order_key", "as_claimed", "claimed_by_move",
]
