"""Delayed tasks and retries (issue 13): how late a delayed task starts, and
what a retry costs in files and syncs.

Start delay. One idle daemon (``spoolq worker S --concurrency 2``, as in
bench/wakeup.py). Per round: --idle seconds idle, then --tasks tasks are
enqueued at once through ``Spool.enqueue(..., not_before=T)`` with due times T
drawn uniformly from now + --lead to now + --lead + --spread seconds; the
handler (benchtasks.wallstamp) writes time.time() when it starts. Delay =
start - due time (the due time as stored in status.json, microseconds).
The daemon learns of the tasks by file events, keeps them in its index, and
sleeps until the first is due (spoolq/worker/loop.py, _timeout). The peer in
the same daemon and run: --immediate tasks enqueued with no due time, one at
a time after 0.2-0.4 s idle, delay = start - the time just before the
enqueue call (so it includes the enqueue, as bench/wakeup.py does).
Reported per round: p50, p95 (nearest rank), max; then the median over the
rounds with the range, and delayed p50 / immediate p50.

Retry cost. ``strace -f`` (as bench/syscalls.py, whose counter is reused) of
an in-process run of N tasks on a durable spool through the API the daemon
uses: enqueue, claim (names=[...]), start, then

    ok      set_state(FINISHED)                      (type: retries 0)
    retry   set_state(FAILED) -> back to enqueued/ with a due time (the
            type's backoff, here 1 µs), claim, start, set_state(FINISHED)
            (type: retries 1)

each at N1 and N2 tasks; per task = (count(N2) - count(N1)) / (N2 - N1), so
start-up cancels; per retry = per task(retry) - per task(ok). Counted: all
syscalls, fsync + fdatasync, inodes created (mkdir, O_CREAT of a new path),
renames, flocks.

    python bench/delayed.py                  # 3 rounds of 50 delayed tasks; retries at N=10, 40
    python bench/delayed.py --skip retry --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import common
import syscalls
from daemons import SpoolqDaemon

SERVER = "S"


# ---------------------------------------------------------------- start delay


def _wait_file(path: str, deadline: float) -> float:
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} not written in time")
        time.sleep(0.002)
    with open(path) as f:
        return float(f.read())


def delay_round(d: SpoolqDaemon, rnd: int, a, stamps: str, rng: random.Random) -> dict:
    from spoolq.store.codec import from_iso

    sp = d.spool
    time.sleep(a.idle)
    now = time.time()
    tasks = []
    for k in range(a.tasks):
        due = now + a.lead + rng.uniform(0, a.spread)
        tid = f"d{rnd:02d}-{k:04d}"
        path = os.path.join(stamps, tid)
        sp.enqueue("wall", tid, {"path": path}, not_before=due)
        tasks.append((tid, path))
    deadline = time.monotonic() + a.lead + a.spread + a.timeout
    delayed = []
    for tid, path in tasks:
        started = _wait_file(path, deadline)
        due = from_iso(sp.status("wall", tid).doc["not_before"])
        delayed.append(started - due)
    immediate = []
    for k in range(a.immediate):
        time.sleep(rng.uniform(0.2, 0.4))
        tid = f"i{rnd:02d}-{k:04d}"
        path = os.path.join(stamps, tid)
        t0 = time.time()
        sp.enqueue("wall", tid, {"path": path})
        immediate.append(_wait_file(path, time.monotonic() + a.timeout) - t0)
    return {"round": rnd, "delayed_s": delayed, "immediate_s": immediate,
            **{f"{w}_{q}_s": common.percentile(xs, p) for w, xs in (("delayed", delayed), ("immediate", immediate))
               for q, p in (("p50", 50), ("p95", 95), ("max", 100))}}


def run_delays(a, ws) -> list[dict]:
    from spoolq import Spool

    rng = random.Random(a.seed)
    out = []
    with ws.run_dir("delayed") as root:
        stamps = os.path.join(root, "stamps")
        os.mkdir(stamps)
        sp = Spool.init(os.path.join(root, "spool"), durable=a.durable)
        sp.register_type("wall", "benchtasks.wallstamp")
        with SpoolqDaemon(root, a.durable, concurrency=2) as d:
            for rnd in range(a.rounds):
                r = delay_round(d, rnd, a, stamps, rng)
                out.append(r)
                print(f"round {rnd + 1}/{a.rounds}: delayed p50 {r['delayed_p50_s'] * 1e3:.1f} ms, p95 "
                      f"{r['delayed_p95_s'] * 1e3:.1f} ms; immediate p50 {r['immediate_p50_s'] * 1e3:.1f} ms",
                      file=sys.stderr)
    return out


# ---------------------------------------------------------------- retry cost


def retry_child(kind: str, n: int, root: str) -> dict:
    """The traced run (see the module doc); returns counts of claims that
    found the retried task not due yet (each would add a move back)."""
    from spoolq import Spool, State

    sp = Spool.init(os.path.join(root, "spool"), durable=True)
    sp.register_type("ok", "benchtasks.noop", retries=0)
    sp.register_type("flaky", "benchtasks.noop", retries=1, retry_backoff=1e-6, retry_backoff_max=1e-6)
    type_name = "ok" if kind == "ok" else "flaky"
    not_due = 0
    for i in range(n):
        tid = f"t{i:06d}"
        name = f"{type_name}:{tid}"
        sp.enqueue(type_name, tid, None)
        c = sp.claim(SERVER, names=[name])
        sp.start(c)
        if kind == "retry":
            if sp.set_state(c, State.FAILED, "boom") is not State.ENQUEUED:
                raise AssertionError("the failure was not retried")
            while (c := sp.claim(SERVER, names=[name])) is None:
                not_due += 1
            sp.start(c)
        sp.set_state(c, State.FINISHED)
        if sp.status(type_name, tid).state is not State.FINISHED:
            raise AssertionError(f"{name} did not finish")
    sp.close()
    return {"not_due": not_due}


def trace_child(kind: str, n: int, base_dir: str, out_dir: str):
    out = os.path.join(out_dir, f"retry-{kind}-{n}.strace")
    run_dir = tempfile.mkdtemp(prefix="spoolq-bench-strace-run-", dir=base_dir)
    cmd = ["strace", "-f", "-qq", "-y", "-o", out, "--", sys.executable, os.path.abspath(__file__),
           "--retry-child", kind, "--n", str(n), "--dir", run_dir]
    try:
        p = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return syscalls.count(out), json.loads(p.stdout.strip().splitlines()[-1])


def run_retry(a) -> dict:
    out_dir = tempfile.mkdtemp(prefix="spoolq-bench-strace-", dir=a.dir)
    try:
        per, not_due = {}, 0
        for kind in ("ok", "retry"):
            c1, x1 = trace_child(kind, a.n1, a.dir, out_dir)
            c2, x2 = trace_child(kind, a.n2, a.dir, out_dir)
            not_due += x1["not_due"] + x2["not_due"]
            per[kind] = syscalls.per_task(c1, c2, a.n2 - a.n1)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    extra = {k: per["retry"].get(k, 0.0) - per["ok"].get(k, 0.0) for k in set(per["ok"]) | set(per["retry"])}
    res = {kind: syscalls.summarize(pt) for kind, pt in per.items()}
    res["extra per retry"] = syscalls.summarize({k: v for k, v in extra.items() if abs(v) > 1e-9})
    res["not_due_claims"] = not_due
    return res


# ---------------------------------------------------------------- report


def summarize(data: dict) -> dict:
    rounds = data.get("delays") or []
    s = {}
    for key in ("delayed_p50_s", "delayed_p95_s", "delayed_max_s", "immediate_p50_s", "immediate_p95_s",
                "immediate_max_s"):
        xs = [r[key] for r in rounds]
        if xs:
            s[key] = {"median": common.median(xs), "min": min(xs), "max": max(xs)}
    ratio = [r["delayed_p50_s"] / r["immediate_p50_s"] for r in rounds if r["immediate_p50_s"]]
    if ratio:
        s["ratio_p50"] = {"median": common.median(ratio), "min": min(ratio), "max": max(ratio)}
    return s


def report(data) -> str:
    """The markdown tables of a delayed.json."""
    parts = []
    s, m = data["summary"], data["meta"]

    def ms(x):
        return f"{x * 1e3:.1f}"

    if s:
        rows = []
        for what, n in (("delayed", m["tasks"]), ("immediate", m["immediate"])):
            row = [what, n]
            for q in ("p50", "p95", "max"):
                v = s.get(f"{what}_{q}_s")
                row.append("n/a" if v is None else f"{ms(v['median'])} ({ms(v['min'])}–{ms(v['max'])})")
            rows.append(row)
        r = s.get("ratio_p50")
        parts.append(
            f"Start delay, one idle daemon ({m['mode']}, concurrency 2), {m['rounds']} rounds; ms, median over "
            "the rounds (range):\n\n"
            + common.markdown_table(["tasks", "per round", "p50 ms", "p95 ms", "max ms"], rows)
            + ("" if r is None else f"\n\nDelayed p50 / immediate p50: {common.fmt_ratio(r['median'])} "
               f"({r['min']:.2f}–{r['max']:.2f})."))
    rt = data.get("retry")
    if rt:
        keys = ("syscalls", "sync", "created", "rename", "flock")
        rows = [[k] + [f"{rt[k][x]:.1f}" for x in keys]
                + [", ".join(f"{n} {v:g}" for n, v in rt[k]["top"][:6])]
                for k in ("ok", "retry", "extra per retry")]
        parts.append(
            f"Retry cost, durable spool, strace per task (({m['n2']} - {m['n1']}) tasks differential"
            f"{'' if not rt.get('not_due_claims') else '; claims that found a retry not due: ' + str(rt['not_due_claims'])}):\n\n"
            + common.markdown_table(["task", "syscalls", "fsync+fdatasync", "inodes created", "renames", "flocks",
                                     "top calls"], rows))
    return "\n\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=50, help="delayed tasks per round (default %(default)s)")
    ap.add_argument("--immediate", type=int, default=20, help="immediate tasks per round (default %(default)s)")
    ap.add_argument("--lead", type=float, default=1.0, help="seconds from the enqueue to the first due time")
    ap.add_argument("--spread", type=float, default=4.0, help="due times spread over this many seconds")
    ap.add_argument("--idle", type=float, default=1.0, help="seconds idle before each round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--durable", action="store_true", help="durable spool for the start delay")
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--n1", type=int, default=10, help="tasks of the smaller traced run")
    ap.add_argument("--n2", type=int, default=40, help="tasks of the larger traced run")
    ap.add_argument("--skip", default="", help="comma list: delay, retry")
    ap.add_argument("--json", default="delayed.json", help="file in bench/results/ ('' for none)")
    ap.add_argument("--retry-child", choices=("ok", "retry"), help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=10, help=argparse.SUPPRESS)
    common.add_base_dir_arg(ap)
    common.add_cleanup_arg(ap)
    a = ap.parse_args(argv)

    if a.retry_child:
        print(json.dumps(retry_child(a.retry_child, a.n, a.dir)))
        return 0

    skip = set(a.skip.split(","))
    data = {"delays": [], "retry": None}
    failed = False
    if "delay" not in skip:
        try:
            with common.Workspace(a.dir, a.cleanup) as ws:
                data["delays"] = run_delays(a, ws)
        except Exception:  # noqa: BLE001 - report, go on with the retry cost
            traceback.print_exc()
            failed = True
    if "retry" not in skip:
        if shutil.which("strace"):
            try:
                data["retry"] = run_retry(a)
            except Exception:  # noqa: BLE001
                traceback.print_exc()
                failed = True
        else:
            print("strace not found (apt-get install strace); skipping the retry cost", file=sys.stderr)
    data["meta"] = common.meta(a.dir, tasks=a.tasks, immediate=a.immediate, lead_s=a.lead, spread_s=a.spread,
                               idle_s=a.idle, rounds=a.rounds, n1=a.n1, n2=a.n2,
                               mode="durable" if a.durable else "non-durable")
    data["summary"] = summarize(data)
    common.emit(report(data), a.json, data)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
