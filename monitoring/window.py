"""Time windows: ``--since 90s|15m|2h|7d`` and the window a monitor run covers."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from stageflow.errors import UsageError

DEFAULT_SINCE = "1h"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")


def parse_duration(text: str) -> timedelta:
    """``"90s"``, ``"15m"``, ``"2h"``, ``"7d"`` as a timedelta.

    Raises:
        UsageError: not a positive number followed by s, m, h or d.
    """
    match = _DURATION.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise UsageError(
            f"duration {text!r} is not like 90s, 15m, 2h or 7d (a positive number and s, m, h or d)"
        )
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


@dataclass(frozen=True)
class Window:
    """``[start, end)`` in UTC, and the ``since`` text it was made from."""

    start: datetime
    end: datetime
    since: str

    @classmethod
    def ending_now(cls, since: str = DEFAULT_SINCE, now: datetime | None = None) -> Window:
        end = now or datetime.now(UTC)
        return cls(end - parse_duration(since), end, since)

    def label(self) -> str:
        return f"{self.start:%Y-%m-%d %H:%M:%S} to {self.end:%Y-%m-%d %H:%M:%S} UTC"
