"""Analytic data distributions with exact denoisers: Gaussian and Gaussian mixture.

For data ``x0 ~ N(mu, Sigma)`` and ``x_t = alpha x0 + sigma eps`` the marginal is
``N(alpha mu, alpha^2 Sigma + sigma^2 I)``; with ``Sigma = U diag(lam) U^T``,
``c = U^T (x - alpha mu)`` and ``v = alpha^2 lam + sigma^2`` (docs/mathematics.md#gaussian-data)::

    E[x0 | x_t = x]  = mu + U (alpha lam c / v)
    E[eps | x_t = x] = U (sigma c / v)
    grad log p_t(x)  = -U (c / v)

A mixture weights its components' predictions by the posterior responsibilities
``softmax_i[log pi_i + log N(x; alpha mu_i, alpha^2 Sigma_i + sigma^2 I)]``, taken with a
log-sum-exp. The probability-flow ODE of a Gaussian is solved exactly on ``x~ = x/alpha`` at
noise level ``s = sigma/alpha = exp(-lambda)``: each ``u_k^T (x~ - mu)`` is multiplied by
``sqrt((s_t^2 + lam_k)/(s_s^2 + lam_k))`` (Wang & Vastola 2024, arXiv 2412.09726, on
``x~``; docs/mathematics.md#gaussian-data). Everything is float64;
eigendecompositions are computed once, at construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor

from .errors import InputError, OptionError
from .model import Model, _parameterization, _schedule, batch_time
from .parameterization import Parameterization
from .schedule import Schedule, as_f64
from .validators import boolean, number

__all__ = [
    "MIXTURE_DEFAULTS", "REGISTERED_MODELS", "AnalyticModel", "GaussianData",
    "GaussianMixtureData", "GaussianMixtureModel", "GaussianModel",
]

F64 = torch.float64
_LOG_2PI = math.log(2.0 * math.pi)
# Covariances are refused beyond this condition number: their denoisers lose all precision.
_MAX_CONDITION = 1e12


def _f64(owner: str, option: str) -> Callable[[Any], Tensor]:
    def convert(value: Any) -> Tensor:
        try:
            return torch.as_tensor(value, dtype=F64).detach()
        except (TypeError, ValueError, RuntimeError) as e:
            raise OptionError(
                f"{owner}: option {option}={value!r} is not allowed; it must be a tensor of real "
                "numbers"
            ) from e

    return convert


def _optional_f64(owner: str, option: str) -> Callable[[Any], Tensor | None]:
    convert = _f64(owner, option)
    return lambda value: None if value is None else convert(value)


def _fail(owner: str, option: str, value: Any, allowed: str) -> OptionError:
    if isinstance(value, Tensor):
        value = repr(value.tolist()) if value.numel() <= 9 else (
            f"<tensor of shape {tuple(value.shape)}>")
    else:
        value = repr(value)
    return OptionError(f"{owner}: option {option}={value} is not allowed; {allowed}")


def _check_finite(owner: str, option: str, value: Tensor) -> None:
    if not bool(torch.isfinite(value).all()):
        raise _fail(owner, option, value, "every entry must be finite")


def _check_int(owner: str, option: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(owner, option, value, f"it must be an integer >= {low}")


def _spd_eig(owner: str, option: str, cov: Tensor, diagonal: bool) -> tuple[Tensor, Tensor | None]:
    """Eigenvalues ``(..., d)`` and eigenvectors ``(..., d, d)`` (``None`` when diagonal) of an
    SPD covariance; a non-symmetric, singular or indefinite one raises :class:`OptionError`."""
    _check_finite(owner, option, cov)
    if diagonal:
        evals, evecs = cov, None
    else:
        scale = float(cov.abs().amax()) if cov.numel() else 0.0
        if float((cov - cov.mT).abs().amax()) > 1e-10 * scale:
            raise _fail(owner, option, cov, "a covariance must be symmetric")
        evals, evecs = torch.linalg.eigh(0.5 * (cov + cov.mT))
    lo, hi = evals.amin(-1), evals.amax(-1)
    if not bool(((lo > 0) & (lo * _MAX_CONDITION > hi)).all()):
        raise _fail(
            owner, option, cov,
            f"a covariance must be symmetric positive definite (condition number below "
            f"{_MAX_CONDITION:g}); its eigenvalues range over [{float(lo.min()):.3g}, "
            f"{float(hi.max()):.3g}]",
        )
    return evals, evecs


def _state(x: Tensor, dim: int) -> Tensor:
    x = as_f64(x)
    if x.ndim != 2 or x.shape[1] != dim:
        raise InputError(f"x of shape {tuple(x.shape)} is not allowed; it must be (batch, {dim})")
    return x


def _coef(value: Tensor | float, x: Tensor) -> Tensor:
    """A scalar or a ``(batch,)`` coefficient as a float64 column ``(batch | 1, 1)``."""
    value = as_f64(value).to(x.device)
    if value.ndim > 1 or (value.ndim == 1 and value.shape[0] not in (1, x.shape[0])):
        raise InputError(
            f"coefficient of shape {tuple(value.shape)} does not fit x of shape "
            f"{tuple(x.shape)}; give a float or a tensor of shape ({x.shape[0]},)"
        )
    return value.reshape(-1, 1)


def _softmax(logits: Tensor) -> Tensor:
    # Not torch.softmax: on CPU it takes milliseconds on small float64 inputs (torch 2.13).
    return torch.exp(logits - torch.logsumexp(logits, dim=-1, keepdim=True))


def _count(owner: str, n: Any) -> int:
    _check_int(owner, "n", n, 0)
    return n


@attrs.frozen(kw_only=True, eq=False)
class GaussianData:
    """Data ``x0 ~ N(mean, cov)``: exact denoiser, noise prediction, score, log density and
    probability-flow map (Wang & Vastola 2024); ``cov``: ``(d, d)`` (full), ``(d,)`` (diagonal)."""

    mean: Tensor = attrs.field(converter=_f64("GaussianData", "mean"))
    cov: Tensor = attrs.field(converter=_f64("GaussianData", "cov"))
    _evals: Tensor = attrs.field(init=False, repr=False)
    _evecs: Tensor | None = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        owner = "GaussianData"
        if self.mean.ndim != 1 or self.mean.shape[0] == 0:
            raise _fail(owner, "mean", self.mean, "it must be a non-empty vector of shape (d,)")
        _check_finite(owner, "mean", self.mean)
        d = self.mean.shape[0]
        if tuple(self.cov.shape) not in ((d,), (d, d)):
            raise _fail(owner, "cov", self.cov,
                        f"it must have shape ({d}, {d}) (full) or ({d},) (diagonal) to fit mean")
        evals, evecs = _spd_eig(owner, "cov", self.cov, self.cov.ndim == 1)
        object.__setattr__(self, "_evals", evals)
        object.__setattr__(self, "_evecs", evecs)

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    @property
    def eigenvalues(self) -> Tensor:
        """Eigenvalues of ``cov`` (ascending unless ``cov`` is diagonal)."""
        return self._evals

    @property
    def eigenvectors(self) -> Tensor:
        """Orthonormal eigenvectors of ``cov`` as columns (the identity for a diagonal ``cov``)."""
        if self._evecs is None:
            return torch.eye(self.dim, dtype=F64)
        return self._evecs

    def _rotate(self, v: Tensor) -> Tensor:
        return v if self._evecs is None else v @ self._evecs.to(v.device)

    def _unrotate(self, c: Tensor) -> Tensor:
        return c if self._evecs is None else c @ self._evecs.to(c.device).mT

    def _terms(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float):
        x = _state(x, self.dim)
        a, s = _coef(alpha, x), _coef(sigma, x)
        mu, lam = self.mean.to(x.device), self._evals.to(x.device)
        c = self._rotate(x - a * mu)
        return mu, lam, a, s, c, a**2 * lam + s**2

    def predict(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float
                ) -> tuple[Tensor, Tensor]:
        """``(E[x0 | x_t = x], E[eps | x_t = x])``, each from its own closed form (no
        cancellation at small ``sigma``)."""
        mu, lam, a, s, c, v = self._terms(x, alpha, sigma)
        return mu + self._unrotate(a * lam * c / v), self._unrotate(s * c / v)

    def denoise(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """``E[x0 | x_t = x] = mu + alpha Sigma (alpha^2 Sigma + sigma^2 I)^-1 (x - alpha mu)``;
        ``x`` is ``(b, d)``, ``alpha``/``sigma`` floats or ``(b,)``."""
        return self.predict(x, alpha, sigma)[0]

    def noise(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """``E[eps | x_t = x] = sigma (alpha^2 Sigma + sigma^2 I)^-1 (x - alpha mu)``."""
        return self.predict(x, alpha, sigma)[1]

    def score(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """``grad log p_t(x) = -(alpha^2 Sigma + sigma^2 I)^-1 (x - alpha mu)``."""
        _, _, _, _, c, v = self._terms(x, alpha, sigma)
        return -self._unrotate(c / v)

    def log_prob(self, x: Tensor, alpha: Tensor | float = 1.0, sigma: Tensor | float = 0.0
                 ) -> Tensor:
        """``log N(x; alpha mu, alpha^2 Sigma + sigma^2 I)``, shape ``(b,)`` (data at defaults)."""
        _, _, _, _, c, v = self._terms(x, alpha, sigma)
        return -0.5 * (torch.log(v).sum(-1) + (c**2 / v).sum(-1) + self.dim * _LOG_2PI)

    def flow(self, x: Tensor, alpha_s: Tensor | float, sigma_s: Tensor | float,
             alpha_t: Tensor | float, sigma_t: Tensor | float) -> Tensor:
        """Exact probability-flow map from ``(alpha_s, sigma_s)`` to ``(alpha_t, sigma_t)``.

        On ``x~ = x/alpha`` at ``s = sigma/alpha``: ``u_k^T (x~ - mu)`` scales by
        ``sqrt((s_t^2 + lam_k)/(s_s^2 + lam_k))`` (Wang & Vastola 2024); works in both directions.
        """
        x = _state(x, self.dim)
        a_s, s_s = _coef(alpha_s, x), _coef(sigma_s, x)
        a_t, s_t = _coef(alpha_t, x), _coef(sigma_t, x)
        mu, lam = self.mean.to(x.device), self._evals.to(x.device)
        ratio = torch.sqrt(((s_t / a_t) ** 2 + lam) / ((s_s / a_s) ** 2 + lam))
        return a_t * (mu + self._unrotate(ratio * self._rotate(x / a_s - mu)))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws of ``x0``, shape ``(n, d)``."""
        return self.sample_marginal(n, 1.0, 0.0, generator)

    def sample_marginal(self, n: int, alpha: float, sigma: float,
                        generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws of ``x_t ~ N(alpha mean, alpha^2 cov + sigma^2 I)``, shape ``(n, d)``."""
        n = _count("GaussianData.sample_marginal", n)
        z = torch.randn(n, self.dim, generator=generator, dtype=F64)
        alpha, sigma = float(alpha), float(sigma)
        return alpha * self.mean + self._unrotate(torch.sqrt(alpha**2 * self._evals + sigma**2) * z)


def _means_shape(owner: str, means: Tensor) -> tuple[int, int]:
    if means.ndim != 2 or 0 in means.shape:
        raise _fail(owner, "means", means, "it must have shape (components, d)")
    return means.shape[0], means.shape[1]


@attrs.frozen(kw_only=True, eq=False)
class GaussianMixtureData:
    """Data ``x0 ~ sum_i pi_i N(mu_i, Sigma_i)``: exact denoiser and score through log-sum-exp
    responsibilities (docs/mathematics.md#gaussian-data).

    ``weights`` ``(k,)`` positive (normalized to sum 1), ``means`` ``(k, d)``, ``covs``
    ``(k, d, d)`` (full) or ``(k, d)`` (diagonal).
    """

    weights: Tensor = attrs.field(converter=_f64("GaussianMixtureData", "weights"))
    means: Tensor = attrs.field(converter=_f64("GaussianMixtureData", "means"))
    covs: Tensor = attrs.field(converter=_f64("GaussianMixtureData", "covs"))
    _log_weights: Tensor = attrs.field(init=False, repr=False)
    _evals: Tensor = attrs.field(init=False, repr=False)
    _evecs: Tensor | None = attrs.field(init=False, repr=False)
    # Rotations of all components are one 2-D matmul with U_cat = [U_1 ... U_k] (d, k d):
    # batched float64 matmuls of tiny matrices are ~100x slower on CPU.
    _ucat: Tensor | None = attrs.field(init=False, repr=False)
    _means_rot: Tensor | None = attrs.field(init=False, repr=False)
    _gaussian: GaussianData | None = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        owner = "GaussianMixtureData"
        k, d = _means_shape(owner, self.means)
        _check_finite(owner, "means", self.means)
        if tuple(self.weights.shape) != (k,):
            raise _fail(owner, "weights", self.weights,
                        f"it must have shape ({k},), one weight per row of means")
        _check_finite(owner, "weights", self.weights)
        if not bool((self.weights > 0).all()):
            raise _fail(owner, "weights", self.weights, "every weight must be > 0")
        if tuple(self.covs.shape) not in ((k, d), (k, d, d)):
            raise _fail(owner, "covs", self.covs,
                        f"it must have shape ({k}, {d}, {d}) (full) or ({k}, {d}) (diagonal) "
                        "to fit means")
        evals, evecs = _spd_eig(owner, "covs", self.covs, self.covs.ndim == 2)
        weights = self.weights / self.weights.sum()
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "_log_weights", torch.log(weights))
        object.__setattr__(self, "_evals", evals)
        object.__setattr__(self, "_evecs", evecs)
        ucat = None if evecs is None else evecs.permute(1, 0, 2).reshape(d, k * d)
        means_rot = None if evecs is None else torch.einsum("kd,kde->ke", self.means, evecs)
        object.__setattr__(self, "_ucat", ucat)
        object.__setattr__(self, "_means_rot", means_rot)
        one = GaussianData(mean=self.means[0], cov=self.covs[0]) if k == 1 else None
        object.__setattr__(self, "_gaussian", one)

    @classmethod
    def random(cls, dim: int, components: int, *, seed: int = 0, var_min: float = 0.1,
               var_max: float = 1.0, mean_scale: float = 2.0, diagonal: bool = False
               ) -> GaussianMixtureData:
        """A reproducible random mixture: weights uniform in ``[0.5, 1.5]`` (then normalized),
        means ``mean_scale * N(0, I)``, covariances ``Q diag(v) Q^T`` with ``v`` uniform in
        ``[var_min, var_max]`` and ``Q`` Haar-random (identity when ``diagonal``)."""
        owner = "GaussianMixtureData.random"
        _check_int(owner, "dim", dim, 1)
        _check_int(owner, "components", components, 1)
        _check_int(owner, "seed", seed, 0)
        for option, value in (("var_min", var_min), ("var_max", var_max),
                              ("mean_scale", mean_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value >= 0
            ):
                raise _fail(owner, option, value, "it must be a finite number >= 0")
        if not 0 < var_min <= var_max:
            raise _fail(owner, "var_min", var_min, f"it must satisfy 0 < var_min <= var_max "
                        f"(var_max={var_max!r})")
        g = torch.Generator().manual_seed(seed)
        weights = 0.5 + torch.rand(components, generator=g, dtype=F64)
        means = mean_scale * torch.randn(components, dim, generator=g, dtype=F64)
        evals = var_min + (var_max - var_min) * torch.rand(components, dim, generator=g, dtype=F64)
        if diagonal:
            covs = evals
        else:
            q, r = torch.linalg.qr(torch.randn(components, dim, dim, generator=g, dtype=F64))
            # The sign fix makes Q Haar distributed (Mezzadri 2007).
            q = q * torch.sgn(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
            covs = (q * evals.unsqueeze(-2)) @ q.mT
            covs = 0.5 * (covs + covs.mT)
        return cls(weights=weights, means=means, covs=covs)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def components(self) -> int:
        return self.means.shape[0]

    @property
    def gaussian(self) -> GaussianData | None:
        """The single component as :class:`GaussianData` when ``components == 1``, else None."""
        return self._gaussian

    def _terms(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float):
        """Eigen-coordinates ``c`` ``(b, k, d)``, variances ``v``, and the logits ``(b, k)``."""
        x = _state(x, self.dim)
        a, s = _coef(alpha, x).unsqueeze(-1), _coef(sigma, x).unsqueeze(-1)  # (b | 1, 1, 1)
        lam = self._evals.to(x.device)
        if self._ucat is None:
            c = x.unsqueeze(1) - a * self.means.to(x.device)
        else:
            c = (x @ self._ucat.to(x.device)).view(-1, self.components, self.dim)
            c = c - a * self._means_rot.to(x.device)
        v = a**2 * lam + s**2
        logits = self._log_weights.to(x.device) - 0.5 * (
            torch.log(v).sum(-1) + (c**2 / v).sum(-1) + self.dim * _LOG_2PI
        )
        return a, s, lam, c, v, logits

    def _combine(self, w: Tensor, coords: Tensor) -> Tensor:
        """``sum_i w_i U_i coords_i``, shape ``(b, d)``."""
        z = w.unsqueeze(-1) * coords
        if self._ucat is None:
            return z.sum(1)
        return z.reshape(z.shape[0], z.shape[1] * z.shape[2]) @ self._ucat.to(z.device).mT

    def responsibilities(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float
                         ) -> Tensor:
        """Posterior component probabilities ``P(i | x_t = x)``, shape ``(b, k)``."""
        return _softmax(self._terms(x, alpha, sigma)[-1])

    def predict(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float
                ) -> tuple[Tensor, Tensor]:
        """``(E[x0 | x_t = x], E[eps | x_t = x])``: the components' predictions weighted by
        their responsibilities."""
        a, s, lam, c, v, logits = self._terms(x, alpha, sigma)
        w = _softmax(logits)
        x0 = w @ self.means.to(w.device) + self._combine(w, a * lam * c / v)
        return x0, self._combine(w, s * c / v)

    def denoise(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """``E[x0 | x_t = x] = sum_i w_i(x) x0_i(x)``; ``x`` is ``(b, d)``."""
        return self.predict(x, alpha, sigma)[0]

    def noise(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """``E[eps | x_t = x] = sum_i w_i(x) sigma (alpha^2 Sigma_i + sigma^2 I)^-1
        (x - alpha mu_i)``."""
        return self.predict(x, alpha, sigma)[1]

    def score(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """``grad log p_t(x) = -sum_i w_i(x) (alpha^2 Sigma_i + sigma^2 I)^-1 (x - alpha mu_i)``."""
        _, _, _, c, v, logits = self._terms(x, alpha, sigma)
        return -self._combine(_softmax(logits), c / v)

    def log_prob(self, x: Tensor, alpha: Tensor | float = 1.0, sigma: Tensor | float = 0.0
                 ) -> Tensor:
        """``log p_t(x) = logsumexp_i [log pi_i + log N(x; alpha mu_i, alpha^2 Sigma_i +
        sigma^2 I)]``, shape ``(b,)`` (data at the defaults)."""
        return torch.logsumexp(self._terms(x, alpha, sigma)[-1], dim=-1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws of ``x0``, shape ``(n, d)``."""
        return self.sample_marginal(n, 1.0, 0.0, generator)

    def sample_marginal(self, n: int, alpha: float, sigma: float,
                        generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws of ``x_t = alpha x0 + sigma eps``, shape ``(n, d)``."""
        n = _count("GaussianMixtureData.sample_marginal", n)
        alpha, sigma = float(alpha), float(sigma)
        if n == 0:
            return torch.empty(0, self.dim, dtype=F64)
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=F64)
        c = torch.sqrt(alpha**2 * self._evals[idx] + sigma**2) * z
        if self._evecs is not None:
            c = (self._evecs[idx] @ c.unsqueeze(-1)).squeeze(-1)
        return alpha * self.means[idx] + c


Data = GaussianData | GaussianMixtureData


def _check_data(inst: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, (GaussianData, GaussianMixtureData)):
        raise _fail(type(inst).__name__, attribute.name, value,
                    "it must be a GaussianData or a GaussianMixtureData")


@attrs.frozen(kw_only=True, eq=False)
class AnalyticModel(Model):
    """A :class:`~solverlab.model.Model` whose network is the exact posterior mean of ``data``.

    Output in its parameterization: ``x0 = E[x0 | x_t]``, ``eps = E[eps | x_t]`` (each from
    its closed form), ``out = parameterization.target(x0, eps, alpha, sigma)``. ``x`` may be
    ``(b, *shape)`` with ``prod(shape) = d``; computed in float64, returned in ``x.dtype``.
    Conditioning keywords are ignored: the density is unconditional.
    """

    data: Data = attrs.field(validator=_check_data)
    schedule: Schedule = attrs.field(default="vp-linear", converter=_schedule)
    parameterization: Parameterization = attrs.field(default="noise", converter=_parameterization)

    @property
    def dim(self) -> int:
        return self.data.dim

    def _flat(self, x: Tensor) -> Tensor:
        if x.ndim < 2 or math.prod(x.shape[1:]) != self.data.dim:
            raise InputError(
                f"x of shape {tuple(x.shape)} does not fit {type(self).__name__} of dimension "
                f"{self.data.dim}; give (batch, *shape) with prod(shape) = {self.data.dim}"
            )
        return as_f64(x).reshape(x.shape[0], self.data.dim)


    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        flat, t = self._flat(x), batch_time(x, t)
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        x0, eps = self.data.predict(flat, alpha, sigma)
        out = self.parameterization.target(x0, eps, alpha[:, None], sigma[:, None])
        return out.reshape(x.shape).to(x.dtype)

    def sample_prior(self, n: int, t: float | None = None,
                     generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float64) -> Tensor:
        """``n`` draws of ``x_t`` from the exact marginal at ``t`` (default ``schedule.t_max``),
        shape ``(n, d)``."""
        t = self.schedule.t_max if t is None else float(t)
        alpha, sigma = float(self.schedule.alpha(t)), float(self.schedule.sigma(t))
        return self.data.sample_marginal(n, alpha, sigma, generator).to(dtype)

    def exact_flow(self, x: Tensor, t_start: Tensor | float, t_end: Tensor | float
                   ) -> Tensor | None:
        """The exact probability-flow solution from ``t_start`` to ``t_end`` (float64, shaped like
        ``x``; times scalars or ``(b,)``) for Gaussian data (a 1-component mixture included);
        ``None`` for a mixture of several components, which has no closed form."""
        gauss = self.data if isinstance(self.data, GaussianData) else self.data.gaussian
        if gauss is None:
            return None
        flat = self._flat(x)
        ts, te = batch_time(x, t_start, "t_start"), batch_time(x, t_end, "t_end")
        s = self.schedule
        out = gauss.flow(flat, s.alpha(ts), s.sigma(ts), s.alpha(te), s.sigma(te))
        return out.reshape(x.shape)


_GAUSSIAN = "GaussianModel ('gaussian')"
_MIXTURE = "GaussianMixtureModel ('gaussian-mixture')"


def _size(owner: str, option: str, value: Tensor | None, axis: int, shapes: dict[int, str]
          ) -> int | None:
    """``value.shape[axis]`` after checking that ``value`` has one of the ``shapes`` (by ndim)."""
    if value is None:
        return None
    if value.ndim not in shapes or 0 in value.shape:
        raise _fail(owner, option, value, "it must have shape " + " or ".join(shapes.values()))
    return value.shape[axis]


def _resolve(owner: str, option: str, given: int | None, default: int,
             sizes: dict[str, int | None]) -> int:
    """``given`` if set, else the size implied by the given tensors, else ``default``; a
    disagreement raises :class:`OptionError` naming both."""
    known = {k: v for k, v in sizes.items() if v is not None}
    value = given if given is not None else next(iter(known.values()), default)
    for name, size in known.items():
        if size != value:
            src = f"option {option}={given!r}" if given is not None else (
                f"{next(iter(known))} (size {value})")
            raise OptionError(f"{owner}: {name} implies {option}={size}, which does not match "
                              f"{src}; make them agree or leave {option} out")
    return value


@attrs.frozen(kw_only=True, eq=False)
class GaussianModel(AnalyticModel):
    """Gaussian data ``N(mean, cov)`` with exact network output and exact probability-flow
    solution (Wang & Vastola 2024, arXiv 2412.09726; docs/mathematics.md#gaussian-data).

    Options: ``dim`` (default 2, or the size of ``mean``/``cov`` when given), ``mean``
    (default ``N(0, I)`` draw), ``cov`` ``(d, d)`` or ``(d,)`` (default: random SPD with
    eigenvalues uniform in ``[0.1, 1]``; diagonal when ``diagonal=True``), ``seed`` for the
    random parts, ``schedule`` and ``parameterization`` (names or instances).
    """

    name: ClassVar[str] = "gaussian"
    dim: int | None = attrs.field(default=None, validator=attrs.validators.optional(
        number(integer=True, ge=1)))
    mean: Tensor | None = attrs.field(default=None, converter=_optional_f64(_GAUSSIAN, "mean"),
                                      repr=False)
    cov: Tensor | None = attrs.field(default=None, converter=_optional_f64(_GAUSSIAN, "cov"),
                                     repr=False)
    diagonal: bool = attrs.field(default=False, validator=boolean)
    seed: int = attrs.field(default=0, validator=number(integer=True, ge=0))
    data: GaussianData = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        owner = _GAUSSIAN
        dim = _resolve(owner, "dim", self.dim, 2, {
            "mean": _size(owner, "mean", self.mean, 0, {1: "(d,)"}),
            "cov": _size(owner, "cov", self.cov, 0, {2: "(d, d)", 1: "(d,)"}),
        })
        if self.diagonal and self.cov is not None and self.cov.ndim != 1:
            raise _fail(owner, "cov", self.cov, "with diagonal=True it must be a vector (d,) of "
                        "variances")
        rnd = GaussianMixtureData.random(dim, 1, seed=self.seed, var_min=0.1, var_max=1.0,
                                         mean_scale=1.0, diagonal=self.diagonal)
        mean = rnd.means[0] if self.mean is None else self.mean
        cov = rnd.covs[0] if self.cov is None else self.cov
        object.__setattr__(self, "dim", dim)
        object.__setattr__(self, "data", GaussianData(mean=mean, cov=cov))


#: The default problem of ``gaussian-mixture`` (and of ``solverlab compare``): well separated,
#: fairly narrow modes, so that trajectories bend late and solvers differ at 5-20 NFE.
MIXTURE_DEFAULTS: dict[str, float] = {"var_min": 0.05, "var_max": 0.3, "mean_scale": 1.5}


@attrs.frozen(kw_only=True, eq=False)
class GaussianMixtureModel(AnalyticModel):
    """Gaussian-mixture data with exact network output (docs/mathematics.md#gaussian-data).

    Options: ``dim`` (default 2) and ``components`` (default 3), or the sizes of the given
    ``weights`` ``(k,)``, ``means`` ``(k, d)``, ``covs`` ``(k, d, d)``/``(k, d)``; what is not
    given is drawn by :meth:`GaussianMixtureData.random` with ``seed`` and
    :data:`MIXTURE_DEFAULTS` (variances in ``[0.05, 0.3]``, means ``1.5 N(0, I)``). The
    defaults are the embedded problem of ``solverlab compare``.
    """

    name: ClassVar[str] = "gaussian-mixture"
    dim: int | None = attrs.field(default=None, validator=attrs.validators.optional(
        number(integer=True, ge=1)))
    components: int | None = attrs.field(default=None, validator=attrs.validators.optional(
        number(integer=True, ge=1)))
    weights: Tensor | None = attrs.field(default=None, converter=_optional_f64(_MIXTURE, "weights"),
                                         repr=False)
    means: Tensor | None = attrs.field(default=None, converter=_optional_f64(_MIXTURE, "means"),
                                       repr=False)
    covs: Tensor | None = attrs.field(default=None, converter=_optional_f64(_MIXTURE, "covs"),
                                      repr=False)
    diagonal: bool = attrs.field(default=False, validator=boolean)
    seed: int = attrs.field(default=0, validator=number(integer=True, ge=0))
    data: GaussianMixtureData = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        owner = _MIXTURE
        shapes = {"weights": {1: "(k,)"}, "means": {2: "(k, d)"},
                  "covs": {3: "(k, d, d)", 2: "(k, d)"}}
        values = {"weights": self.weights, "means": self.means, "covs": self.covs}
        k = _resolve(owner, "components", self.components, 3, {
            o: _size(owner, o, values[o], 0, shapes[o]) for o in values})
        dim = _resolve(owner, "dim", self.dim, 2, {
            o: _size(owner, o, values[o], 1, shapes[o]) for o in ("means", "covs")})
        if self.diagonal and self.covs is not None and self.covs.ndim != 2:
            raise _fail(owner, "covs", self.covs, "with diagonal=True it must have shape (k, d)")
        rnd = GaussianMixtureData.random(dim, k, seed=self.seed, diagonal=self.diagonal,
                                         **MIXTURE_DEFAULTS)
        data = GaussianMixtureData(
            weights=rnd.weights if self.weights is None else self.weights,
            means=rnd.means if self.means is None else self.means,
            covs=rnd.covs if self.covs is None else self.covs,
        )
        object.__setattr__(self, "dim", dim)
        object.__setattr__(self, "components", k)
        object.__setattr__(self, "data", data)


REGISTERED_MODELS = (GaussianModel, GaussianMixtureModel)
