"""Adaptive DPM-Solver-12 / -23 (Lu et al. 2022, arXiv 2206.00927, §3.4 and Algorithm 4 of
the appendix; official ``dpm_solver_pytorch.py::dpm_solver_adaptive``).

Each attempted step ``s -> t`` in the half log-SNR, ``h = lambda_t - lambda_s``, computes a lower
and a higher order DPM-Solver update that share their model evaluations:

- ``order=2`` (DPM-Solver-12): DPM-Solver-1 (DDIM) and DPM-Solver-2 (``r1 = 1/2``); 2 NFE;
- ``order=3`` (DPM-Solver-23): DPM-Solver-2 (``r1 = 1/3``) and DPM-Solver-3 (``r1 = 1/3``,
  ``r2 = 2/3``, reusing the point at ``r1``); 3 NFE.

With ``delta = max(atol, rtol max(|x_low|, |x_prev|))`` elementwise, the error of a sample is the
RMS of ``(x_high - x_low) / delta`` (on ``x/alpha`` by default, option ``error_state``). A
controller (option ``controller``, :class:`DPMAdaptive`) turns ``E`` into accept/reject and the
next step ``h <- min(factor h, lambda_end - lambda_s)``; an accepted step sets ``x <- x_high``,
``x_prev <- x_low``.

The updates are those of :mod:`solverlab_expint` (``Nodes``, ``Span``,
``singlestep_weights``: the phi-function weights, computed in float64), applied with
per-sample coefficients.
"""

from __future__ import annotations

import math
from typing import ClassVar

import attrs
import torch
from torch import Tensor

from solverlab import AdaptiveSolver, Solution, SolveLoop
from solverlab.errors import OptionError, SolverDivergedError
from solverlab.validators import number, one_of
from solverlab_expint import singlestep_weights
from solverlab_expint.integrator import Nodes, Span

__all__ = ["DPMAdaptive", "DPMAdaptiveError"]

F64 = torch.float64
_LIMITER_MIN = 1.0 - math.pi / 4  # 1 + atan(0 - 1): the smallest limited step factor


class DPMAdaptiveError(SolverDivergedError):
    """The step size collapsed (or became NaN), or ``max_steps`` attempts were used up; the
    message says what to change."""


_PID_OPTIONS = ("pcoeff", "icoeff", "dcoeff", "accept_safety")


_tol = number(gt=0.0)


def _limit(log_f: Tensor) -> Tensor:
    """The step factor ``exp(log_f)`` through the limiter ``1 + atan(f - 1)``: smooth, ``~f``
    near 1, within ``(1 - pi/4, 1 + pi/2)`` (Söderlind & Wang 2006)."""
    return 1.0 + torch.atan(torch.exp(log_f) - 1.0)


def _accept_safety(inst, attribute, value) -> None:
    number()(inst, attribute, value)
    if not _LIMITER_MIN < value <= 1.0:
        raise OptionError(
            f"{type(inst).__name__} ({inst.name!r}): option accept_safety={value!r} is not "
            "allowed; it "
            f"must be in (1 - pi/4, 1] = ({_LIMITER_MIN:.4f}, 1]: the limited step factor "
            "1 + atan(f - 1) never falls below 1 - pi/4, so a smaller value accepts every "
            "step, and above 1 steps within the tolerance are rejected (0.81: k-diffusion)")


@attrs.frozen(kw_only=True)
class DPMAdaptive(AdaptiveSolver):
    """Adaptive DPM-Solver-12 (``order=2``) / -23 (``order=3``), noise prediction, with
    step-size control per sample (module docstring). Uses only the grid's end points.

    Step-size controllers (option ``controller``; ``k = order``, ``E_n`` the error of attempt
    ``n``, ``L(f) = 1 + atan(f - 1)`` the limiter of Söderlind & Wang 2006, which keeps every
    factor within ``(1 - pi/4, 1 + pi/2) = (0.21, 2.57)``):

    - ``"standard"``: official DPM-Solver (Algorithm 4 of arXiv 2206.00927): accept iff
      ``E <= 1``; ``factor = theta E^{-1/k}``.
    - ``"pid"``: k-diffusion's ``sample_dpm_adaptive`` (``PIDStepSizeController``), a digital
      filter controller in Söderlind's sense (Söderlind 2003, ACM TOMS 29(1); I, PI and PID
      controllers of Gustafsson, Lundh & Söderlind 1988): ``factor = L(eps_0^{b1} eps_1^{b2}
      eps_2^{b3})`` with ``eps_0 = 1/E_n`` and ``eps_1``, ``eps_2`` the ``1/E`` of the last two
      *accepted* steps, ``b1 = (pcoeff + icoeff + dcoeff)/k``, ``b2 = -(pcoeff + 2 dcoeff)/k``,
      ``b3 = dcoeff/k``; accept iff ``factor >= accept_safety``. There is no safety factor: the
      step aims at ``E = 1``, and with the defaults (I-controller, ``factor = L(E^{-1/k})``)
      errors up to ``(1 + tan(accept_safety - 1))^{-k}``, 1.90 for ``k = 3`` and 1.53 for
      ``k = 2``, are accepted, so far fewer steps are rejected than with ``"standard"``.
    - ``"predictive"`` (default): ``"pid"`` (same accept rule), and after two consecutive
      accepted steps the factor is the smaller of the PID one and Gustafsson's predictive
      ``L((h_n / h_{n-1}) E_n^{-2/k} E_{n-1}^{1/k})`` (Gustafsson 1994, ACM TOMS 20(4); Hairer &
      Wanner, Solving ODEs II, §IV.8; RADAU5 takes the same minimum). It extrapolates the trend
      of the error: on the Gaussian mixtures of ``bench/adaptive.py`` (DDPM schedule) the
      error per unit ``h`` rises steeply over the first third of the ``lambda`` range, where an
      I-controller, following one step behind, is rejected about every other step.

    Measured (``bench/adaptive.py`` and more Gaussian mixtures, error at equal NFE against
    k-diffusion's; figures in ``bench/orders.md``): ``"standard"`` spends the largest share of
    its NFE on rejected steps, ``"pid"`` much less, ``"predictive"`` least. ``"pid"`` with
    ``stretch=1`` reproduces k-diffusion's NFE (rejections included) and its error;
    ``"standard"`` (default error norm) is less accurate than k-diffusion, mostly at
    tolerances <= 1e-3, through its rejections and ``theta``; ``"predictive"`` (with
    ``stretch=1.25``) is more accurate than k-diffusion at equal NFE, and at par only at the
    tightest tolerance, where few steps are rejected.

    Options:

    - ``rtol``, ``atol`` (default 1e-3 each; the error at the end is then ~1e-3 relative on
      the reference problems). Official DPM-Solver and k-diffusion default to ``rtol=0.05,
      atol=0.0078`` (data in ``[-1, 1]``, ``atol`` ~ one 8-bit level): good enough for images,
      but the result then depends on accept/reject decisions at the 5% level, so float32 and
      float64 solves differ by ~1e-2;
    - ``h_init`` (default 0.05): first step in ``lambda``;
    - ``controller``: ``"predictive"`` (default), ``"pid"`` or ``"standard"`` (above);
    - ``theta`` in ``(0, 1]`` (default 0.9; ``"standard"`` only): safety factor;
    - ``pcoeff``, ``icoeff``, ``dcoeff`` (default 0, 1, 0: the I-controller, as k-diffusion;
      ``"pid"`` and ``"predictive"`` only): ``icoeff > 0`` (it is the steady-state gain: a
      constant error ``E`` changes ``h`` by ``E^{-icoeff/k}``) and ``pcoeff + icoeff + dcoeff >
      0`` (the step must shrink as the current error grows); PI: e.g. ``pcoeff=0.4,
      icoeff=0.3``;
    - ``accept_safety`` in ``(1 - pi/4, 1]`` (default 0.81, k-diffusion's; ``"pid"`` and
      ``"predictive"`` only): the smallest limited factor that accepts; 1 accepts only ``E <=
      1`` (then about half the steps, aimed at ``E = 1``, are rejected: measured with
      ``"pid"`` much less accurate per NFE than 0.81, ``bench/orders.md``);
    - ``stretch`` in ``[1, 2]`` (default 1.25): a step proposed at ``>= 1/stretch`` of the
      remaining ``lambda`` is stretched to end the solve, instead of leaving a last short step
      (``order`` NFE for a sliver; MATLAB's ``ode45`` stretches by 10%; 1.25 measured better
      at tolerances >= 1e-3, the same below). 1: official DPM-Solver and k-diffusion (the step
      is only clipped to the remainder);
    - ``order``: 2 or 3 (default 3);
    - ``step_size``: ``"shared"`` (default; official DPM-Solver and k-diffusion: one ``h`` for
      the batch) or ``"per-sample"`` (each sample its own ``lambda``, ``h`` and controller
      state, exactly as if solved alone, torchdiffeq#122; a model call evaluates only the
      samples not yet finished, so NFE, counted in batched calls, is that of the hardest sample);
    - ``batch_norm`` (``"shared"`` only): how per-sample errors make the batch's ``E``:
      ``"rms"`` (default; k-diffusion: RMS over the whole batch) or ``"max"`` (official
      DPM-Solver: the largest per-sample RMS, stricter: every sample within tolerance);
    - ``error_state``: the state the error is measured on: ``"x/alpha"`` (default; the VE
      state k-diffusion integrates) or ``"x"`` (official DPM-Solver on VP ``x``). With
      ``atol`` on ``x/alpha`` the noisy end (``alpha`` small) is held to a tighter absolute
      tolerance, which measured more accurate per NFE on the Gaussian mixtures of
      ``bench/adaptive.py`` (``bench/orders.md``);
    - ``max_steps`` (default 10000): attempted steps before :class:`DPMAdaptiveError`.

    Official DPM-Solver is ``controller="standard", stretch=1, error_state="x",
    batch_norm="max"``; k-diffusion's ``sample_dpm_adaptive`` (``eta=0``) is
    ``controller="pid", stretch=1`` (it computes its times in float32; here they are float64).

    NFE is exact: ``order`` per attempted step (rejected ones included). ``Solution.times``
    holds the end points.

    Pitfall: official DPM-Solver stops when the mean ``|s - t_end| < 1e-5`` in ``t``; here the
    last step lands exactly on ``t_end`` (``h`` is clipped, or stretched, to the remaining
    ``lambda``).
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
    controller: str = attrs.field(default="predictive",
                                  validator=one_of("predictive", "pid", "standard"))
    pcoeff: float = attrs.field(default=0.0, validator=number())
    icoeff: float = attrs.field(default=1.0, validator=number(gt=0.0))
    dcoeff: float = attrs.field(default=0.0, validator=number())
    accept_safety: float = attrs.field(default=0.81, validator=_accept_safety)
    stretch: float = attrs.field(default=1.25, validator=number(ge=1.0, le=2.0))

    def __attrs_post_init__(self) -> None:
        owner = f"{type(self).__name__} ({self.name!r})"
        if self.controller == "standard":
            unused = [a for a in _PID_OPTIONS if getattr(self, a) != _DEFAULTS[a]]
            if unused:
                raise OptionError(
                    f"{owner}: option {unused[0]}={getattr(self, unused[0])!r} has no effect "
                    "with controller='standard' (its step factor is theta E^(-1/order), "
                    "accepted iff E <= 1); use controller='pid' or 'predictive', or drop "
                    + ", ".join(unused))
        elif self.theta != _DEFAULTS["theta"]:
            raise OptionError(
                f"{owner}: option theta={self.theta!r} has no effect with "
                f"controller={self.controller!r} (it has no safety factor; accept_safety sets "
                "which errors it accepts); use controller='standard' or drop theta")
        if self.pcoeff + self.icoeff + self.dcoeff <= 0:
            raise OptionError(
                f"{owner}: option pcoeff={self.pcoeff!r} with icoeff={self.icoeff!r}, "
                f"dcoeff={self.dcoeff!r} is not allowed; pcoeff + icoeff + dcoeff must be > 0 "
                "(the exponent of the current error: with it <= 0 a larger error would not "
                "shrink the step)")

    def _advice(self) -> str:
        return (f"loosen rtol (now {self.rtol:g}) / atol (now {self.atol:g}), lower order "
                f"(now {self.order}), or check that the model is finite along the solve")

    def _control(self, E: Tensor, state: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(accepted, factor, state)`` per sample from the error ``E`` of an attempted step of
        length ``h``: the next attempt's step is ``factor * h``. A NaN ``E`` rejects and makes
        the factor NaN. ``state`` (float64, one row per sample): ``log 1/E`` of the last two
        accepted steps and ``log h`` of the last one (NaN before the first)."""
        k = self.order
        if self.controller == "standard":
            return E <= 1.0, self.theta * E.clamp(min=1e-300) ** (-1.0 / k), state
        # In log space: with pcoeff > 0 a product of powers could meet 0 * inf.
        inv = -torch.log(E.clamp(min=1e-300))
        e1, e2, log_h1 = state.unbind(1)
        first = e1.isnan()  # k-diffusion: the history starts as the first attempt's error
        e1, e2 = torch.where(first, inv, e1), torch.where(first, inv, e2)
        p, i, d = self.pcoeff, self.icoeff, self.dcoeff
        factor = _limit(((p + i + d) * inv - (p + 2 * d) * e1 + d * e2) / k)
        ok = factor >= self.accept_safety
        if self.controller == "predictive":
            # Gustafsson: h_{n+1} = h_n (h_n / h_{n-1}) (1/E_n)^{1/k} (E_{n-1}/E_n)^{1/k}, over
            # the last two accepted steps, taken when smaller (RADAU5).
            pred = _limit(torch.log(h) - log_h1 + (2 * inv - e1) / k)
            factor = torch.where(ok & ~log_h1.isnan(), torch.minimum(factor, pred), factor)
        state = torch.where(ok.unsqueeze(1), torch.stack([inv, e1, torch.log(h)], dim=1),
                            torch.stack([e1, e2, log_h1], dim=1))
        return ok, factor, state

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
              check_finite=True, grad=False) -> Solution:
        """Solve from ``grid[0]`` to ``grid[-1]``. ``callback`` gets a
        :class:`~solverlab.StepInfo` after each attempt ``i``: per-sample times ``t`` (before
        the attempt) and ``t_next`` (after it: ``t`` where rejected), ``x``, ``denoised``
        (data prediction of the attempt's last evaluation, per sample), ``nfe``, and in
        ``extra``, for the samples of this attempt (all of them with ``step_size="shared"``;
        the unfinished ones with ``"per-sample"``), ``accepted`` (bool), ``error`` (``E``,
        float64) and ``h`` (the step attempted, in ``lambda``). The progress bar counts
        attempts. ``trajectory`` gives the two end states."""
        with SolveLoop(self, model, x, grid, callback=callback, progress=progress, steps=None,
                       check_finite=check_finite, grad=grad, error=DPMAdaptiveError,
                       advice=self._advice()) as loop:
            cur = self._run(loop, x)
        return loop.solution(cur, times=loop.grid[[0, -1]],
                             trajectory=torch.stack([x, cur]) if trajectory else None)

    def _run(self, loop: SolveLoop, x: Tensor) -> Tensor:
        den, grid = loop.denoiser, loop.grid
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
        ctrl = torch.full((n, 3), math.nan, dtype=F64)  # per-sample controller state
        denoised = torch.zeros_like(x) if loop.callback is not None else None
        for i in range(self.max_steps):
            idx = active.nonzero().flatten()
            if idx.numel() == 0:
                return cur
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
            last = hs * self.stretch >= rem
            hs = torch.where(last, rem, hs)  # the step attempted: clipped or stretched
            lam_t = torch.where(last, lam_end, lam_s[idx] + hs)
            t_t = torch.where(last, t_end, sch.t_of_lambda(lam_t))
            eps_s = den.noise(xs, s.t.to(dev))
            low, high = self._update(den, xs, s, lam_t, t_t, eps_s)
            if denoised is not None:  # the attempt's last evaluation covered these samples
                denoised[di] = den.last_denoised
            if ve:
                inv = (1.0 / sch.alpha(t_t)).to(x.dtype).to(dev).view(
                    (-1,) + (1,) * (x.ndim - 1))
                low_e, high_e = low * inv, high * inv
            else:
                low_e, high_e = low, high
            delta = torch.maximum(
                torch.full_like(low, self.atol),
                self.rtol * torch.maximum(low_e.abs(), ps.abs()))
            # The step-size control is not differentiated (grad=True differentiates through the
            # accepted steps, with the step sizes held).
            err = ((high_e - low_e) / delta).detach().reshape(idx.numel(), -1).to(F64)
            E = err.square().mean(dim=1).sqrt().cpu()
            E = torch.where(torch.isfinite(E), E, torch.full_like(E, math.nan))
            if self.step_size == "shared":
                E = (E.max() if self.batch_norm == "max" else E.square().mean().sqrt())
                E = E.expand(idx.numel())
            ok, factor, ctrl[idx] = self._control(E, ctrl[idx], hs)
            okd = ok.to(dev)
            cur[di[okd]] = high[okd]
            prev[di[okd]] = low_e[okd]
            t_before = t_s.clone()
            lam_s[idx[ok]] = lam_t[ok]
            t_s[idx[ok]] = t_t[ok]
            active[idx[ok & last]] = False
            # E = 0 (an exact step) can give h = inf; the min with the remainder caps it.
            h[idx] = torch.minimum(hs * factor, lam_end - lam_s[idx])
            loop.step(i, cur, t=t_before, t_next=t_s.clone(), denoised=denoised,
                      accepted=ok, error=E, h=hs)
        if not bool(active.any()):
            return cur
        raise DPMAdaptiveError(
            f"solver 'dpm-adaptive': {self.max_steps} attempted steps did not reach "
            f"t={float(t_end):.6g} (max_steps); " + self._advice())


_DEFAULTS = {a.name: a.default for a in attrs.fields(DPMAdaptive)}
