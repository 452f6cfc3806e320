"""Empirical convergence order: solve on refined grids, regress log-error on log-steps.

The error of a solve is by default ``max_i ||x_i - reference_i||_2``: the largest per-sample
Euclidean norm over the batch, in float64 (one bad trajectory is not averaged away);
``error="relative-rms"`` measures ``solverlab compare``'s relative RMS error instead
(:data:`ERRORS`). The order is the
negated least-squares slope of ``log(error)`` against ``log(steps)`` (diffrax's
``test_ode_order``), fitted over the asymptotic range only: points below the round-off floor
are dropped, and the fit window is the last 3 points above it, extended backwards while the
local slopes agree with the fit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import torch

from ..errors import OptionError, SolverDivergedError
from ..grid import Grid
from ..registry import get_grid, get_solver
from ..solver import AdaptiveSolver, Solver
from .problem import Problem, make_problem

__all__ = [
    "DEFAULT_FLOOR", "DEFAULT_MAX_NFE", "ERRORS", "ConvergenceStudy", "assert_convergence_order",
    "check_study", "convergence_errors", "default_problem", "fit_order", "local_orders",
    "measure_convergence_order", "solution_error",
]

#: Errors below ``DEFAULT_FLOOR * max(1, problem.scale)`` are not the solver's: the reference
#: (``rtol = atol = 1e-12``, :data:`~solverlab.testing.problem.REFERENCE_TOL`) is accurate to
#: ~4e-14 relative, and a point within ~100x of that would bend the fitted slope. Float64
#: round-off of the solves themselves stays below ~1e-13 at the step counts used.
DEFAULT_FLOOR = 1e-11
#: Network evaluations one automatic convergence study may spend (all step counts together).
#: Passing solvers stop as soon as their slopes settle on the expected order; the budget is
#: what a pre-asymptotic one gets to turn. 16384 reaches 4096 steps of a 2-stage method: an
#: error that changes sign near 256 steps (torchdiffeq-midpoint in sigma on a 1-D EDM mixture)
#: shows slopes 3.5, 1.0, 1.7 up to 1024 steps and 1.8, 1.9 beyond.
DEFAULT_MAX_NFE = 16384


def _solver(solver: Solver | str) -> Solver:
    if isinstance(solver, Solver):
        return solver
    if isinstance(solver, str):
        return get_solver(solver)
    raise OptionError(f"solver={solver!r} must be a solver name or a solverlab.Solver instance")


def _grid(grid: Grid | str) -> Grid:
    return get_grid(grid) if isinstance(grid, str) else grid


def _not_adaptive(solver: Solver) -> None:
    if isinstance(solver, AdaptiveSolver):
        raise TypeError(
            f"solver {solver.name!r} is an AdaptiveSolver: it chooses its own steps, so it has no "
            "convergence order in the number of grid steps; test its error against its tolerance"
        )


def default_problem() -> Problem:
    """The problem used when none is given: a 2-component Gaussian mixture in dimension 3 under
    ``vp-linear`` (noise prediction), 4 well-conditioned samples, solved from ``t_max`` to
    ``t_min``."""
    return make_problem("vp-linear", dim=3, components=2, batch=4, seed=0)


def solution_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """``max_i ||x_i - reference_i||_2`` over the batch (dim 0), in float64."""
    diff = x.to(torch.float64) - reference.to(torch.float64)
    return float(diff.reshape(diff.shape[0], -1).norm(dim=1).max())


def _relative_rms(x: torch.Tensor, reference: torch.Tensor) -> float:
    from ..compare import relative_rms_error

    return relative_rms_error(x, reference)


#: The error measures a study can use: name -> (function of ``(x, reference)``, definition).
ERRORS: dict[str, tuple[Any, str]] = {
    "max-l2": (solution_error, "max over samples of the L2 error against the float64 "
                               "reference"),
    "relative-rms": (_relative_rms, "sqrt(mean_i ||x_i - ref_i||^2) / sqrt(mean_i "
                                    "||ref_i||^2): RMS over samples of the L2 error against "
                                    "the float64 reference, relative to the RMS L2 norm of the "
                                    "reference (as solverlab compare)"),
}


def _error_fn(error: str) -> Any:
    if error not in ERRORS:
        raise OptionError(f"error={error!r} is not allowed; choose one of "
                          + ", ".join(repr(e) for e in ERRORS))
    return ERRORS[error][0]


def _solve(solver: Solver, problem: Problem, steps: int, grid: Grid,
           error: str = "max-l2") -> tuple[float, int]:
    times = grid(problem.model.schedule, steps, problem.t_start, problem.t_end)
    try:
        sol = solver.solve(problem.model, problem.x, times, progress=False)
    except SolverDivergedError:
        return math.inf, solver.expected_nfe(steps) or steps
    return _error_fn(error)(sol.x, problem.reference()), sol.nfe


def convergence_errors(
    solver: Solver | str, problem: Problem, steps: Sequence[int], grid: Grid | str = "logsnr"
) -> list[float]:
    """The error (:func:`solution_error`, float64) of solving ``problem`` with ``solver`` on the
    ``grid`` rule with each of ``steps`` steps; ``inf`` where the solve diverged."""
    solver, rule = _solver(solver), _grid(grid)
    _not_adaptive(solver)
    return [_solve(solver, problem, int(n), rule)[0] for n in steps]


def _arrays(steps: Sequence[float], errors: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    s, e = np.asarray(steps, dtype=np.float64), np.asarray(errors, dtype=np.float64)
    if s.ndim != 1 or s.shape != e.shape or s.size < 2:
        raise OptionError(
            f"need at least 2 (steps, error) pairs of equal length; got {s.size} steps and "
            f"{e.size} errors"
        )
    if not (np.isfinite(s).all() and np.isfinite(e).all() and (s > 0).all() and (e > 0).all()):
        raise OptionError("steps and errors must be finite and > 0 to take their logarithms")
    return s, e


def fit_order(steps: Sequence[float], errors: Sequence[float]) -> float:
    """The empirical order: minus the least-squares slope of ``log(error)`` on ``log(steps)``
    (``error ~ C steps^-p`` gives ``p``)."""
    s, e = _arrays(steps, errors)
    return -float(np.polyfit(np.log(s), np.log(e), 1)[0])


def local_orders(steps: Sequence[float], errors: Sequence[float]) -> list[float]:
    """The slopes between neighbouring points, ``-log(e[i+1]/e[i]) / log(s[i+1]/s[i])``."""
    s, e = _arrays(steps, errors)
    return [float(v) for v in -np.diff(np.log(e)) / np.diff(np.log(s))]


@attrs.frozen(kw_only=True)
class ConvergenceStudy:
    """Errors of one solver on one problem over a sequence of step counts, and the fit.

    ``window`` is the index range ``[lo, hi)`` of the points the order was fitted on (empty if
    too few points were usable); ``order`` is ``None`` then. ``floor`` is the round-off floor
    used, in the units of ``error`` (a key of :data:`ERRORS`).
    """

    solver: str
    problem: str
    grid: str
    steps: tuple[int, ...]
    nfe: tuple[int, ...]
    errors: tuple[float, ...]
    floor: float
    window: tuple[int, int]
    order: float | None
    error: str = "max-l2"

    def window_slopes(self) -> list[float]:
        """The local slopes (:func:`local_orders`) between neighbouring points of the fit
        window; in the asymptotic range they agree with each other and with the order."""
        lo, hi = self.window
        if hi - lo < 2:
            return []
        return local_orders(self.steps[lo:hi], self.errors[lo:hi])

    def asymptotic(self, settle: float = 0.2) -> bool:
        """Whether the fit window looks asymptotic: an order was fitted and the local slopes
        inside the window differ by at most ``settle``. Automatic studies stop when the last
        slopes agree within 0.1, so a fit that fails this was made on pre-asymptotic points
        (too few or too coarse steps) and its order is not the method's."""
        slopes = self.window_slopes()
        return self.order is not None and bool(slopes) and max(slopes) - min(slopes) <= settle

    def table(self) -> str:
        """A readable table: steps, NFE, error, local slope, and what each point was used for."""
        rows = [f"  {'steps':>6} {'nfe':>7} {'error':>11} {'slope':>7}  note"]
        lo, hi = self.window
        for i, (n, nfe, e) in enumerate(zip(self.steps, self.nfe, self.errors)):
            slope = ""
            if i > 0 and all(math.isfinite(v) and v > 0 for v in (e, self.errors[i - 1])):
                slope = f"{local_orders(self.steps[i - 1:i + 1], self.errors[i - 1:i + 1])[0]:7.3f}"
            note = ("diverged" if not math.isfinite(e) else "below floor" if e < self.floor
                    else "fit" if lo <= i < hi else "")
            rows.append(f"  {n:>6} {nfe:>7} {e:>11.4e} {slope:>7}  {note}")
        fitted = "none" if self.order is None else f"{self.order:.3f}"
        return (f"solver {self.solver!r} on {self.problem} (grid {self.grid!r}, floor "
                f"{self.floor:.2e}): fitted order {fitted}\n" + "\n".join(rows)
                + "\n  (slope: local order between a row and the one above it)")


def _usable(errors: Sequence[float], floor: float) -> tuple[int, int]:
    """The last run of finite errors above ``floor`` that ends before the first one below it."""
    hi = next((i for i, e in enumerate(errors) if math.isfinite(e) and e < floor), len(errors))
    lo = hi
    while lo > 0 and math.isfinite(errors[lo - 1]):
        lo -= 1
    return lo, hi


def _window(steps: Sequence[int], errors: Sequence[float], floor: float, min_points: int,
            settle: float) -> tuple[tuple[int, int], float | None]:
    lo, hi = _usable(errors, floor)
    if hi - lo < min_points:
        return (hi, hi), None
    start = hi - min_points
    order = fit_order(steps[start:hi], errors[start:hi])
    while start > lo:
        prev = local_orders(steps[start - 1:start + 1], errors[start - 1:start + 1])[0]
        # Half the stopping tolerance: a pre-asymptotic point biases the fit more than a
        # missing asymptotic one.
        if abs(prev - order) > settle / 2:
            break
        start -= 1
        order = fit_order(steps[start:hi], errors[start:hi])
    return (start, hi), order


def _settled(errors: Sequence[float], steps: Sequence[int], floor: float, min_points: int,
             settle: float) -> bool:
    lo, hi = _usable(errors, floor)
    if hi != len(errors) or hi - lo < min_points + 1:
        return False
    slopes = local_orders(steps[hi - min_points - 1:hi], errors[hi - min_points - 1:hi])
    return max(slopes) - min(slopes) <= settle


def measure_convergence_order(
    solver: Solver | str,
    problem: Problem | None = None,
    *,
    steps: Sequence[int] | None = None,
    grid: Grid | str = "logsnr",
    floor: float = DEFAULT_FLOOR,
    max_nfe: int = DEFAULT_MAX_NFE,
    start: int = 2,
    min_points: int = 3,
    settle: float = 0.1,
    expected: float | None = None,
    tol: float = 0.3,
    error: str = "max-l2",
) -> ConvergenceStudy:
    """Measure the convergence order of ``solver`` on ``problem`` (default
    :func:`default_problem`) in float64.

    With ``steps=None`` the step counts are chosen automatically: ``start, 2 start, 4 start,
    ...`` until the error falls below the floor (``floor * max(1, problem.scale)``), the last
    ``min_points`` local slopes agree to within ``settle``, or the next solve would take the
    total past ``max_nfe``. The order is then fitted over the asymptotic tail: the last
    ``min_points`` points above the floor, extended to earlier points while their local slope
    stays within ``settle / 2`` of the fit.

    With ``expected``, settling on a slope outside ``expected +- tol`` does not stop the
    refinement: a pre-asymptotic plateau (slopes steady at 3.3 for a 3rd-order method, say)
    then gets the rest of the ``max_nfe`` budget to turn before the solver is judged. Passing
    solvers cost no more; failing ones are failed on the finest affordable grids.

    ``error``: the error measure (a key of :data:`ERRORS`); for ``"relative-rms"`` the floor
    is divided by the reference's RMS norm, so that it stays the same absolute round-off level.
    """
    solver = _solver(solver)
    _not_adaptive(solver)
    _error_fn(error)
    problem = default_problem() if problem is None else problem
    rule = _grid(grid)
    abs_floor = floor * max(1.0, problem.scale)
    if error == "relative-rms":
        ref = problem.reference().reshape(problem.x.shape[0], -1)
        abs_floor /= max(float(ref.pow(2).sum(dim=1).mean().sqrt()), 1e-300)
    ns: list[int] = []
    errors: list[float] = []
    nfes: list[int] = []
    if steps is not None:
        for n in steps:
            e, nfe = _solve(solver, problem, int(n), rule, error)
            ns.append(int(n))
            errors.append(e)
            nfes.append(nfe)
    else:
        n = int(start)
        while True:
            e, nfe = _solve(solver, problem, n, rule, error)
            ns.append(n)
            errors.append(e)
            nfes.append(nfe)
            if math.isfinite(e) and e < abs_floor:
                break
            if _settled(errors, ns, abs_floor, min_points, settle) and (
                expected is None
                or abs(_window(ns, errors, abs_floor, min_points, settle)[1] - expected) <= tol
            ):
                break
            if sum(nfes) + 2 * max(nfe, 1) > max_nfe:
                break
            n *= 2
    window, order = _window(ns, errors, abs_floor, min_points, settle)
    return ConvergenceStudy(
        solver=solver.name, problem=str(problem), grid=getattr(rule, "name", str(rule)),
        steps=tuple(ns), nfe=tuple(nfes), errors=tuple(errors), floor=abs_floor, window=window,
        order=order, error=error,
    )


def assert_convergence_order(
    solver: Solver | str,
    problem: Problem | None = None,
    *,
    expected: float | None = None,
    tol: float = 0.3,
    steps: Sequence[int] | None = None,
    **options: Any,
) -> float:
    """Assert that ``solver`` converges with order ``expected`` (default: its declared
    ``convergence_order``) within ``tol`` on ``problem``; return the fitted order.

    ``options`` go to :func:`measure_convergence_order` (``grid``, ``floor``, ``max_nfe``,
    ``start``, ``min_points``, ``settle``). On failure the :class:`AssertionError` holds the
    table of steps, errors and local slopes.
    """
    solver = _solver(solver)
    expected = solver.convergence_order if expected is None else expected
    study = measure_convergence_order(solver, problem, steps=steps, expected=expected, tol=tol,
                                      **options)
    check_study(study, expected, tol)
    return study.order


def check_study(study: ConvergenceStudy, expected: float, tol: float = 0.3) -> None:
    """Raise :class:`AssertionError` with the study's table unless its fitted order lies within
    ``expected +- tol``."""
    if study.order is None:
        raise AssertionError(
            f"could not fit an order for solver {study.solver!r}: too few usable points "
            "(finite, above the round-off floor). Give steps= that stay above the floor, or a "
            "larger max_nfe.\n" + study.table()
        )
    if abs(study.order - expected) > tol:
        raise AssertionError(
            f"solver {study.solver!r}: fitted order {study.order:.3f} is outside the expected "
            f"{expected} +- {tol}\n" + study.table()
        )
