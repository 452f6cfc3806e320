"""Multistep DPM-Solver in noise prediction (``dpm-solver-2m``, ``dpm-solver-3m``) against a
reference written out here from the official DPM-Solver code's multistep loop
(``DPM_Solver.sample(method="multistep")`` with ``model_type="noise"``: warm-up orders
``1..order-1``, then ``order``, lowered to ``min(order, steps + 1 - step)`` only when
``lower_order_final and steps < 10``), in float64; and the named ``lower_order_final`` rules.
diffusers' ``algorithm_type="dpmsolver"`` is checked in ``test_diffusers_crosscheck.py``."""

from __future__ import annotations

import pytest
import torch

import solverlab
from solverlab import OptionError
from solverlab.analytic import AnalyticModel, GaussianMixtureData
from solverlab.testing import CountingModel
from solverlab_expint.integrator import per_grid

F64 = torch.float64


def _model(schedule: str = "vp-linear") -> AnalyticModel:
    return AnalyticModel(data=GaussianMixtureData.random(4, 3, seed=5), schedule=schedule)


def official_multistep(model, x, grid, order: int, solver_type: str,
                       lower_order_final: bool) -> torch.Tensor:
    """The official multistep DPM-Solver loop (noise prediction), one update per step:

    - order 1: ``x_t = (alpha_t/alpha_s) x - sigma_t expm1(h) eps_0``;
    - order 2: ``D1_0 = (eps_0 - eps_1)/r0``, ``r0 = h_0/h``; ``dpmsolver``: ``- sigma_t
      expm1(h) (eps_0 + D1_0/2)``; ``taylor``: ``- sigma_t expm1(h) eps_0 - sigma_t
      (expm1(h)/h - 1) D1_0``;
    - order 3: ``D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1)``, ``D2 = (D1_0 - D1_1)/(r0+r1)``,
      ``phi_1 = expm1(h)``, ``phi_2 = phi_1/h - 1``, ``phi_3 = phi_2/h - 1/2``:
      ``- sigma_t (phi_1 eps_0 + phi_2 D1 + phi_3 D2)``.
    """
    s = model.schedule
    lam, log_a, sig = s.lambda_(grid), s.log_alpha(grid), s.sigma(grid)
    steps = grid.numel() - 1

    def eps(x, i):
        return model(x, grid[i].expand(x.shape[0]))

    hist = [(0, eps(x, 0))]  # (grid index, eps), newest last
    for step in range(1, steps + 1):
        if step < order:
            k = step
        elif lower_order_final and steps < 10:
            k = min(order, steps + 1 - step)
        else:
            k = order
        j, e0 = hist[-1]
        h = lam[step] - lam[j]
        phi1 = torch.expm1(h)
        x_new = torch.exp(log_a[step] - log_a[j]) * x - sig[step] * phi1 * e0
        if k >= 2:
            j1, e1 = hist[-2]
            r0 = (lam[j] - lam[j1]) / h
            d1_0 = (e0 - e1) / r0
            if k == 2:
                if solver_type == "dpmsolver":
                    x_new = x_new - 0.5 * sig[step] * phi1 * d1_0
                else:
                    x_new = x_new - sig[step] * (phi1 / h - 1.0) * d1_0
            else:
                j2, e2 = hist[-3]
                r1 = (lam[j1] - lam[j2]) / h
                d1_1 = (e1 - e2) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi2 = phi1 / h - 1.0
                phi3 = phi2 / h - 0.5
                x_new = x_new - sig[step] * (phi2 * d1 + phi3 * d2)
        x = x_new
        if step < steps:
            hist = [*hist, (step, eps(x, step))][-order:]
    return x


@pytest.mark.parametrize("steps", (3, 4, 6, 9, 10, 13))
@pytest.mark.parametrize("solver_type", ("dpmsolver", "taylor"))
@pytest.mark.parametrize("order", (2, 3))
@pytest.mark.parametrize("rule", ("time-uniform", "logsnr"))
def test_official_multistep_loop_in_float64(order, solver_type, steps, rule):
    """``lower_order_final="official"``, ``warmup="lower-order"`` and (order 3)
    ``official_d2=True`` reproduce the official loop to round-off at step counts on both
    sides of its threshold of 10."""
    model = _model()
    x = model.sample_prior(6, generator=torch.Generator().manual_seed(1))
    grid = solverlab.get_grid(rule)(model.schedule, steps)
    extra = {"official_d2": True, "warmup": "lower-order"} if order == 3 else {}
    solver = solverlab.get_solver(f"dpm-solver-{order}m", solver_type=solver_type,
                                  lower_order_final="official", **extra)
    counter = CountingModel(model)
    ours = solver.solve(counter, x, grid, progress=False)
    ref = official_multistep(model, x, grid, order, solver_type, lower_order_final=True)
    assert ours.nfe == counter.calls == steps
    rel = float((ours.x - ref).norm() / ref.norm())
    assert rel < 1e-12


def test_official_loop_without_lower_order_final():
    model = _model("vp-cosine")
    x = model.sample_prior(5, generator=torch.Generator().manual_seed(2))
    grid = solverlab.get_grid("logsnr")(model.schedule, 7)
    solver = solverlab.get_solver("dpm-solver-3m", official_d2=True, warmup="lower-order",
                                  lower_order_final=False)
    ref = official_multistep(model, x, grid, 3, "dpmsolver", lower_order_final=False)
    assert float((solver.solve(model, x, grid, progress=False).x - ref).norm()
                 / ref.norm()) < 1e-12


def _orders(solver, steps: int, rule: str = "logsnr") -> tuple[int, ...]:
    schedule = solverlab.get_schedule("vp-linear")
    return per_grid(solver, schedule, solverlab.get_grid(rule)(schedule, steps)).orders


@pytest.mark.parametrize("name", ("dpm-solver-3m", "dpmpp-3m"))
def test_official_rule_lowers_below_10_steps_only(name):
    official = solverlab.get_solver(name, lower_order_final="official")
    assert _orders(official, 9) == (1, 2, 3, 3, 3, 3, 3, 2, 1)
    assert _orders(official, 10) == (1, 2) + (3,) * 8
    diffusers_rule = solverlab.get_solver(name, lower_order_final="diffusers")
    assert _orders(diffusers_rule, 14)[-2:] == (2, 1)
    assert _orders(diffusers_rule, 15)[-2:] == (3, 3)
    # the same as the step-count rule with that threshold, corrected warm-up included
    same = solverlab.get_solver(name, lower_order_final=True, lower_order_final_threshold=10)
    schedule = solverlab.get_schedule("vp-linear")
    for steps in (5, 9, 10, 20):
        grid = solverlab.get_grid("time-uniform")(schedule, steps)
        a, b = per_grid(official, schedule, grid), per_grid(same, schedule, grid)
        assert (a.orders, a.a, a.c, a.warm) == (b.orders, b.a, b.c, b.warm)
    assert official.convergence_order == 3


def test_unipc_official_rule_lowers_at_every_step_count():
    """Official UniPC and diffusers lower the last steps whatever the step count, so the last
    step is first order and the global order is 2."""
    solver = solverlab.get_solver("unipc", lower_order_final="official")
    assert _orders(solver, 40)[-2:] == (2, 1)
    assert solver.convergence_order == 2
    assert solverlab.get_solver("unipc", lower_order_final="diffusers").convergence_order == 2


def test_named_rules_refused_where_they_do_not_exist():
    with pytest.raises(OptionError, match=r"lower_order_final='official' is not allowed "
                                          r"\(DEIS has no 'official' rule.*'diffusers'"):
        solverlab.get_solver("deis", lower_order_final="official")
    assert _orders(solverlab.get_solver("deis", order=3, lower_order_final="diffusers"),
                   8)[-2:] == (2, 1)
    with pytest.raises(OptionError, match=r"lower_order_final='official'.*True or False"):
        solverlab.get_solver("dpm-solver-3", lower_order_final="official")
    with pytest.raises(OptionError, match=r"lower_order_final='official' and "
                                          r"lower_order_final_threshold=12 conflict"):
        solverlab.get_solver("dpm-solver-2m", lower_order_final="official",
                             lower_order_final_threshold=12)
    with pytest.raises(OptionError, match="lower_order_final='Official' is not allowed"):
        solverlab.get_solver("dpm-solver-2m", lower_order_final="Official")
