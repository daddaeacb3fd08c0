"""The task lifecycle on one spool: enqueue, claim, start, state changes,
responses, lookups, FIFO, limits and the guards of docs/contract.md §2 (single process;
the races are in test_spool_races.py)."""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path

import pytest

from spoolq import (
    Claim,
    InvalidInput,
    NoResponse,
    QueueFull,
    Spool,
    SpoolError,
    StaleClaim,
    State,
    TaskExists,
    TaskNotFound,
    WrongState,
)


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under *root* with its bytes (None for directories)."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = Path(p).read_bytes()
    return out


def task_files(spool: Spool, t: str, i: str) -> dict[str, bytes]:
    path = Path(spool.locate(t, i))
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def log_states(spool: Spool, t: str, i: str) -> list[str]:
    return [r.state.name for r in spool.log_records(t, i)]


def run_to_running(spool: Spool, task_id: str = "a", server: str = "s1", value: object = (1, 2)) -> Claim:
    spool.enqueue("T", task_id, value)
    claim = spool.claim(server)
    assert claim is not None and claim.id == task_id
    spool.start(claim)
    return claim


# ----------------------------------------------------------------------------- enqueue


def test_enqueue_publishes_a_whole_task_and_leaves_tmp_empty(spool: Spool) -> None:
    info = spool.enqueue("T", "a", {"x": 1}, message="hello")
    assert info.state == State.ENQUEUED
    path = Path(spool.root, "enqueued", "T:a")
    assert info.path == str(path)
    assert sorted(p.name for p in path.iterdir()) == ["input.pkl", "log", "status.json"]
    assert pickle.loads((path / "input.pkl").read_bytes()) == {"x": 1}
    assert os.listdir(Path(spool.root, "tmp")) == []
    st = spool.status("T", "a")
    assert st.state == State.ENQUEUED and st.doc["message"] == "hello"
    records = spool.log_records("T", "a")
    assert [(r.state, r.message) for r in records] == [(State.ENQUEUED, "hello")]
    assert records[0].time.tzinfo is not None


def test_enqueue_json_is_stored_as_json_and_started_as_value(spool: Spool) -> None:
    spool.enqueue_json("T", "j", {"n": [1, 2]})
    assert Path(spool.root, "enqueued", "T:j", "input.json").read_bytes() == b'{"n": [1, 2]}'
    claim = spool.claim("s1")
    assert spool.start(claim).input == {"n": [1, 2]}


def test_enqueue_pickled_round_trips(spool: Spool) -> None:
    spool.enqueue_pickled("T", "p", pickle.dumps([3, 4]))
    assert spool.start(spool.claim("s1")).input == [3, 4]


@pytest.mark.parametrize("where", ["enqueued", "scheduled", "running", "done"])
def test_duplicate_is_refused_in_every_state(spool: Spool, where: str) -> None:
    spool.enqueue("T", "a", 1)
    if where != "enqueued":
        claim = spool.claim("s1")
        if where in ("running", "done"):
            spool.start(claim)
        if where == "done":
            spool.set_state(claim, State.FINISHED)
    before = tree(Path(spool.root))
    with pytest.raises(TaskExists):
        spool.enqueue("T", "a", 2)
    assert tree(Path(spool.root)) == before


def test_a_duplicate_is_refused_on_a_server_that_appeared_after_a_lookup(spool: Spool) -> None:
    """The listing of scheduled/ a lookup remembers is dropped as soon as a
    server directory appears (its mtime changes): a task scheduled there is
    found, and a second enqueue of it refused."""
    scheduled = Path(spool.root, "scheduled")
    old = time.time() - 60
    os.utime(scheduled, (old, old))  # unchanged for a minute: its listing is remembered
    for _ in range(2):  # the second time through the remembered listing
        with pytest.raises(TaskNotFound):
            spool.locate("T", "a")
    spool.enqueue("T", "a", 1)
    spool.claim("new-server")  # makes scheduled/new-server/
    with pytest.raises(TaskExists):
        spool.enqueue("T", "a", 2)


def test_ids_are_per_type(spool: Spool) -> None:
    spool.register_type("U", "atp_demo.handler")
    spool.enqueue("T", "a", 1)
    spool.enqueue("U", "a", 2)
    assert spool.status("T", "a").state == spool.status("U", "a").state == State.ENQUEUED
    assert spool.count_enqueued() == 2


# ----------------------------------------------------------------------------- queue limit


def test_queue_limit_counts_enqueued_only_and_full_writes_nothing(make_spool) -> None:
    spool = make_spool(max_queue=2)
    spool.enqueue("T", "a", 1)
    spool.enqueue("T", "b", 1)
    before = tree(Path(spool.root))
    with pytest.raises(QueueFull):
        spool.enqueue("T", "c", 1)
    assert tree(Path(spool.root)) == before  # nothing behind: no stage, no task
    claim = spool.claim("s1")  # a claimed task no longer counts
    spool.enqueue("T", "c", 1)
    with pytest.raises(QueueFull):
        spool.enqueue("T", "d", 1)
    spool.start(claim)
    spool.set_state(claim, State.FINISHED)
    with pytest.raises(QueueFull):
        spool.enqueue("T", "d", 1)  # nor does a done one, but 2 still wait
    assert os.listdir(Path(spool.root, "tmp")) == []


def test_reenqueue_is_never_refused_by_the_limit(make_spool) -> None:
    spool = make_spool(max_queue=2)
    spool.enqueue("T", "a", 1)
    spool.enqueue("T", "b", 1)
    first = spool.claim("s1")
    second = spool.claim("s1")
    spool.start(second)
    spool.enqueue("T", "c", 1)
    spool.enqueue("T", "d", 1)
    assert spool.hand_back(first) == "reenqueued"  # SCHEDULED back
    assert spool.abandon(second, "worker lost") == "reenqueued"  # RUNNING back, charged
    assert spool.count_enqueued() == 4


def test_max_queue_setting_is_kept_and_validated(spool_root: Path) -> None:
    Spool.init(spool_root, max_queue=5)
    assert Spool(spool_root).max_queue == 5
    Spool.init(spool_root)  # settings not given keep their value
    assert Spool(spool_root).max_queue == 5
    with pytest.raises(SpoolError):
        Spool.init(spool_root, max_queue=-1)


# ----------------------------------------------------------------------------- claim and start


def test_claim_start_finish_moves_and_logs_one_record_each(make_spool, make_clock) -> None:
    clock = make_clock(1_700_000_000.0)
    spool = make_spool(clock=clock)
    spool.enqueue("T", "a", (1, 2, 3))
    claim = spool.claim("s1", message="taken")
    assert str(claim) == f"T:a#{claim.number}@s1" and Claim.parse(str(claim)) == claim
    assert Path(spool.root, "scheduled", "s1", "T:a").is_dir()
    info = spool.status("T", "a")
    assert info.state == State.SCHEDULED and info.doc["server"] == "s1" and info.doc["claim"] == claim.number
    assert log_states(spool, "T", "a") == ["ENQUEUED", "SCHEDULED"]
    started = spool.start(claim)
    assert (started.type, started.id, started.handler, started.input) == ("T", "a", "atp_demo.handler", (1, 2, 3))
    assert Path(spool.root, "running", "T:a").is_dir()
    assert spool.status("T", "a").doc["starts"] == 1
    clock.advance(5)
    spool.set_state(claim, State.FINISHED, "done")
    done = Path(spool.root, "done", "T:a")
    assert done.is_dir()
    assert done.stat().st_mtime == pytest.approx(clock.now)  # mtime = finishing time
    assert log_states(spool, "T", "a") == ["ENQUEUED", "SCHEDULED", "RUNNING", "FINISHED"]
    assert spool.log_records("T", "a")[-1].message == "done"
    for sub in ("enqueued", "running", "tmp"):
        assert os.listdir(Path(spool.root, sub)) == []


def stored(spool: Spool, t: str, i: str) -> dict:
    """status.json as it is on disk (not as spoolq reads it)."""
    return json.loads(Path(spool.locate(t, i), "status.json").read_text())


def test_a_claim_is_its_move_and_the_start_records_it(make_spool, make_clock) -> None:
    clock = make_clock(1_700_000_000.0)
    spool = make_spool(clock=clock)
    spool.enqueue("T", "a", 1)
    before = stored(spool, "T", "a")
    clock.advance(7)
    claim = spool.claim("s1")
    task = Path(spool.root, "scheduled", "s1", "T:a")
    # On disk: moved, stamped with the claim's time, nothing written.
    assert stored(spool, "T", "a") == before and sorted(os.listdir(task)) == ["input.pkl", "log", "status.json"]
    assert task.stat().st_mtime == pytest.approx(clock.now)
    assert [line.split("\t")[1] for line in (task / "log").read_text().splitlines()] == ["ENQUEUED"]
    # Read: SCHEDULED by s1, with the claim's number and time, and its record.
    info = spool.status("T", "a")
    assert (info.state, info.doc["server"], info.doc["claim"]) == (State.SCHEDULED, "s1", claim.number)
    assert claim.number == before["claim"] + 1 and info.doc["claimed_at"] == "2023-11-14T22:13:27.000000+00:00"
    assert [(r.state, r.time.timestamp(), r.message) for r in spool.log_records("T", "a")][1:] == [
        (State.SCHEDULED, clock.now, "")]
    clock.advance(3)
    spool.start(claim)
    # The start wrote it all: the claim (dated at the claim) and RUNNING.
    doc = stored(spool, "T", "a")
    assert (doc["state"], doc["server"], doc["claim"], doc["claimed_at"]) == (
        "RUNNING", "s1", claim.number, "2023-11-14T22:13:27.000000+00:00")
    records = spool.log_records("T", "a")
    assert [(r.state, r.time.timestamp()) for r in records] == [
        (State.ENQUEUED, clock.now - 10), (State.SCHEDULED, clock.now - 3), (State.RUNNING, clock.now)]
    spool.set_state(claim, State.FINISHED)
    assert log_states(spool, "T", "a") == ["ENQUEUED", "SCHEDULED", "RUNNING", "FINISHED"]


@pytest.mark.parametrize("write", ["store_response", "log_message", "fail", "hand_back", "cancel", "delete"])
def test_the_first_write_through_an_unrecorded_claim_records_it_once(spool: Spool, write: str) -> None:
    spool.enqueue("T", "a", 1)
    claim = spool.claim("s1")
    number = claim.number
    if write == "store_response":
        spool.store_response(claim, b"r", "text/plain")
        expect, log = State.SCHEDULED, ["ENQUEUED", "SCHEDULED"]
    elif write == "log_message":
        spool.log_message(claim, "note")
        expect, log = State.SCHEDULED, ["ENQUEUED", "SCHEDULED", "SCHEDULED"]
    elif write == "fail":
        spool.set_state(claim, State.FAILED, "no")
        expect, log = State.FAILED, ["ENQUEUED", "SCHEDULED", "FAILED"]
    elif write == "hand_back":
        spool.hand_back(claim)
        expect, log = State.ENQUEUED, ["ENQUEUED", "SCHEDULED", "ENQUEUED"]
    elif write == "cancel":
        spool.cancel("T", "a", "not wanted")
        expect, log = State.FAILED, ["ENQUEUED", "SCHEDULED", "FAILED"]
    else:
        spool.delete("T", "a")
        with pytest.raises(TaskNotFound):
            spool.status("T", "a")
        with pytest.raises(StaleClaim):
            spool.start(claim)
        return
    doc = stored(spool, "T", "a")
    assert (doc["state"], doc["claim"]) == (expect.name, number)  # recorded on disk now
    assert log_states(spool, "T", "a") == log
    assert spool.status("T", "a").state == expect
    if expect is State.SCHEDULED:
        spool.start(claim)  # still the claim's
        assert log_states(spool, "T", "a") == [*log, "RUNNING"]
    else:
        with pytest.raises(StaleClaim):
            spool.start(claim)
    if expect is State.ENQUEUED:
        assert spool.claim("s2").number == number + 1


def test_a_claim_with_a_message_is_recorded_at_once(spool: Spool) -> None:
    spool.enqueue("T", "a", 1)
    claim = spool.claim("s1", message="mine")
    doc = stored(spool, "T", "a")
    assert (doc["state"], doc["server"], doc["claim"], doc["message"]) == ("SCHEDULED", "s1", claim.number, "mine")
    spool.start(claim)
    assert log_states(spool, "T", "a") == ["ENQUEUED", "SCHEDULED", "RUNNING"]


def test_an_unrecorded_claim_is_the_servers_in_its_next_process(spool: Spool) -> None:
    spool.enqueue("T", "a", 1)
    claim = spool.claim("s1")
    spool.release_server("s1")
    later = Spool(spool.root)
    later.hold_server("s1")
    info = later.status("T", "a")
    assert (info.state, info.doc["claim"]) == (State.SCHEDULED, claim.number)
    assert later.start(str(claim)).input == 1


def test_each_change_appends_exactly_one_record(spool: Spool) -> None:
    claim = run_to_running(spool)
    steps = [
        lambda: spool.set_state(claim, State.PAUSED, "wait"),
        lambda: spool.set_state(claim, State.RUNNING, "go on"),
        lambda: spool.set_state(claim, State.RUNNING, "progress 50%"),
        lambda: spool.log_message(claim, "free text"),
        lambda: spool.set_state(claim, State.FAILED, "gave up"),
    ]
    for step in steps:
        before = len(spool.log_records("T", "a"))
        step()
        assert len(spool.log_records("T", "a")) == before + 1
    before = len(spool.log_records("T", "a"))
    assert [r.message for r in spool.log_records("T", "a")][-2:] == ["free text", "gave up"]
    assert spool.status("T", "a").state == State.FAILED
    assert len(spool.log_records("T", "a")) == before


def test_store_response_adds_no_record_and_replaces_data_and_mime(spool: Spool) -> None:
    claim = run_to_running(spool)
    with pytest.raises(NoResponse):
        spool.response("T", "a")
    before = len(spool.log_records("T", "a"))
    spool.store_response(claim, b"<r/>")
    assert spool.response("T", "a") == (b"<r/>", "text/xml")  # ATP's default MIME type
    spool.store_response(claim, "grüße", "text/plain")  # str is stored as UTF-8
    assert spool.response("T", "a") == ("grüße".encode(), "text/plain")  # both replaced
    assert len(spool.log_records("T", "a")) == before
    spool.set_state(claim, State.FINISHED)
    assert spool.response("T", "a") == ("grüße".encode(), "text/plain")


def test_a_response_carries_its_mime_type_and_the_final_status_copies_it(spool: Spool) -> None:
    """The MIME type is an attribute of the response file, published with
    it by one rename (no status rewrite a response): every reader sees the
    pair, in this process and in another, while the task runs and once it
    is final; the final status.json says it; a requeue forgets both."""
    claim = run_to_running(spool)
    status_before = Path(spool.locate("T", "a"), "status.json").read_bytes()
    spool.store_response(claim, b"{}", "application/json")
    path = Path(spool.locate("T", "a"))
    assert (path / "status.json").read_bytes() == status_before  # not rewritten
    assert os.getxattr(path / "response", "user.spoolq.response_mime") == b"application/json"
    assert spool.response("T", "a") == (b"{}", "application/json")
    assert spool.status("T", "a").doc["response_mime"] == "application/json"
    other = Spool(spool.root)  # another reader: nothing remembered
    assert other.response("T", "a") == (b"{}", "application/json")
    assert other.status("T", "a").doc["response_mime"] == "application/json"
    spool.set_state(claim, State.FAILED, "no")
    assert stored(spool, "T", "a")["response_mime"] == "application/json"  # what cat shows, once final
    assert other.status("T", "a").doc["response_mime"] == "application/json"
    spool.requeue("T", "a")
    assert stored(spool, "T", "a")["response_mime"] is None
    with pytest.raises(NoResponse):
        spool.response("T", "a")


def test_a_response_type_must_be_a_short_line_of_text_and_none_means_text_xml(spool: Spool) -> None:
    """None is ATP's default type; anything that is not 1 to 255 printable
    characters is refused in one line, and nothing is stored."""
    from spoolq import InvalidInput

    claim = run_to_running(spool)
    spool.store_response(claim, b"<r/>", None)
    assert spool.response("T", "a") == (b"<r/>", "text/xml")
    path = Path(spool.locate("T", "a"))
    before = task_files(spool, "T", "a")
    for bad in ("", "t" * 256, "text/plain\nX-Injected: 1", 5, b"text/plain"):
        with pytest.raises(InvalidInput) as caught:
            spool.store_response(claim, b"other", bad)
        assert "\n" not in str(caught.value), str(caught.value)
        assert task_files(spool, "T", "a") == before, bad
    assert not (path / "response.tmp").exists()
    spool.store_response(claim, b"ok", "t" * 255)
    assert spool.response("T", "a") == (b"ok", "t" * 255)


def test_a_task_cancelled_while_waiting_for_its_retry_keeps_its_response_type(spool: Spool) -> None:
    """A run stored a response, then failed into a retry; a cancel while the
    task waits ends it without a run: its final status copies the type too."""
    spool.register_type("R", "x.y", retries=1)
    spool.enqueue("R", "r", 1)
    claim = spool.claim("s1")
    spool.start(claim)
    spool.store_response(claim, b"partial", "text/csv")
    assert spool.set_state(claim, State.FAILED, "try again") is State.ENQUEUED
    assert stored(spool, "R", "r")["response_mime"] is None  # not copied while not final
    spool.cancel("R", "r", "not wanted")
    assert stored(spool, "R", "r")["state"] == "FAILED"
    assert stored(spool, "R", "r")["response_mime"] == "text/csv"
    assert spool.response("R", "r") == (b"partial", "text/csv")


def test_without_extended_attributes_the_status_keeps_the_response_type(spool: Spool) -> None:
    """A filesystem that keeps no user attributes (the attribute's write
    fails: injected with SPOOLQ_FAIL_AT in a process of its own): the
    response is stored all the same and its type goes into the status, as
    before attributes were used."""
    import subprocess
    import sys

    claim = run_to_running(spool)
    code = (
        "import sys; from spoolq import Spool; "
        "Spool(sys.argv[1]).store_response(sys.argv[2], b'<r/>', 'text/html')"
    )
    env = {**os.environ, "SPOOLQ_FAIL_AT": "file.attribute"}
    done = subprocess.run([sys.executable, "-c", code, spool.root, str(claim)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    path = Path(spool.locate("T", "a"))
    with pytest.raises(OSError):
        os.getxattr(path / "response", "user.spoolq.response_mime")
    assert stored(spool, "T", "a")["response_mime"] == "text/html"
    assert spool.response("T", "a") == (b"<r/>", "text/html")
    spool.set_state(claim, State.FINISHED)
    assert stored(spool, "T", "a")["response_mime"] == "text/html"
    assert spool.response("T", "a") == (b"<r/>", "text/html")


def test_log_messages_round_trip_with_newlines_and_tabs(spool: Spool) -> None:
    claim = run_to_running(spool)
    text = "line one\nline\ttwo \\ back"
    spool.log_message(claim, text)
    assert spool.log_records("T", "a")[-1].message == text
    raw = Path(spool.root, "running", "T:a", "log").read_text()
    assert len(raw.splitlines()) == 4  # one line per record, readable with cat
    times = [r.time for r in spool.log_records("T", "a")]
    assert times == sorted(times)


def test_a_torn_last_log_line_is_ignored(spool: Spool) -> None:
    claim = run_to_running(spool)
    with open(Path(spool.root, "running", "T:a", "log"), "ab") as fh:
        fh.write(b"2026-01-01T00:00:00+00:00\tRUNN")
    assert log_states(spool, "T", "a") == ["ENQUEUED", "SCHEDULED", "RUNNING"]
    del claim


def test_paused_then_finish_if_not_finished(spool: Spool) -> None:
    claim = run_to_running(spool)
    spool.set_state(claim, State.PAUSED)
    assert spool.finish_if_not_finished(claim) is True
    assert spool.status("T", "a").state == State.FINISHED
    assert spool.finish_if_not_finished(claim) is False  # already final through this claim


def test_finish_if_not_finished_keeps_failed(spool: Spool) -> None:
    claim = run_to_running(spool)
    spool.set_state(claim, State.FAILED, "x")
    assert spool.finish_if_not_finished(claim) is False
    info = spool.status("T", "a")
    assert info.state == State.FAILED and info.doc["message"] == "x"


def test_a_scheduled_task_becomes_running_only_through_start(spool: Spool) -> None:
    spool.enqueue("T", "a", 1)
    claim = spool.claim("s1")
    before = task_files(spool, "T", "a")
    for state in (State.RUNNING, State.PAUSED, State.FINISHED):
        with pytest.raises(WrongState):  # the claim still holds it: not stale, the change is not allowed
            spool.set_state(claim, state)
    assert task_files(spool, "T", "a") == before
    spool.set_state(claim, State.FAILED, "cannot run")  # the holder may fail it
    assert spool.status("T", "a").state == State.FAILED
    assert Path(spool.root, "done", "T:a").is_dir()


def test_handlers_cannot_set_enqueued_or_scheduled(spool: Spool) -> None:
    claim = run_to_running(spool)
    for state in (State.ENQUEUED, State.SCHEDULED):
        with pytest.raises(SpoolError):
            spool.set_state(claim, state)


# ----------------------------------------------------------------------------- guards


@pytest.mark.parametrize("final", [State.FINISHED, State.FAILED])
def test_final_states_are_final(spool: Spool, final: State) -> None:
    claim = run_to_running(spool)
    spool.set_state(claim, final, "end")
    before = task_files(spool, "T", "a")
    writes = [
        lambda: spool.set_state(claim, State.FAILED, "late"),
        lambda: spool.set_state(claim, State.FINISHED, "late"),
        lambda: spool.set_state(claim, State.RUNNING, "late"),
        lambda: spool.set_state(claim, State.PAUSED, "late"),
        lambda: spool.store_response(claim, b"late"),
        lambda: spool.log_message(claim, "late"),
        lambda: spool.start(claim),
    ]
    for write in writes:
        with pytest.raises(StaleClaim, match=f"already {final.name}"):
            write()
    assert spool.touch(claim) is False
    assert spool.abandon(claim, "late") == "gone"
    assert task_files(spool, "T", "a") == before


def _lose_by_reenqueue(spool: Spool, claim: Claim) -> None:
    assert spool.abandon(claim, "timed out") == "reenqueued"


def _lose_by_reclaim(spool: Spool, claim: Claim) -> None:
    spool.abandon(claim, "timed out")
    other = Spool(spool.root)
    new = other.claim("s2")
    assert new is not None and new.number == claim.number + 1
    other.start(new)


def _lose_by_reclaim_same_server(spool: Spool, claim: Claim) -> None:
    spool.abandon(claim, "timed out")
    new = spool.claim(claim.server)
    assert new is not None and new.server == claim.server and new.number == claim.number + 1
    spool.start(new)


def _lose_by_delete(spool: Spool, claim: Claim) -> None:
    spool.delete(claim.type, claim.id)


def _lose_by_delete_and_enqueue_again(spool: Spool, claim: Claim) -> None:
    spool.delete(claim.type, claim.id)
    spool.enqueue(claim.type, claim.id, "second life")
    new = spool.claim(claim.server)
    spool.start(new)


LOSSES = {
    "reenqueued": _lose_by_reenqueue,
    "claimed-again-elsewhere": _lose_by_reclaim,
    "claimed-again-same-server": _lose_by_reclaim_same_server,
    "deleted": _lose_by_delete,
    "deleted-and-enqueued-again": _lose_by_delete_and_enqueue_again,
}
LATE_WRITES = {
    "set_success": lambda s, c: s.set_state(c, State.FINISHED, "late"),
    "set_failure": lambda s, c: s.set_state(c, State.FAILED, "late"),
    "set_paused": lambda s, c: s.set_state(c, State.PAUSED, "late"),
    "set_running": lambda s, c: s.set_state(c, State.RUNNING, "late"),
    "store_response": lambda s, c: s.store_response(c, b"late", "text/late"),
    "log_message": lambda s, c: s.log_message(c, "late"),
    "finish_if_not_finished": lambda s, c: s.finish_if_not_finished(c, "late"),
    "start": lambda s, c: s.start(c),
}


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("write", sorted(LATE_WRITES))
def test_a_stale_claims_late_write_is_refused_and_changes_nothing(spool: Spool, loss: str, write: str) -> None:
    claim = run_to_running(spool)
    LOSSES[loss](spool, claim)
    before = tree(Path(spool.root))
    with pytest.raises(StaleClaim):
        LATE_WRITES[write](spool, claim)
    assert spool.touch(claim) is False
    assert spool.abandon(claim, "late") == "gone"
    assert tree(Path(spool.root)) == before


def test_a_stale_scheduled_claim_is_refused_too(spool: Spool) -> None:
    spool.enqueue("T", "a", 1)
    claim = spool.claim("s1")
    spool.hand_back(claim)
    before = tree(Path(spool.root))
    with pytest.raises(StaleClaim):
        spool.start(claim)
    with pytest.raises(StaleClaim):
        spool.set_state(claim, State.FAILED)
    assert tree(Path(spool.root)) == before


def test_touch_marks_a_running_task_alive(spool: Spool, make_clock) -> None:
    clock = make_clock(1_800_000_000.0)
    spool = Spool(spool.root, clock=clock)
    spool.enqueue("T", "a", 1)
    claim = spool.claim("s1")
    assert spool.touch(claim) is False  # not started yet
    spool.start(claim)
    clock.advance(100)
    assert spool.touch(claim) is True
    assert Path(spool.root, "running", "T:a").stat().st_mtime == pytest.approx(clock.now)


# ----------------------------------------------------------------------------- taking tasks away


def test_hand_back_of_a_scheduled_task_costs_no_restart(spool: Spool) -> None:
    spool.enqueue("T", "a", 1)
    claim = spool.claim("s1")
    assert spool.abandon(claim, "server stopping") == "reenqueued"  # even charged: never started
    info = spool.status("T", "a")
    assert info.state == State.ENQUEUED and info.doc["restarts"] == 0 and info.doc["server"] is None
    assert spool.log_records("T", "a")[-1].message == "server stopping"


def test_abandon_charges_restarts_then_fails(make_spool) -> None:
    spool = make_spool()
    spool.register_type("R", "atp_demo.handler", max_restarts=1)
    spool.enqueue("R", "a", 1)
    claim = spool.claim("s1")
    spool.start(claim)
    assert spool.abandon(claim, "worker died") == "reenqueued"
    assert spool.status("R", "a").doc["restarts"] == 1
    claim = spool.claim("s1")
    spool.start(claim)
    assert spool.hand_back(claim, "graceful stop") == "reenqueued"  # not charged
    claim = spool.claim("s1")
    spool.start(claim)
    assert spool.abandon(claim, "worker died") == "failed"
    info = spool.status("R", "a")
    assert info.state == State.FAILED
    assert info.doc["message"] == "worker died; gave up after 3 start(s)"
    assert Path(spool.root, "done", "R:a").is_dir()


def test_delete_in_every_state(spool: Spool) -> None:
    spool.enqueue("T", "e", 1)
    spool.enqueue("T", "s", 1)
    spool.enqueue("T", "r", 1)
    spool.enqueue("T", "d", 1)
    spool.claim("s1")  # e
    c_s = spool.claim("s1")
    spool.hand_back(c_s)  # s back at the end; claim r next
    c_r = spool.claim("s1")
    spool.start(c_r)
    c_d = spool.claim("s1")
    spool.start(c_d)
    spool.set_state(c_d, State.FINISHED)
    states = {i: spool.status("T", i).state for i in "esrd"}
    assert states == {"e": State.SCHEDULED, "s": State.ENQUEUED, "r": State.RUNNING, "d": State.FINISHED}
    for i in "esrd":
        spool.delete("T", i)
        with pytest.raises(TaskNotFound):
            spool.status("T", i)
    with pytest.raises(TaskNotFound):
        spool.delete("T", "e")
    assert os.listdir(Path(spool.root, "tmp")) == []
    assert spool.counts() == {s.name: 0 for s in State}


# ----------------------------------------------------------------------------- FIFO


def test_one_claimer_takes_tasks_in_enqueue_order(spool: Spool) -> None:
    ids = [f"t{n:02d}" for n in range(30)]
    for i in reversed(range(30)):  # names sort against the enqueue order
        spool.enqueue("T", ids[i], i)
    assert spool.waiting() == [f"T:{ids[i]}" for i in reversed(range(30))]
    got = [spool.claim("s1").id for _ in range(30)]
    assert got == list(reversed(ids))
    assert spool.claim("s1") is None


def test_a_reenqueued_task_goes_to_the_back(spool: Spool) -> None:
    for i in "abc":
        spool.enqueue("T", i, 1)
    first = spool.claim("s1")
    assert first.id == "a"
    spool.hand_back(first)
    spool.enqueue("T", "d", 1)
    assert [spool.claim("s1").id for _ in range(4)] == ["b", "c", "a", "d"]


def test_claim_sees_tasks_enqueued_after_its_scan(spool: Spool) -> None:
    spool.enqueue("T", "a", 1)
    spool.enqueue("T", "b", 1)
    assert spool.claim("s1").id == "a"  # the scan saw a and b
    spool.enqueue("T", "c", 1)
    assert [spool.claim("s1").id, spool.claim("s1").id] == ["b", "c"]
    assert spool.claim("s1") is None


def test_claim_skips_an_entry_reenqueued_since_its_scan(spool: Spool) -> None:
    for i in "abc":
        spool.enqueue("T", i, 1)
    assert spool.claim("s1").id == "a"  # s1's scan holds b, c
    other = Spool(spool.root)
    b = other.claim("s2")
    assert b.id == "b"
    other.start(b)
    other.hand_back(b)  # it ran: b is now behind c
    assert [spool.claim("s1").id, spool.claim("s1").id] == ["c", "b"]


def test_a_claim_handed_back_unstarted_keeps_its_place(spool: Spool) -> None:
    """A claim handed back before its start (no slot of its type was free
    after all, on another server) went to the back of the queue: a type at
    its concurrency on several servers ran its tasks out of order (an
    outside tester)."""
    for i in "abc":
        spool.enqueue("T", i, 1)
    a = spool.claim("s1")
    spool.hand_back(a, "not started on server s1: all 1 slots of T are taken")
    fresh = Spool(spool.root)  # (its index is a fresh scan: spool's own still holds b and c)
    assert [fresh.claim("s2").id for _ in range(3)] == ["a", "b", "c"]


def test_claim_with_names_tries_only_those(spool: Spool) -> None:
    for i in "abc":
        spool.enqueue("T", i, 1)
    assert spool.claim("s1", names=["T:zzz", "T:c"]).id == "c"
    assert spool.claim("s1", names=["T:c"]) is None


# ----------------------------------------------------------------------------- lookups and listings


def test_lookup_follows_the_task_through_every_directory(spool: Spool) -> None:
    spool.enqueue("T", "a", 1)
    assert spool.locate("T", "a") == os.path.join(spool.root, "enqueued", "T:a")
    claim = spool.claim("s1")
    assert spool.locate("T", "a") == os.path.join(spool.root, "scheduled", "s1", "T:a")
    spool.start(claim)
    assert spool.status("T", "a").path == os.path.join(spool.root, "running", "T:a")
    spool.set_state(claim, State.FINISHED)
    assert spool.status("T", "a").as_json()["path"] == os.path.join(spool.root, "done", "T:a")
    assert spool.status("T", "a").as_json()["state"] == "FINISHED"
    with pytest.raises(TaskNotFound):
        spool.status("T", "nope")


def test_list_counts_and_types(spool: Spool) -> None:
    spool.register_type("U", "atp_demo.boom")
    for i in range(3):
        spool.enqueue("T", f"t{i}", i)
    spool.enqueue("U", "u0", 0)
    c0 = spool.claim("s1")
    c1 = spool.claim("s1")
    spool.start(c1)
    spool.set_state(c1, State.PAUSED)
    c2 = spool.claim("s1")
    spool.start(c2)
    spool.set_state(c2, State.FAILED)
    counts = spool.counts()
    assert counts == {"ENQUEUED": 1, "SCHEDULED": 1, "RUNNING": 0, "PAUSED": 1, "FINISHED": 0, "FAILED": 1}
    assert [t.id for t in spool.list_tasks(state=State.PAUSED)] == [c1.id]
    assert [t.id for t in spool.list_tasks(type_name="U")] == ["u0"]
    assert len(spool.list_tasks()) == 4
    assert [t.name for t in spool.types()] == ["T", "U"]
    assert {(t, i) for t, i, _ in spool.iter_tasks()} == {("T", "t0"), ("T", "t1"), ("T", "t2"), ("U", "u0")}
    del c0


def test_register_normalises_and_updates_in_place(spool: Spool) -> None:
    t = spool.register_type("N", "m.f")
    assert (t.timeout, t.retention, t.max_restarts) == (3600, -1, 2)
    t = spool.register_type("N", "m.g", timeout=-5, retention=0, max_restarts=-3)
    assert (t.handler, t.timeout, t.retention, t.max_restarts) == ("m.g", 0, -1, 0)
    assert spool.get_type("N") == t
    assert Spool(spool.root).get_type("N") == t
    with pytest.raises(SpoolError):
        spool.register_type("N", "nodots")


def test_a_type_registered_again_is_seen_at_once_by_other_spool_objects(spool: Spool) -> None:
    reader = Spool(spool.root)
    for timeout in range(1, 30):  # far quicker than the file-time tick
        spool.register_type("R", "m.f", timeout=timeout)
        assert reader.get_type("R").timeout == timeout


def test_a_registry_moment_looks_at_each_type_once_and_sees_its_own_changes(spool: Spool) -> None:
    """registry.moment() (a turn of the worker's loop): a type registered
    again elsewhere is seen after the moment; one registered through this
    registry at once."""
    other = Spool(spool.root)
    registry = spool.registry
    with registry.moment():
        assert registry.get("T").timeout == spool.get_type("T").timeout
        other.register_type("T", "daemon_handlers.add", timeout=123)
        assert registry.get("T").timeout != 123  # looked at already in this moment
        spool.register_type("T", "daemon_handlers.add", timeout=77)
        assert registry.get("T").timeout == 77  # its own change
    other.register_type("T", "daemon_handlers.add", timeout=55)
    assert registry.get("T").timeout == 55  # the moment is over


def test_a_wait_with_a_timeout_that_is_no_duration_is_refused(spool: Spool) -> None:
    """nan waited forever and a negative timeout ended at once, both silently."""
    spool.enqueue("T", "w", 1)
    for bad in (float("nan"), -1.0, float("inf")):
        with pytest.raises(InvalidInput):
            spool.wait("T", "w", bad)
    assert spool.wait("T", "w", 0) is None


def test_a_task_sent_back_shows_no_progress_of_the_run_it_lost(spool: Spool) -> None:
    """`status --json` of a task handed back showed ENQUEUED with the killed
    run's "step 3": a waiting task has no run, so no progress."""
    from spoolq.task import TaskContext

    spool.enqueue("T", "p", 1)
    claim = spool.claim("s1")
    spool.start(claim)
    context = TaskContext(spool, claim)
    context.progress(3, 10, "step 3")
    assert spool.status("T", "p").progress["message"] == "step 3"
    spool.hand_back(claim, "stopping")
    assert spool.status("T", "p").state is State.ENQUEUED and spool.status("T", "p").progress is None
    again = spool.claim("s1")
    spool.start(again)
    spool.set_state(again, State.FINISHED)
    assert spool.status("T", "p").state is State.FINISHED


def test_a_response_that_cannot_be_written_leaves_no_half_written_file(spool: Spool, tmp_path: Path) -> None:
    """A store_response that failed (the handler's file size limit, a full
    disk) left response.tmp in the task, which fsck then reported until
    someone ran --repair (an outside tester)."""
    import subprocess
    import sys

    claim = run_to_running(spool)
    code = (
        "import resource, signal, sys\n"
        "from spoolq import Spool\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (10, resource.RLIM_INFINITY))\n"
        "try:\n"
        "    Spool(sys.argv[1]).store_response(sys.argv[2], b'y' * 100, 'text/plain')\n"
        "except OSError as exc:\n"
        "    print(exc.errno)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, spool.root, str(claim)], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip() == "27", done.stdout + done.stderr  # EFBIG
    path = Path(spool.locate("T", "a"))
    assert not (path / "response.tmp").exists()
    with pytest.raises(NoResponse):
        spool.response("T", "a")
