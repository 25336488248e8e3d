"""Durations as Stageflow's users write them: ``90s``, ``15m``, ``1h30m``, ``2d``, ``1w``.

One grammar for the policy file (``rollback.cooldown``), ``monitor --since`` and
``watch --every``, so a period one accepts the others take. It imports nothing heavy:
the CLI checks these flags before it imports a stage (a typo answers at once, not after
seconds of importing MLflow and pandas).
"""

from __future__ import annotations

import re
from datetime import timedelta

# Hand-written: a few units summed; pandas.Timedelta reads a wider grammar ("15min",
# "1 day") than the policy file documents, and would cost the CLI its import.
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_WHOLE = re.compile(r"^\s*(?:\d+(?:\.\d+)?\s*[smhdw]\s*)+$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse(text: str) -> timedelta:
    """A duration like ``"90s"``, ``"15m"``, ``"1h"``, ``"1h30m"``, ``"2d"`` or ``"1w"``.

    Raises:
        ValueError: the text is not such a duration.
    """
    if not isinstance(text, str) or not _WHOLE.match(text):
        raise ValueError(
            f'{text!r} is not a duration like "90s", "15m", "1h", "1h30m" or "2d" '
            "(units s, m, h, d, w)"
        )
    return timedelta(seconds=sum(float(n) * _UNIT_SECONDS[u] for n, u in _PART.findall(text)))


def positive(text: str) -> timedelta:
    """:func:`parse`, surrounding spaces allowed, for a duration above zero.

    Raises:
        ValueError: not a positive duration.
    """
    duration = parse(str(text).strip())
    if duration <= timedelta(0):
        raise ValueError(f"{text!r} is not a positive duration (like 15m or 2h)")
    return duration
