"""Noise schedules: ``x_t = alpha(t) x_0 + sigma(t) eps``, data at ``t -> 0``.

Every quantity is computed in float64, whatever the input's dtype (docs/mathematics.md#conventions,
diffusers#3056: schedule parameters are precision sensitive). ``lambda_`` is the half log-SNR
``log alpha - log sigma``, strictly decreasing in ``t``; ``t_of_lambda`` is its inverse.

The probability-flow ODE in ``t`` for any schedule is
``dx/dt = dlog_alpha_dt(t) x - sigma(t) dlambda_dt(t) eps(x, t)`` (docs/mathematics.md#pf-ode).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from types import MappingProxyType
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor

from .errors import InputError, OptionError
from .validators import number

__all__ = [
    "EDM", "SCHEDULES", "VE", "Schedule", "VESchedule", "VPCosine", "VPDiscrete", "VPLinear",
    "VPSchedule", "as_f64", "batch_time",
]

F64 = torch.float64


def as_f64(t: Tensor | float) -> Tensor:
    """``t`` as a float64 tensor (on its own device if it already is a tensor)."""
    if isinstance(t, Tensor):
        return t.to(F64)
    return torch.as_tensor(t, dtype=F64)


def _check_range(inst: Schedule) -> None:
    lo = 0.0 if inst.kind == "ve" else None
    if not (math.isfinite(inst.t_min) and math.isfinite(inst.t_max)) or not (
        inst.t_min < inst.t_max
    ) or (lo is None and inst.t_min <= 0) or (lo is not None and inst.t_min < lo):
        low = "0 <= t_min" if lo is not None else "0 < t_min"
        raise OptionError(
            f"{type(inst).__name__} ({inst.name!r}): t_min={inst.t_min!r}, t_max={inst.t_max!r} "
            f"is not a valid time range; it must satisfy {low} < t_max"
        )


#: The largest ``|lambda|`` a schedule may reach inside ``[t_min, t_max]``. Past it ``alpha``
#: (or ``sigma``) is below ``e^-20 ~ 2e-9`` of the other: converting between noise and data
#: predictions multiplies round-off by ``e^|lambda|`` (a float32 state keeps no digit), and the
#: probability-flow ODE in ``lambda`` becomes stiff (``e^-lambda`` in its right-hand side), so
#: reference solves stall. Every schedule solverlab ships stays within ``|lambda| < 7``.
LAMBDA_BOUND = 20.0


def _exp(log_value: float) -> str:
    """``e^log_value`` for a message, also where it overflows."""
    return f"{math.exp(log_value):.3g}" if log_value < 700 else f"e^{log_value:.4g}"


def _check_solvable(inst: Schedule) -> None:
    """Refuse a schedule whose ``alpha`` or ``sigma`` underflows, saturates or leaves
    ``|lambda| <= LAMBDA_BOUND`` inside ``[t_min, t_max]``, naming the end, its value and the
    usable range."""
    t = torch.linspace(inst.t_min, inst.t_max, 257, dtype=F64)
    with torch.no_grad():
        la, ls = inst.log_alpha(t), inst.log_sigma(t)
    lam = la - ls
    bad = ~(torch.isfinite(la) & torch.isfinite(ls) & (torch.exp(la) > 0) & (torch.exp(ls) > 0)
            & (lam.abs() <= LAMBDA_BOUND))
    if not bool(bad.any()):
        if not bool((lam[1:] < lam[:-1]).all()):
            i = int(torch.nonzero(lam[1:] >= lam[:-1])[0])
            raise OptionError(
                f"{type(inst).__name__} ({inst.name!r}): the log-SNR lambda must decrease "
                f"strictly in t, but lambda({float(t[i]):.6g}) = {float(lam[i]):.6g} <= "
                f"lambda({float(t[i + 1]):.6g}) = {float(lam[i + 1]):.6g}; check the "
                "schedule's parameters")
        return
    i = int(torch.nonzero(bad)[-1]) if bool(bad[-1]) else int(torch.nonzero(bad)[0])
    option, value = ("t_max", inst.t_max) if i > 0 else ("t_min", inst.t_min)
    with torch.no_grad():
        lo, hi = (float(inst.t_of_lambda(torch.tensor(b, dtype=F64)))
                  for b in (LAMBDA_BOUND, -LAMBDA_BOUND))
    usable = [max(inst.t_min, lo) if math.isfinite(lo) else inst.t_min,
              min(inst.t_max, hi) if math.isfinite(hi) else inst.t_max]
    hint = ""
    if inst.kind == "vp" and inst.t_max >= 2.0:
        hint = (" Time t is continuous in (0, 1] here; a diffusers timestep index (0..999) is "
                "the schedule 'vp-discrete' with TorchModel(..., time_input='index').")
    raise OptionError(
        f"{type(inst).__name__} ({inst.name!r}): {option}={value!r} is not solvable: at "
        f"t={float(t[i]):.6g} alpha = {_exp(float(la[i]))}, sigma = "
        f"{_exp(float(ls[i]))}, lambda = {float(lam[i]):.4g} (allowed |lambda| <= "
        f"{LAMBDA_BOUND:g}: alpha and sigma representable, their ratio within e^"
        f"{LAMBDA_BOUND:g}); the usable range of t is about [{usable[0]:.6g}, {usable[1]:.6g}]."
        + hint)


@attrs.frozen(kw_only=True)
class Schedule(ABC):
    """A noise schedule on ``t in [t_min, t_max]``.

    Subclasses give ``log_alpha``/``log_sigma`` (or ``alpha``/``sigma``), ``t_of_lambda`` and the
    two derivatives a generic probability-flow drift needs. ``kind`` is ``"vp"``
    (``alpha^2 + sigma^2 = 1``) or ``"ve"`` (``alpha = 1``).
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    t_min: float
    t_max: float

    def __attrs_post_init__(self) -> None:
        _check_range(self)
        _check_solvable(self)

    @abstractmethod
    def log_alpha(self, t: Tensor | float) -> Tensor: ...

    @abstractmethod
    def log_sigma(self, t: Tensor | float) -> Tensor: ...

    @abstractmethod
    def t_of_lambda(self, lam: Tensor | float) -> Tensor:
        """Inverse of :meth:`lambda_`."""

    @abstractmethod
    def dlog_alpha_dt(self, t: Tensor | float) -> Tensor: ...

    @abstractmethod
    def dlambda_dt(self, t: Tensor | float) -> Tensor: ...

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: Tensor | float) -> Tensor:
        return torch.exp(self.log_sigma(t))

    def lambda_(self, t: Tensor | float) -> Tensor:
        """Half log-SNR ``log(alpha/sigma)``."""
        return self.log_alpha(t) - self.log_sigma(t)

    def sigma_ve(self, t: Tensor | float) -> Tensor:
        """``sigma/alpha = exp(-lambda)``: the noise level of ``x/alpha`` (EDM's sigma)."""
        return torch.exp(-self.lambda_(t))

    @property
    def lambda_min(self) -> float:
        return float(self.lambda_(self.t_max))

    @property
    def lambda_max(self) -> float:
        return float(self.lambda_(self.t_min))


@attrs.frozen(kw_only=True)
class VPSchedule(Schedule):
    """Variance preserving: ``sigma = sqrt(1 - alpha^2)``, so
    ``dlambda/dt = dlog_alpha/dt / sigma^2``."""

    kind: ClassVar[str] = "vp"

    def log_sigma(self, t: Tensor | float) -> Tensor:
        return 0.5 * torch.log(-torch.expm1(2.0 * self.log_alpha(t)))

    def dlambda_dt(self, t: Tensor | float) -> Tensor:
        return self.dlog_alpha_dt(t) / torch.exp(2.0 * self.log_sigma(t))

    @staticmethod
    def _log_alpha_of_lambda(lam: Tensor | float) -> Tensor:
        lam = as_f64(lam)
        return -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)


@attrs.frozen(kw_only=True)
class VPLinear(VPSchedule):
    """Continuous VP with linear ``beta(t)`` (Song et al. 2021):
    ``log alpha = -(b1 - b0) t^2/4 - b0 t/2``."""

    name: ClassVar[str] = "vp-linear"
    beta_min: float = attrs.field(default=0.1, validator=number(gt=0))
    beta_max: float = attrs.field(default=20.0, validator=number(gt=0))
    t_min: float = attrs.field(default=1e-3, validator=number())
    t_max: float = attrs.field(default=1.0, validator=number())

    def __attrs_post_init__(self) -> None:
        if self.beta_max < self.beta_min:
            raise OptionError(
                f"VPLinear ('vp-linear'): beta_max={self.beta_max!r} must be >= "
                f"beta_min={self.beta_min!r}"
            )
        super().__attrs_post_init__()

    def log_alpha(self, t: Tensor | float) -> Tensor:
        t = as_f64(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def dlog_alpha_dt(self, t: Tensor | float) -> Tensor:
        t = as_f64(t)
        return -0.5 * t * (self.beta_max - self.beta_min) - 0.5 * self.beta_min

    def t_of_lambda(self, lam: Tensor | float) -> Tensor:
        # -2 log alpha = log(1 + e^{-2 lam}) = (db/2) t^2 + b0 t; the cancellation-free root.
        lam = as_f64(lam)
        rhs = torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)
        db, b0 = self.beta_max - self.beta_min, self.beta_min
        return 2.0 * rhs / (b0 + torch.sqrt(b0**2 + 2.0 * db * rhs))


def _cosine_t_max(inst: VPCosine) -> float:
    return min(1.0, float(inst.t_of_lambda(inst.lambda_clip)))


@attrs.frozen(kw_only=True)
class VPCosine(VPSchedule):
    """Cosine VP (Nichol & Dhariwal 2021): ``alpha = cos(pi/2 (t+s)/(1+s)) / cos(pi/2 s/(1+s))``.

    ``alpha(1) = 0`` makes ``lambda -> -inf``; as in official DPM-Solver, ``t_max`` defaults to the
    time where ``lambda = lambda_clip = -5.1``.
    """

    name: ClassVar[str] = "vp-cosine"
    s: float = attrs.field(default=0.008, validator=number(gt=0))
    lambda_clip: float = attrs.field(default=-5.1, validator=number())
    t_min: float = attrs.field(default=1e-3, validator=number())
    t_max: float = attrs.field(
        default=attrs.Factory(_cosine_t_max, takes_self=True), validator=number(le=1.0)
    )

    def _theta(self, t: Tensor | float) -> Tensor:
        return (as_f64(t) + self.s) / (1.0 + self.s) * (math.pi / 2)

    def log_alpha(self, t: Tensor | float) -> Tensor:
        log_alpha_0 = math.log(math.cos(self.s / (1.0 + self.s) * math.pi / 2))
        return torch.log(torch.cos(self._theta(t))) - log_alpha_0

    def dlog_alpha_dt(self, t: Tensor | float) -> Tensor:
        return -torch.tan(self._theta(t)) * (math.pi / (2.0 * (1.0 + self.s)))

    def t_of_lambda(self, lam: Tensor | float) -> Tensor:
        log_alpha_0 = math.log(math.cos(self.s / (1.0 + self.s) * math.pi / 2))
        la = self._log_alpha_of_lambda(lam) + log_alpha_0
        return 2.0 * (1.0 + self.s) / math.pi * torch.arccos(torch.exp(la)) - self.s


def _table(option: str, value: Any) -> Tensor:
    """A 1-D float64 table from ``value`` (a tensor, array or sequence of numbers)."""
    try:
        table = torch.as_tensor(value, dtype=F64).flatten()
    except (TypeError, ValueError, RuntimeError) as e:
        raise OptionError(f"VPDiscrete ('vp-discrete'): {option} is not a sequence of numbers "
                          f"({e})") from None
    if table.numel() < 2:
        raise OptionError(f"VPDiscrete ('vp-discrete'): {option} holds {table.numel()} "
                          "value(s); a discrete schedule needs at least 2 steps")
    return table


def _check_table(option: str, table: Tensor, allowed: str, ok: Tensor) -> None:
    """Name the first entry of ``table`` where ``ok`` fails (NaN included)."""
    bad = torch.nonzero(~ok)
    if bad.numel():
        i = int(bad[0])
        raise OptionError(f"VPDiscrete ('vp-discrete'): {option}[{i}] = {float(table[i])!r} "
                          f"is not allowed; {allowed}")


def _linear_betas(n: int = 1000) -> Tensor:
    return torch.linspace(1e-4, 0.02, n, dtype=F64)


@attrs.frozen(kw_only=True, eq=False)
class VPDiscrete(VPSchedule):
    """Discrete-time VP (DDPM, ``N`` steps) as a continuous schedule
    (docs/mathematics.md#discrete-time-models).

    Step ``n = 0..N-1`` sits at ``t_n = (n+1)/N`` with ``alpha_{t_n} = sqrt(alphas_cumprod[n])``;
    ``log alpha`` is piecewise linear in ``t`` between these knots (linear extrapolation past the
    ends), so ``t in [1/N, 1]``. The network's time input is the fractional index
    ``N t - 1`` (:meth:`index`), ``= 1000 (t - 1/N)`` for ``N = 1000`` as in official DPM-Solver.
    Give ``betas`` or ``alphas_cumprod``; the default is DDPM's linear ``1e-4..0.02``, ``N = 1000``.
    """

    name: ClassVar[str] = "vp-discrete"
    betas: Tensor | None = attrs.field(default=None)
    alphas_cumprod: Tensor | None = attrs.field(default=None)
    t_min: float = attrs.field(default=None)
    t_max: float = attrs.field(default=1.0, validator=number())
    _log_alpha_table: Tensor = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.betas is not None and self.alphas_cumprod is not None:
            raise OptionError("VPDiscrete ('vp-discrete'): give betas or alphas_cumprod, not both")
        if self.alphas_cumprod is not None:
            what, ac = "alphas_cumprod", _table("alphas_cumprod", self.alphas_cumprod)
        else:
            betas = _linear_betas() if self.betas is None else _table("betas", self.betas)
            _check_table("betas", betas, "each beta must lie in (0, 1)", (betas > 0) & (betas < 1))
            what, ac = "betas", torch.cumprod(1.0 - betas, 0)
        label = "alphas_cumprod" if what == "alphas_cumprod" else "cumprod(1 - betas)"
        _check_table(label, ac, "it must lie inside (0, 1) (a zero terminal SNR, alphas_cumprod "
                     "= 0, has lambda = -inf and cannot be solved to; drop the last step)",
                     (ac > 0) & (ac < 1))
        rising = torch.nonzero(ac[1:] >= ac[:-1])
        if rising.numel():
            i = int(rising[0])
            raise OptionError(
                f"VPDiscrete ('vp-discrete'): {what} must give alphas_cumprod strictly "
                f"decreasing, but {label}[{i + 1}] = {float(ac[i + 1])!r} >= "
                f"{label}[{i}] = {float(ac[i])!r}")
        object.__setattr__(self, "_log_alpha_table", 0.5 * torch.log(ac))
        if self.t_min is None:
            object.__setattr__(self, "t_min", 1.0 / ac.numel())
        number()(self, attrs.fields(VPDiscrete).t_min, self.t_min)
        if self.t_min < 1.0 / ac.numel() - 1e-15 or self.t_max > 1.0 + 1e-15:
            raise OptionError(
                f"VPDiscrete ('vp-discrete'): t_min={self.t_min!r}, t_max={self.t_max!r} must lie "
                f"in [1/N, 1] = [{1.0 / ac.numel()!r}, 1.0]"
            )
        super().__attrs_post_init__()

    # ``eq=False`` above only stops attrs from writing these; the parent's generated ones
    # compare t_min/t_max alone, so two different tables were equal and hashed alike (and
    # per-schedule caches mixed them up). Compare the table itself.
    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return (self.t_min, self.t_max) == (other.t_min, other.t_max) and torch.equal(
            self._log_alpha_table, other._log_alpha_table)

    def __hash__(self) -> int:
        return hash((self.t_min, self.t_max,
                     self._log_alpha_table.detach().cpu().numpy().tobytes()))

    @property
    def num_train_timesteps(self) -> int:
        """``N``, the number of discrete training steps."""
        return self._log_alpha_table.numel()

    def index(self, t: Tensor | float) -> Tensor:
        """The network's (fractional) discrete time index ``N t - 1`` in ``[0, N-1]``."""
        return as_f64(t) * self.num_train_timesteps - 1.0

    def t_of_index(self, n: Tensor | float) -> Tensor:
        """``t_n = (n+1)/N``."""
        return (as_f64(n) + 1.0) / self.num_train_timesteps

    def _segment(self, t: Tensor) -> tuple[Tensor, Tensor]:
        n = self.num_train_timesteps
        table = self._log_alpha_table.to(t.device)
        # nan_to_num: a NaN time (a diverged adaptive solve) gives NaN values, not a bad index.
        idx = torch.clamp(torch.floor(t * n - 1.0).nan_to_num(0.0), 0, n - 2).long()
        slope = (table[idx + 1] - table[idx]) * n
        return idx, slope

    def log_alpha(self, t: Tensor | float) -> Tensor:
        t = as_f64(t)
        idx, slope = self._segment(t)
        knot = (idx + 1).to(F64) / self.num_train_timesteps
        return self._log_alpha_table.to(t.device)[idx] + (t - knot) * slope

    def dlog_alpha_dt(self, t: Tensor | float) -> Tensor:
        return self._segment(as_f64(t))[1]

    def t_of_lambda(self, lam: Tensor | float) -> Tensor:
        # log alpha is piecewise linear in t, so t is piecewise linear in log alpha.
        target = self._log_alpha_of_lambda(lam)
        la = self._log_alpha_table.to(target.device).flip(0)  # increasing
        n = la.numel()
        idx = torch.clamp(torch.searchsorted(la, target.contiguous()) - 1, 0, n - 2)
        t_knots = (torch.arange(n, 0, -1, dtype=F64, device=la.device)) / n  # t of la[k]
        w = (target - la[idx]) / (la[idx + 1] - la[idx])
        return t_knots[idx] + w * (t_knots[idx + 1] - t_knots[idx])


@attrs.frozen(kw_only=True)
class VESchedule(Schedule):
    """Variance exploding: ``alpha = 1``, ``lambda = -log sigma``."""

    kind: ClassVar[str] = "ve"

    def log_alpha(self, t: Tensor | float) -> Tensor:
        return torch.zeros_like(as_f64(t))

    def dlog_alpha_dt(self, t: Tensor | float) -> Tensor:
        return torch.zeros_like(as_f64(t))


@attrs.frozen(kw_only=True)
class VE(VESchedule):
    """VE SDE (Song et al. 2021): ``sigma(t) = sigma_min (sigma_max/sigma_min)^t``, t in [0, 1]."""

    name: ClassVar[str] = "ve"
    sigma_min: float = attrs.field(default=0.01, validator=number(gt=0))
    sigma_max: float = attrs.field(default=50.0, validator=number(gt=0))
    t_min: float = attrs.field(default=0.0, validator=number())
    t_max: float = attrs.field(default=1.0, validator=number())

    def __attrs_post_init__(self) -> None:
        if self.sigma_max <= self.sigma_min:
            raise OptionError(
                f"VE ('ve'): sigma_max={self.sigma_max!r} must be > sigma_min={self.sigma_min!r}"
            )
        super().__attrs_post_init__()

    @property
    def _log_ratio(self) -> float:
        return math.log(self.sigma_max / self.sigma_min)

    def log_sigma(self, t: Tensor | float) -> Tensor:
        return math.log(self.sigma_min) + as_f64(t) * self._log_ratio

    def dlambda_dt(self, t: Tensor | float) -> Tensor:
        return torch.full_like(as_f64(t), -self._log_ratio)

    def t_of_lambda(self, lam: Tensor | float) -> Tensor:
        return (-as_f64(lam) - math.log(self.sigma_min)) / self._log_ratio


@attrs.frozen(kw_only=True)
class EDM(VESchedule):
    """EDM (Karras et al. 2022): time is the noise level, ``sigma(t) = t``, ``alpha = 1``."""

    name: ClassVar[str] = "edm"
    t_min: float = attrs.field(default=0.002, validator=number(gt=0))
    t_max: float = attrs.field(default=80.0, validator=number(gt=0))

    def log_sigma(self, t: Tensor | float) -> Tensor:
        return torch.log(as_f64(t))

    def dlambda_dt(self, t: Tensor | float) -> Tensor:
        return -1.0 / as_f64(t)

    def t_of_lambda(self, lam: Tensor | float) -> Tensor:
        return torch.exp(-as_f64(lam))


#: The core's schedules by name: what plugin ``solverlab`` registers, and the names a model
#: accepts without a registry lookup. Plugins add more through the registry.
SCHEDULES = MappingProxyType({c.name: c for c in (VPLinear, VPCosine, VPDiscrete, VE, EDM)})


def batch_time(x: Tensor, t: Tensor | float, what: str = "time t") -> Tensor:
    """``t`` (a scalar or one time per sample) as a float64 tensor of shape ``(batch,)`` on the
    device of ``x``; any other shape raises :class:`~solverlab.errors.InputError`."""
    if not (isinstance(t, Tensor) and t.dtype == torch.float64 and t.device == x.device):
        t = as_f64(t).to(x.device)
    elif t.shape == x.shape[:1]:
        return t  # a solver's per-sample times (the common case): no work
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise InputError(
            f"{what} of shape {tuple(t.shape)} does not fit x of shape {tuple(x.shape)}; "
            f"give a scalar or a tensor of shape ({x.shape[0]},)"
        )
    return t
