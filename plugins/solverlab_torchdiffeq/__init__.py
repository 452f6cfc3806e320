"""solverlab_torchdiffeq: every torchdiffeq method as a solver of the probability-flow ODE,
registered as ``torchdiffeq-<method>``.

- Adaptive (``rtol``/``atol``; :class:`~solverlab.AdaptiveSolver`, only the grid's end points):
  ``dopri8`` (order 8), ``dopri5`` (5), ``bosh3`` (3), ``fehlberg2`` (2), ``adaptive_heun`` (2),
  and ``tsit5`` where the installed torchdiffeq has it.
- Fixed grid (the grid mapped to the integration variable, one ``odeint`` call; each step is
  reported to the callback and progress bar as it is reached): ``euler`` (1),
  ``midpoint`` (2), ``heun2`` (2), ``heun3`` (3), ``rk4`` (4; torchdiffeq's 3/8 rule),
  ``explicit_adams`` (Adams-Bashforth, RK4 warm-up; option ``max_order``, default 4),
  ``implicit_adams`` (Adams-Bashforth-Moulton, corrector iterated to ``rtol``/``atol`` at most
  ``max_iters`` times; NFE data dependent), ``fixed_adams`` (torchdiffeq's backward-compatible
  alias of ``implicit_adams``).
  ``scipy_solver`` is not registered (it leaves torch for numpy on every call).

The ODE is solved in option ``variable`` (:class:`solverlab.PFODE`): ``"sigma"`` (default,
but ``"lambda"`` for the Adams methods;
EDM's ``sigma/alpha`` on ``x/alpha``, where the right-hand side is the noise prediction and the
ODE is the same smooth one for every schedule), ``"lambda"``, ``"log_sigma"`` or ``"t"``.
``per_sample=True`` solves each sample with its own steps (torchdiffeq#122). NFE counts every
network evaluation through the :class:`~solverlab.Denoiser`. torchdiffeq's failures
(``underflow in dt``, ...) and an unconverged Adams-Moulton corrector raise
:class:`TorchdiffeqError` (a :class:`~solverlab.SolverDivergedError`) with advice.
"""

from __future__ import annotations

import sys
from typing import ClassVar

import attrs

import solverlab
from solverlab.ode import VARIABLES
from solverlab.validators import number, one_of

from ._solvers import TorchdiffeqAdaptive, TorchdiffeqError, TorchdiffeqFixed

__all__ = [
    "ADAPTIVE_ORDERS", "FIXED_ORDERS", "SOLVERS", "VARIABLES", "TorchdiffeqAdaptive",
    "TorchdiffeqError", "TorchdiffeqFixed", "solverlab_register_solvers",
]

#: adaptive method -> order of the propagated solution.
ADAPTIVE_ORDERS = {"dopri8": 8, "dopri5": 5, "bosh3": 3, "fehlberg2": 2, "adaptive_heun": 2,
                   "tsit5": 5}
#: fixed-grid method -> (declared global order, NFE per step or None if data dependent).
FIXED_ORDERS = {"euler": (1, 1), "midpoint": (2, 2), "heun2": (2, 2), "heun3": (3, 3),
                "rk4": (4, 4)}


def _available() -> set[str]:
    return set(sys.modules["torchdiffeq._impl.odeint"].SOLVERS)


def _class_name(method: str) -> str:
    return "Torchdiffeq" + "".join(p.capitalize() for p in method.split("_"))


@attrs.frozen(kw_only=True)
class _Adams(TorchdiffeqFixed):
    """Adams methods (torchdiffeq ``fixed_adams.py``): two RK4 steps (3/8 rule, 4 NFE each),
    then the ``k``-step Adams-Bashforth predictor, ``k = min(outputs so far, max_order - 1)``
    (1 NFE per step). Without corrector (``explicit_adams``) the global order is
    ``max_order - 1`` (as measured for the default ``max_order=4``). With the Adams-Moulton
    corrector (``implicit_adams``, ``fixed_adams``; iterated at most ``max_iters`` times until
    it changes by less than ``rtol``/``atol``, 1 NFE each) it is ``max_order`` (measured too;
    fitted orders: ``bench/orders.md``).
    ``max_order`` in 4..12 (default 4; torchdiffeq's own default 12 is a 11-step method whose
    start-up needs many small steps).

    Default ``variable="lambda"`` (the other ``torchdiffeq-*`` solvers: ``"sigma"``): the
    Adams coefficients assume equal steps in the variable, and ``logsnr`` grids are equal
    steps in ``lambda``; on their geometric steps in ``sigma/alpha`` the methods fall to order
    2. In ``lambda`` the corrector's functional iteration also contracts on coarse grids: its
    factor is about ``h L``, with ``h L ~ h |I - dx0/dy|`` in ``lambda`` but
    ``(exp(h) - 1) |I - dx0/dy|`` in ``sigma/alpha`` (``h`` the step in ``lambda``)."""

    order: ClassVar[int] = 4
    max_order: int = attrs.field(default=4, validator=number(integer=True, ge=4, le=12))
    # Equal-step coefficients: see the class docstring for why lambda is the default here.
    variable: str = attrs.field(default="lambda", validator=one_of(*VARIABLES))

    @property
    def convergence_order(self) -> int:
        return self.max_order

    def _options(self, vs):
        return {"max_order": self.max_order}


@attrs.frozen(kw_only=True)
class TorchdiffeqExplicitAdams(_Adams):
    __doc__ = _Adams.__doc__
    name: ClassVar[str] = "torchdiffeq-explicit_adams"
    method: ClassVar[str] = "explicit_adams"
    order: ClassVar[int] = 3

    @property
    def convergence_order(self) -> int:
        return self.max_order - 1

    def expected_nfe(self, steps: int) -> int:
        warm = min(steps, 2)  # RK4 steps, 4 NFE each
        return 4 * warm + (steps - warm)


def _corrected(method: str, default_iters: int) -> type:
    @attrs.frozen(kw_only=True)
    class Corrected(_Adams):
        name: ClassVar[str] = f"torchdiffeq-{method}"
        rtol: float = attrs.field(default=1e-7, validator=number(gt=0.0))
        atol: float = attrs.field(default=1e-9, validator=number(gt=0.0))
        max_iters: int = attrs.field(default=default_iters, validator=number(integer=True, ge=1))

        def _kwargs(self):
            return {"rtol": self.rtol, "atol": self.atol}

        def _options(self, vs):
            return {"max_order": self.max_order, "max_iters": self.max_iters}

    Corrected.method = method
    Corrected.__name__ = Corrected.__qualname__ = _class_name(method)
    Corrected.__doc__ = _Adams.__doc__ + (
        f"\n\n    torchdiffeq ``{method}``, ``max_iters`` default 30. A corrector that has "
        "not converged after ``max_iters`` iterations raises :class:`TorchdiffeqError` naming "
        "the step (torchdiffeq only warns and goes on with a lower-order history).")
    return Corrected


def _fixed(method: str, order: int, nfe: int) -> type:
    @attrs.frozen(kw_only=True)
    class Fixed(TorchdiffeqFixed):
        name: ClassVar[str] = f"torchdiffeq-{method}"
        nfe_per_step: ClassVar[int] = nfe

    Fixed.method, Fixed.order = method, order
    Fixed.__name__ = Fixed.__qualname__ = _class_name(method)
    Fixed.__doc__ = (f"torchdiffeq ``{method}``: explicit Runge-Kutta, order {order}, {nfe} NFE "
                     "per step, on the grid mapped to ``variable``.")
    return Fixed


def _adaptive(method: str, order: int) -> type:
    @attrs.frozen(kw_only=True)
    class Adaptive(TorchdiffeqAdaptive):
        name: ClassVar[str] = f"torchdiffeq-{method}"

    Adaptive.method, Adaptive.order = method, order
    Adaptive.__name__ = Adaptive.__qualname__ = _class_name(method)
    Adaptive.__doc__ = (f"torchdiffeq ``{method}``: adaptive embedded Runge-Kutta pair, order "
                        f"{order}.\n\n" + (TorchdiffeqAdaptive.__doc__ or ""))
    return Adaptive


def _build() -> tuple[type, ...]:
    have = _available()
    out: list[type] = [_adaptive(m, p) for m, p in ADAPTIVE_ORDERS.items() if m in have]
    out += [_fixed(m, p, n) for m, (p, n) in FIXED_ORDERS.items() if m in have]
    if "explicit_adams" in have:
        out.append(TorchdiffeqExplicitAdams)
    out += [_corrected(m, it) for m, it in (("implicit_adams", 30), ("fixed_adams", 30))
            if m in have]
    return tuple(out)


SOLVERS = _build()
for _cls in SOLVERS:
    globals()[_cls.__name__] = _cls
__all__ += [c.__name__ for c in SOLVERS if c.__name__ not in __all__]


@solverlab.hookimpl
def solverlab_register_solvers(registry):
    for cls in SOLVERS:
        registry.add(cls)
