"""The index of waiting tasks (spoolq.store.queue.WaitingIndex) on a real
spool: a rescan pass taken a step at a time, as the daemon spreads it over
its loop's turns."""

from __future__ import annotations

from spoolq import Spool
from spoolq.store.queue import WaitingIndex


def waiting_spool(make_spool, n: int) -> Spool:
    spool = make_spool()
    for i in range(n):
        spool.enqueue("T", f"t{i}", i)
    return spool


def test_a_pass_indexes_as_it_goes_and_completes_the_index_at_its_end(make_spool) -> None:
    spool = waiting_spool(make_spool, 5)
    index = WaitingIndex(spool.layout)
    steps = index.rescan_steps()
    next(steps)
    next(steps)
    assert 1 <= len(index) < 5 and not index.complete  # found as it went; not all yet
    for _ in steps:
        pass
    assert index.complete and len(index) == 5
    assert [index.pop() for _ in range(6)] == [f"T:t{i}" for i in range(5)] + [None]  # FIFO


def test_a_pass_drops_what_is_gone_and_keeps_what_arrived_meanwhile(make_spool) -> None:
    spool = waiting_spool(make_spool, 5)
    index = WaitingIndex(spool.layout)
    index.rescan()
    spool.delete("T", "t1")  # gone before the next pass: its key goes at the pass's end
    steps = index.rescan_steps()
    next(steps)
    spool.enqueue("T", "late", 0)  # the pass may or may not meet it in the directory
    index.add("T:late")  # as the daemon's file event adds it
    for _ in steps:
        pass
    assert "T:t1" not in index and "T:late" in index and len(index) == 5


def test_a_pass_dropped_midway_keeps_the_index_as_it_was(make_spool) -> None:
    spool = waiting_spool(make_spool, 5)
    index = WaitingIndex(spool.layout)
    index.rescan()
    spool.delete("T", "t1")
    steps = index.rescan_steps()
    next(steps)
    next(steps)
    steps.close()
    assert "T:t1" in index and len(index) == 5 and index.complete  # nothing dropped
    assert [index.pop() for _ in range(5)] == ["T:t0", "T:t2", "T:t3", "T:t4", None]  # the stale key is skipped
    index.rescan()  # popped is not claimed: they are all found again, but t1
    assert len(index) == 4 and "T:t1" not in index


def test_tasks_put_back_after_a_gate_keep_their_place_without_a_look_each(make_spool) -> None:
    """Tasks parked behind a gate (a held type) went back to the index with
    an lstat each when it opened: 3 s for 77,000 tasks to obey a release
    (an outside tester). Put back with what pop() knew, they keep their
    order, and the directory is not read (a task deleted meanwhile is
    indexed still: its claim finds it gone, as any claim may)."""
    spool = waiting_spool(make_spool, 5)
    index = WaitingIndex(spool.layout)
    index.rescan()
    parked = []
    while (name := index.pop()) is not None:
        parked.append((name, index.popped))
    spool.delete("T", "t2")
    for name, entry in reversed(parked):
        index.put_back(name, entry)
    assert [index.pop() for _ in range(5)] == [f"T:t{i}" for i in range(5) if i != 2] + [None]
    # (t2 was dropped by pop(), which looks: the one look a claim needs)
