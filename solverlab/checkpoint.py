"""Checkpoints: one safetensors file that carries everything needed to sample a trained network
again correctly, and to resume its training bit for bit.

The file holds tensors under prefixes

- ``model.<name>``: the network's weights (``state_dict``) after the last optimizer step;
- ``ema.<name>``: their exponential moving average, the weights used for sampling;
- ``optim.<i>.<key>``: Adam's state of parameter ``i`` (``step``, ``exp_avg``, ``exp_avg_sq``);
- ``rng.<name>``: random generator states (uint8, :meth:`torch.Generator.get_state`);
- ``schedule.<option>``: tensor options of the noise schedule (e.g. its ``betas``), if any;
- ``train.loss``: the training loss of every step (float64),

and, in the safetensors header's metadata, ``format`` (``"solverlab-checkpoint"``),
``version`` and JSON values: ``network`` (the config :func:`~solverlab.networks.build_network`
rebuilds it from), ``objective`` (name and options), ``schedule`` (name, options, parameters),
``parameterization``, ``time_input``, ``time_map`` (:meth:`~solverlab.TimeMap.to_dict` or
``null``), ``dataset`` (name and options), ``train`` (steps, batch size, learning rate, EMA
decay, clipping, seed, save interval), ``optimizer`` (Adam's hyper-parameters), ``step``,
``contents`` and ``fingerprint`` (SHA-256 of the tensors of each prefix, checked on load).
docs/training.md describes the format.

:func:`load_checkpoint` rebuilds the model as a :class:`~solverlab.TorchModel` with the stored
schedule, parameterization, time input and time-conditioning map, so every solver feeds the
network the conditioning time it was trained with while ``alpha``, ``sigma`` and ``lambda``
stay at the true time. A bare name (``"moons-simple"``) is a checkpoint shipped in the
package's ``checkpoints`` folder. :func:`export_checkpoint` writes a sampling-only copy (no
optimizer or generator states).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import click
import torch
from torch import Tensor, nn

from ._io import atomic_write, read_safetensors
from .datasets import Dataset, get_dataset
from .ems import schedule_parameters
from .errors import InputError, OptionError, SolverlabError
from .model import TimeMap, TorchModel
from .schedule import SCHEDULES, Schedule

__all__ = ["CHECKPOINT_OPTIONS", "FORMAT", "SHIPPED", "VERSION", "Checkpoint", "CheckpointError",
           "CheckpointMismatchError", "TrainedModel", "TrainingData", "checkpoint_group",
           "checkpoint_model", "export_checkpoint", "find_checkpoint", "get_model",
           "load_checkpoint", "load_weights", "read_checkpoint", "save_checkpoint",
           "shipped_checkpoints"]

FORMAT = "solverlab-checkpoint"
VERSION = 1
SUFFIX = ".safetensors"
#: The folder of the checkpoints that ship with the package (found by bare name).
SHIPPED = Path(__file__).resolve().parent / "checkpoints"
#: The metadata keys every checkpoint has.
REQUIRED = ("network", "objective", "schedule", "parameterization", "time_input", "time_map",
            "dataset", "train", "step", "contents", "fingerprint")
#: Tensor prefixes, by the ``contents`` entry that says they are present.
PREFIXES = ("model", "ema", "optim", "rng", "schedule", "train")


class CheckpointError(InputError):
    """A checkpoint cannot be used: missing, truncated, corrupt, not a solverlab checkpoint, or
    lacking what the use needs; the message names the file and what is wrong."""


class CheckpointMismatchError(CheckpointError, OptionError):
    """A checkpoint does not match what it is used with (another network config, objective,
    data set, ...); the message names the field and both values."""


# -- names ---------------------------------------------------------------------------------
def shipped_checkpoints() -> list[str]:
    """The names of the checkpoints shipped with the package (sorted)."""
    if not SHIPPED.is_dir():
        return []
    return sorted(p.name[:-len(SUFFIX)] for p in SHIPPED.glob(f"*{SUFFIX}"))


def _looks_like_path(name: str) -> bool:
    return name.endswith(SUFFIX) or "/" in name or os.sep in name


def find_checkpoint(name_or_path: str | os.PathLike[str]) -> Path | None:
    """The file of a shipped checkpoint's name, or ``name_or_path`` itself when it is an
    existing file; ``None`` otherwise."""
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path:
        return None
    p = Path(name_or_path)
    if p.is_file():
        return p
    if not _looks_like_path(name_or_path):
        shipped = SHIPPED / f"{name_or_path}{SUFFIX}"
        if shipped.is_file():
            return shipped
    return None


def unknown_checkpoint_message(name: str) -> str:
    """Why ``name`` is not a checkpoint: no such file, or not a shipped name (close matches and
    the shipped names)."""
    names = shipped_checkpoints()
    close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
    return (f"no checkpoint {str(name)!r}{hint}: it is no file, nor a checkpoint shipped with "
            f"solverlab; shipped checkpoints: {', '.join(names) or '(none)'}")


def _resolve(name_or_path: str | os.PathLike[str]) -> Path:
    path = find_checkpoint(name_or_path)
    if path is None:
        raise CheckpointError(unknown_checkpoint_message(os.fspath(name_or_path)))
    return path


# -- reading and writing ---------------------------------------------------------------------
def _hash(tensors: Mapping[str, Tensor], prefix: str) -> str | None:
    keys = sorted(k for k in tensors if k.startswith(prefix + "."))
    if not keys:
        return None
    h = hashlib.sha256()
    for k in keys:
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]


def _jsonable(value: Any, where: str) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise OptionError(f"checkpoint field {where!r}: {value!r} cannot be stored as JSON "
                          f"({e}); give numbers, strings, lists and dicts") from None


def save_checkpoint(path: str | os.PathLike[str], tensors: Mapping[str, Tensor],
                    meta: Mapping[str, Any]) -> Path:
    """Write a checkpoint file atomically (a temporary file renamed over ``path``: an
    interrupted or failed write leaves any previous file intact).

    ``tensors`` are named with the prefixes of the module docstring; ``meta`` holds the
    :data:`REQUIRED` keys but ``contents`` and ``fingerprint``, which are filled in here
    (``contents``: the prefixes present)."""
    from safetensors.torch import save

    missing = [k for k in REQUIRED if k not in meta and k not in ("contents", "fingerprint")]
    if missing:
        raise OptionError(f"save_checkpoint: metadata lacks {', '.join(map(repr, missing))}")
    bad = [k for k in tensors if k.split(".", 1)[0] not in PREFIXES or "." not in k]
    if bad:
        raise OptionError(f"save_checkpoint: tensor names {bad[:3]} have no known prefix; use "
                          f"{', '.join(p + '.' for p in PREFIXES)}")
    if not any(k.startswith("model.") for k in tensors):
        raise OptionError("save_checkpoint: no network weights (tensors 'model.*')")
    blobs = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    contents = [p for p in PREFIXES if any(k.startswith(p + ".") for k in blobs)]
    full = {**{k: v for k, v in meta.items() if k not in ("format", "version")},
            "contents": contents,
            "fingerprint": {p: _hash(blobs, p) for p in contents}}
    header = {"format": FORMAT, "version": str(VERSION)}
    header.update({k: json.dumps(_jsonable(v, k), sort_keys=True) for k, v in full.items()})
    blob = save(blobs, metadata=header)
    return atomic_write(path, lambda f: f.write(blob), binary=True)


def read_checkpoint(name_or_path: str | os.PathLike[str]
                    ) -> tuple[dict[str, Tensor], dict[str, Any], Path]:
    """``(tensors, metadata, path)`` of a checkpoint file, checked: readable, a complete
    safetensors file, ``format`` and ``version`` known, every :data:`REQUIRED` key present,
    the weights equal to their fingerprints. :class:`CheckpointError` names the file and the
    fault otherwise."""
    path = _resolve(name_or_path)
    where = f"checkpoint file {str(path)!r}"
    tensors, raw = read_safetensors(path, where, CheckpointError)
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{where} has format {raw.get('format')!r}; expected {FORMAT!r} "
                              "(is it a solverlab checkpoint?)")
    if raw.get("version") != str(VERSION):
        raise CheckpointError(f"{where} has version {raw.get('version')!r}; this solverlab "
                              f"reads version {VERSION} (written by another solverlab version?)")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise CheckpointError(f"{where} lacks the metadata {', '.join(map(repr, missing))}")
    meta: dict[str, Any] = {"format": FORMAT, "version": VERSION}
    for k, v in raw.items():
        if k in ("format", "version"):
            continue
        try:
            meta[k] = json.loads(v)
        except ValueError as e:
            raise CheckpointError(f"{where}: metadata {k!r} is not valid JSON ({e})") from None
    fingerprint = meta["fingerprint"] if isinstance(meta["fingerprint"], Mapping) else {}
    for p in PREFIXES:
        if fingerprint.get(p) != _hash(tensors, p):
            raise CheckpointError(f"{where} is corrupt: the '{p}.*' tensors do not match their "
                                  "fingerprint")
    if not any(k.startswith("model.") for k in tensors):
        raise CheckpointError(f"{where} holds no network weights ('model.*' tensors)")
    return tensors, meta, path


def section(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors under ``prefix.``, with the prefix removed."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


# -- comparison ------------------------------------------------------------------------------
def first_difference(ours: Any, theirs: Any, field: str) -> tuple[str, Any, Any] | None:
    """The first field (dotted path) where two JSON values differ, with both values."""
    if isinstance(ours, Mapping) and isinstance(theirs, Mapping):
        for k in sorted(set(ours) | set(theirs), key=str):
            d = first_difference(ours.get(k, "(absent)"), theirs.get(k, "(absent)"),
                                 f"{field}.{k}")
            if d is not None:
                return d
        return None
    return None if ours == theirs else (field, ours, theirs)


def check_same(where: str, field: str, stored: Any, given: Any, hint: str) -> None:
    """Raise :class:`CheckpointMismatchError` naming the first differing field of ``stored``
    (the checkpoint's) and ``given`` (the use's)."""
    d = first_difference(_jsonable(stored, field), _jsonable(given, field), field)
    if d is not None:
        f, a, b = d
        raise CheckpointMismatchError(f"{where}: {f} differs: the checkpoint has {a!r}, "
                                      f"{hint} {b!r}")


# -- building --------------------------------------------------------------------------------
def schedule_spec(name: str, options: Mapping[str, Any], schedule: Schedule) -> dict[str, Any]:
    """``{"name", "options", "parameters"}`` of a schedule: the name and options rebuild it
    (tensor options travel as ``schedule.<option>`` tensors), the parameters check it."""
    opts = {k: ("<tensor>" if isinstance(v, Tensor) else v) for k, v in options.items()}
    return {"name": name, "options": opts, "parameters": schedule_parameters(schedule)}


def build_schedule(name: str, options: Mapping[str, Any]) -> Schedule:
    """The schedule ``name`` with ``options``: a core schedule, else a registered one."""
    if name in SCHEDULES:
        cls = SCHEDULES[name]
        allowed = [a.alias for a in attrs.fields(cls) if a.init] if attrs.has(cls) else None
        unknown = sorted(set(options) - set(allowed or options))
        if unknown:
            raise OptionError(f"schedule {name!r} has no option {', '.join(map(repr, unknown))};"
                              f" its options are: {', '.join(allowed or [])}")
        return cls(**options)
    from .registry import get_schedule

    return get_schedule(name, **options)


def _stored_schedule(meta: Mapping[str, Any], tensors: Mapping[str, Tensor], where: str
                     ) -> Schedule:
    spec = meta["schedule"]
    try:
        options = {k: (tensors[f"schedule.{k}"] if v == "<tensor>" else v)
                   for k, v in spec["options"].items()}
        schedule = build_schedule(spec["name"], options)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: the schedule {spec!r} cannot be rebuilt ({e})") from None
    except SolverlabError as e:
        raise CheckpointError(f"{where}: the schedule cannot be rebuilt: {e}") from None
    check_same(where, "schedule.parameters", spec.get("parameters"),
               schedule_parameters(schedule), "rebuilt here it has")
    return schedule


def _module_config(module: nn.Module) -> dict[str, Any] | None:
    config = getattr(module, "config", None)
    return dict(config) if isinstance(config, Mapping) else None


def load_weights(module: nn.Module, weights: Mapping[str, Tensor], *, where: str,
                 config: Mapping[str, Any] | None = None,
                 stored_config: Mapping[str, Any] | None = None) -> nn.Module:
    """Copy ``weights`` into ``module``, checked first: the network configs (``config`` of the
    module, ``stored_config`` of the checkpoint) field by field, then every tensor's name and
    shape; :class:`CheckpointMismatchError` names the field or tensor and both values."""
    config = _module_config(module) if config is None else dict(config)
    if config is not None and stored_config is not None:
        check_same(where, "network", stored_config, config, "the network to load into has")
    own = module.state_dict()
    for k in sorted(set(own) | set(weights)):
        if k not in weights:
            raise CheckpointMismatchError(f"{where}: the network has a tensor {k!r} that the "
                                          "checkpoint lacks (another network config?)")
        if k not in own:
            raise CheckpointMismatchError(f"{where}: the checkpoint has a tensor {k!r} that the "
                                          "network lacks (another network config?)")
        if own[k].shape != weights[k].shape:
            raise CheckpointMismatchError(
                f"{where}: tensor {k!r} has shape {tuple(weights[k].shape)} in the checkpoint, "
                f"{tuple(own[k].shape)} in the network (another network config?)")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()})
    return module


@attrs.frozen(kw_only=True)
class TrainingData:
    """Draws from the data set a model was trained on: ``sample(n, generator)`` in ``dtype``
    (what :func:`solverlab.compare.run_compare` uses to prepare solvers that need data, e.g.
    DPM-Solver-v3's statistics)."""

    dataset: Dataset
    dtype: torch.dtype = torch.float32

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.dataset.shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.dataset.sample(n, generator, self.dtype)


class TrainedModel(TorchModel):
    """A :class:`~solverlab.TorchModel` loaded from a checkpoint, which also knows its training
    data: ``data`` (:class:`TrainingData`), ``sample_prior`` (start states at ``t_max``),
    ``name``. Inputs are cast to the network's dtype and outputs back to the input's."""

    def __init__(self, module: nn.Module, schedule: Schedule, parameterization: str,
                 time_input: str, time_map: TimeMap | None, dataset: Dataset,
                 name: str) -> None:
        super().__init__(module, schedule, parameterization, time_input=time_input,
                         time_map=time_map)
        self.dataset = dataset
        self.name = name

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.module.parameters(), None)
        return torch.float32 if p is None else p.dtype

    @property
    def data(self) -> TrainingData:
        return TrainingData(dataset=self.dataset, dtype=self.dtype)

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        out = super().__call__(x.to(self.dtype), t, **cond)
        return out.to(x.dtype) if isinstance(out, Tensor) and out.is_floating_point() else out

    def sample_prior(self, n: int, t: float | None = None,
                     generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float64) -> Tensor:
        """``n`` draws of ``x_t = alpha_t x0 + sigma_t eps`` at ``t`` (default ``t_max``) with
        ``x0`` from the training data: the exact marginal of the data the model learned."""
        t = self.schedule.t_max if t is None else float(t)
        x0 = self.dataset.sample(n, generator, torch.float64)
        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        tt = torch.tensor(t, dtype=torch.float64)
        return (self.schedule.alpha(tt) * x0 + self.schedule.sigma(tt) * eps).to(dtype)

    def __repr__(self) -> str:
        return f"TrainedModel({self.name!r}, {super().__repr__()})"


@attrs.frozen(kw_only=True, eq=False)
class Checkpoint:
    """A loaded checkpoint: ``model`` (a :class:`TrainedModel`, in eval mode, EMA weights
    unless loaded with ``ema=False``), ``network`` (the network config), ``meta`` (all
    metadata), ``step``, ``path``."""

    path: Path
    meta: Mapping[str, Any]
    model: TrainedModel
    #: The training loss of every step (float64), ``None`` if not stored.
    losses: Tensor | None = None

    @property
    def name(self) -> str:
        return self.path.name[:-len(SUFFIX)] if self.path.name.endswith(SUFFIX) \
            else self.path.name

    @property
    def module(self) -> nn.Module:
        return self.model.module

    @property
    def network(self) -> dict[str, Any]:
        return dict(self.meta["network"])

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def objective(self) -> dict[str, Any]:
        """``{"name": ..., "options": {...}}`` of the objective it was trained with."""
        return dict(self.meta["objective"])

    @property
    def time_map(self) -> TimeMap | None:
        return self.model.time_map

    @property
    def dataset(self) -> Dataset:
        return self.model.dataset

    def data(self, n: int | None = None, seed: int = 0,
             dtype: torch.dtype = torch.float32) -> Tensor:
        """``n`` training samples drawn with a generator seeded by ``seed``
        (:func:`~solverlab.load_dataset` on the stored data set)."""
        from .datasets import load_dataset

        spec = self.meta["dataset"]
        return load_dataset(spec["name"], n, seed, dtype=dtype, **spec["options"])

    def __repr__(self) -> str:
        return (f"Checkpoint({str(self.path)!r}, step={self.step}, "
                f"objective={self.objective['name']!r}, network={self.network['kind']!r})")


def load_checkpoint(name_or_path: str | os.PathLike[str], *, ema: bool = True,
                    network: Mapping[str, Any] | None = None,
                    dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Load a checkpoint by shipped name (:func:`shipped_checkpoints`) or path.

    - ``ema``: the EMA weights (default) or the raw ones;
    - ``network``: a network config the caller expects; a stored config that differs is a
      :class:`CheckpointMismatchError` naming the field and both values;
    - ``dtype``: of the network's weights (``torch.float64`` for float64 reference solves).

    The model is a :class:`TrainedModel` in eval mode with the stored schedule,
    parameterization, time input and time-conditioning map."""
    from .networks import build_network

    if not isinstance(ema, bool):
        raise OptionError(f"load_checkpoint: ema={ema!r} is not allowed; give True or False")
    tensors, meta, path = read_checkpoint(name_or_path)
    where = f"checkpoint {str(path)!r}"
    if network is not None:
        check_same(where, "network", meta["network"], network, "the caller expects")
    prefix = "ema" if ema else "model"
    if prefix not in meta["contents"]:
        raise CheckpointError(f"{where} holds no {prefix!r} weights; load it with "
                              f"ema={not ema}")
    try:
        with torch.random.fork_rng(devices=[]):
            module = build_network(meta["network"])
    except SolverlabError as e:
        raise CheckpointError(f"{where}: its network config {meta['network']!r} cannot be "
                              f"built: {e}") from None
    load_weights(module, section(tensors, prefix), where=where)  # config checked above
    module.to(dtype).eval()
    module.requires_grad_(False)
    schedule = _stored_schedule(meta, tensors, where)
    try:
        time_map = TimeMap.from_dict(meta["time_map"])
        dataset = get_dataset(meta["dataset"]["name"], **meta["dataset"]["options"])
        model = TrainedModel(module, schedule, meta["parameterization"], meta["time_input"],
                             time_map, dataset, path.name[:-len(SUFFIX)]
                             if path.name.endswith(SUFFIX) else path.name)
    except SolverlabError as e:
        raise CheckpointError(f"{where}: {e}") from None
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: malformed metadata ({e!r})") from None
    return Checkpoint(path=path, meta=meta, model=model, losses=tensors.get("train.loss"))


def export_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Write a sampling-only copy of ``src`` to ``dst`` (atomically): the weights (raw and
    EMA), the schedule tensors, the loss history and all metadata, without the optimizer and
    generator states (about a third of a training checkpoint; it cannot be resumed)."""
    tensors, meta, _ = read_checkpoint(src)
    kept = {k: v for k, v in tensors.items() if k.split(".", 1)[0] not in ("optim", "rng")}
    meta = {k: v for k, v in meta.items()
            if k not in ("format", "version", "contents", "fingerprint", "optimizer")}
    return save_checkpoint(dst, kept, meta)


# -- command line ------------------------------------------------------------------------------
@click.group("checkpoint")
def checkpoint_group() -> None:
    """Inspect, list and export training checkpoints."""


@checkpoint_group.command("list")
def list_checkpoints_command() -> None:
    """The checkpoints shipped with solverlab (usable by name wherever a model is named)."""
    names = shipped_checkpoints()
    if not names:
        click.echo("(no checkpoints shipped)")
    for name in names:
        path = SHIPPED / f"{name}{SUFFIX}"
        click.echo(f"{name}  ({path.stat().st_size / 1e6:.2f} MB)")


@checkpoint_group.command("info")
@click.argument("checkpoint")
def info_command(checkpoint: str) -> None:
    """Print the metadata of CHECKPOINT (a shipped name or a file) as JSON."""
    _, meta, path = read_checkpoint(checkpoint)
    click.echo(json.dumps({"path": str(path), **meta}, indent=2, sort_keys=True))


@checkpoint_group.command("export")
@click.argument("src")
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace an existing DST.")
def export_command(src: str, dst: Path, force: bool) -> None:
    """Write a sampling-only copy of SRC to DST: without the optimizer and generator states,
    about a third of the size; it loads for sampling but cannot be resumed."""
    if dst.exists() and not force:
        raise click.BadParameter(f"{str(dst)!r} exists; add --force to replace it",
                                 param_hint="'DST'")
    export_checkpoint(src, dst)
    click.echo(f"wrote {dst} ({dst.stat().st_size / 1e6:.2f} MB) from {src}")


# -- checkpoints wherever a model is named ---------------------------------------------------
def get_model(name: str, **options: Any) -> Any:
    """A model built from options alone, e.g. ``get_model("gaussian-mixture", dim=4)``, or a
    trained checkpoint: a shipped checkpoint's name (``get_model("moons-simple")``) or a
    checkpoint file's path, loaded with :func:`solverlab.load_checkpoint` (options ``ema``,
    default true, and ``dtype``, default ``"float64"``: the precision of compare's reference
    solves). Registered names come first."""
    from .errors import UnknownNameError
    from .registry import get_registry

    reg = get_registry()
    if isinstance(name, str) and name not in reg.names("model"):
        path = find_checkpoint(name)
        if path is not None:
            return checkpoint_model(path, **options)
        try:
            reg.entry("model", name)
        except UnknownNameError as e:
            raise UnknownNameError(f"{e}\n  ({unknown_checkpoint_message(name)})") from None
    return reg.create("model", name, **options)


#: The options of a checkpoint used as a model.
CHECKPOINT_OPTIONS = ("ema", "dtype")


def checkpoint_model(path: Any, *, ema: bool = True, dtype: Any = "float64", **options: Any
                     ) -> TrainedModel:
    """The model of the checkpoint at ``path`` (a :class:`~solverlab.checkpoint.TrainedModel`):
    ``ema`` weights or the raw ones, network weights in ``dtype`` (``"float32"``,
    ``"float64"`` or a torch dtype)."""
    if options:
        raise OptionError(f"checkpoint model {str(path)!r} has no option "
                          f"{', '.join(map(repr, sorted(options)))}; its options are: "
                          f"{', '.join(CHECKPOINT_OPTIONS)}")
    dtypes = {"float32": torch.float32, "float64": torch.float64}
    if isinstance(dtype, str):
        if dtype not in dtypes:
            raise OptionError(f"checkpoint model {str(path)!r}: option dtype={dtype!r} is not "
                              f"allowed; choose one of {', '.join(map(repr, dtypes))}")
        dtype = dtypes[dtype]
    if dtype not in dtypes.values():
        raise OptionError(f"checkpoint model {str(path)!r}: option dtype={dtype!r} is not "
                          "allowed; give torch.float32 or torch.float64")
    return load_checkpoint(path, ema=ema, dtype=dtype).model
