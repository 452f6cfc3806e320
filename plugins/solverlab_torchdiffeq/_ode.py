"""The probability-flow ODE in the integration variable torchdiffeq steps in.

Three choices (option ``variable``), all with the same end points ``t_start -> t_end``:

- ``"t"``: the schedule's own time on the state ``x``: ``dx/dt = Denoiser.drift(x, t)``.
- ``"lambda"`` (default): the half log-SNR on the VE state ``y = x/alpha``
  (docs/mathematics.md#pf-ode)::

      dy/dlambda = -exp(-lambda) eps(alpha y, t(lambda))

  The linear part of the drift is gone and the right-hand side is smooth where the ``t``-form is
  stiff (VP near ``t -> 0``, Yang et al. 2024, Thm 3.1); the form :mod:`solverlab.reference` solves.
- ``"log_sigma"``: ``u = log(sigma/alpha) = -lambda`` (EDM's log noise level) on the state
  ``x`` itself: ``dx/du = -(dlog_alpha/dlambda x - sigma eps)``. Same step placement as
  ``"lambda"`` but the linear part stays in the right-hand side (a VP ``x`` shrinks by ``alpha``),
  which shows what integrating it exactly buys.

:func:`solverlab.reference.lambda_ode` is not reused: it calls the ``Model`` directly (no NFE
count, no guidance or thresholding of the :class:`~solverlab.Denoiser`) and keeps the state in
float64; here every evaluation goes through ``Denoiser.noise`` and the state keeps its dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from solverlab import Denoiser

__all__ = ["PFODE", "VARIABLES"]

F64 = torch.float64
VARIABLES = ("lambda", "t", "log_sigma")


class PFODE:
    """Right-hand side ``f(v, y)`` of the PF-ODE in ``variable``, with the maps between the
    state ``x`` at time ``t`` and ``(v, y)``. All schedule quantities in float64, cast to the
    state's dtype when applied; ``v`` is a 0-d float64 tensor (shared by the batch)."""

    def __init__(self, denoiser: Denoiser, variable: str, like: Tensor) -> None:
        self.denoiser, self.variable = denoiser, variable
        self.schedule = denoiser.schedule
        self.shape = (-1,) + (1,) * (like.ndim - 1)
        self.dtype, self.device = like.dtype, like.device

    # -- variable <-> time --------------------------------------------------------------
    def v_of_t(self, t: Tensor) -> Tensor:
        t = t.to(F64)
        if self.variable == "t":
            return t
        lam = self.schedule.lambda_(t)
        return lam if self.variable == "lambda" else -lam

    def t_of_v(self, v: Tensor) -> Tensor:
        if self.variable == "t":
            return v
        return self.schedule.t_of_lambda(v if self.variable == "lambda" else -v)

    def _alpha(self, t: Tensor) -> Tensor:
        return self.schedule.alpha(t.to(F64)).to(self.dtype)

    def to_y(self, x: Tensor, t: Tensor) -> Tensor:
        return x / self._alpha(t) if self.variable == "lambda" else x

    def to_x(self, y: Tensor, t: Tensor) -> Tensor:
        return y * self._alpha(t) if self.variable == "lambda" else y

    # -- the right-hand side ------------------------------------------------------------
    def rhs(self, ends: tuple[Tensor, Tensor] | None = None) -> Callable[[Tensor, Tensor], Tensor]:
        """``f(v, y)``. ``ends``: the ``(v, t)`` pairs of the solve's end points, so that the
        end times are used exactly rather than through the round trip ``t(lambda(t))``."""
        s, d = self.schedule, self.denoiser

        def time(v: Tensor) -> Tensor:
            v = v.to(F64)
            if ends is not None:
                for ve, te in ends:
                    if bool(v == ve):
                        return te
            return self.t_of_v(v)

        def f(v: Tensor, y: Tensor) -> Tensor:
            t = time(v)
            if self.variable == "t":
                return d.drift(y, t)
            if self.variable == "lambda":
                alpha, sigma = float(s.alpha(t)), float(s.sigma(t))
                eps = d.noise(alpha * y, t, coefficients=(alpha, sigma))
                return eps * (-float(torch.exp(-s.lambda_(t))))
            alpha, sigma = float(s.alpha(t)), float(s.sigma(t))
            eps = d.noise(y, t, coefficients=(alpha, sigma))
            dla_dlam = float(s.dlog_alpha_dt(t) / s.dlambda_dt(t))
            return eps * sigma - y * dla_dlam

        return f
