"""Butcher tableaux: the coefficients of explicit Runge-Kutta methods, as validated data."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np

from solverlab import OptionError

__all__ = ["ButcherTableau"]

# Coefficients are written as Python fractions of small integers (1/6, 1/3, ...), so the exact
# identities below hold to a few ulps; 1e-12 only absorbs that rounding.
_TOL = 1e-12


def _vector(v: Any) -> tuple[float, ...]:
    try:
        out = tuple(float(x) for x in v)
    except (TypeError, ValueError) as e:
        raise OptionError(f"ButcherTableau: {v!r} is not a sequence of numbers ({e})") from None
    return out


def _matrix(v: Any) -> tuple[tuple[float, ...], ...]:
    try:
        rows = list(v)
    except TypeError:
        raise OptionError(f"ButcherTableau: a={v!r} is not a sequence of rows") from None
    return tuple(_vector(row) for row in rows)


def _close(x: float, y: float) -> bool:
    return abs(x - y) <= _TOL * max(1.0, abs(x), abs(y))


@attrs.frozen(kw_only=True)
class ButcherTableau:
    """An explicit ``s``-stage Runge-Kutta method for ``dx/dt = f(x, t)``, step ``h``::

        k_i    = f(x + h sum_{j<i} a[i][j] k_j,  t + c[i] h),   i = 0..s-1
        x_next = x + h sum_i b[i] k_i

    ``a`` is the full ``s x s`` matrix (strictly lower triangular: explicit), ``b`` the weights
    and ``c`` the nodes. Checked when built (diffrax's ``ButcherTableau``): consistent shapes,
    finite values, ``a`` strictly lower triangular, ``c[i] = sum_j a[i][j]`` (the stages see the
    time they are evaluated at; needed for the order of a non-autonomous ODE such as the
    probability-flow ODE) and ``sum(b) = 1`` (consistency, order >= 1). A bad tableau raises
    :class:`~solverlab.OptionError` saying which entry is wrong and what it must be.
    """

    a: tuple[tuple[float, ...], ...] = attrs.field(converter=_matrix)
    b: tuple[float, ...] = attrs.field(converter=_vector)
    c: tuple[float, ...] = attrs.field(converter=_vector)

    def __attrs_post_init__(self) -> None:
        s = len(self.b)
        if s < 1:
            raise OptionError("ButcherTableau: b is empty; a method needs at least one stage")
        if len(self.c) != s or len(self.a) != s or any(len(row) != s for row in self.a):
            raise OptionError(
                f"ButcherTableau: shapes do not agree: b has {s} stages, c has {len(self.c)}, a "
                f"has rows of lengths {[len(r) for r in self.a]}; give a as the full {s}x{s} "
                f"matrix (zeros on and above the diagonal) and c of length {s}"
            )
        values = [*self.b, *self.c, *(v for row in self.a for v in row)]
        if not all(math.isfinite(v) for v in values):
            raise OptionError("ButcherTableau: every coefficient must be finite")
        for i, row in enumerate(self.a):
            upper = [j for j in range(i, s) if row[j] != 0.0]
            if upper:
                raise OptionError(
                    f"ButcherTableau: a[{i}][{upper[0]}] = {row[upper[0]]!r}; an explicit method "
                    "needs a strictly lower triangular a (a[i][j] = 0 for j >= i)"
                )
            if not _close(self.c[i], math.fsum(row)):
                raise OptionError(
                    f"ButcherTableau: c[{i}] = {self.c[i]!r} but row {i} of a sums to "
                    f"{math.fsum(row)!r}; the nodes must be the row sums, c[i] = sum_j a[i][j]"
                )
        if not _close(math.fsum(self.b), 1.0):
            raise OptionError(
                f"ButcherTableau: the weights b sum to {math.fsum(self.b)!r}; they must sum to 1"
            )

    @property
    def stages(self) -> int:
        """Number of stages ``s`` (= network evaluations per step)."""
        return len(self.b)

    def conditions_order(self) -> int:
        """The highest order ``p <= 4`` whose classical order conditions hold (Butcher trees up
        to order 4; e.g. Hairer, Norsett & Wanner, *Solving ODEs I*, Table II.2.1). Orders above 4
        are not checked: a 5th-order tableau reports 4."""
        a, b, c = (np.array(v, dtype=np.float64) for v in (self.a, self.b, self.c))
        ac, ac2 = a @ c, a @ c**2
        conditions: Sequence[Sequence[tuple[float, float]]] = (
            ((b.sum(), 1.0),),
            ((b @ c, 1 / 2),),
            ((b @ c**2, 1 / 3), (b @ ac, 1 / 6)),
            ((b @ c**3, 1 / 4), (b @ (c * ac), 1 / 8), (b @ ac2, 1 / 12), (b @ (a @ ac), 1 / 24)),
        )
        order = 0
        for group in conditions:
            if not all(_close(float(lhs), rhs) for lhs, rhs in group):
                break
            order += 1
        return order
