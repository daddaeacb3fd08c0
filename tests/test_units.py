"""spoolq.units: durations and sizes as the command line writes them (contract §10)."""

from __future__ import annotations

import pytest

from spoolq.units import format_duration, format_size, parse_duration, parse_size


@pytest.mark.parametrize("text, seconds", [
    ("90", 90.0), ("1.5", 1.5), (".5", 0.5), ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("1d", 86400.0),
    ("1.5h", 5400.0), (" 10 s ", 10.0), ("2H", 7200.0), ("0", 0.0), (7, 7.0), (2.5, 2.5),
])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "5x", "1.2.3", "5 m s", "inf", "nan", "1e3", "--1", "m5"])
def test_bad_durations_are_refused_with_the_text_in_the_message(text):
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert repr(text) in str(info.value) and "\n" not in str(info.value)


def test_a_duration_is_at_most_100_years():
    assert parse_duration("36525d") == 36525 * 86400  # units.MAX_DURATION
    for text in ("36525.01d", "3000000d", 1e12, 10**400):
        with pytest.raises(ValueError, match="longer than 100 years|not a finite"):
            parse_duration(text)
    assert parse_duration("-3000000d", allow_negative=True) == -3000000 * 86400  # "no limit", as before


def test_negative_durations_only_where_allowed():
    with pytest.raises(ValueError, match="negative"):
        parse_duration("-1")
    assert parse_duration("-1", allow_negative=True) == -1.0
    assert parse_duration("-2m", allow_negative=True) == -120.0


@pytest.mark.parametrize("text, size", [
    ("4096", 4096), ("512K", 512 * 1024), ("64M", 64 * 1024**2), ("2G", 2 * 1024**3), ("64m", 64 * 1024**2),
    ("64MiB", 64 * 1024**2), ("512KB", 512 * 1024), ("1.5G", int(1.5 * 1024**3)), (" 1 M ", 1024**2), (100, 100),
    ("0", 0),
])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["12Q", "", "M", "1T", "64 MB B", "-1", "-5M", "1,000"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert repr(text) in str(info.value)


def test_formatting_round_trips():
    for size in (64 * 1024**2, 1536 * 1024, 1000, 3 * 1024**3, 0):
        assert parse_size(format_size(size)) == size
    assert format_size(64 * 1024**2) == "64M" and format_size(1000) == "1000"
    assert format_duration(1) == "1 s" and format_duration(1.5) == "1.5 s"
