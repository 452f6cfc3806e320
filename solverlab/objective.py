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

from .errors import InputError
from .schedule import Schedule

__all__ = ["Objective", "discrete_steps", "noised", "sample_times", "squared_error"]


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
    (Nguyen et al. 2024, sec. 5): the pair spans the time range evenly.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InputError(f"sample_times: batch={batch!r} is not allowed; give an int >= 1")
    half = (batch + 1) // 2 if antithetic else batch
    n = discrete_steps(schedule)
    if n is not None:
        lo = round(schedule.t_min * n) - 1
        hi = round(schedule.t_max * n) - 1
        k = torch.randint(lo, hi + 1, (half,), generator=generator, dtype=torch.int64)
        if antithetic:
            k = torch.cat([k, lo + hi - k])[:batch]
        return (k.to(torch.float64) + 1) / n
    u = torch.rand(half, generator=generator, dtype=torch.float64)
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
