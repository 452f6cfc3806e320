"""The `solverlab` command (list, compare, order), the comparison runner and atomic writes."""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from solverlab import _io
from solverlab.cli import cli
from solverlab.compare import Row, budget_steps, format_table, relative_rms_error

KIND_KEYS = ("solvers", "schedules", "grids", "parameterizations", "models", "objectives")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def assert_clean_error(result, *needles: str) -> None:
    """Exit code 2, a one-line `Error: ...`, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.output
    for n in needles:
        assert n in lines[0], result.output


# -- list --------------------------------------------------------------------------------
def _check_list_json(data: dict) -> None:
    assert set(data) == {*KIND_KEYS, "broken"}
    for key in KIND_KEYS:
        for e in data[key]:
            assert isinstance(e["name"], str) and e["name"]
            assert isinstance(e["plugin"], str) and e["plugin"]
            assert "distribution" in e
    for s in data["solvers"]:
        assert isinstance(s["order"], int) and s["order"] >= 1
    for b in data["broken"]:
        assert {"plugin", "distribution", "error"} <= set(b)
    grids = {e["name"]: e for e in data["grids"]}
    assert grids["logsnr"]["plugin"] == "solverlab"
    assert {e["name"] for e in data["models"]} >= {"gaussian-mixture"}
    solvers = {e["name"]: e for e in data["solvers"]}
    for name in ("euler", "heun", "rk4"):
        assert solvers[name]["plugin"] == "solverlab_classic"
    assert (solvers["euler"]["order"], solvers["heun"]["order"], solvers["rk4"]["order"]) == (
        1, 2, 4)


def test_list_json_structure():
    result = invoke("list", "--json")
    assert result.exit_code == 0, result.output
    _check_list_json(json.loads(result.output))


def test_list_text_names_plugins_and_distributions():
    result = invoke("list")
    assert result.exit_code == 0, result.output
    assert "heun" in result.output and "solverlab_classic" in result.output
    assert "broken" in result.output
    # the order of the default options, not a class attribute (pndm-prk listed 2, unipc 2)
    assert re.search(r"^  pndm-prk +order 4 ", result.output, re.M), result.output
    assert re.search(r"^  unipc +order 3 ", result.output, re.M), result.output


def test_list_json_in_a_real_subprocess():
    proc = subprocess.run(
        [sys.executable, "-m", "solverlab", "list", "--json"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr
    _check_list_json(json.loads(proc.stdout))


def test_list_reports_a_broken_plugin(monkeypatch):
    from importlib.metadata import EntryPoint

    from solverlab import registry

    bad = EntryPoint(name="slt_nonexistent", value="slt_no_such_module_xyz",
                     group="solverlab")
    reg = registry.Registry.load(eps=[bad])
    monkeypatch.setattr(registry, "_REGISTRY", reg)
    data = json.loads(invoke("list", "--json").output)
    (broken,) = data["broken"]
    assert broken["plugin"] == "slt_nonexistent"
    assert "ModuleNotFoundError" in broken["error"]


# -- compare -----------------------------------------------------------------------------
SMALL = ("--solvers", "euler,heun,rk4", "--grids", "logsnr,time-uniform", "--nfe", "2,5,10,20",
         "--samples", "32")


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    result = CliRunner().invoke(cli, ["compare", *SMALL, "--out", str(out)],
                                catch_exceptions=False)
    return result, out


def test_compare_writes_csv_json_png(compare_run):
    result, out = compare_run
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "compare-heatmap.png", "compare.csv", "compare.json", "compare.png"]
    assert (out / "compare.png").read_bytes().startswith(PNG_MAGIC)
    with open(out / "compare.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    data = json.loads((out / "compare.json").read_text())
    assert len(rows) == len(data["rows"]) == 3 * 2 * 4
    assert data["settings"]["samples"] == 32
    assert "relative" in data["error"]
    assert {(r["solver"], r["grid"], int(r["nfe_budget"])) for r in rows} == {
        (s, g, b) for s in ("euler", "heun", "rk4") for g in ("logsnr", "time-uniform")
        for b in (2, 5, 10, 20)}
    # the terminal table: a header and one line per row
    assert "rms error" in result.output and "median error" in result.output
    assert sum(ln.startswith(("euler", "heun", "rk4")) for ln in result.output.splitlines()) == 24


def test_compare_nfe_respects_budget_and_errors_fall(compare_run):
    _, out = compare_run
    rows = json.loads((out / "compare.json").read_text())["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:
        assert r["nfe"] <= r["nfe_budget"], r
        assert r["error"] > 0
    by = {(r["solver"], r["grid"], r["nfe_budget"]): r for r in rows}
    # a budget below one step is skipped, not silently overrun: rk4 needs 4 NFE per step
    assert by["rk4", "logsnr", 2]["status"].startswith("skipped:")
    assert by["rk4", "logsnr", 2]["nfe"] is None
    assert (by["euler", "logsnr", 20]["steps"], by["heun", "logsnr", 20]["steps"],
            by["rk4", "logsnr", 20]["steps"]) == (20, 10, 5)
    assert by["heun", "logsnr", 20]["nfe"] == 20
    for solver, budgets in (("heun", (2, 5, 10, 20)), ("rk4", (5, 10, 20))):
        errs = [by[solver, "logsnr", b]["error"] for b in budgets]
        # error > 1 is "diverged-like" (heun at 2 NFE: one Euler-like step), never "ok"
        assert all((r["status"] == "diverged-like") == (r["error"] > 1) and
                   r["status"] in ("ok", "diverged-like")
                   for r in (by[solver, "logsnr", b] for b in budgets)), errs
        assert all(a > b for a, b in itertools.pairwise(errs)), (solver, errs)
    # on the same 20 NFE, rk4 (5 steps) beats euler (20 steps; in sigma euler is DDIM:
    # measured 0.087 vs 0.129)
    assert by["rk4", "logsnr", 20]["error"] < 0.8 * by["euler", "logsnr", 20]["error"]


def test_compare_unknown_solver_names_the_close_match(tmp_path):
    result = invoke("compare", "--solvers", "heun,rk5", "--out", str(tmp_path / "o"))
    assert_clean_error(result, "rk5", "'rk4'")
    assert not (tmp_path / "o").exists()  # nothing ran, nothing written


def test_compare_unknown_grid_and_model(tmp_path):
    assert_clean_error(invoke("compare", "--grids", "logsnrr", "--out", str(tmp_path)),
                       "'logsnr'")
    assert_clean_error(invoke("compare", "--model", "gaussian-mixtur", "--out", str(tmp_path)),
                       "'gaussian-mixture'")


@pytest.mark.parametrize("value", ["5,x", "5,,10", "ten", ""])
def test_compare_bad_nfe_is_a_clear_error(value, tmp_path):
    result = invoke("compare", "--nfe", value, "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "--nfe" in result.output


@pytest.mark.parametrize("value", ["0", "5,-1"])
def test_compare_nonpositive_nfe_is_an_option_error(value, tmp_path):
    assert_clean_error(invoke("compare", "--nfe", value, "--out", str(tmp_path)), "nfe", ">= 1")


def test_run_compare_validates_before_work(monkeypatch):
    from solverlab import compare, errors

    def boom(*a, **k):  # the reference must not be computed for a bad request
        raise AssertionError("work started before validation")

    monkeypatch.setattr("solverlab.reference.reference_solution", boom)
    with pytest.raises(errors.UnknownNameError, match="rk4"):
        compare.run_compare(solvers=["rk44"])
    with pytest.raises(errors.OptionError):
        compare.run_compare(solvers=["euler"], samples=0)
    with pytest.raises(errors.OptionError):
        compare.run_compare(solvers=["euler"], grids=["linspace"])  # needs a discrete schedule
    with pytest.raises(errors.OptionError):
        compare.run_compare(solvers=["euler"], nfe=[True])


def test_run_compare_statuses_diverged_and_unknown_nfe(monkeypatch):
    import attrs
    import torch

    import solverlab
    from solverlab import compare, registry
    from solverlab_classic import Euler

    @attrs.frozen(kw_only=True)
    class Blowup(solverlab.Solver):
        name = "test-blowup"
        order = 1

        def step(self, state):
            state.denoiser(state.x, state.t)
            return state.advance(state.x * torch.inf)

        def expected_nfe(self, steps):
            return steps

    @attrs.frozen(kw_only=True)
    class Quiet(Euler):  # euler, but does not say its NFE in advance: steps = budget
        name = "test-quiet"

        def expected_nfe(self, steps):
            return None

    reg = registry.Registry.load()
    reg.add(Blowup)
    reg.add(Quiet)
    monkeypatch.setattr(registry, "_REGISTRY", reg)
    rows = compare.run_compare(solvers="test-blowup,test-quiet,euler", grids=["logsnr"],
                               nfe=[3], samples=8)
    by = {r.solver: r for r in rows}
    assert by["test-blowup"].status == "diverged" and by["test-blowup"].error is None
    assert (by["test-quiet"].steps, by["test-quiet"].nfe) == (3, 3)
    assert by["test-quiet"].error == pytest.approx(by["euler"].error, rel=1e-12)


def test_budget_steps():
    from solverlab import get_solver

    assert budget_steps(get_solver("rk4"), 9) == (2, "")
    steps, why = budget_steps(get_solver("rk4"), 3)
    assert steps is None and why.startswith("skipped:") and "4" in why
    assert budget_steps(get_solver("euler"), 7) == (7, "")


def test_relative_rms_error_definition():
    import torch

    ref = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)  # norms 5, 0
    x = ref + torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)  # errors 1, 1
    # sqrt(mean(1, 1)) / sqrt(mean(25, 0)) = 1 / sqrt(12.5)
    assert relative_rms_error(x, ref) == pytest.approx(1 / 12.5**0.5, rel=1e-15)


def test_format_table_handles_skipped_rows():
    rows = [Row(solver="rk4", grid="logsnr", nfe_budget=2, steps=None, nfe=None, error=None,
                wall_time=None, status="skipped: NFE budget 2 is smaller than one step"),
            Row(solver="heun", grid="logsnr", nfe_budget=10, steps=5, nfe=10, error=1.5e-4,
                wall_time=0.0012, status="ok")]
    text = format_table(rows)
    assert "1.500e-04" in text and "skipped: NFE budget 2" in text
    assert len(text.splitlines()) == 4


# -- order -------------------------------------------------------------------------------
def test_order_euler_is_one(tmp_path):
    result = invoke("order", "euler", "--out", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["declared_order"] == 1
    assert abs(data["fitted_order"] - 1) <= 0.3, data
    assert len(data["steps"]) == len(data["errors"]) >= 2
    assert Path(data["plot"]).read_bytes().startswith(PNG_MAGIC)
    assert json.loads(Path(data["json"]).read_text())["fitted_order"] == data["fitted_order"]


def test_order_text_output(tmp_path):
    result = invoke("order", "heun", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "fitted order" in result.output and "declared 2" in result.output
    assert (tmp_path / "order-heun.png").read_bytes().startswith(PNG_MAGIC)


def test_order_unknown_solver(tmp_path):
    assert_clean_error(invoke("order", "huen", "--out", str(tmp_path)), "'heun'")


# -- plugin commands ---------------------------------------------------------------------
def test_plugin_commands_are_added_and_cannot_replace_builtins(monkeypatch):
    import click

    from solverlab import cli as cli_module
    from solverlab import hookimpl, registry

    @click.command("hello")
    def hello():
        click.echo("hello from a plugin")

    class Plugin:
        @hookimpl
        def solverlab_register_commands(self, cli):
            cli.add_command(hello)

    class Rogue:
        @hookimpl
        def solverlab_register_commands(self, cli):
            cli.add_command(click.Command("list", callback=lambda: None))

    reg = registry.Registry.load(eps=[])
    reg.plugin_manager.register(Plugin(), name="hello_plugin")
    reg.plugin_manager.register(Rogue(), name="rogue_plugin")
    monkeypatch.setattr(registry, "_REGISTRY", reg)
    group = cli_module.SolverlabGroup(commands=dict(cli.commands))
    result = CliRunner().invoke(group, ["hello"], catch_exceptions=False)
    assert result.exit_code == 0 and "hello from a plugin" in result.output
    assert group.commands["list"] is cli.commands["list"]
    assert [b.plugin for b in reg.broken] == ["rogue_plugin"]
    assert "already defined" in reg.broken[0].error


# -- atomic writes -----------------------------------------------------------------------
def test_atomic_writes_leave_no_temp_files(tmp_path):
    _io.write_text(tmp_path / "a.txt", "hello\n")
    _io.write_bytes(tmp_path / "b.bin", b"\x00\x01")
    _io.write_json(tmp_path / "c.json", {"x": [1, 2]})
    _io.write_csv(tmp_path / "d.csv", [{"a": 1, "b": None}], ["a", "b"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.json", "d.csv"]
    assert (tmp_path / "a.txt").read_text() == "hello\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2]}
    assert (tmp_path / "d.csv").read_text() == "a,b\n1,\n"
    mode = (tmp_path / "a.txt").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # not mkstemp's 0o600


def test_atomic_write_failing_midway_keeps_the_old_file(tmp_path):
    target = tmp_path / "result.json"
    _io.write_json(target, {"old": True})
    before = target.read_bytes()

    def half_then_fail(f):
        f.write('{"new": ')
        f.flush()
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        _io.atomic_write(target, half_then_fail)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]

    with pytest.raises(ValueError):  # NaN is refused before anything reaches the disk
        _io.write_json(target, {"x": float("nan")})
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_atomic_write_figure(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure()
    fig.add_subplot().plot([1, 2], [3, 4])
    _io.write_figure(tmp_path / "f.png", fig)
    assert (tmp_path / "f.png").read_bytes().startswith(PNG_MAGIC)
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]
