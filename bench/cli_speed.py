"""Speed of a short command (contract §12.7): `spoolq status` and
`spoolq enqueue --json` against starting a bare interpreter, `python -S -c pass`.

Every round runs each call once as a fresh process, in a rotating order
(interleaved, so a busy moment of a shared machine hits all of them alike);
reported are medians over the rounds, in ms, and each call's ratio to the
bare interpreter (median of the per-round ratios, with their range).

    python bench/cli_speed.py              # 30 rounds
    python bench/cli_speed.py --rounds 100

The calls:

* `python -S -c pass`: the bound's unit.
* `python -c pass`: the interpreter with its site step (site-packages and
  their .pth files), which every installed command pays before any of its
  own code runs. The difference to the first line is the machine's, not
  spoolq's.
* `spoolq status`, `spoolq enqueue --json`: `python -m spoolq …` on the
  working tree, as a user calls them.
* `spoolq status, site skipped`: the same with `-S` (site-packages put on
  PYTHONPATH instead), so what the machine's .pth files cost is left out.
* `spoolq status, all through typer`: the same call with the quick path
  off (`spoolq.cli.main(quick=False)`), what every call cost before typer
  was taken off the quick commands' path.

The children run with bytecode caching on (`PYTHONPYCACHEPREFIX` in the
workspace, warmed before timing), as an installed package has it, even when
the caller set PYTHONDONTWRITEBYTECODE.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import sysconfig
import time

import common

TYPE = "T"


def calls(root: str) -> dict[str, tuple[list[str], dict[str, str], bytes | None]]:
    """name -> (argv, extra environment, stdin); "{n}" in argv is the round."""
    py = sys.executable
    site_packages = os.pathsep.join(dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]))
    tree = {"PYTHONPATH": common.REPO_DIR}
    status = ["-m", "spoolq", "--root", root, "status", TYPE, "X"]
    typer_path = "import sys; from spoolq.cli import main; main(sys.argv[1:], quick=False)"
    return {
        "python -S -c pass": ([py, "-S", "-c", "pass"], {}, None),
        "python -c pass": ([py, "-c", "pass"], {}, None),
        "spoolq status": ([py, *status], tree, None),
        "spoolq enqueue --json": ([py, "-m", "spoolq", "--root", root, "enqueue", TYPE, "e{n}", "-", "--json"],
                                  tree, b"[1, 2, 3]"),
        "spoolq status, site skipped": ([py, "-S", *status], {"PYTHONPATH": common.REPO_DIR + os.pathsep + site_packages},
                                        None),
        "spoolq status, all through typer": ([py, "-c", typer_path, *status[2:]], tree, None),
    }


def run_once(argv: list[str], env: dict[str, str], stdin: bytes | None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, input=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{argv}: exit {proc.returncode}: {proc.stderr.decode().strip()}")
    return elapsed


def report(data) -> str:
    rows = [[r["call"], f"{r['median_s'] * 1e3:.1f}", f"{r['min_s'] * 1e3:.1f}",
             common.fmt_ratio(r["ratio_median"]),
             f"{r['ratio_min']:.2f}–{r['ratio_max']:.2f}"] for r in data["results"]]
    return common.markdown_table(["call", "median ms", "min ms", "/ python -S -c pass", "per round"], rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--json", default="cli_speed.json")
    common.add_base_dir_arg(ap)
    a = ap.parse_args(argv)

    with common.Workspace(a.dir, "end") as ws, ws.run_dir("cli") as run:
        from spoolq import Spool

        root = os.path.join(run, "spool")
        spool = Spool.init(root)
        spool.register_type(TYPE, "spoolq.demo.sequence_sum")
        spool.enqueue(TYPE, "X", (1, 2))
        env = {k: v for k, v in os.environ.items() if k not in ("SPOOLQ_ROOT", "PYTHONDONTWRITEBYTECODE")}
        env["PYTHONPYCACHEPREFIX"] = os.path.join(run, "pycache")
        todo = calls(root)
        for name, (args, extra, stdin) in todo.items():  # warm up: bytecode caches, page cache
            run_once([x.format(n=f"w-{name[:6]}") for x in args] if "{n}" in " ".join(args) else args,
                     {**env, **extra}, stdin)
        times: dict[str, list[float]] = {name: [] for name in todo}
        names = list(todo)
        for n in range(a.rounds):
            for name in names[n % len(names):] + names[: n % len(names)]:
                args, extra, stdin = todo[name]
                times[name].append(run_once([x.format(n=n) for x in args], {**env, **extra}, stdin))
            print(f"round {n + 1}/{a.rounds}", file=sys.stderr, end="\r")
        print(file=sys.stderr)

    unit = times["python -S -c pass"]
    results = []
    for name, ts in times.items():
        ratios = [t / u for t, u in zip(ts, unit)]
        results.append({"call": name, "median_s": statistics.median(ts), "min_s": min(ts),
                        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                        "ratio_max": max(ratios), "samples_s": ts})
    out = {"meta": common.meta(a.dir, rounds=a.rounds, bound="spoolq status <= 3x python -S -c pass"),
           "results": results}
    print(report(out))
    if a.json:
        print("wrote", common.write_json(a.json, out), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
