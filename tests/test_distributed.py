"""solverlab.distributed and the commands under real torchrun processes (gloo on CPU)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from solverlab import distributed
from solverlab.distributed import Context, DistributedError, read_environment

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "plugins"),
                                         env.get("PYTHONPATH", "")])
    env["SOLVERLAB_DIST_TIMEOUT"] = "60"
    return env


def torchrun(n: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc-per-node=n -m solverlab ARGS`` (a free port each)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={n}", "-m", "solverlab", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def plain(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "solverlab", *args], env=_env(),
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


# -- the context -----------------------------------------------------------------------------
def test_alone_is_a_no_op():
    ctx = read_environment({})
    assert (ctx.rank, ctx.world_size, ctx.active, ctx.backend) == (0, 1, False, None)
    assert ctx.shard(7) == slice(0, 7)
    t = torch.arange(6.0).reshape(3, 2)
    assert distributed.gather_rows(t) is t
    s = distributed.all_reduce_sum(t.float())
    assert s.dtype == torch.float64 and torch.equal(s, t.double())
    assert distributed.is_main() and distributed.all_gather_objects(5) == [5]
    assert distributed.main_only(lambda: 3)() == 3


@pytest.mark.parametrize("n", [0, 1, 5, 12, 13])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shards_tile_the_range_in_rank_order(n, world):
    parts = [Context(rank=r, world_size=world).shard(n) for r in range(world)]
    assert [i for p in parts for i in range(n)[p]] == list(range(n))
    sizes = [p.stop - p.start for p in parts]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("env, needle", [
    ({"RANK": "0"}, "WORLD_SIZE is not"),
    ({"WORLD_SIZE": "2"}, "RANK is not"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "inconsistent"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "MASTER_ADDR and MASTER_PORT"),
    ({"RANK": "1", "WORLD_SIZE": "2"}, "LOCAL_RANK"),
])
def test_inconsistent_environment_is_named(env, needle):
    with pytest.raises(DistributedError, match=needle):
        read_environment(env)


def test_one_rank_under_torchrun_needs_no_process_group():
    ctx = read_environment({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    assert not ctx.active and ctx.backend is None and ctx.world_size == 1


def test_bad_timeout_is_refused(monkeypatch):
    with pytest.raises(DistributedError, match="SOLVERLAB_DIST_TIMEOUT='soon'"):
        distributed._timeout({"SOLVERLAB_DIST_TIMEOUT": "soon"})
    assert distributed._timeout({}) == distributed.DEFAULT_TIMEOUT


# -- compare ---------------------------------------------------------------------------------
COMPARE = ("compare", "--solvers", "ddim,dpmpp-2m,dpm-adaptive", "--nfe", "5,10",
           "--tolerances", "1e-2", "--samples", "13", "--no-progress")


def _rows(out: Path) -> tuple[dict, list[dict]]:
    data = json.loads((out / "compare.json").read_text())
    with open(out / "compare.csv", newline="") as f:
        return data, list(csv.DictReader(f))


def test_compare_is_the_same_for_1_2_3_processes(tmp_path):
    runs = {"plain": plain(*COMPARE, "--out", str(tmp_path / "plain"))}
    for n in (1, 2, 3):
        runs[n] = torchrun(n, *COMPARE, "--out", str(tmp_path / f"n{n}"))
    for key, r in runs.items():
        assert r.returncode == 0, (key, r.stderr[-2000:])
    base, base_csv = _rows(tmp_path / "plain")
    assert base["settings"]["world_size"] == 1 and len(base["rows"]) == 9
    for n in (1, 2, 3):
        data, rows_csv = _rows(tmp_path / f"n{n}")
        assert data["settings"]["world_size"] == n
        assert {k: v for k, v in data["settings"].items() if k != "world_size"} == \
            {k: v for k, v in base["settings"].items() if k != "world_size"}
        assert data["reference"] == base["reference"]
        for a, b in zip(base["rows"], data["rows"], strict=True):
            for k in a:
                if k in ("error", "median_error") and a[k] is not None:
                    assert b[k] == pytest.approx(a[k], rel=1e-12, abs=0), (n, a, b)
                elif k != "wall_time":
                    assert b[k] == a[k], (n, k, a, b)
        for a, b in zip(base_csv, rows_csv, strict=True):
            assert {k: v for k, v in a.items() if k not in ("error", "median_error",
                                                            "wall_time")} == \
                {k: v for k, v in b.items() if k not in ("error", "median_error", "wall_time")}
        # only rank 0 prints: the table's header once
        assert runs[n].stdout.count("rms error") == 1
        assert runs[n].stdout.count("wrote compare.csv") == 1


# -- train -----------------------------------------------------------------------------------
TRAIN = ("train", "--data", "moons", "--objective", "simple", "--batch-size", "64",
         "--save-every", "10", "--network-option", "hidden=32", "--network-option", "depth=2",
         "--no-progress")
#: Float32 gradients summed in another order (one backward over both parts vs a float64
#: all-reduce of two): 20 Adam steps stay within this, relative to each tensor's largest entry.
TRAIN_RTOL = 1e-5


def _close(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    worst = 0.0
    for k in x:
        if k.startswith("rng.") or k == "train.loss":
            if k.startswith("rng."):  # the same examples and noise were drawn
                assert torch.equal(x[k], y[k]), k
            continue
        if x[k].is_floating_point():
            scale = float(x[k].double().abs().max()) or 1.0
            worst = max(worst, float((x[k].double() - y[k].double()).abs().max()) / scale)
    return worst


def test_train_on_2_processes_matches_1_and_resumes_on_1(tmp_path):
    import shutil

    from solverlab import TrainConfig, train

    config = TrainConfig(dataset="moons", objective="simple", batch_size=64, save_every=10,
                         network={"hidden": 32, "depth": 2}, steps=20, micro_batches=2)
    one = tmp_path / "one.safetensors"

    def keep(step: int, loss: float) -> None:
        if step == 10:
            shutil.copy(one, tmp_path / "one-10.safetensors")

    train(config, one, progress=False, callback=keep)
    two = tmp_path / "two.safetensors"
    r = torchrun(2, *TRAIN, "--steps", "10", "--out", str(two))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("trained mlp") == 1  # rank 0 reports
    assert _close(tmp_path / "one-10.safetensors", two) < TRAIN_RTOL
    # the 2-process checkpoint (both parts' noise generators in it) resumes in 1 process
    ckpt = train(config, two, resume=True, progress=False)
    assert ckpt.step == 20
    assert _close(one, two) < TRAIN_RTOL
    # the metadata says how the batch is split, not how many processes ran
    from solverlab.checkpoint import read_checkpoint

    assert read_checkpoint(two)[1]["train"]["micro_batches"] == 2


def test_micro_batches_must_fit():
    from solverlab import OptionError, TrainConfig

    with pytest.raises(OptionError, match="micro_batches=3 does not divide batch_size=64"):
        TrainConfig(dataset="moons", objective="simple", batch_size=64, micro_batches=3,
                    network={"hidden": 8, "depth": 1})


# -- ems -------------------------------------------------------------------------------------
def test_ems_on_2_processes_equals_1(tmp_path):
    from safetensors.torch import load_file

    args = ("ems", "gaussian-mixture", "--grid-size", "24", "--samples", "64",
            "--no-progress")
    r1 = plain(*args, "--out", str(tmp_path / "one.safetensors"))
    r2 = torchrun(2, *args, "--out", str(tmp_path / "two.safetensors"))
    assert r1.returncode == 0 and r2.returncode == 0, (r1.stderr[-2000:], r2.stderr[-2000:])
    assert r2.stdout.count("EMS of") == 1
    a = load_file(str(tmp_path / "one.safetensors"))
    b = load_file(str(tmp_path / "two.safetensors"))
    assert a.keys() == b.keys() == {"lam", "l", "s", "b"}
    for k in a:  # each grid point's sums are the same additions; the ranks' parts add exactly
        torch.testing.assert_close(b[k], a[k], rtol=1e-12, atol=1e-14)
    assert not list(tmp_path.glob("*.partial*"))  # every rank removed its partial file


# -- failure ---------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_a_killed_rank_ends_the_job_and_the_checkpoint_resumes(tmp_path):
    import signal
    import time

    from solverlab.checkpoint import load_checkpoint

    out = tmp_path / "run.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node=2", "-m", "solverlab", *TRAIN, "--steps", "100000",
           "--save-every", "5", "--out", str(out)]
    job = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not out.exists() and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.2)
        assert out.exists(), "no checkpoint was written"
        workers = _children(job.pid)
        assert len(workers) == 2, workers
        # torchrun starts the ranks in order; the later pid is rank 1
        os.kill(max(workers), signal.SIGKILL)
        _, err = job.communicate(timeout=90)  # no hang
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert job.returncode != 0
    import re

    # torchrun's report names the dead rank: "rank : 1 (local_rank: 1)", "Signal 9 (SIGKILL)"
    assert "SIGKILL" in err and re.search(r"\brank\s*:\s*1\b", err), err[-3000:]
    ckpt = load_checkpoint(out)  # intact: written atomically
    assert ckpt.step % 5 == 0 and ckpt.step >= 5
    r = plain(*TRAIN, "--resume", "--steps", str(ckpt.step + 5), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_checkpoint(out).step == ckpt.step + 5
