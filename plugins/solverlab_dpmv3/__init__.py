"""solverlab_dpmv3: DPM-Solver-v3 (Zheng, Lu, Chen, Zhu 2023, arXiv 2310.13268).

Both halves: the sampler ``dpmv3`` (:class:`DPMSolverV3`) and the ``solverlab ems`` command
that computes the empirical model statistics it needs (:func:`solverlab.compute_ems`, the
:class:`solverlab.EMS` file format) for any registered model.

Registered through the ``solverlab`` entry-point group exactly as a third party's plugin.
"""

from __future__ import annotations

import solverlab

from ._sampler import PRESETS, TIMES, DPMSolverV3, StepCoef

__all__ = ["PRESETS", "TIMES", "DPMSolverV3", "StepCoef", "solverlab_register_commands",
           "solverlab_register_solvers"]


@solverlab.hookimpl
def solverlab_register_solvers(registry):
    registry.add(DPMSolverV3)


@solverlab.hookimpl
def solverlab_register_commands(cli):
    from ._command import ems_command

    cli.add_command(ems_command)
