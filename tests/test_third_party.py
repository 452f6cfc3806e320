"""The example third-party plugin (tests/plugin_example), installed by tox env `plugins`, is
discovered through the `solverlab` entry-point group and passes the conformance kit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import solverlab
from solverlab.testing import check_solver

pytestmark = pytest.mark.thirdparty


def test_toy_plugin_is_discovered_through_entry_points():
    entry = solverlab.get_registry().entry("solver", "toy-midpoint")
    assert entry.plugin == "toy_solverlab"
    assert entry.distribution == "solverlab-toy-plugin"
    assert solverlab.get_solver("toy-midpoint").order == 2


def test_solverlab_list_shows_the_toy_plugin_with_its_distribution():
    out = subprocess.run(
        [sys.executable, "-m", "solverlab", "list", "--json"],
        check=True, capture_output=True, text=True,
    ).stdout
    solvers = {e["name"]: e for e in json.loads(out)["solvers"]}
    assert solvers["toy-midpoint"]["plugin"] == "toy_solverlab"
    assert solvers["toy-midpoint"]["distribution"] == "solverlab-toy-plugin"
    # first-party plugins come through the same entry-point group
    assert solvers["heun"]["plugin"] == "solverlab_classic"


def test_toy_solver_passes_the_conformance_kit():
    report = check_solver("toy-midpoint")
    assert abs(report.order - 2) <= 0.3


def test_toy_exponential_integrator_passes_the_kit_and_is_dpmpp_2m_taylor():
    # Built from solverlab_expint's public API alone: the exponential Adams-Bashforth 2 on the
    # data prediction is DPM-Solver++(2M) in its Taylor form (same interpolant, exact weights).
    report = check_solver("toy-exp-ab2")
    assert abs(report.order - 2) <= 0.3
    model = solverlab.get_model("gaussian-mixture")
    x = model.sample_prior(8, generator=torch.Generator().manual_seed(0))
    grid = solverlab.get_grid("logsnr")(model.schedule, 12)
    ours = solverlab.get_solver("toy-exp-ab2").solve(model, x, grid).x
    ref = solverlab.get_solver("dpmpp-2m", solver_type="taylor").solve(model, x, grid).x
    assert float((ours - ref).abs().max()) <= 1e-12 * float(ref.abs().max())
