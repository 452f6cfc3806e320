"""A third-party solverlab plugin: the explicit midpoint rule on the probability-flow ODE, and
a two-step exponential Adams-Bashforth method built from solverlab_expint's public toolkit."""

from typing import ClassVar

import attrs

import solverlab
from solverlab_expint import Multistep
from solverlab_expint.integrator import lagrange_weights


@attrs.frozen(kw_only=True)
class ToyMidpoint(solverlab.Solver):
    """Explicit midpoint rule in ``t``. Order 2, 2 NFE per step."""

    name = "toy-midpoint"
    order = 2
    # It steps in t: across vp-discrete's kinks (log alpha piecewise linear in t) its order
    # falls towards 1, so the conformance kit leaves that schedule out of its order checks.
    needs_smooth_schedule = True

    def step(self, state):
        d, x, t, h = state.denoiser, state.x, state.t, state.t_next - state.t
        x_mid = x + (0.5 * h).to(x.dtype) * d.drift(x, t)
        return state.advance(x + h.to(x.dtype) * d.drift(x_mid, t + 0.5 * h))

    def expected_nfe(self, steps):
        return 2 * steps


@attrs.frozen(kw_only=True)
class ToyExpAB2(Multistep):
    """Exponential Adams-Bashforth, 2 steps, on the data prediction (Hochbruck & Ostermann
    2010, eq. 2.36 with the exact integrals). Order 2, 1 NFE per step.

    The linear interpolant of the last two data predictions in ``lambda`` is integrated
    exactly against ``e^{z (1-u)}``; the first step is DDIM."""

    name: ClassVar[str] = "toy-exp-ab2"
    order: ClassVar[int] = 2
    prediction: ClassVar[str] = "data"

    def weights(self, p, u, span):
        return lagrange_weights(u, span.phi(p))


@solverlab.hookimpl
def solverlab_register_solvers(registry):
    registry.add(ToyMidpoint)
    registry.add(ToyExpAB2)
