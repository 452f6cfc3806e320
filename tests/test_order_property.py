"""Property: on hypothesis-drawn analytic problems (any smooth registered VP/VE schedule,
dimension 1-8, 2-4 mixture components, any parameterization, a sub-range of the schedule's
lambda range), every registered fixed-grid solver converges in float64 with its declared order
+- 0.3.

Single Gaussians (1 component) are left to the unit tests: they are special problems on which
a solver's leading error term can nearly cancel, so the asymptotic order shows only far beyond
affordable grids (``dpmpp-3m`` shows order ~4 up to ~256 steps and falls towards 3 only past
4000; ``euler`` on a centred Gaussian under ``vp-cosine`` shows ~1.9).

One test per solver (parametrized over the registry at collection), so a failure names the
solver and a plugin's solvers are covered without new test code. Problems and their reference
solutions are cached (``make_problem``); under the derandomized ``ci`` profile every solver
draws the same 30 problems (one shared seed), so each reference is computed once per session.
"""

from __future__ import annotations

import pytest
from hypothesis import given, seed, settings

import solverlab
from solverlab.testing import assert_convergence_order
from solverlab.testing.strategies import analytic_problems, schedules

FIXED_GRID = [
    e.name for e in solverlab.get_registry().entries("solver")
    if not issubclass(e.cls, solverlab.AdaptiveSolver)
]
# Solvers that prepare per-problem data (dpmv3 computes its statistics, EMS, for each problem:
# ~1 minute an example here) are order-checked on the conformance kit's fixed problems
# (test_conformance), not on drawn ones. A drawn problem once showed dpmv3 at order 2 (its
# first-order first step); test_dpmv3 keeps that problem as a regression test.
DRAWN = [n for n in FIXED_GRID
         if getattr(solverlab.get_registry().entry("solver", n).cls, "prepare", None) is None]


def _shared_examples(test):
    # Hypothesis derives a derandomized seed per parametrized case; one explicit seed makes the
    # cases draw the same problems, whose cached references are then computed once, not once
    # per solver. The random dev profile keeps exploring.
    return seed(20240601)(test) if settings.default.derandomize else test


# Each example costs each solver up to DEFAULT_MAX_NFE network evaluations (typically
# 100-3000 for a passing solver, ~1-2 ms each on the 2-core CI machines: ~0.5-5 s). The ci
# profile's 30 examples for each of 12 solvers took ~6 minutes; capping the total at 180
# solver-examples keeps the run near 3 minutes however many plugins register solvers (30 each
# for up to 6 solvers).
_TOTAL_EXAMPLES = 180
_PER_SOLVER = max(5, _TOTAL_EXAMPLES // max(1, len(FIXED_GRID)))


@pytest.mark.parametrize("name", DRAWN)
@_shared_examples
@settings(max_examples=min(settings.default.max_examples, _PER_SOLVER))
@given(problem=analytic_problems(components=(2, 4)))
def test_fitted_order_matches_the_declared_order(name, problem):
    assert_convergence_order(name, problem)


@given(schedule=schedules())
def test_schedules_strategy_draws_registered_vp_and_ve_schedules(schedule):
    assert schedule.kind in ("vp", "ve")
    assert schedule.name in solverlab.get_registry().names("schedule")


@given(problem=analytic_problems(dims=(1, 8), components=(1, 4), batch=(1, 3)))
def test_analytic_problems_are_valid(problem):
    schedule = problem.model.schedule
    assert schedule.name != "vp-discrete"
    assert schedule.t_min <= problem.t_end < problem.t_start <= schedule.t_max
    assert 1 <= problem.x.shape[0] <= 3 and 1 <= problem.x.shape[1] <= 8
    lam = schedule.lambda_max - schedule.lambda_min
    span = float(schedule.lambda_(problem.t_end) - schedule.lambda_(problem.t_start))
    assert span >= 0.4 * lam - 1e-9
    ref = problem.reference()
    assert ref.shape == problem.x.shape and bool(ref.isfinite().all())
