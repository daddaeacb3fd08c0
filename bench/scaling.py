"""Scaling: lookup time, daemon RSS and sweep time against the tasks present.

One spool per size N (default 200, 2,000, 20,000), all alive at once, taken
through three phases; within a phase every measurement is made in rounds that
visit the spools in a rotated order, ratios (to the N=200 spool) are taken
within a round, then the median over rounds is reported.

    phase "enqueued"  N tasks waiting in enqueued/
        lookup   Spool.status() of a waiting task, of a done task, of a
                 missing one (the full miss path: two probes, then one under
                 the enqueue lock); `spoolq status` (the CLI, a new process)
        sweeps   reenqueue_zombies() and delete_retired() with only one task
                 in running/ and one in done/: their time must not depend on N
        RSS      `spoolq worker rss --concurrency 1`: it indexes enqueued/,
                 claims the oldest task (a handler that sleeps), and idles;
                 VmRSS of the daemon's main process from /proc/PID/status
    phase "done"      the same N tasks moved to done/ (finished)
        lookup   Spool.status() of a done task; `spoolq status`
        sweep    delete_retired(): one lstat per task in done/, none retired
    phase "running"   the same N tasks moved to running/ (started by server
                      S, which this process holds alive: nobody is a zombie)
        sweep    reenqueue_zombies(): one status read per task in running/,
                 none taken away

Fixture. Real tasks made through the API (spoolq's own code) sit beside N-1
fillers. Creating an inode costs 0.1 to 3 ms on this disk, so a filler is a
task directory (mkdir, one inode) whose input.pkl, log and status.json are
hard links to template files copied byte for byte from a real task of the
same state: 20,000 fillers take seconds instead of minutes, and moving them
from phase to phase is a rename (plus relinking status.json). What is
measured reads no filler's files except reenqueue_zombies, which reads each
filler's status.json: all of them are then one inode, hot in the page cache,
as the status files of tasks that were just started would be.
`--distinct-status` gives every filler its own status.json (an inode each)
to check that shortcut. Nothing here is durable (spool init --no-durable):
no measured operation writes.

    python bench/scaling.py                         # N = 200, 2000, 20000
    python bench/scaling.py --sizes 200,2000 --rounds 2 --skip rss,cli
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback

import common
from daemons import _env

PHASES = ("enqueued", "done", "running")
TYPE = "noop"
SLEEP = "sleep"
SERVER = "S"  # the server this process holds: the running tasks' owner
RSS_SERVER = "rss"
HUGE_TIMEOUT = 1e6
HUGE_RETENTION = 1e9


def _name(task_id: str) -> str:
    return f"{TYPE}:{task_id}"


class Fixture:
    """One spool of size n, in one phase at a time (see the module doc)."""

    def __init__(self, base: str, n: int, k_sleep: int, distinct_status: bool):
        from spoolq import Spool, State

        self.State = State
        self.n = n
        self.dir = os.path.join(base, f"scale-{n}")
        os.mkdir(self.dir)
        self.root = os.path.join(self.dir, "spool")
        self.tpl = os.path.join(self.dir, "templates")
        self.stamps = os.path.join(self.dir, "stamps")
        os.mkdir(self.tpl)
        os.mkdir(self.stamps)
        self.distinct_status = distinct_status
        self.phase = None
        t0 = time.monotonic()
        sp = self.spool = Spool.init(self.root, durable=False)
        sp.register_type(TYPE, "benchtasks.noop", timeout=HUGE_TIMEOUT, retention=HUGE_RETENTION)
        sp.register_type(SLEEP, "benchtasks.sleep", timeout=HUGE_TIMEOUT, retention=HUGE_RETENTION)
        sp.hold_server(SERVER)
        # Real tasks, oldest first: the sleep tasks the RSS worker claims (one
        # per round, handed back to the back of the queue when it stops).
        for k in range(k_sleep):
            sp.enqueue(SLEEP, f"sleep{k:03d}", {"dir": self.stamps, "seconds": 3600})
        # A finished task and a running one, through the whole API.
        sp.enqueue(TYPE, "done-target", None)
        c = sp.claim(SERVER, names=[_name("done-target")])
        sp.start(c)
        sp.store_response(c, b"ok", "text/plain")
        sp.finish_if_not_finished(c)
        sp.enqueue(TYPE, "run-target", None)
        c = sp.claim(SERVER, names=[_name("run-target")])
        sp.start(c)
        sp.enqueue(TYPE, "enq-target", None)
        # Templates: byte copies of real tasks' files, one per state.
        for state, tid, where in (("enqueued", "enq-target", "enqueued"),
                                  ("done", "done-target", "done"),
                                  ("running", "run-target", "running")):
            shutil.copyfile(os.path.join(self.root, where, _name(tid), "status.json"),
                            os.path.join(self.tpl, f"status-{state}.json"))
        for f in ("input.pkl", "log"):
            shutil.copyfile(os.path.join(self.root, "done", _name("done-target"), f), os.path.join(self.tpl, f))
        self.fillers = [_name(f"f{i:06d}") for i in range(n - 1)]
        self._status_copies = {}
        d = self._p("enqueued")
        for name in self.fillers:
            path = os.path.join(d, name)
            os.mkdir(path, 0o770)
            os.link(os.path.join(self.tpl, "input.pkl"), os.path.join(path, "input.pkl"))
            os.link(os.path.join(self.tpl, "log"), os.path.join(path, "log"))
            self._put_status(path, "enqueued")
        self.phase = "enqueued"
        self.build_s = time.monotonic() - t0
        self.check()

    def _p(self, *parts):
        return os.path.join(self.root, *parts)

    def _put_status(self, path: str, state: str) -> None:
        dst = os.path.join(path, "status.json")
        try:
            os.unlink(dst)
        except FileNotFoundError:
            pass
        src = os.path.join(self.tpl, f"status-{state}.json")
        if self.distinct_status:
            shutil.copyfile(src, dst)
        else:
            os.link(src, dst)

    def move(self, phase: str) -> float:
        t0 = time.monotonic()
        src, dst = self._p(self.phase), self._p(phase)
        for name in self.fillers:
            os.rename(os.path.join(src, name), os.path.join(dst, name))
            self._put_status(os.path.join(dst, name), phase)
        self.phase = phase
        self.check()
        return time.monotonic() - t0

    def check(self) -> None:
        """Untimed: the fillers are where the phase says, and spoolq reads one
        of them as a task in the right state."""
        count = len(os.listdir(self._p(self.phase)))
        if count < self.n:
            raise AssertionError(f"{self.dir}: {count} in {self.phase}/, want >= {self.n}")
        if self.fillers:
            want = {"enqueued": "ENQUEUED", "done": "FINISHED", "running": "RUNNING"}[self.phase]
            got = self.spool.status(*self.fillers[-1].split(":")).state.name
            if got != want:
                raise AssertionError(f"{self.dir}: filler is {got}, want {want}")

    def counts(self) -> dict:
        return {d: len(os.listdir(self._p(d))) for d in ("enqueued", "running", "done")}


# ---------------------------------------------------------------- measurements


def _lookup_batch(fx: Fixture, task_id: str | None, calls: int) -> float:
    """Seconds for `calls` Spool.status() calls (task_id None: a missing task)."""
    from spoolq.errors import TaskNotFound

    status = fx.spool.status
    if task_id is None:
        t0 = time.perf_counter()
        for _ in range(calls):
            try:
                status(TYPE, "no-such-task")
            except TaskNotFound:
                pass
            else:
                raise AssertionError("a missing task was found")
        return time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(calls):
        status(TYPE, task_id)
    return time.perf_counter() - t0


def lookup_round(fixtures, task_id: str | None, calls: int, rnd: int, slices: int = 10) -> dict:
    """Seconds per Spool.status() call for each fixture, the calls of all
    fixtures finely interleaved (slices x calls/slices, rotated order), so a
    burst of load on the machine hits every size alike."""
    per = max(1, calls // slices)
    spent = {fx.n: 0.0 for fx in fixtures}
    for fx in fixtures:
        _lookup_batch(fx, task_id, 2)  # warm
    for k in range(slices):
        for fx in _rotated(fixtures, rnd + k):
            spent[fx.n] += _lookup_batch(fx, task_id, per)
    return {n: t / (per * slices) for n, t in spent.items()}


def time_cli(fx: Fixture, task_id: str, calls: int) -> float:
    """Median wall seconds of `python -m spoolq --root R status TYPE ID`."""
    cmd = [sys.executable, "-m", "spoolq", "--root", fx.root, "status", TYPE, task_id]
    env = _env()
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        ts.append(time.perf_counter() - t0)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {p.returncode}: {p.stderr.strip()}")
    return common.median(ts)


def time_call(fn, reps: int = 1) -> float:
    """Seconds per call of fn(), the mean of `reps` calls."""
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def _proc_status(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "State"):
                out[k] = v.strip()
    return out


def _kb(text: str) -> int:
    return int(text.split()[0])


def measure_rss(fx: Fixture, timeout: float) -> dict:
    """Start the daemon (concurrency 1) on the spool: it indexes enqueued/,
    claims the oldest task (a sleep task) and idles. Once the handler has
    started and the main process's VmRSS has been steady for 0.5 s, read it;
    then SIGTERM (grace 0: the sleeping handler is killed, its task handed
    back uncharged)."""
    before = set(os.listdir(fx.stamps))
    log_path = os.path.join(fx.dir, f"rss-worker-{time.monotonic_ns()}.log")
    cmd = [sys.executable, "-m", "spoolq", "--root", fx.root, "worker", RSS_SERVER,
           "--concurrency", "1", "--grace", "0"]
    with open(log_path, "wb") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, env=_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = t0 + timeout
            while set(os.listdir(fx.stamps)) == before:
                if proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {proc.returncode}; see {log_path}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no task started in {timeout:g}s; see {log_path}")
                time.sleep(0.005)
            started_s = time.monotonic() - t0
            last, steady_since = None, time.monotonic()
            while True:
                st = _proc_status(proc.pid)
                now = time.monotonic()
                if st.get("VmRSS") != last:
                    last, steady_since = st.get("VmRSS"), now
                elif now - steady_since >= 0.5 and st.get("State", "").startswith("S"):
                    break
                if now > deadline:
                    raise TimeoutError(f"VmRSS never steady; see {log_path}")
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"worker exit {proc.returncode} after SIGTERM; see {log_path}")
    return {"rss_kb": _kb(st["VmRSS"]), "hwm_kb": _kb(st["VmHWM"]), "anon_kb": _kb(st["RssAnon"]),
            "file_kb": _kb(st["RssFile"]), "first_start_s": started_s}


# ---------------------------------------------------------------- the run


def _rotated(xs, k):
    k %= len(xs)
    return xs[k:] + xs[:k]


def run(a, ws) -> dict:
    from spoolq import sweeps

    sizes = sorted(int(x) for x in a.sizes.split(",") if x)
    skip = set(a.skip.split(","))
    k_sleep = a.rounds + 2
    fixtures = []
    for n in sizes:
        fx = Fixture(ws.path, n, k_sleep, a.distinct_status)
        fixtures.append(fx)
        print(f"fixture N={n}: built in {fx.build_s:.1f}s", file=sys.stderr, flush=True)
    records = []
    moves = []

    def rec(phase, what, fx, rnd, **kw):
        r = {"phase": phase, "what": what, "n": fx.n, "round": rnd, "counts": fx.counts(),
             "load1_before": os.getloadavg()[0], **kw}
        records.append(r)
        return r

    def each_round(phase, what, rounds, fn, only=None):
        for rnd in range(rounds):
            for fx in _rotated(fixtures, rnd):
                if only and fx.n not in only:
                    continue
                load = os.getloadavg()[0]
                try:
                    r = rec(phase, what, fx, rnd, **fn(fx))
                    r["load1_before"] = load
                except Exception as e:  # report, go on
                    traceback.print_exc()
                    rec(phase, what, fx, rnd, error=f"{type(e).__name__}: {e}")
            print(f"{phase:8} {what:28} round {rnd + 1}/{rounds} done", file=sys.stderr, flush=True)

    def lookup_rounds(phase, what, task_id, calls):
        for rnd in range(a.lookup_rounds):
            load = os.getloadavg()[0]
            for n, sec in lookup_round(fixtures, task_id, calls, rnd).items():
                rec(phase, what, next(f for f in fixtures if f.n == n), rnd, s=sec)["load1_before"] = load
        print(f"{phase:8} {what:28} {a.lookup_rounds} rounds done", file=sys.stderr, flush=True)

    L = a.lookups
    ends = {sizes[0], sizes[-1]}  # the CLI (a new process each time): smallest and largest N only
    for phase in PHASES:
        if phase != "enqueued":
            for fx in fixtures:
                moves.append({"n": fx.n, "phase": phase, "s": fx.move(phase)})
        if phase == "enqueued":
            lookup_rounds(phase, "status: waiting task", "enq-target", L)
            lookup_rounds(phase, "status: done task", "done-target", L)
            lookup_rounds(phase, "status: missing task", None, max(10, L // 4))
            if "cli" not in skip:
                each_round(phase, "CLI status: waiting task", a.rounds,
                           lambda fx: {"s": time_cli(fx, "enq-target", a.cli_calls)}, ends)
            # Tiny passes (one task to examine): the mean of 20.
            each_round(phase, "reenqueue_zombies", a.rounds,
                       lambda fx: {"s": time_call((lambda: sweeps.reenqueue_zombies(fx.spool)), 20), "examined": fx.counts()["running"]})
            each_round(phase, "delete_retired", a.rounds,
                       lambda fx: {"s": time_call((lambda: sweeps.delete_retired(fx.spool)), 20), "examined": fx.counts()["done"]})
            if "rss" not in skip:
                each_round(phase, "daemon RSS", a.rounds, lambda fx: measure_rss(fx, a.timeout))
        elif phase == "done":
            lookup_rounds(phase, "status: done task", "done-target", L)
            if "cli" not in skip:
                each_round(phase, "CLI status: done task", a.rounds,
                           lambda fx: {"s": time_cli(fx, "done-target", a.cli_calls)}, ends)
            each_round(phase, "delete_retired", a.rounds,
                       lambda fx: {"s": time_call((lambda: sweeps.delete_retired(fx.spool))), "examined": fx.counts()["done"]})
        else:
            lookup_rounds(phase, "status: running task", "run-target", L)
            each_round(phase, "reenqueue_zombies", a.rounds,
                       lambda fx: {"s": time_call((lambda: sweeps.reenqueue_zombies(fx.spool))), "examined": fx.counts()["running"]})
        for fx in fixtures:
            fx.check()
    return {"sizes": sizes, "fixtures": [{"n": fx.n, "build_s": fx.build_s} for fx in fixtures],
            "moves": moves, "records": records}


def summarize(data) -> list[dict]:
    sizes = data["sizes"]
    base = sizes[0]
    out = []
    keys = []
    for r in data["records"]:
        if (r["phase"], r["what"]) not in keys:
            keys.append((r["phase"], r["what"]))
    for phase, what in keys:
        mine = [r for r in data["records"] if r["phase"] == phase and r["what"] == what]
        metric = "rss_kb" if what == "daemon RSS" else "s"
        row = {"phase": phase, "what": what, "metric": metric, "by_n": {}, "ratio": {},
               "errors": sum(1 for r in mine if r.get("error"))}
        for n in sizes:
            rs = [r for r in mine if r["n"] == n and not r.get("error")]
            cell = {"median": common.median(r[metric] for r in rs), "values": [r[metric] for r in rs]}
            if rs and "examined" in rs[0]:
                cell["examined"] = rs[0]["examined"]
            if metric == "rss_kb":
                cell["hwm_kb"] = common.median(r["hwm_kb"] for r in rs)
                cell["first_start_s"] = common.median(r["first_start_s"] for r in rs)
                cell["queued"] = rs[0]["counts"]["enqueued"] if rs else None
            row["by_n"][str(n)] = cell
            per_round = []
            for r in rs:
                b = next((o for o in mine if o["n"] == base and o["round"] == r["round"]
                          and not o.get("error")), None)
                if b and b[metric]:
                    per_round.append(r[metric] / b[metric])
            row["ratio"][str(n)] = common.median(per_round)
        if phase != "enqueued" and what in ("reenqueue_zombies", "delete_retired"):
            row["fit"] = growth([(c.get("examined"), c["median"]) for c in row["by_n"].values()])
        out.append(row)
    return out


def growth(points) -> dict | None:
    """log-log slope of time against tasks examined between the two largest
    sizes: 1.0 is linear (a fixed cost makes it a little less), 2.0 quadratic."""
    pts = sorted((x, y) for x, y in points if x and y)
    if len(pts) < 2:
        return None
    (x1, y1), (x2, y2) = pts[-2], pts[-1]
    return {"from": x1, "to": x2, "exponent": math.log(y2 / y1) / math.log(x2 / x1)}


def _find(summary, phase, what):
    return next((s for s in summary if s["phase"] == phase and s["what"] == what), None)


def _fmt_s(x):
    if x is None:
        return "n/a"
    if x < 1e-3:
        return f"{x * 1e6:.0f} µs"
    if x < 1:
        return f"{x * 1e3:.1f} ms"
    return f"{x:.2f} s"


def report(data) -> str:
    sizes = data["sizes"]
    summary = data["summary"]
    big = str(sizes[-1])
    nn = [f"{n:,}" for n in sizes]
    parts = []
    rows = []
    for s in summary:
        if s["metric"] != "s" or not (s["what"].startswith("status") or s["what"].startswith("CLI")):
            continue
        where = {"enqueued": "enqueued/", "done": "done/", "running": "running/"}[s["phase"]]
        label = (s["what"].replace("CLI status:", "`spoolq status`:") if s["what"].startswith("CLI")
                 else s["what"].replace("status:", "`Spool.status()`:"))
        rows.append([label,
                     f"N in {where}"]
                    + [_fmt_s(c["median"]) if c["values"] else "not run"
                       for c in (s["by_n"][str(n)] for n in sizes)]
                    + [common.fmt_ratio(s["ratio"][big])])
    parts.append(common.markdown_table(["lookup", "where the N tasks are"] + [f"N={x}" for x in nn]
                                       + [f"N={nn[-1]} / N={nn[0]}"], rows))
    s = _find(summary, "enqueued", "daemon RSS")
    if s:
        rows = []
        for n in sizes:
            c = s["by_n"][str(n)]
            rows.append([f"{c['queued']:,}" if c.get("queued") is not None else "n/a",
                         "n/a" if c["median"] is None else f"{c['median'] / 1024:.1f}",
                         "n/a" if c.get("hwm_kb") is None else f"{c['hwm_kb'] / 1024:.1f}",
                         _fmt_s(c.get("first_start_s")),
                         common.fmt_ratio(s["ratio"][str(n)])])
        b, t = s["by_n"][str(sizes[0])]["median"], s["by_n"][big]["median"]
        per_k = "" if None in (b, t) else (
            f" Each 1,000 more waiting tasks cost {(t - b) / (sizes[-1] - sizes[0]) * 1000 / 1024:.2f} MB.")
        parts.append("Daemon main process, idle after indexing `enqueued/` (`spoolq worker rss --concurrency 1`, "
                     "one sleeping task claimed, the rest waiting)." + per_k + "\n\n" + common.markdown_table(
                         ["tasks waiting", "VmRSS MB (median)", "VmHWM MB", "spawn to first task started",
                          f"RSS / N={nn[0]}"], rows))
    rows = []
    for phase, what, examines in (("done", "delete_retired", "done/ (one lstat each)"),
                                  ("running", "reenqueue_zombies", "running/ (one status read each)"),
                                  ("enqueued", "delete_retired", "1 in done/; N waiting"),
                                  ("enqueued", "reenqueue_zombies", "1 in running/; N waiting")):
        s = _find(summary, phase, what)
        if not s:
            continue
        cells = []
        for n in sizes:
            c = s["by_n"][str(n)]
            m = c["median"]
            if m is None:
                cells.append("n/a")
            elif phase == "enqueued":
                cells.append(_fmt_s(m))
            else:
                cells.append(f"{_fmt_s(m)} ({m / max(1, c.get('examined') or n) * 1e6:.0f} µs/task)")
        fit = s.get("fit")
        fit_txt = "" if not fit else f"{fit['exponent']:.2f}"
        rows.append([f"`{what}()`", examines] + cells + [common.fmt_ratio(s["ratio"][big]), fit_txt])
    parts.append("Sweeps (one pass, nothing to do: nobody is a zombie, nothing is past retention; "
                 "µs per task examined in brackets; the rows with N waiting examine one task and are "
                 "the mean of 20 passes):\n\n" + common.markdown_table(
                     ["sweep", "examines"] + [f"N={x}" for x in nn] + [f"N={nn[-1]} / N={nn[0]}",
                                                                       "growth exponent, last two N"], rows))
    return "\n\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="200,2000,20000", help="comma list of N; ratios are to the first")
    ap.add_argument("--rounds", type=int, default=3, help="rounds for sweeps, RSS and the CLI")
    ap.add_argument("--lookup-rounds", type=int, default=9)
    ap.add_argument("--lookups", type=int, default=400, help="Spool.status() calls per lookup measurement")
    ap.add_argument("--cli-calls", type=int, default=1, help="`spoolq status` runs per measurement (median)")
    ap.add_argument("--skip", default="", help="comma list: rss, cli")
    ap.add_argument("--distinct-status", action="store_true",
                    help="give every filler its own status.json instead of a hard link (slow to build)")
    ap.add_argument("--timeout", type=float, default=120, help="seconds the RSS worker may take to start a task")
    ap.add_argument("--json", default="scaling.json")
    common.add_base_dir_arg(ap)
    a = ap.parse_args(argv)

    t0 = time.monotonic()
    with common.Workspace(a.dir) as ws:
        data = run(a, ws)
        elapsed = time.monotonic() - t0
        print(f"measured in {elapsed:.0f}s; removing the fixtures", file=sys.stderr, flush=True)
    data["summary"] = summarize(data)
    data["meta"] = common.meta(a.dir, rounds=a.rounds, lookup_rounds=a.lookup_rounds, lookups=a.lookups,
                               cli_calls=a.cli_calls, distinct_status=a.distinct_status,
                               elapsed_s=round(elapsed, 1), elapsed_with_cleanup_s=round(time.monotonic() - t0, 1))
    common.emit(report(data), a.json, data)
    return 1 if any(r.get("error") for r in data["records"]) else 0


if __name__ == "__main__":
    sys.exit(main())
