"""What a comparison scores a solve against, shared by :mod:`solverlab.compare` and
:mod:`solverlab.search`: the model of a comparison (:func:`build_model`), its start states
(:func:`evaluation_noises`: the test set) and the error definitions."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from .checkpoint import get_model
from .errors import OptionError, SolverlabError
from .model import Model
from .registry import get_registry

__all__ = ["DEFAULT_MODEL", "DEFAULT_SAMPLES", "ERROR_DEFINITION", "MEDIAN_ERROR_DEFINITION",
           "build_model", "evaluation_noises", "relative_errors", "relative_rms_error"]

DEFAULT_MODEL = "gaussian-mixture"
DEFAULT_SAMPLES = 256

ERROR_DEFINITION = (
    "sqrt(mean_i ||x_i - ref_i||^2) / sqrt(mean_i ||ref_i||^2): RMS over samples of the L2 "
    "error against the float64 reference, relative to the RMS L2 norm of the reference"
)
MEDIAN_ERROR_DEFINITION = (
    "median_i ||x_i - ref_i|| / sqrt(mean_i ||ref_i||^2): the median per-sample L2 error, "
    "normalised like the RMS error"
)


def relative_errors(x: Tensor, reference: Tensor) -> tuple[float, float]:
    """``(RMS, median)`` relative errors (module docstring), ``i`` along dim 0, in float64."""
    d = (x.to(torch.float64) - reference.to(torch.float64)).reshape(x.shape[0], -1)
    r = reference.to(torch.float64).reshape(reference.shape[0], -1)
    per_sample = d.pow(2).sum(dim=1)
    num = float(per_sample.mean().sqrt())
    # the median of the per-sample norms (the lower middle value for an even count)
    med = float(per_sample.sqrt().median())
    den = float(r.pow(2).sum(dim=1).mean().sqrt())
    return (num / den, med / den) if den > 0 else (num, med)


def relative_rms_error(x: Tensor, reference: Tensor) -> float:
    """``sqrt(mean_i ||x_i - r_i||^2) / sqrt(mean_i ||r_i||^2)``, ``i`` along dim 0, in float64."""
    return relative_errors(x, reference)[0]


def _build(kind: str, name: str, options: Mapping[str, Any] | None = None) -> Any:
    try:
        return get_registry().create(kind, name, **dict(options or {}))
    except TypeError as e:  # a part that cannot be built without options
        raise OptionError(
            f"compare: {kind} {name!r} cannot be built with options {dict(options or {})!r} "
            f"({e}); compare takes parts whose options all have defaults or are given"
        ) from None


@contextlib.contextmanager
def _about(option: str) -> Iterator[None]:
    """Tag a :class:`SolverlabError` raised in the block with the :func:`run_compare` argument
    it is about (``error.option``), so that the command line can name its flag."""
    try:
        yield
    except SolverlabError as e:
        if getattr(e, "option", None) is None:
            e.option = option  # type: ignore[attr-defined]
        raise


def build_model(
    model: str | Model = DEFAULT_MODEL,
    options: Mapping[str, Any] | None = None,
    schedule: str | None = None,
    schedule_options: Mapping[str, Any] | None = None,
) -> Model:
    """The model of a comparison: a registered name built with ``options``, a trained
    checkpoint (a shipped name or a file; options ``ema``, ``dtype``), or a
    :class:`~solverlab.Model`, taken as it is. ``schedule`` (a registered name) with
    ``schedule_options`` replaces the model's schedule through its ``schedule`` option; only
    ``schedule_options`` rebuilds the model's own schedule with them. Errors carry
    ``error.option`` (``"model"``, ``"model_options"``, ``"schedule"``, ``"schedule_options"``).
    """
    options = dict(options or {})
    schedule_options = dict(schedule_options or {})
    if isinstance(model, Model):
        if options or schedule is not None or schedule_options:
            with _about("model_options"):
                raise OptionError("compare: model options and a schedule apply to a registered "
                                  "model name, not to a Model instance; build it with them")
        return model
    if not isinstance(model, str):
        with _about("model"):
            raise OptionError(
                f"compare: model={model!r} must be a registered model name or a Model")
    if model not in get_registry().names("model"):
        from .checkpoint import find_checkpoint

        if find_checkpoint(model) is not None:  # a trained checkpoint (name or file)
            if schedule is not None or schedule_options:
                with _about("schedule" if schedule is not None else "schedule_options"):
                    raise OptionError(
                        f"compare: model {model!r} is a trained checkpoint; its network was "
                        "trained with its own schedule, which cannot be replaced")
            with _about("model_options" if options else "model"):
                return get_model(model, **options)
    with _about("model"):
        if model not in get_registry().names("model"):
            get_model(model)  # the unknown-name error, shipped checkpoints listed too
    if schedule is not None or schedule_options:
        if "schedule" in options:
            with _about("schedule"):
                raise OptionError(
                    f"compare: the schedule is given twice (schedule={schedule!r} and model "
                    f"option schedule={options['schedule']!r}); give it once")
        if schedule is None:  # the model's own schedule, rebuilt with the options
            with _about("model_options"):
                schedule = _build("model", model, options).schedule.name
        with _about("schedule" if not schedule_options else "schedule_options"):
            options["schedule"] = _build("schedule", schedule, schedule_options)
    with _about("model_options" if options else "model"):
        return _build("model", model, options)


def evaluation_noises(model: Model, samples: int = DEFAULT_SAMPLES, seed: int = 0) -> Tensor:
    """The start states compare scores a run on: ``model.sample_prior(samples)`` at
    ``schedule.t_max``, float64, drawn with a generator seeded with ``seed``. They are the test
    set of every comparison with these ``samples`` and ``seed``: a searched grid
    (:func:`solverlab.search.search_grid`) may not be fitted to them."""
    prior = getattr(model, "sample_prior", None)
    if not callable(prior):
        raise OptionError(
            f"compare: model {getattr(model, 'name', type(model).__name__)!r} has no "
            "sample_prior(n, generator=..., dtype=...); compare needs a model it can draw "
            "start states from")
    gen = torch.Generator().manual_seed(seed)
    return prior(samples, generator=gen, dtype=torch.float64)
