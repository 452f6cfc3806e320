"""UniPC: the unified predictor (UniP) and corrector (UniC) of Zhao et al. 2023."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import attrs
import torch
from torch import Tensor

from solverlab import SolverState
from solverlab.validators import boolean, number, one_of

from ._multistep import Multistep, order_table
from .integrator import Nodes, Span, alpha_sigma, combine, own, unit

__all__ = ["UniPC", "unipc_rhos"]

F64 = torch.float64


def unipc_rhos(r: Tensor, sp: Span, variant: str, n_cond: int) -> Tensor:
    """Solve the order conditions ``sum_k rho_k r_k^{j-1} = b_j``, ``j = 1..n_cond``, with
    ``b_j = z phi_{j+1}(z) j! / B(z)`` (Zhao et al. 2023, eq. 8) in float64, batched over
    steps. ``r``: ``(n, n_cond)`` node positions in units of ``h``; returns ``(n, n_cond)``."""
    phi = sp.phi(n_cond + 1)
    fact = torch.tensor([math.factorial(j) for j in range(1, n_cond + 1)], dtype=F64)
    b = phi[:, 2:] * fact / _b_over_z(phi, variant)
    R = r[:, None, :] ** torch.arange(n_cond, dtype=F64)[:, None]  # [j, k] = r_k^j
    return torch.linalg.solve(R, b)


def _b_over_z(phi: Tensor, variant: str) -> Tensor:
    """``B(z)/z``: 1 for ``bh1`` (``B = z``), ``phi_1(z)`` for ``bh2`` (``B = e^z - 1``)."""
    return torch.ones_like(phi[:, :1]) if variant == "bh1" else phi[:, 1:2]


@attrs.frozen
class _Coef:
    times: Tensor
    ab: tuple[tuple[float, float], ...]
    orders: tuple[int, ...]
    a: tuple[float, ...]
    c: tuple[tuple[float, ...], ...]
    corr_a: tuple[float, ...]
    corr_c: tuple[tuple[float, ...], ...]
    keep: int
    correct: bool  # UniC at every step (else at most the warm-up's first)
    warm: bool


@attrs.frozen(kw_only=True)
class UniPC(Multistep):
    """UniPC-p (Zhao et al. 2023, Algorithms 1-3): UniP-p predictor + UniC
    corrector, multistep. Order ``p + 1`` with the corrector (``p`` without), 1 NFE per step.

    Predictor, data prediction (``hh = -h``; noise prediction ``hh = h``, ``alpha <-> sigma``)::

        x~_t = (sigma_t/sigma_s) x_s - alpha_t expm1(hh) m_s - alpha_t B(h) sum_k rho_k D_k

    with ``D_k = (m_{s_k} - m_s)/r_k``, ``r_k = (lambda_{s_k} - lambda_s)/h`` over the
    ``p - 1`` previous outputs, and ``rho`` solving the order conditions ``sum_k rho_k
    r_k^{j-1} = hh phi_{j+1}(hh) j!/B(h)``, ``j < p`` (in float64). The corrector evaluates
    ``m_t`` at ``x~_t`` and recomputes the step with ``m_t`` as an extra node (``r = 1``, ``p``
    conditions); ``m_t`` (from the *uncorrected* ``x~_t``) becomes the next history value, so
    the corrector costs no NFE; it is skipped after the last step. Warm-up: ``min(p, i + 1)``.

    Options:

    - ``predictor_order`` ``p`` >= 1 (default 2, diffusers' ``solver_order``; at most 8); the
      convergence order is ``p + 1`` with the corrector, ``p`` without;
    - ``variant``: ``"bh2"`` (default, ``B(h) = expm1(hh)``, guided sampling) or ``"bh1"``
      (``B(h) = hh``, recommended for unconditional few-step sampling);
    - ``predict``: ``"data"`` (default) or ``"noise"``;
    - ``corrector`` (default ``True``): UniC on (diffusers ``disable_corrector`` off);
    - ``diffusers_order2_shortcut`` (default ``False``): ``rho = 1/2`` for UniP-2 and UniC-1
      instead of solving the 1x1 condition, as official UniPC and diffusers do; the orders are
      unchanged (the difference is ``O(h)`` in ``rho``) but results differ (diffusers PR #11612);
    - ``warmup`` (``"corrected"`` | ``"lower-order"``): with ``corrector=False`` and
      ``order >= 3``, whether UniC-1 corrects the first step (see :class:`Multistep`); the
      corrector, when on, does this anyway;
    - ``lower_order_final`` (default ``"auto"``) / ``lower_order_final_threshold`` (official
      UniPC and diffusers lower at any step count: ``True`` and ``None``), ``final_step``.

    Pitfalls: with the exact ``rho``, UniP-2 in data prediction is DPM-Solver++(2M)
    ``taylor`` and UniP-p in noise prediction is DEIS-p ``log-rho``.
    """

    name: ClassVar[str] = "unipc"
    # Official UniPC (``uni_pc.py``, ``UniPC.sample``) and diffusers lower the final steps at
    # every step count.
    lower_order_final_rules: ClassVar[Mapping[str, int | None]] = {
        "official": None, "diffusers": None}
    order: ClassVar[int] = 3  # the default UniP-2 + UniC; see convergence_order
    predictor_order: int = attrs.field(default=2, validator=number(integer=True, ge=1, le=8))
    variant: str = attrs.field(default="bh2", validator=one_of("bh1", "bh2"))
    predict: str = attrs.field(default="data", validator=one_of("data", "noise"))
    corrector: bool = attrs.field(default=True, validator=boolean)
    diffusers_order2_shortcut: bool = attrs.field(default=False, validator=boolean)

    def _prediction(self) -> str:
        return self.predict

    def _max_order(self) -> int:
        return self.predictor_order

    def _nominal_order(self) -> int:
        return self.predictor_order + int(self.corrector)

    def _predictor(self, p: int, u: Tensor, sp: Span) -> Tensor:
        """UniP-p weights on ``(m_s, m_{s_1}, ..)`` (newest first)."""
        phi = sp.phi(1)
        e = unit(u.shape[0], p, u)
        w = phi[:, 1:2] * e[0]
        if p == 1:
            return w
        r = u[:, 1:p]
        if p == 2 and self.diffusers_order2_shortcut:
            rho = torch.full_like(r, 0.5)
        else:
            rho = unipc_rhos(r, sp, self.variant, p - 1)
        d = sum(rho[:, k - 1:k] * (e[k] - e[0]) / r[:, k - 1:k] for k in range(1, p))
        return w + _b_over_z(phi, self.variant) * d

    def _corrector(self, p: int, u: Tensor, sp: Span) -> Tensor:
        """UniC-p weights on ``(m_t, m_s, m_{s_1}, ..)``: ``m_t`` at ``r = 1`` first."""
        phi = sp.phi(1)
        e = unit(u.shape[0], p + 1, u)
        new, old = e[0], e[1:]
        r = torch.cat([u[:, 1:p], torch.ones_like(u[:, :1])], dim=1)
        if p == 1 and self.diffusers_order2_shortcut:
            rho = torch.full_like(r, 0.5)
        else:
            rho = unipc_rhos(r, sp, self.variant, p)
        d = sum(rho[:, k - 1:k] * (old[k] - old[0]) / r[:, k - 1:k] for k in range(1, p))
        d = d + rho[:, p - 1:p] * (new - old[0])
        return phi[:, 1:2] * old[0] + _b_over_z(phi, self.variant) * d

    def coefficients(self, schedule, grid: Tensor) -> _Coef:
        nodes = Nodes.at(schedule, grid)
        steps = grid.numel() - 1
        orders = self._orders(steps, nodes.lam)
        warm = not self.corrector and self._warm(steps)
        a, c = order_table(orders, nodes, self.predict, self._predictor)
        corr_a, corr_c = ((), ())
        if self.corrector or warm:
            corr_a, corr_c = order_table(orders, nodes, self.predict, self._corrector)
        return _Coef(times=grid, ab=alpha_sigma(nodes), orders=orders, a=a, c=c, corr_a=corr_a,
                     corr_c=corr_c, keep=max(orders), correct=self.corrector, warm=warm)

    def buffers(self, coef: _Coef) -> int:
        return 1 if coef.correct or coef.warm else 0

    def outputs(self, coef: _Coef) -> int:
        return coef.keep + 1  # the history and the newest

    def step(self, state: SolverState) -> SolverState:
        plan, i, x = state.cache, state.index, state.x
        k = plan.coef
        base, *ms = state.history
        m = own(plan.model(x, plan.times[i], k.ab[i]), x)
        if base is not None:
            # UniC: x holds the prediction x~_i, whose output m is kept; x becomes x_i^c.
            x = combine(x, k.corr_a[i - 1], base, k.corr_c[i - 1], (m, *ms[::-1]))
        ms = (*ms, m)[-k.keep:]
        if i + 1 < state.steps and (k.correct or (k.warm and i == 0)):
            # x_i is the base of the next correction: the prediction goes to another buffer.
            out, base = (plan.buffers[0] if base is None else base), x
        else:
            out, base = x, None
        out = combine(out, k.a[i], x, k.c[i], ms[::-1])
        return self.finish(state, out, history=(base, *ms))
