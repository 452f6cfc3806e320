"""The solverlab error hierarchy.

Every error solverlab raises on purpose is a :class:`SolverlabError`; each message names the
option or input, the value given and what is allowed, so that the fix is in the message.
"""

from __future__ import annotations

__all__ = [
    "DuplicateNameError",
    "GridError",
    "InputError",
    "MissingExtraError",
    "ModelOutputError",
    "OptionError",
    "RegistrationError",
    "SolverDivergedError",
    "SolverlabError",
    "UnknownNameError",
]


class SolverlabError(Exception):
    """Base class of every error raised by solverlab on purpose."""


class OptionError(SolverlabError, ValueError):
    """An option (constructor argument, keyword of a ``get_*`` lookup) has a bad value."""


class GridError(OptionError):
    """A time grid is not strictly decreasing, has duplicates, leaves the schedule's range or
    has fewer than one step."""


class InputError(SolverlabError, ValueError):
    """A tensor given to solverlab is unusable: wrong shape, wrong dtype, NaN or infinite."""


class MissingExtraError(SolverlabError, ImportError):
    """An optional dependency is not installed; the message names the extra to install
    (``pip install 'solverlab[digits]'``)."""


class ModelOutputError(InputError):
    """A model returned something that is not a tensor shaped like its input ``x``; the message
    names the model, the expected and the actual shape or type, and the likely cause."""


class UnknownNameError(SolverlabError, LookupError):
    """A name was looked up that no plugin registered."""

    def __str__(self) -> str:  # LookupError would quote the message like a KeyError
        return str(self.args[0]) if self.args else ""


class RegistrationError(SolverlabError, TypeError):
    """A plugin tried to register something invalid (abstract class, no declared order, ...)."""


class DuplicateNameError(RegistrationError):
    """Two plugins registered the same name for the same kind of part."""


class SolverDivergedError(SolverlabError, FloatingPointError):
    """The state became NaN or infinite during a solve; the message names the step and time."""
