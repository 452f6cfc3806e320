"""Training objectives (losses); concrete objectives come from plugins.

An objective turns a model (usually a :class:`~solverlab.TorchModel`) and a batch of clean data
``x0`` into a scalar loss. The helpers here are the public pieces objectives share: drawing
training times (discrete steps of a ``vp-discrete`` schedule or continuous times, optionally
antithetic), noising ``x0`` at the true ``alpha_t, sigma_t`` and the per-example squared error.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor

from .errors import InputError, ModelOutputError
from .model import check_output
from .schedule import Schedule

__all__ = [
    "Objective", "check_data", "check_times", "discrete_steps", "draw_noise", "noised",
    "plain_loss", "residual", "sample_times", "squared_error",
]


def discrete_steps(schedule: Schedule) -> int | None:
    """``N`` for a discrete-time schedule (``vp-discrete``: steps at ``t = (n+1)/N``), else
    ``None``."""
    table = getattr(schedule, "_log_alpha_table", None)
    return None if table is None or not hasattr(schedule, "index") else int(table.numel())


def sample_times(schedule: Schedule, batch: int, *, generator: torch.Generator | None = None,
                 antithetic: bool = False) -> Tensor:
    """``batch`` training times (float64, shape ``(batch,)``).

    Discrete schedules draw the step ``n`` uniformly from ``0..N-1`` (``t = (n+1)/N``); others
    draw ``t`` uniformly in ``[t_min, t_max]``. ``antithetic=True`` pairs the first half with
    its mirror image (``n -> N-1-n``, ``t -> t_min + t_max - t``), as SA-DPM's trainer does
    (Nguyen et al. 2024, SA-DPM): the pair spans the time range evenly.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InputError(f"sample_times: batch={batch!r} is not allowed; give an int >= 1")
    half = (batch + 1) // 2 if antithetic else batch
    # Drawn on the generator's device (a CUDA generator cannot fill a CPU tensor).
    device = None if generator is None else generator.device
    n = discrete_steps(schedule)
    if n is not None:
        lo = round(schedule.t_min * n) - 1
        hi = round(schedule.t_max * n) - 1
        k = torch.randint(lo, hi + 1, (half,), generator=generator, dtype=torch.int64,
                          device=device)
        if antithetic:
            k = torch.cat([k, lo + hi - k])[:batch]
        return (k.to(torch.float64) + 1) / n
    u = torch.rand(half, generator=generator, dtype=torch.float64, device=device)
    t = schedule.t_min + (schedule.t_max - schedule.t_min) * u
    if antithetic:
        t = torch.cat([t, schedule.t_min + schedule.t_max - t])[:batch]
    return t


def noised(schedule: Schedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """``x_t = alpha_t x0 + sigma_t noise`` at the true times ``t`` (shape ``(batch,)``)."""
    shape = (-1,) + (1,) * (x0.ndim - 1)
    alpha = schedule.alpha(t).to(x0.dtype).reshape(shape)
    sigma = schedule.sigma(t).to(x0.dtype).reshape(shape)
    return alpha * x0 + sigma * noise


def squared_error(out: Tensor, target: Tensor) -> Tensor:
    """``||out - target||^2`` per example (summed over all but the batch dimension)."""
    return (out - target).square().flatten(1).sum(1)


def check_data(who: str, x0: Any) -> None:
    """Refuse a batch ``x0`` an objective cannot train on: not a floating-point tensor of
    shape ``(batch, ...)`` with ``batch >= 1`` and at least one value per example, or not
    finite. ``who`` names the objective in the :class:`~solverlab.errors.InputError`."""
    if not isinstance(x0, Tensor) or not x0.is_floating_point():
        what = f"a tensor of dtype {x0.dtype}" if isinstance(x0, Tensor) else type(x0).__name__
        raise InputError(f"{who}: x0 is {what}; give the clean data as a floating-point "
                         "tensor of shape (batch, ...)")
    if x0.ndim < 2 or x0.shape[0] < 1 or x0[0].numel() < 1:
        raise InputError(f"{who}: x0 has shape {tuple(x0.shape)}; give a batch of shape "
                         "(batch, ...) with batch >= 1 and at least one value per example "
                         "(a batch of scalars is x0[:, None])")
    if not bool(torch.isfinite(x0).all()):
        bad = int((~torch.isfinite(x0)).flatten(1).any(1).sum())
        raise InputError(f"{who}: x0 holds NaN or infinite values ({bad} of "
                         f"{x0.shape[0]} examples); clean the data before training")


def check_times(who: str, schedule: Schedule, t: Any, batch: int) -> Tensor:
    """Times given to an objective in place of drawn ones, as float64 of shape ``(batch,)``:
    finite and inside ``[t_min, t_max]``; a discrete schedule's times must be its steps
    ``(n+1)/N``. A scalar is used for every example."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,) or not bool(torch.isfinite(t).all()):
        raise InputError(f"{who}: t={t!r} is not allowed; give finite times of shape "
                         f"({batch},) (one per example) or a scalar")
    slack = 1e-12 * (schedule.t_max - schedule.t_min)
    if bool(((t < schedule.t_min - slack) | (t > schedule.t_max + slack)).any()):
        raise InputError(f"{who}: t ranges over [{float(t.min())!r}, {float(t.max())!r}], "
                         f"outside the schedule's [t_min, t_max] = [{schedule.t_min!r}, "
                         f"{schedule.t_max!r}]")
    n = discrete_steps(schedule)
    if n is not None:
        index = t * n - 1
        if bool(((index - index.round()).abs() > 1e-9).any()):
            raise InputError(f"{who}: t={t!r} is not on the steps t = (n+1)/N of the discrete "
                             f"schedule (N = {n}); give t = schedule.t_of_index(n) for integer "
                             "steps n")
    return t


def draw_noise(x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise shaped like ``x0`` (its dtype and device), drawn from
    ``generator`` on the generator's device."""
    device = x0.device if generator is None else generator.device
    return torch.randn(x0.shape, generator=generator, dtype=x0.dtype,
                       device=device).to(x0.device)


def residual(model: Any, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """``target - model(x_t, t)`` per example, shaped like ``x0``, with
    ``x_t = alpha_t x0 + sigma_t noise`` and the target of the model's parameterization
    (``noise`` for noise prediction: ``eps - eps_theta(x_t, t)``), all at the true times ``t``.

    Differentiable through the model. An output not shaped like ``x0`` raises
    :class:`~solverlab.errors.ModelOutputError`, and so does a NaN or infinite one (a diverged
    network is not trained on silently)."""
    schedule = model.schedule
    t = t.to(device=x0.device, dtype=torch.float64)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    alpha = schedule.alpha(t).to(x0.dtype).reshape(shape)
    sigma = schedule.sigma(t).to(x0.dtype).reshape(shape)
    x = alpha * x0 + sigma * noise
    out = check_output(model, model(x, t), x)
    if not bool(torch.isfinite(out).all()):
        raise ModelOutputError(
            f"model {model!r} returned NaN or infinite values at times t in "
            f"[{float(t.min()):.6g}, {float(t.max()):.6g}]; the network diverged (lower the "
            "learning rate or clip gradients) or its inputs are out of range")
    return model.parameterization.target(x0, noise, alpha, sigma) - out


@attrs.frozen(kw_only=True)
class Objective(ABC):
    """A training loss for a :class:`~solverlab.Model` on a batch of clean data ``x0``.

    Options are attrs fields with validators. :meth:`time_map` says how the network's time
    input is conditioned while training with this objective; the trainer builds the model with
    it, stores it in the checkpoint, and every solver applies it when sampling.
    """

    name: ClassVar[str]

    def time_map(self, model: Any) -> Any:
        """The :class:`~solverlab.TimeMap` the network is trained (and sampled) with, or
        ``None`` (the identity). ``model`` gives the schedule and the network time scale."""
        return None

    @abstractmethod
    def loss(self, model: Any, x0: Tensor, *, generator: torch.Generator | None = None
             ) -> Tensor:
        """A scalar loss whose gradient trains ``model``; randomness from ``generator``."""


def plain_loss(who: str, model: Any, x0: Tensor, *, generator: torch.Generator | None = None,
               t: Tensor | float | None = None, antithetic: bool = False) -> Tensor:
    """The standard denoising loss ``mean_b ||target - model(x_t, t)||^2`` (sum over each
    example's values) at the true ``alpha_t, sigma_t``, in the model's parameterization (Ho et
    al. 2020, eq. 14 for noise prediction). Randomness from ``generator``: the times
    (:func:`sample_times`), then the noise; ``t`` fixes the times instead (checked by
    :func:`check_times`). ``who`` names the objective in error messages."""
    check_data(who, x0)
    batch = x0.shape[0]
    if t is None:
        t = sample_times(model.schedule, batch, generator=generator, antithetic=antithetic)
    else:
        t = check_times(who, model.schedule, t, batch)
    noise = draw_noise(x0, generator)
    return residual(model, x0, t, noise).square().flatten(1).sum(1).mean()
