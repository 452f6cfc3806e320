"""Hypothesis strategies for solver tests: schedules and analytic problems.

Everything is looked up through the registry when a strategy is built, so schedules and
parameterizations from third-party plugins are drawn too.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st

from ..errors import SolverlabError
from ..parameterization import Parameterization
from ..registry import get_registry, get_schedule
from ..schedule import Schedule
from ..solver import Solver
from .problem import NON_SMOOTH_SCHEDULES, Problem, lambda_range, make_problem

__all__ = ["NON_SMOOTH_SCHEDULES", "analytic_problems", "order_schedules", "schedules"]

_CANONICAL_PARAMETERIZATIONS = ("noise", "data", "velocity", "score")


def schedules(*, kinds: Sequence[str] = ("vp", "ve"),
              exclude: Sequence[str] = ()) -> st.SearchStrategy[Schedule]:
    """Every registered schedule of one of ``kinds``, less ``exclude`` (names), built with its
    defaults. A schedule that cannot be built from defaults alone is left out."""
    built = []
    for entry in get_registry().entries("schedule"):
        if getattr(entry.cls, "kind", None) not in kinds or entry.name in exclude:
            continue
        try:
            built.append(get_schedule(entry.name))
        except (SolverlabError, TypeError):
            continue
    if not built:
        raise SolverlabError(f"no registered schedule of kind {tuple(kinds)} (less {exclude})")
    return st.sampled_from(built)


def order_schedules(solver: Solver) -> st.SearchStrategy[Schedule]:
    """The schedules an order test of ``solver`` draws: every registered VP and VE schedule,
    :data:`NON_SMOOTH_SCHEDULES` (``vp-discrete``) included unless
    ``solver.needs_smooth_schedule`` (the rule of
    :func:`~solverlab.testing.conformance_problems`)."""
    return schedules(exclude=NON_SMOOTH_SCHEDULES if solver.needs_smooth_schedule else ())


def _schedule_strategy(value) -> st.SearchStrategy[Schedule]:
    if value is None:
        return schedules(exclude=NON_SMOOTH_SCHEDULES)
    if isinstance(value, st.SearchStrategy):
        return value
    if isinstance(value, (str, Schedule)):
        value = [value]
    return st.sampled_from([get_schedule(v) if isinstance(v, str) else v for v in value])


def _int_strategy(value) -> st.SearchStrategy[int]:
    if isinstance(value, st.SearchStrategy):
        return value
    if isinstance(value, int):
        return st.just(value)
    lo, hi = value
    return st.integers(int(lo), int(hi))


def analytic_problems(
    schedules: st.SearchStrategy[Schedule] | Sequence[Schedule | str] | Schedule | str | None
    = None,
    dims: tuple[int, int] | int | st.SearchStrategy[int] = (1, 8),
    components: tuple[int, int] | int | st.SearchStrategy[int] = (1, 4),
    batch: int | tuple[int, int] | st.SearchStrategy[int] = 4,
    *,
    parameterizations: Sequence[Parameterization | str] = _CANONICAL_PARAMETERIZATIONS,
    sub_range: bool = True,
) -> st.SearchStrategy[Problem]:
    """Gaussian-mixture :class:`Problem` s (:func:`make_problem`) for order tests.

    Draws a schedule (default: :func:`schedules` of kind vp or ve, less
    :data:`NON_SMOOTH_SCHEDULES`; :func:`order_schedules` gives a solver's), a dimension in
    ``dims`` (inclusive range), a number of components in ``components``, variances in
    ``[var_min, var_max]`` with ``var_min`` in ``[0.1, 0.5]`` (bounded away from zero: a
    near-singular component makes the drift stiff at ``t_min``), ``var_max - var_min`` in
    ``[0, 1]``, means ``mean_scale N(0, I)`` with ``mean_scale`` in ``[0.5, 2]``, full or
    diagonal covariances, a parameterization and a seed.
    Means are kept off zero on purpose: a centred Gaussian is a special problem where a
    solver's leading error term can nearly cancel (``euler`` on ``vp-cosine`` shows order ~1.9
    up to ~500 steps and reaches order 1 only beyond 4000), so no affordable step sequence
    shows the asymptotic order.
    With ``sub_range`` the problem runs over a sub-range of the schedule's ``lambda`` range:
    it starts in its first 30% and ends in its last 30% (the full range included), so that
    ``lambda`` always spans at least 40% of it. ``batch`` start states are drawn from the exact
    marginal at ``t_start`` (well conditioned ones, see :func:`make_problem`).

    For order tests prefer ``components=(2, 4)``: a single Gaussian is a special problem on
    which a solver's leading error term can nearly cancel (``dpmpp-3m`` shows order ~4 up to
    ~256 steps there and turns to 3 only past 4000 steps).
    """
    sched_st = _schedule_strategy(schedules)
    dim_st = _int_strategy(dims)
    comp_st = _int_strategy(components)
    batch_st = _int_strategy(batch)
    params = tuple(parameterizations)

    @st.composite
    def build(draw) -> Problem:
        schedule = draw(sched_st)
        lo = draw(st.floats(0.0, 0.3)) if sub_range else 0.0
        hi = draw(st.floats(0.7, 1.0)) if sub_range else 1.0
        t_start, t_end = lambda_range(schedule, lo, hi)
        var_min = draw(st.floats(0.1, 0.5))
        return make_problem(
            schedule,
            dim=draw(dim_st),
            components=draw(comp_st),
            batch=draw(batch_st),
            seed=draw(st.integers(0, 2**16)),
            var_min=var_min,
            var_max=var_min + draw(st.floats(0.0, 1.0)),
            mean_scale=draw(st.floats(0.5, 2.0)),
            diagonal=draw(st.booleans()),
            parameterization=draw(st.sampled_from(params)),
            t_start=t_start,
            t_end=t_end,
        )

    return build()
