"""Lifecycle throughput: N tiny tasks through each backend in one process.

For every round, mode (non-durable, durable) and backend -- backends in
order, reversed every other round -- a fresh directory is made, N tasks are enqueued,
then each is taken through claim -> start -> store response -> finish (or the
peer's nearest equivalent, see backends.py). tasks/s = N / (enqueue time +
process time). Ratios to the floor, huey FileStorage and dirq.Queue are taken
within each round and mode, then the median over rounds is reported, as is
the median tasks/s.

    python bench/lifecycle.py                 # N=5000, 3 rounds, both modes
    python bench/lifecycle.py --n 500 --rounds 1 --backends floor,spoolq
    python bench/lifecycle.py --child floor --mode durable --n 200   # one run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
import traceback

import common
from backends import ALL, BY_NAME

MODES = ("non-durable", "durable")
REFERENCES = {"floor": "floor", "huey": "huey.FileStorage", "dirq": "dirq.Queue"}


def payload(i: int):
    return {"i": i, "args": [1, 2, 3]}


class RunTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise RunTimeout in this (main) thread after `seconds`: a hung backend
    (say, a lock never released) fails its run instead of the whole bench."""
    if not seconds:
        yield
        return

    def on_alarm(signum, frame):
        raise RunTimeout(f"run did not finish in {seconds:g}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_once(cls, n: int, durable: bool, ws: common.Workspace, timeout: float = 0) -> dict:
    with time_limit(timeout):
        return _run_once(cls, n, durable, ws)


def _run_once(cls, n: int, durable: bool, ws: common.Workspace) -> dict:
    b = cls()
    label = cls.name.replace(".", "_").lower() + ("-d" if durable else "-nd")
    with ws.run_dir(label) as root:
        b.open(root, durable)
        try:
            enqueue, process_one = b.enqueue, b.process_one
            t0 = time.perf_counter()
            for i in range(n):
                enqueue(i, payload(i))
            t1 = time.perf_counter()
            for _ in range(n):
                process_one()
            t2 = time.perf_counter()
            b.verify(n)
        finally:
            b.close()
    return {
        "enqueue_s": t1 - t0,
        "process_s": t2 - t1,
        "total_s": t2 - t0,
        "tasks_per_s": n / (t2 - t0),
    }


def plan(names, modes):
    """Backends to run per mode, and the ones skipped with the reason."""
    runs, skipped = {}, []
    for mode in modes:
        runs[mode] = []
        for name in names:
            cls = BY_NAME[name]
            why = cls.available()
            if why is None and mode == "durable" and cls.durable_support is None:
                why = "no durable (fsync) mode"
            if why is None:
                runs[mode].append(cls)
            else:
                skipped.append({"backend": name, "mode": mode, "reason": why})
    return runs, skipped


def summarize(runs, names, modes):
    summary = []
    for mode in modes:
        for name in names:
            mine = [r for r in runs if r["backend"] == name and r["mode"] == mode]
            if not mine:
                continue
            row = {
                "backend": name,
                "mode": mode,
                "n": mine[0]["n"],
                "rounds": len(mine),
                "errors": sum(1 for r in mine if r.get("error")),
                "tasks_per_s": [r.get("tasks_per_s") for r in mine],
                "tasks_per_s_median": common.median(r.get("tasks_per_s") for r in mine),
                "enqueue_s_median": common.median(r.get("enqueue_s") for r in mine),
                "process_s_median": common.median(r.get("process_s") for r in mine),
            }
            for key, ref in REFERENCES.items():
                per_round = []
                for r in mine:
                    other = next((o for o in runs if o["backend"] == ref and o["mode"] == mode
                                  and o["round"] == r["round"]), None)
                    if other and other.get("tasks_per_s") and r.get("tasks_per_s"):
                        per_round.append(r["tasks_per_s"] / other["tasks_per_s"])
                row[f"ratio_{key}"] = per_round
                row[f"ratio_{key}_median"] = common.median(per_round)
            summary.append(row)
    return summary


def report(data) -> str:
    """The markdown table of a lifecycle.json."""
    return table(data["summary"], data["skipped"])


def table(summary, skipped) -> str:
    headers = ["backend", "mode", "N", "tasks/s (median)", "x floor", "x huey FileStorage",
               "x dirq.Queue"]
    rows = []
    for s in summary:
        tps = common.fmt_num(s["tasks_per_s_median"])
        if s["errors"]:
            tps += f" ({s['errors']} failed)"
        rows.append([s["backend"], s["mode"], s["n"], tps,
                     common.fmt_ratio(s["ratio_floor_median"]),
                     common.fmt_ratio(s["ratio_huey_median"]),
                     common.fmt_ratio(s["ratio_dirq_median"])])
    for k in skipped:
        rows.append([k["backend"], k["mode"], "", f"skipped: {k['reason']}", "", "", ""])
    return common.markdown_table(headers, rows)


def run_round_interleaved(classes, n: int, durable: bool, ws: common.Workspace, chunk: int, rnd: int,
                          timeout: float = 0) -> dict:
    """Every backend of a round side by side, in one process: all open at
    once, each in its own directory; the N enqueues are made in chunks of
    `chunk` tasks, each chunk visiting the backends in a rotated order, then
    the N process_one() calls likewise. Each backend's enqueue and process
    times are the sums of its own chunks. The machine and the filesystem
    change state within minutes here (inode creation 3x slower for a while,
    other test suites); interleaved, every backend meets the same states.
    Returns {backend name: result or {"error": ...}}."""
    with time_limit(timeout * len(classes) if timeout else 0), contextlib.ExitStack() as stack:
        live, out = [], {}
        for cls in classes:
            label = cls.name.replace(".", "_").lower() + ("-d" if durable else "-nd")
            b = cls()
            try:
                b.open(stack.enter_context(ws.run_dir(label)), durable)
                stack.callback(b.close)
                live.append((cls, b))
                out[cls.name] = {"enqueue_s": 0.0, "process_s": 0.0}
            except Exception as e:  # noqa: BLE001 - report, go on with the others
                traceback.print_exc()
                out[cls.name] = {"error": f"{type(e).__name__}: {e}"}
        for phase in ("enqueue_s", "process_s"):
            for k, start in enumerate(range(0, n, chunk)):
                stop = min(n, start + chunk)
                j = (k + rnd) % len(live) if live else 0
                for cls, b in live[j:] + live[:j]:
                    rec = out[cls.name]
                    if "error" in rec:
                        continue
                    t0 = time.perf_counter()
                    try:
                        if phase == "enqueue_s":
                            for i in range(start, stop):
                                b.enqueue(i, payload(i))
                        else:
                            for _ in range(start, stop):
                                b.process_one()
                    except Exception as e:  # noqa: BLE001
                        traceback.print_exc()
                        rec["error"] = f"{type(e).__name__}: {e}"
                        continue
                    rec[phase] += time.perf_counter() - t0
        for cls, b in live:
            rec = out[cls.name]
            if "error" in rec:
                continue
            try:
                b.verify(n)
            except Exception as e:  # noqa: BLE001
                rec["error"] = f"{type(e).__name__}: {e}"
                continue
            rec["total_s"] = rec["enqueue_s"] + rec["process_s"]
            rec["tasks_per_s"] = n / rec["total_s"]
    return out


def _rounds(a, todo, modes, n_for, ws, runs) -> None:
    for rnd in range(a.rounds):
        for mode in modes:
            # Forward, then backward, then forward...: the pairs the targets
            # compare (floor-spoolq, spoolq-huey) always run back to back, and
            # no backend is always first (the first run of a round pays for
            # whatever the machine did just before).
            order = todo[mode] if rnd % 2 == 0 else todo[mode][::-1]
            if a.interleave:
                load = os.getloadavg()[0]
                try:
                    res = run_round_interleaved(order, n_for[mode], mode == "durable", ws, a.interleave, rnd,
                                                a.timeout)
                except Exception as e:  # a hang: the whole round fails
                    traceback.print_exc()
                    res = {cls.name: {"error": f"{type(e).__name__}: {e}"} for cls in order}
                for cls in order:
                    rec = {"round": rnd, "mode": mode, "backend": cls.name, "n": n_for[mode],
                           "load1_before": load, "interleaved": a.interleave, **res[cls.name]}
                    runs.append(rec)
                    msg = f"{rec['tasks_per_s']:10,.0f} tasks/s" if "error" not in rec else "FAILED " + rec["error"]
                    print(f"round {rnd + 1}/{a.rounds} {mode:11} {cls.name:30} {msg}", file=sys.stderr)
                continue
            for cls in order:
                rec = {"round": rnd, "mode": mode, "backend": cls.name, "n": n_for[mode],
                       "load1_before": os.getloadavg()[0]}  # other work on the machine
                try:
                    rec.update(run_once(cls, n_for[mode], mode == "durable", ws, a.timeout))
                    msg = f"{rec['tasks_per_s']:10,.0f} tasks/s"
                except Exception as e:  # report, keep benchmarking the others
                    rec["error"] = f"{type(e).__name__}: {e}"
                    msg = "FAILED " + rec["error"]
                    traceback.print_exc()
                runs.append(rec)
                print(f"round {rnd + 1}/{a.rounds} {mode:11} {cls.name:30} {msg}", file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000, help="tasks per run (default %(default)s)")
    ap.add_argument("--n-durable", type=int, default=500,
                    help="tasks per durable run (default %(default)s: durable runs are fsync-bound, "
                    "~10x slower per task; see README)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default %(default)s)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of %s" % ", ".join(MODES))
    ap.add_argument("--backends", default=",".join(b.name for b in ALL),
                    help="comma list (default: all): %(default)s")
    ap.add_argument("--interleave", type=int, default=50, metavar="CHUNK",
                    help="run a round's backends side by side in chunks of CHUNK tasks (default %(default)s; "
                    "0: one backend after the other)")
    ap.add_argument("--timeout", type=float, default=300,
                    help="seconds one run may take before it is failed (0: none); default %(default)s")
    ap.add_argument("--json", default="lifecycle.json", help="file in bench/results/ ('' for none)")
    ap.add_argument("--child", metavar="BACKEND", help="run BACKEND once (for strace) and exit")
    ap.add_argument("--mode", choices=MODES, default="non-durable", help="mode for --child")
    common.add_base_dir_arg(ap)
    common.add_cleanup_arg(ap)
    a = ap.parse_args(argv)

    if a.child:
        with common.Workspace(a.dir, a.cleanup) as ws:
            res = run_once(BY_NAME[a.child], a.n, a.mode == "durable", ws, a.timeout)
        print(json.dumps(res))
        return 0

    names = [x for x in a.backends.split(",") if x]
    modes = [m for m in MODES if m in a.modes.split(",")]
    for x in names:
        if x not in BY_NAME:
            ap.error(f"unknown backend {x!r}; known: {', '.join(BY_NAME)}")
    n_for = {"non-durable": a.n, "durable": a.n_durable}
    todo, skipped = plan(names, modes)

    runs = []
    t_start = time.monotonic()
    with common.Workspace(a.dir, a.cleanup) as ws:
        _rounds(a, todo, modes, n_for, ws, runs)
    elapsed = time.monotonic() - t_start

    summary = summarize(runs, names, modes)
    out = {
        "meta": common.meta(a.dir, n=a.n, n_durable=n_for["durable"], rounds=a.rounds, interleave=a.interleave,
                            elapsed_s=round(elapsed, 1), cleanup=a.cleanup),
        "backends": {b.name: b.note for b in ALL if b.name in names},
        "skipped": skipped,
        "runs": runs,
        "summary": summary,
    }
    print(table(summary, skipped))
    if a.json:
        print("wrote", common.write_json(a.json, out), file=sys.stderr)
    return 1 if any(r.get("error") for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
