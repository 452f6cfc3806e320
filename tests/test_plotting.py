"""solverlab.plotting (the figures of ``solverlab compare``) and the issue-10 accuracy
guarantees of the default solvers' step-ratio order lowering."""

from __future__ import annotations

import pytest
import torch

import solverlab
from solverlab.compare import RISING, Row, mark_rising, relative_rms_error, run_compare
from solverlab.plotting import MARKERS, compare_figure, heatmap_figure, solver_styles
from solverlab.reference import reference_solution
from solverlab.registry import get_registry

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(solver, grid, budget, error, status="ok"):
    return Row(solver=solver, grid=grid, nfe_budget=budget, steps=budget, nfe=budget,
               error=error, wall_time=0.0, status=status)


def test_styles_are_unique_and_by_family():
    names = [e.name for e in get_registry().entries("solver")]
    names += ["unipc bh1 shortcut"] + [f"many-{i}" for i in range(2 * len(MARKERS) + 3)]
    styles = solver_styles(names)
    pairs = [(st.color, st.marker) for st in styles.values()]
    assert len(set(pairs)) == len(pairs) == len(set(names))
    assert styles["dpmpp-3m"].family == styles["unipc"].family == "expint"
    assert styles["unipc bh1 shortcut"].family == "unipc"
    assert styles["dpmpp-2m"].marker != styles["dpmpp-3m"].marker


def test_figures_are_written_with_a_selection(tmp_path):
    rows = [_row(s, g, b, e * b ** -2.0) for s, e in (("ddim", 1.0), ("dpmpp-2m", 30.0))
            for g in ("logsnr", "karras") for b in (5, 10, 20)]
    rows.append(_row("ddim", "logsnr", 40, None, status="diverged"))
    for path in (compare_figure(rows, tmp_path / "a.png", solvers="dpmpp-2m"),
                 compare_figure(rows, tmp_path / "b.png"),
                 heatmap_figure(rows, tmp_path / "c.png", solvers=["ddim"])):
        assert path.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="not in the comparison"):
        compare_figure(rows, tmp_path / "d.png", solvers="rk4")


def test_mark_rising():
    rows = [_row("a", "g", 5, 0.2), _row("a", "g", 10, 0.3), _row("a", "g", 20, 0.1),
            _row("b", "g", 5, 0.2), _row("b", "g", 10, 0.2), _row("b", "g", 20, None, "x")]
    marked = mark_rising(rows)
    assert [r.note for r in marked] == [RISING] * 3 + [""] * 3


# The defaults of the multistep solvers on the default problem and the Gaussian, at the NFE
# budgets 5, 6, 8, 10, 15, 20, 30, 40, 50 (issue 10, item 4). Before lower_order_final="auto"
# dpmpp-3m on time-uniform went 8.2e-2 -> 9.0e-1 from 10 to 15 NFE (gaussian-mixture). The
# cells that still rise (docs/accuracy.md): few-step budgets far from asymptotic
# (dpmpp-3m, unipc on logsnr) and error cancellations (the signed error changes sign between
# two budgets), listed here with their grid and model.
NFE = (5, 6, 8, 10, 15, 20, 30, 40, 50)
MULTISTEP = ("dpmpp-2m", "dpmpp-3m", "unipc", "deis")
CANCELLING = {("gaussian-mixture", "dpmpp-3m", "logsnr"), ("gaussian", "dpmpp-3m", "logsnr"),
              ("gaussian", "dpmpp-2m", "logsnr"), ("gaussian", "dpmpp-2m", "time-uniform"),
              ("gaussian", "unipc", "logsnr"), ("gaussian", "unipc", "time-uniform")}


@pytest.mark.parametrize("model", ["gaussian-mixture", "gaussian"])
def test_default_multistep_errors_do_not_rise_with_nfe(model):
    rows = run_compare(solvers=MULTISTEP, nfe=NFE, model=model)
    for s in MULTISTEP:
        for g in ("logsnr", "time-uniform"):
            cells = [r for r in rows if r.solver == s and r.grid == g]
            rising = {r.note for r in cells} == {RISING}  # run_compare marks them
            assert rising == ((model, s, g) in CANCELLING), (model, s, g, cells)


def test_auto_removes_the_jump_of_the_step_count_threshold():
    """dpmpp-3m on time-uniform, default problem: with the threshold rule (diffusers' 15) the
    error jumps from 10 to 15 steps (measured 8.2e-2 -> 9.0e-1); ``"auto"`` lowers the last
    step at both (measured 8.4e-2 -> 4.5e-2)."""
    model = solverlab.get_model("gaussian-mixture")
    sch = model.schedule
    x = model.sample_prior(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = reference_solution(model, x, float(sch.t_max), float(sch.t_min))

    def err(steps, **options):
        grid = solverlab.get_grid("time-uniform")(sch, steps)
        sol = solverlab.get_solver("dpmpp-3m", **options).solve(model, x, grid, progress=False)
        return relative_rms_error(sol.x, ref)

    assert err(15, lower_order_final=True) > 5 * err(10, lower_order_final=True)
    assert err(15) < 0.7 * err(10)
