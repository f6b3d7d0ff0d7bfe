"""Checks shared by every config dataclass: value kinds that YAML and JSON blur (bool is an int) and one error."""

from __future__ import annotations

import math
from typing import Any

from loramoe.errors import ConfigError


def is_int(value: Any) -> bool:
    """An int that is not a bool (YAML and JSON give both)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool, NaN or infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require(ok: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``ok``."""
    if not ok:
        raise ConfigError(message)
