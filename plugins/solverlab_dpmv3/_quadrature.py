"""Integrals of the EMS over a ``lambda`` interval, to round-off for piecewise-linear EMS.

``l``, ``s``, ``b`` are taken as the piecewise-linear interpolants of their grid values. Each
EMS cell within ``[a, b]`` (and the partial cells at its ends) gets ``NODES`` Gauss-Legendre
nodes; integrands are smooth inside a cell, so cell integrals and running integrals (through
the spectral integration matrix of the nodes) are exact to round-off for cells of the sizes
EMS grids have. The official code uses cumulative trapezoid sums on the grid instead
(``weighted_cumsumexp_trapezoid``), which is second order in the EMS cell width.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

F64 = torch.float64
NODES = 6


@functools.lru_cache(maxsize=4)
def _reference(n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gauss-Legendre nodes ``u`` and weights ``w`` on ``[0, 1]`` and the matrix ``Q`` with
    ``Q[i, j] = int_0^{u_i} ell_j`` (Lagrange basis on the nodes): ``Q @ f`` integrates the
    interpolant of ``f`` from 0 to each node."""
    x, w = np.polynomial.legendre.leggauss(n)
    u, w = (x + 1) / 2, w / 2
    vander = np.vander(u, n, increasing=True)  # [i, m] = u_i^m
    # int_0^{u_i} u^m = u_i^{m+1}/(m+1); ell_j = sum_m C[m, j] u^m with C = inv(vander)
    ints = np.stack([u ** (m + 1) / (m + 1) for m in range(n)], axis=1)
    q = ints @ np.linalg.inv(vander)
    return (torch.tensor(u, dtype=F64), torch.tensor(w, dtype=F64), torch.tensor(q, dtype=F64))


class Interval:
    """Nodes of ``[a, b]`` (``a < b``) and the EMS interpolated there.

    ``lam``: ``(M,)`` node positions; ``l``, ``s``, ``b``: ``(M, D)``; :meth:`total` and
    :meth:`running` integrate node values (``(M, D)`` or ``(M, 1)``) over the interval and
    from ``a`` to each node."""

    def __init__(self, grid: Tensor, l: Tensor, s: Tensor, b: Tensor, a: float,  # noqa: E741
                 end: float) -> None:
        inner = grid[(grid > a) & (grid < end)]
        edges = torch.cat([torch.tensor([a], dtype=F64), inner, torch.tensor([end], dtype=F64)])
        u, w, q = _reference(NODES)
        width = torch.diff(edges)  # (cells,)
        lam = edges[:-1, None] + width[:, None] * u  # (cells, n)
        self.cells, self.n = width.numel(), NODES
        self.lam = lam.reshape(-1)
        self.weights = (width[:, None] * w).reshape(-1, 1)
        self.width, self.q = width, q
        self.l, self.s, self.b = (_interp(grid, v, self.lam) for v in (l, s, b))

    def total(self, f: Tensor) -> Tensor:
        return (self.weights * f).sum(0)

    def running(self, f: Tensor) -> Tensor:
        fc = f.reshape(self.cells, self.n, -1)
        within = torch.einsum("ij,cjd->cid", self.q, fc) * self.width[:, None, None]
        cell_tot = (self.weights.reshape(self.cells, self.n, 1) * fc).sum(1)  # (cells, D)
        before = torch.cumsum(cell_tot, 0) - cell_tot
        return (within + before[:, None, :]).reshape(self.cells * self.n, -1)


def _interp(grid: Tensor, v: Tensor, at: Tensor) -> Tensor:
    """Piecewise-linear interpolation of ``v`` (``(N + 1, D)``, on increasing ``grid``) at
    ``at``; constant beyond the ends."""
    i = torch.searchsorted(grid, at, right=True).clamp(1, grid.numel() - 1)
    lo, hi = grid[i - 1], grid[i]
    r = ((at - lo) / (hi - lo)).clamp(0, 1)[:, None]
    return v[i - 1] * (1 - r) + v[i] * r


def interp_at(grid: Tensor, v: Tensor, at: float) -> Tensor:
    """``v`` interpolated at one ``lambda``: ``(D,)``."""
    return _interp(grid, v, torch.tensor([at], dtype=F64))[0]
