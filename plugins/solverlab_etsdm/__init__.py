"""solverlab_etsdm: E-TSDM, early timestep-shared training (Yang et al. 2024, "Lipschitz
singularities in diffusion models", arXiv 2306.11251), as the objective ``etsdm``.

Registered through the ``solverlab`` entry-point group exactly as a third party's plugin.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor

import solverlab
from solverlab.objective import discrete_steps, plain_loss
from solverlab.validators import number

__all__ = ["ETSDM", "network_time_range", "solverlab_register_objectives"]

#: The share of the network time range, measured from 0, that the automatic threshold covers:
#: Yang et al. 2024 (arXiv 2306.11251) share the first 100 of DDPM's 1000 steps.
AUTO_SHARE = 0.1


def _raw_network_time(model: Any, t: Tensor) -> Tensor:
    """The network time of physical ``t`` before any time map (the conversion of
    :class:`~solverlab.TorchModel` by its ``time_input``)."""
    if model.time_input == "index":
        return model.schedule.index(t)
    if model.time_input == "sigma":
        return model.schedule.sigma_ve(t)
    return torch.as_tensor(t, dtype=torch.float64)


def network_time_range(model: Any) -> tuple[float, float]:
    """``(s_min, s_max)``: the network times of ``t_min`` and ``t_max`` for ``model`` (a
    :class:`~solverlab.TorchModel`), before any time map; ``(0, N-1)`` for the index of a
    ``vp-discrete`` schedule with ``N`` steps."""
    s = _raw_network_time(model, torch.tensor([model.schedule.t_min, model.schedule.t_max],
                                              dtype=torch.float64))
    return float(s[0]), float(s[1])


@attrs.frozen(kw_only=True)
class ETSDM(solverlab.Objective):
    """Early timestep-shared training (Yang et al. 2024, E-TSDM): the loss of ``simple``, but
    the network's time input ``s`` below a threshold ``t_tilde`` is replaced by the left end
    of its sub-interval, ``f(s) = floor(s n / t_tilde) t_tilde / n`` (``n`` equal sub-intervals
    of ``[0, t_tilde)``; ``s >= t_tilde`` unchanged).

    Only the conditioning time is shared: ``x_t`` is built with the true ``alpha_t, sigma_t``
    and the target is the true one. The map lives on the model
    (``TorchModel(..., time_map=objective.time_map(model))``) so that every solver feeds the
    network the same shared time when sampling while its ``alpha, sigma, lambda`` stay at the
    true time; :meth:`loss` refuses a model that does not carry it.

    Options (``t_tilde`` on the network's time scale, see :class:`~solverlab.TorchModel`):

    - ``t_tilde``: the threshold; ``None`` chooses 10 % of the network time range measured
      from 0: ``0.1 N`` on the ``index`` scale of a ``vp-discrete`` schedule with ``N`` steps
      (100 for DDPM's 1000, the paper's setting), ``0.1 t_max`` for ``time_input="t"``; a
      ``time_input="sigma"`` model needs it given.
    - ``n``: the number of sub-intervals (5, the paper's setting).
    """

    name: ClassVar[str] = "etsdm"
    t_tilde: float | None = attrs.field(
        default=None, validator=number(gt=0, none="the automatic threshold"))
    n: int = attrs.field(default=5, validator=number(ge=1, integer=True))

    def threshold(self, model: Any) -> float:
        """``t_tilde`` for ``model``: the option, or the automatic choice; checked to lie
        inside the model's network time range."""
        time_input = getattr(model, "time_input", None)
        if time_input not in ("t", "index", "sigma") or not hasattr(model, "schedule"):
            raise solverlab.OptionError(
                f"ETSDM ('etsdm'): model {model!r} has no network time input; E-TSDM shares "
                "the time a network is fed, so train a solverlab.TorchModel")
        lo, hi = network_time_range(model)
        if self.t_tilde is not None:
            t_tilde = float(self.t_tilde)
            given = f"t_tilde={self.t_tilde!r}"
        elif time_input == "sigma":
            raise solverlab.OptionError(
                "ETSDM ('etsdm'): option t_tilde=None (automatic) is not allowed for a model "
                "with time_input='sigma': there is no natural share of its noise-level range "
                f"[{lo:.6g}, {hi:.6g}] to choose; give the threshold on the sigma scale, e.g. "
                "solverlab.get_objective('etsdm', t_tilde=0.5)")
        elif time_input == "index":
            steps = discrete_steps(model.schedule) or getattr(
                model.schedule, "num_train_timesteps", None)
            if not isinstance(steps, int):
                raise solverlab.OptionError(
                    f"ETSDM ('etsdm'): option t_tilde=None (automatic) needs the number of "
                    f"discrete steps of the schedule {model.schedule!r}; give t_tilde on its "
                    "index scale")
            t_tilde = AUTO_SHARE * steps
            given = f"t_tilde=None (automatic: {t_tilde:.6g} = 0.1 N, N = {steps})"
        else:
            t_tilde = AUTO_SHARE * model.schedule.t_max
            given = f"t_tilde=None (automatic: {t_tilde:.6g} = 0.1 t_max)"
        if not lo < t_tilde <= hi:
            raise solverlab.OptionError(
                f"ETSDM ('etsdm'): option {given} is not allowed for this model: its network "
                f"time ({time_input!r}) ranges over [{lo:.6g}, {hi:.6g}], so give "
                f"{lo:.6g} < t_tilde <= {hi:.6g} (on the network's time scale)")
        return t_tilde

    def time_map(self, model: Any) -> solverlab.TimeMap:
        """``solverlab.TimeMap(threshold=t_tilde, n=n)`` on ``model``'s network time scale."""
        return solverlab.TimeMap(threshold=self.threshold(model), n=self.n)

    def loss(self, model: Any, x0: Tensor, *, generator: torch.Generator | None = None,
             t: Tensor | float | None = None) -> Tensor:
        """The batch loss (a scalar): ``mean_b ||target - out||^2`` at the true ``t`` with the
        network fed the shared time. Randomness (times, then noise) comes from ``generator``;
        ``t`` fixes the times instead (one per example, or a scalar)."""
        want = self.time_map(model)
        have = getattr(model, "time_map", None)
        if have != want:
            raise solverlab.OptionError(
                f"ETSDM ('etsdm'): the model's time_map is {have!r}, but this objective "
                f"(t_tilde={self.t_tilde!r}, n={self.n!r}) trains with {want!r}. E-TSDM "
                "quantises only the network's time input, and the model carries that map to "
                "sampling: build the model with "
                "TorchModel(..., time_map=objective.time_map(model))")
        return plain_loss(self.name, model, x0, generator=generator, t=t)


@solverlab.hookimpl
def solverlab_register_objectives(registry):
    registry.add(ETSDM)
