"""Plot bench/results/*.json into bench/results.png (matplotlib, Agg).

Panels: lifecycle tasks/s per backend, non-durable and durable (bars: median
over rounds; whiskers: min..max; label: ratio to the floor), then, when their
JSON exists, e2e daemon tasks/s and wake-up latency p50/p95.

    python bench/plot.py [--out bench/results.png]
"""

from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import common  # noqa: E402

COLORS = {"floor": "#555555", "spoolq": "#1f77b4"}
PEER = "#ff7f0e"


def _color(name):
    return COLORS.get(name, PEER)


def _bars(ax, names, values, lows, highs, labels, title, ylabel):
    xs = range(len(names))
    ax.bar(xs, values, color=[_color(n) for n in names])
    err = [[v - lo for v, lo in zip(values, lows)], [hi - v for v, hi in zip(values, highs)]]
    ax.errorbar(xs, values, yerr=err, fmt="none", ecolor="black", capsize=3, linewidth=1)
    for x, v, lab in zip(xs, values, labels):
        if lab:
            ax.annotate(lab, (x, v), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([n.replace(".", ".\n", 1) for n in names], fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.margins(y=0.15)


def lifecycle_panels(data):
    out = []
    for mode in ("non-durable", "durable"):
        rows = [s for s in data["summary"] if s["mode"] == mode and s["tasks_per_s_median"]]
        if not rows:
            continue
        tps = [[t for t in s["tasks_per_s"] if t] for s in rows]
        n = rows[0]["n"]
        out.append(dict(
            names=[s["backend"] for s in rows],
            values=[s["tasks_per_s_median"] for s in rows],
            lows=[min(t) for t in tps], highs=[max(t) for t in tps],
            labels=[common.fmt_ratio(s["ratio_floor_median"]) + " floor" if s["ratio_floor_median"] else ""
                    for s in rows],
            title=f"lifecycle, {mode}, N={n}, {data['meta']['rounds']} rounds",
            ylabel="tasks/s",
        ))
    return out


def e2e_panel(data):
    rows = [s for s in data["summary"] if s["tasks_per_s_median"]]
    if not rows:
        return None
    tps = [[t for t in s["tasks_per_s"] if t] for s in rows]
    m = data["meta"]
    return dict(
        names=[s["daemon"] for s in rows], values=[s["tasks_per_s_median"] for s in rows],
        lows=[min(t) for t in tps], highs=[max(t) for t in tps],
        labels=[common.fmt_ratio(s["ratio_huey_median"]) + " huey" if s["ratio_huey_median"] else ""
                for s in rows],
        title=f"e2e daemon, {m['n']} no-op tasks, {m['concurrency']} workers", ylabel="tasks/s",
    )


def wakeup_panel(ax, data):
    rows = [r for r in data["results"] if r.get("p50_s") is not None]
    if not rows:
        return False
    xs = range(len(rows))
    w = 0.38
    ax.bar([x - w / 2 for x in xs], [r["p50_s"] * 1e3 for r in rows], w, label="p50",
           color=[_color(r["daemon"]) for r in rows])
    ax.bar([x + w / 2 for x in xs], [r["p95_s"] * 1e3 for r in rows], w, label="p95",
           color=[_color(r["daemon"]) for r in rows], alpha=0.5)
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['p50_s'] * 1e3:.0f} / {r['p95_s'] * 1e3:.0f}", (x, r["p95_s"] * 1e3),
                    textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["daemon"] for r in rows], fontsize=8)
    m = data["meta"]
    ax.set_title(f"wake-up latency p50 / p95, {m['samples']} samples, {m['idle_s']:g}s idle", fontsize=10)
    ax.set_ylabel("ms")
    ax.legend(fontsize=8)
    ax.margins(y=0.15)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.path.join(common.BENCH_DIR, "results.png"))
    a = ap.parse_args(argv)

    life = common.read_json("lifecycle.json")
    if life is None:
        print("no bench/results/lifecycle.json: run bench/lifecycle.py first", file=sys.stderr)
        return 1
    panels = lifecycle_panels(life)
    e2e = common.read_json("e2e.json")
    wake = common.read_json("wakeup.json")
    e2e_p = e2e_panel(e2e) if e2e else None
    extra = [p for p in (e2e_p,) if p] + ([wake] if wake and any(
        r.get("p50_s") is not None for r in wake["results"]) else [])

    total = len(panels) + len(extra)
    cols = 2
    rows = (total + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(13, 4.3 * rows), squeeze=False)
    flat = list(axes.flat)
    i = 0
    for p in panels + ([e2e_p] if e2e_p else []):
        _bars(flat[i], **p)
        i += 1
    if wake and wakeup_panel(flat[i], wake):
        i += 1
    for ax in flat[i:]:
        ax.axis("off")
    m = life["meta"]
    fs = m.get("fs") or {}
    fs_txt = fs.get("type", "?") + ("" if fs.get("journal", True) else " (no journal)")
    fig.suptitle(f"spoolq bench — {m['date']}, {m['cpus']} CPUs, {fs_txt} at {m['dir']}, "
                 f"git {m['git_rev']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print("wrote", a.out, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
