"""Run the whole benchmark: lifecycle, syscall counts, e2e daemons, wake-up, plot.

    python bench/run.py                   # the full run (issue 6 settings)
    python bench/run.py --quick           # smoke test, well under a minute or two
    python bench/run.py --update-readme   # also put the tables into bench/README.md

Each part is its own script (run with --help for its options) and writes
bench/results/<part>.json; this driver runs them in turn on the same --dir,
then prints the tables and the issue's targets against what was measured.
A part that fails is reported and the others still run; exit status 1 then.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import common
import e2e
import lifecycle
import syscalls
import wakeup

README = os.path.join(common.BENCH_DIR, "README.md")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

FULL = {
    "lifecycle": ["--n", "5000", "--n-durable", "500", "--rounds", "3"],
    "syscalls": ["--backends", "floor,spoolq,huey.FileStorage", "--n1", "20", "--n2", "70"],
    "e2e": ["--n", "1000", "--rounds", "3"],
    "wakeup": ["--samples", "20", "--idle", "1"],
}
QUICK = {
    "lifecycle": ["--n", "300", "--n-durable", "100", "--rounds", "1"],
    "syscalls": ["--backends", "floor,spoolq", "--modes", "non-durable", "--n1", "20", "--n2", "60"],
    "e2e": ["--n", "200", "--rounds", "1"],
    "wakeup": ["--samples", "5", "--idle", "0.5"],
}


def _summary(data, **match):
    for s in data.get("summary", []):
        if all(s.get(k) == v for k, v in match.items()):
            return s
    return None


def targets() -> list[list[str]]:
    """Issue 6's targets against the measured values (from the JSON files)."""
    rows = []

    def add(what, target, value, ok):
        rows.append([what, target, value, "n/a" if ok is None else ("met" if ok else "NOT met")])

    life = common.read_json("lifecycle.json") or {}
    for mode, key, bound in (("non-durable", "ratio_floor_median", 0.6),
                             ("non-durable", "ratio_huey_median", 1.5),
                             ("durable", "ratio_floor_median", 0.6)):
        s = _summary(life, backend="spoolq", mode=mode)
        v = s.get(key) if s else None
        ref = "floor" if "floor" in key else "huey FileStorage"
        add(f"lifecycle {mode}: spoolq / {ref}", f">= {bound}x", common.fmt_ratio(v),
            None if v is None else v >= bound)
    s = _summary(common.read_json("e2e.json") or {}, daemon="spoolq")
    v = s.get("ratio_huey_median") if s else None
    add(f"e2e: spoolq ({s['mode'] if s else '?'}) / huey consumer", ">= 1.5x", common.fmt_ratio(v),
        None if v is None else v >= 1.5)
    wake = common.read_json("wakeup.json") or {}
    r = next((x for x in wake.get("results", []) if x["daemon"] == "spoolq"), None)
    for key, bound in (("p50_s", 0.020), ("p95_s", 0.100)):
        v = r.get(key) if r else None
        add(f"wake-up {key[:3]}: spoolq", f"<= {bound * 1e3:g} ms",
            "n/a" if v is None else f"{v * 1e3:.1f} ms", None if v is None else v <= bound)
    return rows


def report() -> str:
    parts = []
    life = common.read_json("lifecycle.json")
    if life:
        m = life["meta"]
        fs = m.get("fs") or {}
        parts.append(
            f"Measured {m['date']} (git {m['git_rev']}), {m['cpus']} CPUs, Python {m['python']}, "
            f"{fs.get('type', '?')}{'' if fs.get('journal', True) else ' without journal'} at {m['dir']}; "
            f"versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + ".")
        loads = [r["load1_before"] for r in life["runs"] if "load1_before" in r]
        if loads:
            parts[-1] += (f" 1-minute load average before the lifecycle runs: {min(loads):.1f} to "
                          f"{max(loads):.1f} on {m['cpus']} CPUs; the lifecycle part took "
                          f"{m['elapsed_s']:.0f} s.")
        parts.append(f"**Lifecycle** (N={m['n']} non-durable, N={m['n_durable']} durable, "
                     f"median of {m['rounds']} interleaved rounds; ratios taken per round):\n\n"
                     + lifecycle.report(life))
    sc = common.read_json("syscalls.json")
    if sc:
        parts.append(f"**Syscalls per task** (strace, ({sc['meta']['n2']} - {sc['meta']['n1']}) tasks "
                     "differential):\n\n" + syscalls.report(sc))
    ee = common.read_json("e2e.json")
    if ee:
        parts.append(f"**End-to-end daemon** ({ee['meta']['n']} no-op tasks, {ee['meta']['concurrency']} "
                     f"workers, median of {ee['meta']['rounds']} rounds):\n\n" + e2e.report(ee))
    wk = common.read_json("wakeup.json")
    if wk:
        parts.append(f"**Wake-up latency** ({wk['meta']['samples']} samples, "
                     f"{wk['meta']['idle_s']:g} s idle before each):\n\n" + wakeup.report(wk))
    parts.append("**Issue 6 targets:**\n\n" + common.markdown_table(
        ["target", "bound", "measured", ""], targets()))
    return "\n\n".join(parts)


def update_readme(text: str) -> None:
    with open(README) as f:
        doc = f.read()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{README} lacks the {BEGIN} / {END} markers")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(README, "w") as f:
        f.write(head + BEGIN + "\n" + text + "\n" + END + tail)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small N, one round: a smoke test")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: " + ",".join(FULL))
    ap.add_argument("--update-readme", action="store_true", help="write the tables into bench/README.md")
    ap.add_argument("--report-only", action="store_true", help="only print the report of the existing JSON")
    common.add_base_dir_arg(ap)
    a = ap.parse_args(argv)

    failed = []
    if not a.report_only:
        settings = QUICK if a.quick else FULL
        skip = set(a.skip.split(","))
        t0 = time.monotonic()
        for part, args in settings.items():
            if part in skip:
                continue
            cmd = [sys.executable, os.path.join(common.BENCH_DIR, f"{part}.py"), *args, "--dir", a.dir]
            print(f"\n=== {part}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
            t = time.monotonic()
            rc = subprocess.run(cmd).returncode
            print(f"=== {part}: exit {rc}, {time.monotonic() - t:.0f}s", file=sys.stderr, flush=True)
            if rc:
                failed.append(part)
        rc = subprocess.run([sys.executable, os.path.join(common.BENCH_DIR, "plot.py")]).returncode
        if rc:
            failed.append("plot")
        print(f"\n=== all parts: {time.monotonic() - t0:.0f}s"
              + (f"; FAILED: {', '.join(failed)}" if failed else ""), file=sys.stderr)

    text = report()
    print("\n" + text)
    if a.update_readme:
        update_readme(text)
        print("updated", README, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
