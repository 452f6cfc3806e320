"""The shipped training data sets and the small networks that train on them."""

from __future__ import annotations

import builtins
import math

import pytest
import torch

import solverlab
from solverlab import datasets
from solverlab.datasets import DATASETS, Digits, get_dataset, load_dataset
from solverlab.errors import MissingExtraError, OptionError, UnknownNameError
from solverlab.networks import MLP, UNet, build_network, timestep_embedding

TWO_D = ["moons", "swissroll", "checkerboard", "gmm"]


@pytest.mark.parametrize("name", TWO_D)
def test_two_d_sets_are_centred_with_unit_variance(name):
    x = load_dataset(name, 20_000, seed=1)
    assert x.shape == (20_000, 2) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert x.mean(0).abs().max() < 0.05
    assert 0.85 < float(x.var(0).mean()) < 1.15


@pytest.mark.parametrize("name", [*TWO_D, "digits"])
def test_a_seed_fixes_the_points(name):
    a, b = load_dataset(name, 300, seed=3), load_dataset(name, 300, seed=3)
    c = load_dataset(name, 300, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    ds = get_dataset(name)
    assert torch.equal(ds.sample(50, g1), ds.sample(50, g2))


def test_digits_are_sklearn_digits_in_minus_one_one():
    sk = pytest.importorskip("sklearn.datasets")
    x = load_dataset("digits")
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    images = torch.as_tensor(sk.load_digits().images, dtype=torch.float32)
    assert torch.equal(x[:, 0], images / 8 - 1)
    assert load_dataset("digits", 10, seed=0, dtype=torch.float64).dtype == torch.float64


def test_gmm_points_sit_near_their_ring_means():
    ds = get_dataset("gmm", components=6, radius=2.0, std=0.05)
    x = ds.sample(2000, torch.Generator().manual_seed(0), torch.float64)
    d = torch.cdist(x, ds.means()).min(1).values
    assert float(d.max()) < 0.05 * 6  # 6 standard deviations
    radii = x.norm(dim=1)
    assert abs(float(radii.mean()) - 2.0) < 0.01


def test_checkerboard_points_lie_on_the_dark_squares():
    x = load_dataset("checkerboard", 5000, seed=0, dtype=torch.float64) / (math.sqrt(3) / 2)
    assert float(x.abs().max()) <= 2.0
    parity = (torch.floor(x[:, 0]) + torch.floor(x[:, 1])) % 2
    assert bool((parity == 0).all())


def test_moons_noise_option_widens_the_arcs():
    clean = load_dataset("moons", 4000, seed=0, noise=0.0, dtype=torch.float64)
    # noiseless upper arc: (cos u - 1/2, sin u - 1/4) / 0.705 has radius 1/0.705 about
    # (-1/2, -1/4)/0.705, lower arc radius 1/0.705 about (1/2, 1/4)/0.705
    c = torch.tensor([0.5, 0.25], dtype=torch.float64) / 0.705
    off = torch.minimum(((clean + c).norm(dim=1) - 1 / 0.705).abs(),
                        ((clean - c).norm(dim=1) - 1 / 0.705).abs())
    assert float(off.max()) < 1e-9
    noisy = load_dataset("moons", 4000, seed=0, noise=0.2, dtype=torch.float64)
    assert float(noisy.var(0).sum()) > float(clean.var(0).sum()) + 0.05


def test_unknown_dataset_lists_the_names():
    with pytest.raises(UnknownNameError) as e:
        get_dataset("moon")
    msg = str(e.value)
    assert "'moon'" in msg and "did you mean 'moons'" in msg
    assert all(n in msg for n in DATASETS)


def test_unknown_and_bad_options_are_named():
    with pytest.raises(OptionError, match=r"no option 'noize'.*options are: noise"):
        get_dataset("moons", noize=0.1)
    with pytest.raises(OptionError, match=r"noise=-1"):
        get_dataset("moons", noise=-1)
    with pytest.raises(OptionError, match=r"components=0"):
        get_dataset("gmm", components=0)
    with pytest.raises(OptionError, match=r"n=0"):
        load_dataset("moons", 0)


def test_missing_scikit_learn_names_the_extra(monkeypatch):
    real = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.split(".")[0] == "sklearn":
            raise ImportError("No module named 'sklearn'")
        return real(name, *args, **kwargs)

    datasets._sklearn_digits.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    try:
        with pytest.raises(MissingExtraError) as e:
            load_dataset("digits")
        assert "pip install 'solverlab[digits]'" in str(e.value)
        assert isinstance(e.value, ImportError) and isinstance(e.value, solverlab.SolverlabError)
        with pytest.raises(MissingExtraError):
            Digits().sample(4)
    finally:
        monkeypatch.undo()
        datasets._sklearn_digits.cache_clear()


def test_dataset_spec_rebuilds_the_set():
    ds = get_dataset("gmm", components=5, std=0.2)
    again = get_dataset(ds.spec()["name"], **ds.spec()["options"])
    assert again == ds and again.spec() == {"name": "gmm",
                                            "options": {"components": 5, "radius": 1.4,
                                                        "std": 0.2}}


# -- networks --------------------------------------------------------------------------------
def test_timestep_embedding_values():
    e = timestep_embedding(torch.tensor([0.0, 3.0]), 4)
    w = torch.tensor([1.0, 10_000 ** -0.5])
    assert torch.allclose(e[1], torch.cat([torch.cos(3 * w), torch.sin(3 * w)]))
    assert torch.equal(e[0], torch.tensor([1.0, 1.0, 0.0, 0.0]))


@pytest.mark.parametrize("config, shape", [({"kind": "mlp"}, (2,)),
                                           ({"kind": "mlp", "dim": 3, "hidden": 32}, (3,)),
                                           ({"kind": "unet"}, (1, 8, 8)),
                                           ({"kind": "unet", "base": 16, "channels": 3},
                                            (3, 8, 8))])
def test_networks_keep_the_shape_and_rebuild_from_their_config(config, shape):
    torch.manual_seed(0)
    net = build_network(config)
    x = torch.randn(5, *shape)
    s = torch.tensor([0.0, 10.0, 100.0, 500.0, 999.0])
    out = net(x, s)
    assert out.shape == x.shape
    torch.manual_seed(0)
    again = build_network(net.config)
    assert again.config == net.config
    assert torch.equal(again(x, s), out)
    # the time input matters
    assert not torch.allclose(net(x, s), net(x, s.flip(0)))


def test_network_sizes_fit_small_checkpoints():
    n_mlp = sum(p.numel() for p in MLP().parameters())
    n_unet = sum(p.numel() for p in UNet().parameters())
    assert 100_000 < n_mlp < 200_000
    assert 100_000 < n_unet < 300_000  # EMA + raw weights < 2.4 MB in float32


def test_network_config_errors():
    with pytest.raises(OptionError, match=r"kind='mpl'.*did you mean 'mlp'"):
        build_network({"kind": "mpl"})
    with pytest.raises(OptionError, match=r"no option 'width'.*hidden"):
        build_network({"kind": "mlp", "width": 3})
    with pytest.raises(OptionError, match=r"time_embedding=63"):
        build_network({"kind": "unet", "time_embedding": 63})
    with pytest.raises(OptionError, match=r"time_scale=0"):
        build_network({"kind": "mlp", "time_scale": 0})
