"""Time windows: ``--since 90s|15m|2h|7d`` and the window a monitor run covers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from stageflow import durations
from stageflow.errors import UsageError

DEFAULT_SINCE = "1h"


def parse_duration(text: str, flag: str = "--since") -> timedelta:
    """``"90s"``, ``"15m"``, ``"2h"``, ``"7d"`` as a timedelta (the policy's own grammar).

    Raises:
        UsageError: not a positive duration (the message names ``flag``).
    """
    try:
        return durations.positive(text)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


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
