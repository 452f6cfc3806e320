"""Time grids: ``grid(schedule, steps, t_start=None, t_end=None)`` returns ``steps + 1``
strictly decreasing float64 times from ``t_start`` (default ``schedule.t_max``) to ``t_end``
(default ``schedule.t_min``).

- ``time-uniform``, ``time-quadratic``, ``logsnr``: official DPM-Solver's ``skip_type``s
  (uniform in ``t``, in ``sqrt(t)``, in ``lambda``);
- ``karras``: uniform in ``sigma^(1/rho)`` with ``sigma = exp(-lambda)`` (EDM eq. 5, ``rho = 7``);
- ``linspace``, ``leading``, ``trailing``: diffusers' ``timestep_spacing`` on the integer steps
  ``n`` of a ``vp-discrete`` schedule, at ``t = (n+1)/N``, ending at step 0 (diffusers'
  ``final_sigmas_type="sigma_min"``);
- ``custom``: the user's own times.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import attrs
import numpy as np
import torch
from torch import Tensor

from .errors import GridError, OptionError
from .schedule import F64, Schedule, as_f64
from .validators import number

__all__ = [
    "Custom",
    "Grid",
    "Karras",
    "Leading",
    "Linspace",
    "LogSNR",
    "TimeQuadratic",
    "TimeUniform",
    "Trailing",
    "check_grid",
]

_RTOL = 1e-12


def check_grid(times: Tensor | Sequence[float], schedule: Schedule | None = None) -> Tensor:
    """``times`` as a 1-D float64 tensor after checking that it is a valid grid: at least two
    finite, strictly decreasing times inside ``[schedule.t_min, schedule.t_max]``."""
    try:
        g = as_f64(times if isinstance(times, Tensor) else torch.as_tensor(list(times), dtype=F64))
    except (TypeError, ValueError) as e:
        raise GridError(f"grid {times!r} is not a sequence of numbers ({e})") from None
    gd = g.detach()  # the checks read values; a grid that requires grad keeps its graph
    if g.ndim != 1 or g.numel() < 2:
        raise GridError(
            f"a grid needs a 1-D sequence of at least 2 times (1 step); got shape {tuple(g.shape)}"
        )
    if not bool(torch.isfinite(gd).all()):
        bad = int(torch.nonzero(~torch.isfinite(gd))[0])
        raise GridError(f"grid time {bad} is {float(gd[bad])!r}; every time must be finite")
    d = gd[1:] - gd[:-1]
    if not bool((d < 0).all()):
        i = int(torch.nonzero(d >= 0)[0])
        kind = "duplicate" if float(d[i]) == 0 else "increasing"
        raise GridError(
            f"grid times must be strictly decreasing (noise to data); times {i} and {i + 1} are "
            f"{kind}: {float(gd[i])!r}, {float(gd[i + 1])!r}"
        )
    if schedule is not None:
        lo, hi = schedule.t_min, schedule.t_max
        tol = _RTOL * max(abs(lo), abs(hi), 1.0)
        if float(gd[0]) > hi + tol or float(gd[-1]) < lo - tol:
            raise GridError(
                f"grid [{float(gd[0])!r} .. {float(gd[-1])!r}] leaves the range of schedule "
                f"{schedule.name!r}, [t_min, t_max] = [{lo!r}, {hi!r}]"
            )
    return g


@attrs.frozen(kw_only=True)
class Grid(ABC):
    """A time-grid rule; subclasses implement :meth:`times` with validated inputs."""

    name: ClassVar[str]

    def __call__(
        self, schedule: Schedule, steps: int, t_start: float | None = None,
        t_end: float | None = None,
    ) -> Tensor:
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise GridError(f"grid {self.name!r}: steps={steps!r} must be an integer >= 1")
        t_start = schedule.t_max if t_start is None else float(t_start)
        t_end = schedule.t_min if t_end is None else float(t_end)
        if not t_start > t_end:
            raise GridError(
                f"grid {self.name!r}: t_start={t_start!r} must be greater than t_end={t_end!r} "
                "(solvers run from noise to data)"
            )
        times = self.times(schedule, int(steps), t_start, t_end)
        return check_grid(times, schedule)

    @abstractmethod
    def times(self, schedule: Schedule, steps: int, t_start: float, t_end: float) -> Tensor: ...


def _pin_ends(g: Tensor, t_start: float, t_end: float) -> Tensor:
    # An inverse map t(lambda) may round the end points out of the schedule's range.
    g[0], g[-1] = t_start, t_end
    return g


@attrs.frozen(kw_only=True)
class TimeUniform(Grid):
    name: ClassVar[str] = "time-uniform"

    def times(self, schedule, steps, t_start, t_end):
        return torch.linspace(t_start, t_end, steps + 1, dtype=F64)


@attrs.frozen(kw_only=True)
class TimeQuadratic(Grid):
    """Uniform in ``sqrt(t)`` (DPM-Solver's ``time_quadratic``); needs ``t >= 0``."""

    name: ClassVar[str] = "time-quadratic"

    def times(self, schedule, steps, t_start, t_end):
        if t_end < 0:
            raise GridError(f"grid 'time-quadratic' needs t_end >= 0; got {t_end!r}")
        r = torch.linspace(t_start**0.5, t_end**0.5, steps + 1, dtype=F64)
        return _pin_ends(r**2, t_start, t_end)


@attrs.frozen(kw_only=True)
class LogSNR(Grid):
    """Uniform in the half log-SNR ``lambda`` (DPM-Solver's ``logSNR``)."""

    name: ClassVar[str] = "logsnr"

    def times(self, schedule, steps, t_start, t_end):
        lam = torch.linspace(float(schedule.lambda_(t_start)), float(schedule.lambda_(t_end)),
                             steps + 1, dtype=F64)
        return _pin_ends(schedule.t_of_lambda(lam), t_start, t_end)


@attrs.frozen(kw_only=True)
class Karras(Grid):
    """EDM eq. 5: ``sigma_i = (smax^(1/rho) + i/steps (smin^(1/rho) - smax^(1/rho)))^rho``, with
    ``sigma = exp(-lambda)``; no final ``sigma = 0`` is appended (solve to ``t_end``)."""

    name: ClassVar[str] = "karras"
    rho: float = attrs.field(default=7.0, validator=number(gt=0))

    def times(self, schedule, steps, t_start, t_end):
        # sigma_i = smax (1 + i/steps ((smin/smax)^(1/rho) - 1))^rho: the same points, with no
        # power of sigma that overflows for small rho; in log sigma.
        lmax, lmin = -float(schedule.lambda_(t_start)), -float(schedule.lambda_(t_end))
        ratio = torch.exp(torch.tensor((lmin - lmax) / self.rho, dtype=F64))
        frac = torch.linspace(0.0, 1.0, steps + 1, dtype=F64)
        log_s = lmax + self.rho * torch.log1p(frac * (ratio - 1.0))
        return _pin_ends(schedule.t_of_lambda(-log_s), t_start, t_end)


@attrs.frozen(kw_only=True)
class _Discrete(Grid):
    """diffusers-style spacing of integer steps ``n``; ``t = (n+1)/N``."""

    def __call__(self, schedule, steps, t_start=None, t_end=None):
        if t_start is not None or t_end is not None:
            raise OptionError(
                f"grid {self.name!r} places diffusers' integer timesteps and takes no "
                "t_start/t_end; use 'time-uniform' or 'custom' for a partial range"
            )
        if not hasattr(schedule, "num_train_timesteps"):
            raise OptionError(
                f"grid {self.name!r} needs a discrete schedule ('vp-discrete'); "
                f"{schedule.name!r} has no integer timesteps"
            )
        return super().__call__(schedule, steps)

    def times(self, schedule, steps, t_start, t_end):
        big_n = schedule.num_train_timesteps
        n = self.steps_of(big_n, steps)
        outside = np.nonzero((n < 0) | (n > big_n - 1))[0]
        if outside.size:
            i = int(outside[0])
            raise GridError(
                f"grid {self.name!r}: steps={steps} on a schedule of N={big_n} training steps "
                f"places timestep {i} at index {int(n[i])}, outside 0..{big_n - 1}; use fewer "
                "steps or a smaller offset")
        repeated = np.nonzero(np.diff(n) >= 0)[0]
        if repeated.size:
            i = int(repeated[0])
            raise GridError(
                f"grid {self.name!r}: steps={steps} on a schedule of N={big_n} training steps "
                f"repeats the integer timestep {int(n[i + 1])} (timesteps {i} and {i + 1}); "
                f"this spacing fits at most {self._max_steps(big_n)} steps on N={big_n}")
        return schedule.t_of_index(torch.as_tensor(np.ascontiguousarray(n), dtype=F64))

    def _max_steps(self, big_n: int) -> int:
        """The most steps this spacing places on ``big_n`` distinct integer timesteps."""
        for steps in range(big_n - 1, 0, -1):
            n = self.steps_of(big_n, steps)
            if ((n >= 0) & (n <= big_n - 1)).all() and (np.diff(n) < 0).all():
                return steps
        return 0

    @abstractmethod
    def steps_of(self, n_train: int, steps: int) -> np.ndarray: ...


@attrs.frozen(kw_only=True)
class Linspace(_Discrete):
    """``round(linspace(0, N-1, steps+1))``, reversed."""

    name: ClassVar[str] = "linspace"

    def steps_of(self, n_train, steps):
        return np.linspace(0, n_train - 1, steps + 1).round()[::-1]


@attrs.frozen(kw_only=True)
class Leading(_Discrete):
    """``k (N // (steps+1)) + offset`` for ``k = steps..1``, then step 0 (diffusers ``leading``
    with ``steps_offset = offset``)."""

    name: ClassVar[str] = "leading"
    offset: int = attrs.field(default=0, validator=number(ge=0, integer=True))

    def steps_of(self, n_train, steps):
        ratio = n_train // (steps + 1)
        n = np.arange(steps, 0, -1) * ratio + self.offset
        return np.concatenate([n, [0]]).astype(np.float64)


@attrs.frozen(kw_only=True)
class Trailing(_Discrete):
    """``round(arange(N, 0, -N/steps)) - 1``, then step 0 (diffusers ``trailing``)."""

    name: ClassVar[str] = "trailing"

    def steps_of(self, n_train, steps):
        n = np.arange(n_train, 0, -n_train / steps).round()[:steps] - 1
        return np.concatenate([n, [0]]).astype(np.float64)


def _times_tuple(v: Sequence[float] | Tensor) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in (v.flatten().tolist() if isinstance(v, Tensor) else v))
    except (TypeError, ValueError) as e:
        raise GridError(f"grid 'custom': times={v!r} is not a sequence of numbers ({e})") from None


@attrs.frozen(kw_only=True)
class Custom(Grid):
    """The user's own times (validated: strictly decreasing, inside the schedule's range)."""

    name: ClassVar[str] = "custom"
    times_: tuple[float, ...] = attrs.field(alias="times", converter=_times_tuple)

    def __attrs_post_init__(self) -> None:
        check_grid(self.times_)

    def __call__(self, schedule, steps=None, t_start=None, t_end=None):
        if steps is not None and steps != len(self.times_) - 1:
            raise GridError(
                f"grid 'custom' holds {len(self.times_) - 1} steps; steps={steps!r} was asked for"
            )
        if t_start is not None or t_end is not None:
            raise OptionError("grid 'custom' takes no t_start/t_end: its times are given")
        return check_grid(self.times_, schedule)

    def times(self, schedule, steps, t_start, t_end):  # pragma: no cover - __call__ overrides
        return torch.tensor(self.times_, dtype=F64)
