"""The public toolkit of exponential integrators: what every solver of ``solverlab_expint``
uses, and what a third party builds a new one from (``solverlab_pndm`` and
``solverlab_dpm_adaptive`` do).

Every update has the form (Lu et al. 2022, eq. 3.4; Lu et al. 2022b, eq. 8; one form for both
predictions)::

    x_t = A x_s - c_t z sum_j w_j m_j

with ``h = lambda_t - lambda_s > 0`` and

- noise prediction (DPM-Solver, DEIS, DDIM; ``m = eps``): ``A = alpha_t/alpha_s``,
  ``c_t = sigma_t``, ``z = h``;
- data prediction (DPM-Solver++, UniPC default; ``m = x0``): ``A = sigma_t/sigma_s``,
  ``c_t = alpha_t``, ``z = -h``.

The exact solution is ``x_t = A x_s - c_t z sum_k h^k m^(k)(lambda_s) phi_{k+1}(z)``
(``m^(k)``: ``k``-th derivative in ``lambda``; any schedule, VP or VE), so a method is its
dimensionless weights ``w`` on the model outputs it uses: DDIM is ``w = phi_1(z)``.

The pieces:

- :class:`Nodes` (schedule quantities at times) and :class:`Span` (``A``, ``c_t``, ``z``, ``h``
  and ``phi_0..phi_k(z)`` of a batch of steps);
- :func:`lagrange_weights` (exact integrals of a Lagrange basis against ``e^{z(1-u)}``),
  :func:`multistep_orders` / :func:`singlestep_orders` (warm-up and final-step order
  schedules), :func:`unit` (apply a linear formula to unit vectors to get its weights);
- :class:`ExpIntSolver` (the options implementations disagree on; subclasses implement
  ``coefficients(schedule, grid)``, ``step`` and say how many state-sized ``buffers`` and live
  ``outputs`` they need) with :class:`Plan` (``state.cache``: coefficients, per-sample times,
  the model :class:`Evaluator`), :func:`per_grid` (coefficients computed once per grid),
  :func:`floats` and :func:`combine` (the update).

Coefficients are computed in float64 once per grid and applied in the state's dtype: as
Python floats by in-place updates when no graph is recorded (``Solver.solve``'s default), as
0-d tensors by out-of-place updates under ``solve(..., grad=True)``, so the result is
differentiable with respect to the grid times too. ``solverlab_expint.Multistep`` is the
base of a new multistep method: its ``weights(p, u, span)`` is the whole method (see the
example plugin in ``tests/plugin_example``).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor

from solverlab import Solver, SolverState
from solverlab.errors import OptionError
from solverlab.schedule import Schedule
from solverlab.validators import number, one_of

from .phi_functions import phis

__all__ = [
    "AUTO_MIN_RATIO", "DEFAULT_THRESHOLD", "FINAL_STEPS", "LOWER_ORDER_FINAL", "Evaluator",
    "ExpIntSolver", "Nodes", "Plan", "Span", "alpha_sigma", "combine", "floats",
    "lagrange_weights", "lower_order_final", "multistep_orders", "own", "ratio_orders",
    "singlestep_orders", "unit",
]

F64 = torch.float64
FINAL_STEPS = ("none", "denoise_to_zero", "euler")
#: Values of ``lower_order_final``: ``"auto"`` (step-ratio rule, :func:`ratio_orders`),
#: ``True`` (step-count threshold), ``False`` (never), and the named step-count rules of
#: reference implementations, ``"official"`` and ``"diffusers"``
#: (:attr:`ExpIntSolver.lower_order_final_rules`).
LOWER_ORDER_FINAL = ("auto", True, False, "official", "diffusers")
#: The default of ``lower_order_final_threshold`` (diffusers').
DEFAULT_THRESHOLD = 15
#: ``lower_order_final="auto"``: a multistep step ``i`` is first order when
#: ``h_{i-1}/h_i`` (in lambda) is below this.
AUTO_MIN_RATIO = 0.5


# -- schedule quantities on a grid --------------------------------------------------------
@attrs.frozen
class Nodes:
    """Float64 schedule quantities at times ``t`` (1-D)."""

    t: Tensor
    log_alpha: Tensor
    log_sigma: Tensor

    @classmethod
    def at(cls, schedule: Schedule, t: Tensor) -> Nodes:
        t = t.to(F64)
        return cls(t=t, log_alpha=schedule.log_alpha(t), log_sigma=schedule.log_sigma(t))

    @property
    def lam(self) -> Tensor:
        return self.log_alpha - self.log_sigma

    def __getitem__(self, idx: slice | Tensor) -> Nodes:
        return Nodes(self.t[idx], self.log_alpha[idx], self.log_sigma[idx])


@attrs.frozen
class Span:
    """One step ``s -> t`` (vectorised over steps) for a ``prediction``: ``A``, ``c_t``, ``z``,
    ``h`` of the module docstring, all float64 1-D, and ``phi_0..phi_kmax(z)`` (evaluated
    once)."""

    A: Tensor
    c: Tensor
    z: Tensor
    h: Tensor
    table: Tensor

    @classmethod
    def of(cls, prediction: str, s: Nodes, t: Nodes, kmax: int = 3) -> Span:
        h = t.lam - s.lam
        if prediction == "noise":
            A, c, z = torch.exp(t.log_alpha - s.log_alpha), torch.exp(t.log_sigma), h
        else:
            A, c, z = torch.exp(t.log_sigma - s.log_sigma), torch.exp(t.log_alpha), -h
        return cls(A=A, c=c, z=z, h=h, table=phis(z, kmax))

    def phi(self, k: int) -> Tensor:
        """``phi_0(z) .. phi_k(z)``, shape ``(steps, k + 1)``."""
        return self.table[:, :k + 1] if k < self.table.shape[1] else phis(self.z, k)

    def coefficients(self, w: Tensor) -> Tensor:
        """Coefficients on the model outputs from dimensionless weights ``w`` ``(steps, n)``."""
        return (-self.c * self.z)[:, None] * w


def unit(n: int, k: int, like: Tensor) -> list[Tensor]:
    """``k`` unit vectors, each repeated ``n`` times: shape ``(n, k)``. A formula applied to
    these instead of model outputs yields its weights."""
    eye = torch.eye(k, dtype=F64, device=like.device)
    return [eye[j].expand(n, k) for j in range(k)]


def lagrange_weights(nodes: Tensor, phi: Tensor) -> Tensor:
    """Exact ``w_j = int_0^1 e^{z (1-u)} l_j(u) du`` for the Lagrange basis ``l_j`` on ``nodes``
    (shape ``(steps, n)``, the interpolation points in units of the step, ``u = 0`` at ``s``),
    from the moments ``int_0^1 e^{z(1-u)} u^m du = m! phi_{m+1}(z)``: solves
    ``sum_j w_j u_j^m = m! phi_{m+1}(z)``, ``m < n``, in float64. ``phi``: ``phi_0..phi_k(z)``,
    ``k >= n`` (``z = 0`` gives plain polynomial integration)."""
    n = nodes.shape[-1]
    fact = torch.tensor([math.factorial(m) for m in range(n)], dtype=F64)
    moments = phi[..., 1:n + 1] * fact
    vander = nodes[..., None, :] ** torch.arange(n, dtype=F64)[:, None]  # [m, j] = u_j^m
    return torch.linalg.solve(vander, moments)


def alpha_sigma(nodes: Nodes) -> tuple[tuple[float, float], ...]:
    """``(alpha, sigma)`` at each node as Python floats (for :class:`Evaluator`)."""
    return floats(torch.stack([torch.exp(nodes.log_alpha), torch.exp(nodes.log_sigma)], dim=-1))


def floats(v: Tensor) -> tuple:
    """A float64 tensor (1-D or 2-D) as (nested) tuples of Python floats: converted once per
    grid. A tensor that requires grad (a differentiable solve over grid times) is split into
    0-d tensors instead, so the coefficients keep their graph."""
    if v.requires_grad:
        return tuple(tuple(r.unbind()) if r.ndim else r for r in v.unbind())
    out = v.tolist()
    return tuple(tuple(r) if isinstance(r, list) else r for r in out)


# -- order schedules ----------------------------------------------------------------------
def lower_order_final(inst: Any, attribute: Any, value: Any) -> None:
    """attrs validator: ``value`` is one of :data:`LOWER_ORDER_FINAL` (``1``/``0`` are not) and,
    for a named rule, one the solver has (:attr:`ExpIntSolver.lower_order_final_rules`), with
    ``lower_order_final_threshold`` left at its default (the rule fixes it)."""
    owner = type(inst).__name__
    rules = getattr(type(inst), "lower_order_final_rules", {})
    is_rule = isinstance(value, str) and value in rules
    if not (isinstance(value, bool) or is_rule or (isinstance(value, str) and value == "auto")):
        named = "".join(f", {r!r} (the step-count rule of {_RULE_OWNERS[r]}: "
                        f"{_threshold_text(rules[r])})" for r in rules)
        missing = [r for r in ("official", "diffusers")
                   if r not in rules and isinstance(value, str) and value == r]
        why = (f" ({owner} has no {missing[0]!r} rule: that implementation has no "
               "lower_order_final)" if missing else "")
        raise OptionError(
            f"{owner}: option {attribute.name}={value!r} is not allowed{why}; choose 'auto' "
            "(lower the order of steps much longer than the one before), True (lower the final "
            f"steps below lower_order_final_threshold steps), False (never){named}")
    threshold = getattr(inst, "lower_order_final_threshold", DEFAULT_THRESHOLD)
    if is_rule and threshold != DEFAULT_THRESHOLD:
        raise OptionError(
            f"{owner}: options lower_order_final={value!r} and lower_order_final_threshold="
            f"{threshold!r} conflict: the named rule fixes the threshold "
            f"({_threshold_text(rules[value])}); use lower_order_final=True with the threshold, "
            "or leave the threshold out")


_RULE_OWNERS = {"official": "the method's official code", "diffusers": "diffusers"}


def _threshold_text(threshold: int | None) -> str:
    return "at every step count" if threshold is None else f"below {threshold} steps"


def ratio_orders(lam: Tensor, orders: Sequence[int],
                 min_ratio: float = AUTO_MIN_RATIO) -> tuple[int, ...]:
    """``orders`` with every step ``i`` whose step ratio ``r_i = h_{i-1}/h_i`` (``h`` in
    ``lambda``, ``lam`` the grid's, ``steps + 1`` long) is below ``min_ratio`` made first order.

    A multistep step extrapolates the polynomial through outputs at ``u_j = (lambda_{i-j} -
    lambda_i)/h_i``, all within ``[-r_i - .., 0]``, over ``[0, 1]``: its weights on the
    history grow like ``1/r_i`` (DPM-Solver++(2M): ``1/(2 r_i)``, Lu et al. 2022b, Algorithm 2)
    and the output's change over the step is not polynomial when ``h_i`` is long (``x0(lambda)``
    saturates at low noise), so a short history step followed by a long one extrapolates far
    past where the history says anything. That is the last step of a ``time-uniform`` grid on a
    VP schedule (``r ~ 0.2-0.4`` for 5-200 steps, ``h`` 1-4), which made third-order multistep
    methods *worse* from 10 to 20 steps. On a grid that refines smoothly, ``r_i -> 1`` and
    nothing is lowered, so the declared order holds (``logsnr``: ``r = 1``)."""
    h = (lam[1:] - lam[:-1]).tolist()
    out = list(orders)
    for i in range(1, min(len(out), len(h))):
        if h[i - 1] < min_ratio * h[i]:
            out[i] = 1
    return tuple(out)


def multistep_orders(steps: int, order: int, lower: bool | str, final_step: str,
                     lam: Tensor | None = None) -> tuple[int, ...]:
    """Order of each step of a multistep method: warm-up ``min(order, i + 1)`` (only ``i + 1``
    outputs exist at step ``i``), with ``lower=True`` also ``min(., steps - i)`` (official
    DPM-Solver / diffusers ``lower_order_final``), with ``lower="auto"`` first order where the
    step ratio of the grid's ``lam`` says so (:func:`ratio_orders`), ``"auto+final"`` both, and
    a first-order last step for ``final_step="euler"``."""
    orders = [min(order, i + 1, steps - i if lower is True else order) for i in range(steps)]
    if lower == "auto" or lower == "auto+final":
        if lower == "auto+final":
            orders = [min(q, steps - i) for i, q in enumerate(orders)]
        if lam is None:
            raise ValueError("multistep_orders(lower='auto') needs the grid's lambda (lam=)")
        orders = list(ratio_orders(lam[:steps + 1], orders))
    if final_step == "euler":
        orders[-1] = 1
    return tuple(orders)


def singlestep_orders(steps: int, order: int, lower: bool, final_step: str) -> tuple[int, ...]:
    """Orders of the outer steps of a singlestep method that spends exactly ``steps`` NFE
    (one per grid interval; an order-``k`` step spans ``k`` intervals).

    With ``lower``: official DPM-Solver-fast: order 3, ``K = steps//3 + 1``;
    ``steps % 3 == 0`` -> ``[3]*(K-2) + [2, 1]``, ``== 1`` -> ``[3]*(K-1) + [1]``, ``== 2`` ->
    ``[3]*(K-1) + [2]``; order 2: all 2's, plus a final 1 if ``steps`` is odd. Without: as many
    ``order``-steps as fit, the rest of order 2 (``[.., 2, 2]`` instead of ``[.., 3, 1]``), so
    that no first-order step caps the global order at 2. ``final_step="euler"`` splits a last
    step of order ``k > 1`` into ``[k - 1, 1]``."""
    if order == 1 or steps == 1:
        orders = [1] * steps
    elif order == 2:
        orders = [2] * (steps // 2) + [1] * (steps % 2)
    elif lower:
        k = steps // 3 + 1
        orders = {0: [3] * (k - 2) + [2, 1], 1: [3] * (k - 1) + [1],
                  2: [3] * (k - 1) + [2]}[steps % 3]
    else:
        orders = {0: [3] * (steps // 3), 1: [3] * (steps // 3 - 1) + [2, 2],
                  2: [3] * (steps // 3) + [2]}[steps % 3]
    if final_step == "euler" and orders[-1] > 1:
        orders[-1:] = [orders[-1] - 1, 1]
    return tuple(orders)


# -- the update ---------------------------------------------------------------------------
def combine(out: Tensor, a: float | Tensor, x: Tensor, coefs: Sequence[float | Tensor],
            ms: Sequence[Tensor]) -> Tensor:
    """``a x + sum_j coefs[j] ms[j]`` (``zip`` stops at the shorter of ``coefs``, ``ms``); use the
    returned tensor.

    Without autograd (``Solver.solve``'s default) it is written into ``out`` in place (``out``
    may be ``x``) with Python-float coefficients, so nothing is allocated. With autograd on
    (``solve(..., grad=True)``) it is computed out of place and ``out`` is not touched; the
    coefficients may then be 0-d tensors that carry gradients (see :func:`floats`)."""
    if torch.is_grad_enabled():
        acc = a * x
        for c, m in zip(coefs, ms):
            acc = acc + c * m
        return acc
    if out is x:
        out.mul_(a)
    else:
        torch.mul(x, a, out=out)
    for c, m in zip(coefs, ms):
        out.add_(m, alpha=c)
    return out


def own(m: Tensor, *buffers: Tensor) -> Tensor:
    """``m``, or a copy if it shares memory with one of the solver's ``buffers`` (a model that
    returns its input, say): the buffers are overwritten in place later."""
    ptr = m.untyped_storage().data_ptr()
    if any(ptr == b.untyped_storage().data_ptr() for b in buffers):
        return m.clone()
    return m


@attrs.frozen
class Evaluator:
    """Calls ``denoiser.noise`` or ``denoiser.data`` (one NFE) at ``x, t``. Where the
    denoiser accepts ``coefficients=(alpha, sigma)`` (Python floats, precomputed per grid), they
    are passed, so the schedule is not evaluated at every call; where it also accepts ``out``
    and the model's output needs converting, the conversion goes into the next of ``ring``'s
    buffers (as many as the solver keeps outputs alive at once), so nothing is allocated."""

    fn: Callable[..., Tensor]
    fast: bool
    ring: Iterator[Tensor] | None = None

    @classmethod
    def of(cls, denoiser: Any, prediction: str, x: Tensor, outputs: int) -> Evaluator:
        fn = denoiser.noise if prediction == "noise" else denoiser.data
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        fast = "coefficients" in params
        convert = getattr(getattr(denoiser, "parameterization", None), "name", None) != prediction
        ring = None
        # Under autograd every conversion allocates (``out=`` buffers are not differentiable).
        if fast and convert and outputs > 0 and "out" in params and not torch.is_grad_enabled():
            ring = itertools.cycle([torch.empty_like(x) for _ in range(outputs)])
        return cls(fn=fn, fast=fast, ring=ring)

    def __call__(self, x: Tensor, t: Tensor, ab: tuple[float, float]) -> Tensor:
        if self.ring is not None:
            return self.fn(x, t, coefficients=ab, out=next(self.ring))
        return self.fn(x, t, coefficients=ab) if self.fast else self.fn(x, t)


@attrs.frozen(kw_only=True)
class Plan:
    """``state.cache`` of every solver here: ``coef``, the solver's per-grid coefficients
    (immutable, float64-derived Python floats; ``coef.times`` lists every time the model is
    evaluated at, the grid first, and ``coef.ab`` its ``(alpha, sigma)``), those times as
    per-sample tensors on the device of ``x``, the model evaluator, and preallocated
    state-sized ``buffers``."""

    coef: Any
    times: tuple[Tensor, ...]
    model: Evaluator
    buffers: tuple[Tensor, ...] = ()

    @classmethod
    def build(cls, coef: Any, denoiser: Any, prediction: str, x: Tensor, buffers: int,
              outputs: int = 0) -> Plan:
        """The plan of one solve from ``x``: each of ``coef.times`` as the float64 ``(batch,)``
        tensor the model takes, made in one go (no per-step indexing or expanding),
        ``buffers`` state-sized buffers, and a ring of ``outputs`` buffers for the converted
        model outputs (:class:`Evaluator`; ``outputs`` = how many are alive at once)."""
        times = coef.times.to(device=x.device).unsqueeze(1).expand(-1, x.shape[0]).unbind()
        return cls(coef=coef, times=times, model=Evaluator.of(denoiser, prediction, x, outputs),
                   buffers=tuple(torch.empty_like(x) for _ in range(buffers)))


@functools.lru_cache(maxsize=64)
def _cached(solver: ExpIntSolver, schedule: Schedule, key: tuple[float, ...]) -> Any:
    return solver.coefficients(schedule, torch.tensor(key, dtype=F64))


def per_grid(solver: ExpIntSolver, schedule: Schedule, grid: Tensor) -> Any:
    """``solver.coefficients(schedule, grid)``, computed once per (solver options, schedule,
    grid values): repeated solves on one grid (batches, benchmarks) skip the float64 work.
    A grid that requires grad (with autograd on) is never cached: its coefficients are
    tensors in its graph."""
    if grid.requires_grad and torch.is_grad_enabled():
        return solver.coefficients(schedule, grid.to("cpu", F64))
    try:
        hash((solver, schedule))
    except TypeError:  # an unhashable schedule: no cache
        return solver.coefficients(schedule, grid.detach().to("cpu", F64))
    return _cached(solver, schedule, tuple(grid.tolist()))


# -- the common options -------------------------------------------------------------------
@attrs.frozen(kw_only=True)
class ExpIntSolver(Solver):
    """Options every solver of this plugin has (the behaviours implementations disagree on):

    - ``lower_order_final``: which steps of a multistep method run at a lower order.
      ``"auto"`` (default): every step whose ratio ``h_{i-1}/h_i`` (in lambda) is below
      :data:`AUTO_MIN_RATIO` is first order (:func:`ratio_orders`): in practice the last
      step of a ``time-uniform`` grid on a VP schedule, which spans 2-4 in lambda after steps
      of 0.3-0.7 and made 3rd-order multistep methods worse from 10 to 20 steps; and, below
      ``lower_order_final_threshold`` steps, the final steps as with ``True`` (few steps are
      long steps, even on an evenly spaced grid). On fine grids that refine smoothly
      (``logsnr``, ``karras``) nothing is lowered, so the declared order holds.
      ``True``: the step-count rule, lower orders on the final steps (``min(order, steps -
      i)``) only when ``steps < lower_order_final_threshold`` (official DPM-Solver: 10,
      diffusers DPM/DEIS: 15, ``None``: always, as official and diffusers UniPC); with
      ``None`` the last step is always first order and the global order is at most 2 (its
      error is ``~ sigma(t_end)^2 h^2``, so on the reference problems the higher order shows
      until ~1e-7). ``False``: never. Singlestep solvers take ``True``/``False`` only.
      ``"official"`` / ``"diffusers"``: the step-count rule exactly as that implementation
      applies it (the threshold of :attr:`lower_order_final_rules`; e.g. the official
      DPM-Solver code lowers ``min(order, steps - i)`` only for ``steps < 10``, diffusers'
      ``DPMSolverMultistepScheduler`` for ``steps < 15``); the same as ``True`` with that
      threshold.
    - ``lower_order_final_threshold`` (int or ``None``, default 15, diffusers'): the step
      count of ``lower_order_final=True``; it also decides the multistep corrected warm-up
      (:class:`~solverlab_expint.Multistep`) whatever ``lower_order_final`` (a named rule
      uses its own threshold for both; giving another threshold with it is an error).
    - ``final_step``: ``"none"``; ``"denoise_to_zero"`` (+1 NFE: return the data prediction
      at the last time, official DPM-Solver/UniPC; the result is then ``x0``, not the ODE
      state); ``"euler"`` (the last step is first order, diffusers ``euler_at_final``; global
      order at most 2, as above).

    Subclasses implement ``coefficients(schedule, grid)`` (float64, once per grid; cached),
    ``step``, and say how many state-sized buffers they need (``buffers``) and how many
    model outputs they keep alive at once (``outputs``).
    """

    lower_order_final: bool | str = attrs.field(default="auto", validator=lower_order_final)
    lower_order_final_threshold: int | None = attrs.field(
        default=DEFAULT_THRESHOLD, validator=attrs.validators.optional(number(integer=True, ge=1)))
    final_step: str = attrs.field(default="none", validator=one_of(*FINAL_STEPS))

    #: Which model output the method integrates (``"noise"`` or ``"data"``); solvers with a
    #: ``predict`` option override :meth:`_prediction`.
    prediction: ClassVar[str] = "noise"
    #: The step-count thresholds of ``lower_order_final="official"`` / ``"diffusers"``
    #: (``None``: at every step count): official DPM-Solver (``dpm_solver_pytorch.py``,
    #: ``DPM_Solver.sample``, multistep: ``lower_order_final and steps < 10``) and diffusers'
    #: ``DPMSolverMultistepScheduler`` (``len(timesteps) < 15``). A method whose reference
    #: implementation has no such rule leaves its name out.
    lower_order_final_rules: ClassVar[Mapping[str, int | None]] = {
        "official": 10, "diffusers": 15}

    def _prediction(self) -> str:
        return self.prediction

    def _threshold(self) -> int | None:
        """The threshold of the step-count rule: a named rule's own, else
        ``lower_order_final_threshold``."""
        rules = self.lower_order_final_rules
        if isinstance(self.lower_order_final, str) and self.lower_order_final in rules:
            return rules[self.lower_order_final]
        return self.lower_order_final_threshold

    def _step_count_rule(self) -> bool:
        """``lower_order_final`` is ``True`` or a named rule (the step-count rule)."""
        return self.lower_order_final is True or (
            isinstance(self.lower_order_final, str)
            and self.lower_order_final in self.lower_order_final_rules)

    def _lower(self, steps: int) -> bool:
        """The step-count rule (``lower_order_final=True`` or named) is active for ``steps``."""
        t = self._threshold()
        return self._step_count_rule() and (t is None or steps < t)

    def _few(self, steps: int) -> bool:
        """``steps`` is below the threshold (``None``: always), whatever
        ``lower_order_final``: the corrected warm-up of :class:`Multistep` is a many-step choice."""
        t = self._threshold()
        return self.lower_order_final is not False and (t is None or steps < t)

    def _nominal_order(self) -> int:
        return self.order

    @property
    def convergence_order(self) -> int:
        """The declared order, at most 2 when the last step is always first order
        (``final_step="euler"``, or ``lower_order_final`` with no threshold)."""
        p = self._nominal_order()
        always_low = self._step_count_rule() and self._threshold() is None
        return min(p, 2) if (self.final_step == "euler" or always_low) else p

    def _extra_nfe(self) -> int:
        return 1 if self.final_step == "denoise_to_zero" else 0

    def coefficients(self, schedule: Schedule, grid: Tensor) -> Any:
        raise NotImplementedError

    def buffers(self, coef: Any) -> int:
        return 0

    def outputs(self, coef: Any) -> int:
        """How many converted model outputs the solver keeps alive at once (the newest
        included): the size of the evaluator's buffer ring. Default: one, used within its step."""
        return 1

    def _history(self) -> tuple[Any, ...]:
        return ()

    def init(self, denoiser, x: Tensor, grid: Tensor) -> SolverState:
        coef = per_grid(self, denoiser.schedule, grid)
        plan = Plan.build(coef, denoiser, self._prediction(), x, self.buffers(coef),
                          self.outputs(coef))
        return SolverState(denoiser=denoiser, grid=grid, x=x, cache=plan,
                           history=self._history())

    def finish(self, state: SolverState, x: Tensor, **changes: Any) -> SolverState:
        """``state.advance(x)``, with the denoising step after the last step if asked for."""
        if self.final_step == "denoise_to_zero" and state.index + 1 == state.steps:
            x = state.denoiser.data(x, state.cache.times[state.steps])
        return state.advance(x, **changes)
