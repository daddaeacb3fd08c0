"""spoolq: a crash-safe task queue in a directory tree, worked by a daemon
that systemd supervises. README.md has the tour, docs/contract.md the
contract and docs/design.md the inside.

The names below are loaded when first used (``from spoolq import Spool``
imports :mod:`spoolq.spool` then, not before), so that ``import spoolq``
and a short ``spoolq`` command stay quick (docs/contract.md §12.7).
"""

from ._version import __version__ as __version__

# name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(
        ["CorruptTask", "CrossDevice", "InvalidInput", "InvalidName", "NoResponse", "NoSpool", "QueueEmpty",
         "QueueException", "QueueFull", "ServerBusy", "SpoolError", "SpoolqError", "StaleClaim", "TaskExists",
         "TaskGone", "TaskNotFound", "TypeInUse", "UnknownType", "UnsafeSpool", "WrongState"],
        "errors"),
    **dict.fromkeys(["Action", "Claim", "Outcome", "State"], "lifecycle"),
    **dict.fromkeys(["Census", "TaskInfo"], "queries"),
    **dict.fromkeys(["Spool", "StartedTask", "SweepAction"], "spool"),
    "LogRecord": "store.codec",
    "TaskType": "store.registry",
    **dict.fromkeys(["Retry", "TaskContext"], "task"),
    **dict.fromkeys(["BatchResult", "Item"], "producer"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'spoolq' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # the next lookup finds it directly
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
