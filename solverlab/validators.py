"""attrs validators for solver, grid and schedule options (public: plugins use them too).

Each raises :class:`~solverlab.errors.OptionError` with a message naming the option, the value
given and what is allowed."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

from .errors import OptionError


def _owner(inst: Any) -> str:
    name = getattr(type(inst), "name", None)
    return f"{type(inst).__name__}" + (f" ({name!r})" if isinstance(name, str) else "")


def one_of(*allowed: Any) -> Callable[[Any, Any, Any], None]:
    """The value must be one of ``allowed``."""

    def check(inst: Any, attribute: Any, value: Any) -> None:
        if value not in allowed:
            raise OptionError(
                f"{_owner(inst)}: option {attribute.name}={value!r} is not allowed; "
                f"choose one of {', '.join(repr(a) for a in allowed)}"
            )

    return check


def number(
    *, gt: float | None = None, ge: float | None = None, lt: float | None = None,
    le: float | None = None, integer: bool = False, none: str | None = None,
) -> Callable[[Any, Any, Any], None]:
    """A finite real (or integer) number inside the given bounds; with ``none`` (what ``None``
    means, e.g. ``"the automatic threshold"``) also ``None``."""
    bounds = [f"> {gt}" if gt is not None else "", f">= {ge}" if ge is not None else "",
              f"< {lt}" if lt is not None else "", f"<= {le}" if le is not None else ""]
    allowed = ("an integer" if integer else "a finite number") + " and".join(
        f" {b}" for b in bounds if b
    ) + (f", or None for {none}" if none is not None else "")

    def check(inst: Any, attribute: Any, value: Any) -> None:
        if value is None and none is not None:
            return
        ok = isinstance(value, numbers.Integral if integer else numbers.Real)
        ok = ok and not isinstance(value, bool)
        if ok and not integer:
            ok = math.isfinite(value)
        if ok:
            ok = ((gt is None or value > gt) and (ge is None or value >= ge)
                  and (lt is None or value < lt) and (le is None or value <= le))
        if not ok:
            raise OptionError(
                f"{_owner(inst)}: option {attribute.name}={value!r} is not allowed; "
                f"it must be {allowed}"
            )

    return check


def boolean(inst: Any, attribute: Any, value: Any) -> None:
    """The value must be ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise OptionError(
            f"{_owner(inst)}: option {attribute.name}={value!r} is not allowed; "
            "it must be True or False"
        )
