"""solverlab.metrics: Fréchet distance (closed form and sampled), sliced Wasserstein (known
values), the shipped digits classifier, and the Lipschitz probe in time on real networks
(smooth, timestep-shared, time-blind), its report and the `solverlab lipschitz` command."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import solverlab
from solverlab import TimeMap, TorchModel, datasets
from solverlab import metrics as M
from solverlab.cli import cli
from solverlab.errors import InputError, ModelOutputError, OptionError, SolverlabError
from solverlab.schedule import VPDiscrete, VPLinear

F64 = torch.float64
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N = 1000  # steps of the default vp-discrete schedule


# -- Fréchet distance ------------------------------------------------------------------------
MU1 = torch.tensor([0.0, 1.0, -1.0], dtype=F64)
MU2 = torch.tensor([1.0, 0.5, 0.0], dtype=F64)
S1 = torch.tensor([[1.0, 0.3, 0.0], [0.3, 2.0, 0.5], [0.0, 0.5, 0.7]], dtype=F64)
S2 = torch.tensor([[2.0, -0.4, 0.2], [-0.4, 1.0, 0.0], [0.2, 0.0, 1.5]], dtype=F64)


def test_gaussian_frechet_diagonal_by_hand():
    # ||mu1 - mu2||^2 = 1 + 4 = 5; for diagonal covariances the trace term is
    # sum (sqrt(a_i) - sqrt(b_i))^2 = (1 - 2)^2 + (2 - 3)^2 = 2: total 7.
    d = M.gaussian_frechet([0.0, 0.0], torch.diag(torch.tensor([1.0, 4.0])), [1.0, 2.0],
                           torch.diag(torch.tensor([4.0, 9.0])))
    assert d == pytest.approx(7.0, abs=1e-12)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert M.gaussian_frechet([0.5], [[0.25]], [2.0], [[4.0]]) == pytest.approx(
        1.5**2 + 1.5**2, abs=1e-12)


def test_gaussian_frechet_matches_the_non_symmetric_matrix_square_root():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    a, b = S1.numpy(), S2.numpy()
    expected = float((MU1 - MU2).square().sum()) + float(
        (a + b - 2 * scipy_linalg.sqrtm(a @ b).real).trace())
    assert M.gaussian_frechet(MU1, S1, MU2, S2) == pytest.approx(expected, abs=1e-10)
    assert M.gaussian_frechet(MU1, S1, MU1, S1) == pytest.approx(0.0, abs=1e-12)


def test_frechet_of_samples_matches_the_closed_form():
    # n = 1e5 draws each: the standard deviation of the estimate is about 0.013 here
    # (measured over 20 seeds, bias below 0.003); the bound allows 5 of them.
    n = 100_000
    g = torch.Generator().manual_seed(3)
    a = MU1 + torch.randn(n, 3, generator=g, dtype=F64) @ torch.linalg.cholesky(S1).T
    b = MU2 + torch.randn(n, 3, generator=g, dtype=F64) @ torch.linalg.cholesky(S2).T
    exact = M.gaussian_frechet(MU1, S1, MU2, S2)
    assert exact == pytest.approx(3.0438917, abs=1e-6)
    assert abs(M.frechet_distance(a, b) - exact) < 0.07


def test_frechet_of_a_set_with_itself_is_zero():
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(0), dtype=F64) * 3 + 1
    assert M.frechet_distance(x, x) < 1e-9
    assert M.frechet_distance(x, x + 2.0) == pytest.approx(8 * 4.0, rel=1e-9)


@pytest.mark.parametrize(("a", "b", "error", "needle"), [
    (torch.zeros(5), torch.zeros(5, 2), InputError, "2-D"),
    (torch.zeros(1, 2), torch.zeros(5, 2), InputError, "at least 2"),
    (torch.zeros(5, 3), torch.zeros(5, 2), InputError, "same dimension"),
    (torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), torch.zeros(5, 2), InputError, "NaN"),
    ("abc", torch.zeros(5, 2), InputError, "not a tensor"),
])
def test_frechet_distance_bad_inputs(a, b, error, needle):
    with pytest.raises(error, match=needle):
        M.frechet_distance(a, b)


def test_gaussian_frechet_bad_inputs():
    with pytest.raises(InputError, match="positive semi-definite"):
        M.gaussian_frechet([0, 0], [[1.0, 0.0], [0.0, -1.0]], [0, 0], torch.eye(2))
    with pytest.raises(InputError, match="not symmetric"):
        M.gaussian_frechet([0, 0], [[1.0, 0.5], [0.0, 1.0]], [0, 0], torch.eye(2))
    with pytest.raises(InputError, match=r"\(2, 2\)"):
        M.gaussian_frechet([0, 0], torch.eye(3), [0, 0], torch.eye(2))
    with pytest.raises(InputError, match="same length"):
        M.gaussian_frechet([0, 0], torch.eye(2), [0, 0, 0], torch.eye(3))


# -- sliced Wasserstein ----------------------------------------------------------------------
def _sw2_sq_bound(m_norm_sq: float, projections: int) -> float:
    # SW2^2 is the mean over directions of ||m||^2 cos^2(phi); Var[cos^2] = 1/8 in 2-D.
    return 4 * m_norm_sq * math.sqrt(1 / 8) / math.sqrt(projections)


def test_sliced_wasserstein_of_identical_sets_is_zero():
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert M.sliced_wasserstein(x, x) == 0.0
    assert M.sliced_wasserstein(x, x[torch.randperm(300)]) == 0.0  # order does not matter
    # a set against itself repeated: the same empirical measure (unequal sizes)
    assert M.sliced_wasserstein(x, torch.cat([x, x])) < 1e-12


def test_sliced_wasserstein_of_a_shift():
    # b = a + m: W2(theta) = |theta.m| exactly, E[(theta.m)^2] = ||m||^2 / 2 in 2-D
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    m = torch.tensor([3.0, -4.0], dtype=F64)
    k = 4096
    sw = M.sliced_wasserstein(x, x + m, projections=k)
    assert abs(sw**2 - 25 / 2) < _sw2_sq_bound(25.0, k)
    assert sw == pytest.approx(5 / math.sqrt(2), rel=0.02)
    # the same for any p: W_p(theta) = |theta.m|; SW_1 = E|theta.m| = 2 ||m|| / pi in 2-D
    assert M.sliced_wasserstein(x, x + m, projections=k, p=1) == pytest.approx(
        10 / math.pi, rel=0.02)
    # shift invariance: moving both sets changes nothing (same directions: default seed)
    assert M.sliced_wasserstein(x + 7.0, x + m + 7.0, projections=k) == pytest.approx(
        sw, rel=1e-12)


def test_sliced_wasserstein_of_two_gaussians():
    # N(m1, s^2 I) vs N(m2, s^2 I), independent samples: SW2^2 = ||m1 - m2||^2 / 2 plus the
    # empirical measures' own distance (O(log n / n) for n = 5000: about 1e-3 here).
    g = torch.Generator().manual_seed(4)
    n, s, k = 5000, 0.7, 2048
    m1, m2 = torch.tensor([1.0, 2.0], dtype=F64), torch.tensor([-1.0, 0.5], dtype=F64)
    a = m1 + s * torch.randn(n, 2, generator=g, dtype=F64)
    b = m2 + s * torch.randn(n, 2, generator=g, dtype=F64)
    sq = float((m1 - m2).square().sum())
    sw = M.sliced_wasserstein(a, b, projections=k, generator=torch.Generator().manual_seed(9))
    assert abs(sw**2 - sq / 2) < _sw2_sq_bound(sq, k) + 5e-3


def test_sliced_wasserstein_of_point_masses_of_unequal_sizes():
    u, v = torch.tensor([[1.0, 2.0]], dtype=F64), torch.tensor([[4.0, -2.0]], dtype=F64)
    a, b = u.repeat(3, 1), v.repeat(5, 1)
    k = 4096
    assert abs(M.sliced_wasserstein(a, b, projections=k) ** 2 - 25 / 2) < _sw2_sq_bound(25, k)
    assert M.sliced_wasserstein(a, b, projections=k, p=1) == pytest.approx(10 / math.pi,
                                                                           rel=0.02)


def test_sliced_wasserstein_in_one_dimension_is_the_exact_wasserstein_distance():
    # quantile functions of {0, 1} and {0, 0.5, 1} differ by 0.5 on [1/3, 1/2) and [1/2, 2/3)
    a = torch.tensor([[0.0], [1.0]], dtype=F64)
    b = torch.tensor([[0.0], [0.5], [1.0]], dtype=F64)
    assert M.sliced_wasserstein(a, b, p=1, projections=3) == pytest.approx(1 / 6, abs=1e-14)
    assert M.sliced_wasserstein(a, b, p=2, projections=3) == pytest.approx(
        math.sqrt(1 / 12), abs=1e-14)
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(37, 1, generator=g, dtype=F64), torch.randn(53, 1, generator=g,
                                                                 dtype=F64) + 0.3
    assert M.sliced_wasserstein(x, y, p=1, projections=2) == pytest.approx(
        stats.wasserstein_distance(x[:, 0].numpy(), y[:, 0].numpy()), abs=1e-12)


def test_sliced_wasserstein_bad_inputs():
    x = torch.zeros(4, 2)
    with pytest.raises(InputError, match="same dimension"):
        M.sliced_wasserstein(x, torch.zeros(4, 3))
    with pytest.raises(OptionError, match=r"p=0\.5"):
        M.sliced_wasserstein(x, x, p=0.5)
    with pytest.raises(OptionError, match="projections=0"):
        M.sliced_wasserstein(x, x, projections=0)
    with pytest.raises(OptionError, match="generator"):
        M.sliced_wasserstein(x, x, generator=0)
    with pytest.raises(InputError, match="NaN"):
        M.sliced_wasserstein(x, torch.full((3, 2), float("inf")))


# -- the digits classifier -------------------------------------------------------------------
@pytest.fixture
def no_sklearn(monkeypatch):
    """scikit-learn made unimportable, the classifier's caches emptied (and again after)."""
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    caches = (M._shipped, M._reference_features, datasets._sklearn_digits)
    for c in caches:
        c.cache_clear()
    yield
    for c in caches:
        c.cache_clear()


def test_the_classifier_loads_without_sklearn(no_sklearn):
    info = M.digits_classifier_info()
    assert info["features"] == 32 and info["seed"] == 0
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    f = M.digits_features(x)
    assert f.shape == (5, 32) and f.dtype == F64
    # digits_frechet with an explicit reference needs no sklearn either
    y = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert M.digits_frechet(x, y) >= 0.0
    with pytest.raises(SolverlabError, match=r"solverlab\[digits\]"):
        M.digits_frechet(x)
    with pytest.raises(SolverlabError, match=r"solverlab\[digits\]"):
        M.digits_dataset()


def test_the_shipped_classifier_has_its_documented_test_accuracy():
    pytest.importorskip("sklearn")
    info = M.digits_classifier_info()
    x, y = M.digits_dataset("test")
    assert x.shape == (360, 1, 8, 8) and float(x.min()) == -1.0 and float(x.max()) == 1.0
    with torch.no_grad():
        acc = float((M.digits_classifier()(x).argmax(1) == y).double().mean())
    assert acc == pytest.approx(info["test_accuracy"], abs=1e-6)
    assert acc > 0.95
    assert acc == pytest.approx(0.9777777777777777, abs=1e-6)  # the figure docs/metrics.md gives
    assert "train-classifier" in info["command"] and info["steps"] >= 1
    path = Path(M.__file__).parent / M.CLASSIFIER_FILE
    assert path.stat().st_size < 200_000


def test_digits_frechet_is_small_for_digits_and_large_for_noise():
    pytest.importorskip("sklearn")
    every, _ = M.digits_dataset("all")
    train, _ = M.digits_dataset("train")
    assert M.digits_frechet(every) < 1e-6  # the default reference is the full set
    noise = torch.rand(1000, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    near, far = M.digits_frechet(train), M.digits_frechet(noise)
    assert far > 100 * near, (near, far)
    # digits with added Gaussian pixel noise: the distance grows with the noise level
    g = torch.Generator().manual_seed(0)
    noisy = [M.digits_frechet((every + s * torch.randn(every.shape, generator=g)).clamp(-1, 1))
             for s in (0.1, 0.2, 0.4)]
    assert noisy == sorted(noisy) and noisy[-1] < far, noisy


def test_digits_features_bad_inputs():
    with pytest.raises(InputError, match=r"\(n, 1, 8, 8\)"):
        M.digits_features(torch.zeros(3, 64))
    with pytest.raises(InputError, match="NaN"):
        M.digits_features(torch.full((2, 1, 8, 8), float("nan")))
    with pytest.raises(InputError, match="at least 2"):
        M.digits_frechet(torch.zeros(1, 1, 8, 8), torch.zeros(4, 1, 8, 8))
    with pytest.raises(OptionError, match="split='valid'"):
        M.digits_dataset("valid")


def test_training_the_classifier(tmp_path):
    pytest.importorskip("sklearn")
    meta = M.train_digits_classifier(tmp_path / "c.safetensors", seed=1, steps=150)
    assert float(meta["test_accuracy"]) > 0.8
    from safetensors import safe_open

    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        assert f.metadata()["test_accuracy"] == meta["test_accuracy"]
        assert set(f.keys()) == set(M.DigitsClassifier().state_dict())
    # the documented command
    assert M.main(["train-classifier", "--out", str(tmp_path / "d.safetensors"), "--steps",
                   "5"]) == 0
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as f:
        assert f.metadata()["command"].startswith(
            "python -m solverlab.metrics train-classifier --seed 0 --steps 5 --out ")
    assert M.main(["train-classifier", "--out", str(tmp_path / "e"), "--steps", "0"]) == 2


# -- the Lipschitz probe ---------------------------------------------------------------------
class CosineScale(nn.Module):
    """eps = w cos(s / 200) x / ||x||: ||eps(x, s+1) - eps(x, s)|| = |w| |c(s+1) - c(s)| for
    every x, so K is known exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.5))

    def forward(self, x, s):
        unit = x / x.flatten(1).norm(dim=1).view(-1, *([1] * (x.ndim - 1)))
        return self.w * torch.cos(s / 200).view(-1, *([1] * (x.ndim - 1))) * unit


class TimeMLP(nn.Module):
    """A generic noise network: MLP on x and a sinusoidal embedding of the time input."""

    def __init__(self, dim: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.freqs = torch.tensor([1.0, 3.0, 10.0, 30.0]) / 1000
        self.net = nn.Sequential(nn.Linear(dim + 8, 32), nn.Tanh(), nn.Linear(32, dim)).to(F64)

    def forward(self, x, s):
        arg = s[:, None].to(x.dtype) * self.freqs.to(x.dtype)
        return self.net(torch.cat([x, torch.sin(arg), torch.cos(arg)], 1))


class TimeBlind(nn.Module):
    """Depends on x only."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(dim, 16), nn.Tanh(), nn.Linear(16, dim)).to(F64)

    def forward(self, x, s):
        return self.net(x)


def _data(n=64, dim=4, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_lipschitz_of_a_known_function_of_time():
    model = TorchModel(CosineScale(), "vp-discrete", time_input="index")
    k = torch.arange(0, 400, 7)
    ts = (k.to(F64) + 1) / N
    res = M.lipschitz_profile(model, _data(), ts)
    assert res["dt"] == pytest.approx(1 / N, abs=1e-18)
    kk = torch.tensor(res["K"], dtype=F64)
    s = k.to(F64)
    # exactly the difference quotient over one step (up to round-off) ...
    quotient = 1.5 * (torch.cos((s + 1) / 200) - torch.cos(s / 200)).abs() * N
    assert torch.allclose(kk, quotient, rtol=1e-9, atol=1e-9)
    # ... which is |dc/ds| N within the Taylor remainder max|c''| / 2 N = N / (2 200^2)
    derivative = 1.5 * torch.sin(s / 200).abs() / 200 * N
    assert (kk - derivative).abs().max() <= 1.5 * N / (2 * 200**2) + 1e-9
    assert res["boundaries"] == [] and res["jumps"] == []


def test_lipschitz_on_a_continuous_time_network():
    class SinT(CosineScale):
        def forward(self, x, s):
            return super().forward(x, 200 * 3 * s)  # w cos(3 t) x / ||x||

    model = TorchModel(SinT(), "vp-linear", time_input="t")
    ts = torch.tensor([0.001, 0.1, 0.3, 0.9], dtype=F64)
    res = M.lipschitz_profile(model, _data(), ts)
    dt = res["dt"]
    assert dt == pytest.approx(1e-3 * (1.0 - 1e-3))
    t = ts
    expected = 1.5 * (torch.cos(3 * (t + dt)) - torch.cos(3 * t)).abs() / dt
    assert torch.allclose(torch.tensor(res["K"], dtype=F64), expected, rtol=1e-7)


def test_lipschitz_of_a_timestep_shared_network():
    net = TimeMLP()
    shared = TorchModel(net, "vp-discrete", time_input="index",
                        time_map=TimeMap(threshold=100, n=5))
    ks = list(range(0, 151))
    ts = torch.tensor([(k + 1) / N for k in ks], dtype=F64)
    res = M.lipschitz_profile(shared, _data(), ts)
    kk = res["K"]
    straddling = {19, 39, 59, 79, 99}
    for k, value, same in zip(ks, kk, res["same_network_time"]):
        if k < 100 and k not in straddling:
            assert value == 0.0 and same, k  # exactly: the network sees the same input
        else:
            assert value > 0.0 and not same, k
    # boundaries at the physical times of index 20, 40, 60, 80, 100: t = (s + 1) / N
    assert res["boundaries"] == pytest.approx([21 / N, 41 / N, 61 / N, 81 / N, 101 / N],
                                              abs=1e-15)
    assert [j["network_time"] for j in res["jumps"]] == [20.0, 40.0, 60.0, 80.0, 100.0]
    for j, k in zip(res["jumps"], sorted(straddling)):
        assert j["t_eval"] == pytest.approx((k + 1) / N, abs=1e-15)
        assert j["K"] == kk[k]  # the same step, evaluated again
    # a jump holds the change of a whole sub-interval (20 steps): larger than plain steps
    plain = M.lipschitz_profile(TorchModel(net, "vp-discrete", time_input="index"), _data(),
                                ts)
    assert all(v > 0 for v in plain["K"])
    assert min(j["K"] for j in res["jumps"][:4]) > 5 * max(plain["K"][:100])
    cmp = M.lipschitz_comparison(res, plain)
    assert cmp["inside_steps"] == cmp["inside_zero"] == 100 - 5
    assert cmp["region_end"] == pytest.approx(101 / N)
    assert cmp["plain_max_K"] == max(plain["K"][:100])  # the plain model for t < 0.101
    assert cmp["max_K"] == max(j["K"] for j in res["jumps"])
    assert [r["plain_K"] for r in cmp["jumps"]] == [plain["K"][k] for k in sorted(straddling)]
    assert "did not lower the largest K" in " ".join(cmp["summary"])


def test_lipschitz_uses_the_same_noised_input_for_both_evaluations():
    model = TorchModel(TimeBlind(), "vp-linear", time_input="t")
    ts = M.lipschitz_grid(model.schedule, 16)
    res = M.lipschitz_profile(model, _data(), ts)
    assert res["K"] == [0.0] * len(ts)
    # not trivially: the noised inputs (and so the outputs) differ between times
    den = solverlab.Denoiser(model)
    x0 = _data()
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    outs = [den.noise(model.schedule.alpha(t) * x0 + model.schedule.sigma(t) * z,
                      torch.full((64,), t, dtype=F64)) for t in (0.01, 0.02)]
    assert not torch.equal(outs[0], outs[1])


def test_lipschitz_grid():
    sched = VPDiscrete()
    t = M.lipschitz_grid(sched, 128)
    assert t.dtype == F64 and bool((t[1:] > t[:-1]).all())
    nodes = t * N
    assert torch.allclose(nodes, nodes.round(), atol=1e-9)  # on the discrete nodes
    assert float(t[0]) == pytest.approx(1 / N) and float(t[-1]) == pytest.approx(1 - 1 / N)
    assert float((t <= 0.15 + 1e-12).double().mean()) > 0.6  # most points near 0
    assert torch.equal(t[:10] * N, torch.arange(1, 11, dtype=F64))  # the first steps, all
    c = M.lipschitz_grid(VPLinear(), 40)
    assert c.numel() == 40 and float(c[0]) == 1e-3
    assert float(c[-1]) == pytest.approx(1.0 - 1e-3 * (1.0 - 1e-3))
    assert int((c <= 1e-3 + 0.15 * 0.999 + 1e-12).sum()) == 30
    with pytest.raises(OptionError, match="near_zero"):
        M.lipschitz_grid(sched, 10, near_zero=2.0)
    with pytest.raises(OptionError, match="n=1"):
        M.lipschitz_grid(sched, 1)


def test_lipschitz_bad_inputs():
    model = TorchModel(TimeMLP(), "vp-discrete", time_input="index")
    x0 = _data()
    with pytest.raises(InputError, match="t_min <= t"):
        M.lipschitz_profile(model, x0, [1.0])  # t + dt past t_max
    with pytest.raises(OptionError, match="dt=0"):
        M.lipschitz_profile(model, x0, [0.5], 0.0)
    with pytest.raises(OptionError, match=r"not a solverlab\.Model"):
        M.lipschitz_profile(TimeMLP(), x0, [0.5])
    with pytest.raises(InputError, match="x0"):
        M.lipschitz_profile(model, torch.zeros(5), [0.5])
    with pytest.raises(InputError, match="NaN"):
        M.lipschitz_profile(model, x0.clone().fill_(float("nan")), [0.5])

    class Nan(TimeBlind):
        def forward(self, x, s):
            return super().forward(x, s) * torch.where(s > 0.5 * N, float("nan"), 1.0)[:, None]

    with pytest.raises(ModelOutputError, match=r"t=0\.6"):
        M.lipschitz_profile(TorchModel(Nan(), "vp-discrete", time_input="index"), x0, [0.6])


def test_run_lipschitz_writes_the_report(tmp_path):
    net = TimeMLP()
    shared = TorchModel(net, "vp-discrete", time_input="index",
                        time_map=TimeMap(threshold=100, n=5))
    plain = TorchModel(net, "vp-discrete", time_input="index")
    out = tmp_path / "lip"
    rep = M.run_lipschitz(shared, _data(32), out, points=24, compare=plain, seed=3)
    assert sorted(p.name for p in out.iterdir()) == sorted(M.LIPSCHITZ_OUTPUTS)
    data = json.loads((out / "lipschitz.json").read_text())
    assert data["t"] == rep["t"] and data["K"] == rep["K"] and data["noise_seed"] == 3
    assert len(data["jumps"]) == 5 and data["comparison"]["plain_max_K"] > 0
    # the plain model was probed on the grid and across every boundary
    assert set(data["compare"]["t"]) == set(data["t"]) | {j["t_eval"] for j in data["jumps"]}
    rows = list(csv.DictReader((out / "lipschitz.csv").open()))
    assert len(rows) == len(data["t"]) + 5
    jumps = [r for r in rows if r["kind"] == "jump"]
    assert [float(r["boundary"]) for r in jumps] == pytest.approx(data["boundaries"])
    assert all(r["K_compare"] != "" for r in rows)
    assert (out / "lipschitz.png").read_bytes()[:8] == PNG_MAGIC
    # the folder is replaced whole, and foreign files are refused
    M.run_lipschitz(plain, _data(32), out, points=8)
    assert json.loads((out / "lipschitz.json").read_text())["compare"] is None
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OptionError, match=r"notes\.txt"):
        M.lipschitz_report(data, out)


# -- the command -----------------------------------------------------------------------------
def _invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_lipschitz_command_on_a_registered_model(tmp_path):
    out = tmp_path / "out"
    r = _invoke("lipschitz", "gaussian-mixture", "--points", "8", "--samples", "16", "--out",
                str(out), "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert len(data["t"]) == 8 and data["samples"] == 16 and data["noise_seed"] == 1
    assert data["K"][0] > data["K"][-1] > 0  # the analytic eps: larger near t = 0
    assert (out / "lipschitz.png").exists()
    r = _invoke("lipschitz", "no-such-model", "--out", str(out))
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert "unknown model 'no-such-model'" in r.output and "no checkpoint" in r.output
    r = _invoke("lipschitz", "gaussian-mixture", "--dt", "-1", "--out", str(out))
    assert r.exit_code == 2 and "'--dt'" in r.output and "Traceback" not in r.output


def test_lipschitz_command_on_a_checkpoint(tmp_path):
    """End to end on real checkpoints written by the trainer: an E-TSDM model (the paper's map,
    t_tilde = 100 steps, n = 5) against a plain one."""
    paths = {}
    for objective in ("etsdm", "simple"):
        cfg = solverlab.TrainConfig(dataset="moons", objective=objective, steps=10,
                                    batch_size=32, save_every=10,
                                    network={"hidden": 32, "depth": 2})
        paths[objective] = tmp_path / f"{objective}.safetensors"
        solverlab.train(cfg, paths[objective], progress=False)
    out = tmp_path / "o"
    r = _invoke("lipschitz", str(paths["etsdm"]), "--compare", str(paths["simple"]),
                "--points", "40", "--samples", "16", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert r.output.count("jump across t =") == 5
    assert "wrote lipschitz.json, lipschitz.csv, lipschitz.png" in r.output
    data = json.loads((out / "lipschitz.json").read_text())
    assert data["time_map"] == {"kind": "shared", "threshold": 100.0, "n": 5}
    assert data["boundaries"] == pytest.approx([0.021, 0.041, 0.061, 0.081, 0.101])
    assert len(data["jumps"]) == 5 and all(j["K"] > 0 for j in data["jumps"])
    same = data["same_network_time"]
    assert any(same) and all(k == 0.0 for k, s in zip(data["K"], same) if s)
    assert data["comparison"]["inside_zero"] == data["comparison"]["inside_steps"] > 0
    r = _invoke("lipschitz", str(paths["simple"]), "--points", "20", "--samples", "8",
                "--out", str(tmp_path / "p"), "--json")
    assert r.exit_code == 0, r.output
    plain = json.loads(r.output)
    assert plain["boundaries"] == [] and plain["jumps"] == [] and min(plain["K"]) > 0
    r = _invoke("lipschitz", "missing-checkpoint", "--out", str(out))
    assert r.exit_code == 2 and "missing-checkpoint" in r.output and r.output.count("\n") == 1
