"""The probability-flow ODE written in an integration variable: the one home of its drifts.

For ``x_t = alpha(t) x_0 + sigma(t) eps`` the probability-flow ODE (Song et al. 2021b, eq. 13)
is, in the schedule's own time,

    dx/dt = dlog_alpha/dt x - sigma dlambda/dt eps(x, t)            (variable ``"t"``)

with ``lambda = log(alpha/sigma)``. A solver may integrate it in another variable ``v`` and on
another state ``y``; :class:`PFODE` gives, for each choice, the maps ``t <-> v`` and
``x <-> y`` and the right-hand side ``dy/dv = a(t) y + b(t) eps``:

====================  ========================  ========================================
``variable``          state ``y``               ``dy/dv``
====================  ========================  ========================================
``"sigma"`` (s~)      ``x/alpha``               ``eps``
``"lambda"``          ``x/alpha``               ``-exp(-lambda) eps``
``"log_sigma"`` (u)   ``x``                     ``-(dlog_alpha/dlambda) x + sigma eps``
``"t"``               ``x``                     ``dlog_alpha/dt x - sigma dlambda/dt eps``
====================  ========================  ========================================

- ``"sigma"``: ``s~ = sigma/alpha = exp(-lambda)``, EDM's noise level, on ``y = x/alpha =
  x_0 + s~ eps`` (Song et al. 2021a, DDIM, eq. 14; Karras et al. 2022, eq. 4 with ``s = 1``).
  The posterior of ``x_0`` given ``y`` depends only on ``(y, s~)``, so for a given data
  distribution this ODE is the same for every schedule: as smooth as the data makes it, also
  on ``vp-discrete`` whose ``log alpha`` is piecewise linear in ``t``. An Euler step in ``s~``
  is exactly DDIM, and ``(y - x_0)/s~ = eps`` is k-diffusion's derivative ``d``.
- ``"lambda"``: the half log-SNR on the same ``y``; the form the exponential integrators
  integrate exactly in their linear part (Lu et al. 2022, eq. 3.4). Smooth too, but the factor
  ``exp(-lambda)`` changes by ``exp(h)`` across a step, which generic Runge-Kutta steps
  resolve poorly when steps are few.
- ``"log_sigma"``: ``u = log s~ = -lambda`` on ``x`` itself: same step placement as
  ``"lambda"`` but the linear part stays in the right-hand side.
- ``"t"``: the schedule's time on ``x``; its coefficients are only as smooth in ``t`` as the
  schedule (``vp-discrete``: kinks at every table node).

Schedule quantities are float64; they meet the state in its dtype. Times ``t`` are 0-d or one
per sample, shape ``(batch,)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import torch
from torch import Tensor

from .schedule import Schedule, as_f64, batch_time
from .validators import one_of

if TYPE_CHECKING:
    from .model import Denoiser

__all__ = ["PFODE", "SCALED_VARIABLES", "VARIABLES"]

F64 = torch.float64

#: The integration variables, in the order of the module docstring's table.
VARIABLES: tuple[str, ...] = ("sigma", "lambda", "log_sigma", "t")
#: Variables whose state is ``y = x/alpha`` (the others integrate ``x`` itself).
SCALED_VARIABLES: tuple[str, ...] = ("sigma", "lambda")


def _like(v: Tensor, y: Tensor) -> Tensor:
    """A float64 coefficient (0-d or ``(batch,)``) cast and shaped to broadcast against ``y``."""
    v = v.to(device=y.device, dtype=y.dtype)
    return v if v.ndim == 0 else v.view((-1,) + (1,) * (y.ndim - 1))


@attrs.frozen(kw_only=True)
class PFODE:
    """The probability-flow ODE of ``schedule`` in ``variable`` (module docstring).

    ``v_of_t``/``t_of_v`` map times (float64); ``to_y``/``to_x`` map states at a time;
    ``coefficients(t)`` gives ``(a, b)`` of ``dy/dv = a y + b eps``; :meth:`rhs` evaluates it
    through a :class:`~solverlab.Denoiser` (one NFE) and :meth:`velocity` from a given ``eps``
    (for callers that evaluate the model themselves, e.g. :mod:`solverlab.reference`).
    Unknown ``variable`` raises :class:`~solverlab.OptionError`.
    """

    schedule: Schedule
    variable: str = attrs.field(default="sigma", validator=one_of(*VARIABLES))

    @property
    def scaled(self) -> bool:
        """Whether the state is ``y = x/alpha`` (``"sigma"``, ``"lambda"``) rather than ``x``."""
        return self.variable in SCALED_VARIABLES

    # -- variable <-> time ---------------------------------------------------------------------
    def v_of_t(self, t: Tensor | float) -> Tensor:
        """The variable at times ``t`` (float64)."""
        t = as_f64(t)
        if self.variable == "t":
            return t
        lam = self.schedule.lambda_(t)
        if self.variable == "lambda":
            return lam
        return torch.exp(-lam) if self.variable == "sigma" else -lam

    def t_of_v(self, v: Tensor | float) -> Tensor:
        """The times at variable values ``v`` (float64): the inverse of :meth:`v_of_t`."""
        v = as_f64(v)
        if self.variable == "t":
            return v
        lam = {"lambda": v, "log_sigma": -v}.get(self.variable)
        return self.schedule.t_of_lambda(-torch.log(v) if lam is None else lam)

    # -- state maps ----------------------------------------------------------------------------
    def to_y(self, x: Tensor, t: Tensor | float) -> Tensor:
        """The integrated state at time ``t`` of ``x``: ``x/alpha(t)`` or ``x`` itself."""
        return x / _like(self.schedule.alpha(as_f64(t)), x) if self.scaled else x

    def to_x(self, y: Tensor, t: Tensor | float) -> Tensor:
        """The inverse of :meth:`to_y`."""
        return y * _like(self.schedule.alpha(as_f64(t)), y) if self.scaled else y

    # -- the right-hand side -------------------------------------------------------------------
    def coefficients(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """``(a, b)`` of ``dy/dv = a y + b eps`` at times ``t`` (float64, shaped like ``t``)."""
        s, t = self.schedule, as_f64(t)
        if self.variable == "sigma":
            return torch.zeros_like(t), torch.ones_like(t)
        if self.variable == "lambda":
            return torch.zeros_like(t), -torch.exp(-s.lambda_(t))
        dla = s.dlog_alpha_dt(t)
        if self.variable == "t":
            return dla, -s.sigma(t) * s.dlambda_dt(t)
        return -dla / s.dlambda_dt(t), s.sigma(t)  # log_sigma: d/du = -d/dlambda

    def velocity(self, y: Tensor, t: Tensor | float, eps: Tensor) -> Tensor:
        """``dy/dv = a y + b eps`` at time ``t`` for a given noise prediction ``eps``."""
        a, b = self.coefficients(t)
        out = _like(b, y) * eps
        return out if self.scaled else out + _like(a, y) * y  # a = 0 on x/alpha

    def rhs(self, denoiser: Denoiser, y: Tensor, t: Tensor | float) -> Tensor:
        """``dy/dv`` at ``(y, t)`` with ``eps`` from ``denoiser`` at ``x = to_x(y, t)``; one NFE.
        ``t``: a scalar or one time per sample."""
        t = batch_time(y, t)
        x = self.to_x(y, t)
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        eps = denoiser.noise(x, t, coefficients=(_like(alpha, x), _like(sigma, x)))
        return self.velocity(y, t, eps)
