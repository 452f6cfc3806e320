"""Hostile and careless plugins, installed for real: fake distributions (a ``.dist-info`` with
``entry_points.txt`` plus a module) in a folder put first on ``sys.path`` of a fresh
``python -m solverlab`` process, so entry-point discovery sees them before the first-party
ones. First-party parts are never displaced, and nothing a plugin does ends the process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parent / "plugin_example"

SOLVER = '''
import attrs
import solverlab

def solver(name):
    return attrs.frozen(kw_only=True)(type(name, (solverlab.Solver,), {
        "name": name, "order": 1, "step": lambda self, state: state.advance(state.x)}))
'''

DISTRIBUTIONS = {
    # distribution: ({entry-point name: module}, {module: source})
    "evil-heun": ({"evil_heun": "evil_heun"}, {"evil_heun": SOLVER + '''
@solverlab.hookimpl
def solverlab_register_solvers(registry):
    registry.add(solver("heun"))
    registry.add(solver("evil-extra"))
'''}),
    "evil-name": ({"solverlab_classic": "evil_name", "solverlab_extras": "evil_name2",
                   "evilmod": "solverlab_evilmod"}, {
        name: SOLVER + f'''
@solverlab.hookimpl
def solverlab_register_solvers(registry):
    registry.add(solver("{name}-solver"))
''' for name in ("evil_name", "evil_name2", "solverlab_evilmod")}),
    "exit-import": ({"exit_import": "exit_import"}, {"exit_import": "import sys\nsys.exit(3)\n"}),
    "exit-hook": ({"exit_hook": "exit_hook"}, {"exit_hook": SOLVER + '''
@solverlab.hookimpl
def solverlab_register_solvers(registry):
    registry.add(solver("exit-hook-solver"))
    raise SystemExit("bye")
'''}),
    "base-exc": ({"base_exc": "base_exc"}, {"base_exc": SOLVER + '''
class Weird(BaseException):
    pass

@solverlab.hookimpl
def solverlab_register_grids(registry):
    raise Weird("not an Exception")
'''}),
    "misspelled": ({"misspelled": "misspelled"}, {"misspelled": SOLVER + '''
@solverlab.hookimpl
def solverlab_register_solver(registry):
    registry.add(solver("never-1"))

def solverlab_register_grids(registry):
    raise AssertionError("never called")

@solverlab.hookimpl
def solverlab_register_solvers(registry):
    registry.add(solver("misspelled-ok"))
'''}),
    # the example third-party plugin of tests/plugin_example, as `pip install` would add it
    "solverlab-toy-plugin": ({"toy_solverlab": "toy_solverlab"}, {}),
}


def make_distribution(root: Path, dist: str, eps: dict[str, str],
                      modules: dict[str, str]) -> None:
    info = root / f"{dist.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(
        "[solverlab]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))


def run(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(root), str(EXAMPLE), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("SOLVERLAB_BLOCK_PLUGINS", None)
    return subprocess.run([sys.executable, "-m", "solverlab", *args], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("site")
    for dist, (eps, modules) in DISTRIBUTIONS.items():
        make_distribution(root, dist, eps, modules)
    return root


@pytest.fixture(scope="module")
def listing(site) -> dict:
    proc = run(site, "list", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    data["solvers"] = {e["name"]: e for e in data["solvers"]}
    return data


def broken(listing, plugin, dist):
    return [b["error"] for b in listing["broken"]
            if (b["plugin"], b["distribution"]) == (plugin, dist)]


def test_a_third_party_heun_does_not_displace_the_first_party_one(listing):
    heun = listing["solvers"]["heun"]
    assert (heun["plugin"], heun["distribution"]) == ("solverlab_classic", "solverlab")
    assert heun["class"].startswith("solverlab_classic.")
    for name in ("euler", "rk4"):  # nothing else of the first-party plugin is withdrawn
        assert listing["solvers"][name]["plugin"] == "solverlab_classic"
    (error,) = broken(listing, "evil_heun", "evil-heun")
    assert error.startswith("DuplicateNameError: solver 'heun'")
    assert "'solverlab_classic' (distribution 'solverlab')" in error
    assert "'evil_heun' (distribution 'evil-heun')" in error
    # the clash refuses only the clashing part
    assert listing["solvers"]["evil-extra"]["plugin"] == "evil_heun"


def test_entry_points_taking_first_party_names_or_the_reserved_prefix_are_refused(listing):
    (taken,) = broken(listing, "solverlab_classic", "evil-name")
    assert "already taken by plugin 'solverlab_classic' (distribution 'solverlab')" in taken
    (prefix,) = broken(listing, "solverlab_extras", "evil-name")
    assert "entry-point name 'solverlab_extras'" in prefix and "reserved" in prefix
    (module,) = broken(listing, "evilmod", "evil-name")
    assert "module 'solverlab_evilmod'" in module and "reserved" in module
    for name in ("evil_name-solver", "evil_name2-solver", "solverlab_evilmod-solver"):
        assert name not in listing["solvers"]


def test_a_plugin_exiting_at_import_or_in_a_hook_is_reported(listing):
    (at_import,) = broken(listing, "exit_import", "exit-import")
    assert at_import.startswith("SystemExit: the plugin called sys.exit(3)")
    (in_hook,) = broken(listing, "exit_hook", "exit-hook")
    assert in_hook.startswith("SystemExit: the plugin called sys.exit('bye')")
    assert "exit-hook-solver" not in listing["solvers"]  # a failed plugin is withdrawn
    (weird,) = broken(listing, "base_exc", "base-exc")
    assert weird == "Weird: not an Exception"


def test_hook_functions_that_are_never_called_are_reported(listing):
    errors = broken(listing, "misspelled", "misspelled")
    assert len(errors) == 2
    unknown, unmarked = sorted(errors, key=lambda e: "not marked" in e)
    assert "'solverlab_register_solver' matches no hook specification" in unknown
    assert "did you mean 'solverlab_register_solvers'" in unknown
    assert "'solverlab_register_grids' is not marked @solverlab.hookimpl" in unmarked
    assert listing["solvers"]["misspelled-ok"]["plugin"] == "misspelled"
    assert "never-1" not in listing["solvers"]


def test_the_example_third_party_plugin_is_not_refused(listing):
    toy = listing["solvers"]["toy-midpoint"]
    assert (toy["plugin"], toy["distribution"]) == ("toy_solverlab", "solverlab-toy-plugin")
    assert broken(listing, "toy_solverlab", "solverlab-toy-plugin") == []


def test_help_survives_every_hostile_plugin(site):
    proc = run(site, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "compare" in proc.stdout and "list" in proc.stdout
