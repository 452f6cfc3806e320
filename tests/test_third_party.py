"""The example third-party plugin (tests/plugin_example), installed by tox env `plugins`, is
discovered through the `solverlab` entry-point group and passes the conformance kit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
