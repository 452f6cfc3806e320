"""The Gaussian fit of a data set and its exact probability-flow map (Wang & Vastola 2024,
arXiv 2412.09726, sec. 3-4), and the estimate of the fit's error that ``skip="auto"`` uses."""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch
from torch import Tensor

from solverlab.errors import OptionError

__all__ = ["GaussianFit", "fit_error"]

F64 = torch.float64
#: A covariance eigenvalue below ``-PSD_RTOL * max|eigenvalue|`` makes it not positive
#: semi-definite; smaller negative ones are round-off and set to 0.
PSD_RTOL = 1e-10


def _fail(option: str, value: Any, allowed: str) -> OptionError:
    if isinstance(value, Tensor):
        value = repr(value.tolist()) if value.numel() <= 6 else (
            f"<tensor of shape {tuple(value.shape)}>")
    else:
        value = repr(value)
    return OptionError(f"Teleport ('teleport'): option {option}={value} is not allowed; "
                       f"{allowed}")


def _tensor(option: str, value: Any) -> Tensor:
    if not isinstance(value, Tensor):
        try:
            value = torch.as_tensor(value, dtype=F64)
        except (TypeError, ValueError, RuntimeError):
            raise _fail(option, value, "it must be a tensor of real numbers") from None
    if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
        raise _fail(option, value, f"it must hold real numbers, not {value.dtype}")
    value = value.detach().to("cpu", F64)
    if not bool(torch.isfinite(value).all()):
        raise _fail(option, value, "every entry must be finite")
    return value


def _top(evals: Tensor, evecs: Tensor, rank: int | None) -> tuple[Tensor, Tensor]:
    """Eigenpairs sorted by decreasing eigenvalue, the largest ``rank`` of them kept."""
    order = torch.argsort(evals, descending=True)
    if rank is not None:
        order = order[:rank]
    return evals[order], evecs[:, order]


@attrs.frozen(kw_only=True, eq=False)
class GaussianFit:
    """``N(mean, U diag(eigenvalues) U^T)`` on flattened samples of ``shape``: ``mean``
    ``(d,)``, ``eigenvalues`` ``(r,)`` (>= 0, decreasing), ``eigenvectors`` ``(d, r)``
    (orthonormal columns), float64. Directions outside ``span(U)`` have variance 0: a
    truncated eigenbasis (``rank < d``) or a sample covariance of fewer than ``d + 1``
    samples; the flow scales them as pure noise (Wang & Vastola 2024, truncated PCA).

    For ``x_t = alpha x0 + sigma eps`` the flow is exact on ``y = x/alpha`` at the noise level
    ``s = sigma/alpha = exp(-lambda)`` (the VE form of the probability-flow ODE, ``dy/ds =
    s (Sigma + s^2 I)^-1 (y - mu)``): with ``c = U^T (y_s - mu)`` and the rest ``y_perp = y_s -
    mu - U c``::

        y_t = mu + U (sqrt((s_t^2 + ev) / (s_s^2 + ev)) c) + (s_t / s_s) y_perp
    """

    mean: Tensor
    eigenvalues: Tensor
    eigenvectors: Tensor
    shape: tuple[int, ...] | None = None

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    @property
    def rank(self) -> int:
        return self.eigenvalues.shape[0]

    @classmethod
    def from_data(cls, data: Any, rank: int | None = None) -> GaussianFit:
        """The sample mean and covariance (``1/(n-1)``) of ``data`` ``(n, *shape)``, ``n >= 2``,
        through the eigendecomposition of the covariance (``n > d``) or the SVD of the
        centred samples (``n <= d``: at most ``n - 1`` non-zero eigenvalues); the largest
        ``rank`` eigenpairs are kept (default all)."""
        x = _tensor("data", data)
        if x.ndim < 2 or x.shape[0] < 2 or 0 in x.shape:
            raise _fail("data", x, f"it must be training samples of shape (n, *shape) with n >= "
                                   f"2; got shape {tuple(x.shape)}")
        shape = tuple(x.shape[1:])
        x = x.reshape(x.shape[0], -1)
        n, d = x.shape
        mean = x.mean(0)
        centred = x - mean
        if n > d:
            evals, evecs = torch.linalg.eigh(centred.mT @ centred / (n - 1))
            evals = evals.clamp_min(0.0)
        else:
            _, sv, vh = torch.linalg.svd(centred, full_matrices=False)
            evals, evecs = sv**2 / (n - 1), vh.mT
        evals, evecs = _top(evals, evecs, rank)
        return cls(mean=mean, eigenvalues=evals, eigenvectors=evecs, shape=shape)

    @classmethod
    def from_moments(cls, mean: Any, cov: Any, rank: int | None = None) -> GaussianFit:
        """``mean`` ``(d,)`` and ``cov`` ``(d, d)`` (symmetric positive semi-definite) or
        ``(d,)`` (the diagonal); the largest ``rank`` eigenpairs are kept (default all)."""
        mu, c = _tensor("mean", mean), _tensor("cov", cov)
        if mu.ndim != 1 or mu.shape[0] == 0:
            raise _fail("mean", mu, f"it must be a vector (d,); got shape {tuple(mu.shape)}")
        d = mu.shape[0]
        if tuple(c.shape) not in ((d,), (d, d)):
            raise _fail("cov", c, f"it must have shape ({d}, {d}) or ({d},) to fit mean of "
                                  f"shape ({d},); got {tuple(c.shape)}")
        if c.ndim == 1:
            evals, evecs = c, torch.eye(d, dtype=F64)
        else:
            scale = float(c.abs().amax())
            if float((c - c.mT).abs().amax()) > 1e-10 * max(scale, 1e-300):
                raise _fail("cov", c, "a covariance must be symmetric")
            evals, evecs = torch.linalg.eigh(0.5 * (c + c.mT))
        top = float(evals.abs().amax())
        if float(evals.amin()) < -PSD_RTOL * top:
            raise _fail("cov", c, f"a covariance must be positive semi-definite; its smallest "
                                  f"eigenvalue is {float(evals.amin()):.3g} (largest "
                                  f"{float(evals.amax()):.3g})")
        evals, evecs = _top(evals.clamp_min(0.0), evecs, rank)
        return cls(mean=mu, eigenvalues=evals, eigenvectors=evecs)

    def check(self, x: Tensor, option: str) -> None:
        """``x`` ``(b, *shape)`` fits the fit's sample shape (or dimension when it has no
        shape); else an :class:`OptionError` naming ``option``, the fit's source."""
        per = tuple(x.shape[1:])
        if self.shape is not None and per != self.shape:
            raise OptionError(
                f"Teleport ('teleport'): option {option} holds samples of shape {self.shape}, "
                f"but x has samples of shape {per}; the data must be in the model's own "
                "sample shape (and scaling)")
        if math.prod(per) != self.dim:
            raise OptionError(
                f"Teleport ('teleport'): option {option} has dimension {self.dim}, but x has "
                f"samples of shape {per} ({math.prod(per)} values)")

    def _split(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        mu = self.mean.to(y.device)
        u = self.eigenvectors.to(y.device)
        dev = y - mu
        c = dev @ u
        return mu, u, c, dev - c @ u.mT

    def flow(self, x: Tensor, alpha_s: float, sigma_s: float, alpha_t: float,
             sigma_t: float) -> Tensor:
        """The exact probability-flow map of the fitted Gaussian from ``(alpha_s, sigma_s)``
        to ``(alpha_t, sigma_t)`` (class docstring), computed in float64; ``x`` ``(b, ...)``
        with ``d`` values per sample, returned in its shape and dtype."""
        y = x.reshape(x.shape[0], -1).to(F64) / alpha_s
        s_s, s_t = sigma_s / alpha_s, sigma_t / alpha_t
        mu, u, c, rest = self._split(y)
        ev = self.eigenvalues.to(y.device)
        ratio = torch.sqrt((s_t**2 + ev) / (s_s**2 + ev))
        y_t = mu + (ratio * c) @ u.mT + (s_t / s_s) * rest
        return (alpha_t * y_t).reshape(x.shape).to(x.dtype)

    def denoise(self, y: Tensor, s: float) -> Tensor:
        """``E[x0 | x0 + s eps = y]`` under the fit, ``y`` ``(b, d)`` float64 (VE form)."""
        mu, u, c, _ = self._split(y)
        ev = self.eigenvalues.to(y.device)
        return mu + (ev / (ev + s**2) * c) @ u.mT


def fit_error(fit: GaussianFit, data: Tensor, levels: Tensor, samples: int = 256,
              seed: int = 0) -> Tensor:
    """The relative error of the fit's probability-flow velocity at each noise level ``s`` of
    ``levels`` (``sigma/alpha``), estimated on ``data`` ``(n, ...)`` (``n >= 2``)::

        e(s) = sqrt(E ||D_G(y, s) - D_E(y, s)||^2 / E ||y - D_E(y, s)||^2),  y = x0 + s eps

    with ``D_G`` the fit's denoiser and ``D_E`` the data's own (empirical, kernel) denoiser,
    ``D_E(y) = sum_j w_j x_j``, ``w = softmax_j(-||y - x_j||^2 / (2 s^2))``, leaving out the
    sample ``y`` was made from. In ``y = x/alpha`` the ODE is ``dy/ds = (y - D(y, s))/s``, so
    ``e`` is the relative error of its right-hand side when ``D_E`` is replaced by ``D_G``.
    ``samples`` of the data (a random subset, ``seed``) are noised, one draw per level; the
    kernel sums run over all the data."""
    x = _tensor("data", data)
    x = x.reshape(x.shape[0], -1)
    n = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=gen)[:min(samples, n)]
    x0 = x[idx]
    sq = (x**2).sum(1)
    out = []
    for s in levels.to(F64).tolist():
        y = x0 + s * torch.randn(x0.shape, generator=gen, dtype=F64)
        d2 = (y**2).sum(1, keepdim=True) + sq - 2.0 * (y @ x.mT)
        logits = -d2 / (2.0 * s * s)
        logits[torch.arange(idx.numel()), idx] = -math.inf  # leave-one-out
        w = torch.exp(logits - torch.logsumexp(logits, dim=1, keepdim=True))
        emp = w @ x
        gauss = fit.denoise(y, s)
        num = float(((gauss - emp) ** 2).sum())
        den = float(((y - emp) ** 2).sum())
        out.append(math.sqrt(num / den) if den > 0 else math.inf)
    return torch.tensor(out, dtype=F64)

