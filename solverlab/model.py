"""Models (a network or an analytic density, in its own parameterization) and the
:class:`Denoiser` that solvers see.

A :class:`Model` is called with the state ``x`` and the *physical* time ``t`` (float64, shape
``(batch,)``); it converts ``t`` to whatever its network expects (MATH.md §8.3: physical time for
``alpha, sigma, lambda`` is kept apart from the conditioning time fed to the network).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from .errors import InputError, OptionError
from .parameterization import Parameterization
from .schedule import Schedule, as_f64

__all__ = ["Denoiser", "Model", "TorchModel", "as_denoiser"]


class Model(ABC):
    """A subclass sets ``schedule`` and ``parameterization`` and implements ``__call__``.

    ``__call__(x, t, **cond)`` gets ``t`` of shape ``(batch,)`` in float64 and returns a tensor
    shaped like ``x`` in the model's parameterization. Extra keyword arguments (conditioning)
    are passed through from :class:`Denoiser`.
    """

    schedule: Schedule
    parameterization: Parameterization

    @abstractmethod
    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor: ...


def _parameterization(p: Parameterization | str) -> Parameterization:
    if isinstance(p, Parameterization):
        return p
    from .registry import get_parameterization

    return get_parameterization(p)


def _schedule(s: Schedule | str) -> Schedule:
    if isinstance(s, Schedule):
        return s
    from .registry import get_schedule

    return get_schedule(s)


class TorchModel(Model):
    """Adapts ``module(x, time_input, **cond)`` to :class:`Model`.

    ``time_input`` says what the network was trained to take as its time:

    - ``"t"``: the continuous time ``t`` (score-SDE models);
    - ``"index"``: the discrete step index ``N t - 1`` of a ``vp-discrete`` schedule (DDPM
      networks trained on ``0..N-1``; ``= 1000 (t - 1/N)`` for ``N = 1000``, MATH.md §6.2);
    - ``"sigma"``: the noise level ``sigma/alpha`` (EDM / k-diffusion).

    The time input is cast to the dtype of ``x``, at least float32.
    """

    TIME_INPUTS = ("t", "index", "sigma")

    def __init__(
        self,
        module: nn.Module,
        schedule: Schedule | str,
        parameterization: Parameterization | str = "noise",
        time_input: str = "t",
    ) -> None:
        if not callable(module):
            raise OptionError(f"TorchModel: module={module!r} is not callable; pass an nn.Module")
        if time_input not in self.TIME_INPUTS:
            raise OptionError(
                f"TorchModel: option time_input={time_input!r} is not allowed; choose one of "
                + ", ".join(repr(v) for v in self.TIME_INPUTS)
            )
        self.module = module
        self.schedule = _schedule(schedule)
        self.parameterization = _parameterization(parameterization)
        if time_input == "index" and not hasattr(self.schedule, "index"):
            raise OptionError(
                f"TorchModel: time_input='index' needs a discrete schedule such as 'vp-discrete'; "
                f"{self.schedule.name!r} has no discrete index"
            )
        self.time_input = time_input

    def network_time(self, t: Tensor) -> Tensor:
        """The time input the network gets for physical time ``t`` (float64)."""
        if self.time_input == "index":
            return self.schedule.index(t)
        if self.time_input == "sigma":
            return self.schedule.sigma_ve(t)
        return t

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        # At least float32: bfloat16 rounds the index 999 to 1000, outside the training range.
        dtype = torch.promote_types(x.dtype, torch.float32)
        return self.module(x, self.network_time(t).to(dtype), **cond)

    def __repr__(self) -> str:
        return (f"TorchModel({type(self.module).__name__}, schedule={self.schedule.name!r}, "
                f"parameterization={self.parameterization.name!r}, time_input={self.time_input!r})")


class Denoiser:
    """What solvers see: conversions of a :class:`Model`'s output plus an exact NFE count.

    ``nfe`` counts network evaluations: one per model call, a classifier-free-guidance call
    (conditional and unconditional halves in one batch) included. Coefficients ``alpha, sigma``
    are computed in float64 and cast to the dtype of ``x``.

    Options:

    - ``cond`` / ``uncond``: keyword arguments for the model (dicts of tensors); with
      ``guidance_scale`` ``w != 1`` and ``uncond`` given, the output is
      ``out_u + w (out_c - out_u)`` from one doubled batch (Ho & Salimans 2022).
    - ``thresholding``: dynamic thresholding of the data prediction (Saharia et al. 2022):
      ``s = max(quantile(|x0|, ratio), max_value)`` per sample, ``x0 <- clamp(x0, -s, s) / s``;
      :meth:`noise` is then derived from the thresholded ``x0``.
    """

    def __init__(
        self,
        model: Model,
        *,
        cond: dict[str, Any] | None = None,
        uncond: dict[str, Any] | None = None,
        guidance_scale: float = 1.0,
        thresholding: bool = False,
        threshold_ratio: float = 0.995,
        threshold_max: float = 1.0,
    ) -> None:
        if not isinstance(model, Model):
            raise OptionError(
                f"Denoiser: model={model!r} is not a solverlab.Model; wrap an nn.Module with "
                "solverlab.TorchModel(module, schedule, parameterization)"
            )
        if not 0.0 < threshold_ratio < 1.0:
            raise OptionError(
                f"Denoiser: option threshold_ratio={threshold_ratio!r} must lie in (0, 1)"
            )
        if not (isinstance(threshold_max, (int, float)) and math.isfinite(threshold_max)
                and threshold_max > 0):
            raise OptionError(
                f"Denoiser: option threshold_max={threshold_max!r} must be a finite number > 0"
            )
        if not (isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale)):
            raise OptionError(
                f"Denoiser: option guidance_scale={guidance_scale!r} must be a finite number"
            )
        if guidance_scale != 1.0 and uncond is None:
            raise OptionError(
                f"Denoiser: guidance_scale={guidance_scale!r} needs uncond= (the unconditional "
                "model inputs) for classifier-free guidance"
            )
        self.model = model
        self.cond = dict(cond or {})
        self.uncond = None if uncond is None else dict(uncond)
        self.guidance_scale = float(guidance_scale)
        self.thresholding = bool(thresholding)
        self.threshold_ratio = float(threshold_ratio)
        self.threshold_max = float(threshold_max)
        self.nfe = 0
        #: When true, every evaluation stores its data prediction in :attr:`last_denoised`
        #: (a fresh tensor, taken at evaluation time: solvers may update ``x`` in place later).
        #: :class:`solverlab.SolveLoop` switches it on only for solves with a callback.
        self.track_denoised = False
        self.last_denoised: Tensor | None = None

    @property
    def schedule(self) -> Schedule:
        return self.model.schedule

    @property
    def parameterization(self) -> Parameterization:
        return self.model.parameterization

    def time(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``t`` as a float64 tensor of shape ``(batch,)`` on the device of ``x``."""
        return batch_time(x, t)

    def coefficients(self, x: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """``alpha(t), sigma(t)`` shaped to broadcast against ``x``, in the dtype of ``x``."""
        t = self.time(x, t)
        shape = (-1,) + (1,) * (x.ndim - 1)
        s = self.schedule
        return (s.alpha(t).view(shape).to(x.dtype), s.sigma(t).view(shape).to(x.dtype))

    def __call__(self, x: Tensor, t: Tensor | float) -> Tensor:
        """The model's raw output (guided if so configured); counts one NFE."""
        t = self.time(x, t)
        self.nfe += 1
        if self.uncond is None or self.guidance_scale == 1.0:
            out = self.model(x, t, **self.cond)
        else:
            keys = set(self.cond) | set(self.uncond)
            both = {k: torch.cat([self.cond[k], self.uncond[k]]) for k in keys}
            out_c, out_u = self.model(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
            out = out_u + self.guidance_scale * (out_c - out_u)
        if self.track_denoised:
            self._remember(out, x, t)
        return out

    def _remember(self, out: Tensor, x: Tensor, t: Tensor) -> None:
        alpha, sigma = self.coefficients(x, t)
        x0 = self.parameterization.to_data(out, x, alpha, sigma)
        x0 = self._threshold(x0) if self.thresholding else x0
        # A fresh tensor: the output or x themselves may be updated in place by the solver.
        self.last_denoised = x0.clone() if x0 is out or x0 is x else x0.detach()

    def _threshold(self, x0: Tensor) -> Tensor:
        flat = x0.reshape(x0.shape[0], -1).abs()
        # torch.quantile refuses half precision (diffusers PR #1349): take it in float32.
        s = torch.quantile(flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat,
                           self.threshold_ratio, dim=1)
        s = s.clamp(min=self.threshold_max).to(x0.dtype).view((-1,) + (1,) * (x0.ndim - 1))
        return torch.maximum(torch.minimum(x0, s), -s) / s

    def data(self, x: Tensor, t: Tensor | float, *,
             coefficients: tuple[float, float] | None = None, out: Tensor | None = None,
             ) -> Tensor:
        """Data prediction ``x0(x, t)`` (thresholded if so configured); one NFE.

        ``coefficients``: ``(alpha(t), sigma(t))`` when the caller already has them (solvers
        pass Python floats, precomputed once per grid in float64; tensors as
        :meth:`coefficients` returns them work too); the schedule is then not evaluated.
        ``out`` (with float ``coefficients``): a buffer shaped like ``x`` that the conversion
        may write into (:meth:`~solverlab.Parameterization.to_data_into`) instead of
        allocating; the result may still be another tensor (no conversion needed, or
        thresholding)."""
        p = self.parameterization
        alpha, sigma = self.coefficients(x, t) if coefficients is None else coefficients
        if out is None or coefficients is None:
            x0 = p.to_data(self(x, t), x, alpha, sigma)
        else:
            x0 = p.to_data_into(out, self(x, t), x, alpha, sigma)
        return self._threshold(x0) if self.thresholding else x0

    def noise(self, x: Tensor, t: Tensor | float, *,
              coefficients: tuple[float, float] | None = None, out: Tensor | None = None,
              ) -> Tensor:
        """Noise prediction ``eps(x, t)``; one NFE. ``coefficients``, ``out`` as in :meth:`data`."""
        alpha, sigma = self.coefficients(x, t) if coefficients is None else coefficients
        if self.thresholding:  # eps from the thresholded x0 (the schedule evaluated once)
            return (x - alpha * self.data(x, t, coefficients=(alpha, sigma))) / sigma
        p = self.parameterization
        if out is None or coefficients is None:
            return p.to_noise(self(x, t), x, alpha, sigma)
        return p.to_noise_into(out, self(x, t), x, alpha, sigma)

    def drift(self, x: Tensor, t: Tensor | float) -> Tensor:
        """Probability-flow ODE drift in ``t``: ``dlog_alpha/dt x - sigma dlambda/dt eps``
        (:class:`solverlab.ode.PFODE` with ``variable="t"``). One NFE."""
        from .ode import PFODE  # ode builds on this module

        return PFODE(schedule=self.schedule, variable="t").rhs(self, x, t)

    def __repr__(self) -> str:
        return f"Denoiser({self.model!r}, nfe={self.nfe})"


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


def as_denoiser(model_or_denoiser: Model | Denoiser) -> Denoiser:
    """A :class:`Denoiser` for ``model_or_denoiser`` (returned as is if it already is one)."""
    if isinstance(model_or_denoiser, Denoiser):
        return model_or_denoiser
    return Denoiser(model_or_denoiser)
