"""solverlab_expint: exponential-integrator solvers of the probability-flow ODE.

DDIM (= DPM-Solver-1), DPM-Solver-2/3/fast (noise prediction, singlestep), multistep
DPM-Solver-2M/3M (noise prediction), DPM-Solver++ (2S)/(2M)/(3M) (data prediction), UniPC, DEIS
(docs/mathematics.md). They integrate the linear part of the ODE exactly in the half log-SNR
``lambda`` and approximate only the model output:

    x_t = A x_s - c_t z sum_j w_j m_j

The machinery is public: :mod:`solverlab_expint.integrator` (nodes, spans, order schedules,
exact Lagrange integrals, coefficient plans, the update) and
:mod:`solverlab_expint.phi_functions` (the one place phi-functions are evaluated); a new
exponential integrator needs nothing else (``tests/plugin_example`` has one).

Every coefficient is computed in float64 once per grid (in ``init``) and applied to the
state in its own dtype with in-place updates; the behaviours implementations disagree on
(``lower_order_final`` and its step threshold, ``final_step``, UniPC's order-2 shortcut, the
3M second difference, singlestep ``substeps``) are named options.

Registered through the ``solverlab`` entry-point group exactly as a third party's plugin.
"""

from __future__ import annotations

import solverlab

from ._ddim import DDIM
from ._multistep import DEIS, DPMSolver2M, DPMSolver3M, DPMSolverPP2M, DPMSolverPP3M, Multistep
from ._singlestep import (
    DPMSolver2,
    DPMSolver3,
    DPMSolverFast,
    DPMSolverPP2S,
    DPMSolverPP3S,
    Singlestep,
    singlestep_weights,
)
from ._unipc import UniPC
from .integrator import ExpIntSolver
from .phi_functions import phi, phis

__all__ = [
    "DDIM", "DEIS", "SOLVERS", "DPMSolver2", "DPMSolver2M", "DPMSolver3", "DPMSolver3M",
    "DPMSolverFast", "DPMSolverPP2M",
    "DPMSolverPP2S", "DPMSolverPP3M", "DPMSolverPP3S", "ExpIntSolver", "Multistep", "Singlestep",
    "UniPC", "phi", "phis", "singlestep_weights", "solverlab_register_solvers",
]

SOLVERS = (DDIM, DPMSolver2, DPMSolver3, DPMSolverFast, DPMSolverPP2S, DPMSolverPP3S,
           DPMSolverPP2M, DPMSolverPP3M, DPMSolver2M, DPMSolver3M, UniPC, DEIS)


@solverlab.hookimpl
def solverlab_register_solvers(registry):
    for cls in SOLVERS:
        registry.add(cls)
