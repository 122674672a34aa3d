"""Argument checks at the library's boundary: each raises a ``ValueError`` that names the
argument, the value received and what was expected, and returns the value as the caller uses it."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, Sequence

__all__ = ["integer", "number", "flag", "choice", "decay"]


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def integer(name: str, value: Any, *, minimum: int = 1, maximum: int | None = None, none: bool = False) -> int | None:
    """``value`` as an ``int`` in ``[minimum, maximum]`` (None allowed with ``none=True``)."""
    if value is None and none:
        return None
    if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
        if maximum is not None:
            what = f"an integer in [{minimum}, {maximum}]"
        else:
            what = {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}")
        raise ValueError(f"{name}: expected {what}{' or None' if none else ''}, got {value!r}")
    return int(value)


def number(name: str, value: Any, *, low: float = 0.0, high: float = math.inf, closed: bool = False,
           none: bool = False, what: str | None = None) -> float | None:
    """``value`` as a ``float`` in the open interval (low, high), or the closed one with ``closed``."""
    if value is None and none:
        return None
    ok = isinstance(value, Real) and not isinstance(value, bool) and (
        low <= value <= high if closed else low < value < high)
    if not ok:
        if what is None:
            what = "a positive number" if (low, high, closed) == (0.0, math.inf, False) else (
                f"a number in {'[' if closed else '('}{low:g}, {high:g}{']' if closed else ')'}")
        raise ValueError(f"{name}: expected {what}{' or None' if none else ''}, got {value!r}")
    return float(value)


def decay(name: str, value: Any) -> float | None:
    """A weight-averaging decay in (0, 1), or None."""
    return number(name, value, low=0.0, high=1.0, none=True, what="a decay in (0, 1)")


def flag(name: str, value: Any) -> bool:
    """``value`` must be True or False (a string such as "no" would read as true)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    return value


def flag_or_auto(name: str, value: Any) -> bool | str:
    """``value`` must be True, False or "auto" (a setting the library decides unless told)."""
    if not (isinstance(value, bool) or isinstance(value, str) and value == "auto"):
        raise ValueError(f"{name}: expected True, False or 'auto', got {value!r}")
    return value


def choice(name: str, value: Any, options: Sequence[Any]) -> Any:
    """``value`` must be one of ``options``."""
    if not any(value is o or (type(value) is type(o) and value == o) for o in options):
        listed = ", ".join(repr(o) for o in options)
        raise ValueError(f"{name}: expected one of {listed}, got {value!r}")
    return value
