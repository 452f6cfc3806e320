"""torchdiffeq methods as solverlab solvers (``torchdiffeq-<method>``).

Adaptive methods (error control with ``rtol``/``atol``) are :class:`~solverlab.AdaptiveSolver`
subclasses: they use only the grid's end points. Fixed-grid methods take the grid (mapped to
the integration variable) and return the state at every grid point.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor
from torchdiffeq import odeint

from solverlab import PFODE, AdaptiveSolver, Denoiser, Solution, SolveLoop, Solver
from solverlab.errors import OptionError, SolverDivergedError
from solverlab.ode import VARIABLES
from solverlab.validators import boolean, number, one_of

__all__ = ["TorchdiffeqAdaptive", "TorchdiffeqError", "TorchdiffeqFixed"]

F64 = torch.float64
#: What torchdiffeq's Adams-Moulton corrector warns when its functional iteration has not
#: converged after ``max_iters`` iterations (it then goes on with the unconverged value).
_NOT_CONVERGED = "Functional iteration did not converge"


class TorchdiffeqError(SolverDivergedError):
    """torchdiffeq gave up (``underflow in dt``, ``max_num_steps exceeded``), its Adams-Moulton
    corrector did not converge, or it returned non-finite values; the message says what to
    change."""


def _advice(solver: Solver) -> str:
    tips = []
    if isinstance(solver, TorchdiffeqAdaptive):
        tips.append(f"loosen rtol (now {solver.rtol:g}) / atol (now {solver.atol:g})")
    tips.append(f"change variable (now {solver.variable!r}; 'sigma' and 'lambda' are smooth "
                "for every schedule)")
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


class _RHS:
    """``f(v, y)`` for ``odeint``: the ODE's right-hand side through the denoiser, at the grid's
    own times where ``v`` is a grid value (not the round trip ``t(v(t))``). ``at_node(j, y)``
    (fixed grids) is called when grid point ``j >= 1`` is reached, through torchdiffeq's
    ``callback_step`` hook (called before each step, with the state the step starts from)."""

    def __init__(self, ode: PFODE, denoiser: Denoiser, vs: Tensor, times: Tensor,
                 at_node: Callable[[int, Tensor], None] | None = None) -> None:
        self.ode, self.denoiser, self.at_node = ode, denoiser, at_node
        self.times = {float(v): t for v, t in zip(vs.cpu(), times.cpu())}
        self.steps_started = 0
        if at_node is not None:
            self.callback_step = self._callback_step

    def __call__(self, v: Tensor, y: Tensor) -> Tensor:
        t = self.times.get(float(v))
        return self.ode.rhs(self.denoiser, y, self.ode.t_of_v(v) if t is None else t)

    def _callback_step(self, v0: Tensor, y0: Tensor, dv: Tensor) -> None:
        if self.steps_started and self.at_node is not None:
            self.at_node(self.steps_started, y0)
        self.steps_started += 1


@attrs.frozen(kw_only=True)
class _Torchdiffeq(Solver):
    """Options shared by every ``torchdiffeq-*`` solver:

    - ``variable``: ``"sigma"`` (default; the Adams methods: ``"lambda"``, see there; EDM's
      ``sigma/alpha`` on ``x/alpha``, where
      ``d(x/alpha)/d(sigma/alpha) = eps``), ``"lambda"``, ``"log_sigma"`` or ``"t"``
      (:class:`solverlab.PFODE`). ``"sigma"`` and ``"lambda"`` give the same smooth ODE for
      every schedule; ``"t"`` is only as smooth as the schedule is in ``t``;
    - ``per_sample``: solve each sample alone, with its own step sizes (torchdiffeq#122: one
      ``odeint`` call shares its steps across the batch, so one hard sample sets the steps of
      all). NFE then counts every per-sample call.
    """

    method: ClassVar[str]
    variable: str = attrs.field(default="sigma", validator=one_of(*VARIABLES))
    per_sample: bool = attrs.field(default=False, validator=boolean)

    @property
    def needs_smooth_schedule(self) -> bool:
        return self.variable == "t"

    def _options(self, vs: Tensor) -> dict[str, Any]:
        return {}

    def _kwargs(self) -> dict[str, Any]:
        return {}

    def _odeint(self, rhs: _RHS, y0: Tensor, vs: Tensor, loop: SolveLoop) -> Tensor:
        try:
            with warnings.catch_warnings():
                # Never go on with an unconverged corrector (issue: the warning was ignored).
                warnings.filterwarnings("error", message=_NOT_CONVERGED)
                return odeint(rhs, y0, vs, method=self.method, options=self._options(vs),
                              **self._kwargs())
        except AssertionError as e:  # torchdiffeq reports failures by assert
            raise TorchdiffeqError(
                f"solver {self.name!r} failed: torchdiffeq says {e!s}; " + _advice(self)
            ) from e
        except UserWarning as e:
            if _NOT_CONVERGED not in str(e):
                raise
            i, grid = max(rhs.steps_started - 1, 0), loop.grid
            raise TorchdiffeqError(
                f"solver {self.name!r}: the Adams-Moulton corrector did not converge at step "
                f"{i + 1} of {loop.steps} (t {float(grid[i]):.6g} -> {float(grid[i + 1]):.6g})"
                f" within max_iters={getattr(self, 'max_iters', '?')} functional iterations to "
                f"rtol={getattr(self, 'rtol', '?')}, atol={getattr(self, 'atol', '?')}; raise "
                "max_iters, loosen rtol/atol, or take more steps (the iteration contracts only "
                "when the step is small against the drift's rate of change)"
            ) from e


@attrs.frozen(kw_only=True)
class TorchdiffeqFixed(_Torchdiffeq):
    """A fixed-grid torchdiffeq method: one ``odeint`` call over the whole grid (mapped to
    ``variable``), so multistep methods keep their history. Each grid step is reported to the
    callback and the progress bar as it is reached (torchdiffeq's ``callback_step`` hook).
    ``step`` is not used."""

    nfe_per_step: ClassVar[int | None] = None

    def step(self, state):
        raise NotImplementedError(f"{type(self).__name__} runs torchdiffeq over the whole grid; "
                                  "call solve()")

    def expected_nfe(self, steps: int) -> int | None:
        if self.nfe_per_step is None:
            return None
        return self.nfe_per_step * steps

    def solve(self, model, x, grid, *, callback=None, progress=None, trajectory=False,
              check_finite=True, grad=False) -> Solution:
        """Solve on ``grid`` (all of its points); see :meth:`solverlab.Solver.solve`. With
        ``per_sample`` the samples are solved one after another and the steps are reported
        during the last sample's solve."""
        with SolveLoop(self, model, x, grid, callback=callback, progress=progress,
                       trajectory=trajectory, check_finite=check_finite, grad=grad,
                       error=TorchdiffeqError, advice=_advice(self)) as loop:
            den = loop.denoiser
            ode = PFODE(schedule=den.schedule, variable=self.variable)
            times = loop.grid.to(x.device)
            vs = ode.v_of_t(times)
            parts = x.split(1) if self.per_sample else (x,)
            end: dict[str, Tensor] = {}
            done: list[Tensor] = []  # earlier parts: states at every grid point
            denoised: list[list[Tensor]] = []  # earlier parts: data predictions per step
            for k, part in enumerate(parts):
                last = k == len(parts) - 1
                seen: list[Tensor] = []

                def at_node(j: int, y: Tensor, last=last, seen=seen) -> None:
                    if not last:
                        if callback is not None:
                            seen.append(den.last_denoised)
                        return
                    xj = ode.to_x(y, times[j])
                    dj = den.last_denoised
                    if done:
                        xj = torch.cat([*(s[j] for s in done), xj])
                        if dj is not None:
                            dj = torch.cat([*(d[j - 1] for d in denoised), dj])
                    loop.step(j - 1, xj, denoised=dj)
                    end["x"] = xj

                rhs = _RHS(ode, den, vs, times, at_node)
                y = self._odeint(rhs, ode.to_y(part, times[0]), vs, loop)
                at_node(times.numel() - 1, y[-1])
                if not last:
                    done.append(ode.to_x(y, times))
                    denoised.append(seen)
        return loop.solution(end["x"])

@attrs.frozen(kw_only=True)
class TorchdiffeqAdaptive(_Torchdiffeq, AdaptiveSolver):
    """An adaptive torchdiffeq method (embedded Runge-Kutta pair with error control) from the
    grid's first to its last point; the grid's inner points are ignored.

    Options (torchdiffeq's, validated here): ``rtol`` (default 1e-5), ``atol`` (default 1e-5),
    on the integrated state; ``first_step``,
    ``min_step``, ``max_step`` (units of the variable; ``None``: no limit), ``safety`` (0.9),
    ``ifactor`` (10), ``dfactor`` (0.2), ``max_num_steps`` (default 100000; torchdiffeq's own
    default, 2**31 - 1, lets an unreachable tolerance run for days). Refused when a solve
    starts: ``rtol`` below 4 eps of the state's dtype, ``min_step`` larger than the interval,
    ``max_step`` needing more than ``max_num_steps`` steps. A step always lands on the end
    point (torchdiffeq ``step_t``): otherwise torchdiffeq steps past it and returns its
    dense-output interpolant, whose error can exceed ``rtol`` (:mod:`solverlab.reference`).

    ``underflow in dt`` and ``max_num_steps exceeded`` become :class:`TorchdiffeqError` (a
    :class:`~solverlab.SolverDivergedError`) with advice. Tolerances apply to the integrated
    state: ``x/alpha`` for ``variable="sigma"`` or ``"lambda"``.
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
    max_num_steps: int = attrs.field(default=100_000,
                                     validator=number(integer=True, ge=1, le=2**31 - 1))

    def _check_reachable(self, vs: Tensor, dtype: torch.dtype) -> None:
        """Refuse what cannot finish: ``rtol`` below the state's resolution, ``min_step``
        larger than the interval, ``max_step`` that needs more than ``max_num_steps`` steps."""
        eps = torch.finfo(dtype).eps
        if self.rtol < 4 * eps:
            raise OptionError(
                f"{self._label()}: option rtol={self.rtol!r} is below the resolution of a {dtype} "
                f"state (4 eps = {4 * eps:.3g}); use rtol >= {4 * eps:.3g}"
                + ("" if dtype == torch.float64 else " or a float64 state"))
        span = float((vs[-1] - vs[0]).abs())
        if self.min_step > span:
            raise OptionError(
                f"{self._label()}: option min_step={self.min_step!r} is larger than the whole "
                f"interval ({span:.6g} in {self.variable!r}); use min_step < {span:.6g}")
        if self.max_step is not None and span / self.max_step > self.max_num_steps:
            raise OptionError(
                f"{self._label()}: option max_step={self.max_step!r} needs at least "
                f"{math.ceil(span / self.max_step)} steps over {span:.6g} in {self.variable!r}, "
                f"more than max_num_steps={self.max_num_steps}; raise max_step or max_num_steps")

    def _label(self) -> str:
        return f"{type(self).__name__} ({self.name!r})"

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
              check_finite=True, grad=False) -> Solution:
        """Solve from ``grid[0]`` to ``grid[-1]``; ``Solution.times`` holds those two times and
        a trajectory (if asked for) the two states. The callback is called once, at the end
        (``i = 0``, ``t = grid[0]``, ``t_next = grid[-1]``)."""
        with SolveLoop(self, model, x, grid, callback=callback, progress=progress, steps=1,
                       check_finite=check_finite, grad=grad, error=TorchdiffeqError,
                       advice=_advice(self)) as loop:
            den = loop.denoiser
            ode = PFODE(schedule=den.schedule, variable=self.variable)
            times = loop.grid[[0, -1]].to(x.device)
            vs = ode.v_of_t(times)
            self._check_reachable(vs, x.dtype)
            ends, denoised = [], []
            for part in x.split(1) if self.per_sample else (x,):
                y = self._odeint(_RHS(ode, den, vs, times), ode.to_y(part, times[0]), vs,
                                 loop)
                ends.append(ode.to_x(y[-1], times[-1]))
                denoised.append(den.last_denoised)
            x_end = torch.cat(ends)
            loop.step(0, x_end, t=times[0], t_next=times[-1],
                      denoised=None if callback is None else torch.cat(denoised))
        return loop.solution(x_end, times=times,
                             trajectory=torch.stack([x, x_end]) if trajectory else None)
