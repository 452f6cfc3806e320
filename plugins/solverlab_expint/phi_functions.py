"""The phi-functions of exponential integrators: the one place they are evaluated.

``phi_0(z) = e^z``, ``phi_{k+1}(z) = (phi_k(z) - 1/k!) / z`` (Hochbruck & Ostermann 2010), or
``phi_k(z) = sum_n z^n / (n+k)! = int_0^1 e^{(1-u) z} u^{k-1} / (k-1)! du``.

The recursion loses about ``log10(k!/|z|^k)`` digits when ``|z| < k`` (each step subtracts
``1/k!`` from a number close to it), and the naive ``(e^z - 1)/z`` loses all of them at
``z -> 0``. So ``phi_k`` is taken from its Taylor series where ``|z| < max(1, k)`` (terms shrink
at least geometrically there and, for ``z < 0``, the alternating sum cancels by at most
``~e^2``) and from the recursion started at ``expm1(z)/z`` elsewhere (where every step divides
by ``|z| >= k`` and errors shrink). Everything is float64; callers cast once.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = ["phi", "phis"]

F64 = torch.float64


@functools.lru_cache(maxsize=32)
def _table(k: int, terms: int) -> tuple[Tensor, Tensor]:
    n = torch.arange(terms, dtype=F64)
    coef = torch.tensor([[1.0 / math.factorial(i + j) for j in range(1, k + 1)]
                         for i in range(terms)], dtype=F64)
    return n, coef


def _series(z: Tensor, k: int, terms: int) -> Tensor:
    """``sum_n z^n / (n+j)!`` for ``j = 1..k`` (last dimension), ``n < terms``: one power
    table times one coefficient table (a few tensor operations, however many terms)."""
    n, coef = _table(k, terms)
    return (z[..., None] ** n.to(z.device)) @ coef.to(z.device)


def phis(z: Tensor | float, k: int) -> Tensor:
    """``phi_0(z), ..., phi_k(z)`` stacked on a new last dimension (float64)."""
    if k < 0:
        raise ValueError(f"phis: k={k!r} must be >= 0")
    z = torch.as_tensor(z, dtype=F64)
    out = [torch.exp(z)]
    if k == 0:
        return out[0].unsqueeze(-1)
    az = z.abs()
    # Enough Taylor terms for |z| < k to reach float64 round-off (checked up to k = 12).
    series = _series(z, k, 24 + 3 * k)
    safe = torch.where(az < 1.0, torch.ones_like(z), z)  # no division by ~0 in the recursion
    rec = torch.expm1(safe) / safe
    for j in range(1, k + 1):
        if j > 1:
            rec = (rec - 1.0 / math.factorial(j - 1)) / safe
        out.append(torch.where(az < max(1.0, float(j)), series[..., j - 1], rec))
        # Keep the recursion on the accurate value (equal to ``rec`` wherever it is used).
        rec = out[-1]
    return torch.stack(out, dim=-1)


def phi(k: int, z: Tensor | float) -> Tensor:
    """``phi_k(z)`` (float64, shaped like ``z``)."""
    return phis(z, k)[..., k]
