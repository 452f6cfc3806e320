"""What a network outputs, and the conversions between outputs, noise and clean data.

With ``x = alpha x0 + sigma eps`` (any schedule, VP or VE):

====================  ==========================  =======================================
name                  output                      notes
====================  ==========================  =======================================
``noise``             ``eps``                     DDPM, DPM-Solver
``data``              ``x0``                      DPM-Solver++, k-diffusion denoisers
``velocity``          ``v = alpha eps - sigma x0``  Salimans & Ho 2022; general (non-VP) inverse
``score``             ``-eps / sigma``            score SDE
====================  ==========================  =======================================

The velocity inverse ``[x0, eps] = [[alpha, -sigma], [sigma, alpha]] [x, v] / (alpha^2 + sigma^2)``
holds for any schedule, and reduces to ``x0 = alpha x - sigma v`` for VP.
All conversions are affine in the output, so guidance may be applied in any of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import MappingProxyType
from typing import ClassVar

import attrs
import torch
from torch import Tensor

__all__ = ["PARAMETERIZATIONS", "Data", "Noise", "Parameterization", "Score", "Velocity"]


@attrs.frozen
class Parameterization(ABC):
    """Conversions of a network output ``out`` at state ``x`` with coefficients ``alpha, sigma``
    (tensors broadcastable against ``x``)."""

    name: ClassVar[str]

    @abstractmethod
    def to_data(self, out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor: ...

    @abstractmethod
    def to_noise(self, out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor: ...

    @abstractmethod
    def target(self, x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """The training target: what an exact network outputs at ``x = alpha x0 + sigma noise``."""

    def to_data_into(self, buffer: Tensor, out: Tensor, x: Tensor, alpha: float,
                     sigma: float) -> Tensor:
        """:meth:`to_data` with Python-float coefficients, written into ``buffer`` (shaped like
        ``x``, not aliasing ``out`` or ``x``) where the conversion can be done in place, so a
        solver's step allocates nothing. Returns the result: ``buffer``, or (this default, and
        where no conversion is needed) another tensor."""
        return self.to_data(out, x, alpha, sigma)

    def to_noise_into(self, buffer: Tensor, out: Tensor, x: Tensor, alpha: float,
                      sigma: float) -> Tensor:
        """:meth:`to_noise` into ``buffer``, as :meth:`to_data_into`."""
        return self.to_noise(out, x, alpha, sigma)


def _axpy(buffer: Tensor, x: Tensor, a: float, out: Tensor, b: float) -> Tensor:
    """``a x + b out``: into ``buffer`` in place, or out of place where autograd records the
    operation (``out=`` is not differentiable)."""
    if torch.is_grad_enabled() and (x.requires_grad or out.requires_grad):
        return x * a + out * b
    return torch.mul(x, a, out=buffer).add_(out, alpha=b)


@attrs.frozen
class Noise(Parameterization):
    name: ClassVar[str] = "noise"

    def to_data(self, out, x, alpha, sigma):
        if isinstance(alpha, float) and isinstance(sigma, float):
            return self.to_data_into(torch.empty_like(x), out, x, alpha, sigma)
        return (x - sigma * out) / alpha

    def to_data_into(self, buffer, out, x, alpha, sigma):
        # x/alpha - (sigma/alpha) out: multiplications stream faster than a division
        return _axpy(buffer, x, 1.0 / alpha, out, -sigma / alpha)

    def to_noise(self, out, x, alpha, sigma):
        return out

    def target(self, x0, noise, alpha, sigma):
        return noise


@attrs.frozen
class Data(Parameterization):
    name: ClassVar[str] = "data"

    def to_data(self, out, x, alpha, sigma):
        return out

    def to_noise(self, out, x, alpha, sigma):
        if isinstance(alpha, float) and isinstance(sigma, float):
            return self.to_noise_into(torch.empty_like(x), out, x, alpha, sigma)
        return (x - alpha * out) / sigma

    def to_noise_into(self, buffer, out, x, alpha, sigma):
        return _axpy(buffer, x, 1.0 / sigma, out, -alpha / sigma)

    def target(self, x0, noise, alpha, sigma):
        return x0


@attrs.frozen
class Velocity(Parameterization):
    name: ClassVar[str] = "velocity"

    def to_data(self, out, x, alpha, sigma):
        if isinstance(alpha, float) and isinstance(sigma, float):
            return self.to_data_into(torch.empty_like(x), out, x, alpha, sigma)
        return (alpha * x - sigma * out) / (alpha**2 + sigma**2)

    def to_noise(self, out, x, alpha, sigma):
        if isinstance(alpha, float) and isinstance(sigma, float):
            return self.to_noise_into(torch.empty_like(x), out, x, alpha, sigma)
        return (sigma * x + alpha * out) / (alpha**2 + sigma**2)

    def to_data_into(self, buffer, out, x, alpha, sigma):
        n = alpha**2 + sigma**2
        return _axpy(buffer, x, alpha / n, out, -sigma / n)

    def to_noise_into(self, buffer, out, x, alpha, sigma):
        n = alpha**2 + sigma**2
        return _axpy(buffer, x, sigma / n, out, alpha / n)

    def target(self, x0, noise, alpha, sigma):
        return alpha * noise - sigma * x0


@attrs.frozen
class Score(Parameterization):
    name: ClassVar[str] = "score"

    def to_data(self, out, x, alpha, sigma):
        return (x + sigma**2 * out) / alpha

    def to_noise(self, out, x, alpha, sigma):
        return -sigma * out

    def target(self, x0, noise, alpha, sigma):
        return -noise / sigma


#: The core's parameterizations by name: what plugin ``solverlab`` registers, and the names a
#: model accepts without a registry lookup. Plugins add more through the registry.
PARAMETERIZATIONS = MappingProxyType({c.name: c for c in (Noise, Data, Velocity, Score)})
