"""Validation of the names that end up in paths: task types, task ids, servers.

Names become directory entries, so they are checked before anything is
written: a name that could climb out of the spool (``..``, ``a/b``), hide
itself (leading dot) or look like an option (leading dash) is refused.
"""

from __future__ import annotations

import re

from .errors import InvalidName

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")

TYPE_MAX = 64
SERVER_MAX = 64
ID_MAX = 128

# Separates type and id in a task directory's name (``SequenceSum:Task001``).
# Neither part may contain it, so the split is unambiguous.
SEP = ":"


# Names found valid lately: a task's type, id and server are checked at
# every step of its life, and a lookup here is cheaper than the checks.
_VALID: set[tuple[str, str]] = set()
_VALID_MAX = 8192


def _check(kind: str, value: object, limit: int) -> str:
    if type(value) is str and (kind, value) in _VALID:
        return value
    if not isinstance(value, str):
        raise InvalidName(kind, value, f"{kind} must be a string, not {type(value).__name__}")
    if not value:
        raise InvalidName(kind, value, f"{kind} must not be empty")
    if len(value) > limit:
        raise InvalidName(kind, value, f"{kind} {value[:20]!r}… is longer than {limit} characters")
    if not _NAME.match(value):
        raise InvalidName(
            kind, value,
            f"invalid {kind} {value!r}: use 1-{limit} of A-Z a-z 0-9 _ . -, not starting with '.' or '-'",
        )
    if len(_VALID) >= _VALID_MAX:
        _VALID.clear()
    _VALID.add((kind, value))
    return value


def check_type(name: object) -> str:
    """Return *name* if it is a valid task type name, else raise InvalidName."""
    return _check("task type", name, TYPE_MAX)


def check_id(task_id: object) -> str:
    """Return *task_id* if it is a valid task id, else raise InvalidName."""
    return _check("task id", task_id, ID_MAX)


def check_server(server: object) -> str:
    """Return *server* if it is a valid server id, else raise InvalidName."""
    return _check("server id", server, SERVER_MAX)


def task_name(type_name: str, task_id: str) -> str:
    """The directory name of task (type, id): ``TYPE:ID``."""
    return f"{check_type(type_name)}{SEP}{check_id(task_id)}"


def split_task_name(name: str) -> tuple[str, str] | None:
    """(type, id) of a task directory name, or None if it is not one."""
    type_name, sep, task_id = name.partition(SEP)
    if not sep:
        return None
    try:
        return check_type(type_name), check_id(task_id)
    except InvalidName:
        return None
