"""Run the whole benchmark: filesystem costs, lifecycle, syscall counts, e2e
daemons, wake-up, scheduling (bulk enqueue, delayed tasks and retries,
priorities), scaling, plot.

    python bench/run.py                   # default sizes: about 5 minutes here
    python bench/run.py --full            # the issue's sizes (lifecycle N=5,000,
                                          # e2e N=1,000) and the profile
    python bench/run.py --quick           # smoke test, a minute or two
    python bench/run.py --update-readme   # also put the tables into bench/README.md

Each part is its own script (run with --help for its options) and writes
bench/results/<part>.json; this driver runs them in turn on the same --dir,
then prints the tables and the issue's targets against what was measured.
A part that fails is reported and the others still run; exit status 1 then.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time

import bulk
import common
import delayed
import e2e
import fscost
import lifecycle
import priority
import scaling
import syscalls
import wakeup

README = os.path.join(common.BENCH_DIR, "README.md")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
T_BEGIN, T_END = "<!-- targets:begin -->", "<!-- targets:end -->"
TMPFS = "/dev/shm"

# Default sizes: the whole run in about 5 minutes on this project's 2-core VM
# while other test suites run (see README, "Run time"). The scaling part keeps
# the sizes (20,000 vs 200); the lifecycle and e2e parts are smaller
# than the issue's, --full runs those.
DEFAULT = {
    "fscost": ["--n", "200", "--rounds", "3"],
    "lifecycle": ["--n", "300", "--n-durable", "150", "--rounds", "3"],
    # the same on tmpfs: what each backend costs without this disk (CPU only)
    "lifecycle-tmpfs": ["--n", "2000", "--rounds", "3", "--modes", "non-durable",
                        "--backends", "floor,spoolq,spoolq.tracker,huey.FileStorage", "--json", "lifecycle-tmpfs.json"],
    "syscalls": ["--backends", "floor,spoolq,huey.FileStorage", "--n1", "20", "--n2", "70"],
    "e2e": ["--n", "300", "--rounds", "3"],
    "wakeup": ["--samples", "20", "--idle", "1"],
    # scheduling (issues 12, 13); before scaling, which deletes most at its end
    "bulk": ["--n", "2000", "--n-single", "200", "--rounds", "3"],
    "delayed": ["--tasks", "50", "--rounds", "3", "--n1", "10", "--n2", "40"],
    "priority": ["--n", "2000", "--claims", "500", "--rounds", "3"],
    "scaling": ["--sizes", "200,2000,20000", "--rounds", "3"],
}
FULL = {
    **DEFAULT,
    "lifecycle": ["--n", "5000", "--n-durable", "500", "--rounds", "3"],
    "e2e": ["--n", "1000", "--rounds", "3"],
    "priority": ["--n", "20000", "--claims", "500", "--rounds", "3"],
    "profile": ["--n", "1000"],
}
QUICK = {
    "fscost": ["--n", "100", "--rounds", "1"],
    "lifecycle": ["--n", "300", "--n-durable", "100", "--rounds", "1"],
    "lifecycle-tmpfs": ["--n", "300", "--rounds", "1", "--modes", "non-durable",
                        "--backends", "floor,spoolq,spoolq.tracker,huey.FileStorage", "--json", "lifecycle-tmpfs.json"],
    "syscalls": ["--backends", "floor,spoolq", "--modes", "non-durable", "--n1", "20", "--n2", "60"],
    "e2e": ["--n", "200", "--rounds", "1"],
    "wakeup": ["--samples", "5", "--idle", "0.5"],
    "bulk": ["--n", "300", "--n-single", "50", "--rounds", "1"],
    "delayed": ["--tasks", "20", "--immediate", "5", "--spread", "2", "--rounds", "1", "--n1", "5", "--n2", "15"],
    "priority": ["--n", "1000", "--claims", "200", "--rounds", "1"],
    "scaling": ["--sizes", "200,2000", "--rounds", "1", "--lookup-rounds", "3", "--skip", "cli"],
}


def _summary(data, **match):
    for s in data.get("summary", []):
        if all(s.get(k) == v for k, v in match.items()):
            return s
    return None


# Why a target is missed, as found by the measurements (shown only for misses;
# the {names} are filled from the same run's JSON).
CAUSES = {
    "lifecycle-floor": (
        "spoolq's own work per task: on tmpfs, where files cost no disk time, spoolq takes {sq_tmpfs} a "
        "task against the floor's {fl_tmpfs} ({sq_floor_tmpfs} floor): {sc_spoolq} syscalls a task against "
        "{sc_floor} (a "
        "flock, a status re-read and a claim check at every step, the layout check before each start). "
        "This disk adds to both a cost per file that swings several-fold within minutes, so the ratio "
        "swings with it (per-round range)"),
    "lifecycle-huey": (
        "spoolq's own work and this disk's file costs together. Without the disk (tmpfs) spoolq is "
        "{sq_huey_tmpfs} huey FileStorage ({sc_spoolq} syscalls a task against {sc_huey}); on this disk spoolq "
        "creates {sq_inodes} inodes and renames {sq_renames} times a task (2 of them status.json rewrites "
        "replacing a file a rename put in place), huey about 3 inodes and renames only to new names (fscost: an inode {inode}, such "
        "a replace {replace}). The floor (spoolq's layout with plain os calls) is {floor_huey} huey "
        "FileStorage in this run"),
    "e2e": "the same file costs in the daemon{profile}. {producer}",
    "e2e-durable": (
        "the producer: one durable enqueue call per task, whose flushes no later call can share (it has returned), "
        "on a device the daemon's 14 fsyncs a task also flush (ext4 without a journal: each fsync its own cache "
        "flush). Group commit is built where transitions are in flight together, Spool.enqueue_many: durable, "
        "{bulk_durable} against {single_nd} tasks/s for single non-durable enqueues (bench/README.md, "
        "\"Durability\")"),
    "lookup": "none found: a lookup is a fixed number of stats (see Scaling); this is the machine's noise",
    "rss": "the daemon's index of enqueued/ (a heap entry and a set entry per waiting task)",
}


def _cause_facts() -> dict:
    """Numbers the CAUSES quote, from the last run's JSON."""
    facts = {k: "n/a" for k in ("floor_huey", "inode", "replace", "spoolq_enq", "huey_enq", "drain_ratio",
                                "producer", "sq_tmpfs", "fl_tmpfs", "sq_floor_tmpfs", "sq_huey_tmpfs",
                                "sc_spoolq", "sc_floor", "sc_huey", "slot_status", "main_claim", "sq_inodes",
                                "sq_renames", "bulk_durable", "single_nd", "profile")}
    for r in (common.read_json("syscalls.json") or {}).get("results", []):
        if r["mode"] == "non-durable":
            key = {"spoolq": "sc_spoolq", "floor": "sc_floor", "huey.FileStorage": "sc_huey"}.get(r["backend"])
            if key:
                facts[key] = f"{r['syscalls']:.0f}"
            if r["backend"] == "spoolq":
                facts["sq_inodes"], facts["sq_renames"] = f"{r['created']:g}", f"{r['rename']:g}"
    py = (common.read_json("profile.json") or {}).get("pyspy") or {}
    if py.get("slot_self"):
        share = sum(pct for fr, src, _, pct in py["slot_self"]
                    if "os.rename(STATUS" in src or fr.startswith("write_new "))
        facts["slot_status"] = f"{share:.0f}%"
    claim = next((pct for fr, _, pct in py.get("main_inclusive", []) if fr.startswith("Spool.claim ")), None)
    if claim is not None:
        facts["main_claim"] = f"{claim:.0f}%"
    if facts["slot_status"] != "n/a" and facts["main_claim"] != "n/a":
        facts["profile"] = (f" (profile.md: creating and renaming status.json.tmp is {facts['slot_status']} of "
                            f"the slots' busy time, the claim {facts['main_claim']} of the main process's)")
    else:
        facts["profile"] = " (profile.md, which `--full` or `python bench/profile.py` measures, says where)"
    lt = common.read_json("lifecycle-tmpfs.json") or {}
    sq, fl = _summary(lt, backend="spoolq"), _summary(lt, backend="floor")
    if sq and fl and sq.get("tasks_per_s_median") and fl.get("tasks_per_s_median"):
        facts["sq_tmpfs"] = f"{1e3 / sq['tasks_per_s_median']:.2f} ms"
        facts["fl_tmpfs"] = f"{1e3 / fl['tasks_per_s_median']:.2f} ms"
        facts["sq_floor_tmpfs"] = common.fmt_ratio(sq.get("ratio_floor_median"))
        facts["sq_huey_tmpfs"] = common.fmt_ratio(sq.get("ratio_huey_median"))
    fl = _summary(common.read_json("lifecycle.json") or {}, backend="floor", mode="non-durable")
    if fl and fl.get("ratio_huey_median"):
        facts["floor_huey"] = common.fmt_ratio(fl["ratio_huey_median"])
    fc = (common.read_json("fscost.json") or {}).get("summary") or {}
    if fc:
        facts["inode"] = f"{min(fc['create empty'], fc['mkdir']) * 1e3:.1f}–{max(fc['create + write'], fc['mkdir']) * 1e3:.1f} ms"
        facts["replace"] = f"{fc['rename over again'] * 1e3:.1f} ms"
    for row in ((common.read_json("bulk.json") or {}).get("summary") or {}).get("rows", []):
        key = {("durable", "bulk"): "bulk_durable", ("non-durable", "single"): "single_nd"}.get(
            (row.get("mode"), row.get("variant")))
        if key and row.get("tasks_per_s_median"):
            facts[key] = f"{row['tasks_per_s_median']:,.0f}"
    ee = common.read_json("e2e.json") or {}
    sp = _summary(ee, daemon="spoolq") or {}
    se, he = sp.get("enqueue_s_median"), (_summary(ee, daemon="huey") or {}).get("enqueue_s_median")
    if se and he:
        facts.update(spoolq_enq=f"{se:.2f} s", huey_enq=f"{he:.2f} s")
    facts["drain_ratio"] = common.fmt_ratio(sp.get("drain_ratio_huey_median"))
    if se and he and se > 1.3 * he:
        facts["producer"] = (f"The clock also includes the producer: enqueueing the N tasks took spoolq "
                             f"{se:.2f} s against huey's {he:.2f} s; with the producer left out (backlog "
                             f"drain) spoolq is {facts['drain_ratio']} huey's consumer.")
    else:
        facts["producer"] = (f"Not the producer: enqueueing took {facts['spoolq_enq']} (spoolq) and "
                             f"{facts['huey_enq']} (huey), and with the producer left out (backlog drain) "
                             f"spoolq is {facts['drain_ratio']} huey's consumer.")
    return facts


def _with_range(median, per_round) -> str:
    """'0.81x (0.60–1.21)': the median and the range of the per-round ratios."""
    xs = [x for x in per_round or [] if x is not None]
    if median is None or len(xs) < 2:
        return common.fmt_ratio(median)
    return f"{common.fmt_ratio(median)} ({min(xs):.2f}–{max(xs):.2f} over {len(xs)} rounds)"


def targets() -> list[list[str]]:
    """Issue 15's targets against the measured values (from the JSON files):
    [target, bound, measured, met / NOT met, cause of a miss]."""
    rows = []
    life = common.read_json("lifecycle.json") or {}
    facts = _cause_facts()

    def add(what, target, value, ok, cause=None):
        verdict = "n/a" if ok is None else ("met" if ok else "NOT met")
        why = CAUSES.get(cause, "").format(**facts) if ok is False and cause else ""
        rows.append([what, target, value, verdict, why])

    for backend, api in (("spoolq", "Spool API"), ("spoolq.tracker", "ATP API")):
        for mode, key, bound, cause in (("non-durable", "ratio_floor", 0.8, "lifecycle-floor"),
                                        ("non-durable", "ratio_huey", 1.2, "lifecycle-huey"),
                                        ("durable", "ratio_floor", 0.7, "lifecycle-floor")):
            if backend != "spoolq" and mode == "durable":
                continue
            s = _summary(life, backend=backend, mode=mode)
            v = s.get(key + "_median") if s else None
            ref = ("durable floor" if mode == "durable" else "floor") if "floor" in key else "huey FileStorage"
            n = f", N={s['n']:,}" if s else ""
            add(f"lifecycle {mode}{n}, {api}: spoolq / {ref}", f">= {bound}x",
                _with_range(v, s.get(key) if s else None), None if v is None else v >= bound, cause)
    sq, atp = (_summary(life, backend=b, mode="non-durable") for b in ("spoolq", "spoolq.tracker"))
    per_round = [a / b for a, b in zip((atp or {}).get("ratio_floor") or [], (sq or {}).get("ratio_floor") or [])
                 if a and b]
    v = common.median(per_round) if per_round else None
    add("lifecycle non-durable: ATP API / Spool API (tasks/s)", ">= 0.95x", _with_range(v, per_round),
        None if v is None else v >= 0.95)
    # The ATP layer's cost is CPU: on tmpfs it is not buried under this disk's
    # swings (on disk the per-round range is wider than the cost itself).
    tmpfs_life = common.read_json("lifecycle-tmpfs.json") or {}
    sq, atp = (_summary(tmpfs_life, backend=b) for b in ("spoolq", "spoolq.tracker"))
    per_round = [a / b for a, b in zip((atp or {}).get("ratio_floor") or [], (sq or {}).get("ratio_floor") or [])
                 if a and b]
    v = common.median(per_round) if per_round else None
    add("lifecycle on tmpfs (CPU only): ATP API / Spool API (tasks/s)", ">= 0.95x", _with_range(v, per_round),
        None if v is None else v >= 0.95)
    lt = _summary(tmpfs_life, backend="spoolq")
    v = lt.get("ratio_floor_median") if lt else None
    add("lifecycle on tmpfs (CPU only): spoolq's time a task / the floor's",
        "<= 2x", "n/a" if not v else f"{1 / v:.2f}x ({facts['sq_tmpfs']} vs {facts['fl_tmpfs']})",
        None if not v else 1 / v <= 2, "lifecycle-floor")
    for row in ((common.read_json("bulk.json") or {}).get("summary") or {}).get("rows", []):
        key = {("durable", "bulk"): "bulk_durable", ("non-durable", "single"): "single_nd"}.get(
            (row.get("mode"), row.get("variant")))
        if key and row.get("tasks_per_s_median"):
            facts[key] = f"{row['tasks_per_s_median']:,.0f}"
    ee = common.read_json("e2e.json") or {}
    s = _summary(ee, daemon="spoolq")
    v = s.get("ratio_huey_median") if s else None
    n = f", N={ee['meta']['n']:,}" if ee else ""
    add(f"e2e daemons{n}: spoolq ({s['mode'] if s else '?'}) / huey consumer", ">= 1.2x",
        _with_range(v, s.get("ratio_huey") if s else None), None if v is None else v >= 1.2, "e2e")
    s = _summary(ee, daemon="spoolq-durable")
    v = s.get("ratio_spoolq_median") if s else None
    add(f"e2e daemons{n}: spoolq durable / spoolq non-durable", ">= 0.9x",
        _with_range(v, s.get("ratio_spoolq") if s else None), None if v is None else v >= 0.9, "e2e-durable")
    wake = common.read_json("wakeup.json") or {}
    r = next((x for x in wake.get("results", []) if x["daemon"] == "spoolq"), None)
    for key, bound in (("p50_s", 0.020), ("p95_s", 0.100)):
        v = r.get(key) if r else None
        add(f"wake-up {key[:3]}: spoolq", f"<= {bound * 1e3:g} ms",
            "n/a" if v is None else f"{v * 1e3:.1f} ms", None if v is None else v <= bound)
    sc = common.read_json("scaling.json")
    if sc:
        sizes = sc["sizes"]
        big, small = str(sizes[-1]), sizes[0]
        vs = f"{int(big):,} / {small:,}"
        for phase, what, label in (("done", "status: done task", "Spool.status(), tasks in done/"),
                                   ("enqueued", "status: waiting task", "Spool.status(), tasks in enqueued/"),
                                   ("done", "CLI status: done task", "`spoolq status`, tasks in done/"),
                                   ("enqueued", "CLI status: waiting task", "`spoolq status`, tasks in enqueued/")):
            row = next((x for x in sc["summary"] if x["phase"] == phase and x["what"] == what), None)
            v = row["ratio"].get(big) if row else None
            add(f"lookup {label}: {vs}", "<= 1.5x", common.fmt_ratio(v), None if v is None else v <= 1.5,
                "lookup")
        row = next((x for x in sc["summary"] if x["what"] == "daemon RSS"), None)
        v = row["ratio"].get(big) if row else None
        add(f"daemon RSS, tasks waiting: {vs}", "<= 1.5x", common.fmt_ratio(v),
            None if v is None else v <= 1.5, "rss")
        for phase, what, label in (("running", "reenqueue_zombies", "reenqueue_zombies, N running"),
                                   ("done", "delete_retired", "delete_retired, N done")):
            row = next((x for x in sc["summary"] if x["phase"] == phase and x["what"] == what), None)
            fit = row.get("fit") if row else None
            v = fit["exponent"] if fit else None
            add(f"sweep linear in tasks examined: {label}", "growth exponent 0.8–1.2",
                "n/a" if v is None else f"{v:.2f} ({fit['from']:,} → {fit['to']:,})",
                None if v is None else 0.8 <= v <= 1.2)
        for what in ("reenqueue_zombies", "delete_retired"):
            row = next((x for x in sc["summary"] if x["phase"] == "enqueued" and x["what"] == what), None)
            v = row["ratio"].get(big) if row else None
            add(f"sweep independent of enqueued/: {what}, waiting {vs}", "<= 1.5x", common.fmt_ratio(v),
                None if v is None else v <= 1.5)
    return rows


PARTS = ("fscost", "lifecycle", "lifecycle-tmpfs", "syscalls", "e2e", "wakeup", "bulk", "delayed", "priority",
         "scaling", "profile")


def measured_at() -> str:
    """The commit the parts' JSON were measured at (each part ran the working
    tree as it was when it started), and the parts measured at another one
    (e.g. a part a default run skips, left from an earlier ``--full`` run)."""
    found = [(p, d["meta"]) for p, d in ((p, common.read_json(f"{p}.json")) for p in PARTS) if d]
    if not found:
        return "no results"
    # The commit most parts ran at (of two as common, the later one).
    counts = collections.Counter(m.get("git_rev") for _, m in found)
    rev = max(found, key=lambda pm: (counts[pm[1].get("git_rev")], pm[1]["date"]))[1].get("git_rev")
    text = f"git {rev}"
    older = [f"{p} at {m.get('git_rev')}, {m['date'][:16].replace('T', ' ')} UTC"
             for p, m in found if m.get("git_rev") != rev]
    if older:
        text += f" (except {'; '.join(older)})"
    dirty = sorted({f for _, m in found for f in m.get("dirty") or []})
    if dirty:
        text += f", with uncommitted changes to {', '.join(dirty)}"
    first = min(m["date"] for _, m in found if m.get("git_rev") == rev)
    return text + f", {first[:16].replace('T', ' ')} UTC"


def targets_table() -> str:
    rows = targets()
    head = f"Measured at {measured_at()}; details and the conditions in \"Results\" below.\n\n"
    return head + common.markdown_table(["target (issue 15)", "bound", "measured", "", "cause of the miss"], rows)


def report() -> str:
    parts = []
    for settings in ("default", "full"):
        rj = common.read_json(f"run-{settings}.json")
        if not rj:
            continue
        loads = [rj.get("load1_start")] + [p.get("load1_after") for p in rj["parts"]]
        loads = [x for x in loads if x is not None]
        parts.append(f"`python bench/run.py{' --' + settings if settings != 'default' else ''}` "
                     f"took **{rj['total_s']:.0f} s** ({rj['meta']['date']}, git {rj['meta']['git_rev']}; "
                     f"1-minute load average {min(loads):.1f} to {max(loads):.1f} on {rj['meta']['cpus']} CPUs): "
                     + ", ".join(f"{p['part']} {p['s']:.0f} s" for p in rj["parts"]) + "."
                     + (f" FAILED: {', '.join(rj['failed'])}." if rj.get("failed") else ""))
    fc = common.read_json("fscost.json")
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
    lt = common.read_json("lifecycle-tmpfs.json")
    if lt:
        m = lt["meta"]
        parts.append(f"**Lifecycle on tmpfs** ({m['dir']}: the same code with no disk cost, so CPU and syscalls "
                     f"only; N={m['n']}, median of {m['rounds']} interleaved rounds):\n\n" + lifecycle.report(lt))
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
    bk = common.read_json("bulk.json")
    if bk:
        m = bk["meta"]
        parts.append(f"**Bulk enqueue** (issue 12; N={m['n']:,}, durable single and floor-single "
                     f"N={m['n_single']:,}, {m['rounds']} rounds, variants of a mode back to back in a rotated "
                     "order; ratios per round, then the median):\n\n" + bulk.report(bk))
    dl = common.read_json("delayed.json")
    if dl:
        parts.append("**Delayed tasks and retries** (issue 13):\n\n" + delayed.report(dl))
    pr = common.read_json("priority.json")
    if pr:
        parts.append("**Priorities** (issue 13):\n\n" + priority.report(pr))
    sc = common.read_json("scaling.json")
    if sc:
        m = sc["meta"]
        parts.append(f"**Scaling** (one spool per N, all alive at once; lookups: median of {m['lookup_rounds']} "
                     f"interleaved rounds of {m['lookups']} calls, warm cache; `spoolq status`, sweeps and RSS: "
                     f"median of {m['rounds']} rounds; ratios per round, then the median):\n\n" + scaling.report(sc))
    if fc:
        parts.append(f"**Filesystem costs** (`fscost.py`, {fc['meta']['n']} operations, median of "
                     f"{fc['meta']['rounds']} rounds):\n\n" + fscost.report(fc))
    return "\n\n".join(parts)


def _replace(doc: str, begin: str, end: str, text: str) -> str:
    if begin not in doc or end not in doc:
        raise SystemExit(f"{README} lacks the {begin} / {end} markers")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    return head + begin + "\n" + text + "\n" + end + tail


def update_readme(text: str, targets_text: str) -> None:
    with open(README) as f:
        doc = f.read()
    doc = _replace(doc, BEGIN, END, text)
    doc = _replace(doc, T_BEGIN, T_END, targets_text)
    with open(README, "w") as f:
        f.write(doc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small N, one round: a smoke test")
    ap.add_argument("--full", action="store_true",
                    help="the issue's sizes (lifecycle N=5,000, e2e N=1,000) and the profile")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: " + ",".join(FULL))
    ap.add_argument("--only", default="", help="comma list of the only parts to run")
    ap.add_argument("--update-readme", action="store_true", help="write the tables into bench/README.md")
    ap.add_argument("--report-only", action="store_true", help="only print the report of the existing JSON")
    common.add_base_dir_arg(ap)
    a = ap.parse_args(argv)

    failed = []
    if not a.report_only:
        settings = QUICK if a.quick else FULL if a.full else DEFAULT
        skip = set(a.skip.split(","))
        t0 = time.monotonic()
        run = {"settings": "quick" if a.quick else "full" if a.full else "default", "parts": [],
               "load1_start": os.getloadavg()[0]}
        for part, args in settings.items():
            if part in skip or (a.only and part not in a.only.split(",")):
                continue
            script, where = part, a.dir
            if part == "lifecycle-tmpfs":
                script, where = "lifecycle", TMPFS
                if not os.path.isdir(TMPFS):
                    print(f"=== {part}: skipped, no {TMPFS}", file=sys.stderr)
                    continue
            cmd = [sys.executable, os.path.join(common.BENCH_DIR, f"{script}.py"), *args, "--dir", where]
            if part == "profile" and not a.update_readme:
                cmd.append("--no-md")
            print(f"\n=== {part}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
            t = time.monotonic()
            rc = subprocess.run(cmd).returncode
            run["parts"].append({"part": part, "args": args, "exit": rc, "s": round(time.monotonic() - t, 1),
                                 "load1_after": os.getloadavg()[0]})
            print(f"=== {part}: exit {rc}, {time.monotonic() - t:.0f}s", file=sys.stderr, flush=True)
            if rc:
                failed.append(part)
        if "plot" not in skip and (not a.only or "plot" in a.only.split(",")):
            rc = subprocess.run([sys.executable, os.path.join(common.BENCH_DIR, "plot.py")]).returncode
            if rc:
                failed.append("plot")
        run["total_s"] = round(time.monotonic() - t0, 1)
        run["failed"] = failed
        run["meta"] = common.meta(a.dir)
        if not a.only and not a.skip:
            common.write_json(f"run-{run['settings']}.json", run)
        print(f"\n=== all parts: {time.monotonic() - t0:.0f}s"
              + (f"; FAILED: {', '.join(failed)}" if failed else ""), file=sys.stderr)

    text = report()
    targets_text = targets_table()
    print("\n" + text + "\n\n**Targets (issue 15):**\n\n" + targets_text)
    if a.update_readme:
        update_readme(text, targets_text)
        print("updated", README, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
