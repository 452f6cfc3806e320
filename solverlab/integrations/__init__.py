"""Bridges to other libraries. Each submodule imports its library when it is imported itself,
never when :mod:`solverlab` is: ``import solverlab`` works without any of them.

- :mod:`solverlab.integrations.diffusers`: diffusers networks as solverlab models, and every
  fixed-grid solverlab solver as a diffusers scheduler (extra ``solverlab[diffusers]``).
"""
