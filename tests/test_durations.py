"""runner.durations: the config grammar (`500ms`, a number alone is seconds) and the span grammar (`1h30m`, `1d`)."""

from __future__ import annotations

import pytest

from runner.durations import parse_duration, parse_span


@pytest.mark.parametrize("value, seconds", [
    (3, 3.0), (2.5, 2.5), (0, 0.0), ("3", 3.0), ("3s", 3.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0),
    ("1.5s", 1.5), (".5s", 0.5), ("3.", 3.0), (" 3 s ", 3.0),
])
def test_config_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value, message", [
    (True, "expected a duration such as 3, 3s, 500ms or 2m"),
    (-1, "a duration cannot be negative"),
    ("-1", "expected a duration such as 3, 3s, 500ms or 2m, found '-1'"),
    ("1d", "found '1d'"),  # days are for spans, not config durations
    ("1h30m", "found '1h30m'"),  # one term only
    ("ms", "found 'ms'"), ("", "found ''"), (None, "found None"),
])
def test_config_durations_refused(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_duration(value)


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90.0), ("10m", 600.0), ("1h30m", 5400.0), ("1d", 86400.0), ("1.5h", 5400.0), ("250ms", 0.25),
    ("1d2h", 93600.0), ("1m1m", 120.0),
])
def test_spans(text: str, seconds: float) -> None:
    assert parse_span(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "1h 30m", ".5s", "3.s", "1w", "-1h", "2026-11-26T23:30:00", "1h30"])
def test_not_spans(text: str) -> None:
    assert parse_span(text) is None
