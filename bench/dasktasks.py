"""Task handlers for bench/dask.py (bench/ must be importable on the Dask workers)."""

import time


def sleep(task, input):
    time.sleep(input["seconds"])
