"""Explicit Runge-Kutta methods on the probability-flow ODE in ``t``.

They solve ``dx/dt = dlog_alpha/dt x - sigma dlambda/dt eps(x, t)`` (docs/mathematics.md#pf-ode, in
``t``; :meth:`solverlab.Denoiser.drift`) in the schedule's own time ``t``, not in ``lambda``: they
are generic ODE methods, not exponential integrators. Hence

- on a VP schedule ``euler`` is *not* DDIM (DDIM is the exponential-integrator Euler step in
  ``lambda``, exact for the linear part); it converges at the same order but with a larger
  constant;
- on ``edm`` (``alpha = 1``, ``t = sigma``) the drift is ``(x - x0)/sigma`` and ``euler``/``heun``
  are k-diffusion's ``sample_euler``/``sample_heun`` with ``s_churn = 0`` (Karras et al. 2022,
  Alg. 1), except that k-diffusion ends with a step to ``sigma = 0`` and these end at ``t_end``.

On VP ``eps(x, t)`` has the Lipschitz singularity of Yang et al. 2024 (Thm 3.1) at ``t -> 0``
(``sigma ~ sqrt(t)``), but the drift these methods step does not: ``sigma dlambda/dt =
(dlog_alpha/dt) / sigma``, so the drift is ``dlog_alpha/dt (x + score)`` with ``score = -eps /
sigma``, smooth in ``t`` for data with a density. With an exact model they keep their classical
order on ``time-uniform`` and ``logsnr`` grids alike (fitted orders: ``bench/orders.md``).
A learned ``eps`` network carries its own non-smoothness in
``t`` into the drift.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

from solverlab import Solver, SolverState

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
    ``s`` NFE per step. Subclasses set ``name``, ``order`` and ``tableau``.

    Coefficients ``h a[i][j]``, ``h b[i]`` and the stage times ``t + c[i] h`` are formed in
    float64 (Python floats) and meet the state in its own dtype.
    """

    tableau: ClassVar[ButcherTableau]

    def expected_nfe(self, steps: int) -> int:
        return self.tableau.stages * steps

    def step(self, state: SolverState) -> SolverState:
        tab, drift, x = self.tableau, state.denoiser.drift, state.x
        t, t_next = float(state.t), float(state.t_next)
        h = t_next - t  # < 0: noise to data
        k = []
        for i in range(tab.stages):
            xi = x
            for j in range(i):
                if tab.a[i][j] != 0.0:
                    xi = xi + (h * tab.a[i][j]) * k[j]
            # c = 1 means the end of the step: use t_next itself, not t + h, which may round
            # past the schedule's t_min.
            k.append(drift(xi, t_next if tab.c[i] == 1.0 else t + tab.c[i] * h))
        x_next = x
        for bi, ki in zip(tab.b, k):
            if bi != 0.0:
                x_next = x_next + (h * bi) * ki
        return state.advance(x_next)


@attrs.frozen(kw_only=True)
class Euler(RungeKutta):
    """1st-order explicit Runge-Kutta (forward Euler) in ``t``. 1 stage, 1 NFE per step.

    ``x_next = x + h f(x, t)`` with ``f`` the probability-flow drift in ``t``. On ``edm`` this is
    k-diffusion's ``sample_euler``; on VP schedules it is not DDIM (see the module docstring).
    """

    name: ClassVar[str] = "euler"
    order: ClassVar[int] = 1
    tableau: ClassVar[ButcherTableau] = EULER_TABLEAU


@attrs.frozen(kw_only=True)
class Heun(RungeKutta):
    """2nd-order explicit Runge-Kutta (Heun; explicit trapezoidal rule) in ``t``. 2 stages, 2 NFE
    per step.

    ``x' = x + h f(x, t)``, ``x_next = x + h/2 (f(x, t) + f(x', t_next))``. On ``edm`` this is the
    deterministic sampler of Karras et al. 2022, Alg. 1 (k-diffusion's ``sample_heun`` with
    ``s_churn = 0``), without its final Euler step to ``sigma = 0``.
    """

    name: ClassVar[str] = "heun"
    order: ClassVar[int] = 2
    tableau: ClassVar[ButcherTableau] = HEUN_TABLEAU


@attrs.frozen(kw_only=True)
class RK4(RungeKutta):
    """4th-order explicit Runge-Kutta (the classical RK4) in ``t``. 4 stages, 4 NFE per step.

    Nodes ``0, 1/2, 1/2, 1``, weights ``1/6, 1/3, 1/3, 1/6``. In float32 its error reaches
    round-off after few steps; convergence is only visible in float64.
    """

    name: ClassVar[str] = "rk4"
    order: ClassVar[int] = 4
    tableau: ClassVar[ButcherTableau] = RK4_TABLEAU
