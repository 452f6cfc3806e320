"""solverlab_simple: the standard denoising loss ``simple`` (Ho et al. 2020, eq. 14), in the
model's own parameterization.

Registered through the ``solverlab`` entry-point group exactly as a third party's plugin.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor

import solverlab
from solverlab.objective import plain_loss
from solverlab.validators import boolean

__all__ = ["Simple", "solverlab_register_objectives"]


@attrs.frozen(kw_only=True)
class Simple(solverlab.Objective):
    """``L = mean_b ||target(x0, eps, alpha_t, sigma_t) - out(alpha_t x0 + sigma_t eps, t)||^2``
    (Ho et al. 2020, eq. 14, "L_simple"), summed over each example's values and averaged over
    the batch.

    ``t`` is drawn uniformly: a step ``n`` of ``0..N-1`` on a ``vp-discrete`` schedule, a
    continuous time in ``[t_min, t_max]`` otherwise; ``eps ~ N(0, I)``. The target is the
    model's parameterization's (``eps`` for noise prediction, ``x0`` for data prediction,
    ``alpha eps - sigma x0`` for velocity, ``-eps/sigma`` for the score), with no extra
    weighting. Works with any model whose call is differentiable (a
    :class:`~solverlab.TorchModel`).

    Options:

    - ``antithetic``: draw half the batch and pair each time with its mirror image
      (``n -> N-1-n``, ``t -> t_min + t_max - t``), so every batch spans the time range.
    """

    name: ClassVar[str] = "simple"
    antithetic: bool = attrs.field(default=False, validator=boolean)

    def loss(self, model: Any, x0: Tensor, *, generator: torch.Generator | None = None,
             t: Tensor | float | None = None) -> Tensor:
        """The batch loss (a scalar). Randomness (times, then noise) comes from ``generator``;
        ``t`` fixes the times instead of drawing them (one per example, or a scalar)."""
        return plain_loss(self.name, model, x0, generator=generator, t=t,
                          antithetic=self.antithetic)


@solverlab.hookimpl
def solverlab_register_objectives(registry):
    registry.add(Simple)
