"""High-accuracy reference solutions of the probability-flow ODE.

Exact where the model has a closed form (``model.exact_flow``: Gaussian data, Wang & Vastola
2024). Otherwise a float64 adaptive torchdiffeq solve of the PF-ODE in the half log-SNR
``lambda`` on ``y = x/alpha`` (:class:`solverlab.PFODE` with ``variable="lambda"``)::

    dy/dlambda = -exp(-lambda) eps(alpha y, t(lambda))

which is smooth for every schedule, also where the ``t``-form is stiff (``dsigma/dt`` blows up
at ``t -> 0`` for VP). Per-sample times are handled by integrating ``r in [0, 1]`` with
``lambda = lambda_s + r (lambda_t - lambda_s)`` for each sample. The model is called directly
(not through a :class:`~solverlab.Denoiser`: no NFE count, guidance or thresholding), in a
chosen dtype, on a float64 state.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torchdiffeq import odeint

from .errors import InputError, OptionError, SolverDivergedError
from .model import Denoiser, Model, batch_time, check_output
from .ode import PFODE
from .schedule import as_f64

__all__ = ["ADAPTIVE_METHODS", "lambda_ode", "reference_solution"]

F64 = torch.float64

#: torchdiffeq methods with error control; fixed-step ones would ignore ``rtol``/``atol``.
ADAPTIVE_METHODS = ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun")




class _OverBudget(Exception):
    """Raised inside the right-hand side when the evaluation budget is spent."""


def _tolerance(option: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value > 0
    ):
        raise OptionError(
            f"reference_solution: option {option}={value!r} is not allowed; it must be a finite "
            "number > 0"
        )


def lambda_ode(model: Model, x: Tensor, t_start: Tensor, t_end: Tensor,
               dtype: torch.dtype = F64) -> tuple[Callable[[Tensor, Tensor], Tensor], Tensor]:
    """The right-hand side ``f(r, y)`` of the PF-ODE on ``y = x/alpha`` over ``r in [0, 1]``
    (``lambda`` linear in ``r`` from ``lambda(t_start)`` to ``lambda(t_end)``, per sample) and
    its initial value ``y(0)``; the solution at ``r = 1`` times ``alpha(t_end)`` is ``x_t_end``.
    ``t_start``/``t_end`` are float64 ``(b,)``; the model is called in ``dtype``."""
    sch, param = model.schedule, model.parameterization
    ode = PFODE(schedule=sch, variable="lambda")
    shape = (-1,) + (1,) * (x.ndim - 1)
    lam_s, lam_t = ode.v_of_t(t_start), ode.v_of_t(t_end)
    h = (lam_t - lam_s).view(shape)

    def rhs(r: Tensor, y: Tensor) -> Tensor:
        t = ode.t_of_v(lam_s + r * (lam_t - lam_s))
        xt = ode.to_x(y, t)
        xin = xt.to(dtype)
        out = check_output(model, model(xin, t), xin).to(F64)
        eps = param.to_noise(out, xt, sch.alpha(t).view(shape), sch.sigma(t).view(shape))
        return h * ode.velocity(y, t, eps)  # dy/dr = dlambda/dr dy/dlambda

    return rhs, ode.to_y(as_f64(x), t_start)


def reference_solution(
    model: Model | Denoiser,
    x: Tensor,
    t_start: Tensor | float,
    t_end: Tensor | float,
    *,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    method: str = "dopri8",
    use_exact: bool = True,
    dtype: torch.dtype = F64,
    max_nfe: int = 100_000,
) -> Tensor:
    """The probability-flow solution from ``t_start`` to ``t_end`` (scalars or ``(b,)``), in
    float64, shaped like ``x``.

    ``model.exact_flow`` when it gives one (and ``use_exact``); else an adaptive torchdiffeq
    ``method`` (one of :data:`ADAPTIVE_METHODS`) with ``rtol``/``atol`` on the ODE in ``lambda``
    (module docstring). The model is called directly in ``dtype`` (a float32 network needs
    looser tolerances); no NFE is counted. A :class:`Denoiser` is unwrapped to its model.

    The work is bounded: a solve that needs more than ``max_nfe`` model evaluations, whose
    step size collapses, or that ends non-finite raises
    :class:`~solverlab.errors.SolverDivergedError` (never a NaN result).
    """
    if isinstance(model, Denoiser):
        model = model.model
    if not isinstance(model, Model):
        raise OptionError(
            f"reference_solution: model={model!r} is not a solverlab.Model; wrap a network "
            "with solverlab.TorchModel(module, schedule, parameterization)"
        )
    if method not in ADAPTIVE_METHODS:
        raise OptionError(
            f"reference_solution: option method={method!r} is not allowed; choose one of "
            + ", ".join(repr(m) for m in ADAPTIVE_METHODS)
        )
    _tolerance("rtol", rtol)
    _tolerance("atol", atol)
    if isinstance(max_nfe, bool) or not isinstance(max_nfe, int) or max_nfe < 1:
        raise OptionError(
            f"reference_solution: option max_nfe={max_nfe!r} is not allowed; it must be an "
            "integer >= 1")
    if not isinstance(x, Tensor) or x.ndim < 1 or not bool(torch.isfinite(x).all()):
        raise InputError("reference_solution: x must be a finite tensor of shape (batch, ...)")
    x64 = x.detach().to(F64)
    if x64.shape[0] == 0:  # an empty batch: nothing to solve
        return x64.clone()
    ts, te = batch_time(x64, t_start, "t_start"), batch_time(x64, t_end, "t_end")
    with torch.no_grad():
        exact = getattr(model, "exact_flow", None) if use_exact else None
        if callable(exact):
            out = exact(x64, ts, te)
            if out is not None:
                return out.to(F64).reshape(x.shape)
        for what, t in (("t_start", ts), ("t_end", te)):
            bad = t[~torch.isfinite(model.schedule.lambda_(t))]
            if bad.numel():
                raise InputError(
                    f"reference_solution: {what}={float(bad[0])!r} has an infinite log-SNR under "
                    f"schedule {model.schedule.name!r}; stay inside [t_min, t_max] = "
                    f"[{model.schedule.t_min}, {model.schedule.t_max}]"
                )
        rhs, y0 = lambda_ode(model, x64, ts, te, dtype)
        calls = [0]

        def bounded(r: Tensor, y: Tensor) -> Tensor:
            calls[0] += 1
            if calls[0] > max_nfe:
                raise _OverBudget(float(r))
            return rhs(r, y)

        grid = torch.tensor([0.0, 1.0], dtype=F64, device=x64.device)
        where = f"the {method} reference solve from t={t_start} to t={t_end}"
        try:
            # step_t makes the last step land on r = 1: torchdiffeq otherwise steps past the
            # end and returns its dense-output interpolant, whose error (~1e-8) swamps 1e-10.
            y1 = odeint(bounded, y0, grid, rtol=rtol, atol=atol, method=method,
                        options={"step_t": grid[1:], "max_num_steps": max_nfe})[-1]
        except _OverBudget as e:
            raise SolverDivergedError(
                f"reference_solution: {where} needed more than max_nfe={max_nfe} model "
                f"evaluations (stopped {e.args[0]:.3g} of the way in lambda); loosen rtol/atol "
                f"(now {rtol:g}/{atol:g}), raise max_nfe, or check the model there") from None
        except AssertionError as e:  # torchdiffeq reports a collapsed step size by assert
            raise SolverDivergedError(
                f"reference_solution: {where} failed: torchdiffeq says {e!s}; check that the "
                "model is finite at these times, or loosen rtol/atol") from None
        out = model.schedule.alpha(te).view((-1,) + (1,) * (x.ndim - 1)) * y1
    if not bool(torch.isfinite(out).all()):
        raise SolverDivergedError(
            f"reference_solution: the {method} solve from t={t_start} to t={t_end} gave "
            "non-finite values"
        )
    return out
