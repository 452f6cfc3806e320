"""solverlab_torchdiffeq: every torchdiffeq method registered, exact NFE, accuracy against the
tolerance, per-sample solves, failures as SolverlabError. (The fixed-grid methods' orders are
checked by tests/test_conformance.py, which runs the conformance kit on every registered
solver.)"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import solverlab
from solverlab import AdaptiveSolver, OptionError, SolverDivergedError, SolverlabError
from solverlab.analytic import AnalyticModel
from solverlab.testing import CountingModel, make_problem
from solverlab.testing.order import solution_error
from solverlab_torchdiffeq import ADAPTIVE_ORDERS, TorchdiffeqError

F64 = torch.float64
METHODS = set(sys.modules["torchdiffeq._impl.odeint"].SOLVERS) - {"scipy_solver"}
ADAPTIVE = sorted(m for m in METHODS if m in ADAPTIVE_ORDERS)

#: Documented accuracy factor: on the Gaussian-mixture problems below the final error
#: (largest per-sample L2 norm) stays within FACTOR * tol * max(1, scale) for rtol = atol = tol.
#: Measured worst case (vp-linear, vp-cosine, edm x seeds 0-3, tol 1e-3..1e-8): dopri5 3.7,
#: bosh3 8.6.
FACTOR = 30.0


def _ends(problem):
    return torch.tensor([problem.t_start, problem.t_end], dtype=F64)


def test_every_torchdiffeq_method_is_registered():
    names = set(solverlab.get_registry().names("solver"))
    assert {f"torchdiffeq-{m}" for m in METHODS} <= names
    for m in ADAPTIVE:
        assert isinstance(solverlab.get_solver(f"torchdiffeq-{m}"), AdaptiveSolver)
    for m in ("euler", "midpoint", "rk4", "explicit_adams"):
        assert not isinstance(solverlab.get_solver(f"torchdiffeq-{m}"), AdaptiveSolver)


@pytest.mark.parametrize("variable", ["lambda", "t", "log_sigma"])
@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_adaptive_nfe_is_exact_and_error_is_near_tol(method, variable):
    problem = make_problem("vp-linear", dim=3, components=2, seed=0)
    model = CountingModel(problem.model)
    sol = solverlab.get_solver(f"torchdiffeq-{method}", rtol=1e-6, atol=1e-6,
                               variable=variable).solve(model, problem.x, _ends(problem))
    assert sol.nfe == model.calls > 0
    assert solution_error(sol.x, problem.reference()) < FACTOR * 1e-6 * max(1.0, problem.scale)
    assert torch.equal(sol.times, _ends(problem))


@given(seed=st.integers(0, 3), schedule=st.sampled_from(["vp-linear", "vp-cosine", "edm"]),
       method=st.sampled_from(["dopri5", "bosh3"]))
def test_adaptive_error_falls_with_the_tolerance_and_stays_near_it(seed, schedule, method):
    problem = make_problem(schedule, dim=3, components=2, seed=seed)
    ref, scale = problem.reference(), max(1.0, problem.scale)
    errors, nfes = [], []
    for tol in (1e-4, 1e-6, 1e-8):
        sol = solverlab.get_solver(f"torchdiffeq-{method}", rtol=tol, atol=tol).solve(
            problem.model, problem.x, _ends(problem))
        errors.append(solution_error(sol.x, ref))
        nfes.append(sol.nfe)
        assert errors[-1] <= FACTOR * tol * scale, (tol, errors)
    # 100x tighter tolerance: clearly smaller error, more work
    assert errors[2] < errors[1] < errors[0] and nfes[0] < nfes[1] < nfes[2], (errors, nfes)


def test_per_sample_gives_each_sample_its_own_solve():
    problem = make_problem("vp-linear", dim=3, components=2, seed=1)
    solver = solverlab.get_solver("torchdiffeq-dopri5", rtol=1e-5, atol=1e-5, per_sample=True)
    model = CountingModel(problem.model)
    batch = solver.solve(model, problem.x, _ends(problem))
    assert batch.nfe == model.calls
    alone_nfe = 0
    for i in range(problem.x.shape[0]):
        alone = solverlab.get_solver("torchdiffeq-dopri5", rtol=1e-5, atol=1e-5).solve(
            problem.model, problem.x[i:i + 1], _ends(problem))
        assert torch.allclose(batch.x[i:i + 1], alone.x, rtol=0, atol=1e-12)
        alone_nfe += alone.nfe
    assert batch.nfe == alone_nfe


class NaNModel(AnalyticModel):
    """Returns NaN below t = 0.5."""

    def __call__(self, x, t, **cond):
        out = super().__call__(x, t, **cond)
        return torch.where((t < 0.5).view(-1, 1), torch.full_like(out, float("nan")), out)


def test_underflow_in_dt_becomes_a_solverlab_error_with_advice():
    base = make_problem("vp-linear", dim=3, components=2, seed=0).model
    model = NaNModel(data=base.data, schedule=base.schedule,
                     parameterization=base.parameterization)
    x = make_problem("vp-linear", dim=3, components=2, seed=0).x
    with pytest.raises(TorchdiffeqError) as info:
        solverlab.get_solver("torchdiffeq-dopri5").solve(model, x, [1.0, 1e-3])
    assert isinstance(info.value, SolverDivergedError) and isinstance(info.value, SolverlabError)
    msg = str(info.value)
    assert "underflow in dt" in msg and "rtol" in msg and "variable" in msg


def test_max_num_steps_becomes_a_solverlab_error():
    problem = make_problem("vp-linear", dim=3, components=2, seed=0)
    with pytest.raises(TorchdiffeqError, match="max_num_steps"):
        solverlab.get_solver("torchdiffeq-dopri5", rtol=1e-12, atol=1e-12,
                             max_num_steps=3).solve(problem.model, problem.x, _ends(problem))


@pytest.mark.parametrize(("name", "option", "value"), [
    ("torchdiffeq-dopri5", "rtol", 0.0), ("torchdiffeq-dopri5", "atol", -1.0),
    ("torchdiffeq-bosh3", "variable", "x"), ("torchdiffeq-rk4", "per_sample", 1),
    ("torchdiffeq-dopri5", "safety", 2.0), ("torchdiffeq-dopri5", "max_num_steps", 0),
    ("torchdiffeq-explicit_adams", "max_order", 3), ("torchdiffeq-dopri5", "first_step", 0.0),
])
def test_bad_options_name_the_option(name, option, value):
    with pytest.raises(OptionError, match=rf"option {option}="):
        solverlab.get_solver(name, **{option: value})


def test_variables_are_different_odes_with_the_same_solution():
    # On a VE schedule (alpha = 1) "lambda" and "log_sigma" are the same ODE in mirrored
    # variables; on VP the state differs (x/alpha vs x). Every variable converges at rk4's rate.
    for schedule in ("edm", "vp-linear"):
        problem = make_problem(schedule, dim=3, components=2, seed=0)
        errs = {}
        for v in ("lambda", "t", "log_sigma"):
            xs = [solverlab.get_solver("torchdiffeq-rk4", variable=v).solve(
                problem.model, problem.x,
                solverlab.get_grid("logsnr")(problem.model.schedule, n)).x for n in (16, 32)]
            errs[v] = [solution_error(x, problem.reference()) for x in xs]
            errs[v + "-x"] = xs[1]
            assert errs[v][1] < errs[v][0] / 8, (schedule, v, errs[v])
        same = torch.allclose(errs["lambda-x"], errs["log_sigma-x"], rtol=0, atol=1e-12)
        assert same == (schedule == "edm")


# -- the loop: per-step callbacks, progress, the record --------------------------------------

@pytest.mark.parametrize("method", ["euler", "rk4", "explicit_adams", "implicit_adams"])
def test_fixed_grid_reports_each_step_as_it_happens(method):
    problem = make_problem("vp-linear", dim=3, components=2, seed=0)
    model = CountingModel(problem.model)
    grid = solverlab.get_grid("logsnr")(problem.model.schedule, 6)
    seen = []

    def callback(info):
        seen.append((info.i, model.calls, info.nfe, info.x.clone()))
        assert isinstance(info, solverlab.StepInfo)

    sol = solverlab.get_solver(f"torchdiffeq-{method}").solve(
        model, problem.x, grid, callback=callback, trajectory=True)
    assert [s[0] for s in seen] == list(range(6))
    calls = [s[1] for s in seen]
    assert calls == sorted(set(calls)) and calls[0] < sol.nfe  # during the solve, not after it
    assert all(c == n for _, c, n, _ in seen) and calls[-1] == sol.nfe
    for i, (_, _, _, x) in enumerate(seen):
        assert torch.equal(x, sol.trajectory[i + 1])
    assert torch.equal(sol.trajectory[0], problem.x)


def test_fixed_grid_denoised_is_the_last_evaluation_of_the_step():
    # torchdiffeq's euler evaluates once per step, at its start (x_i, t_i)
    problem = make_problem("vp-linear", dim=3, components=2, seed=0)
    grid = solverlab.get_grid("logsnr")(problem.model.schedule, 4)
    seen = []
    sol = solverlab.get_solver("torchdiffeq-euler").solve(
        problem.model, problem.x, grid, callback=seen.append, trajectory=True)
    den = solverlab.Denoiser(problem.model)
    for info in seen:
        want = den.data(sol.trajectory[info.i], grid[info.i])
        torch.testing.assert_close(info.denoised, want, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("per_sample", [False, True])
def test_every_family_passes_the_same_record(per_sample):
    problem = make_problem("vp-linear", dim=3, components=2, seed=0)
    grid = solverlab.get_grid("logsnr")(problem.model.schedule, 3)
    keys = {"i", "t", "t_next", "sigma", "sigma_hat", "x", "denoised", "nfe", "state"}
    for name in ("torchdiffeq-rk4", "torchdiffeq-dopri5", "heun"):
        opts = {} if name == "heun" else {"per_sample": per_sample}
        seen = []
        solverlab.get_solver(name, **opts).solve(problem.model, problem.x, grid,
                                                 callback=seen.append)
        assert seen and all(isinstance(s, solverlab.StepInfo) for s in seen)
        assert all(set(s) == keys for s in seen), name
        assert all(s["denoised"].shape == problem.x.shape for s in seen), name
        assert float(seen[0]["sigma"]) == pytest.approx(
            float(problem.model.schedule.sigma_ve(grid[0])), rel=1e-14)


def test_fixed_grid_honours_progress(monkeypatch):
    bars = []

    class Bar:  # stands in for tqdm: records what the loop tells it
        def __init__(self, total, desc, disable, leave):
            self.total, self.desc, self.disable, self.updates = total, desc, disable, []
            bars.append(self)

        def update(self, n=1):
            self.updates.append(model.calls)

        def close(self):
            pass

    import solverlab.solver

    monkeypatch.setattr(solverlab.solver, "tqdm", Bar)
    problem = make_problem("vp-linear", dim=3, components=2, seed=0)
    model = CountingModel(problem.model)
    grid = solverlab.get_grid("logsnr")(problem.model.schedule, 5)
    for progress in (True, False):
        solverlab.get_solver("torchdiffeq-rk4").solve(model, problem.x, grid, progress=progress)
    on, off = bars
    assert (on.desc, on.total, on.disable, off.disable) == ("torchdiffeq-rk4", 5, False, True)
    assert on.updates == [4, 8, 12, 16, 20]  # one update per step, as the step ends


# -- implicit Adams: an unconverged corrector is an error, never a warning ---------------------

def test_unconverged_adams_moulton_corrector_raises_naming_the_step():
    problem = make_problem("vp-linear", dim=3, components=2, seed=0)
    grid = solverlab.get_grid("logsnr")(problem.model.schedule, 5)
    solver = solverlab.get_solver("torchdiffeq-implicit_adams", variable="sigma", max_iters=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchdiffeq's warning must not escape
        with pytest.raises(TorchdiffeqError) as info:
            solver.solve(problem.model, problem.x, grid)
    msg = str(info.value)
    assert "did not converge at step 3 of 5" in msg and "max_iters=4" in msg
    assert f"{float(grid[2]):.6g} -> {float(grid[3]):.6g}" in msg
    assert isinstance(info.value, SolverDivergedError)


@pytest.mark.parametrize("method", ["implicit_adams", "fixed_adams"])
def test_default_adams_moulton_converges_on_coarse_grids(method):
    # the defaults (variable='lambda', max_iters=30) converge where torchdiffeq's own warned
    problem = make_problem("vp-linear", dim=3, components=2, seed=0)
    solver = solverlab.get_solver(f"torchdiffeq-{method}")
    assert (solver.variable, solver.max_iters) == ("lambda", 30)
    for steps in (3, 5, 8):
        grid = solverlab.get_grid("logsnr")(problem.model.schedule, steps)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sol = solver.solve(problem.model, problem.x, grid)
        assert bool(torch.isfinite(sol.x).all())


def test_torchdiffeq_variable_defaults():
    assert solverlab.get_solver("torchdiffeq-heun3").variable == "sigma"
    assert solverlab.get_solver("torchdiffeq-dopri5").variable == "sigma"
    assert solverlab.get_solver("torchdiffeq-explicit_adams").variable == "lambda"


@pytest.mark.parametrize(("options", "dtype", "says"), [
    ({"rtol": 1e-30, "atol": 1e-30}, torch.float64, "rtol=1e-30 is below the resolution"),
    ({"rtol": 1e-7}, torch.float32, "or a float64 state"),
    ({"min_step": 1e3}, torch.float64, "min_step=1000.0 is larger than the whole interval"),
    ({"max_step": 1e-9}, torch.float64, "more than max_num_steps=100000"),
])
def test_unreachable_adaptive_settings_are_refused_before_the_solve(options, dtype, says):
    model = solverlab.get_model("gaussian-mixture")
    x = model.sample_prior(2).to(dtype)
    grid = solverlab.get_grid("logsnr")(model.schedule, 2)
    with pytest.raises(solverlab.OptionError, match=says):
        solverlab.get_solver("torchdiffeq-dopri5", **options).solve(model, x, grid)


def test_max_num_steps_beyond_int32_is_refused():
    # torchdiffeq keeps the count in int32: 2**40 used to leak an overflow from inside it.
    with pytest.raises(solverlab.OptionError, match=r"max_num_steps=1099511627776 .* 2147483647"):
        solverlab.get_solver("torchdiffeq-dopri5", max_num_steps=2**40)
