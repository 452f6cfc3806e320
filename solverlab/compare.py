"""The comparison runner behind ``solverlab compare``: solvers x time grids x NFE budgets on one
model, each solve scored against a float64 reference solution; adaptive solvers are swept over
tolerances instead of budgets.

The problem: ``samples`` start states drawn from the model's prior at ``schedule.t_max``
(``model.sample_prior``, seeded with ``seed``), solved to ``schedule.t_min``; every solve runs
in float64. The reference is computed once (:func:`compute_reference`): the model's exact flow
where it has one (Gaussian data), else a float64 adaptive ``dopri8`` solve
(:func:`solverlab.reference.reference_solution`) at ``rtol = atol = reference_tol`` whose error
is estimated by a second solve at a ten times tighter tolerance on a few of the samples.

The error of a solve with final states ``x_i`` against reference states ``r_i``
(``i = 1..n`` samples, each flattened to a vector) is the RMS over samples of the L2 error,
relative to the RMS over samples of the reference's L2 norm; the median per-sample error is
reported beside it with the same normalisation (the RMS is dominated by the few samples that
end in another mode than the reference)::

    error        = sqrt(mean_i ||x_i - r_i||^2) / sqrt(mean_i ||r_i||^2)
    median_error = median_i ||x_i - r_i||       / sqrt(mean_i ||r_i||^2)

An NFE budget ``B`` becomes the largest step count ``s`` with ``solver.expected_nfe(s) <= B``;
a solver that cannot say in advance (``expected_nfe`` returns ``None``) runs ``s = B`` steps.
``Row.nfe`` is always the NFE the solve actually took (counted by the Denoiser), and a solve
that took more than its budget is marked ``"over budget"``, never ``"ok"``. A ``custom`` grid
holds its own times: it runs once per solver, without a budget. A searched grid,
``searched:FILE`` (a file of :func:`solverlab.search.search_grid`, ``solverlab grid-search``),
runs once for the solver (name and options) and step count it was searched for; the row of
every other solver is ``"skipped"`` with the reason. Its file must match the run's model
(fingerprint), schedule (name and parameters) and time range, and may not hold this run's
seed or any of its start states (:func:`evaluation_noises`): a grid is never scored on the
states it was fitted to. An adaptive solver
(:class:`~solverlab.AdaptiveSolver`) runs once per tolerance ``tol`` with ``rtol = atol = tol``
(a ``rtol`` or ``atol`` given in its solver options stays fixed), from ``t_max`` to ``t_min``.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from . import _io
from .errors import OptionError, SolverDivergedError, SolverlabError
from .evaluation import (
    DEFAULT_MODEL,
    DEFAULT_SAMPLES,
    ERROR_DEFINITION,
    MEDIAN_ERROR_DEFINITION,
    _about,
    _build,
    build_model,
    evaluation_noises,
    relative_errors,
    relative_rms_error,
)
from .grid import Custom, Grid
from .model import Model
from .registry import get_registry
from .search import SearchedGrid, noise_digests, solver_settings
from .solver import AdaptiveSolver, Solver

__all__ = [
    "ADAPTIVE_GRID",
    "CSV_NAME",
    "DEFAULT_GRIDS",
    "DEFAULT_MODEL",
    "DEFAULT_NFE",
    "DEFAULT_REFERENCE_TOL",
    "DEFAULT_SAMPLES",
    "DEFAULT_TOLERANCES",
    "ERROR_DEFINITION",
    "HEATMAP_NAME",
    "JSON_NAME",
    "MEDIAN_ERROR_DEFINITION",
    "OUTPUT_NAMES",
    "PLOT_NAME",
    "STATUSES",
    "Comparison",
    "ReferenceInfo",
    "Row",
    "budget_steps",
    "build_model",
    "compute_reference",
    "evaluation_noises",
    "format_summary",
    "format_table",
    "mark_rising",
    "relative_errors",
    "relative_rms_error",
    "run_compare",
    "status_counts",
    "torch_threads",
    "write_outputs",
]

DEFAULT_GRIDS: tuple[str, ...] = ("logsnr", "time-uniform")
DEFAULT_NFE: tuple[int, ...] = (5, 10, 20)
#: Tolerances of the adaptive solvers in the default run: two keep it at a few seconds (each
#: adaptive solve costs 10-240 NFE here); ``--tolerances`` sweeps further.
DEFAULT_TOLERANCES: tuple[float, ...] = (1e-2, 1e-3)
#: ``rtol = atol`` of an adaptive reference solve.
DEFAULT_REFERENCE_TOL = 1e-9
#: Samples the reference's error is estimated on (a second solve at ``reference_tol / 10``).
REFERENCE_CHECK_SAMPLES = 16
#: The ``grid`` of an adaptive solver's rows: it chooses its own steps.
ADAPTIVE_GRID = "(adaptive)"
CSV_NAME, JSON_NAME, PLOT_NAME = "compare.csv", "compare.json", "compare.png"
HEATMAP_NAME = "compare-heatmap.png"
#: The result set of one comparison: the only files its output folder may hold.
OUTPUT_NAMES = (CSV_NAME, JSON_NAME, PLOT_NAME, HEATMAP_NAME)
RISING = "error rises with NFE"

STATUS_OK = "ok"
STATUS_OVER_BUDGET = "over budget"
STATUS_DIVERGED_LIKE = "diverged-like"
STATUS_DIVERGED = "diverged"
#: Every status a row can have; ``skipped`` and ``failed`` carry the reason after a colon.
STATUSES = (STATUS_OK, STATUS_OVER_BUDGET, STATUS_DIVERGED_LIKE, STATUS_DIVERGED, "skipped",
            "failed")
#: A relative error above this is no approximation of the reference: ``"diverged-like"``.
DIVERGED_LIKE_ERROR = 1.0


@attrs.frozen(kw_only=True)
class Row:
    """One cell of a comparison.

    ``kind`` is ``"fixed"`` (a grid solver: ``grid``, ``nfe_budget``) or ``"adaptive"`` (grid
    :data:`ADAPTIVE_GRID`, ``nfe_budget`` ``None``, ``tolerance`` its ``rtol = atol``). A
    ``custom`` grid has no budget either. ``steps``, ``nfe``, ``error``, ``median_error`` and
    ``wall_time`` (seconds, the solve only) are ``None`` when the cell did not run. ``steps``
    of an adaptive row is ``None`` (its accepted steps are not reported by every solver).

    ``status``: ``"ok"``; ``"over budget"`` (it took more NFE than ``nfe_budget``);
    ``"diverged-like"`` (finite, but ``error`` > 1); ``"diverged"`` (NaN/inf during the solve);
    ``"skipped: <why>"`` (e.g. the budget is smaller than one step) or ``"failed: <error>"``
    (the solver refused the grid with a solverlab error). ``warnings``: the warnings raised
    inside the solve, ``"Category: message"`` each, in order, without repeats. ``note`` is set
    by :func:`mark_rising` on every cell of a solver x grid whose error rises with NFE.
    """

    solver: str
    kind: str = "fixed"
    grid: str
    nfe_budget: int | None
    tolerance: float | None = None
    steps: int | None
    nfe: int | None
    error: float | None
    median_error: float | None = None
    wall_time: float | None
    status: str
    warnings: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The row as one flat record (the CSV row and the JSON row alike): ``warnings`` joined
        by ``" | "``, ``None`` when there are none."""
        d = attrs.asdict(self)
        d["warnings"] = " | ".join(self.warnings) or None
        return d


FIELDS: tuple[str, ...] = tuple(f.name for f in attrs.fields(Row))


@attrs.frozen(kw_only=True)
class ReferenceInfo:
    """Which reference the errors are measured against, and how good it is.

    ``kind``: ``"exact"`` (the model's closed-form flow) or ``"adaptive"`` (a float64
    ``method`` solve at ``rtol = atol = tolerance``). ``estimated_error``: the relative RMS
    difference (:func:`relative_rms_error`) to a solve at ``tolerance / 10`` on
    ``check_samples`` samples; ``None`` for an exact reference, or when the tighter solve
    failed (``note`` says why)."""

    kind: str
    method: str | None = None
    tolerance: float | None = None
    estimated_error: float | None = None
    check_samples: int | None = None
    note: str = ""

    def describe(self) -> str:
        if self.kind == "exact":
            return "exact closed-form flow of the model (Gaussian data); float64 round-off only"
        text = (f"float64 adaptive {self.method} solve, rtol = atol = {self.tolerance:g}; "
                "estimated error ")
        if self.estimated_error is None:
            return text + f"unknown ({self.note})"
        return text + (f"{self.estimated_error:.1e} (against rtol = atol = "
                       f"{self.tolerance / 10:g} on {self.check_samples} samples)")

    def as_dict(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "description": self.describe()}


@attrs.frozen(kw_only=True)
class Comparison(Sequence[Row]):
    """What :func:`run_compare` returns: a sequence of :class:`Row` (in the order solver, grid,
    budget or tolerance) that also carries the :class:`ReferenceInfo` and the names of the model
    and its schedule."""

    rows: tuple[Row, ...] = attrs.field(converter=tuple)
    reference: ReferenceInfo
    model: str
    schedule: str

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):  # type: ignore[override]
        return self.rows[i]

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows)


# -- pieces ----------------------------------------------------------------------------------
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
    return list(dict.fromkeys(names))


def _options_of(kind: str, options: Mapping[str, Mapping[str, Any]] | None,
                allowed: Sequence[str], what: str) -> dict[str, dict[str, Any]]:
    """Per-part options, checked: every key names a registered part of this run."""
    out: dict[str, dict[str, Any]] = {}
    for name, opts in dict(options or {}).items():
        get_registry().entry(kind, name)  # unknown name -> close matches
        if name not in allowed:
            raise OptionError(
                f"compare: {kind} {name!r} has options but is not in this run's {what} "
                f"({', '.join(allowed)}); add it there or drop its options")
        if not isinstance(opts, Mapping):
            raise OptionError(f"compare: the options of {kind} {name!r} must be a mapping of "
                              f"option names to values; got {opts!r}")
        out[name] = dict(opts)
    return out





def _solver_runs(
    names: Iterable[str] | str | None,
    options: Mapping[str, Mapping[str, Any]] | None,
    tolerances: Sequence[float] | None,
) -> list[tuple[str, Solver, float | None]]:
    """``(name, solver, tolerance)`` for each fixed-grid solver (tolerance ``None``) and each
    adaptive solver x tolerance."""
    reg = get_registry()
    with _about("solvers"):
        chosen = [e.name for e in reg.entries("solver")] if names is None else [
            reg.entry("solver", n).name for n in _names("solver", names, "solvers")]
        if not chosen:
            raise OptionError("compare: no solver is registered; see `solverlab list`")
    with _about("solver_options"):
        per = _options_of("solver", options, chosen, "solvers")
    with _about("tolerances"):
        tols = _tolerances(tolerances)
        adaptive = [n for n in chosen if issubclass(reg.entry("solver", n).cls, AdaptiveSolver)]
        if tolerances is not None and not adaptive:
            every = [e.name for e in reg.entries("solver") if issubclass(e.cls, AdaptiveSolver)]
            raise OptionError(
                "compare: tolerances apply to adaptive solvers only, and none of this run's "
                f"solvers is adaptive; add one of {', '.join(every) or '(none)'}")
    runs: list[tuple[str, Solver, float | None]] = []
    for name in chosen:
        opts = per.get(name, {})
        if name not in adaptive:
            with _about("solver_options" if opts else "solvers"):
                runs.append((name, _build("solver", name, opts), None))
            continue
        for tol in tols:
            with _about("solver_options" if opts else "tolerances"):
                try:
                    solver = _build("solver", name, {"rtol": tol, "atol": tol, **opts})
                except OptionError as e:
                    raise OptionError(
                        f"compare: adaptive solver {name!r} cannot take rtol = atol = {tol:g} "
                        f"(compare sweeps the tolerances over them): {e}") from None
            runs.append((name, solver, tol))
    return runs


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


def _tolerances(tolerances: Sequence[float] | None) -> list[float]:
    values = list(DEFAULT_TOLERANCES if tolerances is None else tolerances)
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float))
           or not (math.isfinite(v) and 0 < v <= 1)]
    if not values or bad:
        raise OptionError(
            f"compare: tolerances={tolerances!r} is not allowed; give one or more numbers in "
            "(0, 1], e.g. tolerances=(1e-2, 1e-3, 1e-4)")
    return sorted(set(float(v) for v in values), reverse=True)


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


# -- the reference ---------------------------------------------------------------------------
def compute_reference(model: Model, x: Tensor, t_start: float, t_end: float,
                      tolerance: float = DEFAULT_REFERENCE_TOL,
                      check_samples: int = REFERENCE_CHECK_SAMPLES,
                      ) -> tuple[Tensor, ReferenceInfo]:
    """The reference solution of ``x`` from ``t_start`` to ``t_end`` (float64) and what it is:
    the model's exact flow where it has one, else a float64 adaptive ``dopri8`` solve at
    ``rtol = atol = tolerance`` whose error is estimated against a second solve at
    ``tolerance / 10`` on the first ``check_samples`` samples."""
    from .reference import reference_solution

    exact = getattr(model, "exact_flow", None)
    if callable(exact):
        with torch.no_grad():
            out = exact(x.to(torch.float64), t_start, t_end)
        if out is not None:
            return out.to(torch.float64).reshape(x.shape), ReferenceInfo(kind="exact")
    ref = reference_solution(model, x, t_start, t_end, rtol=tolerance, atol=tolerance,
                             use_exact=False)
    n = min(check_samples, x.shape[0])
    info = {"kind": "adaptive", "method": "dopri8", "tolerance": tolerance, "check_samples": n}
    try:
        tight = reference_solution(model, x[:n], t_start, t_end, rtol=tolerance / 10,
                                   atol=tolerance / 10, use_exact=False)
    except SolverlabError as e:
        note = f"the check solve at rtol = atol = {tolerance / 10:g} failed: {e}"
        return ref, ReferenceInfo(**info, note=" ".join(note.split()))
    return ref, ReferenceInfo(**info, estimated_error=relative_rms_error(ref[:n], tight))


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
    *,
    model_options: Mapping[str, Any] | None = None,
    schedule: str | None = None,
    schedule_options: Mapping[str, Any] | None = None,
    solver_options: Mapping[str, Mapping[str, Any]] | None = None,
    grid_options: Mapping[str, Mapping[str, Any]] | None = None,
    tolerances: Sequence[float] | None = None,
    reference_tol: float = DEFAULT_REFERENCE_TOL,
) -> Comparison:
    """Solve the model's problem with every solver x grid x NFE budget (adaptive solvers: x
    tolerance); one :class:`Row` each, returned as a :class:`Comparison`.

    ``solvers=None`` takes every registered solver, adaptive ones included (swept over
    ``tolerances``, default :data:`DEFAULT_TOLERANCES`; giving ``tolerances`` when no solver is
    adaptive is an error). ``model`` is a registered name (built with ``model_options``; see
    :func:`build_model` for ``schedule``/``schedule_options``) or a :class:`~solverlab.Model`
    with ``sample_prior``. ``solver_options`` / ``grid_options`` map a solver / grid of this
    run to its options, e.g. ``{"dpmpp-3m": {"official_d2": True}}``,
    ``{"custom": {"times": [1.0, 0.3, 0.001]}}``. A grid name ``searched:FILE`` is a searched
    grid (module docstring). ``reference_tol``: ``rtol = atol`` of an
    adaptive reference (:func:`compute_reference`).

    Every name and value is checked before any solving starts: an unknown name raises
    :class:`~solverlab.UnknownNameError` (with close matches), a bad value
    :class:`~solverlab.OptionError`; either carries ``error.option``, the argument it is about.

    ``threads``: torch's intra-op threads during the run (restored afterwards). The default 1
    suits the small analytic problems, where threading only adds overhead (on a busy 2-core
    machine the default comparison took 9-40 s with 2 threads, 3 s with 1); ``None`` leaves
    torch's setting alone, e.g. for a large network model.
    """
    # 1. validate everything (cheap) before any work
    runs = _solver_runs(solvers, solver_options, tolerances)
    with _about("grids"):
        grid_names = _names("grid", grids, "grids")
        searched = {g: _load_searched(g) for g in grid_names if _is_searched(g)}
        for g in grid_names:
            if g not in searched:
                get_registry().entry("grid", g)
    with _about("grid_options"):
        per_grid = _options_of("grid", grid_options, grid_names, "grids")
    with _about("nfe"):
        budgets = _budgets(nfe)
    with _about("samples"):
        samples = _int_option("samples", samples, 1)
    with _about("seed"):
        seed = _int_option("seed", seed, 0, SEED_MAX)
    with _about("threads"):
        if threads is not None:
            threads = _int_option("threads", threads, 1)
    with _about("reference_tol"):
        if isinstance(reference_tol, bool) or not isinstance(reference_tol, (int, float)) or not (
                math.isfinite(reference_tol) and 1e-14 <= reference_tol <= 1e-3):
            raise OptionError(f"compare: reference_tol={reference_tol!r} is not allowed; it must "
                              "be a number in [1e-14, 1e-3], e.g. 1e-9")
    model_obj = build_model(model, model_options, schedule, schedule_options)
    with _about("model"):
        if not callable(getattr(model_obj, "sample_prior", None)):
            raise OptionError(
                f"compare: model {getattr(model_obj, 'name', type(model_obj).__name__)!r} has no "
                "sample_prior(n, generator=..., dtype=...); compare needs a model it can draw "
                "start states from")
    schedule_obj = model_obj.schedule
    x = evaluation_noises(model_obj, samples, seed)
    grid_objs: dict[str, Grid] = {}
    for g, found in searched.items():
        with _about("grids"):
            _check_searched(g, found, model_obj, seed, x)
            grid_objs[g] = found.grid()
    for g in grid_names:
        if g in searched:
            continue
        with _about("grid_options" if g in per_grid else "grids"):
            grid_objs[g] = _build("grid", g, per_grid.get(g))
            # a grid that does not fit this schedule ('linspace' on a continuous one) fails now
            try:
                grid_objs[g](schedule_obj, None if isinstance(grid_objs[g], Custom) else 1)
            except SolverlabError as e:
                raise OptionError(
                    f"compare: grid {g!r} cannot be used with schedule {schedule_obj.name!r}: "
                    f"{e}") from None
    plan: list[_Cell] = []
    for sname, solver, tol in runs:
        settings = _json_value(solver_settings(solver))
        solver = _prepared(solver, model_obj, seed)
        if tol is not None:
            plan.append(_Cell(sname, solver, "adaptive", ADAPTIVE_GRID, None, tol, None, ""))
            continue
        fits = {b: budget_steps(solver, b) for b in budgets}
        for g in grid_names:
            rule = grid_objs[g]
            if g in searched:  # one row: its own solver at its own steps, else skipped
                why = _searched_mismatch(g, searched[g], sname, settings)
                plan.append(_Cell(sname, solver, "fixed", g, None, None,
                                  None if why else searched[g].steps, why))
                continue
            if isinstance(rule, Custom):
                plan.append(_Cell(sname, solver, "fixed", g, None, None, len(rule.times_) - 1, ""))
                continue
            for b in budgets:
                plan.append(_Cell(sname, solver, "fixed", g, b, None, *fits[b]))

    with torch_threads(threads):
        rows, info = _run(plan, model_obj, grid_objs, x, progress, reference_tol)
    name = model if isinstance(model, str) else getattr(model, "name", type(model).__name__)
    return Comparison(rows=mark_rising(rows), reference=info, model=str(name),
                      schedule=schedule_obj.name)


#: ``--grids searched:FILE``: a grid found by :func:`solverlab.search.search_grid`.
SEARCHED_PREFIX = "searched:"


def _is_searched(name: str) -> bool:
    return name == "searched" or name.startswith(SEARCHED_PREFIX)


def _load_searched(name: str) -> SearchedGrid:
    path = name[len(SEARCHED_PREFIX):].strip()
    if not path:
        raise OptionError(f"compare: grid {name!r} names no file; a searched grid is given as "
                          "searched:FILE, the JSON file `solverlab grid-search` wrote")
    return SearchedGrid.load(path)


def _json_value(v: Any) -> Any:
    """``v`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(v, default=str))


def _check_searched(name: str, found: SearchedGrid, model: Model, seed: int, x: Tensor) -> None:
    """A searched grid applies only to the model and schedule it was searched on, from
    ``t_max`` to ``t_min``, and may not have seen this run's start states."""
    from .ems import model_fingerprint, schedule_parameters

    sch = model.schedule
    checks = [
        ("model fingerprint", found.fingerprint, model_fingerprint(model)),
        ("schedule", found.schedule, sch.name),
        ("schedule parameters", _json_value(found.schedule_parameters),
         _json_value(schedule_parameters(sch))),
    ]
    for field, theirs, ours in checks:
        if theirs != ours:
            raise OptionError(
                f"compare: {name} was searched with {field} {theirs!r}, this run's model has "
                f"{ours!r}; a searched grid applies only to the model and schedule it was "
                "searched on")
    for field, theirs, ours in (("t_start", found.t_start, sch.t_max),
                                ("t_end", found.t_end, sch.t_min)):
        if not math.isclose(theirs, ours, rel_tol=1e-12, abs_tol=1e-15):
            raise OptionError(
                f"compare: {name} runs with {field} {theirs!r}, but compare solves from "
                f"t_max {sch.t_max!r} to t_min {sch.t_min!r} ({field} {ours!r}); search the "
                "grid over the schedule's whole range")
    if found.seed is not None and found.seed == seed:
        raise OptionError(
            f"compare: {name} was searched on start states drawn with seed {seed}, which is "
            "this run's evaluation seed: scoring it on them would test it on its training "
            "set; run compare with another --seed or search with another seed")
    seen = set(found.noise_digests) & set(noise_digests(x))
    if seen:
        raise OptionError(
            f"compare: {name} was searched on {len(seen)} of this run's {x.shape[0]} start "
            f"states (seed {seed}): scoring it on them would test it on its training set; run "
            "compare with another --seed or search on other start states")


def _searched_mismatch(name: str, found: SearchedGrid, solver: str,
                       settings: dict[str, Any]) -> str:
    """``""`` when the grid was searched for this solver with these options, else the
    ``skipped: ...`` status of its row."""
    if found.solver != solver:
        return (f"skipped: {name} was searched for solver {found.solver!r} at {found.steps} "
                "steps; it applies to that solver only")
    if _json_value(found.solver_options) != settings:
        diff = sorted(k for k in {*settings, *found.solver_options}
                      if found.solver_options.get(k) != settings.get(k))
        shown = ", ".join(f"{k}={found.solver_options.get(k)!r} there, "
                          f"{settings.get(k)!r} here" for k in diff)
        return f"skipped: {name} was searched for {solver!r} with other options ({shown})"
    return ""


def mark_rising(rows: Sequence[Row]) -> list[Row]:
    """``rows`` with ``note=RISING`` on every cell of each solver x grid whose error rises from
    one NFE budget to the next (both solved, ``ok``; by more than 1e-12 relative). Rows without
    a budget (adaptive sweeps, custom grids) are left as they are."""
    errors: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in rows:
        if r.status == STATUS_OK and r.error is not None and r.nfe_budget is not None:
            errors.setdefault((r.solver, r.grid), []).append((r.nfe_budget, r.error))
    rising = {key for key, pts in errors.items()
              if any(b > a * (1 + 1e-12) for (_, a), (_, b) in zip(sorted(pts), sorted(pts)[1:]))}
    return [attrs.evolve(r, note=RISING) if (r.solver, r.grid) in rising
            and r.nfe_budget is not None else r for r in rows]


def _prepared(solver: Solver, model: Model, seed: int) -> Solver:
    """A solver that needs per-model data first (``prepare(model, data)``: dpmv3's statistics)
    is prepared from the model's own data distribution when it has one (analytic models);
    otherwise it is run as given, and says what it lacks."""
    prepare = getattr(solver, "prepare", None)
    sample = getattr(getattr(model, "data", None), "sample", None)
    if prepare is None or not callable(sample):
        return solver
    return prepare(model, sample(1024, generator=torch.Generator().manual_seed(seed)))


@attrs.frozen
class _Cell:
    solver_name: str
    solver: Solver
    kind: str
    grid: str
    budget: int | None
    tolerance: float | None
    steps: int | None
    why: str


def _run(plan, model_obj, grid_objs, x, progress, reference_tol):
    """The reference and every cell's row. Under torchrun (:mod:`solverlab.distributed`) each
    rank solves its contiguous slice of the samples for every fixed-grid cell; the final
    states are gathered and every rank scores the whole batch, so the rows do not depend on the
    world size (up to float64 round-off). An adaptive reference or solver couples the samples
    through its shared step size, so it is not sharded: rank 0 computes the reference and
    sends it to the others, and the adaptive cells are dealt out whole, one rank each."""
    from . import distributed

    ctx = distributed.context()
    # 2. the problem and its reference, once
    schedule = model_obj.schedule
    t_start, t_end = float(schedule.t_max), float(schedule.t_min)
    if ctx.active:
        got: tuple[Any, ...] = ()
        if ctx.is_main():
            try:
                got = ("ok", *compute_reference(model_obj, x, t_start, t_end, reference_tol))
            except SolverlabError as e:  # every rank raises it, none waits for the others
                got = ("error", e)
        got = distributed.broadcast_object(got)
        if got[0] == "error":
            raise got[1]
        reference, info = got[1], got[2]
    else:
        reference, info = compute_reference(model_obj, x, t_start, t_end, reference_tol)

    # 3. the solves: this rank's slice of the samples, or its share of the adaptive cells
    part = ctx.shard(x.shape[0])
    mine: list[Any] = []
    bar = None
    if progress and ctx.is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan), desc="compare", leave=False)
    grid_cache: dict[tuple[str, int], Tensor] = {}
    ends = torch.tensor([t_start, t_end], dtype=torch.float64)
    adaptive_seen = 0
    try:
        for cell in plan:
            if cell.kind == "adaptive":
                owner = adaptive_seen % ctx.world_size
                adaptive_seen += 1
                out = _solve_cell(cell, model_obj, x, grid_objs, grid_cache, ends) \
                    if owner == ctx.rank else None
                mine.append(None if out is None else _row(cell, [out], reference))
            elif cell.kind == "fixed" and cell.steps is None:
                mine.append(None)
            else:
                xs = x[part]
                mine.append(_solve_cell(cell, model_obj, xs, grid_objs, grid_cache, ends)
                            if xs.shape[0] else None)
            if bar is not None:
                what = cell.budget if cell.tolerance is None else f"tol {cell.tolerance:g}"
                bar.set_postfix_str(f"{cell.solver_name} {cell.grid} {what}", refresh=False)
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    every = distributed.all_gather_objects(mine)  # [rank][cell]
    rows: list[Row] = []
    for i, cell in enumerate(plan):
        outs = [r[i] for r in every]
        if cell.kind == "adaptive":
            rows.append(next(o for o in outs if o is not None))
        elif cell.steps is None:
            rows.append(_row(cell, [], reference))
        else:
            rows.append(_row(cell, [o for o in outs if o is not None], reference))
    return rows, info


def _warning_text(w: warnings.WarningMessage) -> str:
    return f"{w.category.__name__}: {' '.join(str(w.message).split())}"


@attrs.frozen
class _Outcome:
    """One solve of a cell on some of the samples: its final states (``None`` when it did
    not finish), NFE, wall time, the failure status (``""`` when it finished) and warnings."""

    x: Tensor | None
    nfe: int | None
    wall: float | None
    status: str
    warnings: tuple[str, ...]


def _solve_cell(cell: _Cell, model, x, grid_objs, grid_cache, ends) -> _Outcome:
    if cell.kind == "adaptive":
        grid = ends
    else:
        key = (cell.grid, cell.steps)
        if key not in grid_cache:
            rule = grid_objs[cell.grid]
            grid_cache[key] = rule(model.schedule, None if isinstance(rule, Custom)
                                   else cell.steps)
        grid = grid_cache[key]
    start = time.perf_counter()
    status = ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            sol = cell.solver.solve(model, x, grid, progress=False)
        except SolverDivergedError:
            sol, status = None, STATUS_DIVERGED
        except SolverlabError as e:
            sol, status = None, f"failed: {' '.join(str(e).split())}"
    said = tuple(dict.fromkeys(_warning_text(w) for w in caught))
    if sol is None:
        wall = time.perf_counter() - start if status == STATUS_DIVERGED else None
        return _Outcome(None, None, wall, status, said)
    return _Outcome(sol.x, int(sol.nfe), float(sol.wall_time), "", said)


def _row(cell: _Cell, outs: Sequence[_Outcome], reference: Tensor) -> Row:
    """The row of a cell from its solves on the slices of the samples, in rank order (one
    solve alone): a divergence on any slice makes the row diverged, else the first failure
    fails it; the wall time is the slowest slice's."""
    base = {"solver": cell.solver_name, "kind": cell.kind, "grid": cell.grid,
            "nfe_budget": cell.budget, "tolerance": cell.tolerance}
    if cell.kind == "fixed" and cell.steps is None:
        return Row(**base, steps=None, nfe=None, error=None, wall_time=None, status=cell.why)
    steps = cell.steps
    said = tuple(dict.fromkeys(w for o in outs for w in o.warnings))
    walls = [o.wall for o in outs if o.wall is not None]
    wall = max(walls) if walls else None
    failed = [o.status for o in outs if o.status]
    if failed:
        status = STATUS_DIVERGED if STATUS_DIVERGED in failed else failed[0]
        return Row(**base, steps=steps, nfe=None, error=None,
                   wall_time=wall if status == STATUS_DIVERGED else None, status=status,
                   warnings=said)
    xs = outs[0].x if len(outs) == 1 else torch.cat([o.x for o in outs])
    nfe = max(int(o.nfe) for o in outs)
    err, med = relative_errors(xs, reference)
    if not math.isfinite(err):
        status = STATUS_DIVERGED
    elif err > DIVERGED_LIKE_ERROR:
        status = STATUS_DIVERGED_LIKE
    elif cell.budget is not None and nfe > cell.budget:
        status = STATUS_OVER_BUDGET
    else:
        status = STATUS_OK
    finite = math.isfinite(err)
    return Row(**base, steps=steps, nfe=nfe, error=err if finite else None,
               median_error=med if finite and math.isfinite(med) else None,
               wall_time=wall, status=status, warnings=said)


# -- output ----------------------------------------------------------------------------------
def status_counts(rows: Iterable[Row]) -> dict[str, int]:
    """How many rows have each status (``skipped``/``failed`` without their reason), in the
    order of :data:`STATUSES`, only those that occur."""
    counts = dict.fromkeys(STATUSES, 0)
    for r in rows:
        key = r.status.split(":", 1)[0]
        counts[key] = counts.get(key, 0) + 1
    return {k: v for k, v in counts.items() if v}


def _notes(rows: Sequence[Row]) -> dict[str, int]:
    """Footnote numbers of the distinct warnings, in order of appearance."""
    notes: dict[str, int] = {}
    for r in rows:
        for w in r.warnings:
            notes.setdefault(w, len(notes) + 1)
    return notes


def format_table(rows: Sequence[Row]) -> str:
    """The rows as an aligned text table for the terminal; warnings raised in a solve are
    numbered footnotes (``[w1]`` after the status) listed below the table."""
    notes = _notes(rows)
    head = ("solver", "grid", "budget", "tol", "steps", "nfe", "rms error", "median error",
            "time [ms]", "status")

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.3e}"

    body = [
        (r.solver, r.grid, "-" if r.nfe_budget is None else str(r.nfe_budget),
         "-" if r.tolerance is None else f"{r.tolerance:g}",
         "-" if r.steps is None else str(r.steps),
         "-" if r.nfe is None else str(r.nfe), num(r.error), num(r.median_error),
         "-" if r.wall_time is None else f"{1e3 * r.wall_time:.1f}",
         r.status + (f" ({r.note})" if r.note else "")
         + "".join(f" [w{notes[w]}]" for w in r.warnings))
        for r in rows
    ]
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    right = {2, 3, 4, 5, 6, 7, 8}

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w)
               for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    text = [line(head), sep, *(line(b) for b in body)]
    if notes:
        text.append("")
        text.extend(f"[w{i}] {w}" for w, i in notes.items())
    return "\n".join(text)


def format_summary(rows: Sequence[Row]) -> str:
    """Each status with its count: ``"120 ok, 20 over budget, 10 diverged-like; 4 with
    warnings"``."""
    counts = ", ".join(f"{n} {s}" for s, n in status_counts(rows).items())
    warned = sum(1 for r in rows if r.warnings)
    return (counts or "no runs") + (f"; {warned} with warnings" if warned else "")


def write_outputs(
    rows: Sequence[Row], out_dir: str | Path, settings: Mapping[str, Any] | None = None,
    plot_solvers: Sequence[str] | str | None = None,
) -> dict[str, Path]:
    """Write ``compare.csv``, ``compare.json`` (``settings``, the error definitions, the
    reference when ``rows`` is a :class:`Comparison`, the status counts and the rows),
    ``compare.png`` (log-log error vs actual NFE) and ``compare-heatmap.png`` (log10 errors,
    solver x grid per budget) as the folder ``out_dir``, whole: they are written into a
    temporary folder beside it that then replaces it (:func:`solverlab._io.atomic_folder`), so
    a reader sees the old set or the new one, never a mix. ``out_dir`` may hold only these
    files. Returns ``{"csv", "json", "png", "heatmap"}`` paths. ``plot_solvers`` names the
    solvers both figures draw (default all; :mod:`solverlab.plotting`).

    The CSV and JSON rows are the same flat records (:meth:`Row.as_dict`)."""
    from . import plotting

    out = Path(out_dir)
    dicts = [r.as_dict() for r in rows]
    figure = _plot(_plot_rows(rows), settings or {}, plot_solvers)
    heatmap = plotting.heatmap_plot([r for r in rows if r.nfe_budget is not None],
                                    plot_solvers)
    reference = getattr(rows, "reference", None)
    with _io.atomic_folder(out, owned=OUTPUT_NAMES) as tmp:
        _io.write_csv(tmp / CSV_NAME, dicts, FIELDS)
        _io.write_json(tmp / JSON_NAME, {
            "settings": dict(settings or {}),
            "error": ERROR_DEFINITION,
            "median_error": MEDIAN_ERROR_DEFINITION,
            "reference": None if reference is None else reference.as_dict(),
            "statuses": status_counts(rows),
            "rows": dicts,
        })
        _io.write_figure(tmp / PLOT_NAME, figure, dpi=120, bbox_inches="tight")
        _io.write_figure(tmp / HEATMAP_NAME, heatmap, dpi=120, bbox_inches="tight")
    return {"csv": out / CSV_NAME, "json": out / JSON_NAME, "png": out / PLOT_NAME,
            "heatmap": out / HEATMAP_NAME}


def _plot_rows(rows: Sequence[Row]) -> list[Row]:
    """The rows as the plot takes them: it places x ticks at the NFE budgets, so a row without
    a budget (adaptive, custom grid) offers its actual NFE; rows with neither are left out
    (they did not run)."""
    return [r if r.nfe_budget is not None else attrs.evolve(r, nfe_budget=r.nfe)
            for r in rows if r.nfe_budget is not None or r.nfe is not None]


def _plot(rows: Sequence[Row], settings: Mapping[str, Any],
          solvers: Sequence[str] | str | None = None) -> Any:
    """The error-vs-NFE figure (:func:`solverlab.plotting.compare_plot`)."""
    from .plotting import compare_plot

    model = settings.get("model")
    return compare_plot(rows, solvers, title=f"solverlab compare{f': {model}' if model else ''}")
