"""The PNDM family (Liu, Ren, Lin, Zhao, ICLR 2022, arXiv 2202.09778).

Every step is the transfer part ``phi`` (the paper's eq. 9, :func:`~._coefficients.transfer`)
applied with a "gradient part" ``eps'`` that replaces the model's noise prediction::

    x_t = phi(x_s, eps', s, t) = A x_s + B eps'

- pseudo Runge-Kutta (PRK): the stages of an explicit RK tableau, each reached by ``phi`` from
  ``x_s``; ``eps' = sum_j b_j e_j``. With RK4 that is 4 NFE per step, with Heun's tableau
  (S-PNDM's pseudo improved Euler) 2;
- pseudo linear multistep (PLMS): ``eps' = sum_j w_j e_{t + j delta}``, Adams-Bashforth weights
  on the history of noise predictions at the grid points (only the first stage of a PRK step
  enters the history); 1 NFE per step.

(The PRK and PLMS formulas are written out in docs/mathematics.md#pndm.)
``eps`` is always the model's **noise** prediction
(:meth:`solverlab.Denoiser.noise`), whatever the model's parameterization: the weights were
derived for ``eps``, and combining raw v-predictions instead is diffusers issue 14816.

All coefficients are float64, computed once per (options, schedule, grid) and applied as Python
floats with in-place updates (``solverlab_expint.integrator``).

Orders. ``y = x/alpha`` obeys ``dy/d sigma_ve = eps`` with ``sigma_ve = sigma/alpha``, and
``phi`` is the exact update for constant ``eps``, so a pseudo method is its classical method in
the variable ``sigma_ve``. Hence

- the paper's fixed PLMS weights assume equally spaced ``sigma_ve``, which no usual grid is (a
  ``logsnr`` grid has step ratios ``e^{-h}``): a ratio ``1 + O(h)`` leaves an ``O(h^3)`` local
  error and the global order is **2**, not the 4 of Adams-Bashforth nor 3
  (docs/mathematics.md#findings). ``weights="variable"`` uses AB weights for the actual spacing and
  restores order 4;
- PRK's middle stages at the time mid-point ``(s + t)/2`` (the paper's code) are not at the
  ``sigma_ve`` mid-point: order 2 (4 on ``edm``, where ``t = sigma_ve``). At the ``sigma_ve``
  mid-point (``midpoint="sigma"``, the default) PRK *is* classical RK4 in ``sigma_ve``: order 4
  on any grid.

The measured orders (``solverlab.testing.measure_convergence_order``, float64, ``logsnr``
grid, on ``vp-linear``, ``edm``, ``vp-cosine`` and ``ve``) are these; the fitted numbers are in
``bench/orders.md``.

With ``weights="variable"``, the diffusers warm-up and PRK at the time mid-point have an
``O(h^3)`` local error (a pseudo Heun step, an AB2 step, or PRK at
the time mid-point), so their formal global order is 3; it does not show on these problems,
whose warm-up steps lie at ``t_max`` where the flow is nearly linear, and 4 is what is measured
and declared. A solve that starts at a smaller ``t`` can show order 3.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor

from solverlab import Solver, SolverState
from solverlab.schedule import Schedule
from solverlab.validators import one_of
from solverlab_expint import phis
from solverlab_expint.integrator import (
    Nodes,
    Plan,
    alpha_sigma,
    combine,
    floats,
    lagrange_weights,
    own,
    per_grid,
)

from ._coefficients import HEUN_TABLEAU, PLMS, RK4_TABLEAU, ButcherTableau, transfer

__all__ = ["FPNDM", "MIDPOINTS", "PRK", "SPNDM", "WARMUPS", "WEIGHTS", "PLMSSolver",
           "PseudoNumerical"]

F64 = torch.float64
MIDPOINTS = ("time", "lambda", "sigma")
WARMUPS = ("prk", "diffusers")
WEIGHTS = ("fixed", "variable")


@attrs.frozen
class _Step:
    """One grid interval: ``kind`` ``"rk"`` (``tableau``) or ``"ab"`` (``k``-step PLMS row);
    ``stages``: per RK stage ``i >= 1`` the index of its time in ``times``, ``A`` and the
    coefficients on ``e_0..e_{i-1}``; ``final``: ``A`` and the coefficients on the outputs
    (RK stages, or the PLMS history newest first)."""

    kind: str
    k: int
    stages: tuple[tuple[int, float, tuple[float, ...]], ...]
    final: tuple[float, tuple[float, ...]]


@attrs.frozen
class _Coef:
    times: Tensor
    ab: tuple[tuple[float, float], ...]
    steps: tuple[_Step, ...]


def _stage_times(schedule: Schedule, s: Nodes, t: Nodes, c: float, rule: str) -> Tensor:
    """Times a fraction ``c`` of the way from ``s`` to ``t`` in ``rule``'s variable."""
    if rule == "time":
        return s.t + c * (t.t - s.t)
    if rule == "lambda":
        lam = s.lam + c * (t.lam - s.lam)
    else:  # sigma_ve = e^{-lambda}
        sig = torch.exp(-s.lam) + c * (torch.exp(-t.lam) - torch.exp(-s.lam))
        lam = -torch.log(sig)
    return schedule.t_of_lambda(lam).to(F64)


def _variable_weights(n: Nodes, i: int, k: int) -> tuple[float, ...]:
    """Adams-Bashforth weights of step ``i`` for the actual spacing of ``sigma/alpha`` at grid
    points ``i, i-1, .., i-k+1`` (in units of the step, ``u = 0`` at ``s``, ``1`` at ``t``):
    the exact integrals over ``[0, 1]`` of their Lagrange basis (``lagrange_weights`` with
    ``z = 0``); equal to :data:`PLMS` rows on equally spaced ``sigma/alpha``."""
    sig = torch.exp(-n.lam)
    u = (sig[i - torch.arange(k)] - sig[i]) / (sig[i + 1] - sig[i])
    return floats(lagrange_weights(u[None], phis(torch.zeros(1, dtype=F64), k))[0])


@attrs.frozen(kw_only=True)
class PseudoNumerical(Solver):
    """Common machinery: ``_plan(steps)`` says what each step is (``("rk", tableau)`` or
    ``("ab", k)``); coefficients, NFE and the step follow from it."""

    midpoint: str = attrs.field(default="sigma", validator=one_of(*MIDPOINTS))

    def _plan(self, steps: int) -> tuple[tuple[str, Any], ...]:
        raise NotImplementedError

    def _fixed(self) -> bool:
        return True

    def expected_nfe(self, steps: int) -> int:
        return sum(v.stages if k == "rk" else 1 for k, v in self._plan(steps))

    def coefficients(self, schedule: Schedule, grid: Tensor) -> _Coef:
        n = Nodes.at(schedule, grid)
        s, t = n[:-1], n[1:]
        A, B = transfer(s, t)
        A, B = floats(A), floats(B)
        steps = len(A)
        times, extra, out = [grid], steps + 1, []
        stage_cache: dict[float, tuple[int, list[float], list[float]]] = {}
        for i, (kind, v) in enumerate(self._plan(steps)):
            if kind == "ab":
                w = PLMS[v].weights if self._fixed() else _variable_weights(n, i, v)
                out.append(_Step("ab", v, (), (A[i], tuple(B[i] * x for x in w))))
                continue
            tab: ButcherTableau = v
            stages = []
            for j in range(1, tab.stages):
                c = tab.c[j]
                if c == 1.0:
                    idx, a, b = i + 1, A[i], B[i]
                else:
                    if c not in stage_cache:  # one vectorised pass over the grid per node c
                        tc = _stage_times(schedule, s, t, c, self.midpoint)
                        As, Bs = transfer(s, Nodes.at(schedule, tc))
                        times.append(tc)
                        stage_cache[c] = (extra, floats(As), floats(Bs))
                        extra += steps
                    base, As, Bs = stage_cache[c]
                    idx, a, b = base + i, As[i], Bs[i]
                stages.append((idx, a, tuple(b * tab.a[j][m] / c for m in range(j))))
            out.append(_Step("rk", tab.stages, tuple(stages),
                             (A[i], tuple(B[i] * x for x in tab.b))))
        all_times = torch.cat(times)
        return _Coef(times=all_times, ab=alpha_sigma(Nodes.at(schedule, all_times)),
                     steps=tuple(out))

    def init(self, denoiser, x: Tensor, grid: Tensor) -> SolverState:
        coef = per_grid(self, denoiser.schedule, grid)
        rk = any(st.kind == "rk" for st in coef.steps)
        plan = Plan.build(coef, denoiser, "noise", x, 1 if rk else 0)
        return SolverState(denoiser=denoiser, grid=grid, x=x, cache=plan)

    def step(self, state: SolverState) -> SolverState:
        plan, i, x = state.cache, state.index, state.x
        st: _Step = plan.coef.steps[i]
        e = own(plan.model(x, plan.times[i], plan.coef.ab[i]), x, *plan.buffers)
        if st.kind == "ab":
            history = (e, *state.history)  # newest first; zip uses the first k
            x = combine(x, st.final[0], x, st.final[1], history)
            return state.advance(x, history=history[:3])
        es, buf = [e], plan.buffers[0]
        for idx, a, coefs in st.stages:  # every stage starts from x_s (Liu et al. 2022)
            buf = combine(buf, a, x, coefs, es)
            es.append(own(plan.model(buf, plan.times[idx], plan.coef.ab[idx]), x, buf))
        x = combine(x, st.final[0], x, st.final[1], es)
        # Only the first stage enters the PLMS history (Liu et al. 2022).
        return state.advance(x, history=(e, *state.history)[:3])


@attrs.frozen(kw_only=True)
class PRK(PseudoNumerical):
    """Pseudo Runge-Kutta every step (Liu et al. 2022, PRK: the classical RK4 weights on the
    transfer part). Order 4 (default ``midpoint="sigma"``; 2 with ``"time"`` or
    ``"lambda"``), 4 NFE per step.

    Options:

    - ``midpoint``: where the two middle stages evaluate the model. ``"sigma"`` (default): the
      mid-point of ``sigma/alpha``; the method is then exactly classical RK4 on
      ``d(x/alpha)/d(sigma/alpha) = eps``, order 4 on any grid. ``"time"``: ``(s + t)/2``, the
      paper's code, order 2 (4 on ``edm``). ``"lambda"``: the half log-SNR
      mid-point, order 2.

    Measured orders: module docstring.
    """

    name: ClassVar[str] = "pndm-prk"
    order: ClassVar[int] = 4  # the default midpoint="sigma"

    @property
    def convergence_order(self) -> int:
        return self.order if self.midpoint == "sigma" else 2

    def _plan(self, steps: int) -> tuple[tuple[str, Any], ...]:
        return (("rk", RK4_TABLEAU),) * steps


@attrs.frozen(kw_only=True)
class SPNDM(PseudoNumerical):
    """S-PNDM (Liu et al. 2022, §4 "S-PNDM"): a pseudo improved Euler first step
    (Heun's tableau on the transfer part, 2 NFE), then 2-step PLMS ``(3 e_t - e_{t+delta})/2``.
    Order 2, NFE = steps + 1.

    No options (Heun's stages lie on the grid, so there is no ``midpoint``)."""

    name: ClassVar[str] = "pndm-s"
    order: ClassVar[int] = 2
    midpoint: str = attrs.field(default="sigma", init=False)

    def _plan(self, steps: int) -> tuple[tuple[str, Any], ...]:
        return (("rk", HEUN_TABLEAU), *(("ab", 2),) * (steps - 1))


@attrs.frozen(kw_only=True)
class PLMSSolver(PseudoNumerical):
    """Pseudo linear multistep (Liu et al. 2022, PLMS): 4-step PLMS ``(55 e_t -
    59 e_{t+delta} + 37 e_{t+2delta} - 9 e_{t+3delta})/24``. Order 2 (4 with
    ``weights="variable"``), 1 NFE per step after the warm-up.

    Options:

    - ``warmup``: how the first steps are taken before 4 noise predictions exist.
      ``"prk"`` (default, the paper's F-PNDM): 3 pseudo RK4 steps, NFE = steps + 9 (``4 steps``
      for ``steps <= 3``). ``"diffusers"``: diffusers' ``PNDMScheduler(skip_prk_steps=True)``:
      a pseudo improved Euler first step whose second evaluation is *not* kept in the history,
      then 2-, 3- and 4-step PLMS; NFE = steps + 1 (diffusers takes a single DDIM step for a
      1-step schedule: NFE 1).
    - ``weights``: ``"fixed"`` (default): the paper's and diffusers' constant weights, which
      assume equally spaced ``sigma/alpha``; order 2 on usual grids. ``"variable"``:
      Adams-Bashforth weights for the grid's actual ``sigma/alpha`` spacing (the same weights
      on an equally spaced one); order 4. Not in the paper.
    - ``midpoint``: the PRK stage times (:class:`PRK`); only for ``warmup="prk"``.

    Pitfall (docs/mathematics.md#pitfalls): the two warm-ups differ in method and NFE; compare
    diffusers' PLMS with ``warmup="diffusers"``, the paper's F-PNDM with ``"prk"``.
    """

    name: ClassVar[str] = "pndm-plms"
    order: ClassVar[int] = 2
    warmup: str = attrs.field(default="prk", validator=one_of(*WARMUPS))
    weights: str = attrs.field(default="fixed", validator=one_of(*WEIGHTS))

    @property
    def convergence_order(self) -> int:
        return 4 if self.weights == "variable" else 2

    def _fixed(self) -> bool:
        return self.weights == "fixed"

    def _plan(self, steps: int) -> tuple[tuple[str, Any], ...]:
        if self.warmup == "prk":
            return tuple(("rk", RK4_TABLEAU) if i < 3 else ("ab", 4) for i in range(steps))
        if steps == 1:
            return (("ab", 1),)
        return (("rk", HEUN_TABLEAU), *(("ab", min(i + 1, 4)) for i in range(1, steps)))


@attrs.frozen(kw_only=True)
class FPNDM(PLMSSolver):
    """F-PNDM (Liu et al. 2022, §4 "F-PNDM"): 3 pseudo RK4 steps, then 4-step
    PLMS. Order 2 (4 with ``weights="variable"``), NFE = steps + 9 (``4 steps`` for ``steps <=
    3``). ``pndm-plms`` with ``warmup="prk"``.

    Options: ``weights`` (:class:`PLMSSolver`), ``midpoint`` (the PRK stage times,
    :class:`PRK`; the paper's F-PNDM uses ``"time"``).
    """

    name: ClassVar[str] = "pndm-f"
    order: ClassVar[int] = 2
    warmup: str = attrs.field(default="prk", validator=one_of("prk"), init=False)
