"""What ``serve --inference-log`` and ``--log-retention`` accept, checked without the log.

Light on purpose (no pandas, no pyarrow): the CLI checks both flags before it imports the
controller, so a typo is a usage error at once. :mod:`serving.inference_log` reads the
same settings with these functions.
"""

from __future__ import annotations

import contextlib
import re

_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_mode(text: str) -> float:
    """``off`` → 0.0, ``all`` → 1.0, ``sample:F`` → F (0 < F ≤ 1): the fraction of requests logged.

    Raises:
        ValueError: naming the accepted forms.
    """
    value = str(text).strip().lower()
    if value in ("off", "all"):
        return 0.0 if value == "off" else 1.0
    if value.startswith("sample:"):
        with contextlib.suppress(ValueError):
            fraction = float(value.split(":", 1)[1])
            if 0.0 < fraction <= 1.0:
                return fraction
    raise ValueError(
        f"inference log mode {text!r}: use off, all or sample:FRACTION with 0 < FRACTION <= 1 "
        "(e.g. sample:0.1)"
    )


def parse_retention(text: str) -> tuple[int | None, float | None]:
    """``"1GB,7d"`` → (bytes, seconds): a size bound, an age bound, or both.

    Raises:
        ValueError: naming the accepted forms.
    """
    size = age = None
    for part in str(text).lower().replace(" ", "").split(","):
        match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]+)", part)
        unit = match.group(2) if match else None
        if unit in _SIZE_UNITS and size is None:
            size = int(float(match.group(1)) * _SIZE_UNITS[unit])
        elif unit in _AGE_UNITS and age is None:
            age = float(match.group(1)) * _AGE_UNITS[unit]
        else:
            raise ValueError(
                f"log retention {text!r}: use a size (e.g. 500MB), an age (e.g. 7d) or both "
                "(500MB,7d)"
            )
    return size, age
