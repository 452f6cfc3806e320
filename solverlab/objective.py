"""Training objectives (losses); concrete objectives come from plugins."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import attrs
from torch import Tensor

__all__ = ["Objective"]


@attrs.frozen(kw_only=True)
class Objective(ABC):
    """A training loss for a :class:`~solverlab.Model` on a batch of clean data ``x0``."""

    name: ClassVar[str]

    @abstractmethod
    def loss(self, model: Any, x0: Tensor, *, generator: Any = None) -> Tensor:
        """A scalar loss whose gradient trains ``model``."""
