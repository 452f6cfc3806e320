"""Explicit Runge-Kutta methods on the probability-flow ODE in a variable (option
``variable``, :class:`solverlab.PFODE`).

- ``"sigma"`` (default): EDM's noise level ``s~ = sigma/alpha`` on ``y = x/alpha``, where
  ``dy/ds~ = eps`` (Karras et al. 2022, eq. 4; Song et al. 2021a, eq. 14). The ODE is the same
  for every schedule, so the methods keep their order on ``vp-discrete`` too. ``euler`` is
  DDIM exactly, and ``euler``/``heun`` are k-diffusion's ``sample_euler``/``sample_heun``
  (``s_churn = 0``; Karras et al. 2022, Alg. 1) on the grid's ``s~``, without k-diffusion's
  final Euler step to ``s~ = 0``.
- ``"lambda"``, ``"log_sigma"``: the half log-SNR on ``x/alpha``, or its negative on ``x``.
- ``"t"``: the schedule's time on ``x`` (``dx/dt = dlog_alpha/dt x - sigma dlambda/dt eps``).
  Generic, not exponential integrators: on VP schedules ``euler`` is then not DDIM, and on
  ``vp-discrete`` (``log alpha`` piecewise linear in ``t``) the coefficients have kinks at the
  table nodes and the methods fall towards order 1 (:attr:`RungeKutta.needs_smooth_schedule`).

Stage times are placed in the variable (``v + c h``) and mapped back to ``t``; stages at the
step's ends use the grid times themselves.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

from solverlab import PFODE, Solver, SolverState
from solverlab.ode import VARIABLES
from solverlab.validators import one_of

from ._tableau import ButcherTableau

__all__ = ["EULER_TABLEAU", "HEUN_TABLEAU", "RK4", "RK4_TABLEAU", "Euler", "Heun", "RungeKutta"]

EULER_TABLEAU = ButcherTableau(a=[[0.0]], b=[1.0], c=[0.0])

HEUN_TABLEAU = ButcherTableau(a=[[0.0, 0.0], [1.0, 0.0]], b=[0.5, 0.5], c=[0.0, 1.0])

RK4_TABLEAU = ButcherTableau(
    a=[[0.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]],
    b=[1 / 6, 1 / 3, 1 / 3, 1 / 6],
    c=[0.0, 0.5, 0.5, 1.0],
)


@attrs.frozen(kw_only=True)
class RungeKutta(Solver):
    """An explicit Runge-Kutta method given by its ``tableau`` (a class constant); ``s`` stages,
    ``s`` NFE per step, applied to the probability-flow ODE in option ``variable``
    (``"sigma"``, default; ``"lambda"``, ``"log_sigma"`` or ``"t"``; module docstring).
    Subclasses set ``name``, ``order`` and ``tableau``.

    Coefficients ``h a[i][j]``, ``h b[i]`` and the stage variables ``v + c[i] h`` are formed in
    float64 (Python floats) and meet the state in its own dtype.
    """

    tableau: ClassVar[ButcherTableau]
    variable: str = attrs.field(default="sigma", validator=one_of(*VARIABLES))

    @property
    def needs_smooth_schedule(self) -> bool:
        return self.variable == "t"

    def expected_nfe(self, steps: int) -> int:
        return self.tableau.stages * steps

    def init(self, denoiser, x, grid) -> SolverState:
        ode = PFODE(schedule=denoiser.schedule, variable=self.variable)
        return SolverState(denoiser=denoiser, grid=grid, x=x, cache=(ode, ode.v_of_t(grid)))

    def step(self, state: SolverState) -> SolverState:
        tab, den = self.tableau, state.denoiser
        ode, vs = state.cache
        t, t_next = state.t, state.t_next
        v = float(vs[state.index])
        h = float(vs[state.index + 1]) - v  # < 0 from noise to data, except in lambda
        y = ode.to_y(state.x, t)
        k = []
        for i in range(tab.stages):
            yi = y
            for j in range(i):
                if tab.a[i][j] != 0.0:
                    yi = yi + (h * tab.a[i][j]) * k[j]
            # Stages at the step's ends use the grid times themselves, not a round trip through
            # the variable (which may land just outside the schedule's range).
            ti = t if tab.c[i] == 0.0 else t_next if tab.c[i] == 1.0 else ode.t_of_v(
                v + tab.c[i] * h)
            k.append(ode.rhs(den, yi, ti))
        y_next = y
        for bi, ki in zip(tab.b, k):
            if bi != 0.0:
                y_next = y_next + (h * bi) * ki
        return state.advance(ode.to_x(y_next, t_next))


@attrs.frozen(kw_only=True)
class Euler(RungeKutta):
    """1st-order explicit Runge-Kutta (forward Euler). 1 stage, 1 NFE per step.

    ``y_next = y + h f(y, v)`` in option ``variable``. In ``"sigma"`` (default) this is DDIM
    (Song et al. 2021a, eq. 12 with ``sigma_t = 0``) and k-diffusion's ``sample_euler``
    (module docstring); in ``"t"`` on a VP schedule it is not DDIM.
    """

    name: ClassVar[str] = "euler"
    order: ClassVar[int] = 1
    tableau: ClassVar[ButcherTableau] = EULER_TABLEAU


@attrs.frozen(kw_only=True)
class Heun(RungeKutta):
    """2nd-order explicit Runge-Kutta (Heun; explicit trapezoidal rule). 2 stages, 2 NFE per
    step.

    ``y' = y + h f(y, v)``, ``y_next = y + h/2 (f(y, v) + f(y', v_next))`` in option
    ``variable``. In ``"sigma"`` (default) this is the deterministic sampler of Karras et al.
    2022, Alg. 1 (k-diffusion's ``sample_heun`` with ``s_churn = 0``) on any schedule, without
    its final Euler step to ``s~ = 0``.
    """

    name: ClassVar[str] = "heun"
    order: ClassVar[int] = 2
    tableau: ClassVar[ButcherTableau] = HEUN_TABLEAU


@attrs.frozen(kw_only=True)
class RK4(RungeKutta):
    """4th-order explicit Runge-Kutta (the classical RK4). 4 stages, 4 NFE per step.

    In option ``variable`` (default ``"sigma"``). Nodes ``0, 1/2, 1/2, 1``, weights ``1/6, 1/3,
    1/3, 1/6``. In float32 its error reaches round-off after few steps; convergence is only
    visible in float64.
    """

    name: ClassVar[str] = "rk4"
    order: ClassVar[int] = 4
    tableau: ClassVar[ButcherTableau] = RK4_TABLEAU
