"""The text formats of a task directory (spoolq.store.codec): the time
format every status and log record uses, and the status document's
encoding, whose decoded form a process keeps for the bytes it just wrote or
read (the next step of a task reads what its last step wrote)."""

from __future__ import annotations

import random
from datetime import datetime, timezone

import pytest

from spoolq.errors import CorruptTask
from spoolq.store import codec


def reference_iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="microseconds")


def test_iso_is_the_text_datetime_gives_rounding_included() -> None:
    rng = random.Random(7)
    stamps = [0.0, 1.5, 1_700_000_000.0, 1_700_000_000.9999995, 1_700_000_000.0000005, 1_799_999_999.999999,
              1_700_000_000.1234565, 1_700_000_000.1234575]
    stamps += [rng.uniform(1.6e9, 1.9e9) for _ in range(20_000)]
    stamps += [1_700_000_000 + rng.randrange(1_000_000) / 1e6 for _ in range(20_000)]
    for ts in stamps:
        assert codec.iso(ts) == reference_iso(ts), ts
    # The kept second is never wrong for another second, in either direction.
    for ts in (1_700_000_001.25, 1_700_000_000.75, 1_700_000_001.25):
        assert codec.iso(ts) == reference_iso(ts)
    assert codec.from_iso(codec.iso(1_700_000_000.25)) == 1_700_000_000.25


def test_iso_writes_no_time_it_cannot_read_back() -> None:
    last = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp()
    assert codec.from_iso(codec.iso(last)) == last
    # The operator's due time (year 10240), and times past what gmtime takes: refused, not written.
    for ts in (last + 1, 259_176_000_000.0, -1e12, 1e20):
        with pytest.raises(ValueError, match="four-digit year"):
            codec.iso(ts)


def _doc(**changes):
    doc = {"type": "T", "id": "a", "state": "RUNNING", "claim": 5, "server": "s1", "message": "", "priority": 0,
           "not_before": None, "updated_at": codec.iso(1_700_000_000.0)}
    doc.update(changes)
    return doc


def test_a_status_read_again_is_an_equal_document_of_its_own() -> None:
    raw = codec.encode_status(_doc(message="first"))
    one = codec.decode_status(raw, "/x")
    one["message"] = "changed by its reader"
    two = codec.decode_status(raw, "/x")
    assert two == _doc(message="first") and two is not one
    # Bytes never seen: decoded from the text, the same document.
    fresh = raw.replace(b'"first"', b'"fresh"')
    assert codec.decode_status(fresh, "/x") == _doc(message="fresh")


@pytest.mark.parametrize("bad", [
    {"state": "SLEEPING"}, {"claim": "5"}, {"priority": 1000}, {"not_before": "yesterday"}, {"cancelled": "yes"},
])
def test_a_status_that_is_not_valid_is_refused_even_right_after_this_process_wrote_it(bad) -> None:
    raw = codec.encode_status(_doc(**bad))
    with pytest.raises(CorruptTask, match="is corrupt"):
        codec.decode_status(raw, "/x")


def test_only_flat_documents_are_kept_and_others_still_decode() -> None:
    raw = codec.encode_status(_doc(extra=[1, 2]))
    assert codec.decode_status(raw, "/x")["extra"] == [1, 2]
    with pytest.raises(CorruptTask, match="not an object"):
        codec.decode_status(b"[]", "/x")
