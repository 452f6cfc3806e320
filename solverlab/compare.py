"""The comparison runner behind ``solverlab compare``: solvers x time grids x NFE budgets on one
model, each solve scored against a float64 reference solution.

The problem: ``samples`` start states drawn from the model's prior at ``schedule.t_max``
(``model.sample_prior``, seeded with ``seed``), solved to ``schedule.t_min``. The reference
(:func:`solverlab.reference.reference_solution`, ``rtol = 1e-10``) is computed once; every solve
runs in float64.

The error of a solve with final states ``x_i`` against reference states ``r_i``
(``i = 1..n`` samples, each flattened to a vector) is the RMS over samples of the L2 error,
relative to the RMS over samples of the reference's L2 norm::

    error = sqrt(mean_i ||x_i - r_i||^2) / sqrt(mean_i ||r_i||^2)

An NFE budget ``B`` becomes the largest step count ``s`` with ``solver.expected_nfe(s) <= B``;
a solver that cannot say in advance (``expected_nfe`` returns ``None``) runs ``s = B`` steps.
``Row.nfe`` is always the NFE the solve actually took (counted by the Denoiser).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from . import _io
from .errors import OptionError, SolverDivergedError, SolverlabError
from .grid import Grid
from .model import Model
from .registry import get_registry
from .solver import AdaptiveSolver, Solver

__all__ = [
    "CSV_NAME",
    "DEFAULT_GRIDS",
    "DEFAULT_MODEL",
    "DEFAULT_NFE",
    "DEFAULT_SAMPLES",
    "ERROR_DEFINITION",
    "HEATMAP_NAME",
    "JSON_NAME",
    "OUTPUT_NAMES",
    "PLOT_NAME",
    "Row",
    "budget_steps",
    "format_table",
    "mark_rising",
    "relative_rms_error",
    "run_compare",
    "torch_threads",
    "write_outputs",
]

DEFAULT_GRIDS: tuple[str, ...] = ("logsnr", "time-uniform")
DEFAULT_NFE: tuple[int, ...] = (5, 10, 20)
DEFAULT_MODEL = "gaussian-mixture"
DEFAULT_SAMPLES = 256
CSV_NAME, JSON_NAME, PLOT_NAME = "compare.csv", "compare.json", "compare.png"
HEATMAP_NAME = "compare-heatmap.png"
#: The result set of one comparison: the only files its output folder may hold.
OUTPUT_NAMES = (CSV_NAME, JSON_NAME, PLOT_NAME, HEATMAP_NAME)
RISING = "error rises with NFE"
ERROR_DEFINITION = (
    "sqrt(mean_i ||x_i - ref_i||^2) / sqrt(mean_i ||ref_i||^2): RMS over samples of the L2 "
    "error against the float64 reference, relative to the RMS L2 norm of the reference"
)

STATUS_OK = "ok"
STATUS_DIVERGED = "diverged"


@attrs.frozen(kw_only=True)
class Row:
    """One cell of a comparison.

    ``steps``, ``nfe``, ``error`` and ``wall_time`` (seconds, the solve only) are ``None`` when
    the cell did not run. ``status`` is ``"ok"``, ``"diverged"`` (NaN/inf during the solve),
    ``"skipped: <why>"`` (e.g. the budget is smaller than one step) or ``"failed: <error>"``
    (the solver refused the grid with a solverlab error). ``note`` is set by
    :func:`mark_rising` on every cell of a solver x grid whose error rises with NFE.
    """

    solver: str
    grid: str
    nfe_budget: int
    steps: int | None
    nfe: int | None
    error: float | None
    wall_time: float | None
    status: str
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


FIELDS: tuple[str, ...] = tuple(f.name for f in attrs.fields(Row))


# -- pieces ----------------------------------------------------------------------------------
def relative_rms_error(x: Tensor, reference: Tensor) -> float:
    """``sqrt(mean_i ||x_i - r_i||^2) / sqrt(mean_i ||r_i||^2)``, ``i`` along dim 0, in float64."""
    d = (x.to(torch.float64) - reference.to(torch.float64)).reshape(x.shape[0], -1)
    r = reference.to(torch.float64).reshape(reference.shape[0], -1)
    num = float(d.pow(2).sum(dim=1).mean().sqrt())
    den = float(r.pow(2).sum(dim=1).mean().sqrt())
    return num / den if den > 0 else num


def budget_steps(solver: Solver, budget: int) -> tuple[int | None, str]:
    """``(steps, "")``: the largest ``steps`` with ``solver.expected_nfe(steps) <= budget``;
    ``(budget, "")`` when ``expected_nfe`` is ``None``; ``(None, "skipped: <why>")`` when no
    step count fits the budget."""
    best, cheapest = None, None
    # Every solver we know of spends at least one evaluation per step, but one may take steps
    # without evaluations (a closed-form prefix), so look past the budget.
    for steps in range(1, 4 * budget + 1):
        try:
            n = solver.expected_nfe(steps)
        except SolverlabError:  # e.g. a multistep solver that needs more steps than this
            continue
        if n is None:
            return budget, ""
        cheapest = n if cheapest is None else min(cheapest, n)
        if n <= budget:
            best = steps
    if best is None:
        least = f" (one step needs {cheapest} NFE)" if cheapest is not None else ""
        return None, f"skipped: NFE budget {budget} is smaller than one step{least}"
    return best, ""


def _names(kind: str, given: Iterable[str] | str | None, what: str) -> list[str]:
    if isinstance(given, str):
        given = given.split(",")
    names = [str(n).strip() for n in given or ()]
    if not names or any(not n for n in names):
        raise OptionError(
            f"compare: {what} must be a non-empty list of {kind} names; got {given!r}"
        )
    seen: list[str] = []
    for n in names:
        if n not in seen:
            seen.append(n)
    return seen


def _build(kind: str, name: str) -> Any:
    try:
        return get_registry().create(kind, name)
    except TypeError as e:  # a part that cannot be built without options
        raise OptionError(
            f"compare: {kind} {name!r} cannot be built from its name alone ({e}); "
            "compare takes parts that have defaults for every option"
        ) from None


def _solvers(names: Iterable[str] | str | None) -> list[tuple[str, Solver]]:
    reg = get_registry()
    if names is None:
        out = [(e.name, _build("solver", e.name)) for e in reg.entries("solver")
               if not issubclass(e.cls, AdaptiveSolver)]
        if not out:
            raise OptionError("compare: no fixed-grid solver is registered; see `solverlab list`")
        return out
    out = []
    for name in _names("solver", names, "solvers"):
        reg.entry("solver", name)  # unknown name -> UnknownNameError with close matches
        solver = _build("solver", name)
        if isinstance(solver, AdaptiveSolver):
            raise OptionError(
                f"compare: solver {name!r} is adaptive (it chooses its own steps, so an NFE "
                "budget does not map to a grid); compare runs fixed-grid solvers only"
            )
        out.append((name, solver))
    return out


def _budgets(nfe: Iterable[int] | int) -> list[int]:
    values = [nfe] if isinstance(nfe, int) else list(nfe)
    bad = [v for v in values
           if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if not values or bad:
        raise OptionError(
            f"compare: nfe={nfe!r} is not allowed; give one or more integer NFE budgets >= 1, "
            "e.g. nfe=(5, 10, 20)"
        )
    return sorted(set(values))


#: Seeds are 64-bit: ``torch.Generator.manual_seed`` takes ``0 .. 2**64 - 1``.
SEED_MAX = 2**64 - 1


def _int_option(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (
            maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise OptionError(f"compare: {name}={value!r} is not allowed; it must be an integer "
                          f"{allowed}")
    return value


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (``None``: unchanged), then restore."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# -- the runner ------------------------------------------------------------------------------
def run_compare(
    solvers: Sequence[str] | str | None = None,
    grids: Sequence[str] | str = DEFAULT_GRIDS,
    nfe: Sequence[int] | int = DEFAULT_NFE,
    model: str | Model = DEFAULT_MODEL,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    progress: bool = False,
    threads: int | None = 1,
) -> list[Row]:
    """Solve the model's problem with every solver x grid x NFE budget; one :class:`Row` each.

    ``solvers=None`` takes every registered fixed-grid solver (adaptive ones are left out).
    ``model`` is a registered name (built with its defaults) or a :class:`~solverlab.Model`
    with ``sample_prior``. Every name and value is checked before any solving starts: an
    unknown name raises :class:`~solverlab.UnknownNameError` (with close matches), a bad value
    :class:`~solverlab.OptionError`. Rows come in the order solver, grid, budget.

    ``threads``: torch's intra-op threads during the run (restored afterwards). The default 1
    suits the small analytic problems, where threading only adds overhead (on a busy 2-core
    machine the default comparison took 9-40 s with 2 threads, 3 s with 1); ``None`` leaves
    torch's setting alone, e.g. for a large network model.
    """
    # 1. validate everything (cheap) before any work
    solver_list = _solvers(solvers)
    grid_names = _names("grid", grids, "grids")
    for g in grid_names:
        get_registry().entry("grid", g)
    budgets = _budgets(nfe)
    samples = _int_option("samples", samples, 1)
    seed = _int_option("seed", seed, 0, SEED_MAX)
    if threads is not None:
        threads = _int_option("threads", threads, 1)
    if isinstance(model, str):
        get_registry().entry("model", model)
        model_obj = _build("model", model)
    elif isinstance(model, Model):
        model_obj = model
    else:
        raise OptionError(f"compare: model={model!r} must be a registered model name or a Model")
    if not callable(getattr(model_obj, "sample_prior", None)):
        raise OptionError(
            f"compare: model {getattr(model_obj, 'name', type(model_obj).__name__)!r} has no "
            "sample_prior(n, generator=...); compare needs a model it can draw start states from"
        )
    schedule = model_obj.schedule
    grid_objs: dict[str, Grid] = {}
    for g in grid_names:
        grid_objs[g] = _build("grid", g)
        try:  # a grid that does not fit this schedule ('linspace' on a continuous one) fails now
            grid_objs[g](schedule, 1)
        except SolverlabError as e:
            raise OptionError(f"compare: grid {g!r} cannot be used with this model: {e}") from None
    plan: list[tuple[str, Solver, str, int, int | None, str]] = []
    for sname, solver in solver_list:
        fits = {b: budget_steps(solver, b) for b in budgets}
        for g in grid_names:
            for b in budgets:
                plan.append((sname, solver, g, b, *fits[b]))

    with torch_threads(threads):
        return mark_rising(_run(plan, model_obj, grid_objs, samples, seed, progress))


def mark_rising(rows: Sequence[Row]) -> list[Row]:
    """``rows`` with ``note=RISING`` on every cell of each solver x grid whose error rises from
    one NFE budget to the next (both solved, ``ok``; by more than 1e-12 relative)."""
    errors: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in rows:
        if r.status == STATUS_OK and r.error is not None:
            errors.setdefault((r.solver, r.grid), []).append((r.nfe_budget, r.error))
    rising = {key for key, pts in errors.items()
              if any(b > a * (1 + 1e-12) for (_, a), (_, b) in zip(sorted(pts), sorted(pts)[1:]))}
    return [attrs.evolve(r, note=RISING) if (r.solver, r.grid) in rising else r for r in rows]


def _run(plan, model_obj, grid_objs, samples, seed, progress) -> list[Row]:
    from .reference import reference_solution

    # 2. the problem and its reference, once
    schedule = model_obj.schedule
    gen = torch.Generator().manual_seed(seed)
    x = model_obj.sample_prior(samples, generator=gen, dtype=torch.float64)
    t_start, t_end = float(schedule.t_max), float(schedule.t_min)
    reference = reference_solution(model_obj, x, t_start, t_end)

    # 3. the solves
    rows: list[Row] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan), desc="compare", leave=False)
    grid_cache: dict[tuple[str, int], Tensor] = {}
    try:
        for sname, solver, g, budget, steps, why in plan:
            rows.append(_run_one(sname, solver, g, budget, steps, why, model_obj, x, reference,
                                 grid_objs, grid_cache))
            if bar is not None:
                bar.set_postfix_str(f"{sname} {g} {budget}", refresh=False)
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    return rows


def _run_one(sname, solver, g, budget, steps, why, model, x, reference, grid_objs, grid_cache):
    cell = {"solver": sname, "grid": g, "nfe_budget": budget}
    if steps is None:
        return Row(**cell, steps=None, nfe=None, error=None, wall_time=None, status=why)
    key = (g, steps)
    if key not in grid_cache:
        grid_cache[key] = grid_objs[g](model.schedule, steps)
    start = time.perf_counter()
    try:
        sol = solver.solve(model, x, grid_cache[key], progress=False)
    except SolverDivergedError:
        return Row(**cell, steps=steps, nfe=None, error=None,
                   wall_time=time.perf_counter() - start, status=STATUS_DIVERGED)
    except SolverlabError as e:
        msg = " ".join(str(e).split())
        return Row(**cell, steps=steps, nfe=None, error=None, wall_time=None,
                   status=f"failed: {msg}")
    err = relative_rms_error(sol.x, reference)
    status = STATUS_OK if math.isfinite(err) else STATUS_DIVERGED
    return Row(**cell, steps=steps, nfe=int(sol.nfe), error=err if math.isfinite(err) else None,
               wall_time=float(sol.wall_time), status=status)


# -- output ----------------------------------------------------------------------------------
def format_table(rows: Sequence[Row]) -> str:
    """The rows as an aligned text table for the terminal."""
    head = ("solver", "grid", "budget", "steps", "nfe", "rel. error", "time [ms]", "status")
    body = [
        (r.solver, r.grid, str(r.nfe_budget), "-" if r.steps is None else str(r.steps),
         "-" if r.nfe is None else str(r.nfe),
         "-" if r.error is None else f"{r.error:.3e}",
         "-" if r.wall_time is None else f"{1e3 * r.wall_time:.1f}",
         r.status + (f" ({r.note})" if r.note else ""))
        for r in rows
    ]
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    right = {2, 3, 4, 5, 6}

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w)
               for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), sep, *(line(b) for b in body)])


def write_outputs(
    rows: Sequence[Row], out_dir: str | Path, settings: Mapping[str, Any] | None = None,
    plot_solvers: Sequence[str] | str | None = None,
) -> dict[str, Path]:
    """Write ``compare.csv``, ``compare.json`` (``settings``, the error definition and the rows)
    and ``compare.png`` (log-log error vs actual NFE, one line per solver x grid) as the folder
    ``out_dir``, whole: they are written into a temporary folder beside it that then replaces
    it (:func:`solverlab._io.atomic_folder`), so a reader sees the old set or the new one, never
    a mix. ``out_dir`` may hold only these files. Returns ``{"csv", "json", "png"}`` paths.
    ``compare-heatmap.png`` (``"heatmap"``) holds log10 errors, solver x grid per budget;
    ``plot_solvers`` names the solvers both figures draw (default all;
    :mod:`solverlab.plotting`)."""
    from . import plotting

    out = Path(out_dir)
    dicts = [r.as_dict() for r in rows]
    figure = _plot(rows, settings or {}, plot_solvers)
    heatmap = plotting.heatmap_plot(rows, plot_solvers)
    with _io.atomic_folder(out, owned=OUTPUT_NAMES) as tmp:
        _io.write_csv(tmp / CSV_NAME, dicts, FIELDS)
        _io.write_json(tmp / JSON_NAME, {
            "settings": dict(settings or {}),
            "error": ERROR_DEFINITION,
            "rows": dicts,
        })
        _io.write_figure(tmp / PLOT_NAME, figure, dpi=120, bbox_inches="tight")
        _io.write_figure(tmp / HEATMAP_NAME, heatmap, dpi=120, bbox_inches="tight")
    return {"csv": out / CSV_NAME, "json": out / JSON_NAME, "png": out / PLOT_NAME,
            "heatmap": out / HEATMAP_NAME}


def _plot(rows: Sequence[Row], settings: Mapping[str, Any],
          solvers: Sequence[str] | str | None = None) -> Any:
    """The error-vs-NFE figure (:func:`solverlab.plotting.compare_plot`)."""
    from .plotting import compare_plot

    model = settings.get("model")
    return compare_plot(rows, solvers, title=f"solverlab compare{f': {model}' if model else ''}")
