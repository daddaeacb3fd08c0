"""Plot bench/results/*.json into bench/results.png (matplotlib, Agg).

Panels: lifecycle tasks/s per backend, non-durable and durable side by side
(bars: median over rounds; whiskers: min..max; label: ratio to the floor; log
scale, SQLite is 10x the rest), then, when their JSON exists, e2e daemon
tasks/s, wake-up latency p50/p95, scaling (lookup time, daemon RSS, sweep
time against N, log-log) and the filesystem's per-operation costs.

    python bench/plot.py [--out bench/results.png]
"""

from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

import common  # noqa: E402

COLORS = {"floor": "#555555", "spoolq": "#1f77b4"}
PEER = "#ff7f0e"


def _color(name):
    return COLORS.get(name, PEER)


def _bars(ax, names, values, lows, highs, labels, title, ylabel, log=False):
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
    if log:
        ax.set_yscale("log")
        lo = min(v for v in lows if v) / 2
        ax.set_ylim(lo, max(highs) * 3)
    else:
        ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3, which="both" if log else "major")


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
            ylabel="tasks/s (log scale)", log=True,
        ))
    return out


def e2e_panel(ax, data) -> bool:
    """Grouped bars per daemon: end to end (producer included) and backlog drain."""
    rows = [x for x in data["summary"] if x["tasks_per_s_median"]]
    if not rows:
        return False
    m = data["meta"]
    w = 0.38
    groups = (("tasks_per_s", "ratio_huey_median", "end to end (producer included)", 1.0, -w / 2),
              ("drain_tasks_per_s", "drain_ratio_huey_median", "backlog drain (daemon alone)", 0.5, w / 2))
    for key, rkey, label, alpha, dx in groups:
        vals, lows, highs, xs = [], [], [], []
        for x, r in enumerate(rows):
            t = [v for v in (r.get(key) or []) if v]
            if not t:
                continue
            xs.append(x + dx)
            vals.append(r[key + "_median"])
            lows.append(vals[-1] - min(t))
            highs.append(max(t) - vals[-1])
            ratio = r.get(rkey)
            ax.annotate(common.fmt_ratio(ratio) + " huey" if ratio else "", (x + dx, max(t)),
                        textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
        if not xs:
            continue
        ax.bar(xs, vals, w, color=[_color(rows[round(x - dx)]["daemon"]) for x in xs], alpha=alpha, label=label)
        ax.errorbar(xs, vals, yerr=[lows, highs], fmt="none", ecolor="black", capsize=3, linewidth=1)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["daemon"] for r in rows], fontsize=8)
    ax.set_ylabel("tasks/s")
    ax.set_title(f"daemons, {m['n']} no-op tasks, {m['concurrency']} workers, {m['rounds']} rounds", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.margins(y=0.2)
    ax.grid(axis="y", alpha=0.3)
    return True


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


def _scaling_rows(data, phase, what):
    return next((x for x in data["summary"] if x["phase"] == phase and x["what"] == what), None)


def lookup_panel(ax, data) -> bool:
    sizes = data["sizes"]
    series = [("enqueued", "status: waiting task", "waiting task, N in enqueued/", "o-"),
              ("enqueued", "status: done task", "done task, N in enqueued/", "s--"),
              ("enqueued", "status: missing task", "missing task, N in enqueued/", "x:"),
              ("done", "status: done task", "done task, N in done/", "o-"),
              ("running", "status: running task", "running task, N in running/", "^-")]
    drawn = False
    for phase, what, label, style in series:
        row = _scaling_rows(data, phase, what)
        if not row:
            continue
        ys = [row["by_n"][str(n)]["median"] for n in sizes]
        if None in ys:
            continue
        r = row["ratio"].get(str(sizes[-1]))
        ax.plot(sizes, [y * 1e6 for y in ys], style, label=f"{label} ({common.fmt_ratio(r)})")
        drawn = True
    if not drawn:
        return False
    ax.set_xscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([f"{n:,}" for n in sizes])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(0, ax.get_ylim()[1] * 1.7)
    ax.set_xlabel("N tasks present (log scale)")
    ax.set_ylabel("µs per Spool.status() call")
    ax.set_title(f"lookup time vs tasks present (ratio {sizes[-1]:,} / {sizes[0]:,}; target <= 1.5x)",
                 fontsize=10)
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    ax.grid(alpha=0.3, which="both")
    return True


def rss_panel(ax, data) -> bool:
    row = _scaling_rows(data, "enqueued", "daemon RSS")
    if not row:
        return False
    sizes = [n for n in data["sizes"] if row["by_n"][str(n)]["median"]]
    if not sizes:
        return False
    xs = range(len(sizes))
    vals = [row["by_n"][str(n)]["median"] / 1024 for n in sizes]
    ax.bar(xs, vals, color=COLORS["spoolq"])
    for x, n, v in zip(xs, sizes, vals):
        ax.annotate(f"{v:.1f} MB ({common.fmt_ratio(row['ratio'][str(n)])})", (x, v),
                    textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{row['by_n'][str(n)].get('queued') or n:,}" for n in sizes], fontsize=8)
    ax.set_xlabel("tasks waiting in enqueued/")
    ax.set_ylabel("VmRSS of the daemon main process, MB")
    ax.set_title("daemon RSS, idle after indexing the queue (target <= 1.5x)", fontsize=10)
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)
    return True


def sweep_panel(ax, data) -> bool:
    drawn = False
    for phase, what, label, color in (("running", "reenqueue_zombies", "reenqueue_zombies, N in running/", "#1f77b4"),
                                      ("done", "delete_retired", "delete_retired, N in done/", "#2ca02c"),
                                      ("enqueued", "reenqueue_zombies", "reenqueue_zombies, N in enqueued/", "#1f77b4"),
                                      ("enqueued", "delete_retired", "delete_retired, N in enqueued/", "#2ca02c")):
        row = _scaling_rows(data, phase, what)
        if not row:
            continue
        pts = [(n, row["by_n"][str(n)]["median"]) for n in data["sizes"] if row["by_n"][str(n)]["median"]]
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] * 1e3 for p in pts]
        style = "o-" if phase != "enqueued" else "s:"
        fit = row.get("fit")
        extra = f", exponent {fit['exponent']:.2f}" if fit else ""
        ax.plot(xs, ys, style, color=color, label=label + extra)
        if phase != "enqueued":
            # the linear reference through the largest point
            ax.plot(xs, [ys[-1] * x / xs[-1] for x in xs], "--", color=color, alpha=0.35, linewidth=1)
        drawn = True
    if not drawn:
        return False
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(data["sizes"])
    ax.set_xticklabels([f"{n:,}" for n in data["sizes"]])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("N (log scale)")
    ax.set_ylabel("ms per sweep pass (log scale)")
    ax.set_title("sweep time vs N (dashed: linear through the largest N)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3, which="both")
    return True


def fscost_panel(ax, data) -> bool:
    s = data.get("summary") or {}
    if not s:
        return False
    names = list(s)
    vals = [s[k] * 1e3 for k in names]
    ax.barh(range(len(names)), vals, color="#777777")
    for y, v in enumerate(vals):
        ax.annotate(f"{v:.3f}", (v, y), textcoords="offset points", xytext=(3, -3), fontsize=7)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("ms per operation (log scale)")
    ax.set_title(f"filesystem costs at {data['meta']['dir']} (fscost.py)", fontsize=10)
    ax.grid(axis="x", alpha=0.3, which="both")
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.path.join(common.BENCH_DIR, "results.png"))
    a = ap.parse_args(argv)

    life = common.read_json("lifecycle.json")
    if life is None:
        print("no bench/results/lifecycle.json: run bench/lifecycle.py first", file=sys.stderr)
        return 1
    bar_panels = lifecycle_panels(life)
    drawers = []
    e2e = common.read_json("e2e.json")
    if e2e:
        drawers.append(lambda ax: e2e_panel(ax, e2e))
    wake = common.read_json("wakeup.json")
    if wake and any(r.get("p50_s") is not None for r in wake["results"]):
        drawers.append(lambda ax: wakeup_panel(ax, wake))
    sc = common.read_json("scaling.json")
    if sc:
        drawers += [lambda ax: lookup_panel(ax, sc), lambda ax: rss_panel(ax, sc), lambda ax: sweep_panel(ax, sc)]
    fc = common.read_json("fscost.json")
    if fc:
        drawers.append(lambda ax: fscost_panel(ax, fc))

    total = len(bar_panels) + len(drawers)
    cols = 2
    rows = (total + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(13, 4.3 * rows), squeeze=False)
    flat = list(axes.flat)
    i = 0
    for p in bar_panels:
        _bars(flat[i], **p)
        i += 1
    for draw in drawers:
        if draw(flat[i]):
            i += 1
    for ax in flat[i:]:
        ax.axis("off")
    m = life["meta"]
    fs = m.get("fs") or {}
    fs_txt = fs.get("type", "?") + ("" if fs.get("journal", True) else " (no journal)")
    metas = sorted((d["meta"] for d in (life, e2e, wake, sc, fc) if d), key=lambda x: x["date"])
    revs = list(dict.fromkeys(x.get("git_rev") for x in metas))
    dirty = " + uncommitted spoolq changes" if any(x.get("dirty") for x in metas) else ""
    fig.suptitle(f"spoolq bench — {m['date']}, {m['cpus']} CPUs, {fs_txt} at {m['dir']}, "
                 f"git {' → '.join(str(r) for r in revs)}{dirty}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(a.out, dpi=100)
    print("wrote", a.out, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
