"""A third-party solverlab plugin: the explicit midpoint rule on the probability-flow ODE."""

import attrs

import solverlab


@attrs.frozen(kw_only=True)
class ToyMidpoint(solverlab.Solver):
    """Explicit midpoint rule in ``t``. Order 2, 2 NFE per step."""

    name = "toy-midpoint"
    order = 2

    def step(self, state):
        d, x, t, h = state.denoiser, state.x, state.t, state.t_next - state.t
        x_mid = x + (0.5 * h).to(x.dtype) * d.drift(x, t)
        return state.advance(x + h.to(x.dtype) * d.drift(x_mid, t + 0.5 * h))

    def expected_nfe(self, steps):
        return 2 * steps


@solverlab.hookimpl
def solverlab_register_solvers(registry):
    registry.add(ToyMidpoint)
