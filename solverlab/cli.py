"""The ``solverlab`` command: ``list``, ``compare``, ``grid-search``, ``order``, ``lipschitz``,
plus the commands plugins add through the ``solverlab_register_commands(cli)`` hook.

A :class:`~solverlab.SolverlabError` raised anywhere under a command becomes a one-line
``Error: ...`` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .errors import DuplicateNameError, SolverlabError
from .options import key_value, parse_options
from .registry import KINDS, get_registry

__all__ = ["cli", "main", "parse_options"]

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
        except click.UsageError as e:
            # a bad option of a command: one line (click adds usage lines), the same exit code
            if type(e).__name__ == "NoArgsIsHelpError":
                raise
            raise SolverlabCliError(_one_line(e.format_message())) from None


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
#: ``run_compare`` argument -> the flag that sets it (error messages name the flag).
COMPARE_FLAGS = {
    "solvers": "--solvers", "grids": "--grids", "nfe": "--nfe", "tolerances": "--tolerances",
    "model": "--model", "model_options": "--model-option", "schedule": "--schedule",
    "schedule_options": "--schedule-option", "solver_options": "--solver-option",
    "grid_options": "--grid-option", "samples": "--samples", "seed": "--seed",
    "threads": "--threads", "reference_tol": "--reference-tol",
}
#: The keys a ``--config`` file may hold: the long flags without ``--`` (option tables in
#: plural: ``[model-options]``, ``[solver-options.dpmpp-3m]``, ...).
CONFIG_KEYS = ("solvers", "grids", "nfe", "tolerances", "model", "model-options", "schedule",
               "schedule-options", "solver-options", "grid-options", "reference-tol",
               "samples", "seed", "out", "force", "threads", "progress")
#: Where ``compare`` writes when no ``--out`` is given: a new folder per run under this one.
COMPARE_ROOT = Path("solverlab-compare")


def _part_options(flag: str, items: tuple[str, ...], prefixed: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        part, key, value = key_value(flag, item, prefixed)
        out.setdefault(part, {})[key] = value
    return out


def _read_config(path: Path) -> dict[str, Any]:
    """The ``--config`` TOML file as a dict with the keys of :data:`CONFIG_KEYS`."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise click.BadParameter(
                f"{str(path)!r}: reading TOML needs Python >= 3.11 or the tomli package "
                "(pip install tomli)", param_hint="'--config'") from None
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise click.BadParameter(f"{str(path)!r}: cannot read it ({e.strerror})",
                                 param_hint="'--config'") from None
    except tomllib.TOMLDecodeError as e:
        raise click.BadParameter(f"{str(path)!r} is not valid TOML: {e}",
                                 param_hint="'--config'") from None
    data = {k.replace("_", "-"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(CONFIG_KEYS))
    if unknown:
        raise click.BadParameter(
            f"{str(path)!r} has unknown key {', '.join(repr(k) for k in unknown)}; the keys are "
            f"the long options of `solverlab compare`: {', '.join(CONFIG_KEYS)}",
            param_hint="'--config'")
    return data


def _config_value(path: Path, data: dict[str, Any], key: str, kind: str) -> Any:
    """``data[key]`` converted to what the flag ``--key`` gives, or ``None`` when absent."""
    if key not in data:
        return None
    v = data[key]

    def bad(allowed: str) -> click.BadParameter:
        return click.BadParameter(f"{str(path)!r}: {key} = {v!r} is not allowed; it must be "
                                  f"{allowed}", param_hint="'--config'")

    if kind == "names":
        if isinstance(v, str):
            v = [s.strip() for s in v.split(",")]
        if not isinstance(v, list) or not v or not all(isinstance(s, str) and s for s in v):
            raise bad('a list of names, e.g. ["heun", "dpmpp-2m"]')
        return tuple(v)
    if kind in ("ints", "floats"):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = [v]
        ok = isinstance(v, list) and v and all(
            isinstance(n, int if kind == "ints" else (int, float)) and not isinstance(n, bool)
            for n in v)
        if not ok:
            raise bad("a list of integers, e.g. [5, 10, 20]" if kind == "ints" else
                      "a list of numbers, e.g. [1e-2, 1e-3]")
        return tuple(int(n) if kind == "ints" else float(n) for n in v)
    if kind == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad("an integer")
        return v
    if kind == "float":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad("a number")
        return float(v)
    if kind == "bool":
        if not isinstance(v, bool):
            raise bad("true or false")
        return v
    if kind == "str":
        if not isinstance(v, str) or not v:
            raise bad("a string")
        return v
    if kind == "table":
        if not isinstance(v, dict):
            raise bad("a table of option = value")
        return dict(v)
    if kind == "tables":
        if not isinstance(v, dict) or not all(isinstance(t, dict) for t in v.values()):
            raise bad("a table of tables, one per name, e.g. [solver-options.dpmpp-3m]")
        return {name: dict(t) for name, t in v.items()}
    raise AssertionError(kind)


def _check_values(flag: str, values: tuple[float, ...] | None, *, integer: bool,
                  low: float, high: float | None, example: str) -> None:
    if values is None:
        return
    if integer:
        bad = [v for v in values if v < low]
        allowed = f"integers >= {low:g}" if flag in ("--nfe",) else f"an integer >= {low:g}"
    else:
        bad = [v for v in values if not (math.isfinite(v) and low < v <= (high or math.inf))]
        allowed = f"numbers in ({low:g}, {high:g}]"
    if bad or not values:
        shown = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
        raise click.BadParameter(f"{shown} is not allowed: give {allowed}, e.g. {flag} {example}",
                                 param_hint=f"'{flag}'")


def _shown(option: str, given: dict[str, Any]) -> str:
    """The value of a ``run_compare`` argument as the command line spells it."""
    v = given.get(option)
    if v is None:
        return "(default)"
    if option in ("model_options", "schedule_options"):
        return " ".join(f"{k}={json.dumps(x)}" for k, x in v.items())
    if option in ("solver_options", "grid_options"):
        return " ".join(f"{p}:{k}={json.dumps(x)}" for p, o in v.items() for k, x in o.items())
    if isinstance(v, (tuple, list)):
        return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
    return str(v)


def _default_out() -> Path:
    """A new folder under :data:`COMPARE_ROOT` named for the local time (``-2``, ``-3``, ...
    when that exists)."""
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S")
    out, n = COMPARE_ROOT / stamp, 1
    while out.exists():
        n += 1
        out = COMPARE_ROOT / f"{stamp}-{n}"
    return out


def _check_writable(flag: str, out: Path) -> None:
    """Fail now unless a result set can be written as ``out``: by a real probe (a folder made
    and removed) in its parent or, if that does not exist yet, its nearest existing ancestor,
    where the writer will create the parents."""
    target = Path(os.path.realpath(out))
    if target.exists() and not target.is_dir():
        raise click.BadParameter(f"{str(out)!r} is a file; give a folder",
                                 param_hint=f"'{flag}'")
    where = target.parent
    while not where.exists():
        where = where.parent
    if not where.is_dir():
        raise click.BadParameter(f"{str(out)!r} cannot be made: {str(where)!r} is a file",
                                 param_hint=f"'{flag}'")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".solverlab-probe-", dir=where))
    except OSError as e:
        raise click.BadParameter(
            f"{str(out)!r} is not writable: cannot create anything in {str(where)!r} "
            f"({e.strerror}); give a writable folder", param_hint=f"'{flag}'") from None


def _check_compare_out(out: Path, force: bool) -> None:
    from . import _io, compare

    _check_writable("--out", out)
    try:
        _io.check_output_folder(out, compare.OUTPUT_NAMES)
    except SolverlabError as e:
        raise click.BadParameter(_one_line(e), param_hint="'--out'") from None
    held = sorted(os.listdir(out)) if out.is_dir() else []
    if held and not force:
        raise click.BadParameter(
            f"{str(out)!r} holds the results of an earlier compare ({', '.join(held)}); give a "
            "new folder (or no --out: a new timestamped folder under "
            f"{str(COMPARE_ROOT)!r}), or add --force to replace them", param_hint="'--out'")


@cli.command("compare")
@click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path),
              default=None, metavar="FILE",
              help="TOML file with any of these options (keys: the long option names; option "
                   "tables [model-options], [schedule-options], [solver-options.NAME], "
                   "[grid-options.NAME]); options on the command line override it.")
@click.option("--solvers", callback=_split("solver names"), default=None, metavar="A,B,...",
              help="Solvers to compare (default: every registered solver; adaptive ones are "
                   "swept over --tolerances).")
@click.option("--grids", callback=_split("grid names"), default=None, metavar="A,B,...",
              help="Time grids (default: logsnr,time-uniform). linspace, leading and trailing "
                   "need --schedule vp-discrete; custom needs --grid-option custom:times=[...]; "
                   "searched:FILE is a grid saved by `solverlab grid-search` (one row, for "
                   "the solver and steps it was searched for).")
@click.option("--nfe", callback=_split("integers", int), default=None, metavar="N,M,...",
              help="NFE budgets of the fixed-grid solvers (default: 5,10,20).")
@click.option("--tolerances", callback=_split("numbers", float), default=None,
              metavar="T,U,...",
              help="rtol = atol of each adaptive solver's solves (default: 0.01,0.001).")
@click.option("--model", default=None, metavar="NAME",
              help="Registered model, or a trained checkpoint: a shipped name (`solverlab "
                   "checkpoint list`) or a .safetensors file (default: gaussian-mixture).")
@click.option("--model-option", "model_option", multiple=True, metavar="KEY=VALUE",
              help="A model option (VALUE is JSON or a bare string), e.g. dim=4; repeatable.")
@click.option("--schedule", default=None, metavar="NAME",
              help="Replace the model's noise schedule with this registered one.")
@click.option("--schedule-option", "schedule_option", multiple=True, metavar="KEY=VALUE",
              help="A schedule option, e.g. beta_max=10; repeatable.")
@click.option("--solver-option", "solver_option", multiple=True, metavar="SOLVER:KEY=VALUE",
              help="A solver option, e.g. dpmpp-3m:official_d2=true; repeatable.")
@click.option("--grid-option", "grid_option", multiple=True, metavar="GRID:KEY=VALUE",
              help="A grid option, e.g. karras:rho=5 or custom:times=[1,0.5,0.1,0.001]; "
                   "repeatable.")
@click.option("--reference-tol", "reference_tol", type=float, default=None, metavar="TOL",
              help="rtol = atol of the float64 adaptive reference solve, used where the model "
                   "has no exact flow (default: 1e-9).")
@click.option("--samples", type=int, default=None, metavar="N",
              help="Number of start states (default: 256).")
@click.option("--seed", type=int, default=None, metavar="S", help="Seed of the start states "
              "(default: 0).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, metavar="DIR",
              help="Folder for compare.csv, compare.json and compare.png (default: a new "
                   "timestamped folder under ./solverlab-compare/). An existing results folder "
                   "is refused unless --force.")
@click.option("--force", is_flag=True, default=None,
              help="Replace the results already in --out.")
@click.option("--threads", type=int, default=None, metavar="N",
              help="Torch intra-op threads (default 1, the fastest for the small analytic "
                   "models; 0: torch's default).")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar (default: when stderr is a terminal).")
@click.option("--plot-solvers", callback=_split("solver names"), default=None,
              metavar="A,B,...",
              help="The solvers compare.png and compare-heatmap.png draw (default: all that ran; "
                   "the CSV and JSON always hold every row).")
def compare_command(config, solvers, grids, nfe, tolerances, model, model_option, schedule,
                    schedule_option, solver_option, grid_option, reference_tol, samples, seed,
                    out_dir, force, threads, progress, plot_solvers) -> None:
    """Compare solvers x time grids x NFE budgets against a float64 reference solution;
    adaptive solvers run once per tolerance instead.

    With no options: every registered solver on the embedded analytic Gaussian mixture, on
    grids logsnr and time-uniform at 5, 10 and 20 NFE, adaptive ones at tolerances 1e-2 and
    1e-3. The error is the RMS over samples of the L2 error, relative to the RMS norm of the
    reference; the median per-sample error is shown beside it. A run that spends more NFE
    than its budget is "over budget", one with error above 1 "diverged-like".
    """
    from . import compare

    # 1. every option: the command line over the config file over the defaults
    cfg = _read_config(config) if config is not None else {}

    def pick(given: Any, key: str, kind: str, default: Any = None) -> Any:
        if given is not None and given != ():
            return given
        from_file = _config_value(config, cfg, key, kind) if cfg else None
        return default if from_file is None else from_file

    solvers = pick(solvers, "solvers", "names")
    if plot_solvers is not None:  # fail fast: only solvers of this run can be drawn
        from .registry import get_registry

        allowed = solvers if solvers is not None else get_registry().names("solver")
        missing = [n for n in plot_solvers if n not in allowed]
        if missing:
            raise click.BadParameter(
                f"{','.join(plot_solvers)}: {', '.join(map(repr, missing))} not in this run; "
                f"choose from --solvers ({', '.join(allowed)})", param_hint="'--plot-solvers'")
    grids = pick(grids, "grids", "names", compare.DEFAULT_GRIDS)
    nfe = pick(nfe, "nfe", "ints", compare.DEFAULT_NFE)
    tolerances = pick(tolerances, "tolerances", "floats")
    model = pick(model, "model", "str", compare.DEFAULT_MODEL)
    schedule = pick(schedule, "schedule", "str")
    reference_tol = pick(reference_tol, "reference-tol", "float", compare.DEFAULT_REFERENCE_TOL)
    samples = pick(samples, "samples", "int", compare.DEFAULT_SAMPLES)
    seed = pick(seed, "seed", "int", 0)
    threads = pick(threads, "threads", "int", 1)
    force = pick(force, "force", "bool", False)
    progress = pick(progress, "progress", "bool", sys.stderr.isatty())
    out_dir = pick(out_dir, "out", "str")
    model_options = {**(pick(None, "model-options", "table") or {}),
                     **parse_options("--model-option", model_option)}
    schedule_options = {**(pick(None, "schedule-options", "table") or {}),
                        **parse_options("--schedule-option", schedule_option)}
    solver_options = pick(None, "solver-options", "tables") or {}
    for name, opts in _part_options("--solver-option", solver_option, "SOLVER").items():
        solver_options[name] = {**solver_options.get(name, {}), **opts}
    grid_options = pick(None, "grid-options", "tables") or {}
    for name, opts in _part_options("--grid-option", grid_option, "GRID").items():
        grid_options[name] = {**grid_options.get(name, {}), **opts}

    _check_values("--nfe", nfe, integer=True, low=1, high=None, example="5,10,20")
    _check_values("--tolerances", tolerances, integer=False, low=0, high=1,
                  example="1e-2,1e-3,1e-4")
    _check_values("--samples", (samples,), integer=True, low=1, high=None, example="256")
    _check_values("--threads", (threads,), integer=True, low=0, high=None, example="1")
    if not 0 <= seed <= compare.SEED_MAX:
        raise click.BadParameter(f"{seed} is not allowed: give an integer in "
                                 f"0..{compare.SEED_MAX}, e.g. --seed 0", param_hint="'--seed'")
    if not (math.isfinite(reference_tol) and 1e-14 <= reference_tol <= 1e-3):
        raise click.BadParameter(f"{reference_tol:g} is not allowed: give a number in "
                                 "[1e-14, 1e-3], e.g. --reference-tol 1e-9",
                                 param_hint="'--reference-tol'")

    # 2. the output folder, before any work (under torchrun: rank 0's choice, rank 0 writes)
    from . import distributed

    ctx = distributed.context()
    out_dir = _default_out() if out_dir is None else Path(out_dir)
    out_dir = distributed.broadcast_object(out_dir)
    _check_compare_out(out_dir, force)

    # 3. the run (every name and option is checked before the first solve)
    given = {"solvers": solvers, "grids": grids, "nfe": nfe, "tolerances": tolerances,
             "model": model, "model_options": model_options, "schedule": schedule,
             "schedule_options": schedule_options, "solver_options": solver_options,
             "grid_options": grid_options, "samples": samples, "seed": seed,
             "threads": threads, "reference_tol": reference_tol}
    start = time.perf_counter()
    try:
        result = compare.run_compare(
            solvers=solvers, grids=grids, nfe=nfe, model=model, samples=samples, seed=seed,
            progress=progress, threads=threads or None, model_options=model_options,
            schedule=schedule, schedule_options=schedule_options,
            solver_options=solver_options, grid_options=grid_options, tolerances=tolerances,
            reference_tol=reference_tol)
    except SolverlabError as e:
        option = getattr(e, "option", None)
        if option not in COMPARE_FLAGS:
            raise
        msg = _one_line(e).removeprefix("compare: ")
        if option == "grids" and "needs option" in msg:
            msg += "; give it with --grid-option GRID:KEY=VALUE"
        raise click.BadParameter(f"{_shown(option, given)}: {msg}",
                                 param_hint=f"'{COMPARE_FLAGS[option]}'") from None
    elapsed = time.perf_counter() - start
    settings = {
        "model": model, "model_options": model_options, "schedule": result.schedule,
        "schedule_options": schedule_options,
        "solvers": list(dict.fromkeys(r.solver for r in result)), "grids": list(grids),
        "nfe": list(nfe), "tolerances": sorted({r.tolerance for r in result
                                                if r.tolerance is not None}, reverse=True),
        "solver_options": solver_options, "grid_options": grid_options, "samples": samples,
        "seed": seed, "reference_tol": reference_tol,
        "config": None if config is None else str(config),
        "world_size": ctx.world_size,
    }
    if not ctx.is_main():
        return
    try:
        paths = compare.write_outputs(result, out_dir, settings, plot_solvers=plot_solvers)
    except OSError as e:
        raise SolverlabCliError(f"--out {str(out_dir)!r}: could not write the results: "
                                f"{e}") from None
    click.echo(compare.format_table(result))
    click.echo(f"\nerror: {compare.ERROR_DEFINITION}")
    click.echo(f"median error: {compare.MEDIAN_ERROR_DEFINITION}")
    click.echo(f"reference: {result.reference.describe()}")
    est = result.reference.estimated_error
    if est is not None:
        close = sum(1 for r in result if r.error is not None and r.error < 10 * est)
        if close:
            click.echo(f"note: {close} rows have errors below 10x the reference's estimated "
                       "error; they measure the reference as much as the solver (lower "
                       "--reference-tol)")
    click.echo(f"wrote {', '.join(p.name for p in paths.values())} to {out_dir}")
    click.echo(f"\n{len(result)} runs on {model!r} ({samples} samples, seed {seed}) in "
               f"{elapsed:.1f} s: {compare.format_summary(result)}")



# -- grid-search -----------------------------------------------------------------------------
@cli.command("grid-search")
@click.argument("solver")
@click.option("--model", default="gaussian-mixture", show_default=True, metavar="NAME",
              help="Registered model or trained checkpoint (as for compare).")
@click.option("--model-option", "model_option", multiple=True, metavar="KEY=VALUE",
              help="A model option (VALUE is JSON or a bare string), e.g. dim=16 or "
                   "schedule=vp-discrete; repeatable.")
@click.option("--solver-option", "solver_option", multiple=True, metavar="KEY=VALUE",
              help="An option of SOLVER, e.g. variant=bh1; repeatable.")
@click.option("--steps", type=int, default=5, show_default=True, help="Steps of the grid.")
@click.option("--samples", type=int, default=None, metavar="N",
              help="Training start states (default: 256).")
@click.option("--held-out", "held_out", type=int, default=None, metavar="N",
              help="Held-out start states the best iterate is chosen on (default: 256).")
@click.option("--seed", type=int, default=None, metavar="S",
              help="Seed of the start states (default: 1; compare's evaluation seed is refused).")
@click.option("--evaluation-seed", "evaluation_seed", type=int, default=0, show_default=True,
              metavar="S", help="The compare seed the grid will be scored with: its start "
                                "states may not be trained on.")
@click.option("--method", default=None, metavar="NAME",
              help="gradient (Adam through the differentiable solve) or derivative-free "
                   "(Nelder-Mead) (default: gradient).")
@click.option("--start", default="logsnr", show_default=True, metavar="GRID",
              help="The grid the search starts from (and never does worse than on the "
                   "held-out start states).")
@click.option("--iterations", type=int, default=None, metavar="N",
              help="Adam steps (gradient, default 100) or training solves (derivative-free, "
                   "default 300).")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, metavar="FILE",
              help="Where to write the grid (default: searched-SOLVER-STEPS.json). An existing "
                   "file is refused unless --force.")
@click.option("--force", is_flag=True, help="Replace an existing --out file.")
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="Torch intra-op threads (0: torch's default).")
@click.option("--json", "as_json", is_flag=True, help="Print the saved record as JSON.")
def grid_search_command(solver, model, model_option, solver_option, steps, samples, held_out,
                        seed, evaluation_seed, method, start, iterations, out_file, force,
                        threads, as_json) -> None:
    """Search the time grid of STEPS steps on which SOLVER comes closest to the reference
    solution of MODEL, and save it (with the solver, model fingerprint, schedule, start grid,
    method, seeds and errors) for `solverlab compare --grids searched:FILE`.

    The grid is fitted to training start states and chosen among the iterates on held-out
    ones; it is never worse than the start grid there. Start states are drawn with --seed,
    which may not be compare's evaluation seed."""
    from . import search
    from .compare import torch_threads

    if out_file is None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in solver)
        out_file = Path(f"searched-{safe}-{steps}.json")
    if out_file.exists() and not force:
        raise click.BadParameter(f"{str(out_file)!r} exists; give another file or add --force "
                                 "to replace it", param_hint="'--out'")
    _check_writable("--out", out_file.parent)
    kwargs = {k: v for k, v in (("noises", samples), ("held_out", held_out), ("seed", seed),
                                ("method", method), ("iterations", iterations))
              if v is not None}
    with torch_threads(threads or None):
        found = search.search_grid(
            solver, model, steps, start=start, evaluation_seed=evaluation_seed,
            solver_options=parse_options("--solver-option", solver_option),
            model_options=parse_options("--model-option", model_option), **kwargs)
    try:
        found.save(out_file)
    except OSError as e:
        raise SolverlabCliError(f"--out {str(out_file)!r}: could not write the grid: "
                                f"{e}") from None
    if as_json:
        click.echo(json.dumps({**found.as_dict(), "file": str(out_file)}, indent=2))
        return
    drawn = f"seed {found.seed}" if found.seed is not None else "given"
    click.echo(f"{found.solver}, {found.steps} steps on {found.model!r} ({found.schedule}): "
               f"{found.method} search from {found.start}, {found.train_samples} training + "
               f"{found.held_out_samples} held-out start states ({drawn}), "
               f"{found.wall_time:.1f} s")
    click.echo(f"{'':>10}  {'train':>10}  {'held-out':>10}")
    click.echo(f"{found.start:>10}  {found.train_error_start:>10.4e}  "
               f"{found.held_out_error_start:>10.4e}")
    change = found.held_out_error / found.held_out_error_start - 1.0
    click.echo(f"{'searched':>10}  {found.train_error:>10.4e}  {found.held_out_error:>10.4e}"
               f"  ({100 * change:+.1f}% held-out)")
    if not found.improved:
        click.echo(f"no iterate beat {found.start} on the held-out start states: the file "
                   "holds the start grid")
    click.echo("times: " + ", ".join(f"{t:.6g}" for t in found.times))
    click.echo(f"error: {found.error_definition}")
    click.echo(f"wrote {out_file}; score it on compare's start states with: solverlab compare "
               f"--solvers {found.solver} --grids {found.start},searched:{out_file}")


# -- order -----------------------------------------------------------------------------------
#: What an `order` output folder may hold: one json + png set per solver.
ORDER_OUTPUTS = ("order-*.json", "order-*.png")


@cli.command("order")
@click.argument("solver")
@click.option("--grid", default="logsnr", show_default=True, help="Time grid of the solves.")
@click.option("--steps", callback=_split("integers", int), default=None, metavar="N,M,...",
              help="Step counts, at least three (default: doubled from 2 until the slope "
                   "settles). A fit whose local slopes disagree is reported with a warning.")
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
    Gaussian mixture with a float64 reference), next to the order the solver declares.

    The error is compare's: the RMS over samples of the L2 error, relative to the RMS norm of
    the reference. A fit outside the asymptotic range (local slopes in the fit window that
    differ by more than 0.2) is reported with a warning. Adaptive solvers have no order in
    the number of steps: `solverlab compare --tolerances` measures them."""
    from . import _io
    from .compare import torch_threads
    from .registry import get_solver
    from .solver import AdaptiveSolver
    from .testing import default_problem, measure_convergence_order
    from .testing.order import ERRORS

    if steps is not None and (len(steps) < 3 or any(n < 1 for n in steps)):
        raise click.BadParameter("give at least three step counts >= 1, e.g. --steps 16,32,64",
                                 param_hint="'--steps'")
    try:
        get_registry().entry("grid", grid)
    except SolverlabError as e:
        raise click.BadParameter(f"{grid}: {_one_line(e)}", param_hint="'--grid'") from None
    _check_writable("--out", out_dir)
    try:
        _io.check_output_folder(out_dir, ORDER_OUTPUTS)
    except SolverlabError as e:
        raise click.BadParameter(_one_line(e), param_hint="'--out'") from None
    try:
        s = get_solver(solver)
    except SolverlabError as e:
        raise click.BadParameter(f"{solver}: {_one_line(e)}", param_hint="'SOLVER'") from None
    if isinstance(s, AdaptiveSolver):
        raise click.BadParameter(
            f"{solver} is adaptive: it chooses its own steps, so it has no convergence order in "
            f"the number of steps; measure its error against its tolerance with `solverlab "
            f"compare --solvers {solver} --tolerances 1e-2,1e-3,1e-4`", param_hint="'SOLVER'")
    with torch_threads(threads or None):
        study = measure_convergence_order(s, default_problem(), steps=steps, grid=grid,
                                          error="relative-rms")
    declared = s.convergence_order
    warnings = []
    if study.order is not None and not study.asymptotic():
        slopes = ", ".join(f"{v:.2f}" for v in study.window_slopes())
        finer = ",".join(str(study.steps[-1] * k) for k in (2, 4, 8))
        warnings.append(
            f"the fit is not in the asymptotic range: the local slopes in the fit window "
            f"({slopes}) differ by more than 0.2, so {study.order:.2f} is not {solver}'s order; "
            f"add finer steps, e.g. --steps {study.steps[-1]},{finer}, or leave out --steps")
    result = {
        "solver": solver, "declared_order": declared, "fitted_order": study.order,
        "asymptotic": study.asymptotic(), "window_slopes": study.window_slopes(),
        "warnings": warnings,
        "grid": study.grid, "problem": study.problem, "steps": list(study.steps),
        "nfe": list(study.nfe),
        "errors": [e if math.isfinite(e) else None for e in study.errors],
        "fit_window": list(study.window), "floor": study.floor,
        "error": ERRORS[study.error][1],
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
        click.echo(f"\nerror: {result['error']}")
        fitted = "none" if study.order is None else f"{study.order:.2f}"
        click.echo(f"\n{solver}: fitted order {fitted} (declared {declared}, grid {study.grid}); "
                   f"wrote {png_path.name}, {json_path.name} to {out_dir}")
    for w in warnings:
        click.echo(f"Warning: {w}", err=True)
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
    ax.set_ylabel("relative RMS error vs reference")
    fitted = "none" if study.order is None else f"{study.order:.2f}"
    ax.set_title(f"{study.solver}: fitted order {fitted}, declared {declared}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


# -- lipschitz -------------------------------------------------------------------------------
def _resolve_model(flag: str, name: str) -> tuple[Any, Callable[[int, int], Any]]:
    """``(model, data)`` for a registered model name or a checkpoint (shipped name or path,
    :func:`solverlab.get_model`): ``data(n, seed)`` draws ``n`` clean training samples."""
    import torch

    from .checkpoint import get_model

    try:
        model = get_model(name)
    except SolverlabError as e:
        raise click.BadParameter(f"{name}: {_one_line(e)}", param_hint=f"'{flag}'") from None
    data = getattr(getattr(model, "data", None), "sample", None)
    if not callable(data):
        raise click.BadParameter(
            f"{name}: the model has no data to noise (no .data.sample(n, generator)); give a "
            "checkpoint or an analytic model", param_hint=f"'{flag}'")
    return model, lambda n, seed: data(n, torch.Generator().manual_seed(seed))


@cli.command("lipschitz")
@click.argument("model")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("solverlab-lipschitz"), show_default=True,
              help="Folder for lipschitz.json, lipschitz.csv and lipschitz.png, replaced whole "
                   "(it may hold only these files).")
@click.option("--samples", type=click.IntRange(min=1), default=256, show_default=True,
              help="Clean training samples x0 the expectation averages over.")
@click.option("--points", type=click.IntRange(min=2), default=128, show_default=True,
              help="Grid times (dense near t = 0; the discrete nodes of a vp-discrete model).")
@click.option("--dt", type=float, default=None, metavar="DT",
              help="Finite-difference step (default: one discrete step 1/N, else 1e-3 of the "
                   "time range).")
@click.option("--compare", "compare_model", default=None, metavar="MODEL2",
              help="A second model (e.g. the same network trained without timestep sharing) "
                   "probed on the same data, noise, grid and dt, for comparison.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the data draw (the noise uses seed + 1).")
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="Torch intra-op threads (0: torch's default).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def lipschitz_command(model, out_dir, samples, points, dt, compare_model, seed, threads,
                      as_json) -> None:
    """Probe the Lipschitz constant in time of MODEL's noise prediction near t = 0:
    K(t) = E ||eps(x, t+dt) - eps(x, t)|| / dt with x = alpha_t x0 + sigma_t z the same for
    both evaluations (only the time condition changes), x0 drawn from MODEL's training data.

    MODEL is a registered model (an analytic density) or a checkpoint name or path. For a
    timestep-shared model (E-TSDM) K is 0 inside each shared sub-interval and the change sits
    at the boundaries: they are marked and K across each is reported as a jump; --compare
    puts the plain model's K beside them."""
    from . import _io
    from .compare import torch_threads
    from .metrics import LIPSCHITZ_DEFINITION, LIPSCHITZ_OUTPUTS, run_lipschitz

    if dt is not None and not (math.isfinite(dt) and dt > 0):
        raise click.BadParameter(f"{dt:g} is not allowed: give a finite step > 0, e.g. "
                                 "--dt 0.001", param_hint="'--dt'")
    _check_writable("--out", out_dir)
    try:
        _io.check_output_folder(out_dir, LIPSCHITZ_OUTPUTS)
    except SolverlabError as e:
        raise click.BadParameter(_one_line(e), param_hint="'--out'") from None
    net, data = _resolve_model("MODEL", model)
    plain = None if compare_model is None else _resolve_model("--compare", compare_model)[0]
    span = net.schedule.t_max - net.schedule.t_min
    if dt is not None and dt >= span:
        raise click.BadParameter(f"{dt:g} is not allowed: the step must be shorter than "
                                 f"{model}'s time range [{net.schedule.t_min:g}, "
                                 f"{net.schedule.t_max:g}]", param_hint="'--dt'")
    with torch_threads(threads or None):
        x0 = data(samples, seed)
        # the data on the network's device and in its dtype (float32 weights, float64 data)
        params = [p for p in getattr(getattr(net, "module", None), "parameters", list)()
                  if p.is_floating_point()]
        if params and getattr(x0, "is_floating_point", lambda: False)():
            x0 = x0.to(params[0].device, params[0].dtype)
        report = run_lipschitz(net, x0, out_dir, points=points, dt=dt, compare=plain,
                               seed=seed + 1)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{model}: {LIPSCHITZ_DEFINITION}")
    click.echo(f"dt = {report['dt']:.6g}, {report['samples']} samples, "
               f"{len(report['t'])} grid times")
    plain_k = report["compare"]
    header = f"{'t':>12}  {'K':>12}" + (f"  {'K (' + compare_model + ')':>16}" if plain_k else "")
    click.echo(header)
    shown = sorted(range(len(report["t"])), key=lambda i: report["t"][i])[:12]
    for i in shown:
        line = f"{report['t'][i]:>12.6g}  {report['K'][i]:>12.5g}"
        if plain_k:
            line += f"  {plain_k['K'][plain_k['t'].index(report['t'][i])]:>16.5g}"
        click.echo(line)
    if len(report["t"]) > len(shown):
        click.echo(f"{'...':>12}  (all {len(report['t'])} in lipschitz.csv)")
    for j in report["jumps"]:
        click.echo(f"jump across t = {j['t']:.6g} (network time {j['network_time']:g}): "
                   f"K = {j['K']:.5g}")
    for line in report["comparison"]["summary"]:
        click.echo(line)
    click.echo(f"wrote {', '.join(LIPSCHITZ_OUTPUTS)} to {out_dir}")


def main(argv: list[str] | None = None) -> Any:
    """Entry point of the ``solverlab`` console script and ``python -m solverlab``."""
    return cli.main(args=argv, prog_name="solverlab")


# -- train, checkpoint (their own modules) -----------------------------------------------------
def _add_training_commands() -> None:
    from .checkpoint import checkpoint_group
    from .train import train_command

    cli.add_command(train_command)
    cli.add_command(checkpoint_group)


_add_training_commands()
