"""solverlab_pndm: pseudo numerical methods for diffusion models (PNDM; Liu, Ren, Lin, Zhao,
ICLR 2022, arXiv 2202.09778).

``pndm-prk`` (pseudo RK4 every step; order 4, 4 NFE per step), ``pndm-plms`` (4-step pseudo
linear multistep with the paper's PRK warm-up or diffusers' PLMS-only one; order 2, 4 with
``weights="variable"``), ``pndm-s`` (S-PNDM; order 2, NFE = steps + 1) and ``pndm-f`` (F-PNDM;
order 2, NFE = steps + 9). Orders are measured ones (``_pndm``'s docstring explains why the
paper's fixed PLMS weights give 2). The transfer part is the DDIM step in its
exponential-integrator form (any schedule, VP or VE), and the pseudo combinations act on the
model's noise prediction whatever its parameterization.

Registered through the ``solverlab`` entry-point group exactly as a third party's plugin.
"""

from __future__ import annotations

import solverlab

from ._coefficients import PLMS, AdamsBashforth, transfer
from ._pndm import FPNDM, MIDPOINTS, PRK, SPNDM, WARMUPS, WEIGHTS, PLMSSolver, PseudoNumerical

__all__ = ["FPNDM", "MIDPOINTS", "PLMS", "PRK", "SOLVERS", "SPNDM", "WARMUPS", "WEIGHTS",
           "AdamsBashforth", "PLMSSolver", "PseudoNumerical", "solverlab_register_solvers",
           "transfer"]

SOLVERS = (PRK, PLMSSolver, SPNDM, FPNDM)


@solverlab.hookimpl
def solverlab_register_solvers(registry):
    for cls in SOLVERS:
        registry.add(cls)
