"""Accuracy of the exponential-integrator solvers next to diffusers' schedulers (issue 3,
item 8).

    python bench/accuracy.py [--samples 256] [--out bench]

For each problem (the project's analytic Gaussian mixtures on the DDPM schedule ``vp-discrete``,
so that diffusers' schedulers apply), ``samples`` start states are drawn from the exact marginal
at ``t = 1`` and solved to ``t = 1/N`` (training step 0). The error of a solve is
:data:`solverlab.evaluation.ERROR_DEFINITION` against the float64 reference
(:func:`solverlab.reference.reference_solution`, dopri8, ``rtol = atol = 1e-10``).

- **solverlab**: every solver of ``solverlab_expint`` with its default options, on the grids
  ``logsnr``, ``time-uniform`` and ``karras`` from ``t = 1`` to ``1/N``, at NFE budgets 5, 6,
  8, 10, 15, 20 (the largest step count within the budget; the NFE actually spent is shown
  where it differs), in float64.
- **diffusers**: its schedulers on their own integer timesteps (``set_timesteps(NFE)``, the
  model called at ``t = (n+1)/N``), ending at step 0 like solverlab (``final_sigmas_type=
  "sigma_min"``; DDIM ``trailing`` with ``set_alpha_to_one=False``), as shipped: float32.

Writes ``accuracy.md`` (tables) and ``accuracy.png`` (error vs NFE) into ``--out``, each
atomically. About a minute of CPU with one thread.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch

import solverlab
from solverlab import _io
from solverlab.analytic import GaussianMixtureModel
from solverlab.compare import ERROR_DEFINITION, budget_steps, relative_rms_error
from solverlab.errors import SolverlabError
from solverlab.reference import reference_solution
from solverlab.schedule import VPDiscrete

HERE = Path(__file__).resolve().parent
NFE = (5, 6, 8, 10, 15, 20)
GRIDS = ("logsnr", "time-uniform", "karras")
YMAX = 3.0  # plots clip errors above this (they are in the tables)
F64 = torch.float64

#: (label, registered name, options): the family with its defaults, and UniPC as diffusers
#: runs it.
SOLVERS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("ddim", "ddim", {}),
    ("dpm-solver-2", "dpm-solver-2", {}),
    ("dpm-solver-3", "dpm-solver-3", {}),
    ("dpm-solver-fast", "dpm-solver-fast", {}),
    ("dpmpp-2s", "dpmpp-2s", {}),
    ("dpmpp-2m", "dpmpp-2m", {}),
    ("dpmpp-3m", "dpmpp-3m", {}),
    # With rho solved from the order conditions B(h) cancels, so bh1 and bh2 are the same
    # method; they differ only with diffusers' rho = 1/2 shortcut.
    ("unipc", "unipc", {}),
    ("unipc bh1 shortcut", "unipc", {"variant": "bh1", "diffusers_order2_shortcut": True}),
    ("unipc bh2 shortcut", "unipc", {"variant": "bh2", "diffusers_order2_shortcut": True}),
    ("deis", "deis", {}),
)


def diffusers_schedulers() -> list[tuple[str, str, Callable[[], Any]]]:
    """(label, the solverlab label it is drawn next to, factory)."""
    import diffusers as d

    d.utils.logging.set_verbosity_error()  # singlestep's "changing lower_order_final" notes
    end = {"final_sigmas_type": "sigma_min"}
    return [
        ("DDIM (trailing)", "ddim", lambda: d.DDIMScheduler(
            timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False)),
        ("DPMSolverMultistep 2M", "dpmpp-2m",
         lambda: d.DPMSolverMultistepScheduler(solver_order=2, **end)),
        ("DPMSolverMultistep 3M", "dpmpp-3m",
         lambda: d.DPMSolverMultistepScheduler(solver_order=3, **end)),
        ("DPMSolverSinglestep 2 (++)", "dpmpp-2s",
         lambda: d.DPMSolverSinglestepScheduler(solver_order=2, **end)),
        ("DPMSolverSinglestep 3 (++)", "dpm-solver-3",
         lambda: d.DPMSolverSinglestepScheduler(solver_order=3, **end)),
        ("DPMSolverSinglestep 3 (noise)", "dpm-solver-fast",
         lambda: d.DPMSolverSinglestepScheduler(
             solver_order=3, algorithm_type="dpmsolver", **end)),
        ("UniPC bh2 order 2", "unipc bh2 shortcut", lambda: d.UniPCMultistepScheduler(
            solver_order=2, solver_type="bh2", **end)),
        ("UniPC bh1 order 2", "unipc bh1 shortcut", lambda: d.UniPCMultistepScheduler(
            solver_order=2, solver_type="bh1", **end)),
        ("DEIS order 3", "deis", lambda: d.DEISMultistepScheduler(solver_order=3)),
    ]


@attrs.frozen
class Problem:
    name: str
    description: str
    model: GaussianMixtureModel
    samples: int


def problems(samples: int) -> list[Problem]:
    sch = VPDiscrete()
    return [
        Problem("gm-2d", "`gaussian-mixture` defaults (dim 2, 3 components, seed 0)",
                GaussianMixtureModel(schedule=sch), samples),
        Problem("gm-16d", "`gaussian-mixture` dim 16, 8 components, seed 1",
                GaussianMixtureModel(dim=16, components=8, seed=1, schedule=sch),
                max(1, samples // 2)),
    ]


@attrs.frozen
class Cell:
    method: str  # solver label or diffusers label
    grid: str  # grid name, or "diffusers"
    budget: int
    nfe: int | None
    error: float | None
    note: str = ""


def run_solverlab(problem: Problem, x: torch.Tensor, ref: torch.Tensor) -> list[Cell]:
    model, sch = problem.model, problem.model.schedule
    cells = []
    for label, name, opts in SOLVERS:
        solver = solverlab.get_solver(name, **opts)
        for g in GRIDS:
            grid_fn = solverlab.get_grid(g)
            for budget in NFE:
                steps, why = budget_steps(solver, budget)
                if steps is None:
                    cells.append(Cell(label, g, budget, None, None, why))
                    continue
                try:
                    sol = solver.solve(model, x, grid_fn(sch, steps), progress=False)
                except SolverlabError as e:
                    cells.append(Cell(label, g, budget, None, None, type(e).__name__))
                    continue
                err = relative_rms_error(sol.x, ref)
                cells.append(Cell(label, g, budget, sol.nfe,
                                  err if math.isfinite(err) else None))
    return cells


def run_diffusers(problem: Problem, x: torch.Tensor, ref: torch.Tensor) -> list[Cell]:
    model, sch = problem.model, problem.model.schedule
    cells = []
    for label, _, make in diffusers_schedulers():
        for budget in NFE:
            sched = make()
            sched.set_timesteps(budget)
            sample, calls = x.to(torch.float32), 0
            for n in sched.timesteps:
                out = model(sample, sch.t_of_index(float(n)))
                calls += 1
                sample = sched.step(out, int(n), sample).prev_sample
            err = relative_rms_error(sample, ref)
            cells.append(Cell(label, "diffusers", budget, calls,
                              err if math.isfinite(err) else None))
    return cells


# -- output ----------------------------------------------------------------------------------
def _fmt(c: Cell, best: float | None) -> str:
    if c.error is None:
        return "—"
    s = f"{c.error:.2e}"
    if c.nfe is not None and c.nfe != c.budget:
        s += f" ({c.nfe})"
    return f"**{s}**" if best is not None and c.error == best else s


def markdown(results: list[tuple[Problem, list[Cell], float]], settings: dict[str, Any]) -> str:
    lines = [
        "# Accuracy of the exponential-integrator solvers (`python bench/accuracy.py`)",
        "",
        "Error: " + ERROR_DEFINITION + ". Start states drawn from the exact marginal at `t = 1`,",
        "solved to `t = 1/N` (DDPM linear schedule, `vp-discrete`, N = 1000). solverlab in "
        "float64 on the",
        "grids `logsnr`, `time-uniform`, `karras`; diffusers as shipped (float32) on its own",
        "timesteps, ending at step 0 (`final_sigmas_type=\"sigma_min\"`, DDIM `trailing` with",
        "`set_alpha_to_one=False`). Columns are NFE budgets; a number in parentheses is the NFE",
        "actually spent when a solver cannot use the budget exactly (2 or 3 NFE per step). The",
        "best cell per column is bold. Every solver runs with its defaults, UniPC also as",
        "diffusers runs it (`diffusers_order2_shortcut=True`, bh1 and bh2; without the shortcut",
        "the order conditions are solved and B(h) cancels, so bh1 and bh2 are the same method).",
        "",
        "Solvers (their full options):",
        "",
        *[f"- {label}: `{solverlab.get_solver(name, **opts)!r}`" for label, name, opts in SOLVERS],
        "",
        f"Settings: {settings}.",
        "",
    ]
    for problem, cells, ref_time in results:
        lines += [f"## {problem.name}: {problem.description}, {problem.samples} samples",
                  "", f"Reference: {ref_time:.1f} s.", ""]
        best = {b: min((c.error for c in cells if c.budget == b and c.error is not None),
                       default=None) for b in NFE}
        head = "| method | grid | " + " | ".join(f"NFE {b}" for b in NFE) + " |"
        lines += [head, "|---|---|" + "---:|" * len(NFE)]
        keys = list(dict.fromkeys((c.method, c.grid) for c in cells))
        for method, grid in keys:
            row = {c.budget: c for c in cells if c.method == method and c.grid == grid}
            lines.append(f"| {method} | {grid} | " + " | ".join(
                _fmt(row[b], best[b]) if b in row else "" for b in NFE) + " |")
        lines.append("")
    return "\n".join(lines)


def figure(results: list[tuple[Problem, list[Cell], float]]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.6 * len(results)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(results), len(GRIDS), squeeze=False, sharey="row")
    labels = [s[0] for s in SOLVERS]
    color = {label: f"C{i % 10}" if i < 10 else "k" for i, label in enumerate(labels)}
    partner = {label: twin for label, twin, _ in diffusers_schedulers()}
    for r, (problem, cells, _) in enumerate(results):
        finite = [c.error for c in cells if c.error is not None]
        top = min(max(finite, default=1.0), YMAX)
        for j, g in enumerate(GRIDS):
            ax = axes[r][j]
            for label in labels:
                pts = sorted((c.nfe, c.error) for c in cells if c.method == label
                             and c.grid == g and c.error is not None)
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, color=color[label], label=label)
            for label, twin in partner.items():
                pts = sorted((c.nfe, c.error) for c in cells if c.method == label
                             and c.error is not None)
                if pts:
                    ax.plot(*zip(*pts), color=color.get(twin, "0.4"), linestyle=":",
                            marker="x", ms=4, lw=1.2, label=f"diffusers {label}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(list(NFE), [str(b) for b in NFE])
            ax.minorticks_off()
            ax.set_ylim(top=top * 1.2)
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{problem.name}: solverlab on '{g}' (dotted: diffusers, own "
                         "timesteps)", fontsize=9)
            ax.set_xlabel("NFE")
            if j == 0:
                ax.set_ylabel("relative RMS error vs reference")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=5, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import diffusers

    start = time.perf_counter()
    results = []
    for problem in problems(args.samples):
        gen = torch.Generator().manual_seed(args.seed)
        x = problem.model.sample_prior(problem.samples, t=1.0, generator=gen, dtype=F64)
        t0 = time.perf_counter()
        ref = reference_solution(problem.model, x, 1.0, problem.model.schedule.t_min)
        ref_time = time.perf_counter() - t0
        cells = run_solverlab(problem, x, ref) + run_diffusers(problem, x, ref)
        results.append((problem, cells, ref_time))
        print(f"{problem.name}: done ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    settings = {
        "samples": args.samples, "seed": args.seed,
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "wall time": f"{time.perf_counter() - start:.0f} s",
    }
    md = _io.write_text(args.out / "accuracy.md", markdown(results, settings))
    png = _io.write_figure(args.out / "accuracy.png", figure(results), dpi=110)
    print(f"wrote {md} and {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
