"""The ``preset`` solver (see the package docstring)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor

from solverlab import (
    Denoiser,
    Model,
    Solution,
    Solver,
    SolverState,
    StepInfo,
    as_denoiser,
    check_grid,
    get_solver,
    presets,
)
from solverlab.errors import GridError, OptionError
from solverlab.validators import boolean

__all__ = ["Preset"]

_OWNER = "Preset ('preset')"


def _check_nfe(inst: Any, attribute: Any, value: Any) -> None:
    if value is None:
        return
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not (ok and value in presets.NFE_RANGE):
        lo, hi = presets.NFE_RANGE.start, presets.NFE_RANGE.stop - 1
        raise OptionError(f"{_OWNER}: option nfe={value!r} is not allowed; choose None (keep "
                          f"the grid, the general-purpose preset) or an integer in {lo}..{hi} "
                          "(the budgets bench/frontier.py measured)")


def _data(value: Any) -> Tensor | None:
    if value is None:
        return None
    if not isinstance(value, Tensor) or value.ndim < 2 or value.shape[0] < 2:
        shown = (f"<tensor of shape {tuple(value.shape)}>" if isinstance(value, Tensor)
                 else repr(value))
        raise OptionError(f"{_OWNER}: option data={shown} is not allowed; give training "
                          "samples as a tensor (n, *shape) with n >= 2, in the model's data "
                          "space")
    return value.detach()


@attrs.frozen(kw_only=True, eq=False)
class Preset(Solver):
    """The best configuration ``bench/frontier.py`` measured for a budget of ``nfe``
    evaluations (:func:`solverlab.presets.best`): solver, options, grid rule and teleport
    skip, chosen on two 16-D Gaussian mixtures (``bench/frontier.md``) for the smallest
    worst-case error ratio over both.

    Options:

    - ``nfe`` (default ``None``): the budget, in ``5..20``. The solve takes the given grid's
      **first and last time and its step count**, which must be the preset's
      (:attr:`configuration` ``.steps``; ``nfe`` for the presets of one evaluation per step),
      and places the steps by the preset's own grid rule between those ends
      (``Solution.times`` are the placed times). ``None``: the general-purpose preset
      (``solverlab.presets.ANY_GRID``), a solver that needs no data and keeps the caller's
      grid as given, at any step count; it is what the conformance kit checks;
    - ``data_free`` (default ``False``): take the best configuration that needs no training
      data (``solverlab.presets.DATA_FREE``);
    - ``data``: training samples ``(n, *shape)`` in the model's data space, for presets that
      fit a Gaussian to them (``teleport``) or compute EMS from them (``dpmv3``, 400 cells,
      up to 1024 samples); never the batch being sampled. :meth:`prepare` gives them too (the
      hook ``solverlab compare`` and the conformance kit call). A preset that needs data and
      has none raises :class:`~solverlab.errors.OptionError` at the solve.

    NFE: the configuration's (exactly ``nfe`` with ``nfe`` given; :meth:`expected_nfe` of
    another step count is an error); the declared order is the configured solver's (a
    teleport jump's error does not shrink with steps: presets are for their budget).
    """

    name: ClassVar[str] = "preset"
    order: ClassVar[int] = 2  # presets.ANY_GRID's solver (tests/test_presets.py checks)

    nfe: int | None = attrs.field(default=None, validator=_check_nfe)
    data_free: bool = attrs.field(default=False, validator=boolean)
    data: Tensor | None = attrs.field(default=None, converter=_data, repr=False)

    _built: list = attrs.field(init=False, factory=list, repr=False)  # [(model, solver)]
    _plain_solver: list = attrs.field(init=False, factory=list, repr=False)  # built once

    # -- the configuration -----------------------------------------------------------------
    @property
    def configuration(self) -> presets.Config:
        """The :class:`solverlab.presets.Config` this preset runs."""
        if self.nfe is None:
            if presets.ANY_GRID is None:  # pragma: no cover - the table ships with it
                raise OptionError(f"{_OWNER}: no general-purpose preset in solverlab.presets")
            return presets.ANY_GRID
        return presets.best(self.nfe, data_free=self.data_free)

    def _plain(self) -> Solver:
        """The configured solver without its data (for orders and NFE counts); built once
        (compare's budget search asks ``expected_nfe`` for many step counts)."""
        if not self._plain_solver:
            c = self.configuration
            self._plain_solver.append(get_solver(c.solver, **c.options))
        return self._plain_solver[0]

    def solver_for(self, model: Model) -> Solver:
        """The configured solver, ready for ``model`` (with the Gaussian fit / EMS from
        ``data`` where it needs them); built once per model."""
        for m, s in self._built:
            if m is model:
                return s
        c = self.configuration
        if c.needs_data and self.data is None:
            raise OptionError(
                f"{_OWNER}: the preset for nfe={self.nfe} is {c.label()}, which needs training "
                "data; give data= (training samples in the model's data space) or call "
                "prepare(model, data), or use data_free=True")
        solver = c.build(data=self.data, model=model)
        self._built[:] = [(model, solver)]
        return solver

    @property
    def convergence_order(self) -> int:
        return self._plain().convergence_order

    @property
    def needs_smooth_schedule(self) -> bool:
        return self._plain().needs_smooth_schedule

    def expected_nfe(self, steps: int) -> int | None:
        if self.nfe is None:
            return self._plain().expected_nfe(steps)
        c = self.configuration
        if steps != c.steps:
            raise OptionError(f"{_OWNER}: nfe={self.nfe} runs {c.steps} steps ({c.label()}); "
                              f"a grid of {steps} steps does not fit it")
        return c.nfe

    def prepare(self, model: Any, data: Tensor) -> Preset:
        """This preset with ``data`` as its training samples (unless it has its own) and its
        solver built for ``model``; unchanged when the configuration needs no data."""
        if not self.configuration.needs_data:
            return self
        new = self if self.data is not None else attrs.evolve(self, data=data)
        new.solver_for(model)
        return new

    def place(self, schedule: Any, grid: Tensor) -> Tensor:
        """The times the preset solves on for a caller's ``grid``: the grid itself without
        ``nfe``; else the configuration's rule between ``grid[0]`` and ``grid[-1]``, on as many
        steps, which must be the configuration's."""
        grid = check_grid(grid, schedule)
        if self.nfe is None:
            return grid
        c = self.configuration
        steps = grid.numel() - 1
        if steps != c.steps:
            raise GridError(
                f"{_OWNER}: nfe={self.nfe} runs {c.steps} steps ({c.label()}); the grid has "
                f"{steps}: pass a grid of {c.steps} steps (its first and last times are used, "
                f"its spacing is replaced by {c.grid!r})")
        placed = c.grid_for(schedule, t_start=float(grid[0]), t_end=float(grid[-1]))
        return placed.to(device=grid.device)

    # -- the solver interface --------------------------------------------------------------
    def init(self, denoiser: Denoiser, x: Tensor, grid: Tensor) -> SolverState:
        """The configured solver's state on :meth:`place` (for composition; :meth:`solve`
        runs the configured solver's own loop)."""
        return self.solver_for(denoiser.model).init(
            denoiser, x, self.place(denoiser.schedule, grid))

    def step(self, state: SolverState) -> SolverState:
        return self._built[0][1].step(state)

    def solve(self, model: Model | Denoiser, x: Tensor, grid: Tensor | Sequence[float], *,
              callback: Callable[[StepInfo], None] | None = None, progress: bool | None = None,
              trajectory: bool = False, check_finite: bool = True, grad: bool = False
              ) -> Solution:
        """The configured solver's ``solve`` on :meth:`place` (its progress bar, callbacks,
        finite checks; ``Solution.times`` are the placed times, or teleport's)."""
        start = time.perf_counter()
        denoiser = as_denoiser(model)
        placed = self.place(denoiser.schedule, torch.as_tensor(grid, dtype=torch.float64)
                            if not isinstance(grid, Tensor) else grid)
        sol = self.solver_for(denoiser.model).solve(
            denoiser, x, placed, callback=callback, progress=progress, trajectory=trajectory,
            check_finite=check_finite, grad=grad)
        return attrs.evolve(sol, wall_time=time.perf_counter() - start)
