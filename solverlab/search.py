"""Searched time grids: the ``steps + 1`` times at which one solver, on one model, comes
closest to the exact probability-flow solution.

The search fits the grid to reference solutions of *training* start states, as "Learning to
Discretize Denoising Diffusion ODEs" (LD3, Tong et al. 2025) does with teacher samples, and
keeps the iterate that is best on a *held-out* batch:

- the ends ``t_start``, ``t_end`` are fixed (those of the start grid); the ``steps - 1`` interior
  times are ``t(lambda_k)`` with ``lambda_k = lambda_0 + (lambda_N - lambda_0) sum_{j<=k} w_j``
  and ``w = softmax(theta, 0)``: every ``theta`` gives a strictly decreasing grid, and
  ``theta = 0`` is the ``logsnr`` grid;
- the objective is compare's error (:data:`solverlab.evaluation.ERROR_DEFINITION`) on the training
  start states against their float64 reference (:func:`solverlab.reference.reference_solution`,
  computed once and cached);
- ``method="gradient"``: Adam on ``theta`` with gradients through the solve
  (``Solver.solve(..., grad=True)``, the core's differentiable path); ``method="derivative-free"``:
  Nelder-Mead on the same ``theta`` (forward solves only);
- every iterate the optimiser accepts is scored on the held-out batch; the result is the iterate
  with the lowest held-out error, and the start grid itself when no iterate beats it there, so
  a searched grid is never worse than its start grid on the held-out batch.

Measured (``bench/search.md``: the 2-D default mixture on ``vp-linear`` and a 16-D 6-component
mixture on ``vp-discrete``, ``dpmpp-2m`` and ``unipc`` at 5-20 steps, 256 training and 256
held-out start states, scored on compare's evaluation batch, which no search sees): searched
grids had 0.57 (gradient) and 0.60 (derivative-free) of ``logsnr``'s error (medians over 24
searches each), none was worse than ``logsnr``; see :data:`DEFAULT_METHOD` for the choice.

No test-set tuning: start states equal (row by row, after rounding to float32) to compare's
evaluation batch (:func:`solverlab.evaluation.evaluation_noises`) are refused, a search that draws
its own start states refuses compare's seed, and a saved grid records its training seed and
row digests so that ``solverlab compare --grids searched:FILE`` refuses to score it on the
states it was fitted to.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from . import _io
from .errors import GridError, InputError, OptionError, SolverDivergedError, SolverlabError
from .grid import Custom, Grid, check_grid
from .model import Model
from .registry import get_registry

__all__ = [
    "DEFAULT_HELD_OUT",
    "DEFAULT_ITERATIONS",
    "DEFAULT_METHOD",
    "DEFAULT_SEED",
    "DEFAULT_START",
    "DEFAULT_TRAIN",
    "FORMAT",
    "METHODS",
    "SearchedGrid",
    "noise_digests",
    "search_grid",
    "solver_settings",
]

F64 = torch.float64

#: The optimisers :func:`search_grid` offers.
METHODS = ("gradient", "derivative-free")
#: Gradient (Adam through the differentiable solve), by measurement (``bench/search.md``, 24
#: problems: 2 models x 2 solvers x 5-20 steps): level with Nelder-Mead at 5-10 steps (4-9
#: free times), better at 15-20 where Nelder-Mead stalls within its budget (test error 0.005
#: vs 0.008 for ``unipc``, 15 steps, 2-D; ``logsnr``: 0.044); lower test error than
#: Nelder-Mead in 14 of 24, median 0.57 vs 0.60 of ``logsnr``'s, for a third more time
#: (median 1.7 s vs 1.3 s per search).
DEFAULT_METHOD = "gradient"
#: Adam steps (gradient) / objective evaluations (derivative-free) when not given.
DEFAULT_ITERATIONS = {"gradient": 100, "derivative-free": 300}
DEFAULT_START = "logsnr"
#: Start states drawn when ``noises`` / ``held_out`` are counts.
DEFAULT_TRAIN, DEFAULT_HELD_OUT = 256, 256
#: Seed of drawn start states; compare evaluates on seed 0 by default.
DEFAULT_SEED = 1
#: Adam's step size on ``theta`` (cosine-decayed to a tenth over the run).
LEARNING_RATE = 0.1
#: ``|theta| <= THETA_BOUND``: adjacent ``lambda`` increments stay within a factor ``e^(2 B)``
#: of the last one, far from increments that round to equal times.
THETA_BOUND = 12.0
#: The file format of a saved grid (``SearchedGrid.save``).
FORMAT, VERSION = "solverlab-searched-grid", 1


# -- metadata helpers ----------------------------------------------------------------------
def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else repr(v)
    if isinstance(v, Tensor):
        return v.detach().cpu().tolist() if v.numel() <= 64 else (
            "sha256:" + hashlib.sha256(v.detach().cpu().contiguous().to(F64).numpy()
                                       .tobytes()).hexdigest()[:24])
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return getattr(v, "name", None) or repr(v)


def solver_settings(solver: Any) -> dict[str, Any]:
    """A solver's options as JSON-able values (its attrs fields), what a saved grid records and
    ``compare`` matches: a searched grid applies to the same solver with the same options."""
    if not attrs.has(type(solver)):
        return {}
    return {a.name: _jsonable(getattr(solver, a.name)) for a in attrs.fields(type(solver))
            if a.init}


def noise_digests(x: Tensor) -> tuple[str, ...]:
    """One short digest per row of ``x`` (dim 0), taken on the row rounded to float32, so a
    float64 batch and its float32 copy give the same digests."""
    flat = x.detach().to("cpu", torch.float32).reshape(x.shape[0], -1).contiguous()
    return tuple(hashlib.sha256(r.numpy().tobytes()).hexdigest()[:16] for r in flat)


# -- the result ----------------------------------------------------------------------------
def _times(v: Sequence[float] | Tensor) -> tuple[float, ...]:
    return tuple(float(t) for t in (v.tolist() if isinstance(v, Tensor) else v))


@attrs.frozen(kw_only=True)
class SearchedGrid:
    """A searched grid and how it was found.

    - ``times``: the ``steps + 1`` times, strictly decreasing, ``t_start`` to ``t_end``;
      ``grid()`` is the ``custom`` grid of them (``get_grid("custom", times=times)``);
    - ``solver`` / ``solver_options``: the solver it was searched for (a grid fitted to one
      solver's error pattern is no better than any other grid for another solver);
    - ``model``, ``model_options``, ``fingerprint`` (:func:`solverlab.ems.model_fingerprint`),
      ``schedule``, ``schedule_parameters``: the model;
    - ``start``, ``start_times``: the grid the search started from; ``method``, ``iterations``
      (Adam steps or Nelder-Mead evaluations), ``evaluations`` (training solves);
    - ``train_error_start``, ``train_error``, ``held_out_error_start``, ``held_out_error``:
      compare's error (``error_definition``) of the start grid and of ``times`` on the training
      and the held-out start states; ``improved`` is ``held_out_error < held_out_error_start``
      (otherwise ``times`` is the start grid);
    - ``seed``: the seed the start states were drawn with (``None`` when they were given);
      ``evaluation_seed``: compare's seed the search checked them against; ``train_samples``,
      ``held_out_samples``; ``noise_digests``: :func:`noise_digests` of both batches, which
      compare checks its own start states against;
    - ``trace``: ``(iteration, train error, held-out error)`` of each scored iterate;
      ``wall_time``: seconds of the search (references included).
    """

    times: tuple[float, ...] = attrs.field(converter=_times)
    solver: str
    solver_options: dict[str, Any] = attrs.field(factory=dict)
    model: str | None = None
    model_options: dict[str, Any] | None = None
    fingerprint: str | None = None
    schedule: str
    schedule_parameters: dict[str, Any] = attrs.field(factory=dict)
    steps: int
    t_start: float
    t_end: float
    start: str
    start_times: tuple[float, ...] = attrs.field(converter=_times)
    method: str
    iterations: int
    evaluations: int
    train_error_start: float
    train_error: float
    held_out_error_start: float
    held_out_error: float
    seed: int | None
    evaluation_seed: int
    train_samples: int
    held_out_samples: int
    noise_digests: tuple[str, ...] = attrs.field(converter=tuple, repr=False)
    trace: tuple[tuple[int, float, float], ...] = attrs.field(
        converter=lambda v: tuple(tuple(r) for r in v), repr=False, default=())
    wall_time: float = 0.0
    error_definition: str = ""

    def __attrs_post_init__(self) -> None:
        check_grid(self.times)
        if len(self.times) != self.steps + 1:
            raise InputError(f"searched grid: {len(self.times)} times for steps={self.steps}; "
                             f"a grid of {self.steps} steps holds {self.steps + 1} times")

    @property
    def improved(self) -> bool:
        """Whether the search beat its start grid on the held-out batch."""
        return self.held_out_error < self.held_out_error_start

    def grid(self) -> Grid:
        """The ``custom`` grid of :attr:`times`."""
        from .registry import get_grid

        return get_grid("custom", times=list(self.times))

    def as_dict(self) -> dict[str, Any]:
        """The JSON record :meth:`save` writes."""
        d = attrs.asdict(self, recurse=False)
        return {"format": FORMAT, "version": VERSION, **{k: _jsonable(v) for k, v in d.items()},
                "improved": self.improved}

    def save(self, path: str | Path) -> Path:
        """Write the grid and its metadata as JSON to ``path``, atomically."""
        return _io.write_json(path, self.as_dict())

    @classmethod
    def load(cls, path: str | Path) -> SearchedGrid:
        """Read a grid written by :meth:`save`; an unreadable or foreign file raises
        :class:`~solverlab.errors.InputError` naming the file and what is wrong."""
        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except OSError as e:
            raise InputError(f"searched grid {str(p)!r}: cannot read it ({e.strerror})") from None
        except ValueError as e:
            raise InputError(f"searched grid {str(p)!r} is not JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise InputError(f"searched grid {str(p)!r} is not a {FORMAT!r} file (written by "
                             "solverlab grid-search / SearchedGrid.save)")
        if d.get("version") != VERSION:
            raise InputError(f"searched grid {str(p)!r} has format version "
                             f"{d.get('version')!r}; this solverlab reads version {VERSION}")
        names = {a.name for a in attrs.fields(cls)}
        missing = sorted(n for n in names if n not in d and
                         attrs.fields_dict(cls)[n].default is attrs.NOTHING)
        if missing:
            raise InputError(f"searched grid {str(p)!r} lacks {', '.join(missing)}")
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except (SolverlabError, TypeError, ValueError) as e:
            raise InputError(f"searched grid {str(p)!r} is malformed: "
                             f"{' '.join(str(e).split())}") from None


# -- the search ----------------------------------------------------------------------------
#: References of training/held-out batches: (fingerprint, schedule, ends, batch digest) -> ref.
_REFERENCES: OrderedDict[tuple[Any, ...], Tensor] = OrderedDict()
_REFERENCE_CACHE_SIZE = 16


def _reference(model: Model, x: Tensor, t_start: float, t_end: float,
               fingerprint: str | None, schedule_key: str) -> Tensor:
    from .reference import reference_solution

    key = None
    if fingerprint is not None:
        digest = hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        key = (fingerprint, schedule_key, t_start, t_end, tuple(x.shape), digest)
        if key in _REFERENCES:
            _REFERENCES.move_to_end(key)
            return _REFERENCES[key]
    with torch.no_grad():
        ref = reference_solution(model, x, t_start, t_end).to(F64).reshape(x.shape)
    if key is not None:
        _REFERENCES[key] = ref
        while len(_REFERENCES) > _REFERENCE_CACHE_SIZE:
            _REFERENCES.popitem(last=False)
    return ref


class _LambdaGrid:
    """``theta`` (``steps - 1``) <-> grid times: softmax increments of ``lambda``."""

    def __init__(self, schedule: Any, t_start: float, t_end: float) -> None:
        self.schedule = schedule
        self.ends = torch.tensor([t_start, t_end], dtype=F64)
        self.lam0 = float(schedule.lambda_(self.ends[0]))
        self.lam1 = float(schedule.lambda_(self.ends[1]))

    def times(self, theta: Tensor) -> Tensor:
        w = torch.softmax(torch.cat([theta, theta.new_zeros(1)]), 0)
        lam = self.lam0 + (self.lam1 - self.lam0) * torch.cumsum(w, 0)[:-1]
        return torch.cat([self.ends[:1], self.schedule.t_of_lambda(lam), self.ends[1:]])

    def theta(self, times: Tensor) -> Tensor:
        lam = self.schedule.lambda_(times[1:-1].to(F64))
        full = torch.cat([lam.new_tensor([self.lam0]), lam, lam.new_tensor([self.lam1])])
        d = (full[1:] - full[:-1]).clamp_min(1e-300)
        return (d[:-1].log() - d[-1].log()).clamp(-THETA_BOUND, THETA_BOUND)


class _Problem:
    """The training and held-out objective of one search, and the best held-out iterate."""

    def __init__(self, solver: Any, model: Model, param: _LambdaGrid, train: tuple[Tensor, Tensor],
                 held: tuple[Tensor, Tensor]) -> None:
        self.solver, self.model, self.param = solver, model, param
        (self.x, self.ref), (self.xh, self.refh) = train, held
        self.norm = self._norm(self.ref)
        self.normh = self._norm(self.refh)
        self.evaluations = 0
        self.trace: list[tuple[int, float, float]] = []
        self.best: tuple[float, float, Tensor] | None = None  # held-out, train, times

    @staticmethod
    def _norm(ref: Tensor) -> Tensor:
        n = ref.reshape(ref.shape[0], -1).pow(2).sum(1).mean().sqrt()
        return n if float(n) > 0 else torch.ones((), dtype=F64)

    def error(self, times: Tensor, held: bool = False, grad: bool = False) -> Tensor | None:
        """Compare's error at ``times`` (``None`` when the solve fails or is not finite)."""
        x, ref, norm = (self.xh, self.refh, self.normh) if held else (self.x, self.ref, self.norm)
        if not held:
            self.evaluations += 1
        try:
            out = self.solver.solve(self.model, x, times, grad=grad, progress=False).x
        except (GridError, SolverDivergedError):
            return None
        d = (out.to(F64) - ref).reshape(x.shape[0], -1)
        e = d.pow(2).sum(1).mean().sqrt() / norm
        return e if math.isfinite(float(e.detach())) else None

    def observe(self, iteration: int, times: Tensor, train: float) -> None:
        """Score an iterate on the held-out batch and keep it if it is the best so far."""
        with torch.no_grad():
            e = self.error(times.detach(), held=True)
        if e is None:
            return
        held = float(e)
        self.trace.append((iteration, train, held))
        if self.best is None or held < self.best[0]:
            self.best = (held, train, times.detach().clone())


def _adam(problem: _Problem, theta0: Tensor, iterations: int, lr: float) -> None:
    theta = theta0.clone().requires_grad_(True)
    good = theta0.clone()
    opt = torch.optim.Adam([theta], lr=lr)
    shrink = 1.0
    for k in range(iterations + 1):  # the last pass only scores the final iterate
        times = problem.param.times(theta)
        loss = problem.error(times, grad=k < iterations)
        if loss is None:  # a grid the solver cannot take: back off and step shorter
            with torch.no_grad():
                theta.copy_(good)
            shrink *= 0.5
            opt = torch.optim.Adam([theta], lr=lr * shrink)
            continue
        problem.observe(k, times, float(loss.detach()))
        if k == iterations:
            break
        good = theta.detach().clone()
        # the gradient with respect to theta only: a network's parameters keep no .grad
        (theta.grad,) = torch.autograd.grad(loss, theta)
        for g in opt.param_groups:  # cosine decay to a tenth
            g["lr"] = lr * shrink * (0.1 + 0.45 * (1 + math.cos(math.pi * k / iterations)))
        opt.step()
        with torch.no_grad():
            theta.clamp_(-THETA_BOUND, THETA_BOUND)


def _nelder_mead(f: Callable[[Tensor], float], x0: Tensor, budget: int,
                 step: float = 0.5) -> None:
    """Minimise ``f`` from ``x0`` by Nelder-Mead (reflection 1, expansion 2, contraction and
    shrink 1/2; Nelder & Mead 1965) within ``budget`` evaluations."""
    n = x0.numel()
    pts = [x0.clone()] + [x0 + step * torch.eye(n, dtype=F64)[i] for i in range(n)]
    vals = [f(p) for p in pts]
    used = n + 1
    while used < budget:
        order = sorted(range(n + 1), key=vals.__getitem__)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        size = max(float((p - pts[0]).abs().max()) for p in pts[1:])
        if size < 1e-6 or (math.isfinite(vals[-1]) and vals[-1] - vals[0] <= 1e-12 * vals[0]):
            break
        c = torch.stack(pts[:-1]).mean(0)
        xr = c + (c - pts[-1])
        fr = f(xr)
        used += 1
        if fr < vals[0]:
            xe = c + 2.0 * (c - pts[-1])
            fe = f(xe)
            used += 1
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = c + 0.5 * ((xr if fr < vals[-1] else pts[-1]) - c)
            fc = f(xc)
            used += 1
            if fc < min(fr, vals[-1]):
                pts[-1], vals[-1] = xc, fc
            else:  # shrink towards the best point
                for i in range(1, n + 1):
                    pts[i] = pts[0] + 0.5 * (pts[i] - pts[0])
                    vals[i] = f(pts[i])
                used += n


def _derivative_free(problem: _Problem, theta0: Tensor, budget: int) -> None:
    best = [math.inf]

    def f(theta: Tensor) -> float:
        theta = theta.clamp(-THETA_BOUND, THETA_BOUND)
        times = problem.param.times(theta)
        with torch.no_grad():
            e = problem.error(times)
        if e is None:
            return math.inf
        v = float(e)
        if v < best[0]:  # the accepted best so far: score it on the held-out batch
            best[0] = v
            problem.observe(problem.evaluations, times, v)
        return v

    _nelder_mead(f, theta0, budget)


def _count(option: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OptionError(f"search_grid: {option}={value!r} is not allowed; it must be an "
                          f"integer >= {minimum}")
    return value


def _batch(option: str, value: Any, shape: tuple[int, ...] | None) -> Tensor:
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.ndim < 1:
        what = (f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor)
                else type(value).__name__)
        raise OptionError(f"search_grid: {option} must be a count or a floating-point tensor of "
                          f"start states (batch, ...); got {what}")
    if value.shape[0] < 1:
        raise OptionError(f"search_grid: {option} holds no start states (shape "
                          f"{tuple(value.shape)}); give at least one")
    if shape is not None and tuple(value.shape[1:]) != shape:
        raise OptionError(
            f"search_grid: {option} has shape {tuple(value.shape)}; the model's start states "
            f"have shape (batch, {', '.join(map(str, shape))})")
    if not bool(torch.isfinite(value).all()):
        raise OptionError(f"search_grid: {option} holds NaN or infinite values")
    return value.detach().to(F64).clone()


def _guard(model: Model, batches: Mapping[str, Tensor], evaluation_seed: int,
           evaluation_samples: Sequence[int]) -> None:
    """Refuse start states that are (rows of) compare's evaluation batch."""
    from .evaluation import evaluation_noises

    if not callable(getattr(model, "sample_prior", None)):
        return  # compare cannot evaluate this model at all
    mine = {name: set(noise_digests(b)) for name, b in batches.items()}
    sizes = [b.shape[0] for b in batches.values()]
    for n in sorted({*evaluation_samples, *sizes, sum(sizes)}):
        theirs = set(noise_digests(evaluation_noises(model, n, evaluation_seed)))
        for name, d in mine.items():
            if d & theirs:
                raise OptionError(
                    f"search_grid: these noises ({name}: {len(d & theirs)} of {len(d)} rows) "
                    f"are compare's evaluation batch (seed {evaluation_seed}, {n} samples): a "
                    "grid searched on them would be tuned to the test set; draw training noises "
                    "with another seed")


def _start_grid(start: Any, schedule: Any, steps: int, t_start: float | None,
                t_end: float | None) -> tuple[str, Tensor]:
    if isinstance(start, str):
        if start == Custom.name:
            raise OptionError("search_grid: start='custom' holds no times; give the times "
                              "themselves as start")
        try:
            rule = get_registry().create("grid", start)
        except TypeError:
            raise OptionError(f"search_grid: start={start!r} needs options; give its times "
                              "instead (a sequence or tensor)") from None
        ends = {} if t_start is None and t_end is None else {"t_start": t_start, "t_end": t_end}
        return start, rule(schedule, steps, **ends)
    g = check_grid(start if isinstance(start, Tensor) else list(start), schedule).detach()
    if g.numel() != steps + 1:
        raise OptionError(f"search_grid: start holds {g.numel()} times, which is "
                          f"{g.numel() - 1} steps; steps={steps} needs {steps + 1}")
    for name, want, got in (("t_start", t_start, g[0]), ("t_end", t_end, g[-1])):
        if want is not None and float(got) != float(want):
            raise OptionError(f"search_grid: {name}={want!r} but the start grid has "
                              f"{float(got)!r} there; give one or the other")
    return "custom", g.to(F64)


def search_grid(
    solver: Any,
    model: Model | str,
    steps: int,
    *,
    noises: Tensor | int = DEFAULT_TRAIN,
    held_out: Tensor | int | None = DEFAULT_HELD_OUT,
    seed: int = DEFAULT_SEED,
    method: str = DEFAULT_METHOD,
    start: str | Sequence[float] | Tensor = DEFAULT_START,
    iterations: int | None = None,
    t_start: float | None = None,
    t_end: float | None = None,
    solver_options: Mapping[str, Any] | None = None,
    model_options: Mapping[str, Any] | None = None,
    evaluation_seed: int = 0,
    evaluation_samples: int | Sequence[int] | None = None,
    learning_rate: float = LEARNING_RATE,
) -> SearchedGrid:
    """The grid of ``steps`` steps on which ``solver`` has the least error on ``model``'s
    probability-flow ODE, found from the ``start`` grid (module docstring).

    - ``solver``: a registered name (with ``solver_options``) or a :class:`~solverlab.Solver`;
      ``model``: a :class:`~solverlab.Model` or a registered name / checkpoint (with
      ``model_options``; compare's :func:`~solverlab.evaluation.build_model`);
    - ``noises``: the training start states at ``t_start`` (a tensor ``(n, ...)``) or how many
      to draw from ``model.sample_prior`` with ``seed``; ``held_out``: the validation states
      (a tensor, or a count drawn after the training ones), or ``None`` to hold out the last
      half of the given ``noises``;
    - ``method``: ``"gradient"`` (Adam, ``iterations`` steps, default 100, step size
      ``learning_rate`` on ``theta``) or ``"derivative-free"`` (Nelder-Mead, ``iterations``
      training solves, default 300). Default :data:`DEFAULT_METHOD`, chosen by measurement;
    - ``start``: a grid name (default ``logsnr``) or its times; ``t_start``/``t_end``: the
      fixed ends (default: the start grid's, i.e. the schedule's ``t_max``/``t_min``);
    - ``evaluation_seed``, ``evaluation_samples``: the compare configuration(s) whose start
      states (:func:`~solverlab.evaluation.evaluation_noises`) the training and held-out states may
      not contain (default: compare's seed 0 at its default sample count, and at the sizes of
      the given batches); a drawn batch may not use ``seed == evaluation_seed``.

    Returns a :class:`SearchedGrid` whose held-out error is at most the start grid's. Bad
    options raise :class:`~solverlab.errors.OptionError` before any solve.
    """
    from .ems import model_fingerprint, schedule_parameters
    from .evaluation import DEFAULT_SAMPLES, ERROR_DEFINITION, build_model
    from .solver import AdaptiveSolver, Solver

    started = time.perf_counter()
    # 1. options
    steps = _count("steps", steps)
    if method not in METHODS:
        raise OptionError(f"search_grid: method={method!r} is not allowed; choose one of "
                          + ", ".join(repr(m) for m in METHODS))
    iterations = DEFAULT_ITERATIONS[method] if iterations is None else _count(
        "iterations", iterations)
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not (
            math.isfinite(learning_rate) and learning_rate > 0):
        raise OptionError(f"search_grid: learning_rate={learning_rate!r} is not allowed; it "
                          "must be a number > 0, e.g. 0.1")
    for name, value in (("seed", seed), ("evaluation_seed", evaluation_seed)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
            raise OptionError(f"search_grid: {name}={value!r} is not allowed; it must be an "
                              "integer in 0..2**64-1")
    if evaluation_samples is None:
        evaluation_samples = (DEFAULT_SAMPLES,)
    elif isinstance(evaluation_samples, int):
        evaluation_samples = (evaluation_samples,)
    evaluation_samples = tuple(_count("evaluation_samples", n) for n in evaluation_samples)
    if isinstance(solver, str):
        solver_name = solver
        solver = get_registry().create("solver", solver, **dict(solver_options or {}))
    elif isinstance(solver, Solver):
        if solver_options:
            raise OptionError("search_grid: solver_options apply to a solver name, not to a "
                              "Solver instance; build it with them")
        solver_name = solver.name
    else:
        raise OptionError(f"search_grid: solver={solver!r} must be a registered solver name "
                          "or a Solver")
    if isinstance(solver, AdaptiveSolver):
        raise OptionError(f"search_grid: solver {solver_name!r} is adaptive: it chooses its "
                          "own steps, so it has no grid to search")
    if isinstance(model, str):
        model_name, options = model, dict(model_options or {})
        model = build_model(model, options)
    elif isinstance(model, Model):
        if model_options:
            raise OptionError("search_grid: model_options apply to a model name, not to a "
                              "Model instance; build it with them")
        model_name, options = getattr(model, "name", type(model).__name__), None
    else:
        raise OptionError(f"search_grid: model={model!r} must be a Model or a registered "
                          "model name")
    schedule = model.schedule
    start_name, start_times = _start_grid(start, schedule, steps, t_start, t_end)
    t0, t1 = float(start_times[0]), float(start_times[-1])

    # 2. start states: given or drawn, checked against compare's evaluation batch
    prior = getattr(model, "sample_prior", None)
    shape = None
    if callable(prior):
        shape = tuple(prior(1, t=t0, generator=torch.Generator().manual_seed(0)).shape[1:])
    drawn = not isinstance(noises, Tensor) or isinstance(held_out, int)
    if drawn and not callable(prior):
        raise OptionError(f"search_grid: model {model_name!r} has no sample_prior to draw "
                          "start states from; give noises and held_out as tensors")
    if drawn and seed == evaluation_seed:
        raise OptionError(
            f"search_grid: seed={seed} is compare's evaluation seed: a grid searched on "
            "compare's evaluation batch would be tuned to the test set; draw training noises "
            "with another seed (or set evaluation_seed to the seed you evaluate with)")
    gen = torch.Generator().manual_seed(seed)
    if isinstance(noises, Tensor):
        x = _batch("noises", noises, shape)
    else:
        x = prior(_count("noises", noises), t=t0, generator=gen, dtype=F64)
    if held_out is None:
        if x.shape[0] < 2:
            raise OptionError("search_grid: held_out=None splits the noises in two halves, "
                              f"which needs at least 2 rows; got {x.shape[0]}")
        n_held = x.shape[0] // 2
        x, xh = x[: x.shape[0] - n_held], x[x.shape[0] - n_held:]
    elif isinstance(held_out, Tensor):
        xh = _batch("held_out", held_out, tuple(x.shape[1:]))
    else:
        xh = prior(_count("held_out", held_out), t=t0, generator=gen, dtype=F64)
    _guard(model, {"training": x, "held-out": xh}, evaluation_seed, evaluation_samples)

    # 3. references (cached) and the search
    fingerprint = model_fingerprint(model)
    params = schedule_parameters(schedule)
    skey = json.dumps([schedule.name, params], sort_keys=True, default=str)
    ref = _reference(model, x, t0, t1, fingerprint, skey)
    refh = _reference(model, xh, t0, t1, fingerprint, skey)
    param = _LambdaGrid(schedule, t0, t1)
    problem = _Problem(solver, model, param, (x, ref), (xh, refh))
    with torch.no_grad():
        start_train, start_held = problem.error(start_times), problem.error(start_times, True)
    if start_train is None or start_held is None:
        raise OptionError(f"search_grid: solver {solver_name!r} fails on the start grid "
                          f"{start_name!r} of {steps} steps; start from another grid")
    problem.evaluations = 0
    if steps > 1:
        theta0 = param.theta(start_times)
        if method == "gradient":
            _adam(problem, theta0, iterations, float(learning_rate))
        else:
            _derivative_free(problem, theta0, iterations)
    start_train_f, start_held_f = float(start_train), float(start_held)
    best = problem.best
    # an iterate replaces the start grid only if it is better on the held-out batch by more
    # than round-off (the first iterate is the start grid itself, through theta)
    if best is not None and best[0] < start_held_f * (1 - 1e-12):
        times, train_err, held_err = best[2], best[1], best[0]
    else:
        times, train_err, held_err = start_times, start_train_f, start_held_f
    return SearchedGrid(
        times=times, solver=solver_name, solver_options=solver_settings(solver),
        model=model_name, model_options=None if options is None else _jsonable(options),
        fingerprint=fingerprint, schedule=schedule.name, schedule_parameters=params,
        steps=steps, t_start=t0, t_end=t1, start=start_name, start_times=start_times,
        method=method, iterations=iterations, evaluations=problem.evaluations,
        train_error_start=start_train_f, train_error=train_err,
        held_out_error_start=start_held_f, held_out_error=held_err,
        seed=seed if drawn else None, evaluation_seed=evaluation_seed,
        train_samples=x.shape[0], held_out_samples=xh.shape[0],
        noise_digests=noise_digests(x) + noise_digests(xh), trace=problem.trace,
        wall_time=time.perf_counter() - started, error_definition=ERROR_DEFINITION)

