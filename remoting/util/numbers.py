"""Numbers from the wire or a config: JSON allows what a float cannot hold."""

from __future__ import annotations

import math


def finite(value: float) -> float | None:
    """``value`` as a float; None for NaN, infinities and ints beyond any float."""
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None
