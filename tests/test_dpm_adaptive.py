"""dpm-adaptive: adaptive DPM-Solver-12/23 (MATH.md §6.1): exact NFE, accuracy against the
tolerance, per-sample step sizes, failures and options."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import solverlab
from solverlab import AdaptiveSolver, OptionError, SolverDivergedError, SolverlabError
from solverlab.analytic import AnalyticModel
from solverlab.testing import CountingModel, make_problem
from solverlab.testing.order import solution_error
from solverlab_dpm_adaptive import DPMAdaptive, DPMAdaptiveError

F64 = torch.float64

#: Documented accuracy factor: on the Gaussian-mixture problems below, rtol = atol = tol gives
#: a final error (largest per-sample L2 norm) within FACTOR * tol * max(1, scale). Measured
#: worst case (vp-linear, vp-cosine, edm x seeds 0-3, tol 1e-3..1e-7): order 3 0.2, order 2 1.2.
FACTOR = 30.0


def _ends(problem):
    return torch.tensor([problem.t_start, problem.t_end], dtype=F64)


def test_registered_and_adaptive():
    solver = solverlab.get_solver("dpm-adaptive")
    assert isinstance(solver, DPMAdaptive) and isinstance(solver, AdaptiveSolver)
    assert (solver.order, solver.theta, solver.h_init) == (3, 0.9, 0.05)


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize(("step_size", "error_state", "batch_norm"), [
    ("per-sample", "x/alpha", "rms"), ("shared", "x/alpha", "rms"), ("shared", "x", "max")])
def test_nfe_is_exact_and_a_multiple_of_the_order(order, step_size, error_state, batch_norm):
    problem = make_problem("vp-linear", dim=3, components=2, seed=0)
    model = CountingModel(problem.model)
    seen = []
    sol = DPMAdaptive(order=order, step_size=step_size, rtol=1e-4, atol=1e-4,
                      error_state=error_state, batch_norm=batch_norm).solve(
        model, problem.x, _ends(problem), callback=seen.append)
    assert sol.nfe == model.calls == order * len(seen)
    assert solution_error(sol.x, problem.reference()) < FACTOR * 1e-4 * max(1, problem.scale)


def test_one_step_of_a_huge_tolerance_is_dpm_solver_3():
    # rtol = atol huge: the first step (h_init covering the whole range) is accepted, so the
    # result is one DPM-Solver-3 step (r1 = 1/3, r2 = 2/3) of the expint plugin.
    problem = make_problem("vp-linear", dim=3, components=2, seed=0)
    sol = DPMAdaptive(rtol=1e6, atol=1e6, h_init=1e3).solve(problem.model, problem.x,
                                                             _ends(problem))
    ref = solverlab.get_solver("dpm-solver-3").solve(problem.model, problem.x, _ends(problem))
    assert sol.nfe == 3 == ref.nfe
    assert torch.allclose(sol.x, ref.x, rtol=1e-10, atol=1e-10)
    sol2 = DPMAdaptive(order=2, rtol=1e6, atol=1e6, h_init=1e3).solve(
        problem.model, problem.x, _ends(problem))
    ref2 = solverlab.get_solver("dpm-solver-2").solve(problem.model, problem.x, _ends(problem))
    assert torch.allclose(sol2.x, ref2.x, rtol=1e-10, atol=1e-10)


@given(seed=st.integers(0, 3), schedule=st.sampled_from(["vp-linear", "vp-cosine", "edm"]),
       order=st.sampled_from([2, 3]))
def test_error_falls_with_the_tolerance_and_stays_near_it(seed, schedule, order):
    problem = make_problem(schedule, dim=3, components=2, seed=seed)
    ref, scale = problem.reference(), max(1.0, problem.scale)
    errors, nfes = [], []
    for tol in (1e-3, 1e-5) if order == 2 else (1e-3, 1e-5, 1e-7):
        sol = DPMAdaptive(order=order, rtol=tol, atol=tol).solve(problem.model, problem.x,
                                                                 _ends(problem))
        errors.append(solution_error(sol.x, ref))
        nfes.append(sol.nfe)
        assert errors[-1] <= FACTOR * tol * scale, (tol, errors)
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    assert all(b > a for a, b in itertools.pairwise(nfes)), nfes


def test_per_sample_steps_give_each_sample_its_solve_alone():
    problem = make_problem("vp-linear", dim=3, components=2, seed=2)
    solver = DPMAdaptive(rtol=1e-5, atol=1e-5, step_size="per-sample")
    batch = solver.solve(problem.model, problem.x, _ends(problem))
    nfes = []
    for i in range(problem.x.shape[0]):
        alone = solver.solve(problem.model, problem.x[i:i + 1], _ends(problem))
        assert torch.allclose(batch.x[i:i + 1], alone.x, rtol=0, atol=1e-12)
        nfes.append(alone.nfe)
    # batched calls evaluate every unfinished sample at once: as many calls as the longest solve
    assert batch.nfe == max(nfes)


class NaNModel(AnalyticModel):
    def __call__(self, x, t, **cond):
        out = super().__call__(x, t, **cond)
        return torch.where((t < 0.5).view(-1, 1), torch.full_like(out, float("nan")), out)


def test_a_collapsing_step_becomes_a_solverlab_error_with_advice():
    base = make_problem("vp-linear", dim=3, components=2, seed=0)
    model = NaNModel(data=base.model.data, schedule=base.model.schedule,
                     parameterization=base.model.parameterization)
    with pytest.raises(DPMAdaptiveError) as info:
        DPMAdaptive().solve(model, base.x, _ends(base))
    assert isinstance(info.value, SolverDivergedError) and isinstance(info.value, SolverlabError)
    assert "rtol" in str(info.value) and "collapsed" in str(info.value)
    with pytest.raises(DPMAdaptiveError, match="max_steps"):
        DPMAdaptive(rtol=1e-9, atol=1e-9, max_steps=5).solve(base.model, base.x, _ends(base))


@pytest.mark.parametrize(("option", "value"), [
    ("rtol", 0.0), ("atol", -1.0), ("h_init", 0), ("theta", 1.5), ("order", 4),
    ("step_size", "batch"), ("max_steps", 0), ("batch_norm", "l1"), ("error_state", "eps"),
])
def test_bad_options_name_the_option(option, value):
    with pytest.raises(OptionError, match=rf"option {option}="):
        solverlab.get_solver("dpm-adaptive", **{option: value})
