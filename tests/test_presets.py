"""Presets (``solverlab.presets`` and the ``preset`` solver of plugin ``solverlab_presets``):
every budget 5..20 has a valid configuration that spends exactly that many evaluations, the
table is the one ``bench/frontier.py`` chose (``bench/frontier.json``), the preset solver runs
that configuration bit for bit and reproduces the benchmark's number, and bad options fail
with the option named."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import solverlab
from solverlab import GridError, OptionError, presets
from solverlab.analytic import AnalyticModel, GaussianMixtureData
from solverlab.compare import budget_steps
from solverlab.model import TorchModel
from solverlab.reference import reference_solution
from solverlab.schedule import VPDiscrete
from solverlab.testing import CountingModel, TimeMLP, check_determinism, check_dtypes, check_shapes
from solverlab_presets import Preset

F64 = torch.float64
BENCH = Path(__file__).resolve().parents[1] / "bench" / "frontier.json"
NFES = list(presets.NFE_RANGE)


def _mixture(seed: int = 0, var_min: float = 1e-2, var_max: float = 0.25) -> AnalyticModel:
    data = GaussianMixtureData.random(16, 6, seed=seed, var_min=var_min, var_max=var_max)
    return AnalyticModel(data=data, schedule=VPDiscrete())


def _bench() -> dict:
    return json.loads(BENCH.read_text())


def _median_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.to(F64) - ref).pow(2).mean(dim=1).sqrt().median())


# -- the table ---------------------------------------------------------------------------------
@pytest.mark.parametrize("data_free", [False, True])
@pytest.mark.parametrize("nfe", NFES)
def test_every_budget_has_a_configuration_that_spends_exactly_it(nfe, data_free):
    cfg = presets.best(nfe, data_free=data_free)
    assert cfg.nfe == nfe and cfg.steps >= 1 and cfg.source.startswith("bench/frontier")
    assert not (data_free and cfg.needs_data)
    plain = solverlab.get_solver(cfg.solver, **cfg.options)  # a valid configuration
    assert plain.expected_nfe(cfg.steps) == nfe
    grid = cfg.grid_for(VPDiscrete())
    assert grid.numel() == cfg.steps + 1 and bool((grid[1:] < grid[:-1]).all())


def test_the_table_is_the_benchmarks_choice():
    bench = _bench()["presets"]
    for key, table in (("table", presets.TABLE), ("data_free", presets.DATA_FREE)):
        assert sorted(int(n) for n in bench[key]) == NFES
        for n, entry in bench[key].items():
            cfg = table[int(n)]
            mine = {k: v for k, v in cfg.as_dict().items() if k != "source"}
            theirs = {k: entry[k] for k in mine}
            assert mine == theirs, (n, mine, theirs)
    any_grid = _bench()["any_grid"]
    assert (presets.ANY_GRID.solver, presets.ANY_GRID.options) == (
        any_grid["solver"], any_grid["options"])


@pytest.mark.parametrize("bad", [4, 21, 0, -5, 10.0, True, "10", None])
def test_a_budget_outside_the_table_is_an_option_error(bad):
    with pytest.raises(OptionError, match=r"nfe=.*5\.\.20"):
        presets.best(bad)
    if bad is not None:
        with pytest.raises(OptionError, match=r"option nfe=.*5\.\.20"):
            solverlab.get_solver("preset", nfe=bad)


# -- the solver --------------------------------------------------------------------------------
def test_registered_by_the_plugin_and_declares_its_default_order():
    entry = solverlab.get_registry().entry("solver", "preset")
    assert entry.plugin == "solverlab_presets" and entry.cls is Preset
    default = solverlab.get_solver("preset")
    any_grid = solverlab.get_solver(presets.ANY_GRID.solver, **presets.ANY_GRID.options)
    assert Preset.order == default.convergence_order == any_grid.convergence_order
    assert not presets.ANY_GRID.needs_data


def test_data_free_preset_reproduces_the_benchmark_number():
    """The narrow problem of bench/frontier.py, its 256 start states and reference: the
    data-free preset's error at NFE 10 is the one the benchmark recorded."""
    model = _mixture()
    x = model.sample_prior(256, t=1.0, generator=torch.Generator().manual_seed(0), dtype=F64)
    ref = reference_solution(model, x, 1.0, model.schedule.t_min)
    entry = _bench()["presets"]["data_free"]["10"]
    solver = solverlab.get_solver("preset", nfe=10, data_free=True)
    grid = solverlab.get_grid("time-uniform")(model.schedule, solver.configuration.steps)
    sol = solver.solve(model, x, grid, progress=False)
    assert sol.nfe == 10
    assert _median_rms(sol.x, ref) == pytest.approx(entry["errors"]["narrow"], rel=1e-12)


@pytest.mark.parametrize("nfe", [5, 8])
def test_the_preset_is_its_configuration_bit_for_bit(nfe):
    """With data: the preset solver and the configuration built by hand (same data, same EMS
    settings) give the same result on the configuration's own grid, at exactly ``nfe``."""
    model = _mixture(seed=1, var_min=5e-2, var_max=0.5)
    train = model.data.sample(128, generator=torch.Generator().manual_seed(1))
    x = model.sample_prior(16, t=1.0, generator=torch.Generator().manual_seed(0), dtype=F64)
    cfg = presets.best(nfe)
    counter = CountingModel(model)
    # EMS (if any) are computed once per model when the preset is prepared; they cost model
    # evaluations of their own, which are not the solve's NFE.
    preset = solverlab.get_solver("preset", nfe=nfe).prepare(counter, train)
    counter.calls = 0
    grid = solverlab.get_grid("logsnr")(model.schedule, cfg.steps)  # spacing is replaced
    sol = preset.solve(counter, x, grid, progress=False)
    assert sol.nfe == counter.calls == nfe == preset.expected_nfe(cfg.steps)
    built = preset.solver_for(counter)
    ems = getattr(getattr(built, "inner_solver", built), "ems", None)  # the same statistics
    direct = cfg.build(data=train, model=model, ems=ems).solve(
        model, x, cfg.grid_for(model.schedule), progress=False)
    assert torch.equal(sol.x, direct.x)
    if cfg.solver != "teleport" or cfg.options.get("skip", 0.0) == 0.0:
        assert torch.equal(sol.times, cfg.grid_for(model.schedule))


def test_grid_ends_are_kept_and_its_step_count_must_match():
    model = _mixture()
    cfg = presets.best(6, data_free=True)
    preset = solverlab.get_solver("preset", nfe=6, data_free=True)
    sch = model.schedule
    sub = solverlab.get_grid("time-uniform")(sch, cfg.steps, t_start=0.8, t_end=0.01)
    if cfg.grid in ("linspace", "leading", "trailing"):
        with pytest.raises(OptionError, match="whole range"):
            preset.place(sch, sub)
    else:
        placed = preset.place(sch, sub)
        assert float(placed[0]) == 0.8 and float(placed[-1]) == 0.01
        assert torch.equal(placed, cfg.grid_for(sch, t_start=0.8, t_end=0.01))
    wrong = solverlab.get_grid("time-uniform")(sch, cfg.steps + 1)
    x = model.sample_prior(4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(GridError, match=f"runs {cfg.steps} steps"):
        preset.solve(model, x, wrong, progress=False)
    with pytest.raises(OptionError, match=f"runs {cfg.steps} steps"):
        preset.expected_nfe(cfg.steps + 1)
    # compare's budget search finds exactly the preset's step count
    assert budget_steps(preset, 6) == (cfg.steps, "")


def test_a_preset_that_needs_data_says_so_and_prepare_gives_it():
    nfe = next((n for n in NFES if presets.best(n).needs_data), None)
    if nfe is None:
        pytest.skip("no preset needs data")
    model = _mixture()
    x = model.sample_prior(4, generator=torch.Generator().manual_seed(0))
    preset = solverlab.get_solver("preset", nfe=nfe)
    grid = presets.best(nfe).grid_for(model.schedule)
    with pytest.raises(OptionError, match="needs training data"):
        preset.solve(model, x, grid, progress=False)
    train = model.data.sample(128, generator=torch.Generator().manual_seed(1))
    prepared = preset.prepare(model, train)
    assert torch.equal(prepared.data, train) and preset.data is None
    sol = prepared.solve(model, x, grid, progress=False)
    assert sol.nfe == nfe and bool(torch.isfinite(sol.x).all())
    # the caller's data are never replaced
    own = solverlab.get_solver("preset", nfe=nfe, data=train[:64])
    assert own.prepare(model, train).data.shape[0] == 64


@pytest.mark.parametrize("bad", [torch.zeros(5), torch.zeros(1, 4), [[0.0, 1.0]], "x"])
def test_bad_data_is_an_option_error(bad):
    with pytest.raises(OptionError, match="option data="):
        solverlab.get_solver("preset", nfe=10, data=bad)


def test_default_preset_keeps_the_grid_and_passes_the_kits_light_checks():
    preset = solverlab.get_solver("preset")
    model = _mixture()
    x = model.sample_prior(8, generator=torch.Generator().manual_seed(0))
    grid = solverlab.get_grid("karras")(model.schedule, 7)
    counter = CountingModel(model)
    sol = preset.solve(counter, x, grid, progress=False)
    assert torch.equal(sol.times, grid) and sol.nfe == counter.calls == preset.expected_nfe(7)
    same = solverlab.get_solver(presets.ANY_GRID.solver, **presets.ANY_GRID.options).solve(
        model, x, grid, progress=False)
    assert torch.equal(sol.x, same.x)
    for check in (check_shapes, check_dtypes, check_determinism):
        check(preset)


def test_a_data_free_preset_runs_a_real_network():
    net = TorchModel(TimeMLP(6).to(F64), "vp-discrete", "noise")
    preset = solverlab.get_solver("preset", nfe=8, data_free=True)
    cfg = preset.configuration
    counter = CountingModel(net)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=F64)
    sol = preset.solve(counter, x, cfg.grid_for(net.schedule), progress=False)
    assert sol.nfe == counter.calls == 8 and bool(torch.isfinite(sol.x).all())
    assert not sol.x.requires_grad
    assert math.isfinite(float(sol.x.abs().sum()))


def test_a_diffusers_spacing_on_a_continuous_schedule_names_the_preset():
    """The presets chosen with diffusers' integer spacings (on vp-discrete) cannot place their
    steps on a continuous schedule: the error names the preset and the ways out."""
    spaced = [n for n in NFES if presets.best(n).grid in ("linspace", "leading", "trailing")]
    if not spaced:
        pytest.skip("no preset uses a diffusers spacing")
    cfg = presets.best(spaced[0])
    continuous = solverlab.get_model("gaussian-mixture").schedule  # vp-linear
    with pytest.raises(OptionError, match=r"preset .* cannot place its steps on schedule "
                                          r"'vp-linear'.*measured on 'vp-discrete'"):
        cfg.grid_for(continuous)
    assert cfg.grid_for(_mixture().schedule).numel() == cfg.steps + 1  # vp-discrete: fine
