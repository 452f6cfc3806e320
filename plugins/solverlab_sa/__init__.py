"""solverlab_sa: the sequence-aware loss of SA-DPM (Nguyen et al. 2024, "On inference
stability for diffusion models", arXiv 2312.12431), as the objective ``sa``.

Registered through the ``solverlab`` entry-point group exactly as a third party's plugin.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor

import solverlab
from solverlab.objective import (
    check_data,
    check_times,
    discrete_steps,
    draw_noise,
    residual,
    sample_times,
)
from solverlab.validators import boolean, number, one_of

__all__ = ["SequenceAware", "solverlab_register_objectives"]

#: The default spacing of consecutive continuous times: this share of ``t_max - t_min``
#: (one step of a 1000-step discretisation).
DEFAULT_STEPS = 1000


@attrs.frozen(kw_only=True)
class SequenceAware(solverlab.Objective):
    """The sequence-aware loss (Nguyen et al. 2024, SA-DPM, as their released training code
    computes it): ``L = L_simple + lam L_sa`` with

    ``L_simple = mean_b ||e_0||^2`` and ``L_sa = mean_b ||e_0 + ... + e_{K-1}||^2 / K^2``,

    where, for one example ``x0`` and one time ``t``, ``e_k = target_k - out(x_k, t_k)`` at the
    ``k``-th earlier time ``t_k = t - k h`` with its own independent noise ``eps_k``
    (``x_k = alpha_{t_k} x0 + sigma_{t_k} eps_k``); for noise prediction
    ``e_k = eps_k - eps_theta(x_k, t_k)``. A term whose time falls below ``t_min`` is
    evaluated at ``t_min`` and masked to zero, and the sum is still divided by the full
    ``K^2``. The per-step loss bounds the signed sum of errors that accumulates along a
    sampling trajectory only loosely; ``L_sa`` keeps the sum over ``K`` consecutive steps.
    ``K = 1`` gives ``(1 + lam) L_simple``. The ``K`` network calls are one forward pass
    on a ``K``-times larger batch, and the gradient flows through all of them.

    Options:

    - ``k``: ``K``, the number of consecutive steps (2).
    - ``lam``: the weight of ``L_sa`` (1.0; 0 is the plain loss).
    - ``normalization``: ``"squared"`` divides ``||sum e_k||^2`` by ``K^2`` (the released
      code); ``"linear"`` by ``K`` (an earlier version of it, ``K`` times larger).
    - ``antithetic``: times drawn in pairs ``t`` and its mirror image (``n`` and ``N-1-n``
      on a discrete schedule), as the official trainer does (True).
    - ``spacing``: ``h`` on a continuous schedule (``None``: ``(t_max - t_min)/1000``). On a
      ``vp-discrete`` schedule ``h`` is one step, ``1/N``, and giving ``spacing`` is an error.
    """

    name: ClassVar[str] = "sa"
    k: int = attrs.field(default=2, validator=number(ge=1, integer=True))
    lam: float = attrs.field(default=1.0, validator=number(ge=0))
    normalization: str = attrs.field(default="squared", validator=one_of("squared", "linear"))
    antithetic: bool = attrs.field(default=True, validator=boolean)
    spacing: float | None = attrs.field(
        default=None, validator=number(gt=0, none="(t_max - t_min)/1000"))

    def times(self, schedule: Any, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(t_k, valid)``, both of shape ``(K, batch)``: the times ``t - k h`` clamped to
        ``t_min``, and whether ``t - k h >= t_min`` (the term counts)."""
        n_steps = discrete_steps(schedule)
        ks = torch.arange(self.k, dtype=torch.float64, device=t.device)[:, None]
        if n_steps is not None:
            if self.spacing is not None:
                raise solverlab.OptionError(
                    f"SequenceAware ('sa'): option spacing={self.spacing!r} is not allowed on "
                    f"the discrete schedule {schedule.name!r}: consecutive steps are one index "
                    f"apart (h = 1/N = 1/{n_steps}); leave spacing=None")
            index = torch.round(t * n_steps - 1)[None, :] - ks
            first = round(schedule.t_min * n_steps) - 1
            valid = index >= first
            return (index.clamp(min=first) + 1) / n_steps, valid
        span = schedule.t_max - schedule.t_min
        h = span / DEFAULT_STEPS if self.spacing is None else float(self.spacing)
        if self.spacing is not None and h >= span:
            raise solverlab.OptionError(
                f"SequenceAware ('sa'): option spacing={self.spacing!r} is not allowed for the "
                f"schedule {schedule.name!r}: it must be smaller than t_max - t_min = {span!r} "
                "(else every earlier step falls outside the time range)")
        tk = t[None, :] - ks * h
        valid = tk >= schedule.t_min - 1e-9 * h
        return tk.clamp(min=schedule.t_min), valid

    def terms(self, model: Any, x0: Tensor, *, generator: torch.Generator | None = None,
              t: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
        """``(L_simple, L_sa)``, two scalars (:meth:`loss` is ``L_simple + lam L_sa``).
        Randomness comes from ``generator``: the times, then ``eps_0, ..., eps_{K-1}`` in
        that order; ``t`` fixes the times instead (one per example, or a scalar)."""
        check_data(self.name, x0)
        batch, schedule = x0.shape[0], model.schedule
        if t is None:
            t = sample_times(schedule, batch, generator=generator, antithetic=self.antithetic)
        else:
            t = check_times(self.name, schedule, t, batch)
        tk, valid = self.times(schedule, t.to(x0.device))
        noise = torch.cat([draw_noise(x0, generator) for _ in range(self.k)])
        xs = x0.repeat((self.k,) + (1,) * (x0.ndim - 1))
        e = residual(model, xs, tk.reshape(-1), noise).reshape((self.k, *x0.shape))
        e = e * valid.reshape(valid.shape + (1,) * (x0.ndim - 1)).to(e.dtype)
        simple = e[0].square().flatten(1).sum(1).mean()
        scale = self.k ** 2 if self.normalization == "squared" else self.k
        sequence = e.sum(0).square().flatten(1).sum(1).mean() / scale
        return simple, sequence

    def loss(self, model: Any, x0: Tensor, *, generator: torch.Generator | None = None,
             t: Tensor | float | None = None) -> Tensor:
        """The batch loss ``L_simple + lam L_sa`` (a scalar); arguments as in :meth:`terms`."""
        simple, sequence = self.terms(model, x0, generator=generator, t=t)
        return simple + self.lam * sequence


@solverlab.hookimpl
def solverlab_register_objectives(registry):
    registry.add(SequenceAware)
