"""Profile of the daemon under load: where its time and syscalls go per task.

The e2e set-up (bench/e2e.py): a non-durable spool, `python -m spoolq --root R
worker S --concurrency 2` started and warmed up, then N no-op tasks enqueued
by this process while the worker drains them. Two separate runs:

    py-spy   `py-spy record --pid WORKER --subprocesses --format raw` (on-CPU
             samples only), stopped with SIGINT once the last task is done.
             Stacks with one "process" frame are the daemon's main process,
             with two a handler slot (forked by it). Reported per task:
             CPU ms by role, top functions by self time and by inclusive time.
    strace   the worker under `strace -f -ff -ttt`; only the syscalls
             between the first enqueue and the last task done are counted
             (so start-up and shutdown drop out), per process: the main
             process (its pid is in locks/servers/S.lock) and the slots.

Writes bench/results/profile.json, the raw py-spy stacks to
bench/results/profile-pyspy.txt, and the tables into bench/profile.md
between its markers. Needs py-spy (`pip install py-spy`) and strace; a
missing one is skipped.

    python bench/profile.py [--n 1000] [--skip strace]
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import common
from daemons import _env

PROFILE_MD = os.path.join(common.BENCH_DIR, "profile.md")
RAW = os.path.join(common.RESULTS_DIR, "profile-pyspy.txt")
BEGIN, END = "<!-- profile:begin -->", "<!-- profile:end -->"
SERVER = "S"


class Run:
    """A spool and a worker on it (optionally under a wrapper command)."""

    def __init__(self, base: str, concurrency: int, wrapper=()):
        from spoolq import Spool, State

        self.State = State
        self.dir = tempfile.mkdtemp(prefix="profile-", dir=base)
        self.root = os.path.join(self.dir, "spool")
        self.spool = Spool.init(self.root, durable=False)
        self.spool.register_type("noop", "benchtasks.noop")
        cmd = [*wrapper, sys.executable, "-m", "spoolq", "--root", self.root, "worker", SERVER,
               "--concurrency", str(concurrency)]
        self.log = open(os.path.join(self.dir, "worker.log"), "wb")
        self.proc = subprocess.Popen(cmd, env=_env(), stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.k = 0
        self.drain([("noop", "warmup")], enqueue=True, timeout=120)

    def worker_pid(self) -> int:
        with open(os.path.join(self.root, "locks", "servers", f"{SERVER}.lock")) as f:
            return int(f.read().strip())

    def is_done(self, h) -> bool:
        return self.spool.status(*h).state == self.State.FINISHED

    def drain(self, handles, enqueue: bool, timeout: float) -> float:
        t0 = time.monotonic()
        if enqueue:
            for t, i in handles:
                self.spool.enqueue(t, i, None)
        return common.wait_until_all(handles, self.is_done, timeout) - t0

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------- py-spy


def run_pyspy(a) -> dict:
    r = Run(a.dir, a.concurrency)
    try:
        pid = r.worker_pid()
        spy_log = open(os.path.join(r.dir, "py-spy.log"), "wb")
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--subprocesses", "--rate", str(a.rate),
                                "--format", "raw", "-o", RAW], stdout=spy_log, stderr=subprocess.STDOUT)
        time.sleep(1.0)  # let it attach
        handles = [("noop", f"t{i:06d}") for i in range(a.n)]
        drain_s = r.drain(handles, enqueue=True, timeout=a.timeout)
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
        spy_log.close()
    finally:
        r.stop()
        r.close()
    return {"drain_s": drain_s, "rate": a.rate, **analyse_pyspy(RAW, a.n, a.rate)}


_LINE = re.compile(r":\d+\)$")
_WHERE = re.compile(r"^(.*) \((.+):(\d+)\)$")


def _func(frame: str) -> str:
    """'name (path:line)' -> 'name (path)': aggregate over lines."""
    return _LINE.sub(")", frame)


def _source(frame: str) -> str:
    """The source line of a spoolq frame 'name (spoolq/x.py:N)', else ''."""
    m = _WHERE.match(frame)
    if not m or not m.group(2).startswith("spoolq/"):
        return ""
    try:
        with open(os.path.join(common.REPO_DIR, m.group(2))) as f:
            lines = f.readlines()
        return lines[int(m.group(3)) - 1].strip()
    except (OSError, IndexError):
        return ""


# Waits for work that py-spy still samples as non-idle (a thread blocked in
# these calls was seen to make no syscall for hundreds of tasks): the main
# loop's select, a slot's read of its command pipe, the sleeps of a slot's
# output and deadline threads. Left out of "busy" (counted as "waiting").
_WAIT_LINES = ("select.select(", "reader.read(", "self._epoll.poll(")
_WAIT_FUNCS = ("Condition.wait (threading.py)", "Event.wait (threading.py)")


def _is_wait(frame: str) -> bool:
    return _func(frame) in _WAIT_FUNCS or any(w in _source(frame) for w in _WAIT_LINES)


def analyse_pyspy(path: str, n: int, rate: int) -> dict:
    self_line = {"main": collections.Counter(), "slot": collections.Counter()}
    incl = {"main": collections.Counter(), "slot": collections.Counter()}
    total = collections.Counter()
    waiting = collections.Counter()
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            count = int(count)
            frames = stack.split(";")
            procs = [x for x in frames if x.startswith("process ")]
            frames = [x for x in frames if not x.startswith("process ")]
            role = "main" if len(procs) <= 1 else "slot"
            if frames and _is_wait(frames[-1]):
                waiting[role] += count
                continue
            total[role] += count
            if frames:
                self_line[role][frames[-1]] += count
                for fr in {_func(x) for x in frames}:
                    incl[role][fr] += count
    ms = 1000.0 / rate / n  # one sample, in ms per task

    out = {"samples": dict(total), "ms_per_task": {r: round(c * ms, 3) for r, c in total.items()},
           "waiting_ms_per_task": {r: round(c * ms, 3) for r, c in waiting.items()}}
    for role in ("main", "slot"):
        tot = max(1, total[role])
        out[f"{role}_self"] = [[fr, _source(fr), round(c * ms, 3), round(100.0 * c / tot, 1)]
                               for fr, c in self_line[role].most_common(15)]
        # Inclusive: spoolq's own functions, logging and json; not the
        # frames every sample of the role passes through (entry points, loop).
        keep = [(fr, c) for fr, c in incl[role].most_common()
                if c < 0.97 * tot and ("spoolq/" in fr or "logging/" in fr or "json/" in fr)]
        out[f"{role}_inclusive"] = [[fr, round(c * ms, 3), round(100.0 * c / tot, 1)] for fr, c in keep[:25]]
    return out


# ---------------------------------------------------------------- strace


_SC = re.compile(r"^(\d+\.\d+) (?:<\.\.\. (\w+) resumed>|(\w+)\()")
_DUR = re.compile(r"<(\d+\.\d+)>$")


def run_strace(a) -> dict:
    if not shutil.which("strace"):
        return {"skipped": "strace not found"}
    tdir = tempfile.mkdtemp(prefix="profile-strace-", dir=a.dir)
    prefix = os.path.join(tdir, "tr")
    r = Run(a.dir, a.concurrency, wrapper=["strace", "-f", "-ff", "-qq", "-ttt", "-T", "-o", prefix, "--"])
    try:
        main_pid = r.worker_pid()
        handles = [("noop", f"t{i:06d}") for i in range(a.n)]
        t0 = time.time()
        drain_s = r.drain(handles, enqueue=True, timeout=a.timeout * 3)
        t1 = time.time()
    finally:
        r.stop()
        r.close()
    try:
        per = {"main": collections.Counter(), "slot": collections.Counter()}
        dur = {"main": collections.Counter(), "slot": collections.Counter()}
        for path in glob.glob(prefix + ".*"):
            pid = int(path.rsplit(".", 1)[1])
            role = "main" if pid == main_pid else "slot"
            with open(path, errors="replace") as f:
                for line in f:
                    m = _SC.match(line)
                    if not m or not t0 <= float(m.group(1)) <= t1:
                        continue
                    name = m.group(2) or m.group(3)
                    if not m.group(2) and "<unfinished ...>" not in line:
                        per[role][name] += 1  # a "resumed" half was counted when it began
                    d = _DUR.search(line.rstrip())
                    if d and "<unfinished ...>" not in line:
                        dur[role][name] += float(d.group(1))
    finally:
        shutil.rmtree(tdir, ignore_errors=True)
    out = {"drain_s_under_strace": drain_s}
    for role, c in per.items():
        out[f"{role}_per_task"] = round(sum(c.values()) / a.n, 2)
        out[f"{role}_top"] = [[k, round(v / a.n, 2)] for k, v in c.most_common(14)]
        idle = ("pselect6", "select", "wait4", "read") if role == "main" else ("read",)
        busy = {k: v for k, v in dur[role].items() if k not in idle}  # waits for work, not work
        out[f"{role}_syscall_ms_per_task"] = round(sum(busy.values()) / a.n * 1e3, 3)
        out[f"{role}_time_top"] = [[k, round(v / a.n * 1e3, 3)]
                                   for k, v in sorted(busy.items(), key=lambda kv: -kv[1])[:8]]
    return out


# ---------------------------------------------------------------- report


def report(data) -> str:
    m = data["meta"]
    dirty = m.get("dirty")
    parts = [f"Measured {m['date']} (git {m['git_rev']}"
             + (f" + uncommitted changes to {', '.join(dirty)}" if dirty else "")
             + f"), {m['n']} no-op tasks, `--concurrency {m['concurrency']}`, non-durable, "
             f"load average {m['load1_before']:.1f} on {m['cpus']} CPUs."]
    p = data.get("pyspy")
    if p and "samples" in p:
        busy, waited = p["ms_per_task"], p.get("waiting_ms_per_task", {})
        parts.append(
            f"**py-spy** ({p['rate']} Hz, non-idle samples only: on a CPU or runnable, or in a syscall "
            f"that is not a wait; the drain took {p['drain_s']:.2f} s = {p['drain_s'] / m['n'] * 1e3:.1f} ms "
            f"per task of wall time). Busy time per task: daemon main process {busy.get('main', 0):.2f} ms, "
            f"slots {busy.get('slot', 0):.2f} ms (both slots together). Left out: samples in a wait for work "
            f"that py-spy still counts as non-idle (the main loop's `select`, a slot's read of its command "
            f"pipe, the sleeps of a slot's output and deadline threads): "
            f"{waited.get('main', 0):.2f} ms a task in the main process, {waited.get('slot', 0):.2f} in the slots.")
        for role, title in (("main", "Daemon main process"), ("slot", "Handler slots")):
            rows = [[f"`{fr}`", f"`{src}`" if src else "", f"{msv:.3f}", f"{pct:.1f}%"]
                    for fr, src, msv, pct in p[f"{role}_self"][:10]]
            parts.append(f"{title}: top lines by self time (ms per task; share of the {role} busy time):\n\n"
                         + common.markdown_table(["frame", "source line", "ms/task", "share"], rows))
            rows = [[f"`{fr}`", f"{msv:.3f}", f"{pct:.1f}%"] for fr, msv, pct in p[f"{role}_inclusive"][:12]]
            parts.append(f"{title}: spoolq / logging / json functions by inclusive time:\n\n"
                         + common.markdown_table(["function", "ms/task", "share"], rows))
    s = data.get("strace")
    if s and "main_per_task" in s:
        rows = []
        for role, label in (("main", "daemon main process"), ("slot", "handler slots")):
            rows.append([label, f"{s[role + '_per_task']:.1f}",
                         ", ".join(f"{k} {v:g}" for k, v in s[role + "_top"][:10]),
                         f"{s[role + '_syscall_ms_per_task']:.2f}",
                         ", ".join(f"{k} {v:.2f}" for k, v in s[role + "_time_top"][:5])])
        parts.append("**strace** (`strace -f -ff -T`, only syscalls between the first enqueue and the last task "
                     f"done, / N; the drain took {s['drain_s_under_strace']:.1f} s under strace; time in syscalls "
                     "leaves out the waits: select/wait4/read in the main process, read of the command pipe "
                     "in slots):\n\n"
                     + common.markdown_table(["process", "syscalls/task", "top calls per task",
                                              "ms/task in syscalls", "slowest calls (ms/task)"], rows))
    return "\n\n".join(parts)


def write_md(text: str) -> None:
    with open(PROFILE_MD) as f:
        doc = f.read()
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(PROFILE_MD, "w") as f:
        f.write(head + BEGIN + "\n" + text + "\n" + END + tail)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--skip", default="", help="comma list: pyspy, strace")
    ap.add_argument("--no-md", action="store_true", help="do not write bench/profile.md")
    ap.add_argument("--reanalyse", action="store_true",
                    help="no run: analyse the py-spy stacks kept in bench/results again, into profile.json/.md")
    common.add_base_dir_arg(ap)
    a = ap.parse_args(argv)
    skip = set(a.skip.split(","))
    os.makedirs(common.RESULTS_DIR, exist_ok=True)
    load = os.getloadavg()[0]
    data = {}
    if a.reanalyse:
        data = common.read_json("profile.json")
        if not data or "samples" not in data.get("pyspy", {}):
            ap.error("no earlier py-spy run in bench/results to analyse")
        data["pyspy"].update(analyse_pyspy(RAW, data["meta"]["n"], data["pyspy"]["rate"]))
        skip = {"pyspy", "strace"}
    elif "pyspy" not in skip:
        if shutil.which("py-spy"):
            data["pyspy"] = run_pyspy(a)
        else:
            data["pyspy"] = {"skipped": "py-spy not found (pip install py-spy)"}
    if "strace" not in skip:
        data["strace"] = run_strace(a)
    if not a.reanalyse:
        data["meta"] = common.meta(a.dir, n=a.n, concurrency=a.concurrency, load1_before=load)
    text = report(data)
    print(text)
    common.write_json("profile.json", data)
    if not a.no_md:
        write_md(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
