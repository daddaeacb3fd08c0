"""Output capture and progress (contract §12.1, §12.3): what they cost a handler.

    python bench/output.py                 # 256 MiB per write run, 5 rounds
    python bench/output.py --mib 64 --rounds 3

Part 1, **output throughput**: a process writes N MiB to its fd 1 in 64 KiB
writes, the way a handler (or its subprocess) prints, and times it until the
capture has put everything in place:

* `/dev/null`: fd 1 is /dev/null (the bound: writing costs only the syscalls);
* `capture, cap 1 MiB`: :class:`spoolq.worker.capture.Capture`, as a handler
  process runs it, with the default cap: 512 KiB of head, then the tail
  rotates through two parts (what happens to output beyond the cap);
* `capture, cap 4 GiB`: everything is kept (all of it spliced into ``output``);
* `capture, 64 KiB pipe`: the first, with the pipe's default size instead of
  1 MiB (why the capture enlarges its pipe);
* `direct file`: fd 1 is a regular file opened O_APPEND, no capture (the
  other design: the handler writes the file itself; it keeps everything,
  since capping it would need the file rewritten);
* `daemon, cap 1 MiB`: a real worker daemon runs a handler that writes N MiB
  (the time the handler measures; its output reaches the task's file).

Throughput is N MiB over the time; the table gives each against /dev/null.

Part 2, **progress calls**: ``TaskContext.progress(i, n, "msg")`` called
1,000,000 times in a loop, with a task directory to write to (as in a handler
process of the daemon), against the same loop calling an empty method; the
writes it makes (at most one per 0.2 s) are counted.

Writes ``bench/results/output.json`` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import common

from spoolq import Spool, State
from spoolq.task import TaskContext
from spoolq.worker import capture

CHUNK = 64 << 10


def _write_all(fd: int, mib: int) -> None:
    block = memoryview(b"x" * (CHUNK - 1) + b"\n")
    for _ in range(mib * (1 << 20) // CHUNK):
        view = block
        while view:
            view = view[os.write(fd, view):]


def _timed_write(path: str, flags: int, mib: int) -> float:
    fd = os.open(path, flags, 0o600)
    try:
        started = time.perf_counter()
        _write_all(fd, mib)
        return time.perf_counter() - started
    finally:
        os.close(fd)


def run_devnull(mib: int, _dir: str) -> float:
    return _timed_write(os.devnull, os.O_WRONLY, mib)


def run_direct(mib: int, workdir: str) -> float:
    return _timed_write(os.path.join(workdir, "direct"), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, mib)


def run_capture(mib: int, workdir: str, cap: int, pipe_size: int = capture.PIPE_SIZE) -> float:
    task = tempfile.mkdtemp(dir=workdir)
    dfd = os.open(task, os.O_RDONLY | os.O_DIRECTORY)
    old = capture.PIPE_SIZE
    capture.PIPE_SIZE = pipe_size
    try:
        started = time.perf_counter()
        with capture.Capture(dfd, cap):
            _write_all(1, mib)
        elapsed = time.perf_counter() - started  # the capture is over: output is in place
        size = os.stat("output", dir_fd=dfd).st_size
        assert size <= cap + 100, size
        return elapsed
    finally:
        capture.PIPE_SIZE = old
        os.close(dfd)


def run_daemon(mib: int, workdir: str) -> float:
    root = os.path.join(workdir, f"spool-{time.monotonic_ns()}")
    spool = Spool.init(root, durable=False)
    spool.register_type("W", "output_bench_handler.write", max_output_bytes=1 << 20)
    handler_dir = os.path.join(workdir, "handlers")
    os.makedirs(handler_dir, exist_ok=True)
    with open(os.path.join(handler_dir, "output_bench_handler.py"), "w") as fh:
        fh.write(
            "import json, os, time\n"
            "def write(ts, inp):\n"
            f"    block = b'x' * {CHUNK - 1} + b'\\n'\n"
            "    started = time.perf_counter()\n"
            f"    for _ in range(inp['mib'] * {1 << 20} // {CHUNK}):\n"
            "        os.write(1, block)\n"
            "    ts.store_response(json.dumps(time.perf_counter() - started))\n"
        )
    spool.enqueue_json("W", "w", {"mib": mib})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([common.REPO_DIR, handler_dir]))
    proc = subprocess.Popen([sys.executable, "-m", "spoolq", "--root", root, "worker", "b1"], env=env,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while spool.status("W", "w").state not in (State.FINISHED, State.FAILED):
            if time.monotonic() > deadline:
                raise RuntimeError("the daemon's run did not end")
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(30)
    assert os.path.getsize(os.path.join(spool.status("W", "w").path, "output")) <= (1 << 20) + 100
    return json.loads(spool.response("W", "w")[0])


def progress_cost(calls: int, workdir: str) -> dict[str, float]:
    task = tempfile.mkdtemp(dir=workdir)
    dfd = os.open(task, os.O_RDONLY | os.O_DIRECTORY)
    writes = 0
    try:
        context = TaskContext(None, "T:x#1@s", task_dir=dfd)  # type: ignore[arg-type]

        class Empty:
            def progress(self, done: float, total: float | None = None, message: str = "") -> None:
                pass

        empty = Empty()
        started = time.perf_counter()
        for i in range(calls):
            empty.progress(i, calls, "working")
        base = time.perf_counter() - started
        started = time.perf_counter()
        for i in range(calls):
            context.progress(i, calls, "working")
        spent = time.perf_counter() - started
        context.flush_progress()
        # Each write replaces the file: count them from the elapsed time (at
        # most one per PROGRESS_INTERVAL, and the first call writes).
        writes = 1 + int(spent / 0.2)
        doc = json.loads(open(os.path.join(task, "progress")).read())
        assert doc["done"] == calls - 1, doc
        return {"calls": calls, "seconds": spent, "us_per_call": spent / calls * 1e6,
                "empty_us_per_call": base / calls * 1e6, "writes_at_most": writes}
    finally:
        os.close(dfd)


VARIANTS = {
    "/dev/null": run_devnull,
    "capture, cap 1 MiB": lambda mib, d: run_capture(mib, d, 1 << 20),
    "capture, cap 4 GiB": lambda mib, d: run_capture(mib, d, 4 << 30),
    "capture, 64 KiB pipe": lambda mib, d: run_capture(mib, d, 1 << 20, pipe_size=64 << 10),
    "direct file": run_direct,
    "daemon, cap 1 MiB": run_daemon,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_base_dir_arg(ap)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=1_000_000)
    args = ap.parse_args()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="spoolq-bench-output-", dir=args.dir) as workdir:
        for r in range(args.rounds):
            order = list(VARIANTS)
            order = order[r % len(order):] + order[: r % len(order)]  # interleaved: a busy moment hits all alike
            for name in order:
                times[name].append(VARIANTS[name](args.mib, workdir))
                for entry in os.listdir(workdir):  # keep the disk's page cache small between runs
                    path = os.path.join(workdir, entry)
                    if entry != "handlers":
                        subprocess.run(["rm", "-rf", path], check=True)
        progress = [progress_cost(args.calls, workdir) for _ in range(args.rounds)]
    null = statistics.median(times["/dev/null"])
    results = []
    for name, ts in times.items():
        med = statistics.median(ts)
        results.append({"variant": name, "median_s": med, "min_s": min(ts), "max_s": max(ts),
                        "mb_per_s": args.mib * (1 << 20) / med / 1e6, "vs_devnull": null / med})
    best = min(progress, key=lambda p: p["us_per_call"])
    med_progress = statistics.median(p["us_per_call"] for p in progress)
    data = {"meta": common.meta(args.dir), "mib": args.mib, "rounds": args.rounds,
            "results": results, "progress": progress, "progress_us_median": med_progress}
    common.write_json("output.json", data)
    print(f"Output: {args.mib} MiB in 64 KiB writes to fd 1, median of {args.rounds} rounds\n")
    print("| variant | median | MB/s | vs /dev/null |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['median_s'] * 1e3:.0f} ms ({r['min_s'] * 1e3:.0f}–{r['max_s'] * 1e3:.0f}) "
              f"| {r['mb_per_s']:,.0f} | {r['vs_devnull']:.2f}x |")
    print(f"\nProgress: {args.calls:,} calls of TaskContext.progress, {args.rounds} rounds\n")
    print("| per call (median) | best round | an empty method call | 100,000 calls | file writes a round |")
    print("|---|---|---|---|---|")
    print(f"| {med_progress:.2f} µs | {best['us_per_call']:.2f} µs | {best['empty_us_per_call']:.2f} µs "
          f"| {med_progress * 1e5 / 1e6 * 1e3:.0f} ms | at most {best['writes_at_most']} |")


if __name__ == "__main__":
    main()
