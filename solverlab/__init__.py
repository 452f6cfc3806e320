"""solverlab: a laboratory for diffusion-model samplers and training objectives.

The public surface is what this module re-exports; everything else is internal.
"""

from __future__ import annotations

from . import presets
from .checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointMismatchError,
    export_checkpoint,
    get_model,
    load_checkpoint,
    save_checkpoint,
)
from .datasets import get_dataset, load_dataset
from .ems import EMS, EMSError, EMSFileError, EMSMismatchError, compute_ems
from .errors import (
    DuplicateNameError,
    GridError,
    InputError,
    MissingExtraError,
    ModelOutputError,
    OptionError,
    RegistrationError,
    SolverDivergedError,
    SolverlabError,
    UnknownNameError,
)
from .grid import Grid, check_grid
from .hookspecs import hookimpl
from .model import Denoiser, Model, TimeMap, TorchModel, as_denoiser
from .objective import Objective
from .ode import PFODE
from .parameterization import Parameterization
from .registry import (
    get_grid,
    get_objective,
    get_parameterization,
    get_registry,
    get_schedule,
    get_solver,
)
from .schedule import Schedule
from .search import SearchedGrid, search_grid
from .solver import (
    AdaptiveSolver,
    Solution,
    SolveLoop,
    Solver,
    SolverState,
    StepInfo,
    all_finite,
    check_state,
)
from .train import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "EMS",
    "PFODE",
    "AdaptiveSolver",
    "Checkpoint",
    "CheckpointError",
    "CheckpointMismatchError",
    "Denoiser",
    "DuplicateNameError",
    "EMSError",
    "EMSFileError",
    "EMSMismatchError",
    "Grid",
    "GridError",
    "InputError",
    "MissingExtraError",
    "Model",
    "ModelOutputError",
    "Objective",
    "OptionError",
    "Parameterization",
    "RegistrationError",
    "Schedule",
    "SearchedGrid",
    "Solution",
    "SolveLoop",
    "Solver",
    "SolverDivergedError",
    "SolverState",
    "SolverlabError",
    "StepInfo",
    "TimeMap",
    "TorchModel",
    "TrainConfig",
    "UnknownNameError",
    "__version__",
    "all_finite",
    "as_denoiser",
    "check_grid",
    "check_state",
    "compute_ems",
    "export_checkpoint",
    "get_dataset",
    "get_grid",
    "get_model",
    "get_objective",
    "get_parameterization",
    "get_registry",
    "get_schedule",
    "get_solver",
    "hookimpl",
    "load_checkpoint",
    "load_dataset",
    "presets",
    "save_checkpoint",
    "search_grid",
    "train",
]
