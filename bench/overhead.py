"""Per-step overhead of solverlab's exponential-integrator solvers (issue 3, item 7).

    python bench/overhead.py [--repeats 15] [--steps 50] [--processes 5] [--out bench/README.md]

A no-op model (it returns one preallocated tensor) makes the solver's own work the only cost.
Batch ``16x3x64x64`` float32 on CPU with ``torch.set_num_threads(1)``, 50 steps, each solve on
the same grid (diffusers' integer timesteps for ``num_inference_steps=50``, mapped to ``t =
(n+1)/N``). Three things are timed in the same run, interleaved repeat by repeat so that a
busy machine slows all of them alike, and the median over repeats is reported per step; the
whole measurement runs in ``--processes`` fresh interpreters (diffusers' time depends on the
allocator's state, which differs from process to process), and the table reports the median of
the per-process ratios with their range:

- **solverlab**: ``solver.solve(model, x, grid)``, as a user calls it (``check_finite=True``,
  the default), and again with ``check_finite=False``;
- **diffusers**: the same scheduler's ``set_timesteps(50)`` plus its ``step(out, t, x)`` loop;
- **floor**: the bare in-place tensor arithmetic the step needs and nothing else: a chain of
  ``mul_``/``add_`` on preallocated buffers with precomputed Python-float coefficients. For
  DDIM that is ``x.mul_(a).add_(eps, alpha=b)``; a data-prediction method also needs the
  conversion ``x0 = (x - sigma eps)/alpha`` into a buffer (two passes) and one ``add_`` per
  further model output it combines (the ``floor_*`` functions). The generic two-pass update is
  reported too (column "axpby").

Goal (issue 3): solverlab <= 0.25x diffusers and <= 2x the floor, for ``dpmpp-2m``, ``unipc``
and ``ddim``. The table goes to ``bench/README.md`` (atomic write); numbers depend on the
machine, so the file says where and when they were taken.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

import solverlab
from solverlab import _io
from solverlab.schedule import VPDiscrete

SHAPE = (16, 3, 64, 64)
N_TRAIN = 1000
HERE = Path(__file__).resolve().parent


# -- the no-op model -------------------------------------------------------------------------
class NoOpModel(solverlab.Model):
    """Returns the same preallocated noise prediction whatever ``x`` and ``t`` are."""

    def __init__(self, out: torch.Tensor, schedule: solverlab.Schedule) -> None:
        self.out = out
        self.schedule = schedule
        self.parameterization = solverlab.get_parameterization("noise")

    def __call__(self, x, t, **cond):
        return self.out


# -- floors: the arithmetic each step needs, in place ----------------------------------------
def _x0(buf, x, eps, a=0.9, b=-0.1):
    """``x0 = (x - sigma eps)/alpha`` into ``buf``: two passes."""
    return torch.mul(x, a, out=buf).add_(eps, alpha=b)


def floor_axpby(x, eps, bufs, steps):
    for _ in range(steps):
        x.mul_(0.999).add_(eps, alpha=0.001)


def floor_ddim(x, eps, bufs, steps):
    # x_t = (alpha_t/alpha_s) x - sigma_t expm1(h) eps
    floor_axpby(x, eps, bufs, steps)


def floor_multistep_data(k: int) -> Callable:
    """DPM-Solver++(kM): convert to x0 (2 passes), then ``x = A x + sum_j c_j x0_j`` over the
    ``k`` newest data predictions (rotating buffers)."""

    def floor(x, eps, bufs, steps):
        for i in range(steps):
            m = _x0(bufs[i % k], x, eps)
            x.mul_(0.999).add_(m, alpha=0.001)
            for j in range(1, k):
                x.add_(bufs[(i - j) % k], alpha=1e-4)

    return floor


def floor_multistep_noise(k: int) -> Callable:
    """tAB-DEIS order ``k``: ``x = A x + sum_j c_j eps_j``; the model's outputs are kept as
    they are (no conversion), so only the combination is paid for."""

    def floor(x, eps, bufs, steps):
        for _ in range(steps):
            x.mul_(0.999).add_(eps, alpha=0.001)
            for j in range(1, k):
                x.add_(bufs[j], alpha=1e-4)

    return floor


def floor_unipc(k: int) -> Callable:
    """UniPC-k (data prediction, corrector on): x0 conversion (2 passes); the corrector
    rewrites the predicted state from the previous state and ``k + 1`` data predictions
    (``k + 2`` passes); the predictor writes the next state from the corrected one and ``k``
    data predictions into the spare state buffer (``k + 1`` passes); buffers swap."""

    def floor(x, eps, bufs, steps):
        prev, cur = bufs[-1], x
        for i in range(steps):
            m = _x0(bufs[i % (k + 1)], cur, eps)
            if i > 0:  # corrector: cur = A prev + sum c_j m_j
                torch.mul(prev, 0.999, out=cur)
                for j in range(k + 1):
                    cur.add_(bufs[(i - j) % (k + 1)], alpha=1e-4)
            torch.mul(cur, 0.999, out=prev).add_(m, alpha=0.001)  # predictor
            for j in range(1, k):
                prev.add_(bufs[(i - j) % (k + 1)], alpha=1e-4)
            prev, cur = cur, prev

    return floor


# -- the cases -------------------------------------------------------------------------------
def cases() -> list[dict[str, Any]]:
    """(label, solverlab solver, diffusers scheduler, floor) for each compared method."""
    import diffusers

    dpm = {"final_sigmas_type": "sigma_min", "lower_order_final": True}
    out = [
        dict(label="ddim", solver=("ddim", {}),
             diffusers=lambda: diffusers.DDIMScheduler(
                 timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False),
             floor=floor_ddim),
        dict(label="dpmpp-2m", solver=("dpmpp-2m", {}),
             diffusers=lambda: diffusers.DPMSolverMultistepScheduler(solver_order=2, **dpm),
             floor=floor_multistep_data(2)),
        dict(label="unipc", solver=("unipc", {}),
             diffusers=lambda: diffusers.UniPCMultistepScheduler(
                 solver_order=2, final_sigmas_type="sigma_min"),
             floor=floor_unipc(2)),
        dict(label="dpmpp-3m", solver=("dpmpp-3m", {}),
             diffusers=lambda: diffusers.DPMSolverMultistepScheduler(solver_order=3, **dpm),
             floor=floor_multistep_data(3)),
        dict(label="deis", solver=("deis", {}),
             diffusers=lambda: diffusers.DEISMultistepScheduler(solver_order=3),
             floor=floor_multistep_noise(3)),
    ]
    return out


def grid_of(scheduler: Any, schedule: VPDiscrete, steps: int) -> torch.Tensor:
    """The scheduler's integer timesteps, then step 0 where every compared scheduler ends
    (``final_sigmas_type="sigma_min"``; DEIS's own end; DDIM ``trailing`` with
    ``set_alpha_to_one=False`` and ``steps`` dividing N), at ``t = (n+1)/N``."""
    scheduler.set_timesteps(steps)
    idx = [int(n) for n in scheduler.timesteps] + [0]
    t = schedule.t_of_index(torch.tensor(idx, dtype=torch.float64))
    return solverlab.get_grid("custom", times=t)(schedule)


def time_diffusers(make: Callable, eps: torch.Tensor, x0: torch.Tensor, steps: int) -> float:
    sched = make()
    x = x0.clone()
    start = time.perf_counter()
    sched.set_timesteps(steps)
    for n in sched.timesteps:
        x = sched.step(eps, n, x).prev_sample
    return time.perf_counter() - start


def time_solverlab(solver, model, x0, grid, check_finite: bool) -> float:
    start = time.perf_counter()
    solver.solve(model, x0, grid, progress=False, check_finite=check_finite)
    return time.perf_counter() - start


def time_floor(floor, x0, eps, bufs, steps) -> float:
    x = x0.clone()
    start = time.perf_counter()
    floor(x, eps, bufs, steps)
    return time.perf_counter() - start


def measure(repeats: int, steps: int) -> list[dict[str, Any]]:
    import diffusers

    schedule = VPDiscrete(alphas_cumprod=diffusers.DDPMScheduler().alphas_cumprod.double())
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(SHAPE, generator=gen)
    eps = torch.randn(SHAPE, generator=gen) * 0.1
    model = NoOpModel(eps, schedule)
    bufs = [torch.randn(SHAPE, generator=gen) for _ in range(4)]
    rows = []
    registered = {e.name for e in solverlab.get_registry().entries("solver")}
    for case in cases():
        name, opts = case["solver"]
        if name not in registered:
            print(f"skip {case['label']}: solver {name!r} is not registered", file=sys.stderr)
            continue
        solver = solverlab.get_solver(name, **opts)
        grid = grid_of(case["diffusers"](), schedule, steps)
        timers = {
            "solverlab": partial(time_solverlab, solver, model, x0, grid, True),
            "solverlab_nocheck": partial(time_solverlab, solver, model, x0, grid, False),
            "diffusers": partial(time_diffusers, case["diffusers"], eps, x0, steps),
            "floor": partial(time_floor, case["floor"], x0, eps, bufs, steps),
            "axpby": partial(time_floor, floor_axpby, x0, eps, bufs, steps),
        }
        for f in timers.values():  # warm-up: first-call costs (imports, caches) excluded
            f()
        samples: dict[str, list[float]] = {k: [] for k in timers}
        for _ in range(repeats):
            for k, f in timers.items():
                samples[k].append(f())
        row = {"label": case["label"]}
        row.update({k: statistics.median(v) / steps for k, v in samples.items()})
        rows.append(row)
        print(f"{case['label']:10s} " + "  ".join(
            f"{k} {1e6 * row[k]:8.1f} us" for k in timers), file=sys.stderr)
    return rows


#: Categories of a step's time: (label, [(file suffix, function name)], cumulative?).
CATEGORIES = (
    ("finite check (`check_finite`)", [("~", "<built-in method torch.isfinite>"),
                                       ("~", "<method 'all' of 'torch._C.TensorBase' objects>"),
                                       ("~", "<method 'sum' of 'torch._C.TensorBase' objects>")],
     False),
    ("Denoiser.coefficients (schedule alpha, sigma)", [("model.py", "coefficients")], True),
    # Solvers pass float coefficients, so every conversion that computes goes through the
    # ``*_into`` methods (``to_data``/``to_noise`` call them): counting only those counts once.
    ("output conversion (Parameterization.to_data_into/to_noise_into)",
     [("parameterization.py", "to_data_into"), ("parameterization.py", "to_noise_into")], True),
    ("SolverState.advance", [("solver.py", "advance")], True),
    ("in-place update arithmetic (mul_/add_/mul out=)",
     [("~", "<method 'add_' of 'torch._C.TensorBase' objects>"),
      ("~", "<method 'mul_' of 'torch._C.TensorBase' objects>"),
      ("~", "<built-in method torch.mul>")], False),
)


def profile(label: str, steps: int) -> list[tuple[str, float, float]]:
    """Where a solve's time goes: :data:`CATEGORIES` and the rest, from a cProfile of 5
    solves, as ``(category, microseconds per step, share)``. The profiler's own overhead
    inflates the Python-level parts."""
    import diffusers

    schedule = VPDiscrete(alphas_cumprod=diffusers.DDPMScheduler().alphas_cumprod.double())
    x0 = torch.randn(SHAPE)
    model = NoOpModel(torch.randn(SHAPE) * 0.1, schedule)
    case = next(c for c in cases() if c["label"] == label)
    solver = solverlab.get_solver(case["solver"][0], **case["solver"][1])
    grid = grid_of(case["diffusers"](), schedule, steps)
    solver.solve(model, x0, grid, progress=False)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(5):
        solver.solve(model, x0, grid, progress=False)
    prof.disable()
    stats = pstats.Stats(prof, stream=io.StringIO()).stats
    total = sum(v[2] for v in stats.values())
    out, used = [], 0.0
    for name, keys, cumulative in CATEGORIES:
        t = sum(v[3] if cumulative else v[2] for (path, _, fn), v in stats.items()
                if any(path.endswith(suffix) and fn == f for suffix, f in keys))
        used += t
        out.append((name, 1e6 * t / (5 * steps), t / total))
    out.append(("everything else (Python overhead, model call, history)",
                1e6 * (total - used) / (5 * steps), (total - used) / total))
    return out


# -- report ----------------------------------------------------------------------------------
GOAL_DIFFUSERS, GOAL_FLOOR = 0.25, 2.0


#: The ratios reported, each ``(numerator, denominator)`` of one process's medians.
RATIOS = {"solverlab/diffusers": ("solverlab", "diffusers"),
          "solverlab/floor": ("solverlab", "floor"),
          "no check: /diffusers": ("solverlab_nocheck", "diffusers"),
          "/floor": ("solverlab_nocheck", "floor"),
          "floor/diffusers": ("floor", "diffusers")}


def combine_runs(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per solver from the rows of several processes: the median of each timer, and
    of each ratio taken within a process, with the ratios' range over processes."""
    out = []
    for label in [r["label"] for r in runs[0]]:
        per = [next(r for r in run if r["label"] == label) for run in runs]
        row: dict[str, Any] = {"label": label, "processes": len(per)}
        for key in per[0]:
            if key != "label":
                row[key] = statistics.median(r[key] for r in per)
        for name, (a, b) in RATIOS.items():
            vals = [r[a] / r[b] for r in per]
            row[name] = (statistics.median(vals), min(vals), max(vals))
        out.append(row)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    head = ("solver", "solverlab [us/step]", "no check_finite", "diffusers", "floor", "axpby",
            *RATIOS, "goal")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        rd, rf = r["solverlab/diffusers"][0], r["solverlab/floor"][0]
        met = rd <= GOAL_DIFFUSERS and rf <= GOAL_FLOOR
        ratios = [f"{m:.2f}x ({lo:.2f}-{hi:.2f})" if r["processes"] > 1 else f"{m:.2f}x"
                  for m, lo, hi in (r[name] for name in RATIOS)]
        lines.append("| " + " | ".join([
            f"`{r['label']}`", f"{1e6 * r['solverlab']:.0f}", f"{1e6 * r['solverlab_nocheck']:.0f}",
            f"{1e6 * r['diffusers']:.0f}", f"{1e6 * r['floor']:.0f}", f"{1e6 * r['axpby']:.0f}",
            *ratios, "met" if met else "**not met**",
        ]) + " |")
    return "\n".join(lines)


def measure_in_processes(processes: int, repeats: int, steps: int) -> list[dict[str, Any]]:
    """:func:`measure` in ``processes`` fresh interpreters, one after the other: each starts
    with a fresh allocator, whose state (cached memory or fresh pages for diffusers' per-step
    tensors) moves diffusers' time by tens of percent from one process to the next."""
    runs = []
    for k in range(processes):
        done = subprocess.run(
            [sys.executable, __file__, "--worker", "--repeats", str(repeats), "--steps",
             str(steps)], check=True, capture_output=True, text=True)
        runs.append(json.loads(done.stdout))
        print(f"process {k + 1}/{processes} done", file=sys.stderr)
    return combine_runs(runs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", type=Path, default=HERE / "README.md")
    p.add_argument("--processes", type=int, default=5,
                   help="fresh processes to measure in (median and range of their ratios)")
    p.add_argument("--profile", nargs="*", default=["ddim", "dpmpp-2m", "unipc"],
                   help="solvers whose cProfile breakdown goes into the README")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.worker:  # one process's rows, as JSON on stdout
        print(json.dumps(measure(args.repeats, args.steps)))
        return 0
    import diffusers

    if args.processes > 1:
        rows = measure_in_processes(args.processes, args.repeats, args.steps)
    else:
        rows = combine_runs([measure(args.repeats, args.steps)])
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    env = (f"torch {torch.__version__}, diffusers {diffusers.__version__}, Python "
           f"{platform.python_version()}, {platform.machine()} "
           f"({os.cpu_count()} logical CPUs visible), 1 thread")
    prof_md = []
    for label in args.profile:
        prof_md += [f"`{label}` (`check_finite=True`):", "",
                    "| part of the step | us/step | share |", "|---|---:|---:|"]
        prof_md += [f"| {fn} | {us:.0f} | {share:.0%} |"
                    for fn, us, share in profile(label, args.steps)]
        prof_md.append("")
    md = README_TEMPLATE.format(table=table(rows), when=when, env=env, repeats=args.repeats,
                                processes=args.processes,
                                steps=args.steps, shape="x".join(map(str, SHAPE)),
                                profile="\n".join(prof_md))
    _io.write_text(args.out, md)  # temp file + os.replace
    print(table(rows))
    print("\n".join(prof_md))
    return 0


README_TEMPLATE = """\
# Benchmarks

## Per-step solver overhead (`python bench/overhead.py`)

No-op model (returns a preallocated tensor), batch {shape} float32, {steps} steps, CPU,
`torch.set_num_threads(1)`, median of {repeats} interleaved repeats in each of {processes}
fresh processes, microseconds per step (median over the processes). Ratios are taken within a
process; the table gives their median over the processes and, in brackets, their range.
Same grid for all (diffusers' integer timesteps of `set_timesteps({steps})` at `t = (n+1)/N`).

- *solverlab*: `solver.solve(model, x, grid)` as a user calls it (`check_finite=True`);
  *no check_finite*: the same with `check_finite=False`;
- *diffusers*: the same scheduler, `set_timesteps` + `step` loop (DDIM: `DDIMScheduler(
  timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False)`; DPM:
  `final_sigmas_type="sigma_min"`; UniPC order 2 bh2; DEIS order 3);
- *floor*: the in-place `mul_`/`add_` chain the step needs on preallocated buffers (DDIM:
  `x.mul_(a).add_(eps, alpha=b)`; data-prediction methods add the `x0` conversion, 2 passes, and
  one `add_` per further model output; UniPC adds its corrector); *axpby*: the bare 2-pass
  `x.mul_(a).add_(d, alpha=b)`.

Goal (issue 3 item 7): solverlab <= {goal_d}x diffusers and <= {goal_f}x floor (median ratios).

{table}

Taken {when}; {env}.
The machine was shared, so absolute numbers drift by tens of percent between runs; ratios
from one run are what to compare.

diffusers allocates a fresh state-sized tensor for every intermediate of its step (about 12
for DPM-Solver++(2M)), so its time depends on whether the allocator serves them from memory
it already holds or from fresh pages (page faults): from one process to the next its
`dpmpp-2m` took 1340-2910 us/step. The column *floor/diffusers* says how much room the
0.25x goal leaves: the step's bare arithmetic alone is that fraction of diffusers' time.

### Where the time goes

cProfile of 5 solves (the profiler inflates the Python-level parts).

{profile}""".replace("{goal_d}", str(GOAL_DIFFUSERS)).replace("{goal_f}", str(GOAL_FLOOR))


if __name__ == "__main__":
    sys.exit(main())
