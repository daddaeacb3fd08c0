"""What a short command imports (docs/contract.md §12.7).

A `spoolq status` must cost little more than starting Python, so it may not
import what it does not need: typer (and its click, pydantic), rich, the
daemon, fsck, the sweeps. Measured with ``python -X importtime`` on real
calls; the time itself is bench/cli_speed.py's business, never a test's.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from spoolq import Spool, State

TYPE = "T"
# Modules (and their submodules) a quick command must not import.
HEAVY = ("typer", "click", "rich", "pydantic", "spoolq.worker", "spoolq.fsck", "spoolq.sweeps", "spoolq.watch",
         "spoolq.tracker", "spoolq.demo", "spoolq.task", "spoolq.systemd")


def imported(*args: str | Path, stdin: bytes | None = None) -> set[str]:
    env = {k: v for k, v in os.environ.items() if k != "SPOOLQ_ROOT"}
    proc = subprocess.run([sys.executable, "-X", "importtime", *map(str, args)], input=stdin, capture_output=True,
                          env=env, timeout=60)
    lines = proc.stderr.decode().splitlines()
    assert proc.returncode == 0, [line for line in lines if not line.startswith("import time:")]
    return {line.split("|")[2].strip() for line in lines if line.startswith("import time:") and "|" in line}


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "spool"
    spool = Spool.init(path, durable=False)
    spool.register_type(TYPE, "spoolq.demo.sequence_sum")
    spool.enqueue(TYPE, "x", (1, 2))
    spool.enqueue(TYPE, "gone", None)
    claim = spool.claim("tester")
    spool.start(claim)
    spool.store_response(claim, b"3", "text/plain")
    spool.set_state(claim, State.FINISHED)
    return path


@pytest.mark.parametrize("args", [
    ("status", TYPE, "x"), ("status", TYPE, "x", "--json"), ("log", TYPE, "x", "--json"),
    ("result", TYPE, "x"), ("delete", TYPE, "gone"), ("enqueue", TYPE, "new", "-"), ("output", TYPE, "x"),
    ("enqueue", TYPE, "new", "-", "--json"),
], ids=" ".join)
def test_a_quick_command_imports_nothing_heavy(root: Path, args: tuple[str, ...]) -> None:
    stdin = b"[1]" if "--json" in args else pickle.dumps((1,))
    modules = imported("-m", "spoolq", "--root", root, *args, stdin=stdin)
    assert "spoolq.spool" in modules  # it did run
    assert heavy(modules) == []


def test_a_quick_command_with_root_after_it_too(root: Path) -> None:
    assert heavy(imported("-m", "spoolq", "status", TYPE, "x", "--root", root)) == []


def test_version_and_import_spoolq_load_nothing() -> None:
    assert heavy(imported("-m", "spoolq", "--version")) == []
    modules = imported("-c", "import spoolq")
    assert sorted(m for m in modules if m.startswith("spoolq")) == ["spoolq", "spoolq._version"]


def test_commands_typer_runs_do_not_import_rich(root: Path) -> None:
    """typer imports rich for its help unless markup is off (it is)."""
    for args in (("list",), ("--help",), ("status", "--help")):
        modules = imported("-m", "spoolq", "--root", root, *args)
        assert "typer" in modules and not [m for m in modules if m == "rich" or m.startswith("rich.")], args
