"""Durations, in the two documented grammars, from one unit table.

- Config durations (`3`, `3s`, `500ms`, `2m`, `1h`): one number with an optional unit, a number
  alone is seconds; ints and floats pass as seconds; negatives and booleans are refused.
- Spans (`--since 1h30m`, `90s`, `1d`): one or more number+unit terms written together, days allowed.
"""

from __future__ import annotations

import re
from typing import Any

#: seconds per unit, for both grammars (config durations take every unit but `d`)
UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
CONFIG_UNITS = ("ms", "s", "m", "h")


def _one_of(units: Any) -> str:
    """A regex alternation of units, longest first (`ms` before `m`)."""
    return "|".join(sorted(units, key=len, reverse=True))


_CONFIG = re.compile(rf"^\s*(\d+(?:\.\d*)?|\.\d+)\s*({_one_of(CONFIG_UNITS)})?\s*$")
_SPAN_TERM = re.compile(rf"(\d+(?:\.\d+)?)({_one_of(UNITS)})")


def parse_duration(value: Any) -> Any:
    """Seconds from `3`, `3s`, `500ms`, `2m`, `1h` (a number alone is seconds)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 3, 3s, 500ms or 2m")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        match = _CONFIG.match(value)
        if match:
            return float(match.group(1)) * UNITS[match.group(2) or "s"]
    raise ValueError(f"expected a duration such as 3, 3s, 500ms or 2m, found {value!r}")


def parse_span(text: str) -> float | None:
    """Seconds from a span such as `10m`, `1h30m`, `1d`, `1.5h`; None if `text` is not one (no spaces inside)."""
    terms = _SPAN_TERM.findall(text)
    if not terms or "".join(number + unit for number, unit in terms) != text:
        return None
    return sum(float(number) * UNITS[unit] for number, unit in terms)
