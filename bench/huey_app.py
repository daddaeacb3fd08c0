"""The huey application the daemon benchmarks run under huey_consumer.

`make(path)` builds a FileHuey on `path` with the bench's tasks. The consumer
loads `huey_app.huey`, built from $SPOOLQ_BENCH_HUEY_PATH; the producer (the
bench process) calls make() with the same path. Task names are module-qualified
(huey_app.noop, huey_app.stamp) on both sides. Tasks return True so that huey
stores a result (it drops None results by default).
"""

import os
import time

from huey import FileHuey


def make(path):
    huey = FileHuey("spoolq-bench", path=path)

    @huey.task(name="noop")
    def noop():
        return True

    @huey.task(name="stamp")
    def stamp(path):
        """Record when the task function started: time.monotonic() into `path`."""
        t = time.monotonic()
        with open(path + ".tmp", "w") as f:
            f.write(repr(t))
        os.rename(path + ".tmp", path)
        return True

    return huey, noop, stamp


if "SPOOLQ_BENCH_HUEY_PATH" in os.environ:  # in the consumer
    huey, noop, stamp = make(os.environ["SPOOLQ_BENCH_HUEY_PATH"])
