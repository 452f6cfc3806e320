"""The ``solverlab`` command: ``list``, ``compare``, ``order``, plus the commands plugins add
through the ``solverlab_register_commands(cli)`` hook.

A :class:`~solverlab.SolverlabError` raised anywhere under a command becomes a one-line
``Error: ...`` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .errors import DuplicateNameError, SolverlabError
from .registry import KINDS, get_registry

__all__ = ["cli", "main"]

#: JSON keys of ``solverlab list --json``, in order (``broken`` last).
LIST_KEYS = {kind: f"{kind}s" for kind in KINDS}


class SolverlabCliError(click.ClickException):
    """A solverlab error shown as ``Error: <message>`` with exit code 2 (click's usage code)."""

    exit_code = 2


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


class SolverlabGroup(click.Group):
    """A click group that adds the plugins' commands on first use and turns solverlab errors
    into clean messages. A plugin may not replace a built-in command."""

    _plugins_loaded = False
    _loading_plugins = False

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        self._loading_plugins = True
        try:
            get_registry().add_commands(self)
        except SolverlabError:
            pass  # shown by `solverlab list` (broken plugins); built-in commands still work
        finally:
            self._loading_plugins = False

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        name = name or cmd.name
        if self._loading_plugins and name in self.commands:
            raise DuplicateNameError(
                f"command {name!r} is already defined; a plugin cannot replace it"
            )
        super().add_command(cmd, name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugins()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._load_plugins()
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SolverlabError as e:
            raise SolverlabCliError(_one_line(e)) from None


def _split(kind: str, convert: Callable[[str], Any] = str) -> Callable[..., Any]:
    """A click callback parsing ``a,b,c`` into a tuple (``None`` stays ``None``)."""

    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
        if value is None:
            return None
        items = [v.strip() for v in value.split(",")]
        if not items or any(not v for v in items):
            raise click.BadParameter(f"{value!r} is not a comma-separated list of {kind}")
        try:
            return tuple(convert(v) for v in items)
        except ValueError:
            raise click.BadParameter(
                f"{value!r} is not a comma-separated list of {kind}, e.g. 5,10,20"
            ) from None

    return parse


@click.group(cls=SolverlabGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="solverlab", prog_name="solverlab")
def cli() -> None:
    """solverlab: a laboratory for diffusion-model samplers.

    Every solver, schedule, grid, parameterization, model and objective comes from a plugin;
    `solverlab list` shows what is installed.
    """


# -- list ------------------------------------------------------------------------------------
def _entry_json(e: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"name": e.name, "plugin": e.plugin, "distribution": e.distribution}
    if e.kind == "solver":
        from .registry import declared_order
        from .solver import AdaptiveSolver

        d["order"] = declared_order(e.cls)
        d["adaptive"] = issubclass(e.cls, AdaptiveSolver)
    d["class"] = f"{e.cls.__module__}.{e.cls.__qualname__}"
    return d


def list_data() -> dict[str, list[dict[str, Any]]]:
    """What ``solverlab list --json`` prints: entries by kind, then the broken plugins."""
    reg = get_registry()
    data: dict[str, list[dict[str, Any]]] = {
        key: [_entry_json(e) for e in reg.entries(kind)] for kind, key in LIST_KEYS.items()
    }
    data["broken"] = [
        {"plugin": b.plugin, "distribution": b.distribution, "error": b.error}
        for b in reg.broken
    ]
    return data


@cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def list_command(as_json: bool) -> None:
    """Every registered part with the plugin and distribution that brought it, and the plugins
    that failed to load with the reason."""
    data = list_data()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for kind, key in LIST_KEYS.items():
        entries = data[key]
        click.secho(f"{key} ({len(entries)})", bold=True)
        if not entries:
            click.echo("  (none)")
        width = max((len(e["name"]) for e in entries), default=0)
        for e in entries:
            extra = ""
            if kind == "solver":
                extra = f"order {e['order']}" + (", adaptive" if e["adaptive"] else "") + "  "
            dist = f" ({e['distribution']})" if e["distribution"] else ""
            click.echo(f"  {e['name']:<{width}}  {extra}plugin {e['plugin']}{dist}")
    blocked = get_registry().blocked
    if blocked:
        click.secho(f"blocked ({len(blocked)})", bold=True)
        for b in blocked:
            click.echo(f"  {b}  (SOLVERLAB_BLOCK_PLUGINS)")
    click.secho(f"broken ({len(data['broken'])})", bold=True, fg="red" if data["broken"] else None)
    if not data["broken"]:
        click.echo("  (none)")
    for b in data["broken"]:
        dist = f" ({b['distribution']})" if b["distribution"] else ""
        click.echo(f"  {b['plugin']}{dist}: {b['error']}")


# -- compare ---------------------------------------------------------------------------------
@cli.command("compare")
@click.option("--solvers", callback=_split("solver names"), default=None, metavar="A,B,...",
              help="Solvers to compare (default: every registered fixed-grid solver).")
@click.option("--grids", callback=_split("grid names"), default="logsnr,time-uniform",
              show_default=True, metavar="A,B,...", help="Time grids.")
@click.option("--nfe", callback=_split("integers", int), default="5,10,20", show_default=True,
              metavar="N,M,...", help="NFE budgets (network evaluations per solve).")
@click.option("--model", default="gaussian-mixture", show_default=True,
              help="Registered model, built with its default options.")
@click.option("--samples", type=click.IntRange(min=1), default=None, metavar="N",
              help="Number of start states (default: 256).")
@click.option("--seed", type=click.IntRange(min=0, max=2**64 - 1), default=0, show_default=True,
              help="Seed of the start states.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("solverlab-compare"), show_default=True,
              help="Folder for compare.csv, compare.json and compare.png, replaced whole "
                   "(it may hold only these).")
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="Torch intra-op threads (0: torch's default); 1 is fastest for the small "
                   "analytic models.")
@click.option("--progress/--no-progress", default=False, help="Show a progress bar.")
def compare_command(solvers, grids, nfe, model, samples, seed, out_dir, threads,
                    progress) -> None:
    """Compare solvers x time grids x NFE budgets against a float64 reference solution.

    With no options: every registered fixed-grid solver on grids logsnr and time-uniform at
    5, 10 and 20 NFE, on the embedded analytic Gaussian mixture. The error is the RMS over
    samples of the L2 error, relative to the RMS norm of the reference.
    """
    from . import _io, compare

    _io.check_output_folder(out_dir, compare.OUTPUT_NAMES)  # before the work, not after
    samples = compare.DEFAULT_SAMPLES if samples is None else samples
    start = time.perf_counter()
    rows = compare.run_compare(solvers=solvers, grids=grids, nfe=nfe, model=model,
                               samples=samples, seed=seed, progress=progress,
                               threads=threads or None)
    elapsed = time.perf_counter() - start
    settings = {
        "model": model, "solvers": sorted({r.solver for r in rows}), "grids": list(grids),
        "nfe": list(nfe), "samples": samples, "seed": seed,
    }
    paths = compare.write_outputs(rows, out_dir, settings)
    click.echo(compare.format_table(rows))
    click.echo(f"\nerror: {compare.ERROR_DEFINITION}")
    click.echo(f"{len(rows)} runs on {model!r} ({samples} samples, seed {seed}) in "
               f"{elapsed:.1f} s; wrote {', '.join(p.name for p in paths.values())} to "
               f"{out_dir}")


# -- order -----------------------------------------------------------------------------------
#: What an `order` output folder may hold: one json + png set per solver.
ORDER_OUTPUTS = ("order-*.json", "order-*.png")


@cli.command("order")
@click.argument("solver")
@click.option("--grid", default="logsnr", show_default=True, help="Time grid of the solves.")
@click.option("--steps", callback=_split("integers", int), default=None, metavar="N,M,...",
              help="Step counts (default: doubled from 2 until the slope settles).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("solverlab-order"), show_default=True,
              help="Folder for order-<solver>.png and order-<solver>.json, replaced whole "
                   "(it may hold only such files; other solvers' are kept).")
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="Torch intra-op threads (0: torch's default).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def order_command(solver, grid, steps, out_dir, threads, as_json) -> None:
    """Measure SOLVER's empirical convergence order: the slope of log(error) against
    log(steps) over the asymptotic range, on the conformance kit's default problem (a
    Gaussian mixture with a float64 reference), next to the order the solver declares."""
    from . import _io
    from .compare import torch_threads
    from .errors import OptionError
    from .registry import get_solver
    from .solver import AdaptiveSolver
    from .testing import default_problem, measure_convergence_order

    get_registry().entry("grid", grid)
    _io.check_output_folder(out_dir, ORDER_OUTPUTS)
    s = get_solver(solver)
    if isinstance(s, AdaptiveSolver):
        raise OptionError(f"solver {solver!r} is adaptive (it chooses its own steps), so it has "
                          "no convergence order in the number of steps")
    if steps is not None and (len(steps) < 3 or any(n < 1 for n in steps)):
        raise click.BadParameter("give at least three step counts >= 1, e.g. 16,32,64",
                                 param_hint="'--steps'")
    with torch_threads(threads or None):
        study = measure_convergence_order(s, default_problem(), steps=steps, grid=grid)
    declared = s.convergence_order
    result = {
        "solver": solver, "declared_order": declared, "fitted_order": study.order,
        "grid": study.grid, "problem": study.problem, "steps": list(study.steps),
        "nfe": list(study.nfe),
        "errors": [e if math.isfinite(e) else None for e in study.errors],
        "fit_window": list(study.window), "floor": study.floor,
        "error": "max over samples of the L2 error against the float64 reference",
    }
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in solver)
    json_path, png_path = out_dir / f"order-{safe}.json", out_dir / f"order-{safe}.png"
    with _io.atomic_folder(out_dir, owned=ORDER_OUTPUTS) as tmp:  # other solvers' sets are kept
        _io.write_json(tmp / json_path.name, result)
        _io.write_figure(tmp / png_path.name, _order_plot(study, declared), dpi=120)
    if as_json:
        click.echo(json.dumps({**result, "plot": str(png_path), "json": str(json_path)},
                              indent=2))
    else:
        click.echo(study.table())
        fitted = "none" if study.order is None else f"{study.order:.2f}"
        click.echo(f"\n{solver}: fitted order {fitted} (declared {declared}, grid {study.grid}); "
                   f"wrote {png_path.name}, {json_path.name} to {out_dir}")
    if study.order is None:
        raise click.ClickException(
            f"could not fit an order for {solver!r}: fewer than 3 usable points (finite, above "
            "the round-off floor) in the asymptotic range; give more --steps, e.g. 16,32,64,128"
        )


def _order_plot(study: Any, declared: int) -> Any:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    pts = [(n, e) for n, e in zip(study.steps, study.errors) if math.isfinite(e) and e > 0]
    if pts:
        ax.loglog(*zip(*pts), "o-", label=f"{study.solver} ({study.grid})")
    lo, hi = study.window
    if study.order is not None and hi - lo >= 2:
        # least-squares line over the fitted window: log e = c - p log n
        n = np.asarray(study.steps[lo:hi], dtype=float)
        e = np.asarray(study.errors[lo:hi], dtype=float)
        slope, c = np.polyfit(np.log(n), np.log(e), 1)
        span = np.asarray([min(study.steps), max(study.steps)], dtype=float)
        ax.loglog(span, np.exp(c + slope * np.log(span)), "--", color="gray",
                  label=f"fit on steps {study.steps[lo]}..{study.steps[hi - 1]}: "
                        f"order {study.order:.2f}")
    if pts and min(e for _, e in pts) < 100 * study.floor:
        ax.axhline(study.floor, color="red", linestyle=":", linewidth=1, label="round-off floor")
    ax.set_xlabel("steps")
    ax.set_ylabel("max per-sample L2 error vs reference")
    fitted = "none" if study.order is None else f"{study.order:.2f}"
    ax.set_title(f"{study.solver}: fitted order {fitted}, declared {declared}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> Any:
    """Entry point of the ``solverlab`` console script and ``python -m solverlab``."""
    return cli.main(args=argv, prog_name="solverlab")
