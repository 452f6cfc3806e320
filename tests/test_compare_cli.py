"""`solverlab compare` and `solverlab order` from the command line (issue 10): options for any
problem, adaptive solvers through a tolerance sweep, honest statuses, fail-fast errors."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import attrs
import pytest
import torch
from click.testing import CliRunner

import solverlab
from solverlab import compare, registry
from solverlab.cli import cli

# small and quick: 16 samples, one grid
FAST = ("--samples", "16", "--grids", "logsnr")


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def rows_of(out: Path) -> list[dict]:
    return json.loads((out / "compare.json").read_text())["rows"]


def assert_one_line_error(result, *needles: str) -> str:
    """Exit code 2, exactly one output line `Error: ...` holding every needle, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture
def no_work(monkeypatch):
    """Any solve or reference computation fails the test: errors must come before work."""
    def boom(*a, **k):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(compare, "_run", boom)
    monkeypatch.setattr(compare, "compute_reference", boom)
    monkeypatch.setattr("solverlab.reference.reference_solution", boom)


# -- options for any problem -----------------------------------------------------------------
def test_model_and_schedule_options_reach_the_model(tmp_path):
    out = tmp_path / "o"
    ok(invoke("compare", *FAST, "--solvers", "heun", "--nfe", "10", "--model-option", "dim=3",
              "--model-option", "components=2", "--schedule", "vp-cosine",
              "--schedule-option", "s=0.01", "--out", str(out)))
    settings = json.loads((out / "compare.json").read_text())["settings"]
    assert settings["model_options"] == {"dim": 3, "components": 2}
    assert (settings["schedule"], settings["schedule_options"]) == ("vp-cosine", {"s": 0.01})
    # the same problem built by hand gives the same error: the options were used
    model = solverlab.get_model("gaussian-mixture", dim=3, components=2,
                                schedule=solverlab.get_schedule("vp-cosine", s=0.01))
    mine = compare.run_compare(solvers="heun", grids="logsnr", nfe=10, model=model, samples=16)
    assert rows_of(out)[0]["error"] == pytest.approx(mine[0].error, rel=1e-12)


def test_solver_option_changes_the_solver(tmp_path):
    errors = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        ok(invoke("compare", *FAST, "--solvers", "dpmpp-3m", "--nfe", "20", "--solver-option",
                  f"dpmpp-3m:official_d2={flag}", "--out", str(out)))
        errors[flag] = rows_of(out)[0]["error"]
    assert errors["true"] != pytest.approx(errors["false"], rel=1e-6)


def test_diffusers_spacings_and_a_custom_grid(tmp_path):
    out = tmp_path / "o"
    ok(invoke("compare", "--samples", "16", "--solvers", "ddim", "--nfe", "5",
              "--schedule", "vp-discrete", "--grids", "linspace,leading,trailing,custom",
              "--grid-option", "custom:times=[1.0, 0.5, 0.2, 0.05, 0.001]",
              "--out", str(out)))
    by = {r["grid"]: r for r in rows_of(out)}
    assert set(by) == {"linspace", "leading", "trailing", "custom"}
    assert all(r["status"] == "ok" for r in by.values())
    # a custom grid holds its own steps and runs without a budget
    assert (by["custom"]["steps"], by["custom"]["nfe"], by["custom"]["nfe_budget"]) == (4, 4, None)
    assert by["leading"]["nfe"] == 5


def test_config_file_with_command_line_overrides(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('solvers = ["heun", "dpmpp-2m"]\nnfe = [5, 10]\nsamples = 16\n'
                   'grids = "logsnr"\nseed = 7\n[model-options]\ndim = 3\n'
                   '[grid-options.logsnr]\n')
    out = tmp_path / "o"
    ok(invoke("compare", "--config", str(cfg), "--nfe", "10", "--out", str(out)))
    data = json.loads((out / "compare.json").read_text())
    assert data["settings"]["seed"] == 7 and data["settings"]["model_options"] == {"dim": 3}
    # the command line's --nfe replaced the file's
    assert {(r["solver"], r["nfe_budget"]) for r in data["rows"]} == {("heun", 10),
                                                                      ("dpmpp-2m", 10)}


# -- adaptive solvers --------------------------------------------------------------------------
def test_adaptive_solvers_run_through_a_tolerance_sweep(tmp_path):
    out = tmp_path / "o"
    result = ok(invoke("compare", *FAST, "--solvers", "dpm-adaptive,heun", "--nfe", "10",
                       "--tolerances", "1e-2,1e-3,1e-4", "--out", str(out)))
    rows = rows_of(out)
    adaptive = [r for r in rows if r["kind"] == "adaptive"]
    assert [r["tolerance"] for r in adaptive] == [1e-2, 1e-3, 1e-4]
    assert all(r["solver"] == "dpm-adaptive" and r["grid"] == compare.ADAPTIVE_GRID
               and r["nfe_budget"] is None and r["status"] == "ok" for r in adaptive)
    nfes, errs = [r["nfe"] for r in adaptive], [r["error"] for r in adaptive]
    assert nfes == sorted(nfes) and nfes[0] < nfes[-1], nfes   # tighter costs more
    assert errs == sorted(errs, reverse=True), errs              # and is more accurate
    assert [r["kind"] for r in rows if r["solver"] == "heun"] == ["fixed"]
    assert "(adaptive)" in result.output and "1e-04" not in result.output  # tol shown as 0.0001
    with open(out / "compare.csv", newline="") as f:
        assert [r["tolerance"] for r in csv.DictReader(f) if r["kind"] == "adaptive"] == [
            "0.01", "0.001", "0.0001"]


def test_the_default_run_includes_adaptive_solvers():
    adaptive = {e.name for e in solverlab.get_registry().entries("solver")
                if issubclass(e.cls, solverlab.AdaptiveSolver)}
    runs = compare._solver_runs(None, None, None)
    assert {(n, t) for n, _, t in runs if t is not None} == {
        (n, t) for n in adaptive for t in compare.DEFAULT_TOLERANCES}


def test_tolerances_need_an_adaptive_solver(tmp_path, no_work):
    assert_one_line_error(invoke("compare", "--solvers", "heun", "--tolerances", "1e-3",
                                 "--out", str(tmp_path / "o")), "--tolerances", "dpm-adaptive")
    assert not (tmp_path / "o").exists()


# -- statuses --------------------------------------------------------------------------------
def test_over_budget_and_diverged_like_are_never_ok(tmp_path):
    out = tmp_path / "o"
    result = ok(invoke("compare", *FAST, "--solvers", "torchdiffeq-fixed_adams,heun",
                       "--nfe", "2,10", "--out", str(out)))
    by = {(r["solver"], r["nfe_budget"]): r for r in rows_of(out)}
    adams = by["torchdiffeq-fixed_adams", 10]
    assert adams["nfe"] > 10 and adams["status"] == "over budget", adams
    heun = by["heun", 2]  # one Heun step over the whole range
    assert heun["error"] > 1 and heun["status"] == "diverged-like", heun
    for r in rows_of(out):
        if r["status"] == "ok":
            assert r["nfe"] <= r["nfe_budget"] and r["error"] <= 1, r
    # the final line counts each status
    counts = json.loads((out / "compare.json").read_text())["statuses"]
    last = result.output.strip().splitlines()[-1]
    for status, n in counts.items():
        assert f"{n} {status}" in last, last
    assert sum(counts.values()) == len(rows_of(out))


def test_median_error_beside_the_rms_in_csv_and_json(tmp_path):
    x = torch.zeros(3, 2, dtype=torch.float64)
    ref = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    x[:, 0] = torch.tensor([2.0, 2.0, 11.0])  # per-sample errors 1, 1, 10; reference norms 1
    rms, median = compare.relative_errors(x, ref)
    assert rms == pytest.approx((102 / 3) ** 0.5, rel=1e-15)
    assert median == pytest.approx(1.0, rel=1e-15)

    out = tmp_path / "o"
    result = ok(invoke("compare", *FAST, "--solvers", "ddim", "--nfe", "5,20",
                       "--out", str(out)))
    rows = rows_of(out)
    with open(out / "compare.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [float(r["median_error"]) for r in table] == [r["median_error"] for r in rows]
    assert [float(r["error"]) for r in table] == [r["error"] for r in rows]
    for r in rows:  # the mode-switching samples make the RMS the larger one here
        assert 0 < r["median_error"] < r["error"], r
    assert "median error" in result.output


def test_warnings_raised_inside_a_solve_are_attached_to_its_row(tmp_path, monkeypatch):
    import warnings

    from solverlab_classic import Euler

    @attrs.frozen(kw_only=True)
    class Noisy(Euler):
        name = "test-noisy"

        def solve(self, model, x, grid, **kw):
            warnings.warn("coarse grid, results may be poor", RuntimeWarning, stacklevel=1)
            warnings.warn("coarse grid, results may be poor", RuntimeWarning, stacklevel=1)
            return super().solve(model, x, grid, **kw)

    reg = registry.Registry.load()
    reg.add(Noisy)
    monkeypatch.setattr(registry, "_REGISTRY", reg)
    out = tmp_path / "o"
    result = ok(invoke("compare", *FAST, "--solvers", "test-noisy,euler", "--nfe", "5",
                       "--out", str(out)))
    by = {r["solver"]: r for r in rows_of(out)}
    assert by["test-noisy"]["warnings"] == "RuntimeWarning: coarse grid, results may be poor"
    assert by["euler"]["warnings"] is None
    assert by["test-noisy"]["status"] == "ok"
    assert "[w1]" in result.output
    assert "[w1] RuntimeWarning: coarse grid, results may be poor" in result.output
    assert "1 with warnings" in result.output.strip().splitlines()[-1]


# -- references ------------------------------------------------------------------------------
class NetModel(solverlab.TorchModel):
    """A registered network model (float64 TimeMLP) without an exact flow."""

    name = "test-net"

    def __init__(self, dim: int = 2) -> None:
        from solverlab.testing import TimeMLP

        super().__init__(TimeMLP(dim, seed=1).double(), "vp-linear", "noise")
        self.dim = dim

    def sample_prior(self, n, generator=None, dtype=torch.float64):
        return torch.randn(n, self.dim, generator=generator, dtype=dtype)


def test_a_network_model_gets_an_adaptive_reference_with_its_estimated_error(tmp_path,
                                                                             monkeypatch):
    reg = registry.Registry.load()
    reg.add(NetModel)
    monkeypatch.setattr(registry, "_REGISTRY", reg)
    out = tmp_path / "o"
    result = ok(invoke("compare", *FAST, "--model", "test-net", "--model-option", "dim=3",
                       "--solvers", "heun", "--nfe", "10", "--reference-tol", "1e-8",
                       "--out", str(out)))
    ref = json.loads((out / "compare.json").read_text())["reference"]
    assert (ref["kind"], ref["method"], ref["tolerance"]) == ("adaptive", "dopri8", 1e-8)
    assert 0 < ref["estimated_error"] < 1e-6, ref
    assert "reference: float64 adaptive dopri8 solve, rtol = atol = 1e-08" in result.output
    assert f"estimated error {ref['estimated_error']:.1e}" in result.output


def test_gaussian_data_gets_the_exact_reference(tmp_path):
    out = tmp_path / "o"
    result = ok(invoke("compare", *FAST, "--model", "gaussian", "--solvers", "heun", "--nfe",
                       "10", "--out", str(out)))
    ref = json.loads((out / "compare.json").read_text())["reference"]
    assert ref["kind"] == "exact" and ref["estimated_error"] is None
    assert "reference: exact closed-form flow" in result.output


# -- fail fast -------------------------------------------------------------------------------
def _unwritable(tmp_path: Path) -> list[Path]:
    """Output folders that cannot be written here: under a regular file, under /sys (even for
    root), and under a read-only folder (only where the permission bits stop this user)."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    paths = [blocker / "out"]
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    for folder in (Path("/sys"), ro):
        try:
            (folder / "solverlab-probe").mkdir()
        except OSError:
            paths.append(folder / "out")
        else:  # root: permission bits do not stop it
            (folder / "solverlab-probe").rmdir()
    return paths


def test_an_unwritable_out_fails_before_any_solve(tmp_path, no_work):
    paths = _unwritable(tmp_path)
    for out in paths:
        line = assert_one_line_error(invoke("compare", "--out", str(out)), "--out", str(out))
        assert "writable" in line or "file" in line, line
    (tmp_path / "ro").chmod(0o755)


@pytest.mark.parametrize(("args", "needles"), [
    (("--nfe", "5,x"), ("--nfe", "5,x", "5,10,20")),
    (("--nfe", "0,5"), ("--nfe", "0,5", ">= 1", "--nfe 5,10,20")),
    (("--tolerances", "1e-3,2"), ("--tolerances", "(0, 1]", "--tolerances 1e-2")),
    (("--samples", "0"), ("--samples", ">= 1")),
    (("--solver-option", "dpmpp3m:official_d2=true"), ("--solver-option", "dpmpp3m",
                                                         "'dpmpp-3m'")),
    (("--solver-option", "official_d2=true"), ("--solver-option", "SOLVER:KEY=VALUE")),
    (("--solvers", "heun", "--solver-option", "rk4:variable=\"t\""),
     ("--solver-option", "rk4", "not in this run")),
    (("--solvers", "dpmpp-3m", "--solver-option", "dpmpp-3m:official_d3=true"),
     ("--solver-option", "official_d3", "official_d2")),
    (("--grid-option", "karras:rho=5"), ("--grid-option", "karras", "not in this run")),
    (("--grids", "custom"), ("--grids", "custom", "times", "--grid-option")),
    (("--grids", "linspace"), ("--grids", "linspace", "vp-discrete")),
    (("--model", "gaussian-mixtur"), ("--model", "'gaussian-mixture'")),
    (("--model-option", "dim=0"), ("--model-option", "dim=0", ">= 1")),
    (("--model-option", "dim"), ("--model-option", "KEY=VALUE")),
    (("--schedule", "vp-cosin"), ("--schedule", "'vp-cosine'")),
    (("--schedule-option", "beta_max=-1"), ("--schedule-option", "beta_max=-1", "> 0")),
    (("--reference-tol", "0.5"), ("--reference-tol", "1e-9")),
    (("--nfee", "5"), ("--nfee", "--nfe")),
])
def test_every_error_is_one_line_naming_the_option(tmp_path, no_work, args, needles):
    result = CliRunner().invoke(cli, ["compare", *args, "--out", str(tmp_path / "o")])
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("text", "needles"), [
    ("nfe = [5,\n", ("--config", "not valid TOML")),
    ("nfee = [5]\n", ("--config", "unknown key 'nfee'", "nfe")),
    ("nfe = \"five\"\n", ("--config", "nfe", "list of integers")),
])
def test_a_bad_config_file_is_one_line(tmp_path, no_work, text, needles):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    assert_one_line_error(invoke("compare", "--config", str(cfg), "--out", str(tmp_path / "o")),
                          *needles)


def test_results_are_never_silently_overwritten(tmp_path):
    out = tmp_path / "o"
    args = ("compare", *FAST, "--solvers", "euler", "--nfe", "2", "--out", str(out))
    ok(invoke(*args))
    before = (out / "compare.json").read_bytes()
    assert_one_line_error(invoke(*args), "--out", "earlier compare", "--force")
    assert (out / "compare.json").read_bytes() == before
    ok(invoke(*args, "--seed", "1", "--force"))
    assert json.loads((out / "compare.json").read_text())["settings"]["seed"] == 1


def test_the_default_out_is_a_new_timestamped_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["compare", *FAST, "--solvers", "euler", "--nfe", "2"]
    for _ in range(2):
        ok(invoke(*args))
    runs = sorted((tmp_path / "solverlab-compare").iterdir())
    assert len(runs) == 2  # the second run did not replace the first
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d", runs[0].name), runs
    for run in runs:
        assert sorted(p.name for p in run.iterdir()) == sorted(compare.OUTPUT_NAMES)


def test_progress_is_off_when_stderr_is_not_a_terminal(tmp_path):
    result = CliRunner().invoke(cli, ["compare", *FAST, "--solvers", "euler", "--nfe", "2",
                                      "--out", str(tmp_path / "a")], catch_exceptions=False)
    assert "compare:" not in result.stderr  # no tqdm bar
    result = CliRunner().invoke(cli, ["compare", *FAST, "--solvers", "euler", "--nfe", "2",
                                      "--progress", "--out", str(tmp_path / "b")],
                                catch_exceptions=False)
    assert "compare:" in result.stderr


# -- order -----------------------------------------------------------------------------------
def test_order_warns_outside_the_asymptotic_range(tmp_path):
    result = CliRunner().invoke(cli, ["order", "heun", "--steps", "4,8,16", "--out",
                                      str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "not in the asymptotic range" in result.stderr
    assert "--steps 16,32,64,128" in result.stderr
    data = json.loads((tmp_path / "order-heun.json").read_text())
    assert data["asymptotic"] is False and data["warnings"]
    assert max(data["window_slopes"]) - min(data["window_slopes"]) > 0.2
    # the error is compare's, and the output says so
    assert data["error"].startswith(compare.ERROR_DEFINITION)
    assert "error: " + compare.ERROR_DEFINITION in result.stdout


def test_order_in_the_asymptotic_range_does_not_warn(tmp_path):
    result = CliRunner().invoke(cli, ["order", "heun", "--out", str(tmp_path), "--json"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Warning" not in result.stderr
    data = json.loads(result.stdout)
    assert data["asymptotic"] is True and data["warnings"] == []
    assert abs(data["fitted_order"] - 2) <= 0.2, data


def test_order_refuses_an_adaptive_solver_with_a_pointer_to_compare(tmp_path):
    assert_one_line_error(invoke("order", "dpm-adaptive", "--out", str(tmp_path)),
                          "adaptive", "solverlab compare --solvers dpm-adaptive --tolerances")


def test_plot_solvers_selects_what_the_figures_draw(tmp_path, monkeypatch):
    from solverlab import plotting

    drawn = {}
    real = plotting.compare_plot

    def spy(rows, solvers=None, **kwargs):
        drawn["solvers"] = solvers
        return real(rows, solvers, **kwargs)

    monkeypatch.setattr(plotting, "compare_plot", spy)
    ok(invoke("compare", "--solvers", "ddim,unipc", "--nfe", "5", "--samples", "4",
              "--out", str(tmp_path / "o"), "--plot-solvers", "unipc"))
    assert tuple(drawn["solvers"]) == ("unipc",)
    assert {r["solver"] for r in rows_of(tmp_path / "o")} == {"ddim", "unipc"}  # all rows kept
    assert (tmp_path / "o" / "compare-heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_solvers_outside_the_run_is_refused_before_any_work(tmp_path, no_work):
    assert_one_line_error(
        invoke("compare", "--solvers", "ddim", "--plot-solvers", "heun",
               "--out", str(tmp_path / "o")),
        "--plot-solvers", "'heun' not in this run")


def test_solvers_needing_model_statistics_are_prepared_from_an_analytic_model():
    # dpmv3 needs its EMS: compare computes them from the analytic model's data distribution.
    rows = compare.run_compare(solvers="dpmv3,dpmpp-3m", grids=["logsnr"], nfe=[10], samples=16)
    by = {r.solver: r for r in rows}
    assert by["dpmv3"].status == "ok" and by["dpmv3"].nfe == 10
    assert by["dpmv3"].error < 1.0


def test_given_statistics_are_used_not_recomputed(tmp_path):
    # An EMS for another model is the user's choice: compare uses it, so its mismatch is
    # reported, not silently replaced by statistics computed here.
    other = solverlab.get_model("gaussian", dim=2)
    ems = solverlab.compute_ems(other, other.data.sample(64), grid_size=4, samples=16,
                                progress=False)
    rows = compare.run_compare(solvers="dpmv3", grids=["logsnr"], nfe=[5], samples=4,
                               solver_options={"dpmv3": {"ems": ems}})
    assert rows[0].status.startswith("failed:") and "model" in rows[0].status
