"""Linear multistep exponential integrators: one model evaluation per step, the history of
model outputs kept in the state.

:class:`Multistep` holds the loop-facing part once (the order schedule with warm-up and
``lower_order_final``, the per-grid coefficient table, the in-place update); a method is its
``weights``: the dimensionless weights ``w`` of ``x_t = A x_s - c_t z sum_j w_j m_{i-j}``
(see ``integrator``) for steps of order ``p``, given the positions ``u_j = (lambda_{i-j} -
lambda_i) / h_i`` of the outputs it uses (``u_0 = 0``, then negative).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar

import attrs
import torch
from torch import Tensor

from solverlab import SolverState
from solverlab.validators import boolean, number, one_of

from ._singlestep import singlestep_weights
from .integrator import (
    ExpIntSolver,
    Nodes,
    Span,
    alpha_sigma,
    combine,
    floats,
    lagrange_weights,
    multistep_orders,
    own,
    unit,
)
from .phi_functions import phis

__all__ = [
    "DEIS", "WARMUPS", "DPMSolver2M", "DPMSolver3M", "DPMSolverPP2M", "DPMSolverPP3M",
    "Multistep", "MultistepCoef",
    "history_nodes", "order_table",
]

F64 = torch.float64
WARMUPS = ("corrected", "lower-order")


@attrs.frozen
class MultistepCoef:
    """Per-grid data of a multistep solve: ``orders[i]``; ``a[i]`` and ``c[i]`` (newest output
    first, ``orders[i]`` of them) of step ``i``; how many outputs to ``keep``; ``warm``: the
    corrected warm-up's ``(a, c)`` on ``(m_0, m_1)`` for interval 0, or ``None``."""

    times: Tensor
    ab: tuple[tuple[float, float], ...]
    orders: tuple[int, ...]
    a: tuple[float, ...]
    c: tuple[tuple[float, ...], ...]
    keep: int
    warm: tuple[float, tuple[float, ...]] | None = None


def history_nodes(lam: Tensor, idx: Tensor, p: int) -> Tensor:
    """``u[:, j] = (lambda[i-j] - lambda[i]) / (lambda[i+1] - lambda[i])`` for the steps
    ``i`` in ``idx``, ``j < p``: the history's positions in units of the current step."""
    h = (lam[idx + 1] - lam[idx])[:, None]
    back = torch.stack([lam[idx - j] for j in range(p)], dim=1)
    return (back - lam[idx][:, None]) / h


def order_table(orders: tuple[int, ...], nodes: Nodes, prediction: str,
                weights: Callable[[int, Tensor, Span], Tensor]
                ) -> tuple[tuple[float, ...], tuple[tuple[float, ...], ...]]:
    """``a[i]``, ``c[i]`` of every step from ``weights(p, u, span)``, evaluated once per
    distinct order ``p`` on all the steps of that order (vectorised)."""
    steps, lam = len(orders), nodes.lam
    a: list[float] = [0.0] * steps
    c: list[tuple[float, ...]] = [()] * steps
    for p in sorted(set(orders)):
        idx = torch.tensor([i for i, q in enumerate(orders) if q == p], dtype=torch.long)
        sp = Span.of(prediction, nodes[idx], nodes[idx + 1], kmax=p + 1)
        w = weights(p, history_nodes(lam, idx, p), sp)
        for i, ai, ci in zip(idx.tolist(), floats(sp.A), floats(sp.coefficients(w))):
            a[i], c[i] = ai, ci
    return tuple(a), tuple(c)


@attrs.frozen(kw_only=True)
class Multistep(ExpIntSolver):
    """Base of the multistep solvers: one NFE per step (``steps`` in all, +1 for
    ``final_step="denoise_to_zero"``); step ``i`` has order ``min(order, i + 1)`` (warm-up)
    and, with ``lower_order_final=True`` active, ``min(., steps - i)``; with ``"auto"`` (the
    default) a step much longer than the one before is first order
    (:func:`~solverlab_expint.integrator.ratio_orders`).

    ``warmup`` (order >= 3 only): the warm-up's first step is DDIM, whose local error
    ``O(h^2)`` makes any multistep method globally second order however small the constant
    (it is ``~ m'(lambda_T)``, tiny at high noise, so it shows only below ~1e-8).
    ``"corrected"`` (default) recomputes ``x_1`` at the start of the second step from ``x_0``
    with ``m_0`` and ``m_1 = m(x~_1)`` by the second-order update ``phi_1 m_0 + phi_2 (m_1 -
    m_0)`` (UniC-1; no extra NFE, ``m_1`` is kept): the declared order holds asymptotically.
    Like the lowered final steps it is a choice for few steps versus many: it is applied only
    for ``steps >= lower_order_final_threshold`` (or with ``lower_order_final=False``),
    since a second-order noise-prediction update over a few huge steps is unstable.
    ``"lower-order"`` is the official DPM-Solver / DEIS / diffusers warm-up.

    ``denoise_counts_as_step`` (default ``False``): with ``final_step="denoise_to_zero"``,
    ``lower_order_final`` (and its threshold) count the denoising as one more step, as
    diffusers' ``final_sigmas_type="zero"`` does (its last step, to ``sigma = 0``, is the
    denoising): the step before it is then lowered like a second-last step.
    """

    warmup: str = attrs.field(default="corrected", validator=one_of(*WARMUPS))
    denoise_counts_as_step: bool = attrs.field(default=False, validator=boolean)

    def _max_order(self) -> int:
        return self.order

    def weights(self, p: int, u: Tensor, sp: Span) -> Tensor:
        """Weights ``(n, p)`` on the outputs at ``u[:, 0..p-1]`` (newest first)."""
        raise NotImplementedError

    def expected_nfe(self, steps: int) -> int:
        return steps + self._extra_nfe()

    def _orders(self, steps: int, lam: Tensor | None = None) -> tuple[int, ...]:
        n = steps + int(self.denoise_counts_as_step and self.final_step == "denoise_to_zero")
        if self.lower_order_final == "auto":
            lower: bool | str = "auto+final" if self._few(n) else "auto"
        else:
            lower = self._lower(n)
        return multistep_orders(n, self._max_order(), lower, self.final_step, lam)[:steps]

    def _warm(self, steps: int) -> bool:
        return (self.warmup == "corrected" and self._max_order() >= 3 and steps >= 2
                and not self._few(steps))

    def _warm_coef(self, nodes: Nodes) -> tuple[float, tuple[float, ...]]:
        sp = Span.of(self._prediction(), nodes[:1], nodes[1:2])
        w = singlestep_weights(2, [torch.ones(1, dtype=F64)], sp, "taylor")
        return floats(sp.A)[0], floats(sp.coefficients(w))[0]

    def coefficients(self, schedule, grid: Tensor) -> MultistepCoef:
        nodes = Nodes.at(schedule, grid)
        orders = self._orders(grid.numel() - 1, nodes.lam)
        a, c = order_table(orders, nodes, self._prediction(), self.weights)
        warm = self._warm_coef(nodes) if self._warm(len(orders)) else None
        return MultistepCoef(times=grid, ab=alpha_sigma(nodes), orders=orders, a=a, c=c,
                             keep=max(orders), warm=warm)

    def buffers(self, coef: MultistepCoef) -> int:
        return 0 if coef.warm is None else 1

    def outputs(self, coef: MultistepCoef) -> int:
        return coef.keep + 1  # the history and the newest

    def _history(self) -> tuple:
        # (x_0 while the corrected warm-up needs it, else None; then the outputs, oldest first)
        return (None,)

    def step(self, state: SolverState) -> SolverState:
        plan, i, x = state.cache, state.index, state.x
        k = plan.coef
        base, *ms = state.history
        m = own(plan.model(x, plan.times[i], k.ab[i]), x)
        if base is not None:  # corrected warm-up: x_1 from x_0, m_0 and m_1
            x = combine(x, k.warm[0], base, k.warm[1], (ms[-1], m))
        history = (*ms, m)[-k.keep:]
        out, base = (plan.buffers[0], x) if k.warm is not None and i == 0 else (x, None)
        out = combine(out, k.a[i], x, k.c[i], history[::-1])
        return self.finish(state, out, history=(base, *history))


_SOLVER_TYPES = ("dpmsolver", "taylor")


def _dpmpp2m(solver_type: str, u: Tensor, phi: Tensor) -> Tensor:
    """Second-order multistep weights on ``(m_i, m_{i-1})``, ``r = h_{i-1}/h_i``, in either
    prediction (the ``z``-form makes them the same): DPM-Solver++(2M) (Lu et al. 2022b,
    Algorithm 2) and multistep DPM-Solver-2 (official ``multistep_dpm_solver_second_update``)."""
    m0, m1 = unit(u.shape[0], 2, u)
    r = -u[:, 1:2]
    if solver_type == "dpmsolver":
        return phi[:, 1:2] * ((1 + 1 / (2 * r)) * m0 - 1 / (2 * r) * m1)
    return phi[:, 1:2] * m0 + phi[:, 2:3] * (m0 - m1) / r


def _three_m(solver_type: str, official_d2: bool, p: int, u: Tensor, sp: Span) -> Tensor:
    """Weights of a step of order ``p`` of the third-order multistep method (DPM-Solver++(3M)
    and multistep DPM-Solver-3, official ``multistep_dpm_solver_third_update``): ``D1`` (``= h
    m'``) and ``D2`` (``= h^2 m''/2``) from divided differences, ``phi_1 m + phi_2 D1 + k phi_3
    D2`` with ``k = 2`` (``k = 1`` with ``official_d2``: second order, docs/mathematics.md)."""
    phi = sp.phi(3)
    if p == 1:
        return phi[:, 1:2]
    if p == 2:
        return _dpmpp2m(solver_type, u, phi)
    m0, m1, m2 = unit(u.shape[0], 3, u)
    r0, r1 = -u[:, 1:2], u[:, 1:2] - u[:, 2:3]
    d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    k = 1.0 if official_d2 else 2.0
    return phi[:, 1:2] * m0 + phi[:, 2:3] * d1 + k * phi[:, 3:4] * d2


@attrs.frozen(kw_only=True)
class DPMSolverPP2M(Multistep):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2), data prediction, multistep. Order 2,
    1 NFE per step.

    ``D = (1 + 1/(2r)) x0_{i-1} - 1/(2r) x0_{i-2}``, ``r = h_{i-1}/h_i``,
    ``x_i = (sigma_i/sigma_{i-1}) x_{i-1} - alpha_i expm1(-h_i) D``; the first
    step is DPM-Solver++(1) (= DDIM).

    Options:

    - ``solver_type``: ``"dpmsolver"`` (default; the formula above, diffusers ``midpoint``) or
      ``"taylor"`` (``x0_{i-1}`` plus ``h phi_2(-h) (x0_{i-1} - x0_{i-2}) / r`` from the Taylor
      expansion, diffusers ``heun``);
    - ``lower_order_final`` (default ``"auto"``, :class:`Multistep`) /
      ``lower_order_final_threshold`` (with ``True``: last step first order when ``steps <
      threshold``; diffusers uses 15), ``final_step``; ``warmup`` has no effect (order 2).

    Pitfalls: diffusers' ``final_sigmas_type="zero"`` forces a first-order last step to
    ``sigma = 0``; compare against it with ``final_step="euler"`` or ``sigma_min``.
    """

    name: ClassVar[str] = "dpmpp-2m"
    order: ClassVar[int] = 2
    prediction: ClassVar[str] = "data"
    solver_type: str = attrs.field(default="dpmsolver", validator=one_of(*_SOLVER_TYPES))

    def weights(self, p: int, u: Tensor, sp: Span) -> Tensor:
        phi = sp.phi(2)
        return phi[:, 1:2] if p == 1 else _dpmpp2m(self.solver_type, u, phi)


@attrs.frozen(kw_only=True)
class DPMSolverPP3M(Multistep):
    """DPM-Solver++(3M) (Lu et al. 2022b; the official code's third-order multistep update),
    data prediction. Order 3, 1 NFE per step.

    With ``r0 = h_{i-1}/h``, ``r1 = h_{i-2}/h``, ``D1_0 = (x0_{i-1} - x0_{i-2})/r0``,
    ``D1_1 = (x0_{i-2} - x0_{i-3})/r1``, ``D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1)`` (= ``h x0'``)
    and ``D2 = (D1_0 - D1_1)/(r0+r1)`` (= ``h^2 x0''/2``)::

        x_i = (sigma_i/sigma_{i-1}) x_{i-1} + alpha_i h [phi_1 x0_{i-1} + phi_2 D1 + 2 phi_3 D2]

    (``phi_k = phi_k(-h)``; docs/mathematics.md#findings). Warm-up: DPM-Solver++(1), then (2M).

    Options:

    - ``official_d2`` (default ``False``): ``True`` drops the ``2``, as the official
      DPM-Solver code, diffusers' ``DPMSolverMultistepScheduler`` and k-diffusion's
      ``dpmpp_3m_sde`` do (``- alpha_t phi_3 D2`` with ``phi_3 = phi_2/h - 1/2``). Their
      ``D2`` is half the second-derivative term, so the local error keeps an
      ``alpha h^3 x0''/12`` term: that method is globally **second** order (the declared
      convergence order then is 2). Use it to reproduce those implementations.
    - ``solver_type`` (``"dpmsolver"`` | ``"taylor"``): the form of the order-2 warm-up and
      lowered steps, as in :class:`DPMSolverPP2M`;
    - ``warmup`` (``"corrected"`` | ``"lower-order"``, :class:`Multistep`);
    - ``lower_order_final`` / ``lower_order_final_threshold``, ``final_step``.
    """

    name: ClassVar[str] = "dpmpp-3m"
    order: ClassVar[int] = 3
    prediction: ClassVar[str] = "data"
    solver_type: str = attrs.field(default="dpmsolver", validator=one_of(*_SOLVER_TYPES))
    official_d2: bool = attrs.field(default=False, validator=boolean)

    def _nominal_order(self) -> int:
        return 2 if self.official_d2 else 3

    def weights(self, p: int, u: Tensor, sp: Span) -> Tensor:
        return _three_m(self.solver_type, self.official_d2, p, u, sp)


@attrs.frozen(kw_only=True)
class DPMSolver2M(DPMSolverPP2M):
    """Multistep DPM-Solver-2 in noise prediction (Lu et al. 2022b, sec. 3.3 and Appendix;
    the official code's ``multistep_dpm_solver_second_update`` with ``model_type="noise"``,
    diffusers' ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver", solver_order=2)``).
    Order 2, 1 NFE per step.

    ``D = (1 + 1/(2r)) eps_{i-1} - 1/(2r) eps_{i-2}``, ``r = h_{i-1}/h_i``,
    ``x_i = (alpha_i/alpha_{i-1}) x_{i-1} - sigma_i expm1(h_i) D``; the first step is DDIM.
    The same weights as :class:`DPMSolverPP2M` on the noise prediction instead of the data
    prediction.

    Options: ``solver_type`` (``"dpmsolver"`` = diffusers ``midpoint``, ``"taylor"`` =
    ``heun``: ``eps_{i-1}`` plus ``h phi_2(h) (eps_{i-1} - eps_{i-2})/r``), ``lower_order_final``
    (default ``"auto"``; ``"official"``: last step first order below 10 steps, as
    ``DPM_Solver.sample``; ``"diffusers"``: below 15), ``lower_order_final_threshold``,
    ``final_step`` (diffusers refuses ``final_sigmas_type="zero"`` with ``"dpmsolver"``: its
    last step goes to ``sigma_min``).
    """

    name: ClassVar[str] = "dpm-solver-2m"
    prediction: ClassVar[str] = "noise"


@attrs.frozen(kw_only=True)
class DPMSolver3M(DPMSolverPP3M):
    """Multistep DPM-Solver-3 in noise prediction (Lu et al. 2022b; the official code's
    ``multistep_dpm_solver_third_update`` with ``model_type="noise"``, diffusers'
    ``algorithm_type="dpmsolver", solver_order=3``). Order 3, 1 NFE per step.

    With ``r0 = h_{i-1}/h``, ``r1 = h_{i-2}/h``, ``D1``, ``D2`` the divided differences of
    :class:`DPMSolverPP3M` on ``eps``::

        x_i = (alpha_i/alpha_{i-1}) x_{i-1} - sigma_i h [phi_1 eps_{i-1} + phi_2 D1 + 2 phi_3 D2]

    (``phi_k = phi_k(h)``). Warm-up: DDIM, then :class:`DPMSolver2M`.

    Options: ``official_d2`` (default ``False``; ``True`` drops the ``2`` as the official code
    and diffusers do, which makes the method globally second order, as for
    :class:`DPMSolverPP3M`), ``solver_type``, ``warmup``, ``lower_order_final`` (``"official"``:
    the official rule, below 10 steps; ``"diffusers"``: below 15),
    ``lower_order_final_threshold``, ``final_step``. The official code in full is
    ``official_d2=True, warmup="lower-order", lower_order_final="official"``.
    """

    name: ClassVar[str] = "dpm-solver-3m"
    prediction: ClassVar[str] = "noise"


@attrs.frozen(kw_only=True)
class DEIS(Multistep):
    """DEIS, tAB form (Zhang & Chen 2023, eq. 15): exponential Adams-Bashforth on the noise
    prediction. Order ``order`` (1..3), 1 NFE per step.

    ``x_t = (alpha_t/alpha_s) x_s - alpha_t int_{lambda_s}^{lambda_t} e^{-lambda} P(lambda)
    dlambda`` with ``P`` the polynomial through the last ``order`` outputs ``eps``; the integrals
    of its Lagrange basis are exact (moments ``m! phi_{m+1}(h)``, no quadrature). Warm-up and
    lowered steps use fewer points; ``order = 1`` is DDIM. With ``"log-rho"`` it is the same
    method as UniPC's predictor UniP-``order`` in noise prediction with the order conditions
    solved exactly (a quadrature on ``order`` nodes exact for degree ``order - 1`` is unique).

    Options:

    - ``order`` in 1..3 (default 2, as diffusers' ``solver_order``; with 3 the local slopes
      on the reference problems stay above 3 down to small errors before settling to 3,
      ``bench/orders.md``);
    - ``interpolation``: ``"log-rho"`` (default; ``P`` a polynomial in ``lambda = -log rho``,
      ``rho = sigma/alpha``: diffusers' ``DEISMultistepScheduler`` with ``solver_type="logrho"``)
      or ``"rho"`` (a polynomial in ``rho``, integrated exactly against ``d rho``: DEIS's
      rhoAB);
    - ``warmup`` (order 3: ``"corrected"`` | ``"lower-order"`` as diffusers; :class:`Multistep`);
    - ``lower_order_final`` (default ``"auto"``) / ``lower_order_final_threshold`` (diffusers:
      ``True`` and 15), ``final_step``.

    Pitfalls: diffusers evaluates the same integrals as differences of antiderivatives
    ``t (log t - ...)`` at ``rho`` values in float32, which cancels for small steps; here they
    come from phi-functions in float64. DEIS's original tAB interpolates in ``t``, which has no
    closed-form integral; it is not offered.
    """

    name: ClassVar[str] = "deis"
    # The official DEIS code has no lower_order_final; diffusers' DEISMultistepScheduler
    # lowers below 15 steps.
    lower_order_final_rules: ClassVar[Mapping[str, int | None]] = {"diffusers": 15}
    order: int = attrs.field(default=2, validator=number(integer=True, ge=1, le=3))
    interpolation: str = attrs.field(default="log-rho", validator=one_of("log-rho", "rho"))

    def weights(self, p: int, u: Tensor, sp: Span) -> Tensor:
        if self.interpolation == "log-rho":
            return lagrange_weights(u, sp.phi(p))
        # Nodes in units of rho_t - rho_s, with rho = e^{-lambda}; and
        # alpha_t (rho_t - rho_s) = -sigma_t expm1(h) = -c_t z phi_1(z).
        v = torch.expm1(-sp.h[:, None] * u) / torch.expm1(-sp.h)[:, None]
        return sp.phi(1)[:, 1:2] * lagrange_weights(v, phis(torch.zeros_like(sp.z), p))
