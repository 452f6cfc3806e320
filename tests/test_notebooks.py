"""The committed notebooks (no kernel is started: `tox -e notebooks` executes them).

Each `notebooks/[0-9][0-9]_*.ipynb` is valid nbformat 4, is listed in notebooks/README.md (and
the README lists no other), was executed top to bottom in one run (execution counts 1, 2, ...)
with its outputs committed (at least one PNG figure, no error output), reads the quick-mode
variable in its first code cell, and names a generic `python3` kernel so that GitHub renders it.
The runner (notebooks/run.py) finds them, refuses to pass with none, and gives its kernel the
quick-mode variable only with ``--quick`` and always the inline matplotlib backend.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
QUICK_LINE = 'QUICK = os.environ.get("SOLVERLAB_NOTEBOOK_QUICK") == "1"'
#: A committed notebook stays small enough to review and to render on GitHub.
MAX_BYTES = 1_500_000


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebooks_are_found() -> None:
    assert len(PATHS) >= 1, f"no notebooks matching {NOTEBOOKS}/[0-9][0-9]_*.ipynb"


def test_readme_lists_exactly_the_notebooks() -> None:
    listed = set(re.findall(r"\((\d\d_[A-Za-z0-9_]+\.ipynb)\)",
                            (NOTEBOOKS / "README.md").read_text(encoding="utf-8")))
    present = {p.name for p in PATHS}
    missing, unlisted = listed - present, present - listed
    assert missing == set(), f"listed in notebooks/README.md but missing: {sorted(missing)}"
    assert unlisted == set(), f"not listed in notebooks/README.md: {sorted(unlisted)}"


def test_readme_gives_the_runner_commands() -> None:
    text = (NOTEBOOKS / "README.md").read_text(encoding="utf-8")
    assert "python notebooks/run.py --quick" in text
    assert "python notebooks/run.py --write" in text


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_structure(path: Path) -> None:
    nb = _load(path)
    assert nb["nbformat"] == 4
    assert path.stat().st_size < MAX_BYTES, f"{path.name}: {path.stat().st_size} bytes"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert {c["cell_type"] for c in nb["cells"]} <= {"code", "markdown", "raw"}
    first = nb["cells"][0]
    assert first["cell_type"] == "markdown" and _source(first).startswith("# "), (
        f"{path.name}: the first cell is the title (markdown '# ...')")
    assert "notebooks/run.py" in _source(first), f"{path.name}: the title says how to run it"


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_valid_nbformat(path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbformat.validate(nbformat.read(path, as_version=4))


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_quick_mode_read_in_first_code_cell(path: Path) -> None:
    cells = _code_cells(_load(path))
    assert cells, f"{path.name} has no code cell"
    assert QUICK_LINE in _source(cells[0]), f"{path.name}: first code cell lacks {QUICK_LINE!r}"
    assert all(QUICK_LINE not in _source(c) for c in cells[1:])


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_outputs_committed_from_one_clean_run(path: Path) -> None:
    cells = [c for c in _code_cells(_load(path)) if _source(c).strip()]
    counts = [c.get("execution_count") for c in cells]
    assert counts == list(range(1, len(cells) + 1)), (
        f"{path.name}: execution counts {counts}; run it top to bottom with "
        "`python notebooks/run.py --write`")
    outputs = [o for c in cells for o in c.get("outputs", [])]
    errors = [f"{o.get('ename')}: {o.get('evalue')}" for o in outputs
              if o.get("output_type") == "error"]
    assert errors == [], f"{path.name}: error outputs {errors}"
    tracebacks = [o for o in outputs if o.get("output_type") == "stream"
                  and "Traceback (most recent call last)" in "".join(o.get("text", ""))]
    assert tracebacks == [], f"{path.name}: a traceback was printed"
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 1, f"{path.name}: no figure (image/png output) committed"


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_no_quick_outputs_committed(path: Path) -> None:
    # the committed outputs are a full run's: a notebook prints its QUICK flag first
    text = "".join("".join(o.get("text", "")) for c in _code_cells(_load(path))[:1]
                   for o in c.get("outputs", []) if o.get("output_type") == "stream")
    assert "QUICK=True" not in text, f"{path.name}: committed from a quick run"


def _runner():
    spec = importlib.util.spec_from_file_location("notebooks_run", NOTEBOOKS / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runner_finds_the_notebooks() -> None:
    run = _runner()
    assert run.find_notebooks([]) == PATHS
    assert run.find_notebooks([PATHS[0].stem]) == [PATHS[0]]


def test_runner_fails_with_nothing_to_run(tmp_path: Path, monkeypatch, capsys) -> None:
    run = _runner()
    monkeypatch.setattr(run, "HERE", tmp_path)
    assert run.main([]) == 1
    assert "no notebooks matching" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no notebook 'nope'"):
        run.main(["nope"])


def test_runner_kernel_environment(monkeypatch) -> None:
    run = _runner()
    monkeypatch.setenv("SOLVERLAB_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    full, quick = run.kernel_env(False), run.kernel_env(True)
    assert "SOLVERLAB_NOTEBOOK_QUICK" not in full  # a full run is full whatever the caller set
    assert quick["SOLVERLAB_NOTEBOOK_QUICK"] == "1"
    assert full["MPLBACKEND"] == quick["MPLBACKEND"] == "module://matplotlib_inline.backend_inline"
