"""The solverlab_classic plugin: Butcher-tableau validation, single-step values of euler/heun/rk4
against hand-computed formulas on a linear ODE, their local order, NFE and registration."""

from __future__ import annotations

import math

import attrs
import pytest
import torch

import solverlab
from solverlab import Denoiser, Model, OptionError
from solverlab.parameterization import Noise
from solverlab.schedule import EDM
from solverlab.testing import CountingModel, make_problem
from solverlab_classic import (
    EULER_TABLEAU,
    HEUN_TABLEAU,
    RK4,
    RK4_TABLEAU,
    ButcherTableau,
    Euler,
    Heun,
    RungeKutta,
)

F64 = torch.float64


# -- ButcherTableau ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("a", "b", "c", "message"),
    [
        ([[1.0]], [1.0], [1.0], "strictly lower triangular"),
        ([[0.0, 0.5], [0.5, 0.0]], [0.5, 0.5], [0.5, 0.5], "a[0][1] = 0.5"),
        ([[0.0, 0.0], [1.0, 0.0]], [0.5, 0.5], [0.0, 0.5], "c[1] = 0.5 but row 1 of a sums to 1.0"),
        ([[0.0, 0.0], [1.0, 0.0]], [0.5, 0.4], [0.0, 1.0], "sum to 0.9"),
        ([[0.0, 0.0], [1.0, 0.0]], [0.5, 0.25, 0.25], [0.0, 1.0], "shapes do not agree"),
        ([[0.0], [1.0, 0.0]], [0.5, 0.5], [0.0, 1.0], "shapes do not agree"),
        ([[0.0]], [math.nan], [0.0], "finite"),
        ([[0.0]], ["one"], [0.0], "not a sequence of numbers"),
        (5, [1.0], [0.0], "not a sequence of rows"),
        ([], [], [], "at least one stage"),
    ],
)
def test_bad_tableau_is_refused_with_the_reason(a, b, c, message):
    with pytest.raises(OptionError, match="ButcherTableau") as info:
        ButcherTableau(a=a, b=b, c=c)
    assert message in str(info.value)


def test_tableau_is_a_frozen_value():
    tab = ButcherTableau(a=[[0, 0], [1, 0]], b=[0.5, 0.5], c=[0, 1])
    assert tab == HEUN_TABLEAU and hash(tab) == hash(HEUN_TABLEAU)
    assert tab.a == ((0.0, 0.0), (1.0, 0.0)) and tab.stages == 2
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        tab.b = (1.0, 0.0)


@pytest.mark.parametrize(
    ("tableau", "order"),
    [
        (EULER_TABLEAU, 1),
        (HEUN_TABLEAU, 2),
        (RK4_TABLEAU, 4),
        # explicit midpoint: order 2
        (ButcherTableau(a=[[0, 0], [0.5, 0]], b=[0, 1], c=[0, 0.5]), 2),
        # consistent, but the weights put everything on the first stage: order 1
        (ButcherTableau(a=[[0, 0], [1, 0]], b=[1, 0], c=[0, 1]), 1),
        # Kutta's third-order rule
        (ButcherTableau(a=[[0, 0, 0], [0.5, 0, 0], [-1, 2, 0]], b=[1 / 6, 2 / 3, 1 / 6],
                        c=[0, 0.5, 1]), 3),
    ],
)
def test_conditions_order(tableau, order):
    assert tableau.conditions_order() == order


@pytest.mark.parametrize("cls", [Euler, Heun, RK4])
def test_declared_order_matches_the_tableau(cls):
    assert cls.tableau.conditions_order() == cls.order == cls().convergence_order


# -- single steps on dx/dt = t x ----------------------------------------------------------------

class TimeLinear(Model):
    """On ``edm`` (alpha = 1, sigma = t) a noise prediction ``eps = t x`` makes the
    probability-flow drift ``dx/dt = eps = t x``: ``x(t1) = x(t0) exp((t1^2 - t0^2) / 2)``."""

    schedule = EDM()
    parameterization = Noise()

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, x, t, **cond):
        self.times.append(float(t[0]))
        return t.to(x.dtype).view(-1, *([1] * (x.ndim - 1))) * x


def _one_step(solver, t0, t1, dtype=F64):
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=dtype)
    model = TimeLinear()
    return x, solver.solve(model, x, [t0, t1], progress=False), model


def test_drift_of_the_linear_model():
    x = torch.tensor([[1.0, -2.0]], dtype=F64)
    assert torch.allclose(Denoiser(TimeLinear()).drift(x, 2.0), 2.0 * x, rtol=1e-15, atol=0)


T0, T1 = 2.0, 1.5
H = T1 - T0


def _euler_factor(t0, t1):
    return 1 + (t1 - t0) * t0


def _heun_factor(t0, t1):
    h = t1 - t0
    return 1 + h / 2 * (t0 + t1 * (1 + h * t0))


def _rk4_factor(t0, t1):
    h = t1 - t0
    tm = t0 + h / 2
    k1 = t0
    k2 = tm * (1 + h / 2 * k1)
    k3 = tm * (1 + h / 2 * k2)
    k4 = t1 * (1 + h * k3)
    return 1 + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


@pytest.mark.parametrize(
    ("solver", "factor", "stage_times"),
    [
        (Euler(), _euler_factor, [T0]),
        (Heun(), _heun_factor, [T0, T1]),
        (RK4(), _rk4_factor, [T0, T0 + H / 2, T0 + H / 2, T1]),
    ],
)
def test_single_step_matches_the_hand_computed_formula(solver, factor, stage_times):
    x, sol, model = _one_step(solver, T0, T1)
    assert torch.allclose(sol.x, factor(T0, T1) * x, rtol=1e-14, atol=0)
    assert model.times == stage_times  # the last stage sits exactly on t_next
    assert sol.nfe == solver.tableau.stages == len(model.times)


@pytest.mark.parametrize("solver", [Euler(), Heun(), RK4()])
def test_single_step_in_float32(solver):
    _, sol, _ = _one_step(solver, T0, T1, dtype=torch.float32)
    assert sol.x.dtype == torch.float32
    ref = _one_step(solver, T0, T1)[1].x
    assert torch.allclose(sol.x.double(), ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("solver", [Euler(), Heun(), RK4()])
def test_local_error_is_of_order_p_plus_1(solver):
    """One step of size h from t0 = 2 has error ~ C h^(p+1): halving h divides it by 2^(p+1)."""
    errors = []
    for h in (0.1, 0.05, 0.025):
        x, sol, _ = _one_step(solver, 2.0, 2.0 - h)
        exact = x * math.exp(((2.0 - h) ** 2 - 4.0) / 2)
        errors.append(float((sol.x - exact).abs().max()))
    slopes = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(s - (solver.order + 1)) < 0.25 for s in slopes), slopes


def test_euler_on_edm_is_k_diffusion_euler():
    """On edm, t = sigma and the drift is (x - x0)/sigma: k-diffusion's ``sample_euler`` step
    ``x + (sigma_next - sigma) (x - denoised) / sigma``."""
    problem = make_problem("edm", dim=3, components=2, seed=0)
    den = Denoiser(problem.model)
    x, s0, s1 = problem.x, 10.0, 7.0
    k_diffusion = x + (s1 - s0) * (x - den.data(x, s0)) / s0
    ours = Euler().solve(problem.model, x, [s0, s1], progress=False).x
    assert torch.allclose(ours, k_diffusion, rtol=1e-13, atol=1e-13)


# -- NFE, registration ------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "per_step"), [("euler", 1), ("heun", 2), ("rk4", 4)])
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_nfe_is_stages_times_steps(name, per_step, steps):
    solver = solverlab.get_solver(name)
    problem = make_problem("vp-linear", dim=3, components=2, seed=0)
    counter = CountingModel(problem.model)
    grid = solverlab.get_grid("logsnr")(problem.model.schedule, steps)
    sol = solver.solve(counter, problem.x, grid, progress=False)
    assert solver.expected_nfe(steps) == per_step * steps == sol.nfe == counter.calls


@pytest.mark.parametrize(("name", "cls", "order"), [("euler", Euler, 1), ("heun", Heun, 2),
                                                    ("rk4", RK4, 4)])
def test_registered_through_the_entry_point(name, cls, order):
    entry = solverlab.get_registry().entry("solver", name)
    assert entry.cls is cls and entry.plugin == "solverlab_classic"
    assert cls.order == order and issubclass(cls, RungeKutta)
    assert isinstance(solverlab.get_solver(name), cls)


def test_no_options():
    with pytest.raises(OptionError, match="has no option 'steps'"):
        solverlab.get_solver("heun", steps=3)


def test_docstrings_state_the_numerical_facts_first():
    assert Heun.__doc__.startswith("2nd-order explicit Runge-Kutta (Heun")
    assert "2 stages, 2 NFE per step" in " ".join(Heun.__doc__.split())
    assert RK4.__doc__.startswith("4th-order explicit Runge-Kutta")
    assert Euler.__doc__.startswith("1st-order explicit Runge-Kutta")
