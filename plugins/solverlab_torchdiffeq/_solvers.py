"""torchdiffeq methods as solverlab solvers (``torchdiffeq-<method>``).

Adaptive methods (error control with ``rtol``/``atol``) are :class:`~solverlab.AdaptiveSolver`
subclasses: they use only the grid's end points. Fixed-grid methods take the grid (mapped to
the integration variable) and return the state at every grid point.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor
from torchdiffeq import odeint

from solverlab import AdaptiveSolver, Solution, Solver
from solverlab.errors import SolverDivergedError
from solverlab.grid import check_grid
from solverlab.model import Denoiser, Model, as_denoiser
from solverlab.solver import _check_x
from solverlab.validators import boolean, number, one_of

from ._ode import PFODE, VARIABLES

__all__ = ["TorchdiffeqAdaptive", "TorchdiffeqError", "TorchdiffeqFixed"]

F64 = torch.float64


class TorchdiffeqError(SolverDivergedError):
    """torchdiffeq gave up (``underflow in dt``, ``max_num_steps exceeded``) or returned
    non-finite values; the message says what to change."""


def _advice(solver: Solver) -> str:
    tips = []
    if isinstance(solver, TorchdiffeqAdaptive):
        tips.append(f"loosen rtol (now {solver.rtol:g}) / atol (now {solver.atol:g})")
    tips.append(f"change variable (now {solver.variable!r}; 'lambda' is the smooth choice)")
    tips.append("check that the model is finite at these times (a NaN output makes the step "
                "size collapse)")
    if isinstance(solver, TorchdiffeqAdaptive):
        tips.append("or set min_step so that steps stop shrinking (accepting larger errors)")
    return "; ".join(tips)


def _positive(inst: Any, attribute: Any, value: Any) -> None:
    number(gt=0.0)(inst, attribute, value)


def _optional_positive(inst: Any, attribute: Any, value: Any) -> None:
    if value is not None:
        number(gt=0.0)(inst, attribute, value)


@attrs.frozen(kw_only=True)
class _Torchdiffeq(Solver):
    """Options shared by every ``torchdiffeq-*`` solver:

    - ``variable``: ``"lambda"`` (default: the VE state in the half log-SNR, smooth), ``"t"``
      or ``"log_sigma"`` (see :mod:`solverlab_torchdiffeq._ode`);
    - ``per_sample``: solve each sample alone, with its own step sizes (torchdiffeq#122: one
      ``odeint`` call shares its steps across the batch, so one hard sample sets the steps of
      all). NFE then counts every per-sample call.
    """

    method: ClassVar[str]
    variable: str = attrs.field(default="lambda", validator=one_of(*VARIABLES))
    per_sample: bool = attrs.field(default=False, validator=boolean)

    def _options(self, vs: Tensor) -> dict[str, Any]:
        return {}

    def _kwargs(self) -> dict[str, Any]:
        return {}

    def _odeint(self, ode: PFODE, y0: Tensor, vs: Tensor, ends) -> Tensor:
        try:
            return odeint(ode.rhs(ends), y0, vs, method=self.method, options=self._options(vs),
                          **self._kwargs())
        except AssertionError as e:  # torchdiffeq reports failures by assert
            raise TorchdiffeqError(
                f"solver {self.name!r} failed: torchdiffeq says {e!s}; " + _advice(self)
            ) from e

    def _integrate(self, denoiser: Denoiser, x: Tensor, times: Tensor) -> Tensor:
        """The states at ``times`` (float64, decreasing), stacked on dim 0."""
        ode = PFODE(denoiser, self.variable, x)
        vs = ode.v_of_t(times).to(x.device)
        ends = ((vs[0], times[0]), (vs[-1], times[-1]))
        parts = (x.split(1) if self.per_sample else (x,))
        ys = [self._odeint(ode, ode.to_y(p, times[0]), vs, ends) for p in parts]
        y = torch.cat(ys, dim=1) if self.per_sample else ys[0]
        shape = (-1, *([1] * x.ndim))
        alpha = (denoiser.schedule.alpha(times).view(shape).to(x.dtype)
                 if self.variable == "lambda" else 1.0)
        return y * alpha

    def _run(self, model: Model | Denoiser, x: Tensor, grid: Tensor | Sequence[float],
             adaptive: bool, callback: Callable[[dict[str, Any]], None] | None,
             trajectory: bool, check_finite: bool) -> Solution:
        denoiser = as_denoiser(model)
        grid = check_grid(grid, denoiser.schedule)
        _check_x(x)
        nfe0, start = denoiser.nfe, time.perf_counter()
        times = grid[[0, -1]] if adaptive else grid
        with torch.no_grad():
            states = self._integrate(denoiser, x, times.to(x.device))
        if check_finite and not bool(torch.isfinite(states[-1]).all()):
            raise TorchdiffeqError(
                f"solver {self.name!r} returned NaN or inf at t={float(times[-1]):.6g}; "
                + _advice(self))
        states[0] = x  # exactly the input, not its round trip through x/alpha
        if callback is not None:
            for i in range(times.numel() - 1):
                callback({"i": i, "t": times[i], "t_next": times[i + 1], "x": states[i + 1],
                          "nfe": denoiser.nfe - nfe0, "state": None})
        return Solution(x=states[-1], nfe=denoiser.nfe - nfe0, times=times,
                        trajectory=states if trajectory else None,
                        wall_time=time.perf_counter() - start)


@attrs.frozen(kw_only=True)
class TorchdiffeqFixed(_Torchdiffeq):
    """A fixed-grid torchdiffeq method: one ``odeint`` call over the whole grid (mapped to
    ``variable``), so multistep methods keep their history; the state at every grid point is
    the trajectory. ``step`` is not used."""

    nfe_per_step: ClassVar[int | None] = None

    def step(self, state):
        raise NotImplementedError(f"{type(self).__name__} runs torchdiffeq over the whole grid; "
                                  "call solve()")

    def expected_nfe(self, steps: int) -> int | None:
        if self.nfe_per_step is None:
            return None
        return self.nfe_per_step * steps

    def solve(self, model, x, grid, *, callback=None, progress=None, trajectory=False,
              check_finite=True) -> Solution:
        """Solve on ``grid`` (all of its points); see :meth:`solverlab.Solver.solve`.
        ``progress`` is ignored (one torchdiffeq call)."""
        return self._run(model, x, grid, False, callback, trajectory, check_finite)


@attrs.frozen(kw_only=True)
class TorchdiffeqAdaptive(_Torchdiffeq, AdaptiveSolver):
    """An adaptive torchdiffeq method (embedded Runge-Kutta pair with error control) from the
    grid's first to its last point; the grid's inner points are ignored.

    Options (torchdiffeq's, validated here): ``rtol`` (default 1e-5), ``atol`` (default 1e-5),
    on the integrated state (``x/alpha`` for ``variable="lambda"``); ``first_step``,
    ``min_step``, ``max_step`` (units of the variable; ``None``: no limit), ``safety`` (0.9),
    ``ifactor`` (10), ``dfactor`` (0.2), ``max_num_steps``. A step always lands on the end
    point (torchdiffeq ``step_t``): otherwise torchdiffeq steps past it and returns its
    dense-output interpolant, whose error can exceed ``rtol`` (:mod:`solverlab.reference`).

    ``underflow in dt`` and ``max_num_steps exceeded`` become :class:`TorchdiffeqError` (a
    :class:`~solverlab.SolverDivergedError`) with advice.
    """

    order: ClassVar[int]
    rtol: float = attrs.field(default=1e-5, validator=_positive)
    atol: float = attrs.field(default=1e-5, validator=_positive)
    first_step: float | None = attrs.field(default=None, validator=_optional_positive)
    min_step: float = attrs.field(default=0.0, validator=number(ge=0.0))
    max_step: float | None = attrs.field(default=None, validator=_optional_positive)
    safety: float = attrs.field(default=0.9, validator=number(gt=0.0, le=1.0))
    ifactor: float = attrs.field(default=10.0, validator=number(gt=1.0))
    dfactor: float = attrs.field(default=0.2, validator=number(gt=0.0, lt=1.0))
    max_num_steps: int = attrs.field(default=2**31 - 1, validator=number(integer=True, ge=1))

    def _kwargs(self) -> dict[str, Any]:
        return {"rtol": self.rtol, "atol": self.atol}

    def _options(self, vs: Tensor) -> dict[str, Any]:
        # step_t: a step lands on the end point (class docstring).
        opts: dict[str, Any] = {"safety": self.safety, "ifactor": self.ifactor,
                                "dfactor": self.dfactor, "max_num_steps": self.max_num_steps,
                                "min_step": self.min_step, "step_t": vs[1:]}
        if self.max_step is not None:
            opts["max_step"] = self.max_step
        if self.first_step is not None:
            opts["first_step"] = self.first_step
        return opts

    def solve(self, model, x, grid, *, callback=None, progress=None, trajectory=False,
              check_finite=True) -> Solution:
        """Solve from ``grid[0]`` to ``grid[-1]``; ``Solution.times`` holds those two times and
        a trajectory (if asked for) the two states."""
        return self._run(model, x, grid, True, callback, trajectory, check_finite)
