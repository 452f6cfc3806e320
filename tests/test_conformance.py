"""The conformance kit: every registered solver passes ``check_solver`` (parametrized over the
registry at collection, so a new plugin's solvers are tested with no new test code), and the
kit itself catches what it claims to catch."""

from __future__ import annotations

import math
import re
from typing import ClassVar

import attrs
import pytest
import torch

import solverlab
from solverlab import AdaptiveSolver, OptionError, Solution
from solverlab.registry import Registry
from solverlab.testing import (
    CountingModel,
    Problem,
    assert_convergence_order,
    check_determinism,
    check_dtypes,
    check_nfe,
    check_solver,
    convergence_errors,
    default_problem,
    fit_order,
    lambda_range,
    local_orders,
    make_problem,
    measure_convergence_order,
)
from solverlab_classic import RK4, Euler, Heun

F64 = torch.float64

SOLVERS = solverlab.get_registry().names("solver")


@pytest.mark.parametrize("name", SOLVERS)
def test_registered_solver_passes_the_conformance_kit(name):
    report = check_solver(name)
    assert {"shapes", "dtypes", "determinism", "nfe"} <= set(report.passed)
    if isinstance(solverlab.get_solver(name), AdaptiveSolver):
        assert report.order is None and any("order" in s for s in report.skipped)
    else:
        assert "order" in report.passed and "short-grids" in report.passed
        assert abs(report.order - report.declared_order) <= 0.3


# -- order fitting ----------------------------------------------------------------------------

def test_fit_order_recovers_a_known_slope():
    steps = [8, 16, 32, 64, 128]
    assert fit_order(steps, [3.0 * n**-2.5 for n in steps]) == pytest.approx(2.5, abs=1e-12)
    assert local_orders(steps, [0.7 * n**-4 for n in steps]) == pytest.approx([4.0] * 4)
    # least squares through noise: +-5% multiplicative noise moves the slope only a little
    noisy = [n**-1.0 * (1 + 0.05 * (-1) ** i) for i, n in enumerate(steps)]
    assert fit_order(steps, noisy) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize(("steps", "errors"), [([4], [0.1]), ([4, 8], [0.1, 0.0]),
                                               ([4, 8], [0.1]), ([4, 8], [0.1, math.inf])])
def test_fit_order_refuses_unusable_data(steps, errors):
    with pytest.raises(OptionError):
        fit_order(steps, errors)


@attrs.frozen(kw_only=True)
class WrongEuler(Euler):
    """Euler that claims order 2."""

    name: ClassVar[str] = "wrong-euler"
    order: ClassVar[int] = 2


def test_assert_convergence_order_fails_for_a_wrongly_declared_order():
    registry = Registry()
    registry.add(WrongEuler)  # registration accepts it: only measuring catches the lie
    solver = registry.create("solver", "wrong-euler")
    with pytest.raises(AssertionError) as info:
        assert_convergence_order(solver, max_nfe=1024)
    message = str(info.value)
    assert re.search(r"fitted order (0\.9|1\.[01])\d* is outside", message), message
    assert "expected 2 +- 0.3" in message
    assert "steps" in message and "slope" in message  # the table


def test_assert_convergence_order_returns_the_fitted_order():
    order = assert_convergence_order("heun", steps=[16, 32, 64, 128])
    assert abs(order - 2) < 0.15
    assert abs(assert_convergence_order(Euler(), expected=1, tol=0.2)) - 1 < 0.2


def test_assert_convergence_order_refuses_too_few_points_above_the_floor():
    with pytest.raises(AssertionError, match="could not fit an order"):
        assert_convergence_order("euler", steps=[4, 8])
    with pytest.raises(AssertionError, match="could not fit an order"):
        assert_convergence_order("rk4", steps=[2, 4, 8, 16], floor=1.0)


def test_measured_study_table_and_floor():
    study = measure_convergence_order(RK4(), max_nfe=200)
    lo, hi = study.window
    assert hi - lo >= 3 and sum(study.nfe) <= 200
    assert study.nfe == tuple(4 * n for n in study.steps)
    assert all(b == 2 * a for a, b in zip(study.steps, study.steps[1:]))
    table = study.table()
    assert "fitted order" in table and table.count("fit\n") + table.endswith("fit") >= 3


def test_convergence_errors_are_float64_max_sample_norms():
    problem = default_problem()
    (err,) = convergence_errors("euler", problem, [8])
    grid = solverlab.get_grid("logsnr")(problem.model.schedule, 8)
    x = Euler().solve(problem.model, problem.x, grid, progress=False).x
    per_sample = (x - problem.reference()).norm(dim=1)
    assert err == float(per_sample.max())


# -- problems -----------------------------------------------------------------------------------

def test_problem_reference_is_cached_and_float64():
    problem = make_problem("ve", dim=2, components=1, batch=3, seed=5)
    assert problem.x.dtype == F64 and problem.x.shape == (3, 2)
    assert problem.reference() is problem.reference()
    assert "ve dim=2 components=1 seed=5" in str(problem)


def test_make_problem_keeps_well_conditioned_samples():
    problem = make_problem("vp-linear", dim=3, components=2, seed=0)
    assert problem.x.shape == (4, 3) and "gain <=" in problem.label
    assert make_problem("vp-linear", dim=3, components=2, seed=0) is problem  # cached


def test_problem_validates_its_times():
    model = make_problem("edm", dim=2, components=1).model
    with pytest.raises(solverlab.GridError):
        Problem(model=model, x=torch.zeros(2, 2), t_start=1.0, t_end=2.0)
    with pytest.raises(OptionError):
        Problem(model=object(), x=torch.zeros(2, 2), t_start=2.0, t_end=1.0)


def test_lambda_range():
    sched = solverlab.get_schedule("vp-linear")
    assert lambda_range(sched, 0.0, 1.0) == (sched.t_max, sched.t_min)
    t0, t1 = lambda_range(sched, 0.25, 0.75)
    lam = sched.lambda_min + torch.tensor([0.25, 0.75], dtype=F64) * (
        sched.lambda_max - sched.lambda_min)
    assert torch.allclose(sched.lambda_(torch.tensor([t0, t1], dtype=F64)), lam, atol=1e-9)
    with pytest.raises(OptionError):
        lambda_range(sched, 0.5, 0.5)


# -- the individual checks catch what they claim to ---------------------------------------------

def test_counting_model_counts_its_own_calls():
    model = CountingModel(default_problem().model)
    model(torch.zeros(2, 3, dtype=F64), torch.ones(2, dtype=F64))
    assert model.calls == 1 and model.schedule is model.model.schedule


@attrs.frozen(kw_only=True)
class LyingHeun(Heun):
    name: ClassVar[str] = "lying-heun"

    def expected_nfe(self, steps):
        return steps


@attrs.frozen(kw_only=True)
class NoisyEuler(Euler):
    name: ClassVar[str] = "noisy-euler"

    def step(self, state):
        state = super().step(state)
        return attrs.evolve(state, x=state.x + 1e-12 * torch.randn_like(state.x))


@attrs.frozen(kw_only=True)
class Float64Euler(Euler):
    name: ClassVar[str] = "float64-euler"

    def step(self, state):
        state = super().step(state)
        return attrs.evolve(state, x=state.x.to(F64))


def test_check_nfe_catches_a_wrong_expected_nfe():
    with pytest.raises(AssertionError, match=r"expected_nfe\(1\) = 1 but .* 2 times"):
        check_nfe(LyingHeun())


def test_check_determinism_catches_a_random_solver():
    with pytest.raises(AssertionError, match="must be deterministic"):
        check_determinism(NoisyEuler())


def test_check_dtypes_catches_an_upcast():
    with pytest.raises(AssertionError, match=r"float32 in gave torch\.float64 out"):
        check_dtypes(Float64Euler())


def test_check_solver_collects_every_failure():
    with pytest.raises(AssertionError) as info:
        check_solver(LyingHeun())
    assert "[nfe]" in str(info.value) and "[order]" not in str(info.value)


def test_check_solver_refuses_options_with_an_instance():
    with pytest.raises(OptionError, match="solver instance"):
        check_solver(Heun(), order=3)


@attrs.frozen(kw_only=True)
class FixedRK4Adaptive(AdaptiveSolver):
    """Stands in for an adaptive solver: 8 RK4 steps between the grid's end points."""

    name: ClassVar[str] = "fixed-rk4-adaptive"
    order: ClassVar[int] = 4

    def solve(self, model, x, grid, **kwargs):
        grid = torch.as_tensor(grid, dtype=F64)
        times = torch.linspace(float(grid[0]), float(grid[-1]), 9, dtype=F64)
        sol = RK4().solve(model, x, times, progress=False)
        return Solution(x=sol.x, nfe=sol.nfe, times=grid[[0, -1]])


def test_check_solver_skips_order_for_adaptive_solvers():
    report = check_solver(FixedRK4Adaptive())
    assert report.order is None and report.studies == ()
    assert set(report.passed) == {"shapes", "dtypes", "determinism", "nfe"}
    assert any("AdaptiveSolver" in s for s in report.skipped)
    with pytest.raises(TypeError, match="AdaptiveSolver"):
        assert_convergence_order(FixedRK4Adaptive())
