"""Shared helpers for the bench scripts: paths, temp dirs, stats, metadata, JSON."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
DEFAULT_BASE_DIR = "/var/tmp"

# Benchmark the working tree's spoolq, not whatever happens to be installed.
if REPO_DIR not in sys.path:
    sys.path.insert(0, REPO_DIR)


def add_base_dir_arg(parser) -> None:
    _at_start()  # every part calls this first thing: note the commit it runs
    parser.add_argument(
        "--dir",
        default=DEFAULT_BASE_DIR,
        help="where the per-run temp dirs are made (all backends on the same "
        "filesystem); default %(default)s",
    )


class Workspace:
    """Fresh directories for the runs of one benchmark, all under one session dir.

    On this project's machines (ext4 without a journal) creating an inode soon
    after many inodes were deleted costs several times more kernel CPU than
    usual, for about half a minute. Deleting one run's tree right before the
    next run would tax whichever backend comes next, so by default
    (cleanup="end") run trees are kept until the whole benchmark is over and
    removed then. cleanup="each" removes each run's tree after the run;
    cleanup="none" leaves everything to the caller (bench/syscalls.py).
    Every run ends with os.sync() (untimed), so no run pays inside its own
    fsyncs for the dirty pages of the one before.
    """

    def __init__(self, base: str, cleanup: str = "end"):
        if cleanup not in ("end", "each", "none"):
            raise ValueError(cleanup)
        self.cleanup = cleanup
        self.path = tempfile.mkdtemp(prefix="spoolq-bench-", dir=base)
        self._k = 0

    @contextlib.contextmanager
    def run_dir(self, label: str):
        self._k += 1
        path = os.path.join(self.path, f"{self._k:03d}-{label}")
        os.mkdir(path)
        try:
            yield path
        finally:
            if self.cleanup == "each":
                shutil.rmtree(path, ignore_errors=True)
            os.sync()

    def close(self) -> None:
        if self.cleanup != "none":
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def add_cleanup_arg(parser) -> None:
    parser.add_argument(
        "--cleanup", choices=("end", "each", "none"), default="end",
        help="remove run dirs at the end (default), after each run, or never; "
        "see common.Workspace",
    )


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def percentile(xs, p: float):
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    s = sorted(xs)
    if not s:
        return None
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def pkg_version(name: str):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def fs_info(path: str) -> dict:
    """Filesystem of `path` from /proc/mounts (longest mount-point prefix),
    and for ext4 whether it has a journal (a jbd2 entry for its device)."""
    real = os.path.realpath(path)
    best = None
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype, opts = line.split()[:4]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and (
                        best is None or len(mnt) >= len(best[1])):
                    best = (dev, mnt, fstype, opts)
    except OSError:
        return {}
    if best is None:
        return {}
    dev, mnt, fstype, opts = best
    info = {"device": dev, "mount": mnt, "type": fstype, "options": opts}
    if fstype in ("ext3", "ext4"):
        name = os.path.basename(dev)
        try:
            info["journal"] = any(e.startswith(name + "-") for e in os.listdir("/proc/fs/jbd2"))
        except OSError:
            info["journal"] = False
    return info


def git_rev() -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", REPO_DIR, "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def git_dirty() -> list[str]:
    """spoolq/ files that differ from HEAD: the numbers were measured on
    the working tree, which others may be changing."""
    try:
        out = subprocess.run(
            ["git", "-C", REPO_DIR, "status", "--porcelain", "--", "spoolq"],
            capture_output=True, text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return sorted(line[3:] for line in out.splitlines() if line.strip())


# The commit and the changed spoolq files when this part started (it imports
# spoolq from the working tree then), not when it ended: others commit meanwhile.
_AT_START: tuple | None = None


def _at_start() -> tuple:
    global _AT_START
    if _AT_START is None:
        _AT_START = (git_rev(), git_dirty())
    return _AT_START


def meta(base_dir: str, **extra) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_at_end": os.getloadavg(),
        "dir": base_dir,
        "fs": fs_info(base_dir),
        "git_rev": _at_start()[0],
        "dirty": _at_start()[1],
        "versions": {
            p: pkg_version(p)
            for p in ("spoolq", "dirq", "huey", "persist-queue", "matplotlib")
        },
        **extra,
    }


def write_json(name: str, data: dict) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def emit(text: str, name: str, data: dict) -> None:
    """Print a part's markdown report, then write its JSON (name '' : none)."""
    print(text)
    if name:
        print("wrote", write_json(name, data), file=sys.stderr)


def read_json(name: str):
    path = os.path.join(RESULTS_DIR, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def wait_until_all(items, is_done, timeout: float, interval: float = 0.005) -> float:
    """Poll until is_done(item) holds for every item; return monotonic time it did.

    Keeps a cursor: items are checked in order and the cursor only advances
    past done ones, so a poll costs O(1) amortized when work finishes roughly
    in FIFO order (which is how every queue here drains). Raises TimeoutError.
    """
    items = list(items)
    i = 0
    deadline = time.monotonic() + timeout
    while True:
        while i < len(items) and is_done(items[i]):
            i += 1
        if i == len(items):
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(items) - i} of {len(items)} not done after {timeout}s")
        time.sleep(interval)


def fmt_num(x, digits=0) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.{digits}f}"


def fmt_ratio(x) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def markdown_table(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
