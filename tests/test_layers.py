"""Layers of the core: no import circle (deferred imports included), models resolve names
without the registry, and importing :mod:`solverlab._io` changes no process state."""

from __future__ import annotations

import ast
import importlib
import os
from pathlib import Path

import pytest
import torch

import solverlab
from solverlab import registry as registry_mod
from solverlab.analytic import GaussianModel
from solverlab.errors import OptionError
from solverlab.model import TorchModel
from solverlab.parameterization import PARAMETERIZATIONS, Velocity
from solverlab.schedule import SCHEDULES, VPCosine, VPLinear

PACKAGE = Path(solverlab.__file__).parent


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def import_graph() -> dict[str, set[str]]:
    """``module -> core modules it imports``, at any depth of the module (deferred imports in
    functions count; ``if TYPE_CHECKING:`` blocks do not)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        package = name.split(".") if is_pkg else name.split(".")[:-1]
        found: set[str] = set()
        stack: list[ast.AST] = [ast.parse(path.read_text(), str(path))]
        while stack:
            node = stack.pop()
            if _is_type_checking(node):
                continue
            stack.extend(ast.iter_child_nodes(node))
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                for a in node.names:  # `from . import x` imports the module x
                    sub = f"{module}.{a.name}"
                    found.add(sub if sub in mods else module)
        graph[name] = {m for m in found if m in mods and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph``: its strongly connected components of two or more."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_circle_through_a_deferred_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_core_has_no_import_circle():
    graph = import_graph()
    assert {"solverlab.model", "solverlab.registry", "solverlab._io"} <= set(graph)
    assert "solverlab.builtins" in graph["solverlab.registry"]  # deferred imports are seen
    assert cycles(graph) == []


def test_the_core_does_not_import_plugins():
    for name, (path, _) in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                    node.module or ""]
                assert not any(n.startswith("solverlab_") for n in names), (name, names)


def test_models_do_not_import_the_registry():
    graph = import_graph()
    for low in ("solverlab.model", "solverlab.analytic", "solverlab.schedule",
                "solverlab.parameterization", "solverlab._io"):
        assert "solverlab.registry" not in graph[low], low


@pytest.fixture
def no_registry(monkeypatch):
    """Building the registry (and so the plugin manager) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the registry was built")

    monkeypatch.setattr(registry_mod.Registry, "load", classmethod(refuse))
    registry_mod.reset_registry()
    yield
    registry_mod.reset_registry()


def test_torchmodel_with_core_names_does_not_build_the_plugin_manager(no_registry):
    m = TorchModel(torch.nn.Identity(), "vp-linear")
    assert isinstance(m.schedule, VPLinear) and m.parameterization.name == "noise"
    m = TorchModel(torch.nn.Identity(), "vp-cosine", "velocity")
    assert isinstance(m.schedule, VPCosine) and isinstance(m.parameterization, Velocity)
    assert isinstance(GaussianModel(schedule="ve").schedule, SCHEDULES["ve"])
    assert registry_mod._REGISTRY is None


def test_the_core_name_tables_are_what_the_core_plugin_registers():
    reg = registry_mod.Registry.load(eps=[], blocked=[])
    assert {n: reg.entry("schedule", n).cls for n in reg.names("schedule")} == dict(SCHEDULES)
    assert ({n: reg.entry("parameterization", n).cls for n in reg.names("parameterization")}
            == dict(PARAMETERIZATIONS))


@pytest.mark.parametrize("kind, value, hint", [
    ("schedule", "my-plugin-schedule", "solverlab.get_schedule('my-plugin-schedule')"),
    ("schedule", "vp-linaer", "did you mean 'vp-linear'"),
    ("parameterization", "epsilon", "solverlab.get_parameterization('epsilon')"),
    ("schedule", 3, "'vp-linear', 'vp-cosine'"),
])
def test_a_name_that_is_not_core_is_refused_with_the_lookup_to_use(no_registry, kind, value,
                                                                    hint):
    with pytest.raises(OptionError) as e:
        TorchModel(torch.nn.Identity(), **{"schedule": "vp-linear", kind: value})
    assert f"{kind}={value!r}" in str(e.value) and hint in str(e.value)


def test_a_plugin_part_is_passed_as_an_object(no_registry):
    class Mine(VPLinear):
        name = "mine"

    m = TorchModel(torch.nn.Identity(), Mine(), Velocity())
    assert m.schedule.name == "mine"


def test_importing_io_leaves_the_umask_alone(monkeypatch, tmp_path):
    import solverlab._io as io_mod

    def umask(*args):
        raise AssertionError("os.umask was called")

    monkeypatch.setattr(os, "umask", umask)
    importlib.reload(io_mod)
    io_mod.write_text(tmp_path / "a.txt", "x")
    with io_mod.atomic_folder(tmp_path / "set", owned=["*.txt"]) as tmp:
        io_mod.write_text(tmp / "b.txt", "y")
    assert (tmp_path / "set" / "b.txt").read_text() == "y"


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_new_files_and_folders_get_the_umask_of_the_moment(tmp_path):
    from solverlab import _io

    old = os.umask(0o027)
    try:
        _io.write_text(tmp_path / "a.txt", "x")
        with _io.atomic_folder(tmp_path / "set", owned=["*.txt"]) as tmp:
            _io.write_text(tmp / "b.txt", "y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "set").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "set" / "b.txt").stat().st_mode & 0o777 == 0o640
