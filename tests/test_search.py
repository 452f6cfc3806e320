"""Searched time grids (solverlab.search): better than the start grid on held-out start states,
usable as a custom grid and by compare, honest about what they were fitted to."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import solverlab
from solverlab import compare
from solverlab.cli import cli
from solverlab.errors import InputError, OptionError, SolverlabError
from solverlab.search import SearchedGrid, noise_digests, search_grid

F64 = torch.float64
SMALL = {"noises": 32, "held_out": 32}  # 2-D mixture, dpmpp-2m, 5 steps: the small problem


@pytest.fixture(scope="module")
def model():
    return solverlab.get_model("gaussian-mixture")


@pytest.fixture(scope="module")
def found(model):
    return search_grid("dpmpp-2m", model, 5, **SMALL, method="gradient")


@pytest.fixture(scope="module")
def saved(found, tmp_path_factory):
    path = tmp_path_factory.mktemp("searched") / "grid.json"
    found.save(path)
    return path


def _held_out(model, train=32, held=32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    model.sample_prior(train, generator=gen)
    return model.sample_prior(held, generator=gen)


# -- the search ------------------------------------------------------------------------------
def test_gradient_search_beats_logsnr_on_held_out_start_states(found):
    # Measured: held-out error 0.246 -> 0.097 (-61%), training 0.172 -> 0.076.
    assert found.start == "logsnr" and found.method == "gradient"
    assert found.held_out_error <= 0.7 * found.held_out_error_start
    assert found.train_error < found.train_error_start
    assert found.improved and found.seed == 1 and found.evaluations == 101


def test_derivative_free_search_beats_logsnr_too(model):
    # Measured: held-out error 0.246 -> 0.093 (-62%) with Nelder-Mead.
    r = search_grid("dpmpp-2m", model, 5, **SMALL, method="derivative-free", iterations=150)
    assert r.held_out_error <= 0.7 * r.held_out_error_start
    assert r.evaluations <= 150 + 4  # a shrink step may finish past the budget


def test_times_are_a_valid_custom_grid_with_fixed_ends(found, model):
    t = torch.tensor(found.times, dtype=F64)
    assert t.numel() == 6 and bool((t[1:] < t[:-1]).all())
    sch = model.schedule
    assert found.times[0] == sch.t_max and found.times[-1] == sch.t_min
    assert found.start_times == tuple(solverlab.get_grid("logsnr")(sch, 5).tolist())
    grid = solverlab.get_grid("custom", times=found.times)(sch)
    assert torch.equal(grid, t)
    # the recorded held-out error is the error of these times on those start states
    x = _held_out(model)
    ref = solverlab.reference.reference_solution(model, x, sch.t_max, sch.t_min)
    out = solverlab.get_solver("dpmpp-2m").solve(model, x, found.grid()(sch)).x
    assert compare.relative_rms_error(out, ref) == pytest.approx(found.held_out_error, rel=1e-9)


def test_never_worse_than_the_start_grid_on_the_held_out_batch(model):
    # One huge Adam step throws the grid far off: no iterate but the start beats it there,
    # so the start grid itself comes back.
    r = search_grid("dpmpp-2m", model, 5, **SMALL, iterations=1, learning_rate=50.0)
    assert not r.improved
    assert r.times == r.start_times
    assert r.held_out_error == r.held_out_error_start
    assert r.train_error == r.train_error_start
    assert max(h for _, _, h in r.trace) > 1.3 * r.held_out_error_start  # the jump: 0.349/0.246


def test_given_noises_split_in_half_when_no_held_out_batch(model):
    x = model.sample_prior(20, generator=torch.Generator().manual_seed(9))
    r = search_grid("dpmpp-2m", model, 3, noises=x, held_out=None, iterations=5)
    assert (r.train_samples, r.held_out_samples, r.seed) == (10, 10, None)
    assert r.noise_digests == noise_digests(x)
    assert r.held_out_error <= r.held_out_error_start


@pytest.mark.parametrize("method", ["gradient", "derivative-free"])
def test_search_on_a_network_with_given_start_states(method):
    # A real network (trainable parameters) without sample_prior: the start states are given.
    # Measured: held-out 0.041 -> 0.015 (gradient), 0.011 (derivative-free).
    from solverlab.testing import TimeMLP

    net = solverlab.TorchModel(TimeMLP(2, hidden=16, seed=3).double(), "vp-linear", "noise")
    gen = torch.Generator().manual_seed(5)
    x, xh = (torch.randn(32, 2, generator=gen, dtype=F64) for _ in range(2))
    r = search_grid("dpmpp-2m", net, 4, noises=x, held_out=xh, method=method, iterations=30)
    assert r.held_out_error <= 0.5 * r.held_out_error_start
    assert r.fingerprint == solverlab.ems.model_fingerprint(net) and r.seed is None
    assert all(p.grad is None for p in net.module.parameters())


def test_one_step_has_nothing_to_search(model):
    r = search_grid("unipc", model, 1, noises=8, held_out=8)
    assert r.times == (model.schedule.t_max, model.schedule.t_min) and not r.improved


def test_references_are_computed_once_per_batch(model, monkeypatch):
    from solverlab import reference

    calls = []
    real = reference.reference_solution

    def counting(*a, **k):
        calls.append(a[1].shape[0])
        return real(*a, **k)

    monkeypatch.setattr(reference, "reference_solution", counting)
    kw = {"noises": 12, "held_out": 8, "seed": 77, "iterations": 2}
    search_grid("dpmpp-2m", model, 4, **kw)
    assert calls == [12, 8]
    search_grid("unipc", model, 4, **kw, method="derivative-free")
    assert calls == [12, 8]  # cached: same model, schedule, ends and start states


def test_save_and_load_round_trip(found, saved):
    loaded = SearchedGrid.load(saved)
    assert loaded == found
    d = json.loads(saved.read_text())
    assert d["format"] == "solverlab-searched-grid" and d["improved"] is True
    assert d["solver"] == "dpmpp-2m" and d["solver_options"]["lower_order_final"] is not None
    assert d["fingerprint"] == solverlab.ems.model_fingerprint(solverlab.get_model(
        "gaussian-mixture"))
    assert d["schedule"] == "vp-linear" and d["schedule_parameters"]["beta_max"] == 20.0
    assert (d["steps"], d["start"], d["method"], d["seed"], d["evaluation_seed"]) == (
        5, "logsnr", "gradient", 1, 0)


def test_load_refuses_foreign_and_broken_files(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"format": "other"}')
    with pytest.raises(InputError, match="is not a 'solverlab-searched-grid' file"):
        SearchedGrid.load(bad)
    bad.write_text("{not json")
    with pytest.raises(InputError, match="is not JSON"):
        SearchedGrid.load(bad)
    with pytest.raises(InputError, match="cannot read it"):
        SearchedGrid.load(tmp_path / "missing.json")


# -- compare with searched:FILE ----------------------------------------------------------------
def test_compare_runs_a_searched_grid_for_its_solver_only(saved, found, model):
    res = compare.run_compare(solvers=["dpmpp-2m", "unipc"], grids=["logsnr", f"searched:{saved}"],
                              nfe=[5], samples=64, seed=0)
    rows = {(r.solver, r.grid): r for r in res}
    mine = rows[("dpmpp-2m", f"searched:{saved}")]
    assert mine.status == "ok" and mine.steps == 5 and mine.nfe == 5 and mine.nfe_budget is None
    # the same solve by hand on compare's start states
    x = compare.evaluation_noises(model, 64, 0)
    sch = model.schedule
    ref = solverlab.reference.reference_solution(model, x, sch.t_max, sch.t_min)
    out = solverlab.get_solver("dpmpp-2m").solve(model, x, found.grid()(sch)).x
    assert mine.error == pytest.approx(compare.relative_rms_error(out, ref), rel=1e-6)
    # measured on compare's batch, which the search never saw: 0.205 -> 0.140
    assert mine.error < 0.85 * rows[("dpmpp-2m", "logsnr")].error
    other = rows[("unipc", f"searched:{saved}")]
    assert other.status.startswith("skipped") and "'dpmpp-2m'" in other.status
    assert other.error is None


def test_compare_skips_the_same_solver_with_other_options(saved):
    res = compare.run_compare(solvers=["dpmpp-2m"], grids=[f"searched:{saved}"], nfe=[5],
                              samples=8, solver_options={"dpmpp-2m": {"lower_order_final": False}})
    (row,) = res
    assert row.status.startswith("skipped") and "lower_order_final" in row.status


@pytest.mark.parametrize(("options", "field"), [
    ({"seed": 3}, "model fingerprint"),
    ({"schedule": "vp-cosine"}, "schedule"),
])
def test_compare_refuses_a_grid_searched_on_another_model(saved, found, options, field):
    with pytest.raises(OptionError, match=field) as e:
        compare.run_compare(solvers=["dpmpp-2m"], grids=[f"searched:{saved}"], nfe=[5],
                            samples=8, model_options=options)
    assert e.value.option == "grids"
    if field == "model fingerprint":  # both values named
        other = solverlab.ems.model_fingerprint(solverlab.get_model("gaussian-mixture", seed=3))
        assert found.fingerprint in str(e.value) and other in str(e.value)
    else:
        assert "'vp-linear'" in str(e.value) and "'vp-cosine'" in str(e.value)


def test_compare_names_a_missing_or_empty_searched_file(tmp_path):
    with pytest.raises(OptionError, match="names no file"):
        compare.run_compare(solvers=["dpmpp-2m"], grids=["searched:"], nfe=[5], samples=8)
    with pytest.raises(InputError, match="cannot read it"):
        compare.run_compare(solvers=["dpmpp-2m"], grids=[f"searched:{tmp_path / 'no.json'}"],
                            nfe=[5], samples=8)


# -- no test-set tuning ------------------------------------------------------------------------
def test_search_refuses_compares_evaluation_batch(model):
    ev = compare.evaluation_noises(model, compare.DEFAULT_SAMPLES, 0)
    with pytest.raises(OptionError, match=r"compare's evaluation batch \(seed 0"):
        search_grid("dpmpp-2m", model, 5, noises=ev, held_out=16)
    with pytest.raises(OptionError, match="training: 16 of 16 rows"):  # a slice, float32
        search_grid("dpmpp-2m", model, 5, noises=ev[:16].float(), held_out=16)
    with pytest.raises(OptionError, match="held-out"):
        search_grid("dpmpp-2m", model, 5, noises=16, held_out=ev[100:140])
    small = compare.evaluation_noises(model, 40, 5)  # compare --samples 40 --seed 5
    with pytest.raises(OptionError, match=r"\(seed 5, \d+ samples\)"):
        search_grid("dpmpp-2m", model, 5, noises=small, held_out=None, evaluation_seed=5)


def test_search_refuses_to_draw_with_compares_seed(model):
    with pytest.raises(OptionError, match="seed=0 is compare's evaluation seed"):
        search_grid("dpmpp-2m", model, 5, noises=16, held_out=16, seed=0)
    with pytest.raises(OptionError, match="seed=4 is compare's evaluation seed"):
        search_grid("dpmpp-2m", model, 5, noises=16, held_out=16, seed=4, evaluation_seed=4)


def test_compare_refuses_a_grid_trained_on_its_seed_or_its_start_states(model, tmp_path):
    r = search_grid("dpmpp-2m", model, 3, noises=8, held_out=8, seed=3, iterations=2)
    path = r.save(tmp_path / "seed3.json")
    with pytest.raises(OptionError, match="drawn with seed 3, which is this run's evaluation"):
        compare.run_compare(solvers=["dpmpp-2m"], grids=[f"searched:{path}"], nfe=[5],
                            samples=8, seed=3)
    # given start states: the file has no seed, but the digests of its rows give it away
    stolen = compare.evaluation_noises(model, 24, 7)
    r = search_grid("dpmpp-2m", model, 3, noises=stolen, held_out=None, iterations=2)
    assert r.seed is None
    path = r.save(tmp_path / "stolen.json")
    with pytest.raises(OptionError, match="searched on 24 of this run's 24 start states"):
        compare.run_compare(solvers=["dpmpp-2m"], grids=[f"searched:{path}"], nfe=[5],
                            samples=24, seed=7)


# -- bad options -------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"steps": 0}, "steps=0"),
    ({"steps": 2.5}, "steps=2.5"),
    ({"method": "bisection"}, "method='bisection' is not allowed; choose one of 'gradient'"),
    ({"noises": torch.zeros(4, 3, dtype=F64)}, r"noises has shape \(4, 3\); the model's start "
                                               r"states have shape \(batch, 2\)"),
    ({"noises": torch.zeros(4, 2, dtype=F64), "held_out": torch.zeros(4, 5, dtype=F64)},
     "held_out has shape"),
    ({"noises": torch.zeros(4, 2, dtype=torch.long)}, "floating-point tensor"),
    ({"noises": torch.full((4, 2), float("nan"), dtype=F64)}, "NaN"),
    ({"noises": 0}, "noises=0"),
    ({"noises": torch.zeros(1, 2, dtype=F64), "held_out": None}, "at least 2 rows"),
    ({"iterations": 0}, "iterations=0"),
    ({"learning_rate": -1.0}, "learning_rate=-1.0"),
    ({"start": "custom"}, "start='custom' holds no times"),
    ({"start": [1.0, 0.5, 0.001]}, "start holds 3 times"),
    ({"seed": -1}, "seed=-1"),
])
def test_bad_options_are_refused_before_any_solve(model, kwargs, match, monkeypatch):
    from solverlab import reference

    def boom(*a, **k):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(reference, "reference_solution", boom)
    kwargs = {"steps": 5, **kwargs}
    with pytest.raises(OptionError, match=match):
        search_grid("dpmpp-2m", model, **kwargs)


def test_unknown_and_adaptive_solvers_are_refused(model):
    with pytest.raises(SolverlabError, match="dpmpp-2m"):
        search_grid("dpmpp-2n", model, 5)
    with pytest.raises(OptionError, match="adaptive"):
        search_grid("dpm-adaptive", model, 5)


# -- the command line ------------------------------------------------------------------------
def _invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_cli_grid_search_then_compare(tmp_path):
    out = tmp_path / "g.json"
    res = _invoke("grid-search", "unipc", "--steps", "4", "--samples", "16", "--held-out", "16",
                  "--iterations", "20", "--seed", "2", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "held-out" in res.output and f"searched:{out}" in res.output
    r = SearchedGrid.load(out)
    assert (r.solver, r.steps, r.seed, r.train_samples, r.held_out_samples) == (
        "unipc", 4, 2, 16, 16)
    assert r.held_out_error <= r.held_out_error_start
    res = _invoke("compare", "--solvers", "unipc", "--grids", f"logsnr,searched:{out}", "--nfe",
                  "4", "--samples", "16", "--out", str(tmp_path / "cmp"))
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]
    assert [r["status"] for r in rows if r["grid"] == f"searched:{out}"] == ["ok"]
    # an existing file is kept unless --force
    res = _invoke("grid-search", "unipc", "--steps", "4", "--out", str(out))
    assert res.exit_code == 2 and "exists" in res.output


@pytest.mark.parametrize(("args", "needle"), [
    (("--method", "bisection"), "method='bisection'"),
    (("--seed", "0"), "seed=0 is compare's evaluation seed"),
    (("--steps", "0"), "steps=0"),
    (("--model-option", "dim=3", "--model-option", "nonsense=1"), "nonsense"),
])
def test_cli_errors_are_one_line(tmp_path, args, needle):
    res = _invoke("grid-search", "dpmpp-2m", "--out", str(tmp_path / "g.json"), *args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], res.output
