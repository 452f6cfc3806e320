"""The core's own parts, registered through the same hooks as every plugin (plugin
``solverlab``): schedules, parameterizations, grids and the analytic models."""

from __future__ import annotations

from . import grid, parameterization, schedule
from .hookspecs import hookimpl


@hookimpl
def solverlab_register_schedules(registry):
    for cls in schedule.SCHEDULES.values():
        registry.add(cls)


@hookimpl
def solverlab_register_parameterizations(registry):
    for cls in parameterization.PARAMETERIZATIONS.values():
        registry.add(cls)


@hookimpl
def solverlab_register_grids(registry):
    for cls in (grid.TimeUniform, grid.TimeQuadratic, grid.LogSNR, grid.Karras,
                grid.Exponential, grid.LuLambdas, grid.Beta, grid.PolyExponential, grid.VP,
                grid.Linspace, grid.Leading, grid.Trailing, grid.Custom):
        registry.add(cls)


@hookimpl
def solverlab_register_models(registry):
    from . import analytic

    for cls in analytic.REGISTERED_MODELS:
        registry.add(cls)
