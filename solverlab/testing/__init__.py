"""The conformance kit for solver authors (first-party and third-party alike).

- :func:`check_solver`: every check a registered solver must pass (convergence order,
  shapes, dtypes, determinism, exact NFE accounting, short grids, a real network with and
  without gradients);
- :func:`assert_convergence_order`, :func:`measure_convergence_order`, :func:`fit_order`:
  empirical order on analytic problems with exact or high-accuracy references;
- :mod:`solverlab.testing.strategies`: hypothesis strategies (:func:`schedules`,
  :func:`analytic_problems`, :func:`order_schedules`).
"""

from __future__ import annotations

from .conformance import (
    ConformanceReport,
    CountingModel,
    TimeMLP,
    check_determinism,
    check_dtypes,
    check_network,
    check_nfe,
    check_order,
    check_shapes,
    check_short_grids,
    check_solver,
    conformance_problems,
    prepare_solver,
)
from .order import (
    DEFAULT_FLOOR,
    DEFAULT_MAX_NFE,
    ConvergenceStudy,
    assert_convergence_order,
    check_study,
    convergence_errors,
    default_problem,
    fit_order,
    local_orders,
    measure_convergence_order,
    solution_error,
)
from .problem import NON_SMOOTH_SCHEDULES, REFERENCE_TOL, Problem, lambda_range, make_problem

__all__ = [
    "DEFAULT_FLOOR", "DEFAULT_MAX_NFE", "NON_SMOOTH_SCHEDULES", "REFERENCE_TOL",
    "ConformanceReport", "ConvergenceStudy", "CountingModel", "Problem", "TimeMLP",
    "analytic_problems", "assert_convergence_order", "check_determinism", "check_dtypes",
    "check_network", "check_nfe", "check_order", "check_shapes", "check_short_grids",
    "check_solver", "check_study", "conformance_problems",
    "convergence_errors", "default_problem", "fit_order", "lambda_range", "local_orders",
    "make_problem", "measure_convergence_order", "order_schedules", "prepare_solver", "schedules",
    "solution_error",
]


def __getattr__(name: str):
    # The strategies need hypothesis (a test dependency); import them only when asked for.
    if name in ("analytic_problems", "order_schedules", "schedules"):
        from . import strategies

        return getattr(strategies, name)
    raise AttributeError(f"module 'solverlab.testing' has no attribute {name!r}")
