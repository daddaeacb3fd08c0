"""A spoolq installation other users can run: a venv made from the
distribution's /usr/bin/python3 under /opt, with the checkout pip-installed.

The test process's own interpreter often lives under /root, which other
users cannot enter and which ProtectHome=yes hides; tests that run spoolq as
other users (multi-user spools) or under the shipped systemd unit use this
venv instead. .ci/install-system-deps installs python3 and python3-venv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = Path("/usr/bin/python3")


def copy_checkout(dest: Path) -> Path:
    """What `pip install` needs from the checkout, copied so that the in-tree
    build (build/, *.egg-info) lands in the copy and not in the work tree."""
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "spoolq", dest / "spoolq", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def clean_env() -> dict[str, str]:
    """This process's environment without what would point a new interpreter
    at the test's own one (pytest's PYTHONPATH, an active virtualenv)."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSAFEPATH")}


def build_venv() -> Iterator[Path]:
    """Yield the venv's directory; removed afterwards. Fails (never skips)
    when /usr/bin/python3 or python3-venv is missing."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.fail(f"{SYSTEM_PYTHON} is missing: run .ci/install-system-deps (python3, python3-venv)")
    base = Path(tempfile.mkdtemp(prefix="spoolq-it-venv-", dir="/opt"))
    try:
        base.chmod(0o755)
        src = copy_checkout(base / "src")
        path = base / "venv"
        for cmd in ([str(SYSTEM_PYTHON), "-m", "venv", str(path)],
                    [str(path / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", str(src)]):
            done = subprocess.run(cmd, env=clean_env(), text=True, capture_output=True, timeout=600)
            if done.returncode != 0:
                pytest.fail(f"{' '.join(cmd)} -> exit {done.returncode}\n{done.stdout}{done.stderr}"
                            "\n(python3-venv missing? run .ci/install-system-deps)")
        assert os.access(path / "bin" / "spoolq", os.X_OK)
        yield path
    finally:
        shutil.rmtree(base, ignore_errors=True)
