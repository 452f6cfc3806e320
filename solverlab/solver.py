"""The solver contract and the one sampling loop.

A :class:`Solver` is an immutable bundle of options with a declared global ``order``; it
implements ``init`` (build a :class:`SolverState`) and ``step`` (advance one grid interval).
:meth:`Solver.solve` is the only sampling loop: progress bar, per-step callback, trajectory
recording and finite-value checks live here once (diffrax's ``diffeqsolve`` pattern).
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor

from .errors import InputError, SolverDivergedError
from .grid import check_grid
from .model import Denoiser, Model, as_denoiser

with warnings.catch_warnings():
    # In a Jupyter kernel without ipywidgets tqdm.auto falls back to its text bar, which is
    # what we want there, and warns at import ("IProgress not found"): not the user's concern.
    warnings.filterwarnings("ignore", message="IProgress not found")
    from tqdm.auto import tqdm

__all__ = [
    "AdaptiveSolver", "Solution", "SolveLoop", "Solver", "SolverState", "StepInfo", "all_finite",
    "check_state",
]


@attrs.frozen(kw_only=True)
class SolverState:
    """Everything a step needs: ``x`` at ``grid[index]``, the multistep ``history`` (solver
    defined, oldest first) and ``cache`` (solver-defined data precomputed once per grid).

    Inside :meth:`Solver.solve` the state's tensors belong to the loop: a step may update them
    in place and return ``state.advance(x)`` with the same tensor."""

    denoiser: Denoiser
    grid: Tensor
    x: Tensor
    index: int = 0
    history: tuple[Any, ...] = ()
    cache: Any = None

    @property
    def steps(self) -> int:
        return self.grid.numel() - 1

    @property
    def t(self) -> Tensor:
        """Current time (0-d float64)."""
        return self.grid[self.index]

    @property
    def t_next(self) -> Tensor:
        """Time at the end of this step (0-d float64)."""
        return self.grid[self.index + 1]

    def advance(self, x: Tensor, **changes: Any) -> SolverState:
        """The state one grid point later, at ``x``."""
        # Not attrs.evolve: its per-field introspection costs more than a step's arithmetic.
        kept = {"denoiser": self.denoiser, "grid": self.grid, "history": self.history,
                "cache": self.cache}
        return SolverState(x=x, index=self.index + 1, **{**kept, **changes})


@attrs.frozen(kw_only=True)
class Solution:
    """Result of a solve: final ``x``, exact ``nfe``, the visited ``times``, the optional
    ``trajectory`` (``len(times)`` states stacked on dim 0) and ``wall_time`` in seconds."""

    x: Tensor
    nfe: int
    times: Tensor
    trajectory: Tensor | None = None
    wall_time: float = 0.0


def all_finite(x: Tensor) -> bool:
    """No NaN or inf in ``x``. One reduction (no boolean tensor the size of ``x``): a NaN or inf
    makes the sum NaN or inf. Only when the sum is not finite is the exact elementwise check
    run, so a finite state whose sum overflows is not mistaken for a diverged one."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return math.isfinite(x.sum(dtype=acc).item()) or bool(torch.isfinite(x).all())


def check_state(x: Any) -> None:
    """Raise :class:`~solverlab.errors.InputError` unless ``x`` is a finite floating-point
    tensor of shape ``(batch, ...)`` with ``batch >= 1`` on a CPU or CUDA device: the input
    check of every solve."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 1:
        raise InputError(
            "x must be a floating-point tensor of shape (batch, ...); got "
            + (f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__)
        )
    if x.device.type not in ("cpu", "cuda"):
        raise InputError(
            f"x is on device {str(x.device)!r}; solverlab solves on 'cpu' or 'cuda' tensors "
            "(a 'meta' tensor holds no values to solve)")
    if x.shape[0] == 0:
        raise InputError(
            f"x of shape {tuple(x.shape)} holds an empty batch; give at least one sample")
    if not all_finite(x):
        n = int((~torch.isfinite(x)).sum())
        raise InputError(f"x holds {n} NaN or infinite value(s); the initial state must be finite")


_STEP_KEYS = ("i", "t", "t_next", "sigma", "sigma_hat", "x", "denoised", "nfe", "state")


@attrs.frozen(kw_only=True, eq=False)
class StepInfo(Mapping[str, Any]):
    """What a solve's ``callback`` gets after each step: attributes, and the same as a read-only
    mapping (``info["x"]``), so callbacks written for k-diffusion's samplers work unchanged.

    - ``i``: the step (0-based; an adaptive solver's attempt);
    - ``t``, ``t_next``: times at the step's start and end (float64; 0-d, or ``(batch,)`` for a
      solver with per-sample times). ``x`` is at ``t_next`` (a rejected adaptive attempt has
      ``t_next == t``);
    - ``sigma``: ``sigma/alpha`` at ``t``, the noise level of ``x/alpha`` (k-diffusion's
      ``sigma``: the level the step starts from). ``sigma_hat`` is the same value (k-diffusion's
      level after churn; these solvers add no noise);
    - ``x``: the state after the step, at ``t_next`` (k-diffusion passes the state the step
      starts from; solverlab's callbacks see each state the trajectory records). It belongs to
      the solve: copy it to keep it;
    - ``denoised``: the data prediction ``x_0`` of the step's last model evaluation, taken when
      it was made (thresholded if the denoiser thresholds); preview tools show this;
    - ``nfe``: network evaluations of this solve so far;
    - ``state``: the :class:`SolverState` after the step (``None`` for solvers without one);
    - ``extra``: solver-specific entries, also reachable as keys (``dpm-adaptive``:
      ``accepted``, ``error``, ``h``).
    """

    i: int
    t: Tensor
    t_next: Tensor
    sigma: Tensor
    x: Tensor
    denoised: Tensor | None
    nfe: int
    state: SolverState | None = None
    extra: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def sigma_hat(self) -> Tensor:
        """k-diffusion's ``sigma_hat``: equal to :attr:`sigma` (no churn)."""
        return self.sigma

    def __getitem__(self, key: str) -> Any:
        if key in _STEP_KEYS:
            return getattr(self, key)
        return self.extra[key]

    def __iter__(self) -> Iterator[str]:
        yield from _STEP_KEYS
        yield from (k for k in self.extra if k not in _STEP_KEYS)

    def __len__(self) -> int:
        return len(_STEP_KEYS) + sum(k not in _STEP_KEYS for k in self.extra)


def _at(t: Tensor) -> str:
    return f"{float(t):.6g}" if t.numel() == 1 else f"{float(t.min()):.6g}..{float(t.max()):.6g}"


class SolveLoop:
    """The bookkeeping of one solve, shared by every solver family (:meth:`Solver.solve`, the
    torchdiffeq and adaptive plugins): input checks, progress bar, finite checks, callbacks,
    trajectory and :class:`Solution`. A solver that overrides ``solve`` writes::

        with SolveLoop(self, model, x, grid, callback=callback, progress=progress,
                       trajectory=trajectory, check_finite=check_finite) as loop:
            ...                          # loop.denoiser, loop.grid: checked inputs
            loop.step(i, x_i)            # after each step, as it happens
        return loop.solution(x_end)

    The constructor checks ``x`` (:func:`check_state`) and the grid
    (:func:`~solverlab.grid.check_grid`) and wraps a model in a :class:`Denoiser`. Inside the
    ``with`` block the denoiser remembers each evaluation's data prediction only if there is a
    callback (:attr:`StepInfo.denoised`). ``steps`` is the progress bar's total (default: the
    grid's steps; ``None`` for an adaptive solve). ``error``/``advice``: the
    :class:`~solverlab.SolverDivergedError` subclass raised when a state turns non-finite and
    the advice its message ends with. ``grad``: inside the block autograd records (``True``,
    for differentiable solves: solvers then update out of place) or not (``False``, the
    default: no graph, in-place updates are safe with any network).
    """

    def __init__(self, solver: Solver, model: Model | Denoiser, x: Any,
                 grid: Tensor | Sequence[float], *, callback: Callable[[StepInfo], None] | None
                 = None, progress: bool | None = None, trajectory: bool = False,
                 check_finite: bool = True, grad: bool = False,
                 steps: int | str | None = "grid",
                 error: type[SolverDivergedError] = SolverDivergedError,
                 advice: str = "try more steps, a lower order, or check the model at these times",
                 ) -> None:
        self.solver = solver
        self.denoiser = as_denoiser(model)
        self.grid = check_grid(grid, self.denoiser.schedule)
        check_state(x)
        self._autograd = torch.enable_grad() if grad else torch.no_grad()
        self.callback, self.check_finite = callback, check_finite
        self.error, self.advice = error, advice
        self.steps = self.grid.numel() - 1 if steps == "grid" else steps
        self.states = [x.clone()] if trajectory else None
        self.show = sys.stderr.isatty() if progress is None else bool(progress)
        self.nfe0 = self.denoiser.nfe
        self.start = time.perf_counter()
        self._bar: Any = None
        self._tracking = False

    @property
    def nfe(self) -> int:
        """Network evaluations of this solve so far."""
        return self.denoiser.nfe - self.nfe0

    def __enter__(self) -> SolveLoop:
        self._autograd.__enter__()
        self._bar = tqdm(total=self.steps, desc=self.solver.name, disable=not self.show,
                         leave=False)
        d = self.denoiser
        self._tracking = d.track_denoised
        d.track_denoised = self._tracking or self.callback is not None
        return self

    def __exit__(self, *exc: Any) -> None:
        self._autograd.__exit__(*exc)
        self._bar.close()
        self.denoiser.track_denoised = self._tracking
        if not self._tracking:
            self.denoiser.last_denoised = None

    def step(self, i: int, x: Tensor, *, t: Tensor | None = None, t_next: Tensor | None = None,
             state: SolverState | None = None, denoised: Tensor | None = None,
             **extra: Any) -> None:
        """Step ``i`` ended at ``x``: check it is finite (else raise ``error`` naming the step
        and time), record it, call the callback with a :class:`StepInfo` and advance the bar.
        ``t``/``t_next`` default to ``grid[i]``/``grid[i + 1]``; ``denoised`` to the
        denoiser's last evaluation; ``extra`` goes to :attr:`StepInfo.extra`."""
        t = self.grid[i] if t is None else t
        t_next = self.grid[i + 1] if t_next is None else t_next
        if self.check_finite and not all_finite(x):
            of = "" if self.steps is None else f" of {self.steps}"
            raise self.error(
                f"solver {self.solver.name!r} diverged at step {i + 1}{of} (t {_at(t)} -> "
                f"{_at(t_next)}): the state holds NaN or inf; {self.advice}")
        if self.states is not None:
            self.states.append(x.clone())
        if self.callback is not None:
            self.callback(StepInfo(
                i=i, t=t, t_next=t_next, sigma=self.denoiser.schedule.sigma_ve(t), x=x,
                denoised=self.denoiser.last_denoised if denoised is None else denoised,
                nfe=self.nfe, state=state, extra=extra))
        self._bar.update()

    def solution(self, x: Tensor, *, times: Tensor | None = None,
                 trajectory: Tensor | None = None) -> Solution:
        """The :class:`Solution` at ``x``: ``times`` default to the grid, ``trajectory`` to the
        states recorded by :meth:`step` (with ``trajectory=True``)."""
        if trajectory is None and self.states is not None:
            trajectory = torch.stack(self.states)
        return Solution(x=x, nfe=self.nfe, times=self.grid if times is None else times,
                        trajectory=trajectory, wall_time=time.perf_counter() - self.start)


@attrs.frozen(kw_only=True)
class Solver(ABC):
    """A fixed-grid solver of the probability-flow ODE.

    Subclasses declare ``name`` and ``order`` (the global order of convergence the conformance
    kit checks: an int class attribute, or an attrs option ``order`` with an int default for
    families such as ``unipc``, see :attr:`convergence_order`) and implement :meth:`step` (and
    :meth:`init` if they precompute or keep history). Options are attrs fields with validators.
    """

    name: ClassVar[str]
    order: ClassVar[int]

    @property
    def convergence_order(self) -> int:
        """The global order of convergence these options give (what the conformance kit checks).

        ``order`` by default; a solver whose order depends on its options (``unipc`` with its
        corrector, say) overrides this."""
        return self.order

    @property
    def needs_smooth_schedule(self) -> bool:
        """Whether :attr:`convergence_order` holds only on schedules smooth in ``t``.

        ``False`` by default: the solver steps in ``lambda`` or ``sigma/alpha``, in which the
        probability-flow ODE is as smooth as the data for every schedule, so its order holds
        on ``vp-discrete`` (``log alpha`` piecewise linear in ``t``) too, and the conformance
        kit checks it there. A solver that steps in ``t`` itself (or places its evaluations by
        ``t``) returns ``True``: across the kinks its order falls towards 1, and the kit leaves
        ``vp-discrete`` out of its order checks."""
        return False

    def init(self, denoiser: Denoiser, x: Tensor, grid: Tensor) -> SolverState:
        """The state at ``grid[0]``; override to precompute per-grid coefficients."""
        return SolverState(denoiser=denoiser, grid=grid, x=x)

    @abstractmethod
    def step(self, state: SolverState) -> SolverState:
        """Advance ``state`` from ``grid[index]`` to ``grid[index + 1]``."""

    def expected_nfe(self, steps: int) -> int | None:
        """Network evaluations a solve of ``steps`` steps takes, if known in advance."""
        return None

    def solve(
        self,
        model: Model | Denoiser,
        x: Tensor,
        grid: Tensor | Sequence[float],
        *,
        callback: Callable[[StepInfo], None] | None = None,
        progress: bool | None = None,
        trajectory: bool = False,
        check_finite: bool = True,
        grad: bool = False,
    ) -> Solution:
        """Solve from ``grid[0]`` to ``grid[-1]`` starting at ``x``.

        ``grad``: ``False`` (default) runs without building an autograd graph, as k-diffusion's
        samplers do, so solvers may update their buffers in place whatever the model (an
        ``nn.Module`` whose parameters require grad included). ``True`` records the graph and
        solvers take their out-of-place path: the result is differentiable with respect to
        ``x``, the grid times (a float64 ``grid`` that requires grad) and the model's
        parameters.

        ``callback`` gets a :class:`StepInfo` after each step. ``progress``: a tqdm bar;
        ``None`` shows it only when stderr is a terminal. ``check_finite`` raises
        :class:`~solverlab.errors.SolverDivergedError` naming the step and time as soon as the
        state holds NaN or inf.
        """
        with SolveLoop(self, model, x, grid, callback=callback, progress=progress,
                       trajectory=trajectory, check_finite=check_finite, grad=grad) as loop:
            # The loop owns its state: a step may update ``state.x`` in place (preallocated
            # buffers), so the caller's tensor is copied once and recorded states are copies.
            state = self.init(loop.denoiser, x.clone(), loop.grid)
            for i in range(state.steps):
                state = self.step(state)
                loop.step(i, state.x, state=state)
        return loop.solution(state.x)


@attrs.frozen(kw_only=True)
class AdaptiveSolver(Solver):
    """Marker base of solvers that choose their own steps: they override :meth:`solve` and use
    only the grid's end points (``rtol``/``atol`` instead of a grid)."""

    def step(self, state: SolverState) -> SolverState:
        raise NotImplementedError(f"{type(self).__name__} chooses its own steps; call solve()")
