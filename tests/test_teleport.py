"""The ``teleport`` solver (plugin ``solverlab_teleport``; Wang & Vastola 2024): the jump is the
exact probability-flow solution for Gaussian data at any skip, the rest of the solve is the
inner solver's on the remaining interval, NFE = steps, truncated eigenbases against a direct
matrix-function computation, ``skip="auto"``, composition (dpmpp-2m, unipc, dpm-solver-3m,
dpmv3), real networks, and the option errors."""

from __future__ import annotations

import math

import pytest
import torch

import solverlab
from solverlab import OptionError
from solverlab.analytic import AnalyticModel, GaussianMixtureData, GaussianModel
from solverlab.model import TorchModel
from solverlab.reference import reference_solution
from solverlab.testing import CountingModel, TimeMLP, check_solver, make_problem
from solverlab.testing.order import assert_convergence_order
from solverlab_teleport import AUTO_SKIPS, GaussianFit, Teleport, fit_error

F64 = torch.float64


def _gaussian(schedule: str = "vp-linear", dim: int = 4, seed: int = 0) -> GaussianModel:
    return solverlab.get_model("gaussian", dim=dim, seed=seed, schedule=schedule)


def _mixture(dim: int = 8, seed: int = 0, schedule: str = "vp-linear") -> AnalyticModel:
    """Three well-separated, narrow modes."""
    data = GaussianMixtureData.random(dim, 3, seed=seed, var_min=0.05, var_max=0.3,
                                      mean_scale=1.5)
    return AnalyticModel(data=data, schedule=schedule)


def _start(model, n: int = 8, seed: int = 0) -> torch.Tensor:
    return model.sample_prior(n, generator=torch.Generator().manual_seed(seed))


def _train(model, n: int = 2000, seed: int = 1) -> torch.Tensor:
    """Training samples: draws from the data distribution, never the batch being solved."""
    return model.data.sample(n, generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(F64) - b.to(F64)).norm() / b.to(F64).norm())


def _exact_teleport(model: GaussianModel, **options) -> Teleport:
    g = model.data
    return solverlab.get_solver("teleport", mean=g.mean, cov=g.cov, **options)


# -- registration and defaults -----------------------------------------------------------------
def test_registered_by_the_plugin_with_the_inner_solvers_order():
    entry = solverlab.get_registry().entry("solver", "teleport")
    assert entry.plugin == "solverlab_teleport" and entry.cls is Teleport
    default = solverlab.get_solver("teleport")
    assert default.skip == 0.0 and default.inner_solver.name == "dpmpp-2m"
    assert default.convergence_order == 2
    assert solverlab.get_solver("teleport", inner="unipc").convergence_order == 3
    assert solverlab.get_solver("teleport", inner="dpm-solver-3m",
                                inner_options={"official_d2": True}).convergence_order == 2


def test_skip_zero_is_the_inner_solver_alone():
    model = _mixture(dim=3)
    x, grid = _start(model), solverlab.get_grid("logsnr")(model.schedule, 7)
    ours = solverlab.get_solver("teleport", inner="unipc").solve(model, x, grid, progress=False)
    theirs = solverlab.get_solver("unipc").solve(model, x, grid, progress=False)
    assert torch.equal(ours.x, theirs.x) and ours.nfe == theirs.nfe == 7
    assert torch.equal(ours.times, grid)


# -- exactness for Gaussian data ---------------------------------------------------------------
@pytest.mark.parametrize("skip", (0.1, 0.3, 0.5, 0.7, 0.95))
@pytest.mark.parametrize("schedule", ("vp-linear", "vp-cosine", "edm"))
def test_the_jump_is_the_exact_flow_for_gaussian_data(schedule, skip):
    """The jump lands on the exact probability-flow solution at ``t_skip`` (to 1e-10), and
    ``t_skip`` is ``skip`` of the way along the grid's lambda range."""
    model = _gaussian(schedule)
    x = _start(model)
    grid = solverlab.get_grid("karras")(model.schedule, 8)
    solver = _exact_teleport(model, skip=skip)
    new = solver.remaining_grid(model.schedule, grid)
    lam = model.schedule.lambda_(torch.stack([grid[0], new[0], grid[-1]]))
    assert float((lam[1] - lam[0]) / (lam[2] - lam[0])) == pytest.approx(skip, abs=1e-12)
    assert new.shape == grid.shape and float(new[-1]) == float(grid[-1])
    jumped = solver.jump(x, model.schedule, float(grid[0]), float(new[0]))
    assert _rel(jumped, model.exact_flow(x, grid[0], new[0])) < 1e-10


@pytest.mark.parametrize("skip", (0.0, 0.3, 0.7))
@pytest.mark.parametrize(("inner", "options"), [("dpmpp-2m", {}), ("unipc", {}),
                                                ("dpm-solver-3m", {}), ("heun", {}),
                                                ("ddim", {})])
def test_the_solve_is_the_inner_solve_from_the_exact_state(inner, options, skip):
    """Teleport + inner equals the inner solver started from the exact solution at
    ``t_skip`` on the remaining grid: its error is the inner solver's error on the
    remaining interval; NFE = the inner solver's (``steps`` for the multistep ones)."""
    model = _gaussian()
    x = _start(model)
    grid = solverlab.get_grid("logsnr")(model.schedule, 10)
    solver = _exact_teleport(model, inner=inner, inner_options=options, skip=skip)
    counter = CountingModel(model)
    sol = solver.solve(counter, x, grid, progress=False)
    new = solver.remaining_grid(model.schedule, grid)
    start = model.exact_flow(x, grid[0], new[0]) if skip else x
    alone = solverlab.get_solver(inner, **options).solve(model, start, new, progress=False)
    assert _rel(sol.x, alone.x) < 1e-12
    assert sol.nfe == counter.calls == alone.nfe == solver.expected_nfe(10)
    if inner != "heun":
        assert sol.nfe == 10
    exact = model.exact_flow(x, grid[0], grid[-1])
    assert _rel(sol.x, exact) == pytest.approx(_rel(alone.x, exact), rel=1e-6)


def test_the_order_on_gaussian_data_is_the_inner_solvers():
    """The jump is exact, so teleport + UniPC-3 converges with order 3 at a fixed skip."""
    problem = make_problem("vp-linear", dim=3, components=1, seed=2)
    g = problem.model.data.gaussian
    solver = solverlab.get_solver("teleport", inner="unipc", skip=0.4, mean=g.mean, cov=g.cov)
    assert abs(assert_convergence_order(solver, problem) - 3) <= 0.3


# -- the fit -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", (200, 6, 3))
def test_the_fit_is_the_sample_mean_and_covariance(n):
    """Through ``eigh`` (``n > d``) or the SVD of the centred samples (``n <= d``)."""
    data = torch.randn(n, 2, 3, generator=torch.Generator().manual_seed(n), dtype=F64)
    fit = GaussianFit.from_data(data)
    flat = data.reshape(n, -1)
    assert torch.allclose(fit.mean, flat.mean(0), atol=1e-14)
    cov = fit.eigenvectors @ torch.diag(fit.eigenvalues) @ fit.eigenvectors.mT
    assert torch.allclose(cov, torch.cov(flat.mT), atol=1e-12)
    assert fit.shape == (2, 3) and bool((fit.eigenvalues[:-1] >= fit.eigenvalues[1:]).all())


def _direct_flow(mean, cov, x, s_s, s_t, a_s=1.0, a_t=1.0):
    """``x~_t = mu + (C + s_t^2 I)^(1/2) (C + s_s^2 I)^(-1/2) (x~_s - mu)`` with matrix
    functions of the full ``d x d`` covariance (an independent route: no eigenbasis split)."""
    d = cov.shape[0]

    def power(m, p):
        w, v = torch.linalg.eigh(m)
        return v @ torch.diag(w**p) @ v.mT

    eye = torch.eye(d, dtype=F64)
    m = power(cov + s_t**2 * eye, 0.5) @ power(cov + s_s**2 * eye, -0.5)
    return a_t * (mean + (x / a_s - mean) @ m.mT)


@pytest.mark.parametrize("rank", (1, 3, 5))
def test_truncated_eigenbasis_moves_the_rest_as_noise(rank):
    """``rank`` keeps the largest eigenpairs; the rest of the state scales by ``s_t/s_s``,
    i.e. the flow of the covariance with the dropped eigenvalues set to 0, computed directly."""
    d = 6
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(d, d, generator=gen, dtype=F64)
    cov = a @ a.mT / d + 0.1 * torch.eye(d, dtype=F64)
    mean = torch.randn(d, generator=gen, dtype=F64)
    x = torch.randn(5, d, generator=gen, dtype=F64) * 3
    w, v = torch.linalg.eigh(cov)
    keep = v[:, -rank:]
    cov_r = keep @ torch.diag(w[-rank:]) @ keep.mT
    fit = GaussianFit.from_moments(mean, cov, rank=rank)
    for (a_s, s_s), (a_t, s_t) in [((0.3, 0.9539), (0.9, 0.4359)), ((1.0, 40.0), (1.0, 0.5))]:
        ours = fit.flow(x, a_s, s_s, a_t, s_t)
        direct = _direct_flow(mean, cov_r, x, s_s / a_s, s_t / a_t, a_s, a_t)
        assert _rel(ours, direct) < 1e-12
    full = GaussianFit.from_moments(mean, cov, rank=d).flow(x, 1.0, 40.0, 1.0, 0.5)
    assert _rel(full, _direct_flow(mean, cov, x, 40.0, 0.5)) < 1e-12
    # from data, the same truncation of the sample covariance
    data = torch.randn(300, d, generator=gen, dtype=F64) @ a.mT
    by_data = GaussianFit.from_data(data, rank=rank)
    by_moments = GaussianFit.from_moments(data.mean(0), torch.cov(data.mT), rank=rank)
    assert _rel(by_data.flow(x, 1.0, 40.0, 1.0, 0.5), by_moments.flow(x, 1.0, 40.0, 1.0, 0.5)
                ) < 1e-12


def test_rank_equal_to_the_dimension_is_the_full_fit():
    model = _gaussian(dim=5)
    x, grid = _start(model), solverlab.get_grid("logsnr")(model.schedule, 6)
    data = _train(model, 500)
    full = solverlab.get_solver("teleport", skip=0.4, data=data)
    same = solverlab.get_solver("teleport", skip=0.4, data=data, rank=5)
    assert _rel(same.solve(model, x, grid, progress=False).x,
                full.solve(model, x, grid, progress=False).x) < 1e-12


# -- grids, solutions, callbacks -----------------------------------------------------------------
def test_spacing_of_the_remaining_interval():
    model = _mixture(dim=3)
    s = model.schedule
    grid = solverlab.get_grid("logsnr")(s, 9)
    data = _train(model, 300)
    kept = solverlab.get_solver("teleport", skip=0.3, data=data)
    new = kept.remaining_grid(s, grid)
    # keeping the grid's spacing in lambda: on a logsnr grid that is the rule itself
    assert torch.allclose(new, solverlab.get_grid("logsnr")(s, 9, t_start=float(new[0])),
                          rtol=1e-12, atol=0)
    karras = solverlab.get_solver("teleport", skip=0.3, data=data, spacing="karras")
    expect = solverlab.get_grid("karras")(s, 9, t_start=float(new[0]))
    assert torch.equal(karras.remaining_grid(s, grid), expect)
    with pytest.raises(OptionError, match=r"option spacing='linspace'.*t_start/t_end"):
        solverlab.get_solver("teleport", skip=0.3, data=data, spacing="linspace").solve(
            model, _start(model), grid, progress=False)


def test_solution_times_trajectory_and_callbacks():
    model = _mixture(dim=3)
    x, grid = _start(model, 4), solverlab.get_grid("time-uniform")(model.schedule, 5)
    solver = solverlab.get_solver("teleport", skip=0.5, data=_train(model, 300))
    seen = []
    sol = solver.solve(model, x, grid, trajectory=True, progress=False,
                       callback=lambda info: seen.append((info.i, float(info.t_next))))
    new = solver.remaining_grid(model.schedule, grid)
    assert torch.equal(sol.times, torch.cat([grid[:1], new]))
    assert sol.trajectory.shape == (7, 4, 3)
    assert torch.equal(sol.trajectory[0], x) and torch.equal(sol.trajectory[-1], sol.x)
    assert _rel(sol.trajectory[1], solver.jump(x, model.schedule, float(grid[0]),
                                               float(new[0]))) == 0.0
    assert seen == [(i, float(new[i + 1])) for i in range(5)]
    # the state-by-state interface gives the same result (no graph, as in a solve)
    with torch.no_grad():
        state = solver.init(solverlab.as_denoiser(model), x.clone(), grid)
        for _ in range(state.steps):
            state = solver.step(state)
    assert torch.equal(state.grid, new) and torch.equal(state.x, sol.x)


# -- composition and accuracy on a mixture -------------------------------------------------------
@pytest.mark.parametrize("inner", ("dpmpp-2m", "unipc"))
def test_teleport_improves_few_step_solves_on_a_mixture(inner):
    """10 steps on three separated modes (8-D): jumping over the first 35% of the lambda
    range with the Gaussian fitted to 2000 training samples gives all steps to the part where
    the modes separate (measured: dpmpp-2m 3.8e-2 -> 1.6e-2)."""
    model = _mixture()
    x = _start(model, 64)
    grid = solverlab.get_grid("logsnr")(model.schedule, 10)
    ref = reference_solution(model, x, float(grid[0]), float(grid[-1]))
    plain = _rel(solverlab.get_solver(inner).solve(model, x, grid, progress=False).x, ref)
    tele = solverlab.get_solver("teleport", inner=inner, skip=0.35, data=_train(model))
    ours = tele.solve(model, x, grid, progress=False)
    assert ours.nfe == 10
    assert _rel(ours.x, ref) < 0.6 * plain


def test_composes_with_dpmv3():
    """DPM-Solver-v3 with EMS computed on training data (small: 100 cells, 256 samples), as
    an instance and through ``prepare`` (which also fits the Gaussian)."""
    model = _mixture(dim=4)
    x, grid = _start(model, 16), solverlab.get_grid("logsnr")(model.schedule, 8)
    data = _train(model, 512)
    ems = solverlab.compute_ems(model, data, grid_size=100, samples=256, progress=False)
    v3 = solverlab.get_solver("dpmv3", ems=ems)
    tele = solverlab.get_solver("teleport", inner=v3, skip=0.3, data=data)
    sol = tele.solve(model, x, grid, progress=False)
    new = tele.remaining_grid(model.schedule, grid)
    alone = v3.solve(model, tele.jump(x, model.schedule, float(grid[0]), float(new[0])), new,
                     progress=False)
    assert sol.nfe == 8 and torch.equal(sol.x, alone.x)
    ref = reference_solution(model, x, float(grid[0]), float(grid[-1]))
    assert _rel(sol.x, ref) < 0.1
    prepared = solverlab.get_solver("teleport", inner="dpmv3", skip=0.3).prepare(model, data)
    assert prepared.inner_solver.ems is not None and prepared.fit is not None
    assert prepared.solve(model, x, grid, progress=False).nfe == 8


def test_prepare_keeps_a_given_gaussian():
    model = _gaussian()
    g = model.data
    solver = solverlab.get_solver("teleport", skip=0.2, mean=g.mean, cov=g.cov)
    assert solver.prepare(model, _train(model, 50)) is solver


def test_with_a_network_and_gradients():
    """A real network (TimeMLP, trainable parameters): float32 and float64 solves agree, and
    ``grad=True`` differentiates through the jump and the inner solve (finite differences)."""
    net = TorchModel(TimeMLP(6), "vp-linear", "noise")
    data = torch.randn(400, 2, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    solver = solverlab.get_solver("teleport", inner="unipc", skip=0.3, data=data)
    x = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    grid = solverlab.get_grid("logsnr")(net.schedule, 5)
    y64 = solver.solve(TorchModel(TimeMLP(6).double(), "vp-linear", "noise"), x, grid,
                       progress=False)
    y32 = solver.solve(net, x.float(), grid, progress=False)
    assert y32.x.dtype == torch.float32 and not y32.x.requires_grad
    assert float((y32.x.double() - y64.x).abs().max()) < 1e-4
    model = TorchModel(TimeMLP(6).double(), "vp-linear", "noise")
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=F64)

    def loss(x0):
        return (solver.solve(model, x0, grid, progress=False, grad=True).x * w).sum()

    xr = x.clone().requires_grad_(True)
    loss(xr).backward()
    eps = 1e-6
    with torch.no_grad():
        fd = (loss(x + eps * v) - loss(x - eps * v)) / (2 * eps)
    assert float((xr.grad * v).sum()) == pytest.approx(float(fd), rel=1e-6)
    assert all(p.grad is not None for p in model.module.parameters())


def test_conformance_kit_with_another_inner_solver():
    report = check_solver("teleport", inner="dpm-solver-2m")
    assert report.declared_order == 2 and abs(report.order - 2) <= 0.3


# -- skip="auto" -------------------------------------------------------------------------------
def test_auto_skip_is_larger_for_nearly_gaussian_data():
    """The fit's velocity error stays below the tolerance over a longer stretch for Gaussian
    data (only the sampling error of 2000 samples shows) than for separated modes."""
    schedule = solverlab.get_schedule("vp-linear")
    grid = solverlab.get_grid("logsnr")(schedule, 10)
    gauss = _gaussian(dim=8, seed=1)
    modes = _mixture()
    near = solverlab.get_solver("teleport", skip="auto", data=_train(gauss))
    far = solverlab.get_solver("teleport", skip="auto", data=_train(modes))
    s_near, s_far = near.skip_for(schedule, grid), far.skip_for(schedule, grid)
    assert s_near in AUTO_SKIPS and s_far in AUTO_SKIPS
    assert s_near > s_far >= 0.2
    # the rule: every candidate up to the chosen skip within the tolerance, the next one not
    lam0, lam1 = schedule.lambda_min, schedule.lambda_max
    skips = torch.tensor([k for k in AUTO_SKIPS if k <= s_far + 0.05 + 1e-9][1:], dtype=F64)
    err = fit_error(far.fit, far.data, torch.exp(-(lam0 + skips * (lam1 - lam0))))
    assert bool((err[:-1] <= far.tolerance).all()) and float(err[-1]) > far.tolerance
    stricter = solverlab.get_solver("teleport", skip="auto", data=_train(modes), tolerance=0.005)
    assert stricter.skip_for(schedule, grid) < s_far
    # the chosen skip is used by the solve
    sol = far.solve(modes, _start(modes), grid, progress=False)
    new = far.remaining_grid(schedule, grid)
    assert torch.equal(sol.times[1:], new) and sol.nfe == 10


def test_fit_error_vanishes_at_high_noise_and_grows_at_low_noise():
    model = _mixture(dim=4)
    data = _train(model, 1000)
    fit = GaussianFit.from_data(data)
    err = fit_error(fit, data, torch.tensor([100.0, 10.0, 1.0, 0.1], dtype=F64))
    assert float(err[0]) < 1e-4 and bool((err[1:] > err[:-1]).all()) and float(err[-1]) > 0.3


# -- option errors ---------------------------------------------------------------------------
@pytest.mark.parametrize("skip", (1.0, -0.1, 1.5, math.nan, True, "half", None))
def test_skip_outside_zero_one(skip):
    with pytest.raises(OptionError, match=rf"option skip={skip!r} is not allowed; .*\[0, 1\)"):
        solverlab.get_solver("teleport", skip=skip)


def test_bad_data_and_moments():
    model = _gaussian(dim=3)
    data = _train(model, 100)
    get = solverlab.get_solver
    with pytest.raises(OptionError, match=r"option data=.* \(n, \*shape\) with n >= 2; got "
                                          r"shape \(100,\)"):
        get("teleport", skip=0.2, data=data[:, 0])
    with pytest.raises(OptionError, match=r"shape \(1, 3\)"):
        get("teleport", skip=0.2, data=data[:1])
    with pytest.raises(OptionError, match=r"option data=.* must be finite"):
        get("teleport", data=torch.full((4, 3), math.nan))
    with pytest.raises(OptionError, match="data and mean/cov both give the Gaussian"):
        get("teleport", data=data, mean=model.data.mean, cov=model.data.cov)
    with pytest.raises(OptionError, match="option mean needs option cov"):
        get("teleport", mean=model.data.mean)
    bad = torch.tensor([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
    with pytest.raises(OptionError, match=r"option cov=.*positive semi-definite; its smallest "
                                          r"eigenvalue is -1"):
        get("teleport", mean=torch.zeros(3), cov=bad)
    with pytest.raises(OptionError, match=r"option cov=.*symmetric"):
        get("teleport", mean=torch.zeros(3), cov=torch.triu(torch.ones(3, 3)))
    with pytest.raises(OptionError, match=r"option cov=.*shape \(3, 3\) or \(3,\)"):
        get("teleport", mean=torch.zeros(3), cov=torch.eye(2))
    with pytest.raises(OptionError, match="skip='auto' estimates the fit's error on data"):
        get("teleport", skip="auto", mean=torch.zeros(3), cov=torch.eye(3))
    with pytest.raises(OptionError, match=r"option rank=4 .* at most the data's dimension 3"):
        get("teleport", data=data, rank=4)
    with pytest.raises(OptionError, match="option rank=0"):
        get("teleport", data=data, rank=0)
    with pytest.raises(OptionError, match="option tolerance=0"):
        get("teleport", tolerance=0)
    # a shape that does not fit the samples being solved: named at the solve
    x, grid = _start(model, 2), solverlab.get_grid("logsnr")(model.schedule, 3)
    wrong = get("teleport", skip=0.3, data=torch.randn(50, 3, 1, dtype=F64))
    with pytest.raises(OptionError, match=r"option data holds samples of shape \(3, 1\), but "
                                          r"x has samples of shape \(3,\)"):
        wrong.solve(model, x, grid, progress=False)
    with pytest.raises(OptionError, match=r"skip=0.3 jumps along a Gaussian fit, and none was "
                                          r"given: give data="):
        get("teleport", skip=0.3).solve(model, x, grid, progress=False)


def test_bad_inner_solvers():
    get = solverlab.get_solver
    with pytest.raises(OptionError, match=r"option inner='dpmpp-9m' is not allowed; unknown "
                                          r"solver 'dpmpp-9m' \(did you mean"):
        get("teleport", inner="dpmpp-9m")
    with pytest.raises(OptionError, match=r"option inner_options=\{'bogus': 1\} .* solver "
                                          r"'dpmpp-2m'.*no option 'bogus'"):
        get("teleport", inner_options={"bogus": 1})
    with pytest.raises(OptionError, match=r"option inner_options=.*give options with an inner "
                                          r"solver's name"):
        get("teleport", inner=get("unipc"), inner_options={"variant": "bh1"})
    with pytest.raises(OptionError, match=r"option inner=3 .* a registered solver name or a "
                                          r"Solver instance"):
        get("teleport", inner=3)
    with pytest.raises(OptionError, match=r"option spacing='nope'.*unknown grid"):
        get("teleport", spacing="nope")
