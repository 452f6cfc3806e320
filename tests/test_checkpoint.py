"""Checkpoint files: round trips, the time-conditioning map that travels with the model, shipped
names, exports, and a clear error for every bad file, with nothing already written lost."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch import nn
from training_objectives import PlainObjective, SharedTimeObjective

import solverlab
from solverlab import TimeMap, TorchModel, get_model, get_solver
from solverlab import checkpoint as ckmod
from solverlab.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    TrainedModel,
    export_checkpoint,
    load_checkpoint,
    load_weights,
    read_checkpoint,
    save_checkpoint,
    section,
    shipped_checkpoints,
)
from solverlab.cli import cli
from solverlab.compare import build_model, torch_threads
from solverlab.datasets import load_dataset
from solverlab.errors import OptionError, UnknownNameError
from solverlab.networks import MLP, build_network
from solverlab.schedule import VPDiscrete
from solverlab.train import TrainConfig, train

F64 = torch.float64


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 6-step MLP on moons with the plain loss, and a 3-step one with shared times."""
    root = tmp_path_factory.mktemp("ckpt")
    with torch_threads(1):
        plain = train(TrainConfig(dataset="moons", objective=PlainObjective(), steps=6,
                                  batch_size=64, save_every=3), root / "plain.safetensors",
                      progress=False)
        shared = train(TrainConfig(dataset="moons", objective=SharedTimeObjective(
            threshold=100, n=5), steps=3, batch_size=64, network={"hidden": 32}),
            root / "shared.safetensors", progress=False)
    return plain.path, shared.path


def copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


def sample(model, solver="ddim", steps=8, seed=0, dtype=torch.float32):
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    grid = solverlab.get_grid("logsnr")(model.schedule, steps)
    return get_solver(solver).solve(model, x, grid).x


# -- round trips -------------------------------------------------------------------------------
def test_round_trip_gives_the_same_samples(trained, tmp_path):
    path, _ = trained
    ck = load_checkpoint(path)
    assert isinstance(ck.model, TrainedModel) and not ck.module.training
    assert ck.step == 6 and ck.network["kind"] == "mlp"
    # the same weights put into a fresh network by hand
    module = build_network(ck.network)
    module.load_state_dict(section(load_file(path), "ema"))
    by_hand = TorchModel(module.eval(), VPDiscrete(), "noise", time_input="index")
    assert torch.equal(sample(ck.model), sample(by_hand))
    raw = load_checkpoint(path, ema=False)
    assert not torch.equal(sample(raw.model), sample(ck.model))
    # an export loads to the same model
    exported = export_checkpoint(path, tmp_path / "x.safetensors")
    assert torch.equal(sample(load_checkpoint(exported).model), sample(ck.model))


def test_export_drops_the_training_state(trained, tmp_path):
    path, _ = trained
    dst = export_checkpoint(path, tmp_path / "x.safetensors")
    tensors, meta, _ = read_checkpoint(dst)
    assert meta["contents"] == ["model", "ema", "train"]
    assert "optimizer" not in meta
    assert not [k for k in tensors if k.startswith(("optim.", "rng."))]
    assert dst.stat().st_size < 0.55 * path.stat().st_size
    src_meta = read_checkpoint(path)[1]
    for key in ("network", "objective", "schedule", "time_map", "dataset", "train", "step"):
        assert meta[key] == src_meta[key]


def test_float64_loading_and_training_data(trained):
    path, _ = trained
    ck = load_checkpoint(path, dtype=F64)
    assert next(ck.module.parameters()).dtype == F64
    assert ck.model.data.sample(5, torch.Generator().manual_seed(0)).dtype == F64
    assert torch.equal(ck.data(100, seed=3), load_dataset("moons", 100, seed=3))
    x = ck.model.sample_prior(7, generator=torch.Generator().manual_seed(1))
    assert x.shape == (7, 2) and x.dtype == F64
    # a float32 network answers float64 inputs in float64
    ck32 = load_checkpoint(path)
    out = ck32.model(torch.zeros(3, 2, dtype=F64), torch.full((3,), 0.5, dtype=F64))
    assert out.dtype == F64


# -- the time map travels ----------------------------------------------------------------------
class Quantising(nn.Module):
    """``module`` fed the shared time, the map applied inside the network."""

    def __init__(self, module: nn.Module, time_map: TimeMap) -> None:
        super().__init__()
        self.module, self.time_map = module, time_map

    def forward(self, x, s):
        return self.module(x, self.time_map(s.to(F64)).to(s.dtype))


@pytest.mark.parametrize("solver", ["ddim", "dpmpp-2m", "unipc", "heun"])
def test_loaded_model_feeds_the_shared_time_and_keeps_the_true_schedule(trained, solver):
    _, path = trained
    ck = load_checkpoint(path, dtype=F64)
    tmap = TimeMap(threshold=100, n=5)
    assert ck.model.time_map == tmap
    seen = []
    hook = ck.module.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    grid = solverlab.get_grid("time-uniform")(ck.model.schedule, 12)
    try:
        out = get_solver(solver).solve(ck.model, x, grid).x
    finally:
        hook.remove()
    s = torch.cat(seen)
    low = s[s < 100]
    assert low.numel() > 0, "the solve never reached the shared range"
    assert set(low.tolist()) <= {0.0, 20.0, 40.0, 60.0, 80.0}
    # the same solve with the map inside the network and a plain model: alpha, sigma and
    # lambda at the true times in both, so the results agree to round-off
    plain = TorchModel(Quantising(ck.module, tmap), ck.model.schedule, "noise",
                       time_input="index")
    ref = get_solver(solver).solve(plain, x, grid).x
    assert float((out - ref).abs().max()) <= 1e-12
    # and the map matters: without it the network answers differently
    unmapped = TorchModel(ck.module, ck.model.schedule, "noise", time_input="index")
    assert float((get_solver(solver).solve(unmapped, x, grid).x - out).abs().max()) > 1e-6


# -- bad files ---------------------------------------------------------------------------------
def test_corrupt_and_truncated_files_are_named(trained, tmp_path):
    path, _ = trained
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match=r"junk\.safetensors.*truncated or corrupt"):
        load_checkpoint(junk)
    half = tmp_path / "half.safetensors"
    half.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"half\.safetensors.*truncated or corrupt"):
        load_checkpoint(half)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.safetensors"):
        load_checkpoint(empty)
    flipped = tmp_path / "flipped.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's data
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"flipped\.safetensors' is corrupt.*fingerprint"):
        load_checkpoint(flipped)


def test_a_file_that_is_not_a_checkpoint(tmp_path):
    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(3)}, other, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"other\.safetensors' has format 'pt'; expected "
                                              r"'solverlab-checkpoint'"):
        load_checkpoint(other)
    ems = tmp_path / "ems.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(3)}, ems)
    with pytest.raises(CheckpointError, match="has format None"):
        load_checkpoint(ems)


def test_missing_metadata_is_named(trained, tmp_path):
    path, _ = trained
    tensors = load_file(path)
    with safetensors.safe_open(path, "pt") as f:
        meta = dict(f.metadata())
    del meta["network"]
    bad = tmp_path / "nonet.safetensors"
    safetensors.torch.save_file(tensors, bad, metadata=meta)
    with pytest.raises(CheckpointError, match=r"nonet\.safetensors' lacks the metadata "
                                              r"'network'"):
        load_checkpoint(bad)
    meta = {**meta, "network": "{not json", "version": "7"}
    safetensors.torch.save_file(tensors, bad, metadata=meta)
    with pytest.raises(CheckpointError, match="version '7'"):
        load_checkpoint(bad)


def test_another_network_config_names_the_field(trained, tmp_path):
    path, _ = trained
    with pytest.raises(CheckpointMismatchError,
                       match=r"network\.hidden differs: the checkpoint has 128, the caller "
                             r"expects 64"):
        load_checkpoint(path, network={**load_checkpoint(path).network, "hidden": 64})
    tensors, meta, _ = read_checkpoint(path)
    with pytest.raises(CheckpointMismatchError, match=r"network\.depth differs: the checkpoint "
                                                       r"has 3, the network to load into has 2"):
        load_weights(MLP(depth=2), section(tensors, "ema"), where="here",
                     stored_config=meta["network"])
    # a file whose config does not describe its weights
    lying = tmp_path / "lying.safetensors"
    save_checkpoint(lying, tensors, {**meta, "network": {**meta["network"], "hidden": 64}})
    with pytest.raises(CheckpointMismatchError,
                       match=r"lying\.safetensors.*tensor 'blocks\.0\.lin1\.bias' has shape "
                             r"\(128,\) in the checkpoint, \(64,\) in the network"):
        load_checkpoint(lying)


def test_a_failed_write_leaves_the_previous_checkpoint(trained, tmp_path, monkeypatch):
    path, _ = trained
    target = copy(path, tmp_path / "keep.safetensors")
    before = target.read_bytes()
    tensors, meta, _ = read_checkpoint(target)
    real = ckmod.atomic_write

    def dies_half_way(p, write, binary=False):
        def half(f):
            f.write(b"\0" * 1000)
            raise OSError(28, "No space left on device")
        return real(p, half, binary=binary)

    monkeypatch.setattr(ckmod, "atomic_write", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(target, tensors, {**meta, "step": 99})
    monkeypatch.setattr(ckmod, "atomic_write", real)

    def no_serialisation(*args, **kwargs):
        raise RuntimeError("serialisation failed")

    monkeypatch.setattr(safetensors.torch, "save", no_serialisation)
    with pytest.raises(RuntimeError, match="serialisation failed"):
        save_checkpoint(target, tensors, {**meta, "step": 99})
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert load_checkpoint(target).step == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors"]  # no temp files


def test_a_failed_save_during_training_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "t.safetensors"
    real, calls = ckmod.atomic_write, []

    def second_fails(p, write, binary=False):
        calls.append(p)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(p, write, binary=binary)

    monkeypatch.setattr(ckmod, "atomic_write", second_fails)
    with pytest.raises(OSError):
        train(TrainConfig(objective=PlainObjective(), steps=6, batch_size=16, save_every=2,
                          network={"hidden": 16}), out, progress=False)
    assert read_checkpoint(out)[1]["step"] == 2


def test_save_checkpoint_checks_what_it_writes(trained, tmp_path):
    path, _ = trained
    tensors, meta, _ = read_checkpoint(path)
    with pytest.raises(OptionError, match="lacks 'dataset'"):
        save_checkpoint(tmp_path / "a.safetensors", tensors,
                        {k: v for k, v in meta.items() if k != "dataset"})
    with pytest.raises(OptionError, match="no known prefix"):
        save_checkpoint(tmp_path / "a.safetensors", {**tensors, "weights": torch.zeros(1)}, meta)
    with pytest.raises(OptionError, match="cannot be stored as JSON"):
        save_checkpoint(tmp_path / "a.safetensors", tensors, {**meta, "train": {"x": object()}})
    assert not (tmp_path / "a.safetensors").exists()


# -- names -------------------------------------------------------------------------------------
@pytest.fixture
def shipped(trained, tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    export_checkpoint(trained[0], folder / "toy-plain.safetensors")
    monkeypatch.setattr(ckmod, "SHIPPED", folder)
    return folder


def test_shipped_checkpoints_load_by_name(shipped):
    assert shipped_checkpoints() == ["toy-plain"]
    ck = load_checkpoint("toy-plain")
    assert ck.path == shipped / "toy-plain.safetensors" and ck.name == "toy-plain"
    model = get_model("toy-plain")
    assert isinstance(model, TrainedModel) and model.name == "toy-plain"
    assert next(model.module.parameters()).dtype == F64  # compare's float64 solves
    assert next(get_model("toy-plain", dtype="float32").module.parameters()).dtype == \
        torch.float32
    assert not torch.equal(next(get_model("toy-plain", ema=False).module.parameters()),
                           next(model.module.parameters()))
    with pytest.raises(OptionError, match=r"no option 'dim'.*ema, dtype"):
        get_model("toy-plain", dim=3)
    with pytest.raises(OptionError, match="dtype='half'"):
        get_model("toy-plain", dtype="half")
    assert isinstance(build_model("toy-plain"), TrainedModel)
    with pytest.raises(OptionError, match="own schedule"):
        build_model("toy-plain", schedule="vp-linear")
    assert isinstance(get_model(str(shipped / "toy-plain.safetensors")), TrainedModel)


def test_unknown_names_list_models_and_checkpoints(shipped):
    with pytest.raises(CheckpointError, match=r"'toy-plian'.*did you mean 'toy-plain'.*shipped "
                                              r"checkpoints: toy-plain"):
        load_checkpoint("toy-plian")
    with pytest.raises(UnknownNameError) as e:
        get_model("toy-plian")
    msg = str(e.value)
    assert "gaussian-mixture" in msg and "did you mean 'toy-plain'" in msg
    with pytest.raises(CheckpointError, match=r"no checkpoint 'nowhere/x\.safetensors'"):
        load_checkpoint("nowhere/x.safetensors")
    assert isinstance(get_model("gaussian"), solverlab.Model)  # registered names first


def test_compare_prepares_data_hungry_solvers_from_the_training_data(shipped):
    from solverlab.compare import _prepared

    got = {}

    class NeedsData:
        def prepare(self, model, data):
            got["data"] = data
            return self

    model = get_model("toy-plain")
    _prepared(NeedsData(), model, seed=0)
    assert got["data"].shape == (1024, 2) and got["data"].dtype == F64


def test_checkpoint_commands(shipped, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["checkpoint", "list"])
    assert result.exit_code == 0 and "toy-plain" in result.output
    result = runner.invoke(cli, ["checkpoint", "info", "toy-plain"])
    info = json.loads(result.output)
    assert info["step"] == 6 and info["format"] == "solverlab-checkpoint"
    dst = tmp_path / "copy.safetensors"
    result = runner.invoke(cli, ["checkpoint", "export", "toy-plain", str(dst)])
    assert result.exit_code == 0 and dst.exists()
    result = runner.invoke(cli, ["checkpoint", "export", "toy-plain", str(dst)])
    assert result.exit_code == 2 and "--force" in result.output
    result = runner.invoke(cli, ["checkpoint", "info", "toy-plian"])
    assert result.exit_code == 2 and "did you mean 'toy-plain'" in result.output


@pytest.mark.skipif("etsdm" not in solverlab.get_registry().names("objective"),
                    reason="objective 'etsdm' not registered")
def test_an_etsdm_checkpoint_carries_the_papers_map(tmp_path):
    with torch_threads(1):
        train(TrainConfig(objective="etsdm", steps=2, batch_size=16, network={"hidden": 16}),
              tmp_path / "e.safetensors", progress=False)
    ck = load_checkpoint(tmp_path / "e.safetensors", dtype=F64)
    assert ck.model.time_map == TimeMap(threshold=100, n=5)  # 100 of DDPM's 1000 steps, n = 5
    t = torch.tensor([0.001, 0.05, 0.099, 0.101, 0.5], dtype=F64)  # index 0, 49, 98, 100, 499
    assert ck.model.network_time(t).tolist() == [0.0, 40.0, 80.0, 100.0, 499.0]
