"""Runs one worker daemon with options the command line does not expose
(short heartbeat and sweep intervals), for the daemon tests:
``python worker_runner.py ROOT SERVER JSON_OPTIONS``."""

import json
import sys

from spoolq.worker import Worker
from spoolq.errors import SpoolqError
from spoolq.spool import Spool
from spoolq.systemd import setup_logging

if __name__ == "__main__":
    root, server, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    setup_logging()
    try:
        sys.exit(Worker(Spool(root), server, **options).run())
    except SpoolqError as exc:
        print(f"spoolq: {exc}", file=sys.stderr)
        sys.exit(78)
