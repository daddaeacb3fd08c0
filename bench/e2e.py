"""End-to-end daemon throughput: N no-op tasks drained by a daemon with 2 workers.

For each round and daemon (order rotated per round): a fresh directory, the
daemon started as a subprocess and warmed up with one task, then the clock
runs from the first enqueue (this process enqueues all N through the Python
API) until every task's result is present. tasks/s = N / that time; the
spoolq/huey ratio is taken per round, then the median.

The producer is part of that clock, and spoolq's enqueue (a task directory
of 3 files) costs more than huey's (one file), so the same daemon then
drains a backlog: the daemon and all its processes are stopped (SIGSTOP),
N more tasks are enqueued, the processes are continued (SIGCONT) and the
clock runs from then until the last result is present: the daemons'
throughput alone, producer excluded.

    huey            huey_consumer huey_app.huey -w 2 -k process   (FileStorage)
    spoolq          python -m spoolq --root R worker S --concurrency 2
                    (daemons.py: SpoolqDaemon), spool non-durable
    spoolq-durable  the same on a durable spool; its "x spoolq non-durable"
                    ratio, taken per round, is the cost of durability

    python bench/e2e.py                  # N=1000, 3 rounds, all three
    python bench/e2e.py --durable        # "spoolq" durable too (huey has no such mode)
    python bench/e2e.py --daemons huey,spoolq
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import common
from daemons import DAEMONS


def run_once(cls, n: int, durable: bool, concurrency: int, ws, timeout: float) -> dict:
    with ws.run_dir(f"e2e-{cls.name}") as root:
        with cls(root, durable, concurrency) as d:
            t0 = time.monotonic()
            handles = [d.enqueue_noop(i) for i in range(n)]
            t1 = time.monotonic()
            t2 = common.wait_until_all(handles, d.is_done, timeout)
            pids = d.pause()
            try:
                backlog = [d.enqueue_noop(n + i) for i in range(n)]
            finally:
                t3 = time.monotonic()
                d.resume(pids)
            t4 = common.wait_until_all(backlog, d.is_done, timeout)
    return {"enqueue_s": t1 - t0, "total_s": t2 - t0, "tasks_per_s": n / (t2 - t0),
            "drain_s": t4 - t3, "drain_tasks_per_s": n / (t4 - t3)}


def report(data) -> str:
    """The markdown table of an e2e.json."""
    n = data["meta"]["n"]
    rows = [[s["daemon"], s["note"], s["mode"], n,
             common.fmt_num(s["tasks_per_s_median"]) + (f" ({s['errors']} failed)" if s["errors"] else ""),
             common.fmt_ratio(s["ratio_huey_median"]),
             common.fmt_ratio(s.get("ratio_spoolq_median")),
             common.fmt_num(s.get("drain_tasks_per_s_median")),
             common.fmt_ratio(s.get("drain_ratio_huey_median"))] for s in data["summary"]]
    rows += [[k["daemon"], "", "", "", f"skipped: {k['reason']}", "", "", "", ""] for k in data["skipped"]]
    return common.markdown_table(["daemon", "command", "mode", "N", "end to end: tasks/s (median)",
                                  "x huey consumer", "x spoolq non-durable", "backlog drain: tasks/s",
                                  "x huey consumer"], rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--daemons", default=",".join(DAEMONS))
    ap.add_argument("--durable", action="store_true", help="spoolq in durable mode (default: non-durable)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for one drain")
    ap.add_argument("--json", default="e2e.json")
    common.add_base_dir_arg(ap)
    common.add_cleanup_arg(ap)
    a = ap.parse_args(argv)

    todo, skipped = [], []
    for name in [x for x in a.daemons.split(",") if x]:
        why = DAEMONS[name].available()
        (skipped.append({"daemon": name, "reason": why}) if why else todo.append(DAEMONS[name]))

    runs = []
    with common.Workspace(a.dir, a.cleanup) as ws:
        for rnd in range(a.rounds):
            k = rnd % len(todo) if todo else 0
            for cls in todo[k:] + todo[:k]:
                rec = {"round": rnd, "daemon": cls.name, "n": a.n, "load1_before": os.getloadavg()[0]}
                try:
                    rec.update(run_once(cls, a.n, a.durable, a.concurrency, ws, a.timeout))
                    msg = (f"{rec['tasks_per_s']:8,.0f} tasks/s ({rec['total_s']:.2f}s, enqueue {rec['enqueue_s']:.2f}s);"
                           f" backlog drain {rec['drain_tasks_per_s']:8,.0f} tasks/s")
                except Exception as e:
                    rec["error"] = f"{type(e).__name__}: {e}"
                    msg = "FAILED " + rec["error"]
                    traceback.print_exc()
                runs.append(rec)
                print(f"round {rnd + 1}/{a.rounds} {cls.name:8} {msg}", file=sys.stderr)

    summary = []
    for cls in todo:
        mine = [r for r in runs if r["daemon"] == cls.name]
        ratios, drain_ratios = [], []
        for r in mine:
            h = next((o for o in runs if o["daemon"] == "huey" and o["round"] == r["round"]), None)
            if h and h.get("tasks_per_s") and r.get("tasks_per_s"):
                ratios.append(r["tasks_per_s"] / h["tasks_per_s"])
            if h and h.get("drain_tasks_per_s") and r.get("drain_tasks_per_s"):
                drain_ratios.append(r["drain_tasks_per_s"] / h["drain_tasks_per_s"])
        own = []  # against spoolq's non-durable run of the same round (the cost of durability)
        for r in mine:
            o = next((x for x in runs if x["daemon"] == "spoolq" and x["round"] == r["round"]), None)
            if o and o.get("tasks_per_s") and r.get("tasks_per_s"):
                own.append(r["tasks_per_s"] / o["tasks_per_s"])
        summary.append({
            "daemon": cls.name, "note": cls.mode_note,
            "mode": "n/a (no fsync)" if cls.name == "huey" else
                    ("durable" if a.durable or cls.name.endswith("durable") else "non-durable"),
            "ratio_spoolq": own, "ratio_spoolq_median": common.median(own),
            "errors": sum(1 for r in mine if r.get("error")),
            "tasks_per_s": [r.get("tasks_per_s") for r in mine],
            "tasks_per_s_median": common.median(r.get("tasks_per_s") for r in mine),
            "ratio_huey": ratios, "ratio_huey_median": common.median(ratios),
            "enqueue_s_median": common.median(r.get("enqueue_s") for r in mine),
            "drain_tasks_per_s": [r.get("drain_tasks_per_s") for r in mine],
            "drain_tasks_per_s_median": common.median(r.get("drain_tasks_per_s") for r in mine),
            "drain_ratio_huey": drain_ratios, "drain_ratio_huey_median": common.median(drain_ratios),
        })
    out = {
        "meta": common.meta(a.dir, n=a.n, rounds=a.rounds, concurrency=a.concurrency, durable=a.durable),
        "skipped": skipped, "runs": runs, "summary": summary,
    }
    print(report(out))
    if a.json:
        print("wrote", common.write_json(a.json, out), file=sys.stderr)
    return 1 if any(r.get("error") for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
