"""What the filesystem under --dir charges for the operations a task queue makes.

Every file-per-task queue (the floor, spoolq, dirq, huey FileStorage) pays
these per task, so they explain most of the lifecycle and daemon numbers on
a given disk. Per operation, median over --rounds rounds of --n operations:

    create empty      open(O_CREAT|O_EXCL) + close: a new inode
    create + write    the same with 400 bytes written
    mkdir             a new directory (inode + directory block)
    link              a hard link to an existing file (no new inode)
    rename new        rename a just-written file to a new name in its directory
    rename over       rename a just-written file over another just-written one
                      (the replaced file is freed)
    rename over again the same once more: now the replaced file is one that a
                      rename put in place, as when a task's status.json is
                      rewritten for the second time (claim, start, finish)
    unlink written    unlink a file whose data block is allocated (synced)
    unlink empty      unlink an empty file

    python bench/fscost.py [--n 300] [--rounds 3] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import common

DATA = b"x" * 400
O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL
O_REWRITE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC


def _write(path, data, flags=O_NEW):
    fd = os.open(path, flags, 0o640)
    if data:
        os.write(fd, data)
    os.close(fd)


def one_round(d: str, n: int) -> dict:
    res = {}

    def timed(label, fn):
        t = time.perf_counter()
        for i in range(n):
            fn(i)
        res[label] = (time.perf_counter() - t) / n

    for sub in ("e", "w", "m", "l", "r"):
        os.mkdir(os.path.join(d, sub))
    timed("create empty", lambda i: _write(os.path.join(d, "e", f"f{i}"), b""))
    timed("create + write", lambda i: _write(os.path.join(d, "w", f"f{i}"), DATA))
    timed("mkdir", lambda i: os.mkdir(os.path.join(d, "m", f"d{i}")))
    src = os.path.join(d, "w", "f0")
    timed("link", lambda i: os.link(src, os.path.join(d, "l", f"f{i}")))
    # rename: each in its own directory, like a task's status.json
    r = os.path.join(d, "r")
    for i in range(n):
        os.mkdir(os.path.join(r, f"t{i}"))
    rn = ro = ro2 = 0.0
    for i in range(n):
        t = os.path.join(r, f"t{i}")
        _write(os.path.join(t, "a.tmp"), DATA)
        t0 = time.perf_counter()
        os.rename(os.path.join(t, "a.tmp"), os.path.join(t, "x"))
        rn += time.perf_counter() - t0
        _write(os.path.join(t, "status"), DATA)
        _write(os.path.join(t, "b.tmp"), DATA)
        t0 = time.perf_counter()
        os.rename(os.path.join(t, "b.tmp"), os.path.join(t, "status"))
        ro += time.perf_counter() - t0
        _write(os.path.join(t, "c.tmp"), DATA)
        t0 = time.perf_counter()
        os.rename(os.path.join(t, "c.tmp"), os.path.join(t, "status"))
        ro2 += time.perf_counter() - t0
    res["rename new"] = rn / n
    res["rename over"] = ro / n
    res["rename over again"] = ro2 / n
    os.sync()
    timed("unlink written", lambda i: os.unlink(os.path.join(d, "w", f"f{i}")))
    timed("unlink empty", lambda i: os.unlink(os.path.join(d, "e", f"f{i}")))
    return res


def report(data) -> str:
    s = data["summary"]
    rows = [[k, f"{v * 1e3:.3f}", f"{min(data['values'][k]) * 1e3:.3f} – {max(data['values'][k]) * 1e3:.3f}"]
            for k, v in s.items()]
    return common.markdown_table(["operation", "ms (median)", "range over rounds"], rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default="fscost.json")
    common.add_base_dir_arg(ap)
    a = ap.parse_args(argv)
    rounds = []
    with common.Workspace(a.dir) as ws:
        for k in range(a.rounds):
            d = os.path.join(ws.path, f"r{k}")
            os.mkdir(d)
            rounds.append(one_round(d, a.n))
    values = {k: [r[k] for r in rounds] for k in rounds[0]}
    data = {"meta": common.meta(a.dir, n=a.n, rounds=a.rounds), "values": values,
            "summary": {k: common.median(v) for k, v in values.items()}}
    common.emit(report(data), a.json, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
