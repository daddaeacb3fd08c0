"""Bulk enqueue (issue 12): Spool.enqueue_many against single enqueues and the floor.

Four ways to put N tasks (JSON input ``{"i": i, "args": [1, 2, 3]}``) into a
fresh spool, each in both modes (non-durable, durable):

    bulk          one ``Spool.enqueue_many(TYPE, items)`` call: every task
                  built in tmp/ without a sync, then (durable) one barrier
                  (syncfs of the spool's filesystem), all published under one
                  acquisition of the enqueue lock, enqueued/ and tmp/ fsynced
                  once (spoolq/producer.py)
    single        a loop of ``Spool.enqueue_json`` (the same input file,
                  input.json); durable: each task fsyncs its three files, its
                  directory, enqueued/ and tmp/
    floor-batch   spoolq's layout with plain os calls, the group commit done
                  the least way: per task mkdir tmp/ID, create input.json,
                  status.json, log (no sync); durable: one syncfs; then a
                  rename per task into enqueued/; durable: fsync enqueued/
                  and tmp/ once
    floor-single  ``floor.Floor.enqueue`` per task (bench/floor.py); durable:
                  6 fsyncs a task

Timed: the enqueue call(s) only (the items list is built before the clock
starts; the count in enqueued/ is checked after it stops). Durable single
enqueues are fsync-bound (about 6 fsyncs a task, several ms each here), so
they run at --n-single tasks (default 200) while bulk and floor-batch run at
--n; everything is reported per task (tasks/s). Non-durable, all run at --n.

Within a round all variants of a mode run back to back, in an order rotated
each round (the machine and this disk change state within minutes: see
README, "The machine"); the ratios bulk/single, bulk/floor-batch,
bulk/floor-single and single/floor-single are taken within a round, then the
median and the range over the rounds are reported.

The durable barrier is syncfs(2): it writes back everything dirty on the
filesystem, other processes' data included, so its cost depends on what else
runs on the machine (see the range).

    python bench/bulk.py                       # N=2000, single durable N=200, 3 rounds
    python bench/bulk.py --n 500 --rounds 1 --modes durable
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import sys
import time
import traceback

import common
from floor import Floor

MODES = ("non-durable", "durable")
VARIANTS = ("bulk", "single", "floor-batch", "floor-single")
TYPE = "bulk"
# ratio name -> (numerator, denominator)
RATIOS = {
    "bulk / single": ("bulk", "single"),
    "bulk / floor-batch": ("bulk", "floor-batch"),
    "bulk / floor-single": ("bulk", "floor-single"),
    "single / floor-single": ("single", "floor-single"),
}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def payload(i: int) -> dict:
    return {"i": i, "args": [1, 2, 3]}


def task_id(i: int) -> str:
    return f"t{i:08d}"


class FloorBatch(Floor):
    """The floor's layout, enqueued as a batch with one barrier."""

    def enqueue_batch(self, task_type: str, items: list[tuple[str, dict]]) -> None:
        staged = []
        for tid, obj in items:
            t = os.path.join(self.d_tmp, tid)
            os.mkdir(t)
            now = time.time()
            self._write_plain(os.path.join(t, "input.json"), json.dumps(obj).encode())
            self._write_plain(os.path.join(t, "status.json"),
                              json.dumps({"state": "enqueued", "type": task_type, "id": tid, "ts": now}).encode())
            self._write_plain(os.path.join(t, "log"), self._log_line("enqueued"))
            staged.append(tid)
        if self.durable and staged:
            if _libc.syncfs(self.fd[self.d_tmp]) != 0:
                raise OSError(ctypes.get_errno(), "syncfs")
        for tid in staged:
            os.rename(os.path.join(self.d_tmp, tid), os.path.join(self.d_enq, tid))
        if staged:
            self._sync_parents(self.d_tmp, self.d_enq)

    @staticmethod
    def _write_plain(path: str, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


def run_variant(variant: str, n: int, durable: bool, root: str) -> dict:
    """Enqueue n tasks into a fresh spool (or floor) at root; seconds taken."""
    items = [(task_id(i), payload(i)) for i in range(n)]
    if variant.startswith("floor"):
        fl = FloorBatch(root, durable)
        try:
            t0 = time.perf_counter()
            if variant == "floor-batch":
                fl.enqueue_batch(TYPE, items)
            else:
                for tid, obj in items:
                    fl.enqueue(TYPE, tid, obj)
            s = time.perf_counter() - t0
            got = len(os.listdir(fl.d_enq))
        finally:
            fl.close()
    else:
        from spoolq import Spool

        sp = Spool.init(os.path.join(root, "spool"), durable=durable)
        sp.register_type(TYPE, "benchtasks.noop")
        if variant == "bulk":
            batch = [{"id": tid, "input": obj} for tid, obj in items]
            t0 = time.perf_counter()
            res = sp.enqueue_many(TYPE, batch)
            s = time.perf_counter() - t0
            bad = [r for r in res if r.error is not None]
            if bad:
                raise RuntimeError(f"{len(bad)} items refused, first: {bad[0].error}")
        else:
            enqueue = sp.enqueue_json
            t0 = time.perf_counter()
            for tid, obj in items:
                enqueue(TYPE, tid, obj)
            s = time.perf_counter() - t0
        got = sp.count_enqueued()
        sp.close()
    if got != n:
        raise AssertionError(f"{variant}: {got} tasks waiting, want {n}")
    return {"s": s, "tasks_per_s": n / s, "ms_per_task": s * 1e3 / n}


def n_for(variant: str, mode: str, a) -> int:
    return a.n_single if mode == "durable" and variant.endswith("single") else a.n


def summarize(runs: list[dict], modes, variants) -> dict:
    rows, ratios = [], []
    for mode in modes:
        for v in variants:
            mine = [r for r in runs if r["mode"] == mode and r["variant"] == v and "tasks_per_s" in r]
            if not mine:
                continue
            tps = [r["tasks_per_s"] for r in mine]
            rows.append({"mode": mode, "variant": v, "n": mine[0]["n"], "rounds": len(mine),
                         "tasks_per_s": tps, "tasks_per_s_median": common.median(tps),
                         "ms_per_task_median": common.median(r["ms_per_task"] for r in mine)})
        for name, (num, den) in RATIOS.items():
            per_round = []
            for rnd in sorted({r["round"] for r in runs}):
                a = next((r for r in runs if r["round"] == rnd and r["mode"] == mode and r["variant"] == num
                          and "tasks_per_s" in r), None)
                b = next((r for r in runs if r["round"] == rnd and r["mode"] == mode and r["variant"] == den
                          and "tasks_per_s" in r), None)
                if a and b:
                    per_round.append(a["tasks_per_s"] / b["tasks_per_s"])
            if per_round:
                ratios.append({"mode": mode, "ratio": name, "per_round": per_round,
                               "median": common.median(per_round)})
    return {"rows": rows, "ratios": ratios}


def _range(xs, fmt="{:.2f}") -> str:
    xs = [x for x in xs if x is not None]
    return "" if len(xs) < 2 else f"{fmt.format(min(xs))}–{fmt.format(max(xs))}"


def report(data) -> str:
    """The markdown tables of a bulk.json."""
    s = data["summary"]
    rows = [[r["mode"], r["variant"], f"{r['n']:,}", common.fmt_num(r["tasks_per_s_median"]),
             _range(r["tasks_per_s"], "{:,.0f}"), f"{r['ms_per_task_median']:.3f}"] for r in s["rows"]]
    t1 = common.markdown_table(["mode", "variant", "N", "tasks/s (median)", "range over rounds", "ms/task"], rows)
    rows = [[r["mode"], r["ratio"], common.fmt_ratio(r["median"]), _range(r["per_round"]), len(r["per_round"])]
            for r in s["ratios"]]
    t2 = common.markdown_table(["mode", "ratio of tasks/s", "median", "range over rounds", "rounds"], rows)
    fails = [f"{r['mode']} {r['variant']} round {r['round'] + 1}: {r['error']}" for r in data["runs"]
             if r.get("error")]
    return t1 + "\n\n" + t2 + ("\n\nFailed: " + "; ".join(fails) if fails else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="tasks per run (default %(default)s)")
    ap.add_argument("--n-single", type=int, default=200,
                    help="tasks per durable single/floor-single run (default %(default)s: fsync-bound)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", default="bulk.json", help="file in bench/results/ ('' for none)")
    common.add_base_dir_arg(ap)
    common.add_cleanup_arg(ap)
    a = ap.parse_args(argv)
    modes = [m for m in MODES if m in a.modes.split(",")]
    variants = [v for v in VARIANTS if v in a.variants.split(",")]

    runs = []
    t_start = time.monotonic()
    with common.Workspace(a.dir, a.cleanup) as ws:
        for rnd in range(a.rounds):
            for mode in modes:
                k = rnd % len(variants)
                for v in variants[k:] + variants[:k]:
                    n = n_for(v, mode, a)
                    rec = {"round": rnd, "mode": mode, "variant": v, "n": n, "load1_before": os.getloadavg()[0]}
                    try:
                        with ws.run_dir(f"{v}-{'d' if mode == 'durable' else 'nd'}") as root:
                            rec.update(run_variant(v, n, mode == "durable", root))
                        msg = f"{rec['tasks_per_s']:10,.0f} tasks/s"
                    except Exception as e:  # noqa: BLE001 - report, go on with the others
                        traceback.print_exc()
                        rec["error"] = f"{type(e).__name__}: {e}"
                        msg = "FAILED " + rec["error"]
                    runs.append(rec)
                    print(f"round {rnd + 1}/{a.rounds} {mode:11} {v:12} N={n:<6} {msg}", file=sys.stderr)
    out = {
        "meta": common.meta(a.dir, n=a.n, n_single=a.n_single, rounds=a.rounds,
                            elapsed_s=round(time.monotonic() - t_start, 1)),
        "runs": runs,
        "summary": summarize(runs, modes, variants),
    }
    common.emit(report(out), a.json, out)
    return 1 if any(r.get("error") for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
