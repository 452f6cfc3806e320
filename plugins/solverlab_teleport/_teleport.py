"""The ``teleport`` solver: an exact Gaussian jump over the first part of the grid, then any
solver on the rest (Wang & Vastola 2024, arXiv 2412.09726, "analytical teleportation")."""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor

from solverlab import (
    Denoiser,
    Grid,
    Model,
    Schedule,
    Solution,
    Solver,
    SolverState,
    StepInfo,
    as_denoiser,
    check_grid,
    check_state,
    get_grid,
    get_solver,
)
from solverlab.errors import OptionError, UnknownNameError
from solverlab.validators import number

from ._gaussian import GaussianFit, fit_error

__all__ = ["AUTO_SKIPS", "Teleport"]

F64 = torch.float64
_OWNER = "Teleport ('teleport')"
#: The skips ``skip="auto"`` chooses from: 0, 0.05, .., 0.95 of the grid's lambda range.
AUTO_SKIPS = tuple(k / 20 for k in range(20))


def _fail(option: str, value: Any, allowed: str) -> OptionError:
    if isinstance(value, Tensor):
        value = f"<tensor of shape {tuple(value.shape)}>"
    else:
        value = repr(value)
    return OptionError(f"{_OWNER}: option {option}={value} is not allowed; {allowed}")


def _check_skip(inst: Any, attribute: Any, value: Any) -> None:
    if isinstance(value, str) and value == "auto":
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and 0.0 <= value < 1.0):
        raise _fail("skip", value, "it must be a number in [0, 1) (the fraction of the grid's "
                                   "lambda range to jump over) or 'auto'")


def _check_inner(inst: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, (str, Solver)):
        raise _fail("inner", value, "it must be a registered solver name or a Solver instance")


def _options(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise _fail("inner_options", value, "it must be a dict of the inner solver's options")
    return dict(value)


def _check_rank(inst: Any, attribute: Any, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail("rank", value, "it must be None (every eigenpair) or an integer >= 1")


def _check_spacing(inst: Any, attribute: Any, value: Any) -> None:
    if value is not None and not isinstance(value, (str, Grid)):
        raise _fail("spacing", value, "it must be None (keep the grid's spacing in lambda), a "
                                      "grid rule's name or a Grid instance")


@attrs.frozen(kw_only=True, eq=False)
class Teleport(Solver):
    """Gaussian teleport + any solver (Wang & Vastola 2024, arXiv 2412.09726, sec. 4): jump
    from the grid's first time exactly along the probability-flow ODE of a Gaussian fitted to
    the data, at no NFE, to the time ``t_skip`` that lies ``skip`` of the way along the grid's
    ``lambda`` range, then run ``inner`` from ``t_skip`` to the grid's last time on the same
    number of steps. NFE: the inner solver's, ``steps`` for the fixed-grid solvers; the
    declared order is the inner solver's.

    At high noise every data distribution's score is close to that of its Gaussian fit (they
    share the first two moments, and the difference vanishes as the noise level ``s =
    sigma/alpha`` grows), so the jump costs little accuracy and the inner solver spends all its
    steps where the trajectories bend. For Gaussian data the jump is exact. For other data the
    jump's error does not shrink with more steps: teleport pays at few steps (10 steps on
    three separated modes in 8-D: DPM-Solver++(2M) 3.8e-2 -> 1.5e-2, UniPC 3.4e-2 -> 1.2e-2 at
    ``skip=0.35``), while at hundreds of steps the jump's error dominates.

    Options:

    - ``inner`` (default ``"dpmpp-2m"``): a registered solver name or a
      :class:`~solverlab.Solver` instance; ``inner_options``: options of a named inner solver;
    - ``skip`` (default ``0.0``: no jump, the inner solver alone): the fraction of the grid's
      ``lambda`` range to jump over, ``lambda_skip = lambda_0 + skip (lambda_end - lambda_0)``,
      in ``[0, 1)``; or ``"auto"`` (needs ``data``): the largest of :data:`AUTO_SKIPS` at
      which the estimated error of the Gaussian fit stays below ``tolerance`` over the whole
      jump (:meth:`skip_for`);
    - the Gaussian, in the model's own data space (shape and scaling, e.g. ``[-1, 1]``
      images): ``data``, training samples ``(n, *shape)`` (mean and covariance estimated from
      them), or ``mean`` ``(d,)`` and ``cov`` ``(d, d)``/``(d,)`` (symmetric positive
      semi-definite); ``rank``: keep only the largest ``rank`` eigenpairs, the rest of the
      state moves as pure noise (its component is scaled by ``s_t/s_s``, not dropped). Only
      these are used for the fit: never the batch being sampled;
    - ``tolerance`` (default 0.05): the bound of ``skip="auto"``;
    - ``spacing``: how the steps are placed on ``[t_skip, t_end]``: ``None`` (default) keeps
      the given grid's spacing in ``lambda`` (point ``i`` at the same fraction of the
      ``lambda`` range: for ``logsnr``/``exponential``/``lu-lambdas`` grids that is the rule
      itself); or a grid rule (a name such as ``"karras"``, or a :class:`~solverlab.Grid`)
      applied to ``[t_skip, t_end]`` with the grid's step count;
    - ``samples`` (default 256) and ``seed``: the noised data samples of the ``"auto"``
      estimate.

    The solution's ``times`` are the grid's first time followed by the inner solver's grid,
    and a recorded trajectory holds the state before and after the jump. Without a Gaussian
    (no ``data``, ``mean``/``cov``) a ``skip > 0`` is refused at the solve;
    :meth:`prepare` fits it to the data it is given (the conformance kit's hook).
    """

    name: ClassVar[str] = "teleport"
    order: ClassVar[int] = 2  # the default inner solver's (dpmpp-2m); see convergence_order

    inner: str | Solver = attrs.field(default="dpmpp-2m", validator=_check_inner)
    inner_options: dict[str, Any] = attrs.field(factory=dict, converter=_options)
    skip: float | str = attrs.field(default=0.0, validator=_check_skip)
    data: Tensor | None = attrs.field(default=None, repr=False)
    mean: Tensor | None = attrs.field(default=None, repr=False)
    cov: Tensor | None = attrs.field(default=None, repr=False)
    rank: int | None = attrs.field(default=None, validator=_check_rank)
    tolerance: float = attrs.field(default=0.05, validator=number(gt=0))
    spacing: str | Grid | None = attrs.field(default=None, validator=_check_spacing)
    samples: int = attrs.field(default=256, validator=number(integer=True, ge=1))
    seed: int = attrs.field(default=0, validator=number(integer=True, ge=0))

    _solver: Solver | None = attrs.field(init=False, default=None, repr=False)
    _fit: GaussianFit | None = attrs.field(init=False, default=None, repr=False)
    _rule: Grid | None = attrs.field(init=False, default=None, repr=False)
    _auto: dict[tuple[float, float], float] = attrs.field(init=False, factory=dict, repr=False)

    def __attrs_post_init__(self) -> None:
        if isinstance(self.inner, Solver) and self.inner_options:
            raise _fail("inner_options", self.inner_options,
                        "give options with an inner solver's name, or an instance built with "
                        "them (inner=get_solver(name, **options))")
        if self.data is not None and (self.mean is not None or self.cov is not None):
            raise OptionError(f"{_OWNER}: options data and mean/cov both give the Gaussian; "
                              "give data (training samples) or mean and cov")
        if (self.mean is None) != (self.cov is None):
            given, missing = ("mean", "cov") if self.cov is None else ("cov", "mean")
            raise OptionError(f"{_OWNER}: option {given} needs option {missing} too (or give "
                              "data instead)")
        if self.skip == "auto" and self.mean is not None:
            raise OptionError(f"{_OWNER}: option skip='auto' estimates the fit's error on "
                              "data samples; give data= instead of mean/cov, or a number")
        fit = None
        if self.data is not None:
            fit = GaussianFit.from_data(self.data, self.rank)
            object.__setattr__(self, "data", fit_data(self.data))
        elif self.mean is not None:
            fit = GaussianFit.from_moments(self.mean, self.cov, self.rank)
        if fit is not None and self.rank is not None and self.rank > fit.dim:
            raise _fail("rank", self.rank, f"it must be at most the data's dimension "
                                           f"{fit.dim}")
        object.__setattr__(self, "_fit", fit)
        if isinstance(self.spacing, str):
            try:
                object.__setattr__(self, "_rule", get_grid(self.spacing))
            except UnknownNameError as e:
                raise _fail("spacing", self.spacing, str(e)) from None
        elif isinstance(self.spacing, Grid):
            object.__setattr__(self, "_rule", self.spacing)
        self._inner()

    # -- the parts -------------------------------------------------------------------------
    def _inner(self) -> Solver:
        if self._solver is None:
            object.__setattr__(self, "_solver", _resolve(self.inner, self.inner_options))
        return self._solver

    @property
    def inner_solver(self) -> Solver:
        """The inner solver (built from ``inner`` and ``inner_options``)."""
        return self._inner()

    @property
    def fit(self) -> GaussianFit | None:
        """The Gaussian the jump follows (``None`` without ``data``/``mean``/``cov``)."""
        return self._fit

    @property
    def convergence_order(self) -> int:
        """The inner solver's: the jump is exact for the fitted Gaussian, and its error does
        not depend on the steps."""
        return self._inner().convergence_order

    @property
    def needs_smooth_schedule(self) -> bool:
        return self._inner().needs_smooth_schedule

    def expected_nfe(self, steps: int) -> int | None:
        return self._inner().expected_nfe(steps)

    def prepare(self, model: Any, data: Tensor) -> Teleport:
        """This solver with its inner solver prepared (where it has ``prepare``, e.g.
        ``dpmv3``'s statistics) and, when it has no Gaussian of its own, the Gaussian fitted to
        ``data`` (the conformance kit's and ``compare``'s per-model hook; a Gaussian the caller
        gave is never replaced)."""
        inner = self._inner()
        prepare = getattr(inner, "prepare", None)
        changes: dict[str, Any] = {}
        if callable(prepare):
            changes.update(inner=prepare(model, data), inner_options={})
        if self._fit is None:
            changes["data"] = data
        return attrs.evolve(self, **changes) if changes else self

    # -- the jump --------------------------------------------------------------------------
    def skip_for(self, schedule: Schedule, grid: Tensor) -> float:
        """The skip of a solve on ``grid``: ``skip`` itself, or for ``"auto"`` the largest of
        :data:`AUTO_SKIPS` such that the fit's error ``e(s)`` (:func:`fit_error`: the relative
        error of the probability-flow velocity when the data's own kernel denoiser is
        replaced by the Gaussian's) is at most ``tolerance`` at the noise level ``s =
        exp(-lambda)`` of that skip and of every smaller one. Cached per lambda range."""
        if self.skip != "auto":
            return float(self.skip)
        lam = schedule.lambda_(grid.detach()[[0, -1]].to(F64))
        key = (round(float(lam[0]), 12), round(float(lam[1]), 12))
        if key not in self._auto:
            chosen = 0.0
            for skip in AUTO_SKIPS[1:]:
                level = torch.exp(-(lam[0] + skip * (lam[1] - lam[0]))).reshape(1)
                if float(fit_error(self._fit, self.data, level, self.samples,
                                   self.seed)[0]) > self.tolerance:
                    break
                chosen = skip
            self._auto[key] = chosen
        return self._auto[key]

    def remaining_grid(self, schedule: Schedule, grid: Tensor) -> Tensor:
        """The inner solver's grid: ``grid`` itself when the skip is 0; else ``steps``
        steps from ``t_skip`` to ``grid[-1]``, placed by ``spacing``."""
        grid = check_grid(grid, schedule)
        skip = self.skip_for(schedule, grid)
        if skip == 0.0:
            return grid
        g = grid.detach().to(F64)
        lam = schedule.lambda_(g)
        lam_skip = lam[0] + skip * (lam[-1] - lam[0])
        t_skip = float(schedule.t_of_lambda(lam_skip))
        steps = g.numel() - 1
        if self._rule is None:
            new = schedule.t_of_lambda(lam_skip + (lam - lam[0]) * (lam[-1] - lam_skip)
                                       / (lam[-1] - lam[0]))
            new[0], new[-1] = t_skip, float(g[-1])
        else:
            try:
                new = self._rule(schedule, steps, t_start=t_skip, t_end=float(g[-1]))
            except OptionError as e:
                raise _fail("spacing", self.spacing, f"it must be a rule that takes "
                                                     f"t_start/t_end ({e})") from None
        return check_grid(new, schedule)

    def jump(self, x: Tensor, schedule: Schedule, t_from: float, t_to: float) -> Tensor:
        """``x`` at ``t_from`` moved exactly along the fitted Gaussian's probability-flow ODE
        to ``t_to`` (float64 inside, ``x``'s dtype out)."""
        fit = self._gaussian()
        fit.check(x, "data" if self.data is not None else "mean")
        a_s, s_s = (float(v) for v in (schedule.alpha(t_from), schedule.sigma(t_from)))
        a_t, s_t = (float(v) for v in (schedule.alpha(t_to), schedule.sigma(t_to)))
        return fit.flow(x, a_s, s_s, a_t, s_t)

    def _gaussian(self) -> GaussianFit:
        if self._fit is None:
            raise OptionError(
                f"{_OWNER}: skip={self.skip!r} jumps along a Gaussian fit, and none was given: "
                "give data= (training samples in the model's data space) or mean= and cov=, "
                "or prepare(model, data)")
        return self._fit

    # -- the solver interface --------------------------------------------------------------
    def init(self, denoiser: Denoiser, x: Tensor, grid: Tensor) -> SolverState:
        """The inner solver's state at ``t_skip`` (after the jump) on its grid."""
        if self.skip_for(denoiser.schedule, grid) == 0.0:
            return self._inner().init(denoiser, x, grid)
        new = self.remaining_grid(denoiser.schedule, grid)
        return self._inner().init(denoiser, self.jump(x, denoiser.schedule, float(grid[0]),
                                                      float(new[0])), new)

    def step(self, state: SolverState) -> SolverState:
        return self._inner().step(state)

    def solve(self, model: Model | Denoiser, x: Tensor, grid: Tensor | Sequence[float], *,
              callback: Callable[[StepInfo], None] | None = None, progress: bool | None = None,
              trajectory: bool = False, check_finite: bool = True, grad: bool = False
              ) -> Solution:
        """Jump, then ``inner.solve`` on :meth:`remaining_grid` (its progress bar, callbacks,
        finite checks). ``Solution.times``: ``grid[0]`` and the inner grid (just the grid when
        the skip is 0); the trajectory starts with ``x`` and the state after the jump."""
        start = time.perf_counter()
        denoiser = as_denoiser(model)
        check_state(x)
        grid = check_grid(grid, denoiser.schedule)
        inner = self._inner()
        opts = dict(callback=callback, progress=progress, trajectory=trajectory,
                    check_finite=check_finite, grad=grad)
        if self.skip_for(denoiser.schedule, grid) == 0.0:
            return inner.solve(denoiser, x, grid, **opts)
        new = self.remaining_grid(denoiser.schedule, grid)
        with torch.enable_grad() if grad else torch.no_grad():
            x_skip = self.jump(x, denoiser.schedule, float(grid[0]), float(new[0]))
        sol = inner.solve(denoiser, x_skip, new, **opts)
        traj = sol.trajectory
        if traj is not None:
            traj = torch.cat([x.detach().clone().to(traj.dtype)[None], traj])
        return Solution(x=sol.x, nfe=sol.nfe, times=torch.cat([grid[:1], sol.times]),
                        trajectory=traj, wall_time=time.perf_counter() - start)


def fit_data(data: Any) -> Tensor:
    """``data`` as the float64 CPU tensor the fit and the ``"auto"`` estimate read."""
    return torch.as_tensor(data).detach().to("cpu", F64)


def _resolve(inner: str | Solver, options: dict[str, Any]) -> Solver:
    if isinstance(inner, Solver):
        return inner
    try:
        return get_solver(inner, **options)
    except UnknownNameError as e:
        raise _fail("inner", inner, str(e)) from None
    except OptionError as e:
        raise _fail("inner_options", options, f"they do not fit solver {inner!r}: {e}") from None
