"""The text formats of a task directory: ``status.json``, ``log`` and the input.

* ``status.json``: one flat JSON object, one key per line, sorted, so that
  ``cat`` reads it. Decoding validates what every reader relies on (a known
  state, an integer claim number) and raises CorruptTask otherwise.
* ``log``: one record per line, ``ISO-8601-UTC <TAB> STATE <TAB> message``,
  with ``\\n``, ``\\t``, ``\\r`` and ``\\`` escaped; a reader skips a torn
  last line (a crash in the middle of an append).
* input: a pickle is checked by parsing its opcodes, never by loading it
  (loading runs code).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..errors import CorruptTask, InvalidInput
from ..lifecycle import State

STATUS = "status.json"
LOG = "log"
RESPONSE = "response"
# The response's MIME type, an extended attribute of the response file
# itself: bytes and type are published by one rename (docs/design.md §6).
RESPONSE_MIME_ATTRIBUTE = "user.spoolq.response_mime"
DEFAULT_RESPONSE_MIME = "text/xml"  # ATP's
MIME_MAX = 255  # characters; RFC 6838 allows 127 for each of type and subtype
INPUT_PICKLE = "input.pkl"
INPUT_JSON = "input.json"
INPUT_NAMES = (INPUT_PICKLE, INPUT_JSON)


@dataclass(frozen=True)
class LogRecord:
    """One line of a task's log."""

    time: datetime
    state: State
    message: str


_SECOND: tuple[float, str] = (math.nan, "")  # the last whole second formatted, and its text


def iso(ts: float) -> str:
    """A timestamp as ISO 8601 UTC with microseconds (how every time is stored):
    the text of ``datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec=
    "microseconds")``, microseconds rounded as it rounds them, with the whole
    second's text kept from the last call (a task's steps share seconds).
    ValueError for a time outside the years 1000 to 9999."""
    global _SECOND
    frac, sec = math.modf(ts)
    us = round(frac * 1e6)
    if us >= 1_000_000:
        sec, us = sec + 1, us - 1_000_000
    elif us < 0:
        sec, us = sec - 1, us + 1_000_000
    second = _SECOND  # one read: another thread may replace it meanwhile
    if second[0] != sec:
        second = _SECOND = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", _utc(ts, sec)))
    return f"{second[1]}.{us:06d}+00:00"


def _utc(ts: float, sec: float) -> time.struct_time:
    """*sec* as UTC; ValueError unless its year has four digits. Outside
    them the text would be written but :func:`from_iso` could never read it
    back, and the task would be lost to quarantine: the callers bound the
    times they compute (a due time is at most units.MAX_DURATION ahead), so
    this is the last guard, not the rule."""
    try:
        utc = time.gmtime(sec)
    except (OverflowError, OSError):
        utc = None
    if utc is None or not 1000 <= utc.tm_year <= 9999:
        raise ValueError(f"{ts!r} is not a time ISO 8601 holds with a four-digit year")
    return utc


def response_of(data: Any, mime_type: Any) -> tuple[bytes, str]:
    """A response as it is stored: its bytes (a str in UTF-8) and its MIME
    type (None: ATP's ``text/xml``). InvalidInput for anything else: data
    that is neither bytes nor str, a type that is not 1 to MIME_MAX
    characters of text without control characters."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInput(f"a response must be bytes or str, not {type(data).__name__}")
    if mime_type is None:
        mime_type = DEFAULT_RESPONSE_MIME
    if not isinstance(mime_type, str):
        raise InvalidInput(f"a MIME type must be a str, not {type(mime_type).__name__}")
    if not 0 < len(mime_type) <= MIME_MAX or not mime_type.isprintable():
        raise InvalidInput(f"a MIME type is 1 to {MIME_MAX} printable characters, not {mime_type[:40]!r}")
    return bytes(data), mime_type


def from_iso(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def parse_time(text: str) -> datetime:
    """A stored time (as :func:`iso` writes it) as an aware datetime."""
    return datetime.fromisoformat(text)


# A message is a line of text, not a payload: a handler's exception text of
# megabytes would otherwise make a status.json over fsutil.READ_LIMIT, which
# every reader refuses (the task would drop out of every view).
STATUS_MESSAGE_MAX = 4096  # characters of the last message kept in status.json
LOG_MESSAGE_MAX = 1 << 20  # characters of one log record's message (a traceback, say)


def bounded(message: str, limit: int) -> str:
    """*message* cut to its first *limit* characters, the cut said at its end;
    InvalidInput unless it is a str."""
    if not isinstance(message, str):
        raise InvalidInput(f"a message must be a str, not {type(message).__name__}")
    if not message.isascii():
        message = _utf8_only(message)
    if len(message) <= limit:
        return message
    return f"{message[:limit]}... [{len(message) - limit:,} more characters cut]"


def _utf8_only(message: str) -> str:
    """*message* with each lone surrogate, which UTF-8 cannot hold, made
    U+FFFD: how Python passes on the bytes of an argument that is not UTF-8
    (`--reason "$(printf 'a\\xffb')"`), and what a handler may pass too."""
    try:
        message.encode()
        return message
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in message)


def one_line(message: str) -> str:
    """*message* on one line: newline, tab, carriage return and backslash
    written ``\\n``, ``\\t``, ``\\r``, ``\\\\`` (how the log stores it)."""
    return message.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


_UNESCAPE = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            out.append(_UNESCAPE.get(text[i + 1], text[i + 1]))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def encode_status(doc: dict[str, Any]) -> bytes:
    """``status.json`` as one key per line, sorted: the text
    ``json.dumps(doc, indent=1, sort_keys=True)`` gives for these flat
    documents, but through the C encoder (``indent`` forces the pure-Python
    one; this is 1.6x faster). The next read of these very bytes by this
    process decodes them from memory (:func:`decode_status`)."""
    body = json.dumps(doc, sort_keys=True, separators=(",\n ", ": "))
    raw = ("{\n " + body[1:-1] + "\n}\n").encode()
    if all(value is None or isinstance(value, (str, int, float)) for value in doc.values()):
        try:
            _check_status(doc)
        except (ValueError, KeyError, TypeError):
            return raw  # not a valid status: its reader says so
        _remember(raw, dict(doc))  # flat, scalar values: json.loads(raw) == doc
    return raw


def _whole(value: Any, low: int, high: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)


def _time_or_none(value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, str):
        return False
    from_iso(value)  # ValueError if it is not a time
    return True


# The fields of the second edition (contract §11): absent in a status of the
# first edition, which means their defaults; present, they must be right.
_FIELD_CHECKS: dict[str, Any] = {
    "priority": lambda v: _whole(v, -100, 100),
    "retries": lambda v: _whole(v, 0),
    "not_before": _time_or_none,
    "cancel": lambda v: isinstance(v, str),
    "cancelled": lambda v: isinstance(v, bool),
}


# Status texts this process wrote or read lately, decoded: a task's next step
# reads what its last step wrote. Decoding is a pure function of the bytes,
# so equal bytes give an equal document.
_DECODED: dict[bytes, dict[str, Any]] = {}
_DECODED_MAX = 256


def _remember(raw: bytes, doc: dict[str, Any]) -> None:
    if len(_DECODED) >= _DECODED_MAX:
        try:
            del _DECODED[next(iter(_DECODED))]  # the oldest
        except (RuntimeError, StopIteration, KeyError):  # another thread got there first
            pass
    _DECODED[raw] = doc


def _check_status(doc: dict[str, Any]) -> None:
    """Raise ValueError, KeyError or TypeError unless *doc* names a known
    state, has an integer claim number, and every field of the second
    edition it has is of its kind."""
    State[doc["state"]]
    if not isinstance(doc.get("claim"), int):
        raise ValueError("claim is not a number")
    for key, check in _FIELD_CHECKS.items():
        if key in doc and not check(doc[key]):
            raise ValueError(f"{key} is {str(doc[key])[:40]!r}")


def decode_status(raw: bytes, path: str) -> dict[str, Any]:
    """The status document in *raw* (read from *path*), a copy of its own;
    CorruptTask unless it is valid (:func:`_check_status`)."""
    known = _DECODED.get(raw)
    if known is not None:
        return dict(known)
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise TypeError(f"not an object but {type(doc).__name__}")
        _check_status(doc)
    except (ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: "[[[[…" nested too deep
        raise CorruptTask(path, f"{path}/status.json is corrupt: {exc}") from None
    _remember(raw, doc)
    return dict(doc)


def state_of(doc: dict[str, Any]) -> State:
    """The state of a decoded status document."""
    return State[doc["state"]]


def log_line(ts: float, state: State, message: str) -> bytes:
    return f"{iso(ts)}\t{state.name}\t{one_line(bounded(message, LOG_MESSAGE_MAX))}\n".encode()


def parse_log(raw: bytes) -> Iterator[LogRecord]:
    """The records of a log, oldest first; torn or malformed lines are skipped."""
    for line in raw.decode("utf-8", "replace").split("\n")[:-1]:
        parts = line.split("\t", 2)
        if len(parts) != 3:
            continue
        try:
            yield LogRecord(parse_time(parts[0]), State[parts[1]], _unescape(parts[2]))
        except (ValueError, KeyError):
            continue


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def loads_json(text: bytes | str) -> Any:
    """JSON text as Python values; ValueError (or RecursionError, nested too
    deep) unless it is JSON. Python's json takes NaN, Infinity and -Infinity
    by default, which JSON (RFC 8259) has not and other readers refuse: here
    they are refused too."""
    return json.loads(text, parse_constant=_no_constant)


def json_input(value: Any) -> bytes:
    """*value* as ``input.json`` holds it: one JSON document (contract §3.2).
    Bytes are JSON text, parsed first (:func:`loads_json`). InvalidInput
    saying what is wrong: text that is not JSON, a value JSON cannot hold
    (NaN and infinities too, which Python's json writes by default)."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = loads_json(value)
        except (ValueError, RecursionError) as exc:
            raise InvalidInput(f"input is not JSON: {str(exc)[:200]}") from None
    try:
        return json.dumps(value, allow_nan=False).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidInput(f"input cannot be stored as JSON: {str(exc)[:200]}") from None


def check_pickle(payload: bytes) -> None:
    """Refuse bytes that are not one well-formed pickle, without unpickling
    them (unpickling runs code; parsing the opcodes does not)."""
    import pickletools  # here, not at the top: `spoolq status` need not load it (contract §12.7)

    end = 0
    try:
        for opcode, _, pos in pickletools.genops(payload):
            if opcode.name == "STOP":
                end = pos + 1
    except Exception as exc:  # genops raises ValueError and friends
        raise InvalidInput(f"input is not a valid pickle: {exc}") from None
    if end != len(payload):
        # genops stops at the first STOP: what follows would never be loaded.
        raise InvalidInput(f"input is not one pickle: {len(payload) - end} byte(s) follow its end")
