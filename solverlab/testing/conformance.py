"""``check_solver``: the checks every registered solver passes, a third party's included.

Each ``check_*`` function takes a solver instance, raises :class:`AssertionError` with a
readable message when the solver fails, and is public so that a plugin author can run one
alone. :func:`check_solver` runs them all and returns a :class:`ConformanceReport`.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from ..analytic import AnalyticModel, GaussianMixtureData
from ..errors import OptionError
from ..model import Model, TorchModel
from ..registry import get_grid, get_solver
from ..solver import AdaptiveSolver, Solver
from .order import ConvergenceStudy, check_study, measure_convergence_order
from .problem import NON_SMOOTH_SCHEDULES, Problem, make_problem

__all__ = [
    "ConformanceReport", "CountingModel", "TimeMLP", "check_determinism", "check_dtypes",
    "check_network", "check_nfe", "check_order", "check_shapes", "check_short_grids",
    "check_solver", "conformance_problems", "prepare_solver",
]

F64 = torch.float64
#: float32 and float64 solves of the dtype check must agree to this, relative to the scale of
#: the answer: loose enough for float32 round-off over a few steps, tight enough to catch a
#: solver that computes in the wrong precision or drops a term in one dtype.
_DTYPE_RTOL = 1e-3


class CountingModel(Model):
    """Wraps a :class:`~solverlab.Model` and counts its calls itself, independently of the
    :class:`~solverlab.Denoiser` (which is what is being checked)."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.schedule = model.schedule
        self.parameterization = model.parameterization
        self.calls = 0

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        self.calls += 1
        return self.model(x, t, **cond)

    def __repr__(self) -> str:
        return f"CountingModel({self.model!r}, calls={self.calls})"


@functools.lru_cache(maxsize=1)
def _order_problems() -> tuple[Problem, ...]:
    return tuple(make_problem(s, dim=3, components=2, seed=0)
                 for s in ("vp-linear", "edm", "vp-discrete"))


def conformance_problems(solver: Solver | None = None) -> tuple[Problem, ...]:
    """The fixed order problems of :func:`check_order`: a 2-component Gaussian mixture in
    dimension 3 under ``vp-linear``, ``edm`` and ``vp-discrete`` (a smooth VP, a VE and the
    discrete DDPM schedule, whose ``log alpha`` is piecewise linear in ``t``), noise
    prediction, 4 well-conditioned samples each, from ``t_max`` to ``t_min``.

    The rule for ``vp-discrete``: it is checked for every solver unless
    ``solver.needs_smooth_schedule`` (:attr:`solverlab.Solver.needs_smooth_schedule`: the
    solver steps in ``t``, where that schedule has kinks), so a solver claims its order there
    by default and the claim is measured."""
    problems = _order_problems()
    if solver is not None and solver.needs_smooth_schedule:
        problems = tuple(p for p in problems if p.model.schedule.name not in NON_SMOOTH_SCHEDULES)
    return problems


@functools.lru_cache(maxsize=1)
def _shape_model() -> AnalyticModel:
    # Dimension 6, so that states can be shaped (batch, 2, 3).
    return AnalyticModel(data=GaussianMixtureData.random(6, 2, seed=1), schedule="vp-linear")


def _start(n: int = 3, dtype: torch.dtype = F64) -> Tensor:
    x = _shape_model().sample_prior(n, generator=torch.Generator().manual_seed(0))
    return x.reshape(n, 2, 3).to(dtype)


def _grid(model: Model, steps: int, rule: str = "logsnr") -> Tensor:
    return get_grid(rule)(model.schedule, steps)


def _solver(solver: Solver | str, options: dict[str, Any]) -> Solver:
    if isinstance(solver, Solver):
        if options:
            raise OptionError(
                f"check_solver: options {sorted(options)} were given with a solver instance; "
                "pass the name with options, or an instance built with them"
            )
        return solver
    if isinstance(solver, str):
        return get_solver(solver, **options)
    raise OptionError(f"check_solver: {solver!r} is neither a solver name nor a Solver instance")


#: Draws from the data distribution a preparing solver gets (:func:`prepare_solver`).
PREPARE_SAMPLES = 256


@functools.lru_cache(maxsize=16)
def _prepare_cached(solver: Solver, model: Model, shape: tuple[int, ...], data_model: Any
                    ) -> Solver:
    gen = torch.Generator().manual_seed(0)
    source = model if data_model is None else data_model
    data = source.data.sample(PREPARE_SAMPLES, generator=gen).reshape(-1, *shape)
    dtype = next((p.dtype for p in getattr(getattr(model, "module", None), "parameters",
                                            lambda: [])()), F64)
    return solver.prepare(model, data.to(dtype))


def prepare_solver(solver: Solver, model: Model, shape: tuple[int, ...] | None = None,
                   data_model: AnalyticModel | None = None) -> Solver:
    """``solver.prepare(model, data)`` for a solver that has a ``prepare`` method (one that
    needs per-problem data first, e.g. ``dpmv3``'s statistics), else ``solver`` itself.

    ``data``: :data:`PREPARE_SAMPLES` draws from the data distribution of ``data_model``
    (default ``model``, an analytic model; a network is given the analytic model its inputs
    come from), shaped ``(n, *shape)`` (default: the model's dimension), in the network's
    dtype. Every check of this kit solves with the prepared solver; the result is cached per
    solver, model and shape."""
    if getattr(solver, "prepare", None) is None:
        return solver
    source = model if data_model is None else data_model
    shape = (source.dim,) if shape is None else tuple(shape)
    return _prepare_cached(solver, model, shape, data_model)


def _fail(solver: Solver, what: str) -> AssertionError:
    return AssertionError(f"solver {solver.name!r}: {what}")


def check_order(solver: Solver, problems: tuple[Problem, ...] | None = None
                ) -> tuple[ConvergenceStudy, ...]:
    """The fitted convergence order on each of ``problems`` (default
    :func:`conformance_problems` for ``solver``) is within 0.3 of
    ``solver.convergence_order``; returns the studies."""
    studies, failures = [], []
    for problem in conformance_problems(solver) if problems is None else problems:
        study = measure_convergence_order(prepare_solver(solver, problem.model), problem,
                                          expected=solver.convergence_order)
        studies.append(study)
        try:
            check_study(study, solver.convergence_order)
        except AssertionError as e:
            failures.append(str(e))
    if failures:
        raise AssertionError("\n".join(failures))
    return tuple(studies)


def check_shapes(solver: Solver) -> None:
    """``x`` of shape ``(3, 2, 3)`` comes back as ``(3, 2, 3)``, finite; the input is not
    modified; ``Solution.times`` is the grid and a recorded trajectory is
    ``(steps + 1, 3, 2, 3)`` from ``x`` to the result (fixed-grid solvers)."""
    model, x = _shape_model(), _start()
    before = x.clone()
    grid = _grid(model, 4)
    adaptive = isinstance(solver, AdaptiveSolver)
    # An adaptive solver overrides solve() and need not record trajectories.
    extra = {} if adaptive else {"trajectory": True}
    sol = prepare_solver(solver, model, x.shape[1:]).solve(model, x, grid, progress=False,
                                                           **extra)
    if sol.x.shape != x.shape:
        raise _fail(solver, f"x of shape {tuple(x.shape)} came back as {tuple(sol.x.shape)}")
    if not bool(torch.isfinite(sol.x).all()):
        raise _fail(solver, "a 4-step solve gave non-finite values")
    if not torch.equal(x, before):
        raise _fail(solver, "solve() modified its input x in place")
    if adaptive:
        return
    if not torch.equal(sol.times, grid):
        raise _fail(solver, f"Solution.times {sol.times.tolist()} is not the grid {grid.tolist()}")
    traj = sol.trajectory
    if traj is None or traj.shape != (5, *x.shape):
        raise _fail(solver, f"trajectory=True gave {None if traj is None else tuple(traj.shape)}"
                            f"; expected {(5, *x.shape)}")
    if not (torch.equal(traj[0], x) and torch.equal(traj[-1], sol.x)):
        raise _fail(solver, "the trajectory does not run from x to Solution.x")


def check_dtypes(solver: Solver) -> None:
    """float32 in gives float32 out, float64 in gives float64 out, and the two agree to
    ``1e-3`` relative to the size of the answer."""
    model = _shape_model()
    out = {}
    for dtype in (torch.float32, F64):
        x = _start(dtype=dtype)
        y = prepare_solver(solver, model, x.shape[1:]).solve(model, x, _grid(model, 4),
                                                             progress=False).x
        if y.dtype != dtype:
            raise _fail(solver, f"{dtype} in gave {y.dtype} out; the state keeps its dtype")
        out[dtype] = y
    scale = max(1.0, float(out[F64].abs().max()))
    gap = float((out[torch.float32].to(F64) - out[F64]).abs().max())
    if not gap <= _DTYPE_RTOL * scale:
        raise _fail(solver, f"float32 and float64 solves differ by {gap:.3g} (allowed "
                            f"{_DTYPE_RTOL * scale:.3g}); is a coefficient computed in the wrong "
                            "precision?")


def check_determinism(solver: Solver) -> None:
    """Two solves of the same input give bitwise identical output."""
    model, x = _shape_model(), _start()
    grid = _grid(model, 5)
    prepared = prepare_solver(solver, model, x.shape[1:])
    a = prepared.solve(model, x, grid, progress=False).x
    b = prepared.solve(model, x, grid, progress=False).x
    if not torch.equal(a, b):
        raise _fail(solver, f"two solves of the same input differ (max "
                            f"{float((a - b).abs().max()):.3g}); a solver must be deterministic")


def check_nfe(solver: Solver, steps: tuple[int, ...] = (1, 2, 3, 8)) -> None:
    """``Solution.nfe`` equals the model calls counted by a :class:`CountingModel`, and equals
    ``solver.expected_nfe(steps)`` where that is not ``None``. An adaptive solver is checked
    once, on the full range."""
    model = _shape_model()
    for n in (1,) if isinstance(solver, AdaptiveSolver) else steps:
        counter = CountingModel(model)
        prepared = prepare_solver(solver, model, _start().shape[1:])
        sol = prepared.solve(counter, _start(), _grid(model, n), progress=False)
        if sol.nfe != counter.calls:
            raise _fail(solver, f"Solution.nfe = {sol.nfe} but the model was called "
                                f"{counter.calls} times ({n} steps)")
        expected = solver.expected_nfe(n)
        if expected is not None and expected != counter.calls:
            raise _fail(solver, f"expected_nfe({n}) = {expected} but the solve called the model "
                                f"{counter.calls} times")


def check_short_grids(solver: Solver) -> None:
    """Grids of 1, 2 and 3 steps (``logsnr``, ``time-uniform``, ``karras``) give finite states
    of the right shape (multistep solvers must start up and finish within them)."""
    model = _shape_model()
    for rule in ("logsnr", "time-uniform", "karras"):
        for n in (1, 2, 3):
            sol = prepare_solver(solver, model, _start().shape[1:]).solve(
                model, _start(), _grid(model, n, rule), progress=False)
            if sol.x.shape != (3, 2, 3) or not bool(torch.isfinite(sol.x).all()):
                raise _fail(solver, f"a {n}-step {rule!r} grid gave shape {tuple(sol.x.shape)}, "
                                    f"finite: {bool(torch.isfinite(sol.x).all())}")


class TimeMLP(nn.Module):
    """A small noise-prediction network ``eps(x, t)`` with trainable parameters: the kit's
    stand-in for a real network. ``x`` of any shape ``(batch, ...)`` with ``dim`` values per
    sample; ``t`` enters as an input feature. Initialised from ``seed`` without touching the
    global random state."""

    def __init__(self, dim: int, hidden: int = 32, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.Tanh(),
                                     nn.Linear(hidden, hidden), nn.Tanh(),
                                     nn.Linear(hidden, dim))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        out = self.net(torch.cat([flat, t[:, None].to(flat.dtype)], dim=1))
        return out.reshape(x.shape)


def check_network(solver: Solver) -> None:
    """The solver works with a real network (:class:`TimeMLP`, parameters requiring grad):

    - by default the solve records no graph (the result does not require grad, the parameters
      get no gradient), in float32 and float64, and counts the NFE exactly;
    - with ``grad=True`` it is differentiable: the gradient with respect to ``x`` matches a
      central finite difference along a random direction (float64, relative ``1e-6``;
      ``1e-2`` for an adaptive solver, whose steps move with ``x``), and
      the parameters get finite, non-zero gradients.
    """
    grid = _grid(_shape_model(), 4)
    for dtype in (torch.float32, F64):
        model = TorchModel(TimeMLP(6).to(dtype), "vp-linear", "noise")
        counter = CountingModel(model)
        prepared = prepare_solver(solver, model, (2, 3), data_model=_shape_model())
        sol = prepared.solve(counter, _start(dtype=dtype), grid, progress=False)
        if sol.x.requires_grad or sol.x.grad_fn is not None:
            raise _fail(solver, "a default solve with a network recorded an autograd graph; "
                                "sampling runs without one unless grad=True")
        if sol.x.dtype != dtype or not bool(torch.isfinite(sol.x).all()):
            raise _fail(solver, f"a {dtype} network gave {sol.x.dtype}, finite: "
                                f"{bool(torch.isfinite(sol.x).all())}")
        if sol.nfe != counter.calls:
            raise _fail(solver, f"with a network Solution.nfe = {sol.nfe} but the model was "
                                f"called {counter.calls} times")
        if any(p.grad is not None for p in model.module.parameters()):
            raise _fail(solver, "a default solve left gradients on the network's parameters")
    x = _start()
    gen = torch.Generator().manual_seed(1)
    v, w = torch.randn(x.shape, generator=gen, dtype=F64), torch.randn(x.shape, generator=gen,
                                                                        dtype=F64)

    prepared = prepare_solver(solver, model, (2, 3), data_model=_shape_model())

    def loss(x0: Tensor) -> Tensor:
        return (prepared.solve(model, x0, grid, progress=False, grad=True).x * w).sum()

    x_req = x.clone().requires_grad_(True)
    loss(x_req).backward()
    grads = [p.grad for p in model.module.parameters()]
    if x_req.grad is None or any(g is None for g in grads):
        raise _fail(solver, "solve(grad=True) gave no gradient for x or the network's "
                            "parameters")
    if not all(bool(torch.isfinite(g).all()) for g in (x_req.grad, *grads)) or not any(
            bool(g.abs().sum() > 0) for g in grads):
        raise _fail(solver, "solve(grad=True) gave non-finite or all-zero parameter gradients")
    eps = 1e-6
    with torch.no_grad():
        fd = (loss(x + eps * v) - loss(x - eps * v)) / (2 * eps)
    ad = (x_req.grad * v).sum()
    # An adaptive solver's steps move with x: finite differences see that, autograd through
    # its step-size control only partly (measured relative gaps up to 4e-4 for torchdiffeq).
    rtol = 1e-2 if isinstance(solver, AdaptiveSolver) else 1e-6
    if not abs(float(ad - fd)) <= rtol * max(1.0, abs(float(fd))):
        raise _fail(solver, f"solve(grad=True): the directional derivative along a random v is "
                            f"{float(ad):.10g} by autograd but {float(fd):.10g} by finite "
                            "differences")


@attrs.frozen(kw_only=True)
class ConformanceReport:
    """What :func:`check_solver` found: the checks ``passed``, the ones ``skipped`` (with the
    reason), the convergence ``studies``, their ``fitted_orders`` and the fitted ``order``
    (the lowest of them) next to the ``declared_order``."""

    solver: str
    declared_order: int
    passed: tuple[str, ...]
    skipped: tuple[str, ...] = ()
    studies: tuple[ConvergenceStudy, ...] = ()
    wall_time: float = 0.0

    @property
    def fitted_orders(self) -> tuple[float | None, ...]:
        return tuple(s.order for s in self.studies)

    @property
    def order(self) -> float | None:
        """The fitted order: the lowest over the order problems (``None`` if order was
        skipped)."""
        orders = [o for o in self.fitted_orders if o is not None]
        return min(orders) if orders else None

    def __str__(self) -> str:
        fitted = ", ".join(f"{s.order:.3f}" if s.order is not None else "none"
                           for s in self.studies) or "-"
        lines = [f"solver {self.solver!r}: declared order {self.declared_order}, fitted {fitted}; "
                 f"passed {', '.join(self.passed)} ({self.wall_time:.1f} s)"]
        lines += [f"  skipped {s}" for s in self.skipped]
        return "\n".join(lines)


_CHECKS = (("shapes", check_shapes), ("dtypes", check_dtypes),
           ("determinism", check_determinism), ("nfe", check_nfe),
           ("short-grids", check_short_grids), ("network", check_network))


def check_solver(solver: Solver | str, /, **options: Any) -> ConformanceReport:
    """Run every conformance check on ``solver`` (a registered name, built with ``options``, or
    an instance) and return a :class:`ConformanceReport`; raise one :class:`AssertionError`
    listing every failed check.

    Checks: ``order`` (:func:`check_order`), ``shapes``, ``dtypes``, ``determinism``, ``nfe``
    (exact accounting), ``short-grids``, ``network`` (a network with trainable parameters,
    with and without ``grad=True``: :func:`check_network`). A solver with a ``prepare(model,
    data) -> Solver`` method is prepared for each model first (:func:`prepare_solver`). For an
    :class:`~solverlab.AdaptiveSolver` the ``order`` and ``short-grids`` checks are skipped (it
    picks its own steps; its accuracy is checked against its tolerances elsewhere) and the
    report says so.
    """
    solver = _solver(solver, options)
    start = time.perf_counter()
    adaptive = isinstance(solver, AdaptiveSolver)
    passed, skipped, failures = [], [], []
    studies: tuple[ConvergenceStudy, ...] = ()
    checks = list(_CHECKS)
    if adaptive:
        checks = [c for c in checks if c[0] != "short-grids"]
        skipped += ["order: adaptive solver (AdaptiveSolver), no grid to refine",
                    "short-grids: adaptive solver (AdaptiveSolver) uses only the end points"]
    for name, check in checks:
        try:
            check(solver)
            passed.append(name)
        except AssertionError as e:
            failures.append(f"[{name}] {e}")
    if not adaptive:
        try:
            studies = check_order(solver)
            passed.append("order")
        except AssertionError as e:
            failures.append(f"[order] {e}")
    if failures:
        raise AssertionError(f"solver {solver.name!r} fails {len(failures)} conformance "
                             "check(s):\n" + "\n".join(failures))
    return ConformanceReport(
        solver=solver.name, declared_order=solver.convergence_order, passed=tuple(passed),
        skipped=tuple(skipped), studies=studies, wall_time=time.perf_counter() - start)


