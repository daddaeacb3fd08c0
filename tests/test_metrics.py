"""Counters and histograms that outlive daemons and tasks (contract §12.5):
real workers, a real restart, real retirement, the CLI's exposition parsed
by prometheus_client's own parser."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from conftest import wait_until
from prometheus_client.parser import text_string_to_metric_families
from test_observe import Env, env  # noqa: F401 - the fixture

from spoolq import State


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def prometheus(env: Env) -> dict[tuple[str, frozenset], float]:
    done = env.cli("stats", "--prometheus")
    assert done.returncode == 0, done.stderr
    return samples(done.stdout.decode())


def completed(values, type_name: str, state: str) -> float:
    # The state label in lower case, as spoolq_tasks{state} has it (a PromQL
    # join of the two needed a label rewrite when this one was upper case).
    return values[("spoolq_tasks_completed_total", frozenset({("type", type_name), ("state", state.lower())}))]


def enqueue(env: Env, ids, **inp) -> None:
    for task_id in ids:
        env.spool.enqueue_json("M", task_id, {"seconds": 0.0, "steps": 1, **inp})


def all_final(env: Env, ids) -> bool:
    return all(env.spool.status("M", i).state in (State.FINISHED, State.FAILED) for i in ids)


def test_counters_survive_a_restart_and_retirement(env):  # noqa: F811
    env.spool.register_type("M", "observe_handlers.chatty", retention=0.3)
    first = [f"a{i}" for i in range(10)]
    enqueue(env, first)
    w1 = env.worker("w1", sweep_interval=3600)  # it sweeps once, at its start: `spoolq sweep` retires the rest
    wait_until(lambda: all_final(env, first), 60, "10 tasks final")
    w1.send_signal(signal.SIGTERM)
    assert w1.wait(30) == 0
    second = [f"b{i}" for i in range(5)]
    enqueue(env, second)
    env.worker("w1", sweep_interval=3600)  # the same server, restarted
    wait_until(lambda: all_final(env, second), 60, "5 more tasks final")
    time.sleep(0.4)  # past the retention of 0.3 s
    swept = env.cli("sweep", "--json")
    assert swept.returncode == 0, swept.stderr
    # The restarted worker's first sweep (at its start) may have retired the
    # first ten already; `spoolq sweep` retires the rest: none is left.
    retired = [a for a in json.loads(swept.stdout)["actions"] if a["action"] == "retired"]
    assert {a["id"] for a in retired} >= set(second)
    assert env.spool.list_tasks() == []

    def counted():
        values = prometheus(env)
        return values if completed(values, "M", "FINISHED") == 15 else None

    values = wait_until(counted, 10, "15 FINISHED counted")  # saved at most every 2 s while it runs
    assert completed(values, "M", "FAILED") == 0
    assert values[("spoolq_task_restarts_total", frozenset({("type", "M")}))] == 0
    assert values[("spoolq_task_retries_total", frozenset({("type", "M")}))] == 0
    for name in ("spoolq_task_run_seconds", "spoolq_task_wait_seconds"):
        assert values[(f"{name}_count", frozenset({("type", "M")}))] == 15
        assert values[(f"{name}_bucket", frozenset({("type", "M"), ("le", "+Inf")}))] == 15
    # The gauges of the census stay, and say the spool is empty now.
    assert values[("spoolq_tasks", frozenset({("type", "M"), ("state", "finished")}))] == 0


def test_counters_are_summed_over_servers_and_count_failures_and_restarts(env):  # noqa: F811
    env.spool.register_type("M", "observe_handlers.chatty")
    env.spool.register_type("Slow", "observe_handlers.slow_progress", timeout=0.8, max_restarts=1)
    enqueue(env, ["ok1", "ok2"])
    enqueue(env, ["bad1"], fail=True)
    w1 = env.worker("w1")
    wait_until(lambda: all_final(env, ["ok1", "ok2", "bad1"]), 60, "w1's tasks final")
    w1.send_signal(signal.SIGTERM)
    assert w1.wait(30) == 0
    env.spool.enqueue_json("Slow", "s", {"steps": 1, "hang": True})  # times out twice: 1 restart, then FAILED
    env.worker("w2")
    wait_until(lambda: env.spool.status("Slow", "s").state == State.FAILED, 60, "Slow/s FAILED")
    env.stop()  # both save at their stop

    values = prometheus(env)
    assert completed(values, "M", "FINISHED") == 2
    assert completed(values, "M", "FAILED") == 1
    assert completed(values, "Slow", "FAILED") == 1
    assert values[("spoolq_task_restarts_total", frozenset({("type", "Slow")}))] == 1
    files = sorted(p.name for p in (env.root / "metrics").iterdir())
    assert files == ["w1.json", "w2.json"]


def test_a_corrupt_metrics_file_is_reported_and_set_aside(env):  # noqa: F811
    env.spool.register_type("M", "observe_handlers.chatty")
    metrics = env.root / "metrics"
    metrics.mkdir(exist_ok=True)
    (metrics / "w9.json").write_text("{not json")
    (metrics / "junk.txt").write_text("x")
    done = env.cli("stats", "--prometheus")
    assert done.returncode == 0
    assert done.stderr.decode().splitlines() == [
        "spoolq: metrics/w9.json cannot be read; left out of the sums ('spoolq fsck' reports it)"]
    check = json.loads(env.cli("fsck", "--json").stdout)
    assert sorted((f["kind"], f["path"]) for f in check["findings"]) == [
        ("corrupt-metrics", "metrics/w9.json"), ("unknown-entry", "metrics/junk.txt")]
    repaired = env.cli("fsck", "--repair")
    assert repaired.returncode == 0, repaired.stdout
    assert sorted(os.listdir(metrics)) == []
    assert any(name.startswith("w9.json.") for name in os.listdir(env.root / "quarantine"))


def test_a_spool_from_before_metrics_works_and_gets_the_directory(env):  # noqa: F811
    env.spool.register_type("M", "observe_handlers.chatty")
    os.rmdir(env.root / "metrics")  # as a first-edition spool has it
    assert env.cli("fsck").returncode == 0
    assert env.cli("stats", "--prometheus").returncode == 0
    enqueue(env, ["x"])
    env.worker("w1")
    wait_until(lambda: all_final(env, ["x"]), 60, "x final")
    env.stop()
    assert Path(env.root / "metrics" / "w1.json").exists()
    assert completed(prometheus(env), "M", "FINISHED") == 1


def test_a_worker_whose_own_metrics_file_is_corrupt_sets_it_aside_and_counts_on(env):  # noqa: F811
    env.spool.register_type("M", "observe_handlers.chatty")
    (env.root / "metrics" / "w1.json").write_text('{"format": 1, "completed": []}')
    enqueue(env, ["x"])
    env.worker("w1")
    wait_until(lambda: all_final(env, ["x"]), 60, "x final")
    env.stop()
    assert completed(prometheus(env), "M", "FINISHED") == 1
    reasons = [p.read_text() for p in (env.root / "quarantine").glob("w1.json.*.reason")]
    assert len(reasons) == 1 and "metrics file not a metrics document" in reasons[0]


def test_retries_spent_are_counted_when_their_task_ends(env):  # noqa: F811
    env.spool.register_type("M", "observe_handlers.chatty", retries=2, retry_backoff=0.05, retry_backoff_max=0.1)
    enqueue(env, ["r"], fail=True)
    env.worker("w1")
    wait_until(lambda: env.spool.status("M", "r").state == State.FAILED, 60, "r FAILED after its retries")
    env.stop()
    assert env.spool.status("M", "r").doc["retries"] == 2
    values = prometheus(env)
    assert completed(values, "M", "FAILED") == 1  # one end, not three
    assert values[("spoolq_task_retries_total", frozenset({("type", "M")}))] == 2
    assert values[("spoolq_task_run_seconds_count", frozenset({("type", "M")}))] == 1
