"""Searched time grids: gradient vs derivative-free search (issue "Beyond every peer", item 3).

    python bench/search.py [--out bench] [--train 256] [--held-out 256]

For each problem x solver x step count, ``solverlab.search_grid`` runs twice from the ``logsnr``
grid, once per method (``gradient``: Adam through the differentiable solve, 100 steps;
``derivative-free``: Nelder-Mead, 300 training solves), on the same training and held-out start
states (seed 1, drawn by the search). Each searched grid is then scored, like every grid, on
compare's own evaluation batch (``solverlab.evaluation.evaluation_noises``: 256 start states, seed
0), which no search sees: the *test* columns. Problems:

- ``gm-2d``: ``gaussian-mixture`` defaults (2-D, 3 components, ``vp-linear``), compare's default;
- ``gm-16d``: ``gaussian-mixture`` with ``dim=16, components=6, schedule="vp-discrete"``.

The error is :data:`solverlab.evaluation.ERROR_DEFINITION`. Time: wall seconds of one search
(references included; they are cached across the two methods, so the first method of each
problem pays for them: the methods alternate which goes first). Writes ``search.md`` into
``--out`` atomically. One torch thread.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import solverlab
from solverlab import _io
from solverlab.compare import (
    ERROR_DEFINITION,
    build_model,
    compute_reference,
    evaluation_noises,
    relative_rms_error,
)

PROBLEMS = {
    "gm-2d": {},
    "gm-16d": {"dim": 16, "components": 6, "schedule": "vp-discrete"},
}
SOLVERS = ("dpmpp-2m", "unipc")
STEPS = (5, 6, 8, 10, 15, 20)
METHODS = ("gradient", "derivative-free")
TEST_SAMPLES, TEST_SEED = 256, 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    ap.add_argument("--train", type=int, default=256)
    ap.add_argument("--held-out", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    started = time.perf_counter()
    k = 0
    for pname, opts in PROBLEMS.items():
        model = build_model("gaussian-mixture", opts)
        sch = model.schedule
        x_test = evaluation_noises(model, TEST_SAMPLES, TEST_SEED)
        ref_test, _ = compute_reference(model, x_test, sch.t_max, sch.t_min)
        for solver_name in SOLVERS:
            solver = solverlab.get_solver(solver_name)
            for steps in STEPS:
                k += 1
                order = METHODS if k % 2 else METHODS[::-1]
                found = {}
                for method in order:
                    t = time.perf_counter()
                    r = solverlab.search_grid(solver_name, "gaussian-mixture", steps,
                                              model_options=opts, noises=args.train,
                                              held_out=args.held_out, method=method)
                    found[method] = (r, time.perf_counter() - t)

                def test(times, solver=solver, model=model, x=x_test, ref=ref_test):
                    return relative_rms_error(solver.solve(model, x, times).x, ref)

                start = found[METHODS[0]][0]
                row = {"problem": pname, "solver": solver_name, "steps": steps,
                       "held_start": start.held_out_error_start,
                       "test_start": test(torch.tensor(start.start_times, dtype=torch.float64))}
                for method, (r, wall) in found.items():
                    row[method] = {"train": r.train_error, "held": r.held_out_error,
                                   "test": test(torch.tensor(r.times, dtype=torch.float64)),
                                   "time": wall, "improved": r.improved}
                rows.append(row)
                print(pname, solver_name, steps, {m: round(row[m]["held"], 4) for m in METHODS},
                      f"start {row['held_start']:.4f}", flush=True)
    total = time.perf_counter() - started
    _io.write_text(args.out / "search.md", _markdown(rows, args, total))
    print(f"wrote {args.out / 'search.md'} ({total:.0f} s)")


def _markdown(rows, args, total) -> str:
    g, d = METHODS
    lines = [
        "# Searched time grids: gradient vs derivative-free (`python bench/search.py`)",
        "",
        f"Error: {ERROR_DEFINITION}. Each search starts from the `logsnr` grid and fits "
        f"{args.train} training start states (seed 1), choosing among its iterates on "
        f"{args.held_out} held-out ones (drawn after them); *test*: the searched grid scored "
        f"on compare's evaluation batch ({TEST_SAMPLES} start states, seed {TEST_SEED}), which "
        "no search sees. `gradient`: Adam through `solve(..., grad=True)`, 100 steps; "
        "`derivative-free`: Nelder-Mead, 300 training solves. Time: seconds per search "
        "(references included, cached between the two methods, which alternate going first). "
        "float64, 1 torch thread.",
        "",
        "Problems: `gm-2d` = `gaussian-mixture` defaults (2-D, 3 components, `vp-linear`, "
        "compare's default); `gm-16d` = `gaussian-mixture` with `dim=16, components=6, "
        "schedule=vp-discrete`.",
        "",
        "| problem | solver | steps | held-out: logsnr | gradient | derivative-free | "
        "test: logsnr | gradient | derivative-free | time gradient [s] | "
        "time derivative-free [s] |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['problem']} | {r['solver']} | {r['steps']} | {r['held_start']:.4f} | "
            f"{r[g]['held']:.4f} | {r[d]['held']:.4f} | {r['test_start']:.4f} | "
            f"{r[g]['test']:.4f} | {r[d]['test']:.4f} | {r[g]['time']:.2f} | "
            f"{r[d]['time']:.2f} |")
    n = len(rows)

    def ratio(m, key, base):
        return statistics.median(r[m][key] / r[base] for r in rows)

    wins_h = sum(r[g]["held"] < r[d]["held"] for r in rows)
    wins_t = sum(r[g]["test"] < r[d]["test"] for r in rows)
    worse = [m for m in METHODS for r in rows if r[m]["test"] > r["test_start"]]
    lines += [
        "",
        "## Summary",
        "",
        "| | gradient | derivative-free |",
        "|---|---:|---:|",
        f"| median held-out error / logsnr's | {ratio(g, 'held', 'held_start'):.3f} | "
        f"{ratio(d, 'held', 'held_start'):.3f} |",
        f"| median test error / logsnr's | {ratio(g, 'test', 'test_start'):.3f} | "
        f"{ratio(d, 'test', 'test_start'):.3f} |",
        f"| lower held-out error than the other method (of {n}) | {wins_h} | {n - wins_h} |",
        f"| lower test error than the other method (of {n}) | {wins_t} | {n - wins_t} |",
        f"| test error above logsnr's (searches) | {worse.count(g)} | {worse.count(d)} |",
        f"| median time per search [s] | {statistics.median(r[g]['time'] for r in rows):.2f} | "
        f"{statistics.median(r[d]['time'] for r in rows):.2f} |",
        f"| total time [s] | {sum(r[g]['time'] for r in rows):.1f} | "
        f"{sum(r[d]['time'] for r in rows):.1f} |",
        "",
        f"Taken {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch "
        f"{torch.__version__}, Python {platform.python_version()}, {platform.machine()}; "
        f"whole run {total:.0f} s. The machine was shared: times drift by tens of percent.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
