"""PNDM's coefficients as validated data, and the transfer part on a grid.

- :data:`PLMS`: the Adams-Bashforth weights of the pseudo linear multistep part (Liu et al.
  2022, and its lower-order warm-up rows), newest output first, written as exact
  fractions and checked when built: ``sum_j w_j (-j)^m = 1/(m+1)`` for ``m < k`` (the row
  integrates polynomials of degree ``< k`` on the nodes ``0, -1, .., -(k-1)`` over ``[0, 1]``).
- The pseudo Runge-Kutta part is the classical RK4 tableau and the pseudo improved
  Euler step of S-PNDM is Heun's: both are ``solverlab_classic``'s validated
  :class:`~solverlab_classic.ButcherTableau` constants, not copies.
- :func:`transfer`: the transfer part ``phi`` (the paper's eq. 9) from ``s`` to ``t``.
"""

from __future__ import annotations

from fractions import Fraction

import attrs
import torch
from torch import Tensor

from solverlab import OptionError
from solverlab_classic import HEUN_TABLEAU, RK4_TABLEAU, ButcherTableau
from solverlab_expint.integrator import Nodes

__all__ = ["HEUN_TABLEAU", "PLMS", "RK4_TABLEAU", "AdamsBashforth", "ButcherTableau",
           "transfer"]


def _fractions(v) -> tuple[Fraction, ...]:
    return tuple(Fraction(x) for x in v)


@attrs.frozen
class AdamsBashforth:
    """The ``k``-step Adams-Bashforth weights ``w`` (newest first) of
    ``eps' = sum_j w_j e_{t + j delta}``, exact fractions, checked when built."""

    w: tuple[Fraction, ...] = attrs.field(converter=_fractions)

    def __attrs_post_init__(self) -> None:
        for m in range(len(self.w)):
            got = sum(wj * Fraction(-j) ** m for j, wj in enumerate(self.w))
            if got != Fraction(1, m + 1):
                raise OptionError(
                    f"AdamsBashforth: weights {[str(x) for x in self.w]} give "
                    f"sum_j w_j (-j)^{m} = {got}, not 1/{m + 1}; a {len(self.w)}-step row must "
                    "integrate polynomials of degree < steps exactly")

    @property
    def steps(self) -> int:
        return len(self.w)

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(float(x) for x in self.w)


#: ``PLMS[k]``: the ``k``-step row. ``PLMS[4]`` is PNDM's ``(55, -59, 37, -9)/24``;
#: ``PLMS[2]`` is S-PNDM's ``(3, -1)/2``; ``PLMS[1..3]`` are diffusers' PLMS-only warm-up.
PLMS = {
    1: AdamsBashforth((1,)),
    2: AdamsBashforth((Fraction(3, 2), Fraction(-1, 2))),
    3: AdamsBashforth((Fraction(23, 12), Fraction(-16, 12), Fraction(5, 12))),
    4: AdamsBashforth((Fraction(55, 24), Fraction(-59, 24), Fraction(37, 24), Fraction(-9, 24))),
}


def transfer(s: Nodes, t: Nodes) -> tuple[Tensor, Tensor]:
    """Float64 coefficients ``(A, B)`` of the transfer part ``phi(x, eps, s, t) = A x + B eps``
    (vectorised over steps), for any schedule (VP, VE, EDM)::

        A = alpha_t / alpha_s,   B = -sigma_t expm1(lambda_t - lambda_s)

    The exponential-integrator form (docs/mathematics.md#pndm): with ``alpha-bar = alpha^2`` on a
    VP schedule, ``B = sqrt(1 - a') - sqrt(a'(1 - a)/a)`` (DDIM, eta = 0), and ``expm1`` avoids
    the cancellation that the paper's rearranged eq. 9 avoids when ``a' ~ a``. It is exact when
    ``eps`` is constant along the step (``x/alpha`` moves by ``(sigma_t/alpha_t -
    sigma_s/alpha_s) eps``)."""
    h = t.lam - s.lam
    return torch.exp(t.log_alpha - s.log_alpha), -torch.exp(t.log_sigma) * torch.expm1(h)
