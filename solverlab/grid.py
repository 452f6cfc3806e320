"""Time grids: ``grid(schedule, steps, t_start=None, t_end=None)`` returns ``steps + 1``
strictly decreasing float64 times from ``t_start`` (default ``schedule.t_max``) to ``t_end``
(default ``schedule.t_min``).

- ``time-uniform``, ``time-quadratic``, ``logsnr``: official DPM-Solver's ``skip_type``s
  (uniform in ``t``, in ``sqrt(t)``, in ``lambda``);
- ``karras``: uniform in ``sigma^(1/rho)`` with ``sigma = exp(-lambda)`` (EDM eq. 5, ``rho = 7``);
- ``exponential``, ``lu-lambdas``, ``beta``: diffusers' ``use_exponential_sigmas``,
  ``use_lu_lambdas`` and ``use_beta_sigmas``; ``polyexponential``, ``vp``: k-diffusion's
  ``get_sigmas_polyexponential`` and ``get_sigmas_vp`` (:class:`SigmaGrid`: the points are
  noise levels ``sigma = sigma_t/alpha_t`` between ``sigma_max`` and ``sigma_min``, mapped to
  times through the schedule; docs/mathematics.md#time-grids);
- ``linspace``, ``leading``, ``trailing``: diffusers' ``timestep_spacing`` on the integer steps
  ``n`` of a ``vp-discrete`` schedule, at ``t = (n+1)/N``, ending at step 0 (diffusers'
  ``final_sigmas_type="sigma_min"``);
- ``custom``: the user's own times.
"""

from __future__ import annotations

import math
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
    "VP",
    "Beta",
    "Custom",
    "Exponential",
    "Grid",
    "Karras",
    "Leading",
    "Linspace",
    "LogSNR",
    "LuLambdas",
    "PolyExponential",
    "SigmaGrid",
    "TimeQuadratic",
    "TimeUniform",
    "Trailing",
    "beta_cdf",
    "beta_quantile",
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


# -- grids of noise levels -------------------------------------------------------------------
def _sigma_range(schedule: Schedule) -> tuple[float, float]:
    """``(sigma_min, sigma_max)`` of ``schedule``, ``sigma = sigma_t/alpha_t = exp(-lambda)``."""
    return math.exp(-schedule.lambda_max), math.exp(-schedule.lambda_min)


def _time_of_sigma(grid: Grid, schedule: Schedule, option: str, sigma: float) -> float:
    """The time at which ``schedule`` has the noise level ``sigma``; a level outside the
    schedule's range (beyond round-off) is a :class:`GridError` naming the option."""
    lam = -math.log(sigma)
    lo, hi = schedule.lambda_min, schedule.lambda_max
    if not lo - 1e-12 * max(1.0, abs(lo)) <= lam <= hi + 1e-12 * max(1.0, abs(hi)):
        smin, smax = _sigma_range(schedule)
        raise GridError(
            f"grid {grid.name!r}: {option}={sigma!r} is outside the noise levels of schedule "
            f"{schedule.name!r}: sigma = sigma_t/alpha_t in [{smin:.6g}, {smax:.6g}] (t in "
            f"[{schedule.t_min!r}, {schedule.t_max!r}]); give a level inside it or leave "
            f"{option} out")
    if lam <= lo:  # the ends (to round-off) are the schedule's own
        return schedule.t_max
    if lam >= hi:
        return schedule.t_min
    t = float(schedule.t_of_lambda(torch.tensor(lam, dtype=F64)))
    return min(max(t, schedule.t_min), schedule.t_max)


@attrs.frozen(kw_only=True)
class SigmaGrid(Grid):
    """A grid defined by its noise levels ``sigma = sigma_t/alpha_t = exp(-lambda)`` (the VE
    ``sigma`` of diffusers and k-diffusion; ``sigma_t`` itself on a VE schedule): subclasses
    give :meth:`sigmas`, ``steps + 1`` decreasing levels from ``sigma_max`` to
    ``sigma_min``, which are mapped to times by ``t(lambda = -log sigma)``.

    ``sigma_max``/``sigma_min`` (options, default ``None``): the end levels, as the
    ``sigma_max``/``sigma_min`` of diffusers' and k-diffusion's grid functions; by default
    the levels at ``t_start``/``t_end`` (the schedule's range). A level outside the schedule's
    range is a :class:`~solverlab.errors.GridError`; giving both ``sigma_max`` and
    ``t_start`` (or ``sigma_min`` and ``t_end``) is one too. No final ``sigma = 0`` is appended
    (peers append one): solve to ``t_end`` and use a solver's ``final_step="denoise_to_zero"``
    for that step. A peer's ``n`` levels are ``steps = n - 1`` here."""

    sigma_min: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(number(gt=0)))
    sigma_max: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(number(gt=0)))

    def __attrs_post_init__(self) -> None:
        if (self.sigma_min is not None and self.sigma_max is not None
                and not self.sigma_max > self.sigma_min):
            raise OptionError(
                f"grid {self.name!r}: sigma_max={self.sigma_max!r} must be greater than "
                f"sigma_min={self.sigma_min!r} (solvers run from noise to data)")

    def __call__(self, schedule, steps, t_start=None, t_end=None):
        for option, level, t, t_name in (("sigma_max", self.sigma_max, t_start, "t_start"),
                                         ("sigma_min", self.sigma_min, t_end, "t_end")):
            if level is not None and t is not None:
                raise GridError(
                    f"grid {self.name!r}: {option}={level!r} and {t_name}={t!r} both fix the "
                    f"same end of the grid; give one")
        if self.sigma_max is not None:
            t_start = _time_of_sigma(self, schedule, "sigma_max", self.sigma_max)
        if self.sigma_min is not None:
            t_end = _time_of_sigma(self, schedule, "sigma_min", self.sigma_min)
        return super().__call__(schedule, steps, t_start, t_end)

    def times(self, schedule, steps, t_start, t_end):
        smax = self.sigma_max if self.sigma_max is not None else float(
            schedule.sigma_ve(t_start))
        smin = self.sigma_min if self.sigma_min is not None else float(schedule.sigma_ve(t_end))
        levels = self.sigmas(steps, smax, smin)
        levels[0], levels[-1] = smax, smin
        flat = torch.nonzero(~(levels[1:] < levels[:-1]))
        if flat.numel():
            i = int(flat[0])
            raise GridError(
                f"grid {self!r} gives noise levels {i} and {i + 1} of {steps} steps equal in "
                f"float64 ({float(levels[i])!r}, {float(levels[i + 1])!r}); these options "
                "cannot place that many steps, use fewer or milder options")
        return _pin_ends(schedule.t_of_lambda(-torch.log(levels)), t_start, t_end)

    @abstractmethod
    def sigmas(self, steps: int, sigma_max: float, sigma_min: float) -> Tensor:
        """``steps + 1`` float64 noise levels from ``sigma_max`` down to ``sigma_min``."""


@attrs.frozen(kw_only=True)
class Exponential(SigmaGrid):
    """``sigma_i = exp(log smax + i/steps (log smin - log smax))``: log-uniform levels
    (diffusers ``use_exponential_sigmas``, ``_convert_to_exponential``; k-diffusion
    ``get_sigmas_exponential``). On the schedule's own range it is ``logsnr`` (uniform in
    ``lambda = -log sigma``)."""

    name: ClassVar[str] = "exponential"

    def sigmas(self, steps, sigma_max, sigma_min):
        return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps + 1,
                                        dtype=F64))


@attrs.frozen(kw_only=True)
class LuLambdas(Exponential):
    """diffusers' ``use_lu_lambdas`` (Lu et al. 2022, DPM-Solver's logSNR steps): its
    ``_convert_to_lu`` spaces ``log sigma`` (which it calls lambdas) uniformly between the
    table's ends, the same levels as ``exponential``, and the same times as ``logsnr``. In
    diffusers the two differ only in the integer timesteps at which the model is called
    (rounded for ``use_lu_lambdas``, truncated for ``use_exponential_sigmas``) while the update
    uses the unrounded levels; here the model is called at the grid's own times."""

    name: ClassVar[str] = "lu-lambdas"


@attrs.frozen(kw_only=True)
class PolyExponential(SigmaGrid):
    """``sigma_i = exp(r_i^rho (log smax - log smin) + log smin)``, ``r_i = 1 - i/steps``
    (k-diffusion ``get_sigmas_polyexponential(n, sigma_min, sigma_max, rho=1.0)``): a
    polynomial in ``log sigma``; ``rho = 1`` is ``exponential``, ``rho > 1`` puts more steps at
    low noise."""

    name: ClassVar[str] = "polyexponential"
    rho: float = attrs.field(default=1.0, validator=number(gt=0))

    def sigmas(self, steps, sigma_max, sigma_min):
        ramp = torch.linspace(1.0, 0.0, steps + 1, dtype=F64) ** self.rho
        lo, hi = math.log(sigma_min), math.log(sigma_max)
        return torch.exp(ramp * (hi - lo) + lo)


@attrs.frozen(kw_only=True)
class VP(SigmaGrid):
    """Uniform in the time ``tau`` of a continuous VP schedule with linear ``beta``
    (k-diffusion ``get_sigmas_vp(n, beta_d=19.9, beta_min=0.1, eps_s=1e-3)``):
    ``sigma(tau) = sqrt(exp(beta_d tau^2/2 + beta_min tau) - 1)`` with ``tau`` uniform between
    ``tau(sigma_max)`` and ``tau(sigma_min)``, where ``tau(sigma) = 2 L/(beta_min +
    sqrt(beta_min^2 + 2 beta_d L))``, ``L = log(1 + sigma^2)``.

    k-diffusion's own levels (``tau`` from 1 to ``eps_s``) are ``sigma_max =
    VP().sigma_of(1.0)``, ``sigma_min = VP().sigma_of(eps_s)``, which are the ends of
    solverlab's default ``vp-linear`` schedule (``beta`` 0.1..20, ``t`` in ``[1e-3, 1]``): there
    ``vp`` with default options is ``get_sigmas_vp`` exactly (and the same times as
    ``time-uniform``)."""

    name: ClassVar[str] = "vp"
    beta_d: float = attrs.field(default=19.9, validator=number(ge=0))
    beta_min: float = attrs.field(default=0.1, validator=number(ge=0))

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.beta_d == 0 and self.beta_min == 0:
            raise OptionError(f"grid {self.name!r}: beta_d=0 and beta_min=0 give no noise; "
                              "at least one must be > 0")

    def sigma_of(self, tau: Tensor | float) -> Tensor:
        """``sigma(tau) = sqrt(expm1(beta_d tau^2/2 + beta_min tau))`` (float64)."""
        tau = torch.as_tensor(tau, dtype=F64)
        return torch.sqrt(torch.expm1(0.5 * self.beta_d * tau**2 + self.beta_min * tau))

    def tau_of(self, sigma: Tensor | float) -> Tensor:
        """The inverse of :meth:`sigma_of` (float64, no cancellation)."""
        big_l = torch.log1p(torch.as_tensor(sigma, dtype=F64) ** 2)
        return 2 * big_l / (self.beta_min + torch.sqrt(self.beta_min**2
                                                       + 2 * self.beta_d * big_l))

    def sigmas(self, steps, sigma_max, sigma_min):
        tau = torch.linspace(float(self.tau_of(sigma_max)), float(self.tau_of(sigma_min)),
                             steps + 1, dtype=F64)
        return self.sigma_of(tau)


def beta_cdf(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b)`` (the CDF of ``Beta(a, b)``), by
    its continued fraction (Abramowitz & Stegun 26.5.8) evaluated with the modified Lentz
    method, in float64; the expansion is used where it converges fast, ``x < (a+1)/(a+b+2)``,
    and ``I_x(a, b) = 1 - I_{1-x}(b, a)`` elsewhere."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _beta_fraction(1.0 - x, b, a)
    return _beta_fraction(x, a, b)


def _beta_fraction(x: float, a: float, b: float) -> float:
    """``I_x(a, b)`` from the continued fraction."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x)
                 + b * math.log1p(-x))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 1000):
        # even term d_{2m}, then odd term d_{2m+1} (A&S 26.5.8)
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 3e-16:
            break
    return math.exp(log_front) * f / a


def beta_quantile(q: float, a: float, b: float) -> float:
    """The quantile (inverse CDF, ``scipy.stats.beta.ppf``) of ``Beta(a, b)`` at ``q``:
    Newton's method on :func:`beta_cdf` kept inside a shrinking bracket (bisection when a
    Newton step leaves it), to float64 round-off."""
    if not 0.0 <= q <= 1.0:
        raise OptionError(f"beta_quantile: q={q!r} must be in [0, 1]")
    if q in (0.0, 1.0):
        return q
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    lo, hi, x = 0.0, 1.0, 0.5
    for _ in range(400):
        err = beta_cdf(x, a, b) - q
        if err == 0.0:
            return x
        if err > 0:
            hi = x
        else:
            lo = x
        log_pdf = log_norm + (a - 1.0) * math.log(x) + (b - 1.0) * math.log1p(-x)
        new = x - err / math.exp(log_pdf) if -700.0 < log_pdf < 700.0 else math.nan
        if not lo < new < hi:  # (nan too) a Newton step out of the bracket: bisect
            new = 0.5 * (lo + hi)
            if hi - lo <= 4e-16 * hi:
                return new
        elif abs(new - x) <= 4e-16 * x:
            return new
        x = new
    return x


@attrs.frozen(kw_only=True)
class Beta(SigmaGrid):
    """``sigma_i = smin + F^-1(1 - i/steps) (smax - smin)`` with ``F`` the CDF of
    ``Beta(alpha, beta)`` (diffusers ``use_beta_sigmas``, ``_convert_to_beta``; "Beta Sampling
    is All You Need", Lee et al. 2024): linear in ``sigma``, dense at both ends for
    ``alpha, beta < 1``; both in ``[0.01, 100]``. The quantile is computed without scipy
    (:func:`beta_quantile`)."""

    name: ClassVar[str] = "beta"
    alpha: float = attrs.field(default=0.6, validator=number(ge=0.01, le=100))
    beta: float = attrs.field(default=0.6, validator=number(ge=0.01, le=100))

    def sigmas(self, steps, sigma_max, sigma_min):
        q = [beta_quantile(1.0 - i / steps, self.alpha, self.beta) for i in range(steps + 1)]
        return sigma_min + torch.tensor(q, dtype=F64) * (sigma_max - sigma_min)


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
