"""Syscalls per task, counted with strace, for the floor and spoolq (and peers).

Each backend runs once under ``strace -f`` (bench/lifecycle.py --child) for
N1 and for N2 tasks; per-task counts are (count(N2) - count(N1)) / (N2 - N1),
which cancels interpreter start-up, imports and set-up. Reported per task:

    syscalls   every syscall
    sync       fsync + fdatasync
    created    new inodes: successful mkdir, and O_CREAT opens of a path that
               did not exist (O_EXCL, or not seen since its creation, rename
               or unlink in the trace -- so re-opening huey's lock file with
               O_CREAT is not a creation). Paths are resolved with strace -y.
    rename, flock, open, getdents64 (directory listing), and the top calls

The run's directory is removed after strace has finished, so clean-up is
not counted.

    python bench/syscalls.py                        # floor and spoolq, both modes
    python bench/syscalls.py --backends floor,huey.FileStorage --n1 100 --n2 300
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

import common
from backends import BY_NAME

LINE = re.compile(r"^(?:\d+\s+)?(?:<\.\.\. )?([a-z_0-9]+)(\(| resumed>)(.*)$")
# With -y an fd argument prints as 4</abs/path>; AT_FDCWD stays as is.
ARG_FD = r"(?:AT_FDCWD|-?\d+)(?:<([^>]*)>)?"
STR = r'"((?:[^"\\]|\\.)*)"'
OPENAT = re.compile(rf"^{ARG_FD}, {STR}, ([A-Z_|0-9]+)")
OPEN = re.compile(rf"^{STR}, ([A-Z_|0-9]+)")
MKDIRAT = re.compile(rf"^{ARG_FD}, {STR}")
MKDIR = re.compile(rf"^{STR}")
RENAMEAT = re.compile(rf"^{ARG_FD}, {STR}, {ARG_FD}, {STR}")
RENAME = re.compile(rf"^{STR}, {STR}")


def _join(d, p):
    return p if p.startswith("/") or not d else os.path.normpath(os.path.join(d, p))


def count(trace_path: str) -> collections.Counter:
    c = collections.Counter()
    exists: set[str] = set()
    with open(trace_path, errors="replace") as f:
        for line in f:
            m = LINE.match(line)
            if not m:
                continue  # signals, exits
            name, kind, rest = m.groups()
            if kind == " resumed>":
                continue  # counted at its "<unfinished ...>" half
            c[name] += 1
            if re.search(r"\) += -1 ", rest):
                c["(failed)"] += 1
                continue
            if name in ("openat", "open"):
                mm = OPENAT.match(rest) if name == "openat" else OPEN.match(rest)
                if mm and "O_CREAT" in mm.groups()[-1]:
                    d, p, flags = (mm.groups() if name == "openat" else (None, *mm.groups()))
                    path = _join(d, p)
                    if "O_EXCL" in flags or path not in exists:
                        c["(created)"] += 1
                    exists.add(path)
            elif name in ("mkdir", "mkdirat"):
                mm = MKDIRAT.match(rest) if name == "mkdirat" else MKDIR.match(rest)
                c["(created)"] += 1
                if mm:
                    g = mm.groups()
                    exists.add(_join(g[0], g[1]) if name == "mkdirat" else g[0])
            elif name in ("rename", "renameat", "renameat2"):
                mm = RENAMEAT.match(rest) if name != "rename" else RENAME.match(rest)
                if mm:
                    g = mm.groups()
                    old, new = ((_join(g[0], g[1]), _join(g[2], g[3])) if name != "rename" else g)
                    exists.discard(old)
                    exists.add(new)
            elif name in ("unlink", "unlinkat", "rmdir"):
                mm = MKDIRAT.match(rest) if name == "unlinkat" else MKDIR.match(rest)
                if mm:
                    g = mm.groups()
                    exists.discard(_join(g[0], g[1]) if name == "unlinkat" else g[0])
    return c


def trace(backend: str, mode: str, n: int, base_dir: str, out_dir: str) -> collections.Counter:
    out = os.path.join(out_dir, f"{backend}-{mode}-{n}.strace")
    run_dir = tempfile.mkdtemp(prefix="spoolq-bench-strace-run-", dir=base_dir)
    cmd = [
        "strace", "-f", "-qq", "-y", "-o", out, "--",
        sys.executable, os.path.join(common.BENCH_DIR, "lifecycle.py"),
        "--child", backend, "--mode", mode, "--n", str(n), "--dir", run_dir,
        "--cleanup", "none", "--timeout", "0",
    ]
    try:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return count(out)


def per_task(c1, c2, dn):
    keys = set(c1) | set(c2)
    return {k: (c2.get(k, 0) - c1.get(k, 0)) / dn for k in keys}


def summarize(pt: dict) -> dict:
    total = sum(v for k, v in pt.items() if not k.startswith("("))
    g = lambda *ks: sum(pt.get(k, 0.0) for k in ks)  # noqa: E731
    top = sorted(((k, v) for k, v in pt.items() if not k.startswith("(") and v >= 0.05),
                 key=lambda kv: -kv[1])
    return {
        "syscalls": total,
        "sync": g("fsync", "fdatasync"),
        "fsync": g("fsync"),
        "fdatasync": g("fdatasync"),
        "created": g("(created)"),
        "rename": g("rename", "renameat", "renameat2"),
        "flock": g("flock"),
        "open": g("open", "openat"),
        "getdents64": g("getdents64"),
        "failed": g("(failed)"),
        "top": [[k, round(v, 2)] for k, v in top[:12]],
    }


def report(data) -> str:
    """The markdown table of a syscalls.json."""
    rows = [[r["backend"], r["mode"], f"{r['syscalls']:.1f}", f"{r['sync']:.1f}", f"{r['created']:.1f}",
             f"{r['rename']:.1f}", f"{r['flock']:.1f}", ", ".join(f"{k} {v:g}" for k, v in r["top"][:8])]
            for r in data["results"]]
    rows += [[k["backend"], k["mode"], f"skipped: {k['reason']}", "", "", "", "", ""] for k in data["skipped"]]
    headers = ["backend", "mode", "syscalls/task", "fsync+fdatasync/task", "inodes created/task",
               "renames/task", "flock/task", "top calls per task"]
    return common.markdown_table(headers, rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="floor,spoolq")
    ap.add_argument("--modes", default="non-durable,durable")
    ap.add_argument("--n1", type=int, default=100)
    ap.add_argument("--n2", type=int, default=300)
    ap.add_argument("--keep-traces", action="store_true", help="keep the raw strace files")
    ap.add_argument("--recount", metavar="DIR", help="only re-count the traces kept in DIR")
    ap.add_argument("--json", default="syscalls.json")
    common.add_base_dir_arg(ap)
    a = ap.parse_args(argv)

    if not shutil.which("strace"):
        print("strace not found (apt-get install strace); skipping syscall counts", file=sys.stderr)
        return 0
    out_dir = a.recount or tempfile.mkdtemp(prefix="spoolq-bench-strace-", dir=a.dir)
    results, skipped = [], []
    try:
        for name in [x for x in a.backends.split(",") if x]:
            cls = BY_NAME[name]
            for mode in [m for m in a.modes.split(",") if m]:
                why = cls.available()
                if why is None and mode == "durable" and cls.durable_support is None:
                    why = "no durable (fsync) mode"
                if why:
                    skipped.append({"backend": name, "mode": mode, "reason": why})
                    continue
                if a.recount:
                    c1 = count(os.path.join(a.recount, f"{name}-{mode}-{a.n1}.strace"))
                    c2 = count(os.path.join(a.recount, f"{name}-{mode}-{a.n2}.strace"))
                else:
                    c1 = trace(name, mode, a.n1, a.dir, out_dir)
                    c2 = trace(name, mode, a.n2, a.dir, out_dir)
                s = summarize(per_task(c1, c2, a.n2 - a.n1))
                results.append({"backend": name, "mode": mode, **s})
                print(f"{name} {mode}: {s['syscalls']:.1f} syscalls/task", file=sys.stderr)
    finally:
        if a.keep_traces or a.recount:
            print("traces kept in", out_dir, file=sys.stderr)
        else:
            shutil.rmtree(out_dir, ignore_errors=True)

    out = {"meta": common.meta(a.dir, n1=a.n1, n2=a.n2), "results": results, "skipped": skipped}
    common.emit(report(out), a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
