"""The solverlab plugin API: pluggy hook specifications (project name ``"solverlab"``).

A plugin is a module (or object) with functions marked ``@solverlab.hookimpl`` and is made
known through the ``solverlab`` entry-point group of its distribution::

    [project.entry-points.solverlab]
    my_plugin = "my_package.plugin_module"

The entry-point name and the top-level module may not start with ``solverlab_``: that prefix
is reserved for solverlab's own plugins, which are loaded first.

Each ``solverlab_register_*`` hook is called once, when the registry is first used (never at
import time), with the :class:`~solverlab.registry.Registry`; it calls ``registry.add(cls)``
for each part it brings. ``add`` validates at once (concrete class, declared ``order`` for
solvers). A part whose name an earlier plugin took is refused alone; a plugin that raises
(``sys.exit()`` included) has all its parts withdrawn; a function named ``solverlab_*`` that
is not a hook below, or is one but lacks ``@solverlab.hookimpl``, is never called. Each is
reported by ``solverlab list`` under ``broken``, and every other plugin keeps working.
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("solverlab")
hookimpl = pluggy.HookimplMarker("solverlab")


@hookspec
def solverlab_register_solvers(registry: Any) -> None:
    """Register :class:`~solverlab.Solver` subclasses: ``registry.add(MySolver)``.

    Each class needs a unique ``name`` and an integer ``order`` >= 1. The global order the
    conformance kit checks and ``solverlab list`` shows is the ``convergence_order`` of the
    built solver (``order`` unless options change it: override the property then).
    Options are attrs fields with validators.
    """


@hookspec
def solverlab_register_schedules(registry: Any) -> None:
    """Register :class:`~solverlab.Schedule` subclasses (``name`` class attribute)."""


@hookspec
def solverlab_register_grids(registry: Any) -> None:
    """Register :class:`~solverlab.Grid` subclasses: rules ``(schedule, steps, t_start, t_end)``
    -> strictly decreasing float64 times."""


@hookspec
def solverlab_register_parameterizations(registry: Any) -> None:
    """Register :class:`~solverlab.Parameterization` subclasses (what a network outputs)."""


@hookspec
def solverlab_register_models(registry: Any) -> None:
    """Register :class:`~solverlab.Model` subclasses that ``solverlab.get_model(name, **options)``
    and ``solverlab compare --model`` can build from options alone."""


@hookspec
def solverlab_register_objectives(registry: Any) -> None:
    """Register :class:`~solverlab.Objective` subclasses (training losses)."""


@hookspec
def solverlab_register_commands(cli: Any) -> None:
    """Add subcommands to the ``solverlab`` click group: ``cli.add_command(my_command)``.
    Called when the command line starts."""
