"""The manual page spoolq(1): made from the CLI's help, never out of date,
shipped in the wheel (docs/contract.md §12.6)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "spoolq" / "data" / "spoolq.1"


def generate() -> str:
    proc = subprocess.run([sys.executable, "-m", "spoolq._manpage"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_shipped_page_is_what_the_help_makes_now() -> None:
    assert generate() == PAGE.read_text(), (
        "spoolq/data/spoolq.1 is out of date: python -m spoolq._manpage > spoolq/data/spoolq.1")


def test_the_page_says_what_the_help_says() -> None:
    text = PAGE.read_text()
    assert text.startswith('.TH SPOOLQ 1 "" "spoolq ')
    proc = subprocess.run([sys.executable, "-m", "spoolq", "--help"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    commands = [line.split()[0] for line in proc.stdout.split("\nCommands:\n", 1)[1].splitlines()
                if line.startswith("  ") and not line.startswith("   ")]
    assert "status" in commands and "unregister" in commands, commands
    for command in commands:
        assert f'.SS "spoolq {command} ' in text, command
    for words in ("\\fB\\-\\-timeout\\fR \\fISECONDS\\fR", "spoolq status SequenceSum Task001", ".SH EXIT STATUS",
                  ".B 75", ".SH ENVIRONMENT"):
        assert words in text, words


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
def test_groff_reads_it_without_a_warning() -> None:
    proc = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(PAGE)], capture_output=True, text=True,
                          timeout=60)
    assert (proc.returncode, proc.stderr) == (0, "")


NETWORK_TROUBLE = ("Could not find a version", "NewConnectionError", "Temporary failure in name resolution",
                   "No matching distribution", "Network is unreachable")


def test_the_wheel_ships_the_page_and_importlib_resources_finds_it(tmp_path: Path) -> None:
    """Build the wheel from a copy of the tree, install it into a throwaway
    venv, and read the page the way a packager's script would."""
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                            ".pytest_cache", ".hypothesis", "results"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                            str(src)], capture_output=True, text=True, timeout=600)
    if built.returncode != 0 and any(t in built.stdout + built.stderr for t in NETWORK_TROUBLE):
        pytest.skip(f"pip could not fetch the build backend: {built.stderr.strip().splitlines()[-1]}")
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("spoolq-*.whl")
    assert wheel.name.startswith("spoolq-0.2.0-")
    assert "spoolq/data/spoolq.1" in zipfile.ZipFile(wheel).namelist()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    # Ask the venv where its packages go: `pip --prefix` follows the installing
    # interpreter's scheme, which on Debian's Python adds local/ and misses the venv.
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, timeout=60, capture_output=True, text=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", purelib,
                    str(wheel)], check=True, timeout=300, capture_output=True)
    code = ("import importlib.resources, spoolq; "
            "print(spoolq.__file__); print(importlib.resources.files('spoolq').joinpath('data/spoolq.1').read_text(), end='')")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=60,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    where, page = proc.stdout.split("\n", 1)
    assert where.startswith(str(venv)), where  # the installed copy, not this tree
    assert page == PAGE.read_text()
