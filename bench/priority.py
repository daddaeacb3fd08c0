"""Priority claim cost (issue 13): claims with N waiting tasks at 5 priorities
against N at one priority, and the daemon's RSS with N waiting prioritised
tasks against 200.

Two spools, alive at once, each with N + rounds x M waiting tasks (so that at
least N wait at every claim): "5 priorities" (task i at priority
(-20, -10, 0, 10, 20)[i % 5], so the claim order jumps across the order the
tasks were made in) and "1 priority" (all at 0). A round claims M tasks from
each spool the way the daemon does (spoolq/worker/loop.py, _fill_slots): a
``WaitingIndex`` of enqueued/ built by one ``rescan()``, then per claim
``index.pop()`` and ``Spool.claim(server, names=[name])`` (the rename to
scheduled/S/, the status write). The two spools are interleaved in chunks of
50 claims, in an order rotated each chunk, so both meet the same machine and
disk states. Measured per spool and round: claims/s (pop + claim), the pop
alone (the index's share: the heap of wait-order keys) and the rescan (one
status read per waiting task). Ratios 5 priorities / 1 priority are taken
within a round, then the median and range. Both spools claim the very same
task directories in the same order (the 1-priority spool's queue stamps are
set so; see build()), so they differ only in the keys the index sorts; the
claims are checked to come out in that order (highest priority first).

RSS: once the claim rounds are over (N tasks left waiting in each spool), a
task of priority 100 whose handler sleeps is enqueued into each, and into a
third spool with 200 waiting tasks at 5 priorities; then, per round and spool,
``spoolq worker rss --concurrency 1 --grace 0`` is started: it indexes
enqueued/, claims the sleep task (the highest priority), and idles with the
rest waiting. Its VmRSS is read from /proc/PID/status once the handler has
started and VmRSS has been steady for 0.5 s (bench/scaling.py, measure_rss),
then SIGTERM (the task is handed back, uncharged, still first in line).

Fixture. As in bench/scaling.py: the waiting tasks are fillers, a task
directory each (mkdir: one inode) whose input.pkl, log and status.json are
hard links to byte copies of a real task's files (one template per
priority, made through the API). A claim replaces the filler's status.json
with a file of its own (tmp + rename) and appends to the shared log. The
spools are non-durable: with fsyncs the claims would measure the disk.

    python bench/priority.py                         # N=20,000, M=500, 3 rounds
    python bench/priority.py --n 2000 --claims 200 --rounds 1 --skip rss
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import traceback

import common
import scaling

TYPE = "prio"
SLEEP = "sleep"
SERVER = "S"
LEVELS_5 = (-20, -10, 0, 10, 20)
LEVELS_1 = (0,)
HUGE = 1e9
CHUNK = 50


def claim_order(n: int) -> list[int]:
    """Filler numbers in the order the 5-priority spool claims them."""
    return sorted(range(n), key=lambda i: (-LEVELS_5[i % len(LEVELS_5)], i))


def build(base: str, specs: list[tuple[str, int, tuple[int, ...]]]) -> list[PrioSpool]:
    """The spools of `specs` (label, n, levels), their fillers made in
    lockstep (filler i of every spool in a rotated order, then i + 1...):
    on this disk where and when an inode is made changes what later writes
    near it cost (a spool built first claimed 1.5x slower than its twin
    built second).

    Every spool claims its fillers in the same sequence: filler i's queue
    stamp (its directory's mtime) is its place in claim_order(), so the
    1-priority spool's FIFO takes the very directories the 5-priority spool
    takes by priority, in the same order. Claiming consecutive directories
    instead of every fifth cost up to 3x more here (the disk, not the
    index); this way the spools differ only in the priorities the index
    sorts by."""
    spools = [PrioSpool(base, label, n, levels) for label, n, levels in specs]
    t0 = time.monotonic()
    n_max = max(sp.n for sp in spools)
    stamp0 = time.time_ns() - 86400 * 10**9
    rank = [0] * n_max
    for k, i in enumerate(claim_order(n_max)):
        rank[i] = k
    for i in range(n_max):
        for sp in _rotated(spools, i):
            if i < sp.n:
                sp.add_filler(i, stamp0 + rank[i] * 1000)
    for sp in spools:
        sp.build_s += time.monotonic() - t0
    return spools


class PrioSpool:
    """A non-durable spool for `n` waiting fillers at priorities `levels`
    (filler i at levels[i % len(levels)]); build() makes the fillers."""

    def __init__(self, base: str, label: str, n: int, levels: tuple[int, ...]):
        from spoolq import Spool

        self.label, self.n, self.levels = label, n, levels
        self.dir = os.path.join(base, "".join(c if c.isalnum() else "-" for c in label))
        self.root = os.path.join(self.dir, "spool")
        self.stamps = os.path.join(self.dir, "stamps")
        tpl = os.path.join(self.dir, "templates")
        for d in (self.dir, self.stamps, tpl):
            os.mkdir(d)
        t0 = time.monotonic()
        sp = self.spool = Spool.init(self.root, durable=False)
        sp.register_type(TYPE, "benchtasks.noop", timeout=HUGE, retention=HUGE)
        sp.register_type(SLEEP, "benchtasks.sleep", timeout=HUGE, retention=HUGE)
        enq = os.path.join(self.root, "enqueued")
        for p in levels:
            tid = f"tpl{p + 100:03d}"
            sp.enqueue(TYPE, tid, None, priority=p)
            src = os.path.join(enq, f"{TYPE}:{tid}")
            shutil.copyfile(os.path.join(src, "status.json"), os.path.join(tpl, f"status-{p}.json"))
            for f in ("input.pkl", "log"):
                if not os.path.exists(os.path.join(tpl, f)):
                    shutil.copyfile(os.path.join(src, f), os.path.join(tpl, f))
            sp.delete(TYPE, tid)
        self.tpl, self.enq = tpl, enq
        self.build_s = time.monotonic() - t0
        self.index = None
        self.claimed: list[int] = []  # filler numbers, in claim order

    def add_filler(self, i: int, stamp_ns: int) -> None:
        path = os.path.join(self.enq, self.name(i))
        os.mkdir(path, 0o770)
        os.link(os.path.join(self.tpl, "input.pkl"), os.path.join(path, "input.pkl"))
        os.link(os.path.join(self.tpl, "log"), os.path.join(path, "log"))
        os.link(os.path.join(self.tpl, f"status-{self.priority(i)}.json"), os.path.join(path, "status.json"))
        os.utime(path, ns=(stamp_ns, stamp_ns))

    @staticmethod
    def name(i: int) -> str:
        return f"{TYPE}:f{i:06d}"

    def priority(self, i: int) -> int:
        return self.levels[i % len(self.levels)]

    def waiting(self) -> int:
        return len(os.listdir(os.path.join(self.root, "enqueued")))

    def rescan(self) -> float:
        """A new index of enqueued/, as the daemon builds at start; seconds."""
        from spoolq.store.queue import WaitingIndex

        self.index = WaitingIndex(self.spool.layout)
        t0 = time.perf_counter()
        self.index.rescan()
        return time.perf_counter() - t0

    def claim(self, k: int) -> tuple[float, float]:
        """k claims the daemon's way; (seconds in all, seconds in index.pop())."""
        pop, claim = self.index.pop, self.spool.claim
        t_pop = 0.0
        got = []
        t0 = time.perf_counter()
        for _ in range(k):
            t1 = time.perf_counter()
            name = pop()
            t_pop += time.perf_counter() - t1
            if name is None or claim(SERVER, names=[name]) is None:
                raise AssertionError(f"{self.label}: nothing claimed ({name})")
            got.append(name)
        total = time.perf_counter() - t0
        self.claimed += [int(x.rsplit(":f", 1)[1]) for x in got]
        return total, t_pop

    def check_order(self) -> None:
        """Claimed in the order of claim_order() (highest priority first,
        then FIFO; see build)."""
        want = claim_order(self.n)[:len(self.claimed)]
        if self.claimed != want:
            raise AssertionError(f"{self.label}: claims not in the expected order")


def _rotated(xs, k):
    k %= len(xs)
    return xs[k:] + xs[:k]


def claim_rounds(spools: list[PrioSpool], rounds: int, m: int) -> list[dict]:
    recs = []
    for rnd in range(rounds):
        res = {sp.label: {"round": rnd, "spool": sp.label, "claims": m, "s": 0.0, "pop_s": 0.0,
                          "waiting_before": sp.waiting()} for sp in spools}
        for k, sp in enumerate(_rotated(spools, rnd)):
            res[sp.label]["rescan_s"] = sp.rescan()
        for j, start in enumerate(range(0, m, CHUNK)):
            for sp in _rotated(spools, rnd + j):
                s, p = sp.claim(min(CHUNK, m - start))
                res[sp.label]["s"] += s
                res[sp.label]["pop_s"] += p
        for sp in spools:
            r = res[sp.label]
            r["claims_per_s"] = m / r["s"]
            r["pop_us"] = r["pop_s"] / m * 1e6
            r["claim_us"] = r["s"] / m * 1e6
            print(f"round {rnd + 1}/{rounds} {sp.label:14} {r['claims_per_s']:8,.0f} claims/s, pop "
                  f"{r['pop_us']:.1f} µs, rescan {r['rescan_s'] * 1e3:.0f} ms ({r['waiting_before']:,} waiting)",
                  file=sys.stderr)
            recs.append(r)
    for sp in spools:
        sp.check_order()
    return recs


def rss_rounds(spools: list[PrioSpool], rounds: int, timeout: float) -> list[dict]:
    recs = []
    for sp in spools:
        sp.spool.enqueue(SLEEP, "sleep000", {"dir": sp.stamps, "seconds": 3600}, priority=100)
    for rnd in range(rounds):
        for sp in _rotated(spools, rnd):
            rec = {"round": rnd, "spool": sp.label, "waiting": sp.waiting() - 1}
            try:
                rec.update(scaling.measure_rss(sp, timeout))
                msg = f"VmRSS {rec['rss_kb'] / 1024:.1f} MB, first start {rec['first_start_s'] * 1e3:.0f} ms"
            except Exception as e:  # noqa: BLE001 - report, go on
                traceback.print_exc()
                rec["error"] = f"{type(e).__name__}: {e}"
                msg = "FAILED " + rec["error"]
            recs.append(rec)
            print(f"rss round {rnd + 1}/{rounds} {sp.label:14} {rec['waiting']:,} waiting: {msg}", file=sys.stderr)
    return recs


def _per_round_ratio(recs, key, num, den):
    out = []
    for rnd in sorted({r["round"] for r in recs}):
        a = next((r for r in recs if r["round"] == rnd and r["spool"] == num and key in r), None)
        b = next((r for r in recs if r["round"] == rnd and r["spool"] == den and key in r), None)
        if a and b and b[key]:
            out.append(a[key] / b[key])
    return out


def summarize(data: dict) -> dict:
    claims, rss = data["claims"], data["rss"]
    five, one, small = data["labels"]
    out = {"claims": [], "rss": []}
    for key, what in (("claims_per_s", "claims/s (pop + claim)"), ("pop_us", "index.pop() µs per claim"),
                      ("rescan_s", "rescan of enqueued/ (s)")):
        pr = _per_round_ratio(claims, key, five, one)
        out["claims"].append({
            "what": what, "key": key,
            five: common.median(r[key] for r in claims if r["spool"] == five),
            one: common.median(r[key] for r in claims if r["spool"] == one),
            "ratio_per_round": pr, "ratio_median": common.median(pr)})
    for label in (small, one, five):
        mine = [r for r in rss if r["spool"] == label and "rss_kb" in r]
        if mine:
            out["rss"].append({"spool": label, "waiting": mine[0]["waiting"],
                               "rss_kb": common.median(r["rss_kb"] for r in mine),
                               "hwm_kb": common.median(r["hwm_kb"] for r in mine),
                               "first_start_s": common.median(r["first_start_s"] for r in mine),
                               "ratio_small": _per_round_ratio(rss, "rss_kb", label, small)})
    return out


def _rng(xs) -> str:
    return f"{min(xs):.2f}–{max(xs):.2f}" if len(xs) > 1 else ""


def report(data) -> str:
    """The markdown tables of a priority.json."""
    s = data["summary"]
    five, one, small = data["labels"]
    m = data["meta"]

    def fmt(key, x):
        if x is None:
            return "n/a"
        if key == "claims_per_s":
            return f"{x:,.0f}"
        if key == "rescan_s":
            return f"{x * 1e3:.0f} ms"
        return f"{x:.1f}"

    rows = [[c["what"], fmt(c["key"], c[five]), fmt(c["key"], c[one]), common.fmt_ratio(c["ratio_median"]),
             _rng(c["ratio_per_round"])] for c in s["claims"]]
    parts = [f"Claims with {m['n']:,} to {m['n'] + m['rounds'] * m['claims']:,} waiting, {m['claims']} claims per "
             f"round and spool, median of {m['rounds']} interleaved rounds:\n\n"
             + common.markdown_table(["measure", "5 priorities", "1 priority", "5 / 1 (median)",
                                      "range over rounds"], rows)]
    if s["rss"]:
        rows = [[r["spool"], f"{r['waiting']:,}", f"{r['rss_kb'] / 1024:.1f}", f"{r['hwm_kb'] / 1024:.1f}",
                 f"{r['first_start_s'] * 1e3:.0f} ms", common.fmt_ratio(common.median(r["ratio_small"])),
                 _rng(r["ratio_small"])] for r in s["rss"]]
        parts.append("Daemon main process, idle after indexing `enqueued/` (`spoolq worker rss --concurrency 1`, "
                     "the priority-100 sleep task claimed, the rest waiting):\n\n"
                     + common.markdown_table(["spool", "tasks waiting", "VmRSS MB (median)", "VmHWM MB",
                                              "spawn to first task started", f"RSS / {small}",
                                              "range over rounds"], rows))
    return "\n\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="tasks waiting at the least (default %(default)s)")
    ap.add_argument("--small", type=int, default=200, help="tasks waiting in the RSS baseline spool")
    ap.add_argument("--claims", type=int, default=500, help="claims per round and spool (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma list: rss")
    ap.add_argument("--timeout", type=float, default=120, help="seconds the RSS worker may take to start a task")
    ap.add_argument("--json", default="priority.json", help="file in bench/results/ ('' for none)")
    common.add_base_dir_arg(ap)
    common.add_cleanup_arg(ap)
    a = ap.parse_args(argv)

    labels = (f"5 prio, {a.n:,}", f"1 prio, {a.n:,}", f"5 prio, {a.small:,}")
    t_start = time.monotonic()
    failed = False
    with common.Workspace(a.dir, a.cleanup) as ws:
        with ws.run_dir("priority") as base:
            fill = a.n + a.rounds * a.claims
            five, one = build(base, [(labels[0], fill, LEVELS_5), (labels[1], fill, LEVELS_1)])
            print(f"built 2 spools of {fill:,} waiting: {five.build_s:.1f} s", file=sys.stderr)
            claims = claim_rounds([five, one], a.rounds, a.claims)
            rss = []
            if "rss" not in a.skip.split(","):
                small, = build(base, [(labels[2], a.small, LEVELS_5)])
                rss = rss_rounds([five, one, small], a.rounds, a.timeout)
                failed = any(r.get("error") for r in rss)
    data = {
        "meta": common.meta(a.dir, n=a.n, small=a.small, claims=a.claims, rounds=a.rounds, levels=LEVELS_5,
                            elapsed_s=round(time.monotonic() - t_start, 1)),
        "labels": labels, "claims": claims, "rss": rss,
    }
    data["summary"] = summarize(data)
    common.emit(report(data), a.json, data)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
