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
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .errors import InputError, SolverDivergedError
from .grid import check_grid
from .model import Denoiser, Model, as_denoiser

__all__ = ["AdaptiveSolver", "Solution", "Solver", "SolverState"]


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


def _all_finite(x: Tensor) -> bool:
    """No NaN or inf in ``x``. One reduction (no boolean tensor the size of ``x``): a NaN or inf
    makes the sum NaN or inf. Only when the sum is not finite is the exact elementwise check
    run, so a finite state whose sum overflows is not mistaken for a diverged one."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return math.isfinite(x.sum(dtype=acc).item()) or bool(torch.isfinite(x).all())


def _check_x(x: Any) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 1:
        raise InputError(
            "x must be a floating-point tensor of shape (batch, ...); got "
            + (f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__)
        )
    if not _all_finite(x):
        n = int((~torch.isfinite(x)).sum())
        raise InputError(f"x holds {n} NaN or infinite value(s); the initial state must be finite")


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
        callback: Callable[[dict[str, Any]], None] | None = None,
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

        ``callback`` gets a dict (``i``, ``t``, ``t_next``, ``x``, ``nfe``, ``state``) after each
        step. ``progress``: a tqdm bar; ``None`` shows it only when stderr is a terminal.
        ``check_finite`` raises :class:`~solverlab.errors.SolverDivergedError` naming the step
        and time as soon as the state holds NaN or inf.
        """
        with torch.enable_grad() if grad else torch.no_grad():
            return self._solve(model, x, grid, callback=callback, progress=progress,
                               trajectory=trajectory, check_finite=check_finite)

    def _solve(self, model: Model | Denoiser, x: Tensor, grid: Tensor | Sequence[float], *,
               callback: Callable[[dict[str, Any]], None] | None, progress: bool | None,
               trajectory: bool, check_finite: bool) -> Solution:
        denoiser = as_denoiser(model)
        grid = check_grid(grid, denoiser.schedule)
        _check_x(x)
        nfe0 = denoiser.nfe
        start = time.perf_counter()
        # The loop owns its state: a step may update ``state.x`` in place (preallocated
        # buffers), so the caller's tensor is copied once and recorded states are copies.
        state = self.init(denoiser, x.clone(), grid)
        states = [x.clone()] if trajectory else None
        show = sys.stderr.isatty() if progress is None else bool(progress)
        with tqdm(total=state.steps, desc=self.name, disable=not show, leave=False) as bar:
            for i in range(state.steps):
                state = self.step(state)
                if check_finite and not _all_finite(state.x):
                    raise SolverDivergedError(
                        f"solver {self.name!r} diverged at step {i + 1} of {state.steps} "
                        f"(t {float(grid[i]):.6g} -> {float(grid[i + 1]):.6g}): the state holds "
                        "NaN or inf; try more steps, a lower order, or check the model at these "
                        "times"
                    )
                if states is not None:
                    states.append(state.x.clone())
                if callback is not None:
                    callback({"i": i, "t": grid[i], "t_next": grid[i + 1], "x": state.x,
                              "nfe": denoiser.nfe - nfe0, "state": state})
                bar.update()
        return Solution(
            x=state.x, nfe=denoiser.nfe - nfe0, times=grid,
            trajectory=None if states is None else torch.stack(states),
            wall_time=time.perf_counter() - start,
        )


@attrs.frozen(kw_only=True)
class AdaptiveSolver(Solver):
    """Marker base of solvers that choose their own steps: they override :meth:`solve` and use
    only the grid's end points (``rtol``/``atol`` instead of a grid)."""

    def step(self, state: SolverState) -> SolverState:
        raise NotImplementedError(f"{type(self).__name__} chooses its own steps; call solve()")
