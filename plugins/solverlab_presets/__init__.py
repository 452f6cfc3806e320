"""solverlab_presets: the ``preset`` solver, the best measured configuration for an NFE budget
(``solverlab.presets``, chosen by ``bench/frontier.py``) behind one name::

    solver = solverlab.get_solver("preset", nfe=10, data=training_samples)
    x = solver.solve(model, x_T, grid).x   # grid: 10 steps; its ends are used

Public: :class:`Preset`. Registered through the ``solverlab`` entry-point group exactly as a
third party's plugin; it builds every configuration through the registry by name, so it
imports no other plugin.
"""

from __future__ import annotations

import solverlab

from ._preset import Preset

__all__ = ["Preset", "solverlab_register_solvers"]


@solverlab.hookimpl
def solverlab_register_solvers(registry):
    registry.add(Preset)
