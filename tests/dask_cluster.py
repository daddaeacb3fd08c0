"""A LocalCluster of worker processes, run in a process of its own for
tests/test_dask.py, so the test process itself runs no Dask threads.

    python dask_cluster.py N_WORKERS [PORT]

Prints one JSON line ``{"address": ...}`` once the cluster is up, then
answers one JSON line per command read on stdin: ``pids`` (the Dask worker
processes, address -> pid), ``wait N`` (until N workers are up), ``scale N``
(to N workers, and wait for them). Closes the
cluster at EOF.
"""

import json
import logging
import os
import sys

import distributed

if __name__ == "__main__":
    workers = int(sys.argv[1])
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       scheduler_port=port, dashboard_address=":0", silence_logs=logging.ERROR)
    client = distributed.Client(cluster)
    print(json.dumps({"address": cluster.scheduler_address}), flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[:1] == ["pids"]:
            answer = client.run(os.getpid)
        elif command[:1] == ["wait"]:
            client.wait_for_workers(int(command[1]), timeout=120)
            answer = "ok"
        elif command[:1] == ["scale"]:
            cluster.scale(int(command[1]))
            client.wait_for_workers(int(command[1]), timeout=120)
            answer = "ok"
        else:
            answer = f"unknown command {line!r}"
        print(json.dumps(answer), flush=True)
    client.close()
    cluster.close()
