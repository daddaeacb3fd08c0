"""The rules of spoolq.lifecycle, table-driven: every state × place × server
× liveness for the consistency verdict, and the small rules around it.

These functions are pure, so the tables cover every combination instead of
examples; the spool, the sweeps and fsck apply exactly these verdicts."""

from __future__ import annotations

import itertools

import pytest

from spoolq.errors import InvalidName
from spoolq.lifecycle import (
    HOLDER_MOVES,
    PLACE_OF,
    PLACE_ORDER,
    Claim,
    Place,
    State,
    Verdict,
    charges_restart,
    gives_up,
    judge,
    retired,
    sources_of,
    timed_out,
    retry_delay,
    wait_order_key,
    due,
)

E, S, R, P, F, X = State.ENQUEUED, State.SCHEDULED, State.RUNNING, State.PAUSED, State.FINISHED, State.FAILED
OK, MOVE, TAKE, BAD = Verdict.OK, Verdict.FINISH_MOVE, Verdict.TAKE_AWAY, Verdict.UNTRUSTED
ANY = object()

# (place, states, status server, server alive) -> (verdict, charged). The
# task's server dir, when it is in scheduled/, is always "s1". First match wins.
RULES = [
    (Place.ENQUEUED, {E}, ANY, ANY, (OK, False)),
    (Place.ENQUEUED, {X}, ANY, ANY, (MOVE, False)),  # a cancel of a waiting task stopped before its move
    (Place.ENQUEUED, {S, R, P, F}, ANY, ANY, (BAD, False)),
    (Place.DONE, {F, X}, ANY, ANY, (OK, False)),
    (Place.DONE, {E, S, R, P}, ANY, ANY, (BAD, False)),
    # running/
    (Place.RUNNING, {F, X}, ANY, ANY, (MOVE, False)),  # a finish stopped before its move
    (Place.RUNNING, {E}, ANY, ANY, (TAKE, False)),  # a re-enqueue stopped before its move
    (Place.RUNNING, {S, R, P}, None, ANY, (BAD, False)),  # running with no server: no crash does that
    (Place.RUNNING, {S, R, P}, ANY, True, (OK, False)),
    (Place.RUNNING, {S}, ANY, False, (TAKE, False)),  # a start stopped before its status write: free
    (Place.RUNNING, {R, P}, ANY, False, (TAKE, True)),  # a dead server's started task: a restart
    # scheduled/s1/
    (Place.SCHEDULED, {F, X}, ANY, ANY, (MOVE, False)),  # a holder failed it, stopped before the move
    (Place.SCHEDULED, {R, P}, ANY, ANY, (BAD, False)),  # started tasks never wait in scheduled/
    (Place.SCHEDULED, {S}, "s2", ANY, (BAD, False)),
    (Place.SCHEDULED, {S}, None, ANY, (BAD, False)),
    (Place.SCHEDULED, {S, E}, ANY, True, (OK, False)),  # E: the claim's status write is on its way
    (Place.SCHEDULED, {S, E}, ANY, False, (TAKE, False)),
]


def expected(place: Place, state: State, server: str | None, alive: bool) -> tuple[Verdict, bool]:
    for r_place, r_states, r_server, r_alive, outcome in RULES:
        if (r_place is place and state in r_states and (r_server is ANY or r_server == server)
                and (r_alive is ANY or r_alive == alive)):
            return outcome
    raise AssertionError(f"no rule for {place} {state} {server} {alive}")


CASES = list(itertools.product(list(Place), list(State), ["s1", "s2", None], [True, False]))


@pytest.mark.parametrize(("place", "state", "server", "alive"), CASES,
                         ids=[f"{p.value}-{s.name}-{v}-{'alive' if a else 'dead'}" for p, s, v, a in CASES])
def test_judge_every_state_place_server_and_liveness(place, state, server, alive):
    asked = []

    def is_alive(name: str) -> bool:
        asked.append(name)
        return alive

    result = judge(place, state, server, "s1" if place is Place.SCHEDULED else None, is_alive)
    assert (result.verdict, result.charge) == expected(place, state, server, alive)
    assert bool(result.reason) == (result.verdict is not Verdict.OK)
    # Liveness is asked only of the server that holds the claim.
    holder = "s1" if place is Place.SCHEDULED else server
    assert set(asked) <= {holder}


def test_a_task_in_its_own_place_with_a_live_server_is_always_fine():
    for state in State:
        place = PLACE_OF[state]
        server = None if state is State.ENQUEUED or state.terminal else "s1"
        assert judge(place, state, server, "s1" if place is Place.SCHEDULED else None, lambda s: True).ok


def test_places_in_lifecycle_order_follow_the_states():
    assert [PLACE_OF[s] for s in (E, S, R, F)] == list(PLACE_ORDER)
    assert PLACE_OF[P] is Place.RUNNING and PLACE_OF[X] is Place.DONE


@pytest.mark.parametrize("current", list(State))
@pytest.mark.parametrize("target", list(State))
def test_holder_moves(current, target):
    allowed = target in HOLDER_MOVES.get(current, frozenset())
    expect = (
        (current is S and target is X)
        or (current in (R, P) and target in (R, P, F, X))
    )
    assert allowed == expect
    assert (current in sources_of(target)) == expect


def test_nobody_may_move_a_task_to_enqueued_or_scheduled_as_holder():
    assert sources_of(E) == frozenset() and sources_of(S) == frozenset()


def test_claim_owns_only_its_own_number_and_server():
    claim = Claim("T", "a", 7, "s1")
    assert claim.owns({"claim": 7, "server": "s1"})
    assert not claim.owns({"claim": 8, "server": "s1"})  # claimed again
    assert not claim.owns({"claim": 7, "server": None})  # taken away
    assert not claim.owns({"claim": 7, "server": "s2"})
    assert not claim.owns({})


def test_claim_round_trips_and_refuses_junk():
    claim = Claim("T", "a.b-c", 123, "s1")
    assert Claim.parse(str(claim)) == claim and str(claim) == "T:a.b-c#123@s1"
    for junk in ("", "T:a", "T:a#x@s1", "T:a#1", "T/a#1@s1", "T:../a#1@s1", "T:a#1@-s"):
        with pytest.raises(InvalidName):
            Claim.parse(junk)


@pytest.mark.parametrize(("now", "claimed", "timeout", "out"), [
    (100.0, 50.0, 40.0, True),
    (100.0, 50.0, 50.0, False),  # exactly at the limit: not yet
    (100.0, 50.0, 0.0, False),  # no limit
    (100.0, 50.0, -1.0, False),
    (100.0, None, 10.0, False),  # never claimed
])
def test_timed_out(now, claimed, timeout, out):
    assert timed_out(now, claimed, timeout) is out


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("charge", [True, False])
def test_only_a_charged_take_away_of_a_started_task_uses_a_restart(state, charge):
    assert charges_restart(state, charge) == (charge and state in (R, P))


def test_a_task_starts_at_most_max_restarts_plus_one_times():
    max_restarts = 2
    starts = 1
    restarts = 0
    while not gives_up(restarts, max_restarts):
        restarts += 1
        starts += 1
    assert starts == max_restarts + 1


@pytest.mark.parametrize(("age", "retention", "out"), [
    (601, 600, True), (600, 600, False), (10**9, 0, False), (10**9, -1, False),
])
def test_retired(age, retention, out):
    assert retired(1000.0 + age, 1000.0, retention) is out


def test_wait_order_is_priority_then_due_then_stamp_then_name():
    k = wait_order_key
    keys = {
        "hi-late": k(50, "a", priority=5, due_ns=900),
        "hi": k(60, "b", priority=5),
        "lo-first": k(10, "c", priority=-1),
        "mid-b": k(20, "e"),
        "mid-a": k(20, "d"),
        "mid-due-early": k(30, "f", due_ns=15),  # a retry or a delayed task due earlier than it was queued
    }
    order = sorted(keys, key=keys.get)
    assert order == ["hi", "hi-late", "mid-due-early", "mid-a", "mid-b", "lo-first"]


def test_a_task_is_due_once_its_due_time_has_come():
    assert due(wait_order_key(10, "a"), 10)
    assert not due(wait_order_key(10, "a", due_ns=20), 19) and due(wait_order_key(10, "a", due_ns=20), 20)


@pytest.mark.parametrize(("attempt", "low", "high"), [(1, 5, 10), (2, 10, 20), (3, 20, 40), (10, 50, 100)])
def test_retry_delay_doubles_up_to_its_cap_with_jitter(attempt, low, high):
    assert retry_delay(attempt, 10, 100, 0.0) == low
    assert retry_delay(attempt, 10, 100, 1.0) == high
    assert low <= retry_delay(attempt, 10, 100, 0.37) <= high


def test_retry_delay_stays_a_number_after_any_count_of_retries():
    # 2**1024 is past every float (a type stores its backoff as one): the ten-thousandth retry waits the cap.
    assert retry_delay(10_000, 10.0, 3600.0, 1.0) == 3600 and retry_delay(1025, 10.0, 3600.0, 0.0) == 1800


def test_states_print_as_their_names():
    assert str(State.ENQUEUED) == "ENQUEUED" and f"{State.FAILED}" == "FAILED"
    assert int(State.PAUSED) == 4
