"""Wake-up latency of an idle daemon: enqueue one task, time until its function starts.

Per daemon: a fresh directory, the daemon started (2 workers) and warmed up,
then for each of --samples samples: stay idle for --idle seconds (jittered
+-25% so that a polling daemon is not sampled in phase), take t0 =
time.monotonic(), enqueue one `stamp` task through the Python API, and read
back the time.monotonic() the task function wrote when it started (one clock
for all processes on Linux). Latency = stamp - t0, so it includes the
enqueue call. Reported: p50 and p95 (nearest rank), min, max, all samples.

huey's consumer polls its storage; after an empty poll it waits
-d 0.1 s, then 1.15x longer each time, up to -m 10 s. Its wake-up latency so
grows with the idle time before the task: --idle is part of the result.

    python bench/wakeup.py                 # 20 samples, 1 s idle, huey and spoolq
    python bench/wakeup.py --idle 5 --daemons huey
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import traceback

import common
from daemons import DAEMONS


def sample(d, k: int, stamp_dir: str, timeout: float) -> float:
    path = os.path.join(stamp_dir, f"stamp-{k}")
    t0 = time.monotonic()
    h = d.enqueue_stamp(k, path)
    deadline = t0 + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"task function did not start within {timeout}s")
        time.sleep(0.0005)
    with open(path) as f:
        started = float(f.read())
    common.wait_until_all([h], d.is_done, timeout)  # let it finish before idling again
    return started - t0


def run_daemon(cls, a, ws) -> dict:
    rng = random.Random(a.seed)
    lat = []
    with ws.run_dir(f"wakeup-{cls.name}") as root:
        stamp_dir = os.path.join(root, "stamps")
        os.mkdir(stamp_dir)
        with cls(root, a.durable, a.concurrency) as d:
            for k in range(a.samples):
                time.sleep(a.idle * rng.uniform(0.75, 1.25))
                lat.append(sample(d, k, stamp_dir, a.timeout))
    return {
        "samples_s": lat,
        "p50_s": common.percentile(lat, 50),
        "p95_s": common.percentile(lat, 95),
        "min_s": min(lat),
        "max_s": max(lat),
    }


def report(data) -> str:
    """The markdown table of a wakeup.json."""
    def ms(x):
        return "n/a" if x is None else f"{x * 1e3:.1f}"

    rows = [[r["daemon"], r["mode"], len(r.get("samples_s", [])),
             ms(r.get("p50_s")) if not r.get("error") else "FAILED: " + r["error"],
             ms(r.get("p95_s")), ms(r.get("min_s")), ms(r.get("max_s"))] for r in data["results"]]
    rows += [[k["daemon"], "", "", f"skipped: {k['reason']}", "", "", ""] for k in data["skipped"]]
    return common.markdown_table(["daemon", "mode", "samples", "p50 ms", "p95 ms", "min ms", "max ms"], rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--idle", type=float, default=1.0, help="seconds idle before each sample (+-25%%)")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--daemons", default=",".join(DAEMONS))
    ap.add_argument("--durable", action="store_true", help="spoolq in durable mode (default: non-durable)")
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--seed", type=int, default=6)
    ap.add_argument("--json", default="wakeup.json")
    common.add_base_dir_arg(ap)
    common.add_cleanup_arg(ap)
    a = ap.parse_args(argv)

    results, skipped, failed = [], [], False
    with common.Workspace(a.dir, a.cleanup) as ws:
        for name in [x for x in a.daemons.split(",") if x]:
            cls = DAEMONS[name]
            why = cls.available()
            if why:
                skipped.append({"daemon": name, "reason": why})
                continue
            rec = {"daemon": name, "note": cls.mode_note,
                   "mode": "n/a (no fsync)" if name == "huey" else ("durable" if a.durable else "non-durable")}
            try:
                rec.update(run_daemon(cls, a, ws))
                msg = f"p50 {rec['p50_s'] * 1e3:.1f} ms, p95 {rec['p95_s'] * 1e3:.1f} ms"
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {e}"
                msg, failed = "FAILED " + rec["error"], True
                traceback.print_exc()
            results.append(rec)
            print(f"{name:8} {msg}", file=sys.stderr)

    out = {
        "meta": common.meta(a.dir, samples=a.samples, idle_s=a.idle, concurrency=a.concurrency,
                            durable=a.durable),
        "skipped": skipped, "results": results,
    }
    print(report(out))
    if a.json:
        print("wrote", common.write_json(a.json, out), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
