"""Edges of the public API: seeds, boolean options, empty batches, devices without data."""

from __future__ import annotations

import subprocess
import sys

import pytest

import solverlab
from solverlab.compare import run_compare


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True, "0"])
def test_compare_refuses_seeds_outside_64_bits(seed):
    with pytest.raises(solverlab.OptionError, match=rf"seed={seed!r} .* 0\.\.{2**64 - 1}"):
        run_compare(seed=seed)


def test_cli_refuses_seeds_outside_64_bits():
    out = subprocess.run([sys.executable, "-m", "solverlab", "compare", "--seed", str(2**64)],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "--seed" in out.stderr and str(2**64 - 1) in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("value", ["no", "yes", 1, 0, None])
def test_denoiser_thresholding_refuses_non_booleans(value):
    model = solverlab.get_model("gaussian")
    with pytest.raises(solverlab.OptionError, match=rf"thresholding={value!r} .* True or False"):
        solverlab.Denoiser(model, thresholding=value)


@pytest.mark.parametrize("name", ["gaussian", "gaussian-mixture"])
def test_analytic_models_and_the_reference_take_an_empty_batch(name):
    import torch

    from solverlab.reference import reference_solution

    model = solverlab.get_model(name)
    empty = torch.zeros(0, 2, dtype=torch.float64)
    assert model(empty, torch.full((0,), 0.5, dtype=torch.float64)).shape == (0, 2)
    assert model.sample_prior(0).shape == (0, 2)
    for exact in (True, False):
        assert reference_solution(model, empty, 1.0, 0.5, use_exact=exact).shape == (0, 2)


@pytest.mark.parametrize("name", solverlab.get_registry().names("solver"))
def test_every_solver_refuses_an_empty_batch_and_a_meta_tensor_clearly(name):
    import torch

    model = solverlab.get_model("gaussian-mixture")
    grid = solverlab.get_grid("logsnr")(model.schedule, 3)
    solver = solverlab.get_solver(name)
    with pytest.raises(solverlab.InputError, match=r"shape \(0, 2\) holds an empty batch"):
        solver.solve(model, torch.zeros(0, 2, dtype=torch.float64), grid)
    with pytest.raises(solverlab.InputError, match="device 'meta'"):
        solver.solve(model, torch.zeros(3, 2, device="meta"), grid)
