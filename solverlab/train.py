"""The trainer behind ``solverlab train``: a small network trained with a registered
:class:`~solverlab.Objective` on a shipped data set, with Adam, an exponential moving average
of the weights, gradient-norm clipping and explicit seeds; checkpoints are written atomically
every ``save_every`` steps and at the end, and a run resumed from one continues bit for bit.

Randomness: the initial weights come from torch's generator seeded with ``3 seed``, the
training batches from a generator seeded with ``3 seed + 1`` and the objective's noise and
times from one seeded with ``3 seed + 2``; torch's global generator is seeded with ``3 seed``
inside the run (and restored afterwards) for objectives that draw from it. All their states
are saved in each checkpoint, so a resumed run draws what the uninterrupted one would have.

One step: ``x0`` = a batch of the data set; ``loss = objective.loss(model, x0, generator=...)``;
``loss.backward()``; the gradient's global norm clipped to ``clip``; an Adam step (Kingma & Ba
2015); then ``ema <- decay ema + (1 - decay) w`` for every weight ``w``.

Under torchrun (:mod:`solverlab.distributed`) the network is wrapped in PyTorch's
:class:`~torch.nn.parallel.DistributedDataParallel`: the batch's ``micro_batches`` parts are
dealt out to the ranks, each rank backpropagates its parts' losses and DDP sums the gradients
(in float64, through a communication hook) during the last backward; rank 0 logs and writes
the checkpoints. The parts, not the processes, carry the randomness, so a checkpoint resumes
under any number of processes.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import click
import torch
from torch import Tensor

from .checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointMismatchError,
    build_schedule,
    check_same,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    schedule_spec,
    section,
)
from .datasets import DATASETS, Dataset, get_dataset
from .errors import OptionError, SolverlabError, UnknownNameError
from .model import TimeMap, TorchModel
from .networks import build_network
from .objective import Objective
from .schedule import Schedule

__all__ = ["TrainConfig", "TrainingDivergedError", "default_network", "train", "train_command"]

#: Seeds are integers in ``0..SEED_MAX`` (so that ``3 seed + 2`` fits a generator seed).
SEED_MAX = 2**60


class TrainingDivergedError(SolverlabError, FloatingPointError):
    """The training loss became NaN or infinite; the message names the step."""


def default_network(dataset: str) -> dict[str, Any]:
    """The network a data set trains by default: an MLP for 2-D points, a UNet for images."""
    shape = DATASETS[dataset].shape if dataset in DATASETS else (2,)
    if len(shape) == 1:
        return {"kind": "mlp", "dim": shape[0]}
    return {"kind": "unet", "channels": shape[0]}


def _int(name: str, low: int, high: int | None = None) -> Callable[..., None]:
    def check(_inst: Any, _attr: Any, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (
                high is not None and value > high):
            allowed = f"an int >= {low}" if high is None else f"an int in {low}..{high}"
            raise OptionError(f"TrainConfig: option {name}={value!r} is not allowed; give "
                              f"{allowed}")
    return check


def _float(name: str, low: float, high: float, *, open_low: bool = True,
           open_high: bool = False, optional: bool = False) -> Callable[..., None]:
    def check(_inst: Any, _attr: Any, value: Any) -> None:
        if value is None and optional:
            return
        ok = (not isinstance(value, bool) and isinstance(value, (int, float))
              and math.isfinite(value) and (value > low if open_low else value >= low)
              and (value < high if open_high else value <= high))
        if not ok:
            lo, hi = "(" if open_low else "[", ")" if open_high else "]"
            raise OptionError(f"TrainConfig: option {name}={value!r} is not allowed; give a "
                              f"number in {lo}{low:g}, {high:g}{hi}"
                              + (" or None" if optional else ""))
    return check


def _mapping(name: str) -> Callable[..., None]:
    def check(_inst: Any, _attr: Any, value: Any) -> None:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise OptionError(f"TrainConfig: option {name}={value!r} is not allowed; give a "
                              "mapping of option names to values")
    return check


def _objective_spec(objective: Objective) -> dict[str, Any]:
    cls = type(objective)
    options = ({a.name: getattr(objective, a.name) for a in attrs.fields(cls) if a.init}
               if attrs.has(cls) else {})
    name = getattr(cls, "name", None)
    if not isinstance(name, str):
        raise OptionError(f"TrainConfig: objective {objective!r} has no name (a class "
                          "attribute `name`); a checkpoint records the objective by name")
    return {"name": name, "options": options}


@attrs.frozen(kw_only=True)
class TrainConfig:
    """What to train, and how.

    - ``dataset`` (a name of :data:`~solverlab.datasets.DATASETS`) and ``dataset_options``;
    - ``objective``: a registered objective name (built with ``objective_options``) or an
      :class:`~solverlab.Objective` instance;
    - ``network``: a network config (:func:`~solverlab.networks.build_network`), merged over
      :func:`default_network` of the data set (an MLP for 2-D sets, a UNet for digits; with
      ``time_input="t"`` its ``time_scale`` defaults to 1000);
    - ``schedule`` (default ``vp-discrete``: DDPM's linear betas, ``N = 1000``) with
      ``schedule_options``, ``parameterization`` (``noise``), ``time_input`` (``index``: the
      network sees the step index ``0..N-1``);
    - ``steps``, ``batch_size``, ``lr`` (Adam; default 1e-3 for 2-D sets, 5e-4 for digits),
      ``ema`` (decay of the weight average), ``clip`` (maximal global gradient norm, ``None``:
      no clipping), ``seed``, ``save_every`` (checkpoint interval in steps);
    - ``micro_batches``: the batch is split into this many equal parts, each with its own
      generator of objective noise, and the step's loss is the mean of their losses. Under
      torchrun the parts are dealt out to the ranks (contiguously, as
      :func:`~solverlab.distributed.shard`), so a run's numbers depend on ``micro_batches``,
      not on the number of processes, and a checkpoint resumes under any number (ranks beyond
      ``micro_batches`` hold no part: they only join the gradient sum). ``1`` (one part, the
      generator ``3 seed + 2``) is the plain single-process run.
    """

    dataset: str = attrs.field(default="moons")
    dataset_options: Mapping[str, Any] = attrs.field(factory=dict, converter=dict,
                                                     validator=_mapping("dataset_options"))
    objective: str | Objective = attrs.field(default="simple")
    objective_options: Mapping[str, Any] = attrs.field(
        factory=dict, converter=dict, validator=_mapping("objective_options"))
    network: Mapping[str, Any] | None = None
    schedule: str = "vp-discrete"
    schedule_options: Mapping[str, Any] = attrs.field(factory=dict, converter=dict,
                                                      validator=_mapping("schedule_options"))
    parameterization: str = "noise"
    time_input: str = "index"
    steps: int = attrs.field(default=2000, validator=_int("steps", 1))
    batch_size: int = attrs.field(default=256, validator=_int("batch_size", 1))
    lr: float | None = attrs.field(default=None, validator=_float("lr", 0, 1, optional=True))
    ema: float = attrs.field(default=0.999, validator=_float("ema", 0, 1, open_low=False,
                                                             open_high=True))
    clip: float | None = attrs.field(default=1.0, validator=_float("clip", 0, math.inf,
                                                                   optional=True))
    seed: int = attrs.field(default=0, validator=_int("seed", 0, SEED_MAX))
    save_every: int = attrs.field(default=500, validator=_int("save_every", 1))
    micro_batches: int = attrs.field(default=1, validator=_int("micro_batches", 1))

    def __attrs_post_init__(self) -> None:
        if self.batch_size % self.micro_batches:
            raise OptionError(f"TrainConfig: option micro_batches={self.micro_batches!r} does "
                              f"not divide batch_size={self.batch_size}; the batch is split "
                              "into micro_batches equal parts")
        get_dataset(self.dataset, **self.dataset_options)  # unknown name or option: now
        if self.network is not None and not isinstance(self.network, Mapping):
            raise OptionError(f"TrainConfig: option network={self.network!r} is not allowed; "
                              "give a network config such as {'kind': 'mlp', 'hidden': 128}")
        given = dict(self.network or {})
        base = default_network(self.dataset)
        if given.get("kind", base["kind"]) != base["kind"]:
            base = {"kind": given["kind"]}
        if self.time_input == "t":  # embed 1000 t: the frequencies suit a 0..1000 range
            base["time_scale"] = 1000.0
        with torch.random.fork_rng(devices=[]):
            net = build_network({**base, **given})
        object.__setattr__(self, "network", dict(net.config))
        if self.lr is None:
            object.__setattr__(self, "lr", 1e-3 if len(DATASETS[self.dataset].shape) == 1
                               else 5e-4)
        if isinstance(self.objective, Objective):
            if self.objective_options:
                raise OptionError("TrainConfig: objective_options apply to an objective name; "
                                  "an Objective instance carries its own options")
        elif not isinstance(self.objective, str):
            raise OptionError(f"TrainConfig: option objective={self.objective!r} is not "
                              "allowed; give a registered objective name or an Objective")
        self.build_objective()  # unknown name or option: now
        model = self.build_model(net)
        shape = DATASETS[self.dataset].shape
        try:
            with torch.no_grad():
                out = model(torch.zeros(2, *shape), torch.full((2,), model.schedule.t_max,
                                                              dtype=torch.float64))
        except (RuntimeError, ValueError) as e:
            raise OptionError(f"TrainConfig: network {self.network!r} does not fit dataset "
                              f"{self.dataset!r} (samples of shape {shape}): {e}") from None
        if tuple(out.shape) != (2, *shape):
            raise OptionError(f"TrainConfig: network {self.network!r} maps samples of shape "
                              f"{shape} to {tuple(out.shape[1:])}; it must keep the shape")

    # -- parts ---------------------------------------------------------------------------
    def build_dataset(self) -> Dataset:
        return get_dataset(self.dataset, **self.dataset_options)

    def build_objective(self) -> Objective:
        if isinstance(self.objective, Objective):
            return self.objective
        from .registry import get_objective

        return get_objective(self.objective, **self.objective_options)

    def build_schedule(self) -> Schedule:
        return build_schedule(self.schedule, self.schedule_options)

    def build_model(self, module: torch.nn.Module) -> TorchModel:
        """``module`` as the model the objective trains: the schedule, parameterization and
        time input of this config, and the objective's time-conditioning map."""
        schedule = self.build_schedule()
        plain = TorchModel(module, schedule, self.parameterization, time_input=self.time_input)
        time_map = self.build_objective().time_map(plain)
        if time_map is not None and not isinstance(time_map, TimeMap):
            raise OptionError(f"objective {self.objective_spec()['name']!r}: time_map() returned "
                              f"{time_map!r}; it must return a solverlab.TimeMap or None")
        return TorchModel(module, schedule, self.parameterization, time_input=self.time_input,
                          time_map=time_map)

    # -- metadata ------------------------------------------------------------------------
    def objective_spec(self) -> dict[str, Any]:
        if isinstance(self.objective, Objective):
            return _objective_spec(self.objective)
        return _objective_spec(self.build_objective())

    def train_spec(self) -> dict[str, Any]:
        spec = {"steps": self.steps, "batch_size": self.batch_size, "lr": self.lr,
                "ema": self.ema, "clip": self.clip, "seed": self.seed,
                "save_every": self.save_every}
        if self.micro_batches != 1:  # one part: the metadata of a plain run, as before
            spec["micro_batches"] = self.micro_batches
        return spec

    def meta(self, model: TorchModel) -> dict[str, Any]:
        """The checkpoint metadata of this config (``step`` excluded)."""
        return {
            "network": dict(self.network),
            "objective": self.objective_spec(),
            "schedule": schedule_spec(self.schedule, self.schedule_options, model.schedule),
            "parameterization": model.parameterization.name,
            "time_input": model.time_input,
            "time_map": None if model.time_map is None else model.time_map.to_dict(),
            "dataset": self.build_dataset().spec(),
            "train": self.train_spec(),
        }


#: The fields a resumed run must share with its checkpoint (``train.steps`` may grow and
#: ``train.save_every`` change).
RESUME_FIELDS = ("dataset", "objective", "network", "schedule", "parameterization",
                 "time_input", "time_map")
RESUME_TRAIN_FIELDS = ("batch_size", "lr", "ema", "clip", "seed", "micro_batches")
#: A field a checkpoint may lack, and what its absence means.
TRAIN_FIELD_DEFAULTS = {"micro_batches": 1}


def _check_resume(path: Path, stored: Mapping[str, Any], meta: Mapping[str, Any],
                  steps: int) -> None:
    where = f"cannot resume from {str(path)!r}"
    for field in RESUME_FIELDS:
        check_same(where, field, stored[field], meta[field], "this run has")
    for field in RESUME_TRAIN_FIELDS:
        default = TRAIN_FIELD_DEFAULTS.get(field)
        check_same(where, f"train.{field}", stored["train"].get(field, default),
                   meta["train"].get(field, default), "this run has")
    missing = [p for p in ("optim", "rng") if p not in stored["contents"]]
    if missing:
        raise CheckpointError(f"{where}: it holds no {' or '.join(missing)} state (a "
                              "sampling-only export?); resume from the training checkpoint")
    if int(stored["step"]) > steps:
        raise CheckpointMismatchError(
            f"{where}: it is at step {stored['step']}, beyond steps={steps}; give steps >= "
            f"{stored['step']}")


def _flat_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors = {f"optim.{i}.{k}": (v if isinstance(v, Tensor) else torch.tensor(v))
               for i, state in sd["state"].items() for k, v in state.items()}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in sd["param_groups"]]
    return tensors, {"name": type(opt).__name__.lower(), "param_groups": groups}


def _unflat_optimizer(tensors: Mapping[str, Tensor], info: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Tensor]] = {}
    for k, v in section(tensors, "optim").items():
        i, key = k.split(".", 1)
        state.setdefault(int(i), {})[key] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()}
              for g in info["param_groups"]]
    return {"state": state, "param_groups": groups}


def _progress_bar(total: int, initial: int, show: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", disable=not show, unit="step",
                dynamic_ncols=True)


def train(config: TrainConfig, out: str | os.PathLike[str], *, resume: bool = False,
          overwrite: bool = False, progress: bool | None = None,
          callback: Callable[[int, float], None] | None = None) -> Checkpoint:
    """Train as ``config`` says and write checkpoints to ``out`` (module docstring); returns
    the final :class:`~solverlab.Checkpoint` (EMA weights).

    - ``resume``: continue from the checkpoint at ``out``, which must share ``config``'s data
      set, objective, network, schedule and training settings (``steps`` may be larger, so a
      finished run can be extended); the result is bit for bit the uninterrupted run's;
    - ``overwrite``: replace an existing ``out`` (without it, and without ``resume``, an
      existing file is an error: nothing written is lost);
    - ``progress``: a tqdm bar with the loss (``None``: when stderr is a terminal);
    - ``callback(step, loss)`` after every step (after that step's checkpoint, if any).
    """
    if not isinstance(config, TrainConfig):
        raise OptionError(f"train: config={config!r} is not a solverlab.TrainConfig")
    out = Path(out)
    if out.is_dir():
        raise OptionError(f"train: out={str(out)!r} is a folder; give a checkpoint file path, "
                          "e.g. moons.safetensors")
    from . import distributed

    def start() -> tuple[dict[str, Tensor] | None, dict[str, Any] | None]:
        if resume:
            if not out.exists():
                raise CheckpointError(f"train: cannot resume: {str(out)!r} does not exist; "
                                      "start without resume")
            tensors, stored, _ = read_checkpoint(out)
            return tensors, stored
        if out.exists() and not overwrite:
            raise CheckpointError(f"train: {str(out)!r} exists; resume it (--resume) or "
                                  "replace it (--force / overwrite=True)")
        return None, None

    # rank 0 reads, every rank gets it: no file system shared between machines is assumed
    tensors, stored = distributed.from_main(start)
    ctx = distributed.context()
    parts = config.micro_batches
    mine = range(parts)[ctx.shard(parts)]
    if ctx.active and not mine:
        warnings.warn(f"train: rank {ctx.rank} of {ctx.world_size} holds no part of the batch "
                      f"(micro_batches={parts} < world size {ctx.world_size}); it only joins "
                      "the gradient sum", stacklevel=2)
    size = config.batch_size // parts
    dataset = config.build_dataset()
    objective = config.build_objective()
    seed = config.seed
    show = (os.isatty(2) if progress is None else bool(progress)) and ctx.is_main()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3 * seed)
        module = build_network(config.network)
        model = config.build_model(module)
        meta = config.meta(model)
        if ctx.active:  # every forward goes through DDP, which sums the gradients
            model = TorchModel(_data_parallel(module, ctx), model.schedule,
                               model.parameterization, time_input=model.time_input,
                               time_map=model.time_map)
        if stored is not None:
            _check_resume(out, stored, meta, config.steps)
        opt = torch.optim.Adam(module.parameters(), lr=config.lr)
        ema = {k: v.detach().clone() for k, v in module.state_dict().items()}
        g_data = torch.Generator().manual_seed(3 * seed + 1)
        g_obj = torch.Generator().manual_seed(3 * seed + 2)
        g_parts = [g_obj, *(torch.Generator().manual_seed(_part_seed(seed, j))
                            for j in range(1, parts))]
        losses: list[float] = []
        step = 0
        if stored is not None:
            where = f"checkpoint {str(out)!r}"
            from .checkpoint import load_weights

            load_weights(module, section(tensors, "model"), where=where)
            ema = {k: v.clone() for k, v in section(tensors, "ema").items()}
            opt.load_state_dict(_unflat_optimizer(tensors, stored["optimizer"]))
            rng = section(tensors, "rng")
            g_data.set_state(rng["data"])
            g_obj.set_state(rng["objective"])
            for j in range(1, parts):
                g_parts[j].set_state(rng[f"objective.{j}"])
            torch.set_rng_state(rng["global"])
            losses = tensors["train.loss"].tolist() if "train.loss" in tensors else []
            step = int(stored["step"])
        spec = {**meta, "train": {**meta["train"], "steps": config.steps}}

        def save(at: int) -> None:
            # every rank advanced the generators of its own parts: rank 0 collects them
            states = distributed.all_gather_objects({j: g_parts[j].get_state() for j in mine})
            if not ctx.is_main():
                return
            held = {j: st for d in states for j, st in d.items()}
            opt_tensors, opt_info = _flat_optimizer(opt)
            tensors = {**{f"model.{k}": v for k, v in module.state_dict().items()},
                       **{f"ema.{k}": v for k, v in ema.items()}, **opt_tensors,
                       "rng.data": g_data.get_state(), "rng.objective": held[0],
                       **{f"rng.objective.{j}": held[j] for j in range(1, parts)},
                       "rng.global": torch.get_rng_state(),
                       "train.loss": torch.tensor(losses, dtype=torch.float64)}
            tensors.update({f"schedule.{k}": v for k, v in config.schedule_options.items()
                            if isinstance(v, Tensor)})
            save_checkpoint(out, tensors, {**spec, "optimizer": opt_info, "step": at})

        module.train()
        bar = _progress_bar(config.steps, step, show)
        decay = config.ema
        params = dict(module.named_parameters())
        buffers = dict(module.named_buffers())
        try:
            while step < config.steps:
                step += 1
                # the whole batch on every rank (one generator: DistributedSampler's shared
                # permutation), each rank's parts of it taken
                x0 = dataset.sample(config.batch_size, g_data)
                opt.zero_grad(set_to_none=True)
                value = _accumulate(model, objective, x0, g_parts, mine, size, spec)
                if ctx.active:
                    value = float(distributed.all_reduce_sum(torch.tensor([value])))
                if not math.isfinite(value):
                    raise TrainingDivergedError(
                        f"train: the loss is {value} at step {step}; the last checkpoint in "
                        f"{str(out)!r} is kept; lower the learning rate (lr={config.lr:g}) or "
                        f"clip gradients (clip={config.clip})")
                if config.clip is not None:
                    torch.nn.utils.clip_grad_norm_(module.parameters(), config.clip)
                opt.step()
                with torch.no_grad():
                    for k, e in ema.items():
                        w = params.get(k)
                        if w is None:  # a buffer: copied
                            e.copy_(buffers[k])
                        else:
                            e.mul_(decay).add_(w.detach(), alpha=1 - decay)
                losses.append(value)
                bar.update(1)
                if step % 10 == 0 or step == config.steps:
                    recent = losses[-100:]
                    bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
                if step % config.save_every == 0 or step == config.steps:
                    save(step)
                if callback is not None:
                    callback(step, value)
        finally:
            bar.close()
    return distributed.from_main(lambda: load_checkpoint(out))  # rank 0 wrote it


def _part_seed(seed: int, part: int) -> int:
    """The seed of the objective generator of batch part ``part >= 1`` (part 0 uses
    ``3 seed + 2``): 63 bits of a hash, apart from every ``3 seed' + k``."""
    import hashlib

    digest = hashlib.sha256(f"solverlab-train-part:{seed}:{part}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _checked(loss: Any, spec: Mapping[str, Any]) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise OptionError(f"objective {spec['objective']['name']!r} returned "
                          f"{loss!r} from loss(); it must return a scalar tensor")
    return loss


def _accumulate(model: TorchModel, objective: Objective, x0: Tensor,
                generators: list[torch.Generator], mine: range, size: int,
                spec: Mapping[str, Any]) -> float:
    """Backpropagate this rank's parts of the batch loss (each part's loss over the number of
    parts, so the ranks' gradients sum to the whole batch's) and return their sum.

    Under DDP (``model.module`` a :class:`~torch.nn.parallel.DistributedDataParallel`) all
    parts but the last accumulate locally (``no_sync``); the last backward sums over the ranks.
    A rank without parts runs one with weight zero, so that it joins that sum."""
    from contextlib import nullcontext

    parts = len(generators)
    net = model.module
    ddp = isinstance(net, torch.nn.parallel.DistributedDataParallel)
    work = [(j, generators[j], 1.0 / parts) for j in mine]
    if not work:  # an idle rank: a throwaway generator, nothing added
        work = [(0, torch.Generator().manual_seed(0), 0.0)]
    total = 0.0
    for k, (j, generator, weight) in enumerate(work):
        sync = not ddp or k == len(work) - 1
        with nullcontext() if sync else net.no_sync():
            loss = _checked(objective.loss(model, x0[j * size:(j + 1) * size],
                                           generator=generator), spec)
            (loss * weight).backward()
        total += weight * float(loss.detach())
    return total


def _data_parallel(module: torch.nn.Module, ctx: Any) -> torch.nn.Module:
    """``module`` in :class:`~torch.nn.parallel.DistributedDataParallel` with a communication
    hook that sums the ranks' gradients in float64 (DDP's default averages them: here each
    rank's loss is already its share of the batch mean). The trainer runs on the CPU: where
    the job's process group is not gloo (nccl, with CUDA) the gradients go over a gloo group
    of the same ranks."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    group = None if ctx.backend == "gloo" else dist.new_group(backend="gloo")
    ddp = DistributedDataParallel(module, process_group=group)
    ddp.register_comm_hook(group, _sum_in_float64)
    return ddp


def _sum_in_float64(state, bucket):  # DDP checks the annotations: none, or its own classes
    """A DDP communication hook: the bucket's gradients summed over the ranks of the process
    group ``state`` (``None``: the job's) in float64, the same order of additions on every
    rank, cast back to the bucket's dtype."""
    import torch.distributed as dist

    grads = bucket.buffer()
    wide = grads.to(torch.float64)
    future = dist.all_reduce(wide, group=state, async_op=True).get_future()

    def narrow(f):
        return grads.copy_(f.value()[0])

    return future.then(narrow)


# -- command line ------------------------------------------------------------------------------
def _resume_defaults(out: Path) -> dict[str, Any]:
    _, meta, _ = read_checkpoint(out)
    return meta


@click.command("train")
@click.option("--data", "data", default=None, metavar="NAME",
              help=f"Data set: {', '.join(DATASETS)}.")
@click.option("--data-option", "data_option", multiple=True, metavar="KEY=VALUE",
              help="A data set option, e.g. noise=0.1; repeatable.")
@click.option("--objective", default=None, metavar="NAME",
              help="Registered training objective (`solverlab list`), e.g. simple, etsdm, sa.")
@click.option("--objective-option", "objective_option", multiple=True, metavar="KEY=VALUE",
              help="An objective option; repeatable.")
@click.option("--network-option", "network_option", multiple=True, metavar="KEY=VALUE",
              help="A network option over the data set's default (MLP for 2-D sets, UNet for "
                   "digits), e.g. hidden=256 or kind=mlp; repeatable.")
@click.option("--schedule", default=None, metavar="NAME",
              help="Noise schedule (default vp-discrete: DDPM's linear betas, N=1000).")
@click.option("--schedule-option", "schedule_option", multiple=True, metavar="KEY=VALUE",
              help="A schedule option; repeatable.")
@click.option("--steps", type=int, default=None, metavar="N",
              help="Total optimizer steps (default 2000; with --resume: the checkpoint's, or "
                   "more to extend the run).")
@click.option("--batch-size", "batch_size", type=int, default=None, metavar="B",
              help="Batch size (default 256).")
@click.option("--lr", type=float, default=None, metavar="LR",
              help="Adam learning rate (default 1e-3 for 2-D sets, 5e-4 for digits).")
@click.option("--ema", type=float, default=None, metavar="DECAY",
              help="Decay of the weight average used for sampling (default 0.999).")
@click.option("--clip", type=float, default=None, metavar="NORM",
              help="Clip the gradient's global norm to NORM (default 1; 0: no clipping).")
@click.option("--seed", type=int, default=None, metavar="S", help="Seed (default 0).")
@click.option("--save-every", "save_every", type=int, default=None, metavar="K",
              help="Write the checkpoint every K steps (default 500) and at the end.")
@click.option("--micro-batches", "micro_batches", type=int, default=None, metavar="K",
              help="Split each batch into K equal parts with their own objective noise "
                   "(default: the number of torchrun processes, 1 alone; with --resume the "
                   "checkpoint's). The parts are dealt out to the processes, so the run's "
                   "numbers depend on K, not on the number of processes.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              metavar="FILE", help="The checkpoint file (.safetensors), rewritten atomically.")
@click.option("--resume", is_flag=True,
              help="Continue the run whose checkpoint is --out (options not given are the "
                   "checkpoint's; given ones must match it, --steps may grow).")
@click.option("--force", is_flag=True,
              help="Replace an existing --out (without --resume) and --export.")
@click.option("--export", "export", default=None, type=click.Path(dir_okay=False, path_type=Path),
              metavar="FILE", help="Also write a sampling-only copy (no optimizer state) here.")
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="Torch intra-op threads (0: torch's default).")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar with the loss (default: when stderr is a terminal).")
def train_command(data, data_option, objective, objective_option, network_option, schedule,
                  schedule_option, steps, batch_size, lr, ema, clip, seed, save_every,
                  micro_batches, out, resume, force, export, threads, progress) -> None:
    """Train a small network on a shipped data set with a registered objective and write a
    checkpoint that `solverlab compare --model FILE` and `solverlab.load_checkpoint` use.

    Example: solverlab train --data moons --objective simple --steps 2000 --out moons.safetensors
    """
    from .checkpoint import export_checkpoint
    from .compare import torch_threads
    from .options import parse_options

    data_options = parse_options("--data-option", data_option)
    objective_options = parse_options("--objective-option", objective_option)
    network_options = parse_options("--network-option", network_option)
    schedule_options = parse_options("--schedule-option", schedule_option)
    from .distributed import from_main

    if export is not None and from_main(export.exists) and not force:
        raise click.BadParameter(f"{str(export)!r} exists; add --force to replace it",
                                 param_hint="'--export'")
    if resume and force:
        raise click.BadParameter("--resume continues --out, --force replaces it: give one",
                                 param_hint="'--force'")
    given: dict[str, Any] = {}
    if resume:
        if not from_main(out.exists):  # rank 0's file system (module docstring)
            raise click.BadParameter(f"{str(out)!r} does not exist: nothing to resume; drop "
                                     "--resume to start a run", param_hint="'--out'")
        meta = from_main(lambda: _resume_defaults(out))
        stored_train = meta["train"]
        data = data or meta["dataset"]["name"]
        data_options = {**(meta["dataset"]["options"] if data == meta["dataset"]["name"]
                           else {}), **data_options}
        objective = objective or meta["objective"]["name"]
        objective_options = {**(meta["objective"]["options"]
                                if objective == meta["objective"]["name"] else {}),
                             **objective_options}
        network_options = {**meta["network"], **network_options}
        schedule = schedule or meta["schedule"]["name"]
        if schedule == meta["schedule"]["name"] and "<tensor>" not in \
                meta["schedule"]["options"].values():
            schedule_options = {**meta["schedule"]["options"], **schedule_options}
        for key, value in (("steps", steps), ("batch_size", batch_size), ("lr", lr),
                           ("ema", ema), ("clip", clip), ("seed", seed),
                           ("save_every", save_every)):
            given[key] = stored_train[key] if value is None else value
        if clip == 0:
            given["clip"] = None
        given["micro_batches"] = (stored_train.get("micro_batches", 1) if micro_batches is None
                                  else micro_batches)
    else:
        if data is None:
            raise click.BadParameter(f"give the data set, one of {', '.join(DATASETS)}",
                                     param_hint="'--data'")
        if objective is None:
            from .registry import get_registry

            names = get_registry().names("objective")
            raise click.BadParameter(f"give the training objective, one of "
                                     f"{', '.join(names) or '(none registered)'}",
                                     param_hint="'--objective'")
        for key, value in (("steps", steps), ("batch_size", batch_size), ("lr", lr),
                           ("ema", ema), ("seed", seed), ("save_every", save_every)):
            if value is not None:
                given[key] = value
        if clip is not None:
            given["clip"] = None if clip == 0 else clip
        from .distributed import context

        given["micro_batches"] = context().world_size if micro_batches is None else micro_batches
        if from_main(out.exists) and not force:
            raise click.BadParameter(f"{str(out)!r} exists; add --resume to continue it or "
                                     "--force to replace it", param_hint="'--out'")
    from .registry import get_registry

    for flag, check in (("--data", lambda: get_dataset(data)),
                        ("--schedule", lambda: None if schedule is None
                         else get_registry().entry("schedule", schedule)),
                        ("--objective", lambda: get_registry().entry("objective", objective))):
        try:
            check()
        except UnknownNameError as e:
            raise click.BadParameter(str(e), param_hint=f"'{flag}'") from None
    config = TrainConfig(dataset=data, dataset_options=data_options, objective=objective,
                         objective_options=objective_options, network=network_options,
                         schedule=schedule or "vp-discrete", schedule_options=schedule_options,
                         **given)
    with torch_threads(threads or None):
        ckpt = train(config, out, resume=resume, overwrite=force, progress=progress)
    curve = ckpt.losses
    recent = "" if curve is None or not curve.numel() else \
        f", loss {float(curve[-100:].mean()):.4f} (mean of the last {min(100, curve.numel())})"
    from .distributed import context

    ctx = context()
    if not ctx.is_main():
        return
    where = (f" on {ctx.world_size} processes (DistributedDataParallel, {ctx.backend}, "
             f"{config.micro_batches} parts per batch)" if ctx.active else "")
    click.echo(f"trained {config.network['kind']} on {config.dataset!r} with "
               f"{ckpt.objective['name']!r}{where}: step {ckpt.step}/{config.steps}{recent}; "
               f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    if export is not None:
        export_checkpoint(out, export)
        click.echo(f"exported a sampling-only copy to {export} "
                   f"({export.stat().st_size / 1e6:.2f} MB)")
