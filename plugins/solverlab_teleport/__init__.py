"""solverlab_teleport: Gaussian "analytical teleportation" in front of any solver (Wang &
Vastola 2024, arXiv 2412.09726).

At high noise the score of a data distribution is close to that of its Gaussian fit, whose
probability-flow ODE has a closed form. ``teleport`` jumps along it, at no NFE, over the first
``skip`` of the grid's ``lambda`` range and runs any registered solver on the rest with all of
the grid's steps (docs/mathematics.md#gaussian-teleportation)::

    solver = solverlab.get_solver("teleport", inner="dpmpp-2m", skip=0.3, data=samples)

Public: :class:`Teleport` (the solver), :class:`GaussianFit` (the fit and its exact flow),
:func:`fit_error` (the estimate behind ``skip="auto"``), :data:`AUTO_SKIPS`.
Registered through the ``solverlab`` entry-point group exactly as a third party's plugin.
"""

from __future__ import annotations

import solverlab

from ._gaussian import GaussianFit, fit_error
from ._teleport import AUTO_SKIPS, Teleport

__all__ = ["AUTO_SKIPS", "GaussianFit", "Teleport", "fit_error", "solverlab_register_solvers"]


@solverlab.hookimpl
def solverlab_register_solvers(registry):
    registry.add(Teleport)
