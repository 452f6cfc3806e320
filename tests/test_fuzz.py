"""The fuzz suite: random options, grids, inputs, model outputs and schedules through the public
API, for every registered solver (a third party's through ``solverlab.testing.check_fuzz``).
Every outcome is a finite result or a SolverlabError."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given

import solverlab
from solverlab.testing.fuzz import FuzzCase, check_fuzz, fuzz_cases, run_case

pytestmark = pytest.mark.property

SOLVERS = tuple(solverlab.get_registry().names("solver"))


@pytest.mark.parametrize("name", SOLVERS)
def test_fuzz_every_registered_solver(name):
    check_fuzz(name)


@given(fuzz_cases())
def test_fuzz_cases_draw_every_kind_of_input(case):
    assert case.solver in SOLVERS and 1 <= case.steps <= 8 and case.batch in (0, 1, 2, 3)


def _case(**changes):
    base = dict(solver="ddim", solver_options={}, schedule="vp-linear", schedule_options={},
                grid="logsnr", grid_options={}, steps=4, batch=2, dim=2, dtype=torch.float64,
                x_scale=1.0, output="exact", parameterization="noise", check_finite=True)
    return FuzzCase(**{**base, **changes})


def test_run_case_reports_ok_and_refused():
    assert run_case(_case()) == "ok"
    assert run_case(_case(output="nan")) == "refused"  # SolverDivergedError
    assert run_case(_case(solver_options={"eta": "x"})) == "refused"


class _Faulty(solverlab.AdaptiveSolver):
    """Breaks the contract on purpose: a NaN result past the loop's checks, or a raw error."""

    name = "faulty"
    order = 1

    def __init__(self, fault):
        object.__setattr__(self, "fault", fault)

    def solve(self, model, x, grid, **kwargs):
        if self.fault == "raise":
            raise ValueError("from deep inside")
        return solverlab.Solution(x=x * float("nan"), nfe=0, times=torch.as_tensor(grid))


@pytest.mark.parametrize(("fault", "error", "says"), [
    ("nan", AssertionError, "non-finite values with check_finite=True"),
    ("raise", ValueError, "from deep inside"),
])
def test_run_case_fails_a_breach_of_the_contract(monkeypatch, fault, error, says):
    import solverlab.testing.fuzz as fuzz

    monkeypatch.setattr(fuzz, "get_solver", lambda name, **opts: _Faulty(fault))
    with pytest.raises(error, match=says):
        run_case(_case(), time_limit=5)


def test_run_case_fails_a_run_past_the_time_bound(monkeypatch):
    import time

    import solverlab.testing.fuzz as fuzz

    class Slow(_Faulty):
        def solve(self, model, x, grid, **kwargs):
            time.sleep(5)

    monkeypatch.setattr(fuzz, "get_solver", lambda name, **opts: Slow("slow"))
    with pytest.raises(AssertionError, match=r"ran past the time bound of 0\.2 s"):
        run_case(_case(), time_limit=0.2)
