"""Solves through real networks: no graph by default, and ``solve(..., grad=True)``
differentiable with respect to the start state, the grid times and the parameters."""

from __future__ import annotations

import pytest
import torch

import solverlab
from solverlab.testing import TimeMLP, prepare_solver

F64 = torch.float64

FIXED_GRID = [n for n in solverlab.get_registry().names("solver")
              if not isinstance(solverlab.get_solver(n), solverlab.AdaptiveSolver)]


def _network_problem(schedule: str = "vp-linear", steps: int = 5):
    model = solverlab.TorchModel(TimeMLP(2, hidden=16, seed=3).double(), schedule, "noise")
    x = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    grid = solverlab.get_grid("logsnr")(model.schedule, steps)
    return model, x, grid


@pytest.mark.parametrize("schedule", ["vp-linear", "vp-discrete", "edm"])
@pytest.mark.parametrize(("name", "options"), [
    ("dpmpp-2m", {}),
    ("unipc", {}),
    ("unipc", {"predictor_order": 3, "variant": "bh1"}),
])
def test_gradcheck_through_the_solve_wrt_grid_times_and_x(name, options, schedule):
    # The searched-grid work differentiates the solution with respect to the inner grid times;
    # gradcheck compares autograd with finite differences of the whole solve (float64).
    model, x, grid = _network_problem(schedule)
    solver = solverlab.get_solver(name, **options)

    def solve(inner, x0):
        return solver.solve(model, x0, torch.cat([grid[:1], inner, grid[-1:]]), grad=True).x

    inner = grid[1:-1].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(solve, (inner, x.clone().requires_grad_(True)),
                                    eps=1e-7, atol=1e-6, rtol=1e-5)


def test_grid_gradient_is_the_derivative_of_the_error_along_a_time_shift():
    # An independent route: move one grid time by +-d and difference the exact-model error.
    model = solverlab.get_model("gaussian-mixture")
    x = model.sample_prior(16, generator=torch.Generator().manual_seed(1))
    grid = solverlab.get_grid("time-uniform")(model.schedule, 6)
    ref = solverlab.reference.reference_solution(model, x, grid[0], grid[-1])
    solver = solverlab.get_solver("dpmpp-2m")

    def error(g):
        return ((solver.solve(model, x, g, grad=True).x - ref) ** 2).sum()

    g = grid.clone().requires_grad_(True)
    error(g).backward()
    d, k = 1e-6, 3
    plus, minus = grid.clone(), grid.clone()
    plus[k] += d
    minus[k] -= d
    with torch.no_grad():
        fd = float((error(plus) - error(minus)) / (2 * d))
    assert float(g.grad[k]) == pytest.approx(fd, rel=1e-6)
    assert float(g.grad[k]) != 0.0


@pytest.mark.parametrize("name", FIXED_GRID)
def test_grad_path_gives_the_default_path_result(name):
    # The out-of-place path is the same arithmetic as the in-place one.
    model, x, grid = _network_problem(steps=6)
    # dpmv3 needs statistics of the network on data like its inputs'
    solver = prepare_solver(solverlab.get_solver(name), model,
                            data_model=solverlab.get_model("gaussian-mixture"))
    plain = solver.solve(model, x, grid).x
    traced = solver.solve(model, x.clone().requires_grad_(True), grid, grad=True).x
    assert traced.requires_grad and not plain.requires_grad
    assert float((traced.detach() - plain).abs().max()) <= 1e-13 * float(plain.abs().max())


def test_default_solve_of_a_network_builds_no_graph_and_leaves_parameters_alone():
    model, x, grid = _network_problem()
    x = x.clone().requires_grad_(True)  # even a start state that requires grad
    for name in ("dpmpp-2m", "unipc", "dpm-solver-3", "dpmpp-2s", "pndm-plms", "ddim"):
        out = solverlab.get_solver(name).solve(model, x, grid).x
        assert out.grad_fn is None and not out.requires_grad
    assert all(p.grad is None for p in model.module.parameters())


def test_grad_solve_does_not_poison_the_coefficient_cache():
    # A solve on a grid that requires grad computes tensor coefficients outside the per-grid
    # cache; a later plain solve on the same times still gets float coefficients.
    from solverlab_expint.integrator import per_grid

    model, x, grid = _network_problem()
    solver = solverlab.get_solver("dpmpp-2m")
    solver.solve(model, x, grid.clone().requires_grad_(True), grad=True).x.sum().backward()
    coef = per_grid(solver, model.schedule, grid)
    assert all(isinstance(a, float) for a in coef.a)
    with torch.enable_grad():
        traced = per_grid(solver, model.schedule, grid.clone().requires_grad_(True))
    assert all(isinstance(a, torch.Tensor) and a.requires_grad for a in traced.a)


def test_parameter_gradient_matches_a_finite_difference():
    model, x, grid = _network_problem()
    solver = solverlab.get_solver("unipc")
    weight = model.module.net[0].weight
    solver.solve(model, x, grid, grad=True).x.square().sum().backward()
    d = 1e-6
    with torch.no_grad():
        weight[0, 0] += d
        up = solver.solve(model, x, grid).x.square().sum()
        weight[0, 0] -= 2 * d
        down = solver.solve(model, x, grid).x.square().sum()
        weight[0, 0] += d
    assert float(weight.grad[0, 0]) == pytest.approx(float((up - down) / (2 * d)), rel=1e-6)
