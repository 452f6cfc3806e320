"""The trainer: it learns, its checkpoints hold everything, its EMA is the stated recurrence, and a
run killed with SIGKILL and resumed reaches the uninterrupted run's state bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from training_objectives import PlainObjective, SharedTimeObjective

from solverlab import TimeMap
from solverlab.checkpoint import (
    REQUIRED,
    CheckpointError,
    CheckpointMismatchError,
    export_checkpoint,
    load_checkpoint,
    read_checkpoint,
)
from solverlab.cli import cli
from solverlab.compare import torch_threads
from solverlab.errors import OptionError, UnknownNameError
from solverlab.networks import build_network
from solverlab.registry import Registry, get_registry, reset_registry
from solverlab.train import TrainConfig, TrainingDivergedError, train

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
HAS_SIMPLE = "simple" in get_registry().names("objective")
needs_simple = pytest.mark.skipif(not HAS_SIMPLE, reason="objective 'simple' not registered")


def config(**kw):
    base = {"dataset": "moons", "objective": PlainObjective(), "steps": 40, "batch_size": 64,
            "save_every": 10}
    return TrainConfig(**{**base, **kw})


def run(cfg, out, **kw):
    with torch_threads(1):  # the same arithmetic in every process of a comparison
        return train(cfg, out, progress=False, **kw)


def assert_same_files(a: Path, b: Path) -> None:
    ta, tb = load_file(a), load_file(b)
    assert sorted(ta) == sorted(tb)
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"tensors differ: {different[:5]}"
    _, ma, _ = read_checkpoint(a)
    _, mb, _ = read_checkpoint(b)
    assert ma == mb


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "plugins"), str(TESTS),
                                       e.get("PYTHONPATH", "")])
    e["OMP_NUM_THREADS"] = "1"
    return e


# -- learning ----------------------------------------------------------------------------------
def test_training_reduces_the_loss_on_moons(tmp_path):
    ck = run(config(steps=60, save_every=60), tmp_path / "m.safetensors")
    losses = ck.losses
    assert losses.shape == (60,) and losses.dtype == torch.float64
    first, last = float(losses[:10].mean()), float(losses[-20:].mean())
    assert first > 1.2  # an untrained net: about E||eps||^2 = 2
    assert last < 0.7 and last < 0.6 * first
    # the trained weights predict the noise better than chance on fresh noised data (the EMA,
    # decay 0.999, still sits near the initial weights after 60 steps)
    model, g = load_checkpoint(ck.path, ema=False).model, torch.Generator().manual_seed(123)
    x0 = ck.data(512, seed=5)
    t = torch.full((512,), 0.3, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g)
    a, s = model.schedule.alpha(t).float()[:, None], model.schedule.sigma(t).float()[:, None]
    err = float((model(a * x0 + s * eps, t) - eps).square().sum(1).mean())
    assert err < 1.0  # predicting zero gives 2


def test_checkpoint_holds_every_field(tmp_path):
    out = tmp_path / "c.safetensors"
    run(config(steps=12, save_every=5, seed=7), out)
    tensors, meta, _ = read_checkpoint(out)
    assert set(REQUIRED) <= set(meta)
    assert meta["format"] == "solverlab-checkpoint" and meta["version"] == 1
    assert meta["step"] == 12
    assert meta["network"] == {"kind": "mlp", "dim": 2, "hidden": 128, "depth": 3,
                               "time_embedding": 64, "time_scale": 1.0}
    assert meta["objective"] == {"name": "test-plain", "options": {"weight": 1.0}}
    assert meta["schedule"]["name"] == "vp-discrete" and meta["schedule"]["options"] == {}
    assert meta["schedule"]["parameters"]["t_min"] == 0.001
    assert meta["parameterization"] == "noise" and meta["time_input"] == "index"
    assert meta["time_map"] is None
    assert meta["dataset"] == {"name": "moons", "options": {"noise": 0.05}}
    assert meta["train"] == {"steps": 12, "batch_size": 64, "lr": 1e-3, "ema": 0.999,
                             "clip": 1.0, "seed": 7, "save_every": 5}
    assert meta["optimizer"]["name"] == "adam"
    assert meta["optimizer"]["param_groups"][0]["lr"] == 1e-3
    assert meta["contents"] == ["model", "ema", "optim", "rng", "train"]
    assert meta["fingerprint"]["model"].startswith("sha256:")
    names = {k.split(".")[0] for k in tensors}
    assert names == {"model", "ema", "optim", "rng", "train"}
    n_params = len([k for k in tensors if k.startswith("model.")])
    assert len([k for k in tensors if k.startswith("ema.")]) == n_params
    assert {k.rsplit(".", 1)[1] for k in tensors if k.startswith("optim.")} == {
        "step", "exp_avg", "exp_avg_sq"}
    assert float(tensors["optim.0.step"]) == 12
    assert {k for k in tensors if k.startswith("rng.")} == {"rng.data", "rng.objective",
                                                            "rng.global"}
    assert all(tensors[k].dtype == torch.uint8 for k in tensors if k.startswith("rng."))
    assert tensors["train.loss"].shape == (12,)


def test_time_map_of_the_objective_is_stored(tmp_path):
    ck = run(config(objective=SharedTimeObjective(threshold=100, n=5), steps=3),
             tmp_path / "e.safetensors")
    assert ck.meta["time_map"] == {"kind": "shared", "threshold": 100.0, "n": 5}
    assert ck.model.time_map == TimeMap(threshold=100, n=5)
    assert ck.meta["objective"] == {"name": "test-shared",
                                    "options": {"weight": 1.0, "threshold": 100.0, "n": 5}}


def test_ema_is_the_stated_recurrence(tmp_path):
    out = tmp_path / "ema.safetensors"
    cfg = config(steps=3, save_every=1, ema=0.9, seed=2)
    raw = []
    with torch_threads(1):
        train(cfg, out, progress=False,
              callback=lambda step, loss: raw.append(load_file(out)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3 * cfg.seed)  # the documented seed of the initial weights
        w0 = build_network(cfg.network).state_dict()
    final = load_file(out)
    for name, w in w0.items():
        e = w.clone()
        for weights in raw:
            e.mul_(0.9).add_(weights[f"model.{name}"], alpha=1 - 0.9)
        assert torch.equal(final[f"ema.{name}"], e), name
        assert not torch.equal(final[f"ema.{name}"], final[f"model.{name}"])
    # three steps with decay 0.9: the average still sits near the initial weights
    k = "inp.weight"
    assert (final[f"ema.{k}"] - w0[k]).norm() < (final[f"model.{k}"] - w0[k]).norm()


# -- resume --------------------------------------------------------------------------------------
def test_resume_in_process_is_bit_exact(tmp_path):
    run(config(), tmp_path / "full.safetensors")
    run(config(steps=20), tmp_path / "part.safetensors")
    ck = run(config(), tmp_path / "part.safetensors", resume=True)
    assert ck.step == 40
    assert_same_files(tmp_path / "full.safetensors", tmp_path / "part.safetensors")


HOLD = """
import pathlib, sys, time
from training_objectives import PlainObjective
from solverlab.train import TrainConfig, train

out, marker = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])


def hold(step, loss):
    if step == 15:  # after the step-10 checkpoint, before the step-20 one
        marker.write_text("15")
        time.sleep(600)


train(TrainConfig(dataset="moons", objective=PlainObjective(), steps=40, batch_size=64,
                  save_every=10), out, progress=False, callback=hold)
"""


def test_sigkilled_run_resumes_to_the_uninterrupted_state(tmp_path):
    out, marker = tmp_path / "killed.safetensors", tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(marker)], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the training process did not reach step 15"
            time.sleep(0.02)
        assert read_checkpoint(out)[1]["step"] == 10
        os.kill(proc.pid, signal.SIGKILL)  # mid-run: steps 11..15 are lost
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert read_checkpoint(out)[1]["step"] == 10
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # killed between saves
    ck = run(config(), out, resume=True)
    assert ck.step == 40
    run(config(), tmp_path / "uninterrupted.safetensors")
    assert_same_files(tmp_path / "uninterrupted.safetensors", out)


def test_resume_may_extend_a_finished_run(tmp_path):
    run(config(steps=20), tmp_path / "a.safetensors")
    ck = run(config(steps=30, save_every=7), tmp_path / "a.safetensors", resume=True)
    assert ck.step == 30 and ck.losses.shape == (30,)
    run(config(steps=30), tmp_path / "b.safetensors")
    ta, tb = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("change, field, ours, theirs", [
    ({"objective": SharedTimeObjective()}, "objective.name", "'test-plain'", "'test-shared'"),
    ({"objective": PlainObjective(weight=2.0)}, "objective.options.weight", "1.0", "2.0"),
    ({"dataset": "gmm"}, "dataset.name", "'moons'", "'gmm'"),
    ({"network": {"hidden": 64}}, "network.hidden", "128", "64"),
    ({"lr": 5e-4}, "train.lr", "0.001", "0.0005"),
    ({"seed": 1}, "train.seed", "0", "1"),
])
def test_resume_with_another_setup_names_the_field(tmp_path, change, field, ours, theirs):
    out = tmp_path / "r.safetensors"
    run(config(steps=10), out)
    before = out.read_bytes()
    with pytest.raises(CheckpointMismatchError) as e:
        run(config(**change), out, resume=True)
    msg = str(e.value)
    assert field in msg and f"the checkpoint has {ours}" in msg and theirs in msg
    assert str(out) in msg
    assert out.read_bytes() == before


def test_resume_errors(tmp_path):
    out = tmp_path / "r.safetensors"
    with pytest.raises(CheckpointError, match="does not exist"):
        run(config(), out, resume=True)
    run(config(steps=20), out)
    with pytest.raises(CheckpointMismatchError, match="at step 20, beyond steps=10"):
        run(config(steps=10), out, resume=True)
    export_checkpoint(out, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="no optim or rng state"):
        run(config(), tmp_path / "x.safetensors", resume=True)


def test_an_existing_checkpoint_is_not_replaced_without_asking(tmp_path):
    out = tmp_path / "r.safetensors"
    run(config(steps=10), out)
    before = out.read_bytes()
    with pytest.raises(CheckpointError, match="exists; resume it"):
        run(config(steps=10, seed=1), out)
    assert out.read_bytes() == before
    run(config(steps=10, seed=1), out, overwrite=True)
    assert out.read_bytes() != before


def test_a_diverging_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    calls = []

    class NanAtFive(PlainObjective):
        def loss(self, model, x0, *, generator=None):
            calls.append(1)
            loss = super().loss(model, x0, generator=generator)
            return loss * float("nan") if len(calls) == 5 else loss

    out = tmp_path / "d.safetensors"
    with pytest.raises(TrainingDivergedError, match=r"nan at step 5.*last checkpoint"):
        run(config(objective=NanAtFive(), steps=10, save_every=2), out)
    assert read_checkpoint(out)[1]["step"] == 4


def test_config_errors():
    with pytest.raises(UnknownNameError, match="did you mean 'moons'"):
        TrainConfig(dataset="moon", objective=PlainObjective())
    with pytest.raises(OptionError, match="no option 'noize'"):
        TrainConfig(dataset_options={"noize": 1}, objective=PlainObjective())
    for bad in ({"steps": 0}, {"batch_size": 1.5}, {"lr": 0}, {"ema": 1.0}, {"clip": -1},
                {"seed": -1}, {"save_every": 0}):
        with pytest.raises(OptionError, match=f"{next(iter(bad))}="):
            config(**bad)
    with pytest.raises(OptionError, match="does not fit dataset 'moons'"):
        config(network={"dim": 3})
    with pytest.raises(OptionError, match="no option 'width'"):
        config(network={"width": 3})
    with pytest.raises(UnknownNameError, match="unknown objective 'nope'"):
        TrainConfig(objective="nope")
    with pytest.raises(OptionError, match="carries its own options"):
        TrainConfig(objective=PlainObjective(), objective_options={"weight": 2})


def test_digits_defaults_to_a_unet():
    pytest.importorskip("sklearn")
    cfg = TrainConfig(dataset="digits", objective=PlainObjective())
    assert cfg.network["kind"] == "unet" and cfg.network["channels"] == 1 and cfg.lr == 5e-4


# -- command line --------------------------------------------------------------------------------
def invoke(*args):
    return CliRunner().invoke(cli, list(args))


def one_line_error(result):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    return lines[0]


def test_cli_errors_are_one_line(tmp_path):
    out = str(tmp_path / "c.safetensors")
    msg = one_line_error(invoke("train", "--data", "moons", "--objective", "nope", "--out", out))
    assert "unknown objective 'nope'" in msg and "--objective" in msg
    if HAS_SIMPLE:
        msg = one_line_error(invoke("train", "--data", "moons", "--objective", "simple",
                                    "--objective-option", "k=3", "--out", out))
        assert "no option 'k'" in msg and "antithetic" in msg
        msg = one_line_error(invoke("train", "--data", "moons", "--objective", "simple",
                                    "--network-option", "widht=3", "--out", out))
        assert "no option 'widht'" in msg and "hidden" in msg
    msg = one_line_error(invoke("train", "--data", "moonz", "--objective", "x", "--out", out))
    assert "did you mean 'moons'" in msg and "checkerboard" in msg
    msg = one_line_error(invoke("train", "--objective", "x", "--out", out))
    assert "--data" in msg and "moons" in msg
    msg = one_line_error(invoke("train", "--data", "moons", "--data-option", "noise",
                                "--objective", "x", "--out", out))
    assert "--data-option" in msg
    msg = one_line_error(invoke("train", "--resume", "--out", out))
    assert "nothing to resume" in msg
    msg = one_line_error(invoke("train", "--data", "moons", "--objective", "x", "--schedule",
                                "vp-linaer", "--out", out))
    assert "'--schedule'" in msg and "did you mean 'vp-linear'" in msg
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep")
    msg = one_line_error(invoke("train", "--data", "moons", "--objective", "x", "--out", out,
                                "--export", str(existing)))
    assert "'--export'" in msg and existing.read_bytes() == b"keep"
    assert not Path(out).exists()


def test_cli_resume_takes_the_checkpoints_settings(tmp_path):
    """`--resume` with only --out: every setting comes from the checkpoint, the objective from
    the registry by its stored name (the test objective, registered on a private registry)."""
    out = tmp_path / "c.safetensors"
    run(config(steps=10), out)
    reg = Registry.load(eps=[], blocked=[])
    reg.add(PlainObjective)
    reset_registry(reg)
    try:
        result = invoke("train", "--resume", "--out", str(out), "--steps", "20",
                        "--no-progress")
        assert result.exit_code == 0, result.output
        assert "step 20/20" in result.output
        msg = one_line_error(invoke("train", "--resume", "--out", str(out), "--seed", "3"))
        assert "train.seed differs: the checkpoint has 0, this run has 3" in msg
    finally:
        reset_registry()
    run(config(steps=20), tmp_path / "ref.safetensors")
    assert_same_files(tmp_path / "ref.safetensors", out)


def test_cli_refuses_to_replace_a_checkpoint(tmp_path):
    out = tmp_path / "c.safetensors"
    run(config(steps=10), out)
    msg = one_line_error(invoke("train", "--data", "moons", "--objective", "x",
                                "--out", str(out)))
    assert "exists" in msg and "--resume" in msg and "--force" in msg


@needs_simple
def test_cli_trains_with_simple_and_compare_uses_the_file(tmp_path):
    out, exported = tmp_path / "s.safetensors", tmp_path / "s-export.safetensors"
    result = invoke("train", "--data", "moons", "--objective", "simple", "--steps", "20",
                    "--batch-size", "64", "--save-every", "10", "--out", str(out),
                    "--export", str(exported), "--no-progress")
    assert result.exit_code == 0, result.output
    assert "step 20/20" in result.output and exported.exists()
    meta = json.loads(invoke("checkpoint", "info", str(out)).output)
    assert meta["objective"]["name"] == "simple" and meta["step"] == 20
    result = invoke("compare", "--model", str(exported), "--solvers", "ddim",
                    "--grids", "logsnr", "--nfe", "5", "--samples", "8",
                    "--reference-tol", "1e-5", "--out", str(tmp_path / "cmp"))
    assert result.exit_code == 0, result.output


@needs_simple
def test_cli_sigkilled_run_resumes_bit_exact(tmp_path):
    out, ref = tmp_path / "k.safetensors", tmp_path / "ref.safetensors"
    args = ["--data", "moons", "--objective", "simple", "--steps", "300", "--batch-size", "64",
            "--network-option", "hidden=32", "--save-every", "10", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "solverlab", "train", *args, "--out",
                             str(out)], env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not out.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)  # at the first checkpoint (step 10), mid-run
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    step = read_checkpoint(out)[1]["step"]
    assert 10 <= step < 300
    result = invoke("train", "--resume", "--out", str(out), "--no-progress")
    assert result.exit_code == 0, result.output
    assert "step 300/300" in result.output
    assert invoke("train", *args, "--out", str(ref)).exit_code == 0
    assert_same_files(ref, out)
