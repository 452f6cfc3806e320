"""Initial-value problems of the probability-flow ODE with a trusted answer.

A :class:`Problem` is an analytic model (exact network output), a float64 start state ``x`` at
``t_start`` and an end time ``t_end``; :meth:`Problem.reference` is the high-accuracy solution
(:func:`solverlab.reference.reference_solution`: exact for Gaussian data, otherwise a float64
``dopri8`` solve in ``lambda`` with ``rtol = atol =`` :data:`REFERENCE_TOL`), computed once per
problem.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import attrs
import torch
from torch import Tensor

from ..analytic import AnalyticModel, GaussianMixtureData
from ..errors import OptionError
from ..grid import check_grid
from ..model import Model
from ..parameterization import Parameterization
from ..reference import reference_solution
from ..registry import get_parameterization, get_schedule
from ..schedule import Schedule

__all__ = ["NON_SMOOTH_SCHEDULES", "REFERENCE_TOL", "Problem", "lambda_range", "make_problem"]

F64 = torch.float64

#: rtol = atol of the reference solves. At 1e-12 dopri8 is accurate to ~4e-14 relative on the
#: mixtures of the kit (measured against 1e-14), at about the cost of 1e-10 (the solve in
#: lambda is smooth), so that errors down to ~1e-11 still measure the solver, not the reference.
REFERENCE_TOL = 1e-12

#: Schedules whose coefficients are not smooth in ``t``: ``vp-discrete`` interpolates ``log
#: alpha`` piecewise linearly, so the drift in ``t`` jumps at its 1000 knots and methods that
#: step in ``t`` fall to order ~1 once steps span knots. Solvers that step in ``lambda`` or
#: ``sigma/alpha`` see the same smooth ODE as on any schedule. Order tests use these schedules
#: only for solvers without :attr:`solverlab.Solver.needs_smooth_schedule`.
NON_SMOOTH_SCHEDULES: tuple[str, ...] = ("vp-discrete",)

# Candidate start states drawn per kept one when selecting well-conditioned samples.
_POOL = 4
# Finite-difference size of the conditioning probe, relative to the state's scale. Large
# against the reference's accuracy, small against the flow's curvature.
_PROBE = 1e-5


def _state(x: Any) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 1:
        raise OptionError(f"Problem: x must be a floating-point tensor (batch, ...); got {x!r}")
    return x.detach().to(F64)


def _model_repr(model: Model) -> str:
    return (f"<{type(model).__name__} schedule={model.schedule.name!r} "
            f"parameterization={model.parameterization.name!r}>")


@attrs.frozen(kw_only=True, eq=False)
class Problem:
    """Solve the PF-ODE of ``model`` from ``x`` (float64, shape ``(batch, ...)``) at ``t_start``
    down to ``t_end``. ``label`` says how the problem was made (it is what a failing test
    prints). The reference solution is cached on the problem: do not modify ``x`` in place."""

    model: Model = attrs.field(repr=_model_repr)
    x: Tensor = attrs.field(converter=_state, repr=lambda x: f"<float64 {tuple(x.shape)}>")
    t_start: float = attrs.field(converter=float)
    t_end: float = attrs.field(converter=float)
    label: str = ""
    _cache: dict[str, Tensor] = attrs.field(factory=dict, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.model, Model):
            raise OptionError(f"Problem: model={self.model!r} is not a solverlab.Model")
        check_grid([self.t_start, self.t_end], self.model.schedule)

    def reference(self) -> Tensor:
        """The reference solution at ``t_end`` (float64, shaped like ``x``)."""
        if "reference" not in self._cache:
            self._cache["reference"] = reference_solution(
                self.model, self.x, self.t_start, self.t_end, rtol=REFERENCE_TOL,
                atol=REFERENCE_TOL)
        return self._cache["reference"]

    @property
    def scale(self) -> float:
        """Size of the answer: the largest per-sample L2 norm of :meth:`reference`."""
        return float(self.reference().reshape(self.x.shape[0], -1).norm(dim=1).max())

    def __str__(self) -> str:
        return self.label or repr(self)


def make_problem(
    schedule: Schedule | str = "vp-linear",
    *,
    dim: int = 3,
    components: int = 2,
    batch: int = 4,
    seed: int = 0,
    var_min: float = 0.1,
    var_max: float = 1.0,
    mean_scale: float = 2.0,
    diagonal: bool = False,
    parameterization: Parameterization | str = "noise",
    t_start: float | None = None,
    t_end: float | None = None,
    well_conditioned: bool = True,
) -> Problem:
    """A Gaussian-mixture problem: data ``GaussianMixtureData.random(dim, components, seed=seed,
    var_min=..., var_max=..., mean_scale=..., diagonal=...)``, ``batch`` start states drawn from
    the exact marginal at ``t_start`` (default ``schedule.t_max``; ``t_end`` defaults to
    ``t_min``).

    ``well_conditioned`` (mixtures only): draw ``4 batch`` candidates and keep the ``batch``
    whose end state is least sensitive to the start state (finite-difference probe through the
    reference solve). A sample that ends near the boundary between two modes has its errors
    amplified by orders of magnitude, which pushes the asymptotic range of every solver beyond
    affordable step counts; the order it would show is the same. The kept states are therefore
    drawn from the marginal conditioned on being well conditioned.

    Problems are cached on their arguments (building one costs a reference solve).
    """
    return _make_problem(
        schedule, dim=dim, components=components, batch=batch, seed=seed, var_min=var_min,
        var_max=var_max, mean_scale=mean_scale, diagonal=diagonal,
        parameterization=parameterization, t_start=t_start, t_end=t_end,
        well_conditioned=well_conditioned,
    )


@functools.lru_cache(maxsize=256)
def _make_problem(schedule, *, dim, components, batch, seed, var_min, var_max, mean_scale,
                  diagonal, parameterization, t_start, t_end, well_conditioned) -> Problem:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise OptionError(f"make_problem: batch={batch!r} must be an integer >= 1")
    # the kit takes any registered name, a plugin's included
    sched = get_schedule(schedule) if isinstance(schedule, str) else schedule
    data = GaussianMixtureData.random(dim, components, seed=seed, var_min=var_min,
                                      var_max=var_max, mean_scale=mean_scale, diagonal=diagonal)
    model = AnalyticModel(data=data, schedule=sched,
                          parameterization=(get_parameterization(parameterization)
                                            if isinstance(parameterization, str)
                                            else parameterization))
    t0 = sched.t_max if t_start is None else float(t_start)
    t1 = sched.t_min if t_end is None else float(t_end)
    gen = torch.Generator().manual_seed(seed)
    label = (f"{sched.name} dim={dim} components={components} seed={seed} "
             f"var=[{var_min:.3g}, {var_max:.3g}] mean_scale={mean_scale:.3g}"
             f"{' diagonal' if diagonal else ''} {model.parameterization.name} "
             f"t={t0:.6g}->{t1:.6g} batch={batch}")
    if not well_conditioned or components == 1:
        # A single Gaussian's flow is affine: every start state is equally well conditioned.
        return Problem(model=model, x=model.sample_prior(batch, t=t0, generator=gen),
                       t_start=t0, t_end=t1, label=label)
    pool = model.sample_prior(_POOL * batch, t=t0, generator=gen)
    u = torch.randn(pool.shape, generator=gen, dtype=F64)
    delta = _PROBE * max(1.0, float(pool.norm(dim=1).max()))
    u = delta * u / u.norm(dim=1, keepdim=True)
    both = reference_solution(model, torch.cat([pool, pool + u]), t0, t1, rtol=REFERENCE_TOL,
                              atol=REFERENCE_TOL)
    ref, probe = both[: pool.shape[0]], both[pool.shape[0]:]
    gain = (probe - ref).norm(dim=1) / delta
    keep = torch.sort(torch.argsort(gain)[:batch]).values
    problem = Problem(model=model, x=pool[keep], t_start=t0, t_end=t1,
                      label=f"{label} (gain <= {float(gain[keep].max()):.3g})")
    problem._cache["reference"] = ref[keep]
    return problem


def lambda_range(schedule: Schedule, lo: float, hi: float) -> tuple[float, float]:
    """``(t_start, t_end)`` spanning the fractions ``lo < hi`` of the schedule's ``lambda``
    range (``0``: ``t_max``, ``1``: ``t_min``), pinned inside ``[t_min, t_max]``."""
    if not 0.0 <= lo < hi <= 1.0:
        raise OptionError(f"lambda_range: need 0 <= lo < hi <= 1; got lo={lo!r}, hi={hi!r}")
    lmin, lmax = schedule.lambda_min, schedule.lambda_max

    def t_at(f: float) -> float:
        if f == 0.0:
            return schedule.t_max
        if f == 1.0:
            return schedule.t_min
        t = float(schedule.t_of_lambda(torch.tensor(lmin + f * (lmax - lmin), dtype=F64)))
        return min(max(t, schedule.t_min), schedule.t_max)

    t0, t1 = t_at(lo), t_at(hi)
    if not (math.isfinite(t0) and math.isfinite(t1) and t0 > t1):
        raise OptionError(f"lambda_range: fractions {lo!r}, {hi!r} of {schedule.name!r} give "
                          f"t_start={t0!r}, t_end={t1!r}; widen the range")
    return t0, t1
