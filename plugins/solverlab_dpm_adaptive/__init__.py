"""solverlab_dpm_adaptive: adaptive DPM-Solver-12/23 (``dpm-adaptive``), built from the
DPM-Solver-1/2/3 updates of :mod:`solverlab_expint`.

A plugin of its own (entry point ``solverlab_dpm_adaptive``) rather than a module of
``solverlab_expint``: it has no grid, so none of that plugin's per-grid coefficient cache,
``lower_order_final`` or ``final_step`` options apply; it only imports the update weights.
"""

from __future__ import annotations

import solverlab

from ._adaptive import DPMAdaptive, DPMAdaptiveError

__all__ = ["DPMAdaptive", "DPMAdaptiveError", "solverlab_register_solvers"]


@solverlab.hookimpl
def solverlab_register_solvers(registry):
    registry.add(DPMAdaptive)
