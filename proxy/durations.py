"""Durations as settings are written: below both the config loader and the rules whose
options it loads, so a detector can declare a duration option without importing config."""

from __future__ import annotations

import re

__all__ = ["Duration", "parse_duration"]


class Duration(float):
    """Seconds, written in YAML as `500ms`, `5s`, `2m`, `1h` or a bare number of seconds."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> Duration:
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 5s, 2m or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(
                f"expected a duration such as 500ms, 5s, 2m or a number of seconds, got {value!r}"
            )
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return Duration(seconds)
