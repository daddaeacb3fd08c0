"""The dask executor against fork, and how far one spool host feeds Dask workers.

(Not bench/dask.py: with bench/ on the path, that name would shadow the
``dask`` package in every process here, the Dask workers included.)

    python bench/daskexec.py [--n 200] [--n-sleep 80] [--rounds 2] [--dir /var/tmp]

Needs ``distributed`` (``pip install -e '.[dask]'``). One spool, one worker
daemon (``python -m spoolq worker bench --concurrency 2 --dask-scheduler
ADDR``) and a LocalCluster of worker processes (1 thread each) made here.

* **overhead**: N no-op tasks of a fork type, then N of a dask type, through
  the same daemon in the same run, 2 Dask workers against fork's 2 slots;
  repeated --rounds times, alternating. Per task: the median time from the
  task's start (``started_at``) to its end (``finished_at``), and the drain
  rate (N / time from the first enqueue to the last task final). The
  overhead is the difference of the medians.
* **scaling**: N tasks that sleep 100 ms, with 1, 2 and 4 Dask workers (the
  daemon sizes its dask runs to the cluster's threads). Throughput, its ratio
  to the ideal (workers x 10/s), and the daemon's CPU time per task: the
  spool host's own cost, whose inverse is how many tasks/s one spool host
  could feed if nothing else limited it.

Writes ``bench/results/dask.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import common

from spoolq import Spool, State


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _when(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso).timestamp()


def _batch(spool: Spool, daemon: subprocess.Popen, type_name: str, prefix: str, n: int, inp) -> dict:
    ids = [f"{prefix}{i:04d}" for i in range(n)]
    cpu0 = _cpu_seconds(daemon.pid)
    t0 = time.monotonic()
    for task_id in ids:
        spool.enqueue(type_name, task_id, inp)
    while spool.counts()["FINISHED"] + spool.counts()["FAILED"] < len(_batch.seen) + n:
        if daemon.poll() is not None:
            raise SystemExit(f"the daemon exited with {daemon.returncode}")
        time.sleep(0.01)
    wall = time.monotonic() - t0
    cpu = _cpu_seconds(daemon.pid) - cpu0
    _batch.seen.update(f"{type_name}:{i}" for i in ids)
    docs = [spool.status(type_name, i).doc for i in ids]
    bad = [d for d in docs if d["state"] != State.FINISHED.name]
    if bad:
        raise SystemExit(f"{len(bad)} {type_name} tasks did not finish: {bad[0]}")
    run = sorted(_when(d["finished_at"]) - _when(d["started_at"]) for d in docs)
    return {"n": n, "wall_s": wall, "per_s": n / wall, "run_median_ms": 1000 * common.median(run),
            "run_p95_ms": 1000 * common.percentile(run, 95), "daemon_cpu_ms_per_task": 1000 * cpu / n}


_batch.seen = set()  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_base_dir_arg(parser)
    parser.add_argument("--n", type=int, default=200, help="no-op tasks per batch (default %(default)s)")
    parser.add_argument("--n-sleep", type=int, default=80, help="100 ms tasks per scaling step (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="fork/dask rounds (default %(default)s)")
    args = parser.parse_args()
    import distributed

    work = tempfile.mkdtemp(prefix="spoolq-bench-dask-", dir=args.dir)
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=logging.ERROR)
    client = distributed.Client(cluster)
    root = os.path.join(work, "spool")
    spool = Spool.init(root, durable=False)
    spool.register_type("noop_fork", "benchtasks.noop")
    spool.register_type("noop_dask", "benchtasks.noop", executor="dask")
    spool.register_type("sleep_dask", "dasktasks.sleep", executor="dask")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([common.BENCH_DIR, common.REPO_DIR, env.get("PYTHONPATH", "")])
    log_path = os.path.join(work, "daemon.log")
    with open(log_path, "wb") as log_file:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "spoolq", "--root", root, "worker", "bench", "--concurrency", "2",
             "--dask-scheduler", cluster.scheduler_address], env=env, stderr=log_file, stdin=subprocess.DEVNULL)
    result: dict = {"overhead": {"fork": [], "dask": []}, "scaling": []}
    try:
        _batch(spool, daemon, "noop_fork", "warm-f", 20, None)  # slots, imports, connection: warm
        _batch(spool, daemon, "noop_dask", "warm-d", 20, None)
        for r in range(args.rounds):
            order = ("fork", "dask") if r % 2 == 0 else ("dask", "fork")
            for kind in order:
                result["overhead"][kind].append(_batch(spool, daemon, f"noop_{kind}", f"r{r}-{kind}-", args.n, None))
        for workers in (1, 2, 4):
            cluster.scale(workers)
            client.wait_for_workers(workers, timeout=120)
            while len(client.scheduler_info(n_workers=-1)["workers"]) != workers:
                time.sleep(0.1)
            time.sleep(2.5)  # the daemon reads the cluster's size every second
            step = _batch(spool, daemon, "sleep_dask", f"w{workers}-", args.n_sleep, {"seconds": 0.1})
            step["workers"] = workers
            step["ideal_per_s"] = workers * 10.0
            result["scaling"].append(step)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        client.close()
        cluster.close()
        shutil.rmtree(work, ignore_errors=True)

    def med(kind, key):
        return common.median([b[key] for b in result["overhead"][kind]])

    summary = {k: {key: med(k, key) for key in ("run_median_ms", "per_s", "daemon_cpu_ms_per_task")}
               for k in ("fork", "dask")}
    summary["overhead_ms"] = summary["dask"]["run_median_ms"] - summary["fork"]["run_median_ms"]
    result["summary"] = summary
    rows = [[k, common.fmt_num(summary[k]["run_median_ms"], 1), common.fmt_num(summary[k]["per_s"], 0),
             common.fmt_num(summary[k]["daemon_cpu_ms_per_task"], 2)] for k in ("fork", "dask")]
    text = "### no-op tasks, 2 fork slots vs 2 Dask workers (medians of %d rounds of %d)\n\n" % (args.rounds, args.n)
    text += common.markdown_table(["executor", "start→end per task (ms)", "tasks/s", "daemon CPU per task (ms)"], rows)
    text += f"\n\ndask per-task overhead over fork: {summary['overhead_ms']:.1f} ms\n\n"
    text += "### 100 ms tasks, dask, N=%d per step\n\n" % args.n_sleep
    text += common.markdown_table(
        ["Dask workers", "tasks/s", "ideal", "of ideal", "daemon CPU per task (ms)", "→ tasks/s one spool host feeds"],
        [[s["workers"], common.fmt_num(s["per_s"], 1), common.fmt_num(s["ideal_per_s"], 0),
          f"{s['per_s'] / s['ideal_per_s']:.0%}", common.fmt_num(s["daemon_cpu_ms_per_task"], 2),
          common.fmt_num(1000 / s["daemon_cpu_ms_per_task"], 0) if s["daemon_cpu_ms_per_task"] else "-"]
         for s in result["scaling"]])
    common.emit(text, "dask.json", {"meta": common.meta(args.dir, distributed=distributed.__version__), **result})


if __name__ == "__main__":
    main()
