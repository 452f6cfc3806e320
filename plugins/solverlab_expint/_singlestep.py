"""Singlestep exponential integrators: DPM-Solver-2/3/fast (noise prediction) and
DPM-Solver++(2S) (data prediction).

A singlestep update of order ``k`` from ``s`` to ``t`` uses the output at ``s`` and at ``k - 1``
intermediate points ``lambda_s + r_j h``; :func:`singlestep_weights` gives its weights
(``integrator``). The intermediate points are placed two ways (option ``substeps``):

- ``"fixed-r"``: each grid interval is one step; the points sit at ``r1``, ``r2`` of it and the
  intermediate states are computed with lower-order updates (official DPM-Solver, ``k`` NFE
  per interval);
- ``"grid"``: the grid's own points are the intermediate points (diffusers'
  ``DPMSolverSinglestepScheduler``, official DPM-Solver-fast): an order-``k`` step spans ``k``
  grid intervals, 1 NFE per interval, and the state at each grid point inside it is the
  update of order ``j`` from the step's start over the first ``j`` intervals, so every loop
  step still advances one interval.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor

from solverlab import SolverState
from solverlab.errors import OptionError
from solverlab.validators import boolean, number, one_of

from .integrator import (
    ExpIntSolver,
    Nodes,
    Span,
    alpha_sigma,
    combine,
    floats,
    own,
    singlestep_orders,
    unit,
)

__all__ = [
    "DPMSolver2", "DPMSolver3", "DPMSolverFast", "DPMSolverPP2S", "DPMSolverPP3S", "Singlestep",
    "singlestep_weights",
]

F64 = torch.float64
_SOLVER_TYPES = ("dpmsolver", "taylor")
_SUBSTEPS = ("fixed-r", "grid")


def singlestep_weights(k: int, r: list[Tensor], sp: Span, solver_type: str) -> Tensor:
    """Weights ``(n, k)`` on ``(m_s, m_1, .., m_{k-1})`` of the order-``k`` singlestep update
    with intermediate points at ``r[j]`` (``(n,)``, units of ``h``) (Lu et al. 2022, Algorithms
    4-5 and official code):

    - ``k = 2``: ``dpmsolver`` ``phi_1 m_s + phi_1/(2 r1) (m_1 - m_s)``; ``taylor``
      ``phi_1 m_s + phi_2/r1 (m_1 - m_s)``;
    - ``k = 3``: ``dpmsolver`` ``phi_1 m_s + phi_2/r2 (m_2 - m_s)``; ``taylor``
      ``phi_1 m_s + phi_2 D1 + phi_3 D2`` with ``D1 ~ h m'``, ``D2 ~ h^2 m''`` from both
      points. With ``m_1`` taken at a first-order intermediate state (error ``O(h^2)``),
      either is third order only for ``r2 = 2/3``: the taylor form carries that error with
      the factor ``r2 phi_2 - 2 phi_3 = O(h)`` iff ``r2 = 2/3``.
    """
    phi = sp.phi(3)
    p1, p2, p3 = phi[:, 1:2], phi[:, 2:3], phi[:, 3:4]
    e = unit(sp.z.shape[0], k, sp.z)
    if k == 1:
        return p1 * e[0]
    r1 = r[0][:, None]
    if k == 2:
        d = (e[1] - e[0]) / r1
        return p1 * e[0] + (p1 / 2 if solver_type == "dpmsolver" else p2) * d
    r2 = r[1][:, None]
    if solver_type == "dpmsolver":
        return p1 * e[0] + p2 * (e[2] - e[0]) / r2
    d1_0, d1_1 = (e[1] - e[0]) / r1, (e[2] - e[0]) / r2
    d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
    d2 = 2 * (d1_1 - d1_0) / (r2 - r1)
    return p1 * e[0] + p2 * d1 + p3 * d2


def _starts(outer: tuple[int, ...]) -> list[tuple[int, int]]:
    """``(order, first interval)`` of each outer step."""
    out, start = [], 0
    for k in outer:
        out.append((k, start))
        start += k
    return out


@attrs.frozen
class _FixedCoef:
    """``times``: the grid, then every intermediate point; ``stages[i]``: ``(index into times,
    a, c)`` of each intermediate point of interval ``i``; ``final[i]``: ``(a, c)``; ``c`` on
    the outputs so far, oldest (``m_s``) first."""

    times: Tensor
    ab: tuple[tuple[float, float], ...]
    stages: tuple[tuple[tuple[int, float, tuple[float, ...]], ...], ...]
    final: tuple[tuple[float, tuple[float, ...]], ...]


@attrs.frozen
class _GridCoef:
    """``steps[i] = (a, c, first, last)``: the update from the current outer step's start to
    grid point ``i + 1``; ``first``/``last``: interval ``i`` opens/closes an outer step."""

    times: Tensor
    ab: tuple[tuple[float, float], ...]
    steps: tuple[tuple[float, tuple[float, ...], bool, bool], ...]


@attrs.frozen(kw_only=True)
class Singlestep(ExpIntSolver):
    """Base of the singlestep solvers (see the module docstring). Subclasses give the order
    (:meth:`_max_order`), ``solver_type``, the placement (:meth:`_substeps`) and ``r1``/``r2``."""

    # The step-ratio rule (``"auto"``) is the multistep solvers'; a singlestep method's final
    # order comes from its step allocation, ruled by the step-count threshold. Official
    # DPM-Solver applies no lower_order_final to its singlestep methods: no named rules.
    lower_order_final: bool = attrs.field(default=True, validator=boolean)
    lower_order_final_rules: ClassVar[Mapping[str, int | None]] = {}

    def _max_order(self) -> int:
        return self.order

    def _substeps(self) -> str:
        return getattr(self, "substeps", "fixed-r")

    def _rs(self, k: int) -> tuple[float, ...]:
        """Intermediate points of a fixed-r step of order ``k`` (``r1 = 1/2`` for a lowered
        order-2 step of an order-3 solver, as official DPM-Solver)."""
        if k == self._max_order():
            return (getattr(self, "r1", 0.5), getattr(self, "r2", 2 / 3))[: k - 1]
        return (0.5,)[: k - 1]

    def _fixed_orders(self, steps: int) -> tuple[int, ...]:
        p = self._max_order()
        orders = [min(p, steps - i) if self._lower(steps) else p for i in range(steps)]
        if self.final_step == "euler":
            orders[-1] = 1
        return tuple(orders)

    def expected_nfe(self, steps: int) -> int:
        n = steps if self._substeps() == "grid" else sum(self._fixed_orders(steps))
        return n + self._extra_nfe()

    def coefficients(self, schedule, grid: Tensor) -> _FixedCoef | _GridCoef:
        if self._substeps() == "grid":
            return self._grid_coef(Nodes.at(schedule, grid))
        return self._fixed_coef(schedule, Nodes.at(schedule, grid))

    def buffers(self, coef: _FixedCoef | _GridCoef) -> int:
        return 2 if isinstance(coef, _GridCoef) else 1

    def outputs(self, coef: _FixedCoef | _GridCoef) -> int:
        return self._max_order()  # the outputs of one (outer) step

    # -- fixed-r ------------------------------------------------------------------------
    def _fixed_coef(self, schedule, nodes: Nodes) -> _FixedCoef:
        pred, kind = self._prediction(), self.solver_type
        orders = self._fixed_orders(nodes.t.numel() - 1)
        stages: list = [()] * len(orders)
        final: list = [None] * len(orders)
        extra: list[Nodes] = []  # intermediate points, appended to the grid's times
        first = nodes.t.numel()
        for k in sorted(set(orders)):
            idx = torch.tensor([i for i, q in enumerate(orders) if q == k], dtype=torch.long)
            s, t = nodes[idx], nodes[idx + 1]
            h = t.lam - s.lam
            # Intermediate times t(lambda_s + r h); r recomputed from where they landed.
            mids = [Nodes.at(schedule, schedule.t_of_lambda(s.lam + r * h)) for r in self._rs(k)]
            rs = [(m.lam - s.lam) / h for m in mids]
            per_stage = []
            for j, m in enumerate(mids):
                sp = Span.of(pred, s, m)
                # The (j+1)-th point by the order-(j+1) update; official DPM-Solver-3 computes
                # the second point with the Taylor form whatever the solver_type.
                w = singlestep_weights(j + 1, [r / rs[j] for r in rs[:j]], sp, "taylor")
                pos = range(first, first + len(idx))
                first += len(idx)
                extra.append(m)
                per_stage.append((pos, floats(sp.A), floats(sp.coefficients(w))))
            sp = Span.of(pred, s, t)
            a, c = floats(sp.A), floats(sp.coefficients(singlestep_weights(k, rs, sp, kind)))
            for n, i in enumerate(idx.tolist()):
                stages[i] = tuple((pos[n], sa[n], sc[n]) for pos, sa, sc in per_stage)
                final[i] = (a[n], c[n])
        every = Nodes(*(torch.cat([getattr(v, f) for v in (nodes, *extra)])
                        for f in ("t", "log_alpha", "log_sigma")))
        return _FixedCoef(times=every.t, ab=alpha_sigma(every), stages=tuple(stages),
                          final=tuple(final))

    # -- grid ---------------------------------------------------------------------------
    def _grid_coef(self, nodes: Nodes) -> _GridCoef:
        pred, kind = self._prediction(), self.solver_type
        lam, steps = nodes.lam, nodes.t.numel() - 1
        outer = singlestep_orders(steps, self._max_order(), self._lower(steps), self.final_step)
        # Interval i: start g of its outer step (order k) and its position j = 1..k in it.
        g = [start for k, start in _starts(outer) for _ in range(k)]
        pos = [j for k, _ in _starts(outer) for j in range(1, k + 1)]
        last = [j == k for k, _ in _starts(outer) for j in range(1, k + 1)]
        a: list[float] = [0.0] * steps
        c: list[tuple[float, ...]] = [()] * steps
        for j in sorted(set(pos)):
            idx = [i for i in range(steps) if pos[i] == j]
            gs = torch.tensor([g[i] for i in idx], dtype=torch.long)
            s, t = nodes[gs], nodes[gs + j]
            rs = [(lam[gs + q] - s.lam) / (t.lam - s.lam) for q in range(1, j)]
            sp = Span.of(pred, s, t)
            w = singlestep_weights(j, rs, sp, kind)
            for i, ai, ci in zip(idx, floats(sp.A), floats(sp.coefficients(w))):
                a[i], c[i] = ai, ci
        return _GridCoef(times=nodes.t, ab=alpha_sigma(nodes),
                         steps=tuple((a[i], c[i], pos[i] == 1, last[i]) for i in range(steps)))

    # -- the step -----------------------------------------------------------------------
    def step(self, state: SolverState) -> SolverState:
        plan, i, x = state.cache, state.index, state.x
        k = plan.coef
        m = own(plan.model(x, plan.times[i], k.ab[i]), x)
        if isinstance(k, _GridCoef):
            a, c, first, last = k.steps[i]
            if first:  # x opens an outer step: keep it, write the next state elsewhere
                start, ms = x, (m,)
                out = x if last else plan.buffers[plan.buffers[0] is x]
            else:  # x (an intermediate state) is no longer needed once m is known
                start, ms, out = state.history[0], (*state.history[1:], m), x
            out = combine(out, a, start, c, ms)
            return self.finish(state, out, history=() if last else (start, *ms))
        ms, u = [m], plan.buffers[0]
        for j, a, c in k.stages[i]:
            u = combine(u, a, x, c, ms)
            ms.append(own(plan.model(u, plan.times[j], k.ab[j]), u, x))
        a, c = k.final[i]
        return self.finish(state, combine(x, a, x, c, ms))


_r = number(gt=0.0, le=1.0)


def _lof_default(inst: Any) -> bool:
    return inst.substeps == "grid"


@attrs.frozen(kw_only=True)
class DPMSolver2(Singlestep):
    """DPM-Solver-2 (Lu et al. 2022, Algorithm 4), singlestep, noise prediction. Order 2,
    2 NFE per step (``substeps="fixed-r"``) or 1 NFE per grid interval (``"grid"``).

    ``u = (alpha_{s1}/alpha_s) x_s - sigma_{s1} expm1(r1 h) eps_s`` at ``lambda_s1 = lambda_s +
    r1 h``; ``x_t = (alpha_t/alpha_s) x_s - sigma_t expm1(h) eps_s - sigma_t/(2 r1) expm1(h)
    (eps(u, s1) - eps_s)``.

    Options:

    - ``solver_type``: ``"dpmsolver"`` (default, above; diffusers ``midpoint``) or ``"taylor"``
      (``(expm1(h)/h - 1)/r1`` in place of ``expm1(h)/(2 r1)``; diffusers ``heun``);
    - ``r1`` in ``(0, 1]`` (default 1/2; fixed-r only);
    - ``substeps``: ``"fixed-r"`` (default) or ``"grid"`` (module docstring; intervals in
      pairs, a last single one is DDIM);
    - ``lower_order_final`` (default ``True`` with ``"grid"``, ``False`` with ``"fixed-r"``
      as official ``singlestep_fixed``; with ``fixed-r`` the last interval is then DDIM),
      ``lower_order_final_threshold``, ``final_step``.
    """

    name: ClassVar[str] = "dpm-solver-2"
    order: ClassVar[int] = 2
    solver_type: str = attrs.field(default="dpmsolver", validator=one_of(*_SOLVER_TYPES))
    r1: float = attrs.field(default=0.5, validator=_r)
    substeps: str = attrs.field(default="fixed-r", validator=one_of(*_SUBSTEPS))
    lower_order_final: bool = attrs.field(
        default=attrs.Factory(_lof_default, takes_self=True), validator=boolean)


@attrs.frozen(kw_only=True)
class DPMSolver3(Singlestep):
    """DPM-Solver-3 (Lu et al. 2022, Algorithm 5), singlestep, noise prediction. Order 3,
    3 NFE per step (``substeps="fixed-r"``) or 1 NFE per grid interval (``"grid"``).

    Points ``lambda_s + r1 h``, ``lambda_s + r2 h``: ``u1`` by DPM-Solver-1, ``u2 =
    (alpha_{s2}/alpha_s) x_s - sigma_{s2} expm1(r2 h) eps_s - sigma_{s2} (r2/r1) (expm1(r2
    h)/(r2 h) - 1) D1``, ``x_t = (alpha_t/alpha_s) x_s - sigma_t expm1(h) eps_s - (sigma_t/r2)
    (expm1(h)/h - 1) D2`` with ``D_j = eps(u_j) - eps_s``.

    Options:

    - ``solver_type``: ``"dpmsolver"`` (default, above) or ``"taylor"`` (both differences:
      ``phi_2 D1 + phi_3 D2`` with ``D1 ~ h eps'``, ``D2 ~ h^2 eps''``; diffusers ``heun``);
      since ``u1`` is only first-order accurate, both are third order only for ``r2 = 2/3``
      (:func:`singlestep_weights`); with another ``r2`` the declared convergence order is 2;
    - ``r1 < r2`` in ``(0, 1]`` (defaults 1/3, 2/3; fixed-r only);
    - ``substeps``: ``"fixed-r"`` (default) or ``"grid"``: diffusers
      ``DPMSolverSinglestepScheduler(solver_order=3)``, orders ``[1, 2, 3]`` per group of
      intervals, the ``j``-th interval of a group by the order-``j`` update of
      ``solver_type`` (diffusers ``midpoint`` = ``"dpmsolver"``); third order on smooth grids
      (``r2 -> 2/3``);
    - ``lower_order_final`` (default ``True`` with ``"grid"``: the last group shrinks as in
      DPM-Solver-fast / diffusers; ``False`` with ``"fixed-r"``, official
      ``singlestep_fixed``; with ``"fixed-r"`` the last intervals then get orders 2, 1),
      ``lower_order_final_threshold``, ``final_step``.

    Pitfalls: diffusers with ``3n - 1`` steps and ``final_sigmas_type="zero"`` divided by
    ``log(0)`` (diffusers#9007); here the grid ends at ``t_min > 0`` and a lowered last group
    is built from the step count. Lowered order-2 fixed-r steps use ``r1 = 1/2``.
    """

    name: ClassVar[str] = "dpm-solver-3"
    order: ClassVar[int] = 3
    solver_type: str = attrs.field(default="dpmsolver", validator=one_of(*_SOLVER_TYPES))
    r1: float = attrs.field(default=1 / 3, validator=_r)
    r2: float = attrs.field(default=2 / 3, validator=_r)
    substeps: str = attrs.field(default="fixed-r", validator=one_of(*_SUBSTEPS))
    lower_order_final: bool = attrs.field(
        default=attrs.Factory(_lof_default, takes_self=True), validator=boolean)

    def __attrs_post_init__(self) -> None:
        if not self.r1 < self.r2:
            raise OptionError(
                f"{type(self).__name__} ({self.name!r}): options r1={self.r1!r}, "
                f"r2={self.r2!r} must satisfy 0 < r1 < r2 <= 1"
            )

    def _nominal_order(self) -> int:
        # grid: r2 -> 2/3 on a smooth grid (three near-equal intervals).
        third = self.substeps == "grid" or abs(self.r2 - 2 / 3) < 1e-12
        return 3 if third else 2


@attrs.frozen(kw_only=True)
class DPMSolverFast(Singlestep):
    """DPM-Solver-fast (Lu et al. 2022, §3.4; official ``method="singlestep"``), noise
    prediction. Order ``order`` (3 by default), exactly 1 NFE per grid interval.

    The ``steps`` intervals are spent on outer steps of order <= ``order`` whose intermediate
    points are the grid's own points (``substeps="grid"`` of :class:`DPMSolver3`); the
    allocation (official code): order 3, ``K = steps//3 + 1``: ``steps % 3 == 0`` -> ``[3]*(K-2)
    + [2, 1]``, ``1`` -> ``[3]*(K-1) + [1]``, ``2`` -> ``[3]*(K-1) + [2]``; order 2: 2's and a
    final 1 if odd. Any budget ``steps >= 1`` works (1 step is DDIM).

    Options:

    - ``order`` in 1..3 (default 3);
    - ``solver_type`` (``"dpmsolver"`` | ``"taylor"``, as :class:`DPMSolver3`);
    - ``lower_order_final`` (default ``True``) / ``lower_order_final_threshold`` (default 15):
      the allocation above is used when lowering is active; otherwise (``steps >= 15`` by
      default) no first-order outer step is used (``[3]*(steps//3 - 1) + [2, 2]`` for
      ``steps % 3 == 1``), because a single first-order step caps the global order at 2;
      ``lower_order_final_threshold=None`` gives the official allocation at every budget;
    - ``final_step``.

    Pitfalls: official DPM-Solver-fast places its outer steps uniformly (in ``lambda`` for
    ``skip_type="logSNR"``) and subdivides them, so its intermediate points are not a uniform
    grid of ``steps + 1`` points; here the grid given is the set of evaluation points.
    """

    name: ClassVar[str] = "dpm-solver-fast"
    order: int = attrs.field(default=3, validator=number(integer=True, ge=1, le=3))
    solver_type: str = attrs.field(default="dpmsolver", validator=one_of(*_SOLVER_TYPES))

    def _substeps(self) -> str:
        return "grid"


@attrs.frozen(kw_only=True)
class DPMSolverPP2S(Singlestep):
    """DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1), singlestep, data prediction. Order 2,
    2 NFE per step.

    ``u = (sigma_{s1}/sigma_s) x_s - alpha_{s1} expm1(-r1 h) x0_s``; ``D = (1 - 1/(2 r1)) x0_s
    + 1/(2 r1) x0(u, s1)``; ``x_t = (sigma_t/sigma_s) x_s - alpha_t expm1(-h) D``.

    Options:

    - ``solver_type``: ``"dpmsolver"`` (default, above) or ``"taylor"`` (``h phi_2(-h)/r1``
      on ``x0(u) - x0_s``);
    - ``r1`` in ``(0, 1]`` (default 1/2; fixed-r only);
    - ``substeps``: ``"fixed-r"`` (default) or ``"grid"`` (intervals in pairs, the grid's
      points as intermediate points: diffusers' ``DPMSolverSinglestepScheduler(
      solver_order=2)`` with its default ``algorithm_type="dpmsolver++"``);
    - ``lower_order_final`` (default ``False``: official ``singlestep_fixed``; ``True``
      makes the last interval DPM-Solver++(1)), ``lower_order_final_threshold``,
      ``final_step``.
    """

    name: ClassVar[str] = "dpmpp-2s"
    order: ClassVar[int] = 2
    prediction: ClassVar[str] = "data"
    solver_type: str = attrs.field(default="dpmsolver", validator=one_of(*_SOLVER_TYPES))
    r1: float = attrs.field(default=0.5, validator=_r)
    substeps: str = attrs.field(default="fixed-r", validator=one_of(*_SUBSTEPS))
    lower_order_final: bool = attrs.field(default=False, validator=boolean)


@attrs.frozen(kw_only=True)
class DPMSolverPP3S(DPMSolver3):
    """DPM-Solver++(3S): the third-order singlestep update of DPM-Solver-3 on the data
    prediction (official code, ``algorithm_type="dpmsolver++"``). Order 3, 3 NFE per step
    (``substeps="fixed-r"``) or 1 NFE per grid interval (``"grid"``: diffusers'
    ``DPMSolverSinglestepScheduler(solver_order=3)`` with its default
    ``algorithm_type="dpmsolver++"``). Options as :class:`DPMSolver3`."""

    name: ClassVar[str] = "dpmpp-3s"
    prediction: ClassVar[str] = "data"

    def _nominal_order(self) -> int:
        third = (self.solver_type == "taylor" or self.substeps == "grid"
                 or abs(self.r2 - 2 / 3) < 1e-12)
        return 3 if third else 2
