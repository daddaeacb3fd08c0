"""The worker daemon (``spoolq worker SERVER``).

* :mod:`.loop`: the select loop: signals, arrivals, claims, time limits,
  heartbeat, sweeps, sd_notify;
* :mod:`.executor`: the :class:`~.executor.Executor` seam between the loop
  and wherever handlers run, and the fork pool behind it;
* :mod:`.runner`: one claim run to its end in a handler process.
"""

from .executor import Ended, Executor, ForkExecutor
from .loop import Worker, run_worker
from .runner import load_handler, run_claim

__all__ = ["Ended", "Executor", "ForkExecutor", "Worker", "load_handler", "run_claim", "run_worker"]
