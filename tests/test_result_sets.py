"""``solverlab compare`` writes its result set whole: a real process interrupted (SIGINT) or
killed (SIGKILL) at random moments while it writes leaves its output folder holding the
complete old set or the complete new one, never a mix, and the next run removes what a killed
run left behind."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX signals and flock")

ARGS = ["--solvers", "euler", "--grids", "logsnr", "--nfe", "2", "--samples", "4", "--force"]
NAMES = ["compare-heatmap.png", "compare.csv", "compare.json", "compare.png"]
# plugins the tiny problem does not need, to start faster
BLOCK = "solverlab_expint,solverlab_pndm,solverlab_torchdiffeq,solverlab_dpm_adaptive"


def start(out: Path, seed: int) -> subprocess.Popen:
    env = {**os.environ, "SOLVERLAB_BLOCK_PLUGINS": BLOCK, "MPLBACKEND": "Agg"}
    return subprocess.Popen(
        [sys.executable, "-m", "solverlab", "compare", *ARGS, "--seed", str(seed),
         "--out", str(out)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(out: Path, seed: int) -> str:
    proc = start(out, seed)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return err


def result_seed(out: Path) -> int | None:
    """The seed of the complete result set in ``out`` (None: no folder); fails on a mix."""
    if not out.exists():
        return None
    assert sorted(os.listdir(out)) == NAMES
    data = json.loads((out / "compare.json").read_text())
    with open(out / "compare.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # the csv is the json's table: both from the same run
    assert rows == [{k: "" if v is None else str(v) for k, v in r.items()}
                    for r in data["rows"]]
    png = (out / "compare.png").read_bytes()
    assert png.startswith(b"\x89PNG") and png.endswith(b"IEND\xaeB`\x82")
    return data["settings"]["seed"]


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def files_in_temporary_folders(out: Path, ignore: set[str]) -> int | None:
    """How many files the temporary folders beside ``out`` hold, less those in ``ignore``
    (None: there is none)."""
    parts = [p for p in out.parent.iterdir() if p.name.endswith(".part") and p.name not in ignore]
    try:
        return sum(len(os.listdir(p)) for p in parts) if parts else None
    except FileNotFoundError:  # renamed or removed while listed
        return None


def interrupt(out: Path, seed: int, sig: int, stage: str, rng: random.Random) -> str:
    """Start a run and send ``sig`` at a random moment of a ``stage``: ``"writing"`` (once its
    temporary folder holds a random number of files) or ``"swapped"`` (once the folder was
    replaced: removing the old set, exiting), after a random number of further polls.
    Returns what the run wrote to stderr."""
    earlier, inode = set(leftovers(out)), out.stat().st_ino if out.exists() else None
    files, polls = rng.randint(0, len(NAMES)), rng.randint(0, 10)
    proc = start(out, seed)
    while proc.poll() is None:
        if stage == "writing":
            n = files_in_temporary_folders(out, earlier)
            reached = n is not None and n >= files
        else:
            reached = out.exists() and out.stat().st_ino != inode
        if reached:
            if polls == 0:
                proc.send_signal(sig)
                break
            polls -= 1
        time.sleep(0.001)  # polling, not timing: nothing asserts on durations
    return proc.communicate(timeout=300)[1]


def test_an_interrupted_compare_leaves_the_old_or_the_new_set(tmp_path):
    rng = random.Random(0)
    out = tmp_path / "out"  # at first there is none: the "old set" is no folder
    runs = [(sig, stage) for sig in (signal.SIGINT, signal.SIGKILL)
            for stage in ("writing", "swapped")]
    rng.shuffle(runs)
    seen, left, err = None, set(), ""
    for seed, (sig, stage) in enumerate(runs, start=1):
        err += interrupt(out, seed, sig, stage, rng)
        now = result_seed(out)
        assert now in (seen, seed), (sig, stage, seed)
        seen = now
        left.update(leftovers(out))
    err += finish(out, seed=9)
    assert result_seed(out) == 9
    assert leftovers(out) == []  # what killed runs left is removed by later runs ...
    for name in left:  # ... which say so
        assert f"removed {out.parent / name}, left by an interrupted write" in err
