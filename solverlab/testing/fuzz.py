"""Fuzzing a solver through the public API: random options, schedules, grids, start states and
model outputs. The contract it checks: every outcome is a finite result of the right shape or a
:class:`~solverlab.errors.SolverlabError`; any other exception, a non-finite result without
``check_finite=False``, or a run past the time bound is a failure.

Needs hypothesis (a test dependency). :func:`fuzz_cases` is the strategy, :func:`run_case` runs
one case and raises :class:`AssertionError` on a breach, :func:`check_fuzz` drives both for one
solver (what a plugin author calls in a test).
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import attrs
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from ..errors import SolverlabError
from ..model import Model, TorchModel
from ..registry import get_grid, get_model, get_registry, get_schedule, get_solver
from ..solver import Solver

__all__ = ["OUTPUTS", "FuzzCase", "check_fuzz", "fuzz_cases", "run_case"]

#: What the fuzzed model returns: the exact analytic output, a real network's, or a fault.
OUTPUTS = ("exact", "network", "nan", "inf", "huge", "float64", "wrong-shape", "scalar",
           "tuple", "none", "zero")

#: Option values tried for every option of a part: valid choices of the common enumerations
#: and values of every wrong kind.
_VALUES = (True, False, 0, 1, 2, 3, 4, 9, -1, 0.5, 1e-3, 1e-30, 1e30, math.nan, math.inf, None,
           "x", "none", "no", "1", "dpmsolver", "taylor", "data", "noise", "bh1", "bh2", "sigma",
           "lambda", "t", "log_sigma", "predictive", "pid", "standard", "fixed-r", "grid",
           "corrected", "lower-order", "denoise_to_zero", "euler", [], {})

_SCHEDULE_OPTIONS = {"t_min": (1e-6, 1e-3, 0.0, 0.5, -1.0, 2.0, math.nan),
                     "t_max": (0.5, 1.0, 2.0, 80.0, 1000.0, math.inf)}


@attrs.frozen(kw_only=True)
class FuzzCase:
    """One fuzzed solve."""

    solver: str
    solver_options: dict[str, Any]
    schedule: str
    schedule_options: dict[str, Any]
    grid: str
    grid_options: dict[str, Any]
    steps: int
    batch: int
    dim: int
    dtype: torch.dtype
    x_scale: float
    output: str
    parameterization: str
    check_finite: bool


def _options_of(cls: type, draw: Any) -> dict[str, Any]:
    """Half the time no option; else one or two of ``cls``'s options with values from
    ``_VALUES``, and now and then an option that does not exist."""
    names = [f.name for f in attrs.fields(cls) if f.init] if attrs.has(cls) else []
    if not names or draw(st.booleans()):
        return {}
    chosen = draw(st.lists(st.sampled_from(names), unique=True, min_size=1, max_size=2))
    opts = {n.lstrip("_"): draw(st.sampled_from(_VALUES)) for n in chosen}
    if draw(st.integers(0, 19)) == 0:
        opts["bogus_option"] = 1
    return opts


@functools.cache
def _fitting_grids(schedule: str) -> tuple[str, ...]:
    """The grids that place 2 steps on ``schedule`` with default options."""
    fitting = []
    for name in get_registry().names("grid"):
        try:
            get_grid(name)(get_schedule(schedule), 2)
            fitting.append(name)
        except (SolverlabError, TypeError):
            continue
    return tuple(fitting)


@st.composite
def fuzz_cases(draw: Any, solvers: tuple[str, ...] | None = None) -> FuzzCase:
    """Random :class:`FuzzCase` s for ``solvers`` (default: every registered solver)."""
    reg = get_registry()
    name = draw(st.sampled_from(solvers or tuple(reg.names("solver"))))
    schedule = draw(st.sampled_from(tuple(reg.names("schedule"))))
    grids = tuple(n for n in reg.names("grid") if n != "custom")
    # Mostly a grid that fits the schedule (diffusers' spacings need a discrete one).
    fitting = _fitting_grids(schedule)
    grid = draw(st.sampled_from(fitting if fitting and draw(st.integers(0, 4)) else grids))
    sched_opts = {k: draw(st.sampled_from(v)) for k, v in _SCHEDULE_OPTIONS.items()
                  if draw(st.integers(0, 6)) == 0}
    return FuzzCase(
        solver=name, solver_options=_options_of(reg.entry("solver", name).cls, draw),
        schedule=schedule, schedule_options=sched_opts, grid=grid,
        grid_options=_options_of(reg.entry("grid", grid).cls, draw) if draw(
            st.integers(0, 3)) == 0 else {},
        steps=draw(st.integers(1, 8)), batch=draw(st.sampled_from((1, 2, 3, 3, 0))),
        dim=draw(st.integers(1, 4)), dtype=draw(st.sampled_from((torch.float32, torch.float64))),
        x_scale=draw(st.sampled_from((1.0, 1.0, 1.0, 1e-3, 1e3, 1e30, math.nan, math.inf))),
        output=draw(st.sampled_from(OUTPUTS[:2] * 4 + OUTPUTS[2:])),
        parameterization=draw(st.sampled_from(("noise", "data", "velocity", "score"))),
        check_finite=draw(st.booleans()))


class _Net(nn.Module):
    """A real network whose output is bent into ``kind``."""

    def __init__(self, dim: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.lin = nn.Linear(dim + 1, dim)

    def forward(self, x: Tensor, t: Tensor) -> Any:
        y = torch.tanh(self.lin(torch.cat([x, t[:, None].to(x.dtype)], 1)))
        faults = {
            "nan": lambda: y * math.nan, "inf": lambda: y + math.inf, "huge": lambda: y * 1e300,
            "float64": lambda: y.double(), "wrong-shape": lambda: y[:, :1].expand(-1, 1),
            "scalar": lambda: y.sum(), "tuple": lambda: (y, y), "none": lambda: None,
            "zero": lambda: torch.zeros_like(y),
        }
        return faults.get(self.kind, lambda: y)()


def _model(case: FuzzCase, schedule: Any) -> Model:
    if case.output == "exact":
        return get_model("gaussian-mixture", dim=case.dim, schedule=schedule,
                         parameterization=case.parameterization)
    net = _Net(case.dim, case.output).to(case.dtype)
    return TorchModel(net, schedule, case.parameterization)


class _TimeUp(BaseException):
    """Raised by the alarm; a BaseException so that no ``except Exception`` swallows it."""


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread() or not hasattr(
            signal, "SIGALRM"):
        yield
        return

    def alarm(signum: int, frame: Any) -> None:
        raise _TimeUp

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_case(case: FuzzCase, time_limit: float = 60.0) -> str:
    """Run ``case``; return ``"ok"`` (a finite result of the right shape, or any result with
    ``check_finite=False``) or ``"refused"`` (a SolverlabError). Raise AssertionError on a
    breach of the contract; any other exception propagates."""
    start = time.perf_counter()
    try:
        with _time_limit(time_limit):
            try:
                schedule = get_schedule(case.schedule, **case.schedule_options)
                grid = get_grid(case.grid, **case.grid_options)(schedule, case.steps)
                model = _model(case, schedule)
                solver = get_solver(case.solver, **case.solver_options)
                gen = torch.Generator().manual_seed(0)
                x = (torch.randn(case.batch, case.dim, generator=gen, dtype=torch.float64)
                     * case.x_scale).to(case.dtype)
                sol = solver.solve(model, x, grid, check_finite=case.check_finite,
                                   progress=False)
            except SolverlabError:
                return "refused"
    except _TimeUp:
        raise AssertionError(f"{case} ran past the time bound of {time_limit:g} s") from None
    if time.perf_counter() - start > time_limit:
        raise AssertionError(f"{case} ran past the time bound of {time_limit:g} s")
    if not isinstance(sol.x, Tensor) or sol.x.shape != x.shape or sol.x.dtype != x.dtype:
        raise AssertionError(f"{case} returned {type(sol.x).__name__} "
                             f"{getattr(sol.x, 'shape', '')} for x of shape {tuple(x.shape)}")
    if case.check_finite and not bool(torch.isfinite(sol.x).all()):
        raise AssertionError(f"{case} returned non-finite values with check_finite=True")
    return "ok"


def check_fuzz(solver: str | Solver, examples: int | None = None,
               time_limit: float = 60.0) -> None:
    """Fuzz one registered solver (its name, or an instance whose name is registered) with
    :func:`fuzz_cases`; ``examples`` overrides the active hypothesis profile's count."""
    name = solver if isinstance(solver, str) else solver.name
    opts = {} if examples is None else {"max_examples": examples}

    @settings(**opts)
    @given(fuzz_cases((name,)))
    def fuzz(case: FuzzCase) -> None:
        run_case(case, time_limit)

    fuzz()
