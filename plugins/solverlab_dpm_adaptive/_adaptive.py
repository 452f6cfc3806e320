"""Adaptive DPM-Solver-12 / -23 (Lu et al. 2022, arXiv 2206.00927, §3.4 and Algorithm 4 of
the appendix; official ``dpm_solver_pytorch.py::dpm_solver_adaptive``; MATH.md §6.1).

Each attempted step ``s -> t`` in the half log-SNR, ``h = lambda_t - lambda_s``, computes a lower
and a higher order DPM-Solver update that share their model evaluations:

- ``order=2`` (DPM-Solver-12): DPM-Solver-1 (DDIM) and DPM-Solver-2 (``r1 = 1/2``); 2 NFE;
- ``order=3`` (DPM-Solver-23): DPM-Solver-2 (``r1 = 1/3``) and DPM-Solver-3 (``r1 = 1/3``,
  ``r2 = 2/3``, reusing the point at ``r1``); 3 NFE.

With ``delta = max(atol, rtol max(|x_low|, |x_prev|))`` elementwise, the error of a sample is the
RMS of ``(x_high - x_low) / delta`` (on ``x/alpha`` by default, option ``error_state``);
``E <= 1`` accepts (``x <- x_high``, ``x_prev <- x_low``)
and in either case ``h <- min(theta h E^{-1/order}, lambda_end - lambda_s)``.

The updates are those of :mod:`solverlab_expint` (``Nodes``, ``Span``,
``singlestep_weights``: the phi-function weights, computed in float64), applied with
per-sample coefficients.
"""

from __future__ import annotations

import math
import time
from typing import ClassVar

import attrs
import torch
from torch import Tensor

from solverlab import AdaptiveSolver, Solution
from solverlab.errors import SolverDivergedError
from solverlab.grid import check_grid
from solverlab.model import as_denoiser
from solverlab.solver import _check_x
from solverlab.validators import number, one_of
from solverlab_expint._common import Nodes, Span
from solverlab_expint._singlestep import singlestep_weights

__all__ = ["DPMAdaptive", "DPMAdaptiveError"]

F64 = torch.float64


class DPMAdaptiveError(SolverDivergedError):
    """The step size collapsed (or became NaN), or ``max_steps`` attempts were used up; the
    message says what to change."""


def _tol(inst, attribute, value) -> None:
    number(gt=0.0)(inst, attribute, value)


@attrs.frozen(kw_only=True)
class DPMAdaptive(AdaptiveSolver):
    """Adaptive DPM-Solver-12 (``order=2``) / -23 (``order=3``), noise prediction, with
    step-size control per sample (module docstring). Uses only the grid's end points.

    Options:

    - ``rtol``, ``atol`` (default 1e-3 each; the error at the end is then ~1e-3 relative on
      the reference problems). Official DPM-Solver and k-diffusion default to ``rtol=0.05,
      atol=0.0078`` (data in ``[-1, 1]``, ``atol`` ~ one 8-bit level): good enough for images,
      but the result then depends on accept/reject decisions at the 5% level, so float32 and
      float64 solves differ by ~1e-2;
    - ``h_init`` (default 0.05): first step in ``lambda``;
    - ``theta`` in ``(0, 1]`` (default 0.9): safety factor;
    - ``order``: 2 or 3 (default 3);
    - ``step_size``: ``"shared"`` (default; official DPM-Solver and k-diffusion: one ``h`` for
      the batch) or ``"per-sample"`` (each sample its own ``lambda`` and ``h``, exactly as if
      solved alone, torchdiffeq#122; a model call evaluates only the samples not yet finished,
      so NFE, counted in batched calls, is that of the hardest sample);
    - ``batch_norm`` (``"shared"`` only): how per-sample errors make the batch's ``E``:
      ``"rms"`` (default; k-diffusion: RMS over the whole batch) or ``"max"`` (official
      DPM-Solver: the largest per-sample RMS, stricter: every sample within tolerance);
    - ``error_state``: the state the error is measured on: ``"x/alpha"`` (default; the VE
      state k-diffusion integrates) or ``"x"`` (official DPM-Solver on VP ``x``). With
      ``atol`` on ``x/alpha`` the noisy end (``alpha`` small) is held to a tighter absolute
      tolerance, which measured 1.5-3x more accurate per NFE on the Gaussian mixtures of
      ``bench/adaptive.py``;
    - ``max_steps`` (default 10000): attempted steps before :class:`DPMAdaptiveError`.

    NFE is exact: ``order`` per attempted step (rejected ones included). ``Solution.times``
    holds the end points.

    Pitfall: official DPM-Solver stops when the mean ``|s - t_end| < 1e-5`` in ``t``; here the
    last step lands exactly on ``t_end`` (``h`` is clipped to the remaining ``lambda``).
    """

    name: ClassVar[str] = "dpm-adaptive"
    order: int = attrs.field(default=3, validator=one_of(2, 3))
    rtol: float = attrs.field(default=1e-3, validator=_tol)
    atol: float = attrs.field(default=1e-3, validator=_tol)
    h_init: float = attrs.field(default=0.05, validator=_tol)
    theta: float = attrs.field(default=0.9, validator=number(gt=0.0, le=1.0))
    step_size: str = attrs.field(default="shared", validator=one_of("shared", "per-sample"))
    max_steps: int = attrs.field(default=10000, validator=number(integer=True, ge=1))
    error_state: str = attrs.field(default="x/alpha", validator=one_of("x", "x/alpha"))
    batch_norm: str = attrs.field(default="rms", validator=one_of("rms", "max"))

    def _advice(self) -> str:
        return (f"loosen rtol (now {self.rtol:g}) / atol (now {self.atol:g}), lower order "
                f"(now {self.order}), or check that the model is finite along the solve")

    def _update(self, den, x: Tensor, s: Nodes, lam_t: Tensor, t_t: Tensor, eps_s: Tensor
                ) -> tuple[Tensor, Tensor]:
        """``(x_low, x_high)`` from ``s`` to ``lambda_t`` (per sample)."""
        sch, shape = den.schedule, (-1,) + (1,) * (x.ndim - 1)
        t = Nodes.at(sch, t_t)
        h = lam_t - s.lam
        rs = (0.5,) if self.order == 2 else (1 / 3, 2 / 3)
        mids = [Nodes.at(sch, sch.t_of_lambda(s.lam + r * h)) for r in rs]
        rr = [(m.lam - s.lam) / h for m in mids]  # where the points landed, in units of h

        def apply(sp: Span, w: Tensor, ms: list[Tensor]) -> Tensor:
            c = sp.coefficients(w).to(x.dtype)
            out = sp.A.to(x.dtype).view(shape) * x
            for j, m in enumerate(ms):
                out = out + c[:, j].view(shape) * m
            return out

        def model(u: Tensor, at: Nodes) -> Tensor:
            return den.noise(u, at.t.to(x.device))

        ms = [eps_s]
        # Intermediate points: u1 by DPM-Solver-1, u2 by the order-2 Taylor form (as official
        # DPM-Solver-3 and solverlab_expint).
        for j, m in enumerate(mids[: self.order - 1]):
            sp = Span.of("noise", s, m)
            w = singlestep_weights(j + 1, [r / rr[j] for r in rr[:j]], sp, "taylor")
            ms.append(model(apply(sp, w, ms), m))
        sp = Span.of("noise", s, t)
        if self.order == 2:  # DPM-Solver-1 vs -2
            low = apply(sp, singlestep_weights(1, [], sp, "dpmsolver"), ms[:1])
        else:  # DPM-Solver-2 (r1 = 1/3) vs -3
            low = apply(sp, singlestep_weights(2, rr[:1], sp, "dpmsolver"), ms[:2])
        high = apply(sp, singlestep_weights(self.order, rr, sp, "dpmsolver"), ms)
        return low, high

    def solve(self, model, x, grid, *, callback=None, progress=None, trajectory=False,
              check_finite=True) -> Solution:
        """Solve from ``grid[0]`` to ``grid[-1]``. ``callback`` gets ``i`` (attempt),
        ``t`` (per-sample times, float64), ``x``, ``nfe``, ``accepted`` (bool per sample) after
        each attempt; ``trajectory`` gives the two end states."""
        den = as_denoiser(model)
        grid = check_grid(grid, den.schedule)
        _check_x(x)
        nfe0, start = den.nfe, time.perf_counter()
        sch, n, dev = den.schedule, x.shape[0], x.device
        t_end = grid[-1].to(F64)
        lam_end = sch.lambda_(t_end)
        ve = self.error_state == "x/alpha"
        cur = x.clone()
        # x_prev of the error norm, in the state the error is measured in
        prev = x / float(sch.alpha(grid[0])) if ve else x.clone()
        t_s = grid[0].to(F64).expand(n).clone()
        lam_s = sch.lambda_(t_s)
        span = float(lam_end - lam_s[0])
        h = torch.full((n,), min(self.h_init, span), dtype=F64)
        active = torch.ones(n, dtype=torch.bool)
        with torch.no_grad():
            for i in range(self.max_steps):
                idx = active.nonzero().flatten()
                if idx.numel() == 0:
                    break
                hs = h[idx]
                if not bool(torch.isfinite(hs).all()) or float(hs.min()) <= 1e-12 * span:
                    raise DPMAdaptiveError(
                        f"solver 'dpm-adaptive': the step size collapsed to {float(hs.min()):.3g} "
                        f"at lambda {float(lam_s[idx].min()):.6g} (end {float(lam_end):.6g}); "
                        + self._advice())
                di = idx.to(dev)
                xs, ps = cur[di], prev[di]
                s = Nodes.at(sch, t_s[idx])
                rem = lam_end - lam_s[idx]
                last = hs >= rem
                lam_t = torch.where(last, lam_end, lam_s[idx] + hs)
                t_t = torch.where(last, t_end, sch.t_of_lambda(lam_t))
                eps_s = den.noise(xs, s.t.to(dev))
                low, high = self._update(den, xs, s, lam_t, t_t, eps_s)
                if ve:
                    inv = (1.0 / sch.alpha(t_t)).to(x.dtype).to(dev).view(
                        (-1,) + (1,) * (x.ndim - 1))
                    low_e, high_e = low * inv, high * inv
                else:
                    low_e, high_e = low, high
                delta = torch.maximum(
                    torch.full_like(low, self.atol),
                    self.rtol * torch.maximum(low_e.abs(), ps.abs()))
                err = ((high_e - low_e) / delta).reshape(idx.numel(), -1).to(F64)
                E = err.square().mean(dim=1).sqrt().cpu()
                E = torch.where(torch.isfinite(E), E, torch.full_like(E, math.nan))
                if self.step_size == "shared":
                    E = (E.max() if self.batch_norm == "max" else E.square().mean().sqrt())
                    E = E.expand_as(E)
                ok = E <= 1.0
                okd = ok.to(dev)
                cur[di[okd]] = high[okd]
                prev[di[okd]] = low_e[okd]
                lam_s[idx[ok]] = lam_t[ok]
                t_s[idx[ok]] = t_t[ok]
                active[idx[ok & last]] = False
                # E = 0 (an exact step) would give h = inf; the min with the remainder caps it.
                grow = self.theta * hs * E.clamp(min=1e-300) ** (-1.0 / self.order)
                h[idx] = torch.minimum(grow, lam_end - lam_s[idx])
                if callback is not None:
                    callback({"i": i, "t": t_s.clone(), "x": cur, "nfe": den.nfe - nfe0,
                              "accepted": ok})
            else:
                raise DPMAdaptiveError(
                    f"solver 'dpm-adaptive': {self.max_steps} attempted steps did not reach "
                    f"t={float(t_end):.6g} (max_steps); " + self._advice())
        if check_finite and not bool(torch.isfinite(cur).all()):
            raise DPMAdaptiveError("solver 'dpm-adaptive' ended with NaN or inf; "
                                   + self._advice())
        return Solution(x=cur, nfe=den.nfe - nfe0, times=grid[[0, -1]],
                        trajectory=torch.stack([x, cur]) if trajectory else None,
                        wall_time=time.perf_counter() - start)
