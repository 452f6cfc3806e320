"""Objectives for the trainer's tests (the registered ones live in plugins): a plain
noise-prediction loss, and the same loss with E-TSDM-style shared conditioning times."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch

from solverlab import Objective, TimeMap
from solverlab.objective import noised, sample_times, squared_error


@attrs.frozen(kw_only=True)
class PlainObjective(Objective):
    """``E ||eps - eps_theta(alpha_t x0 + sigma_t eps, t)||^2`` (Ho et al. 2020, eq. 14)."""

    name: ClassVar[str] = "test-plain"
    weight: float = 1.0

    def loss(self, model: Any, x0: torch.Tensor, *, generator: torch.Generator | None = None
             ) -> torch.Tensor:
        t = sample_times(model.schedule, x0.shape[0], generator=generator)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        out = model(noised(model.schedule, x0, t, eps), t)
        return self.weight * squared_error(out, eps).mean()


@attrs.frozen(kw_only=True)
class SharedTimeObjective(PlainObjective):
    """:class:`PlainObjective` with the network time shared on ``[0, threshold)`` in ``n``
    sub-intervals (Yang et al. 2024, sec. 4)."""

    name: ClassVar[str] = "test-shared"
    threshold: float = 100.0
    n: int = 5

    def time_map(self, model: Any) -> TimeMap:
        return TimeMap(threshold=self.threshold, n=self.n)
