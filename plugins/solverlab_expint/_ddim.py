"""DDIM: the first-order exponential integrator (= DPM-Solver-1 = DPM-Solver++(1))."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor

from solverlab import SolverState
from solverlab.errors import OptionError
from solverlab.validators import number

from .integrator import ExpIntSolver, Nodes, Span, alpha_sigma, combine, floats, own

__all__ = ["DDIM"]


def _generator(inst: Any, attribute: Any, value: Any) -> None:
    if value is not None and not isinstance(value, torch.Generator):
        raise OptionError(
            f"DDIM ('ddim'): option generator={value!r} is not allowed; it must be a "
            "torch.Generator (on the device of x) or None"
        )


@attrs.frozen
class _Coef:
    times: Tensor
    ab: tuple[tuple[float, float], ...]
    a: tuple[float, ...]
    b: tuple[float, ...]
    d: tuple[float, ...]


@attrs.frozen(kw_only=True)
class DDIM(ExpIntSolver):
    """DDIM (Song et al. 2021, eq. 12) = DPM-Solver-1 (Lu et al. 2022, eq. 3.7). Order 1,
    1 NFE per step.

    ``x_t = (alpha_t/alpha_s) x_s - sigma_t expm1(h) eps(x_s, s)`` with ``h = lambda_t -
    lambda_s``; algebraically the same as DPM-Solver++(1) in data prediction,
    ``alpha_t x0 + sigma_t eps``, and as the first step of every multistep solver here.

    Options:

    - ``eta`` in ``[0, 1]`` (default 0, the deterministic ODE solver): the stochastic DDIM of
      eq. 16, written for any schedule: ``x_t = alpha_t x0 + sqrt(sigma_t^2 - s^2) eps + s z``
      with ``s = eta sigma_t sqrt(1 - e^{-2h})`` (for VP the paper's ``sigma_eta``); ``eta =
      1`` is DDPM's ancestral step. It does not converge to the ODE solution.
    - ``generator``: a ``torch.Generator`` for the noise ``z`` (``eta > 0``), on the device of
      ``x``; ``None`` uses the global generator. It advances with every step.
    - ``final_step`` (``lower_order_final`` has no effect on a first-order method).

    Pitfalls: ``expm1`` (not ``exp(h) - 1``) keeps small steps exact (diffusers computes
    ``alpha_t/alpha_s x - sigma_t (exp(h) - 1) eps`` in float32).
    """

    name: ClassVar[str] = "ddim"
    order: ClassVar[int] = 1
    eta: float = attrs.field(default=0.0, validator=number(ge=0.0, le=1.0))
    generator: torch.Generator | None = attrs.field(default=None, validator=_generator)

    def expected_nfe(self, steps: int) -> int:
        return steps + self._extra_nfe()

    def coefficients(self, schedule, grid: Tensor) -> _Coef:
        n = Nodes.at(schedule, grid)
        sp = Span.of("noise", n[:-1], n[1:], kmax=1)
        sigma_t = torch.exp(n.log_sigma[1:])
        if self.eta == 0.0:
            b, d = -sigma_t * torch.expm1(sp.h), torch.zeros_like(sp.h)
        else:
            var = -torch.expm1(-2.0 * sp.h)  # 1 - e^{-2h}
            d = self.eta * sigma_t * torch.sqrt(var)
            b = sigma_t * (torch.sqrt(1.0 - self.eta**2 * var) - torch.exp(sp.h))
        return _Coef(times=grid, ab=alpha_sigma(n), a=floats(sp.A), b=floats(b), d=floats(d))

    def buffers(self, coef: _Coef) -> int:
        return 1 if self.eta > 0 else 0

    def step(self, state: SolverState) -> SolverState:
        plan, i, x = state.cache, state.index, state.x
        k = plan.coef
        eps = own(plan.model(x, plan.times[i], k.ab[i]), x)
        noise = plan.buffers[0].normal_(generator=self.generator) if plan.buffers else None
        x = combine(x, k.a[i], x, (k.b[i], k.d[i]), (eps, noise) if noise is not None else (eps,))
        return self.finish(state, x)
