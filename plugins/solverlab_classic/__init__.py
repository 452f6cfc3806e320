"""solverlab_classic: generic explicit Runge-Kutta solvers (``euler``, ``heun``, ``rk4``) of the
probability-flow ODE in a chosen variable (``sigma/alpha`` by default).

The first plugin: registered through the ``solverlab`` entry-point group exactly as a third
party's would be. Each solver is a :class:`ButcherTableau` constant plus a small class
(diffrax's pattern); :class:`RungeKutta` holds the one step.
"""

from __future__ import annotations

import solverlab

from ._runge_kutta import EULER_TABLEAU, HEUN_TABLEAU, RK4, RK4_TABLEAU, Euler, Heun, RungeKutta
from ._tableau import ButcherTableau

__all__ = [
    "EULER_TABLEAU", "HEUN_TABLEAU", "RK4", "RK4_TABLEAU", "ButcherTableau", "Euler", "Heun",
    "RungeKutta", "solverlab_register_solvers",
]


@solverlab.hookimpl
def solverlab_register_solvers(registry):
    for cls in (Euler, Heun, RK4):
        registry.add(cls)
