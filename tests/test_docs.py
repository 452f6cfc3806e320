"""The repository stands on its own: no file points to the team's reference notes, which are not
part of it (issue 8 item 7). Papers are cited with equation or algorithm numbers, and our own
derivations live in ``docs/`` (built by ``tox -e docs``)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The name of the notes file, spelled so that this test does not mention it itself.
NOTES = "MATH" + ".md"
#: Build outputs, caches and environments: not the repository's files.
SKIP_DIRS = {".git", ".tox", ".venv", "venv", ".hypothesis", ".pytest_cache", ".ruff_cache",
             "__pycache__", "build", "dist", "site", "node_modules", "solverlab-compare",
             "solverlab-order", "solverlab-lipschitz"}


def _files():
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames
                       if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in filenames:
            yield Path(dirpath, name)


def test_no_file_mentions_the_notes_outside_the_repository():
    offenders = []
    for path in _files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):  # binary files (plots) and unreadable ones
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if NOTES.lower() in line.lower():
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, (
        f"{len(offenders)} line(s) point to {NOTES}, which is not in the repository; cite the "
        "paper with its equation or algorithm number, or docs/mathematics.md#<section> for our "
        "own derivations:\n" + "\n".join(offenders))


def test_the_walk_sees_the_sources():
    # Guard against a walk that silently finds nothing (a moved test directory, say).
    names = {p.relative_to(ROOT).as_posix() for p in _files()}
    assert {"solverlab/solver.py", "docs/mathematics.md", "mkdocs.yml"} <= names
