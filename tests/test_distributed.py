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


# -- the collectives in real processes ----------------------------------------------------
COLLECTIVES = """
import json, sys, torch
from solverlab import distributed

ctx = distributed.context()
r, w = ctx.rank, ctx.world_size
n = [0, 3, 1][r]  # uneven parts, one empty
start = sum([0, 3, 1][:r])
rows = torch.arange(start, start + n, dtype=torch.float64).repeat_interleave(2).reshape(n, 2)
to_all = distributed.gather_rows(rows)
to_main = distributed.gather_rows(rows, to_all=False)
out = {
    "rank": r, "world": w, "active": ctx.active, "backend": ctx.backend,
    "to_all": to_all.tolist(), "to_main": None if to_main is None else to_main.tolist(),
    "sum": distributed.all_reduce_sum(torch.tensor([r + 0.5], dtype=torch.float32)).tolist(),
    "objects": distributed.all_gather_objects({"r": r}),
    "broadcast": distributed.broadcast_object(f"from {r}", src=1),
    "shard": [distributed.shard(10).start, distributed.shard(10).stop],
    "from_main": distributed.from_main(lambda: f"read by {r}"),
}


def refuse():
    from solverlab import OptionError
    raise OptionError(f"refused on rank {r}")


try:
    distributed.from_main(refuse)
except Exception as e:  # every rank gets rank 0's error
    out["error"] = f"{type(e).__name__}: {e}"
# the trainer's DDP: summed (not averaged) gradients, over the job's gloo group or, where the
# job's backend is another (nccl), over a gloo group of its own
import attrs
from solverlab.train import _data_parallel

out["ddp"] = {}
for backend in ("gloo", "nccl"):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ddp = _data_parallel(net, attrs.evolve(ctx, backend=backend))  # kept: its reducer sums
    ddp(torch.full((4, 3), float(r + 1))).sum().backward()
    out["ddp"][backend] = net.weight.grad.tolist()

with open(f"{sys.argv[1]}/rank{r}.json", "w") as f:
    json.dump(out, f)
"""


def test_collectives_under_3_processes(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
           str(script), str(tmp_path)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    got = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in range(3)]
    rows = [[float(i), float(i)] for i in range(4)]
    for k, g in enumerate(got):
        assert (g["rank"], g["world"], g["active"], g["backend"]) == (k, 3, True, "gloo")
        assert g["to_all"] == rows  # rank order, uneven and empty parts
        assert g["to_main"] == (rows if k == 0 else None)
        assert g["sum"] == [4.5]
        assert g["objects"] == [{"r": 0}, {"r": 1}, {"r": 2}]
        assert g["broadcast"] == "from 1"
        assert g["from_main"] == "read by 0"
        assert g["error"] == "OptionError: refused on rank 0"
        # d/dW of sum(W x + b) over 4 rows of (r + 1): 4 (r + 1), summed over the ranks: 24
        assert g["ddp"] == {"gloo": [[24.0] * 3] * 2, "nccl": [[24.0] * 3] * 2}
    assert [g["shard"] for g in got] == [[0, 3], [3, 6], [6, 10]]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(tmp_path: Path, *args: str) -> list[tuple[str, str]]:
    """The README's two-machine command (static rendezvous, --node-rank), both "nodes" on
    127.0.0.1, each in its own folder: no file system shared between them."""
    port = str(_free_port())
    jobs = []
    for k in (0, 1):
        cwd = tmp_path / f"node{k}"
        cwd.mkdir(exist_ok=True)
        jobs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={k}",
             "--master-addr=127.0.0.1", f"--master-port={port}", "--nproc-per-node=1",
             "-m", "solverlab", *args],
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd))
    try:
        results = [job.communicate(timeout=120) for job in jobs]
    finally:
        for job in jobs:
            if job.poll() is None:
                job.kill()
                job.communicate()
    assert [job.returncode for job in jobs] == [0, 0], [err[-2000:] for _, err in results]
    return results


def test_the_two_node_command_without_a_shared_file_system(tmp_path):
    """Rank 0 (node 0) writes the checkpoint into its own folder; a resume reads it there and
    hands it to node 1, which never sees the file. The result: a one-process run's."""
    from solverlab import TrainConfig

    results = _two_nodes(tmp_path, *TRAIN, "--steps", "10", "--out", "run.safetensors")
    assert "on 2 processes (DistributedDataParallel" in results[0][0]
    assert "trained" not in results[1][0]  # node 1 holds rank 1: it neither prints nor writes
    assert not (tmp_path / "node1" / "run.safetensors").exists()
    _two_nodes(tmp_path, *TRAIN, "--resume", "--steps", "20", "--out", "run.safetensors")
    assert not (tmp_path / "node1" / "run.safetensors").exists()
    config = TrainConfig(dataset="moons", objective="simple", batch_size=64, save_every=10,
                         network={"hidden": 32, "depth": 2}, steps=20, micro_batches=2)
    one = tmp_path / "one.safetensors"
    _train_alone(config, one)
    assert _close(one, tmp_path / "node0" / "run.safetensors") < TRAIN_RTOL


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
#: The parts' float32 gradients are added in another order (one process accumulates them in
#: turn, DDP sums the ranks' in float64): 20 Adam steps stay within this, relative to each
#: tensor's largest entry (2 equal parts on 2 or 3 ranks: measured bit for bit).
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


def _train_alone(config, out: Path, keep_at: int | None = None) -> None:
    import shutil

    from solverlab import train

    def keep(step: int, loss: float) -> None:
        if step == keep_at:
            shutil.copy(out, out.with_suffix(f".{step}.safetensors"))

    train(config, out, progress=False, callback=keep)


def test_ddp_training_matches_1_process_and_resumes_under_any_world_size(tmp_path):
    from solverlab import TrainConfig
    from solverlab.checkpoint import read_checkpoint

    config = TrainConfig(dataset="moons", objective="simple", batch_size=64, save_every=10,
                         network={"hidden": 32, "depth": 2}, steps=20, micro_batches=2)
    one = tmp_path / "one.safetensors"
    _train_alone(config, one, keep_at=10)
    # 3 processes, 2 parts: rank 0 holds none and only joins DDP's gradient sum
    run = tmp_path / "run.safetensors"
    r = torchrun(3, *TRAIN, "--micro-batches", "2", "--steps", "10", "--out", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("trained mlp") == 1  # rank 0 reports
    assert "on 3 processes (DistributedDataParallel, gloo, 2 parts per batch)" in r.stdout
    assert "rank 0 of 3 holds no part of the batch" in r.stderr
    assert _close(tmp_path / "one.10.safetensors", run) < TRAIN_RTOL
    # resumed under 2 processes (the checkpoint's K=2 is kept, not the world size) ...
    r = torchrun(2, *TRAIN, "--resume", "--steps", "15", "--out", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_checkpoint(run)[1]["step"] == 15
    # ... and in 1 process: the uninterrupted 1-process run's weights
    r = plain(*TRAIN, "--resume", "--steps", "20", "--out", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    assert _close(one, run) < TRAIN_RTOL
    # the metadata says how the batch is split, not how many processes ran
    assert read_checkpoint(run)[1]["train"]["micro_batches"] == 2


def test_ddp_training_with_uneven_parts_matches_1_process(tmp_path):
    from solverlab import TrainConfig

    # 3 parts on 2 processes: rank 0 takes part 0, rank 1 parts 1 and 2
    config = TrainConfig(dataset="moons", objective="simple", batch_size=60, save_every=10,
                         network={"hidden": 32, "depth": 2}, steps=10, micro_batches=3)
    one = tmp_path / "one.safetensors"
    _train_alone(config, one)
    two = tmp_path / "two.safetensors"
    args = [a if a != "64" else "60" for a in TRAIN]
    r = torchrun(2, *args, "--micro-batches", "3", "--steps", "10", "--out", str(two))
    assert r.returncode == 0, r.stderr[-2000:]
    assert _close(one, two) < TRAIN_RTOL


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
