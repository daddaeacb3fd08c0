"""Handlers for the resource-limit tests (tests/test_limits.py, tests/test_dask.py)."""

from __future__ import annotations

import json
import os
import resource


def allocate(ts, inp):
    """Allocates inp["bytes"] bytes and touches them."""
    block = bytearray(inp["bytes"])
    block[::4096] = b"x" * len(block[::4096])


def busy(ts, inp):
    """Burns CPU until something stops it."""
    n = 0
    while True:
        n += 1


def open_files(ts, inp):
    """Opens files until the process runs out of descriptors."""
    held = []
    while True:
        held.append(open(os.devnull))


def report(ts, inp):
    """Stores what this process is allowed: niceness and rlimits, its pid and parent."""
    ts.store_response(json.dumps({
        "nice": os.nice(0),
        "as": resource.getrlimit(resource.RLIMIT_AS),
        "cpu": resource.getrlimit(resource.RLIMIT_CPU),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
        "pid": os.getpid(),
        "ppid": os.getppid(),
    }), "application/json")


def busy_in_c(ts, inp):
    """Burns CPU inside one long C call that never returns to the
    interpreter, so a Python signal handler cannot run."""
    import hashlib

    hashlib.pbkdf2_hmac("sha256", b"password", b"salt", 2**31 - 1)
