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
