"""Models (a network or an analytic density, in its own parameterization) and the
:class:`Denoiser` that solvers see.

A :class:`Model` is called with the state ``x`` and the *physical* time ``t`` (float64, shape
``(batch,)``); it converts ``t`` to whatever its network expects (physical time for
``alpha, sigma, lambda`` is kept apart from the conditioning time fed to the network:
docs/mathematics.md#physical-and-conditioning-time).
"""

from __future__ import annotations

import difflib
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from .errors import ModelOutputError, OptionError
from .ode import PFODE
from .parameterization import PARAMETERIZATIONS, Parameterization
from .schedule import SCHEDULES, Schedule, batch_time

__all__ = ["Denoiser", "Model", "TimeMap", "TorchModel", "as_denoiser", "check_output"]


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


def _positive(name: str) -> Any:
    def check(_inst: Any, _attr: Any, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value > 0):
            raise OptionError(f"TimeMap: option {name}={value!r} is not allowed; give a finite "
                              "number > 0")
    return check


def _count(_inst: Any, _attr: Any, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionError(f"TimeMap: option n={value!r} is not allowed; give an int >= 1")


@attrs.frozen(kw_only=True)
class TimeMap:
    """Timestep-condition sharing on the network's time scale (E-TSDM: Yang et al. 2024,
    arXiv 2306.11251).

    ``[0, threshold)`` is cut into ``n`` equal sub-intervals and a network time ``s`` in one of
    them is replaced by the sub-interval's left end, ``floor(s n / threshold) threshold / n``;
    ``s >= threshold`` passes unchanged. It acts on what the network is fed (after the
    ``index``/``sigma`` conversion of :class:`TorchModel`), never on the physical time that
    gives ``alpha``, ``sigma`` and ``lambda``. The identity map is ``None`` on a model.
    """

    threshold: float = attrs.field(validator=_positive("threshold"))
    n: int = attrs.field(validator=_count)

    def __attrs_post_init__(self) -> None:
        # after the check: a converter would run before it (True, "5" became numbers)
        object.__setattr__(self, "threshold", float(self.threshold))

    @property
    def width(self) -> float:
        return self.threshold / self.n

    @property
    def boundaries(self) -> list[float]:
        """The sub-interval ends ``i threshold / n``, ``i = 0..n`` (network time scale)."""
        return [i * self.width for i in range(self.n + 1)]

    def __call__(self, s: Tensor) -> Tensor:
        # The relative slack keeps a node that sits on a boundary up to round-off (index
        # 39.999999999 for 40) in the sub-interval it starts rather than the one before.
        k = torch.floor(s / self.width * (1 + 1e-9) + 1e-9)
        return torch.where(s < self.threshold, (k * self.width).to(s.dtype), s)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "shared", "threshold": self.threshold, "n": self.n}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> TimeMap | None:
        """The map :meth:`to_dict` wrote (``None`` stays the identity)."""
        if data is None:
            return None
        if not isinstance(data, Mapping) or data.get("kind") != "shared":
            raise OptionError(f"TimeMap: cannot read the time map {data!r}; expected "
                              "{'kind': 'shared', 'threshold': ..., 'n': ...} or null")
        return cls(threshold=data["threshold"], n=data["n"])


def _core_part(kind: str, value: Any, base: type, table: Mapping[str, type]) -> Any:
    # Names resolve from the core's own name tables: building a model never loads plugins
    # (and this module never imports the registry). A plugin's part comes as an object.
    if isinstance(value, base):
        return value
    if isinstance(value, str) and value in table:
        return table[value]()
    names = ", ".join(repr(n) for n in table)
    if not isinstance(value, str):
        raise OptionError(f"{kind}={value!r} is not a {base.__name__} nor one of the core "
                          f"{kind} names {names}")
    close = difflib.get_close_matches(value, list(table), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise OptionError(
        f"{kind}={value!r} is not one of the core {kind} names {names}; {hint}for a {kind} "
        f"from a plugin pass the object: {kind}=solverlab.get_{kind}({value!r})"
    )


def _parameterization(p: Parameterization | str) -> Parameterization:
    """``p`` itself, or the core parameterization named ``p`` (no registry lookup)."""
    return _core_part("parameterization", p, Parameterization, PARAMETERIZATIONS)


def _schedule(s: Schedule | str) -> Schedule:
    """``s`` itself, or the core schedule named ``s`` with its defaults (no registry lookup)."""
    return _core_part("schedule", s, Schedule, SCHEDULES)


class TorchModel(Model):
    """Adapts ``module(x, time_input, **cond)`` to :class:`Model`.

    ``time_input`` says what the network was trained to take as its time:

    - ``"t"``: the continuous time ``t`` (score-SDE models);
    - ``"index"``: the discrete step index ``N t - 1`` of a ``vp-discrete`` schedule (DDPM
      networks trained on ``0..N-1``; ``= 1000 (t - 1/N)`` for ``N = 1000``, official DPM-Solver's);
    - ``"sigma"``: the noise level ``sigma/alpha`` (EDM / k-diffusion).

    The time input is cast to the dtype of ``x``, at least float32. ``schedule`` and
    ``parameterization`` are objects or core names (``"vp-linear"``, ``"noise"``, ...); a
    plugin's part is passed as an object, e.g. ``solverlab.get_schedule("my-schedule")``.

    The output: a diffusers ``BaseOutput`` is unwrapped to its ``.sample`` and a one-element
    tuple to its tensor; ``output_channels=C`` keeps the first ``C`` channels (dim 1) of a
    network that also predicts its variance (learned sigma, ``2C`` channels), as diffusers'
    schedulers do.

    ``time_map`` (a :class:`TimeMap`, e.g. E-TSDM's timestep sharing) is applied to the
    network's time input after that conversion, by every solver alike.
    """

    TIME_INPUTS = ("t", "index", "sigma")

    def __init__(
        self,
        module: nn.Module,
        schedule: Schedule | str,
        parameterization: Parameterization | str = "noise",
        time_input: str = "t",
        output_channels: int | None = None,
        time_map: TimeMap | None = None,
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
        if output_channels is not None and (isinstance(output_channels, bool) or not isinstance(
                output_channels, int) or output_channels < 1):
            raise OptionError(
                f"TorchModel: option output_channels={output_channels!r} is not allowed; give the "
                "number of leading output channels to keep (an int >= 1) or None"
            )
        self.output_channels = output_channels
        if time_map is not None and not isinstance(time_map, TimeMap):
            raise OptionError(f"TorchModel: option time_map={time_map!r} is not allowed; give a "
                              "solverlab.TimeMap or None")
        self.time_map = time_map

    def network_time(self, t: Tensor) -> Tensor:
        """The time input the network gets for physical time ``t`` (float64), ``time_map``
        applied."""
        if self.time_input == "index":
            s = self.schedule.index(t)
        elif self.time_input == "sigma":
            s = self.schedule.sigma_ve(t)
        else:
            s = t
        return s if self.time_map is None else self.time_map(s)

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        # At least float32: bfloat16 rounds the index 999 to 1000, outside the training range.
        dtype = torch.promote_types(x.dtype, torch.float32)
        out = self.module(x, self.network_time(t).to(dtype), **cond)
        # diffusers' models return a BaseOutput (``.sample``) or, with return_dict=False, a
        # one-element tuple: take the tensor.
        if not isinstance(out, Tensor):
            if isinstance(getattr(out, "sample", None), Tensor):
                out = out.sample
            elif isinstance(out, tuple) and len(out) == 1 and isinstance(out[0], Tensor):
                out = out[0]
        if self.output_channels is not None and isinstance(out, Tensor) and out.ndim >= 2:
            out = out[:, :self.output_channels]  # learned-variance channels dropped (diffusers)
        return out

    def __repr__(self) -> str:
        return (f"TorchModel({type(self.module).__name__}, schedule={self.schedule.name!r}, "
                f"parameterization={self.parameterization.name!r}, time_input={self.time_input!r}"
                + (f", time_map={self.time_map!r})" if self.time_map is not None else ")"))


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
        if not isinstance(thresholding, bool):
            raise OptionError(
                f"Denoiser: option thresholding={thresholding!r} is not allowed; it must be True "
                "or False"
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
        self.thresholding = thresholding
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
            out = check_output(self.model, self.model(x, t, **self.cond), x)
        else:
            keys = set(self.cond) | set(self.uncond)
            both = {k: torch.cat([self.cond[k], self.uncond[k]]) for k in keys}
            xx = torch.cat([x, x])
            out_c, out_u = check_output(self.model, self.model(xx, torch.cat([t, t]), **both),
                                        xx).chunk(2)
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
        return PFODE(schedule=self.schedule, variable="t").rhs(self, x, t)

    def __repr__(self) -> str:
        return f"Denoiser({self.model!r}, nfe={self.nfe})"


def check_output(model: Any, out: Any, x: Tensor) -> Tensor:
    """``model``'s output ``out`` for input ``x``, checked where it enters (the Denoiser, the
    reference solver): a floating-point tensor of exactly the shape of ``x`` (never
    broadcast), returned in the dtype of ``x``; else a
    :class:`~solverlab.errors.ModelOutputError` naming the model, the shapes and the likely
    cause."""
    if isinstance(out, Tensor) and out.shape == x.shape and out.dtype == x.dtype:
        return out
    if not isinstance(out, Tensor):
        raise ModelOutputError(
            f"model {model!r} returned {type(out).__name__} for x of shape "
            f"{tuple(x.shape)}; a model returns one tensor shaped like x. "
            + _output_hint(out))
    if out.shape != x.shape:
        raise ModelOutputError(
            f"model {model!r} returned shape {tuple(out.shape)} for x of shape "
            f"{tuple(x.shape)}; the output must have exactly the shape of x (it is never "
            "broadcast). " + _shape_hint(tuple(out.shape), tuple(x.shape)))
    if not out.is_floating_point():
        raise ModelOutputError(
            f"model {model!r} returned dtype {out.dtype}; a model returns a "
            f"floating-point tensor (x is {x.dtype})")
    return out.to(x.dtype)


def _output_hint(out: Any) -> str:
    if out is None:
        return "It returned None: does its forward() end with a return?"
    if isinstance(getattr(out, "sample", None), Tensor):
        return ("It looks like a diffusers output: unwrap `.sample` (TorchModel does this "
                "itself).")
    if isinstance(out, (tuple, list)):
        return (f"A {type(out).__name__} of {len(out)}: return the prediction alone "
                "(TorchModel unwraps a one-element tuple).")
    return "Return the prediction as a torch.Tensor."


def _shape_hint(got: tuple[int, ...], want: tuple[int, ...]) -> str:
    if len(got) == len(want) >= 2 and got[0] == want[0] and got[2:] == want[2:] \
            and got[1] == 2 * want[1]:
        return (f"Twice the channels of x: a network that also predicts its variance (learned "
                f"sigma)? Use TorchModel(..., output_channels={want[1]}) to keep the first "
                f"{want[1]} channels, as diffusers does.")
    if got == want[1:]:
        return "The batch dimension is missing."
    if not got:
        return "It is a scalar."
    if len(got) == len(want) and all(g in (1, w) for g, w in zip(got, want)):
        return "It would broadcast against x, which hides a wrong network head."
    return "Check the network's output head."


def as_denoiser(model_or_denoiser: Model | Denoiser) -> Denoiser:
    """A :class:`Denoiser` for ``model_or_denoiser`` (returned as is if it already is one)."""
    if isinstance(model_or_denoiser, Denoiser):
        return model_or_denoiser
    return Denoiser(model_or_denoiser)
