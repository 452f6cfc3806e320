"""``solverlab ems``: compute the EMS of a registered model into a safetensors file."""

from __future__ import annotations

import time
from pathlib import Path

import click
import torch

import solverlab
from solverlab import EMSFileError, OptionError, distributed
from solverlab.options import parse_options

__all__ = ["ems_command", "load_data"]


def load_data(path: Path) -> torch.Tensor:
    """Training samples ``(n, *shape)`` from a ``.safetensors`` file (tensor ``data``, or its
    only tensor), a ``.pt`` file holding a tensor, or a ``.npy`` file."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            if "data" in tensors:
                return tensors["data"]
            if len(tensors) == 1:
                return next(iter(tensors.values()))
            raise EMSFileError(f"--data {str(path)!r} holds tensors {sorted(tensors)}; name the "
                               "samples 'data'")
        if suffix == ".pt":
            data = torch.load(path, map_location="cpu", weights_only=True)
        elif suffix == ".npy":
            import numpy as np

            data = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            raise EMSFileError(f"--data {str(path)!r}: unknown format {suffix!r}; use "
                               ".safetensors, .pt or .npy")
    except EMSFileError:
        raise
    except Exception as e:  # unreadable file of a known format
        raise EMSFileError(f"--data {str(path)!r} cannot be read: {e}") from None
    if not isinstance(data, torch.Tensor):
        raise EMSFileError(f"--data {str(path)!r} holds a {type(data).__name__}, not a tensor")
    return data


@click.command("ems")
@click.argument("model")
@click.option("--model-option", "model_options", multiple=True, metavar="KEY=VALUE",
              help="Option of the model (repeatable; values read as JSON where they parse).")
@click.option("--data", "data_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Training samples (n, *shape): .safetensors, .pt or .npy. "
              "Default for analytic models: draws from their data distribution.")
@click.option("--grid-size", type=click.IntRange(min=1), default=400, show_default=True,
              help="Grid intervals, uniform in lambda.")
@click.option("--samples", type=click.IntRange(min=2), default=1024, show_default=True,
              help="Data points per grid point.")
@click.option("--t-end", type=float, default=None, help="End time (default: schedule t_min).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Rows per model call (bounds memory).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The EMS file to write (safetensors). An interrupted run resumes from "
                   "OUT.partial.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def ems_command(model, model_options, data_path, grid_size, samples, t_end, batch_size, seed,
                out, progress) -> None:
    """Compute DPM-Solver-v3's empirical model statistics of MODEL (Zheng et al. 2023) for the
    `dpmv3` solver (`ems=OUT`)."""
    m = solverlab.get_model(model, **parse_options("--model-option", model_options))
    if data_path is None:
        source = getattr(m, "data", None)
        if source is None or not hasattr(source, "sample"):
            raise OptionError(f"model {model!r} has no data distribution to draw from; give "
                              "--data FILE with training samples")
        data = source.sample(max(samples, 1024), generator=torch.Generator().manual_seed(seed))
    else:
        data = load_data(data_path)
    start = time.perf_counter()
    ems = solverlab.compute_ems(m, data, grid_size=grid_size, samples=samples, t_end=t_end,
                                batch_size=batch_size, seed=seed, progress=progress,
                                checkpoint=out.with_name(out.name + ".partial"))
    if not distributed.is_main():  # under torchrun: rank 0 writes and reports
        return
    ems.save(out)
    click.echo(f"EMS of {model!r}: {grid_size} cells in lambda [{float(ems.lam[0]):.4g}, "
               f"{float(ems.lam[-1]):.4g}], {ems.samples} samples, shape {ems.shape}, in "
               f"{time.perf_counter() - start:.1f} s; wrote {out}")
