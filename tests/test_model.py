"""Model / TorchModel / Denoiser: exact NFE, conversions, time inputs, guidance, thresholding,
drift. The ground truth is an exact model of Gaussian data written here."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn

import solverlab
from solverlab.errors import InputError, OptionError
from solverlab.model import Denoiser, Model, TorchModel, as_denoiser
from solverlab.parameterization import Data, Noise, Score, Velocity
from solverlab.registry import Registry, reset_registry
from solverlab.schedule import EDM, VE, VPCosine, VPDiscrete, VPLinear

F64 = torch.float64
PARAMS = [Noise(), Data(), Velocity(), Score()]
SCHEDULES = [VPLinear(), VPCosine(), VPDiscrete(), VE(), EDM()]


def _bshape(x: torch.Tensor) -> tuple[int, ...]:
    return (-1,) + (1,) * (x.ndim - 1)


class GaussianModel(Model):
    """Exact model of data ``x0 ~ N(mu, diag(s0^2))`` in any parameterization:
    ``E[x0 | x_t] = mu + alpha s0^2 / (alpha^2 s0^2 + sigma^2) (x - alpha mu)``."""

    def __init__(self, schedule, parameterization, mu, s0):
        self.schedule = schedule
        self.parameterization = parameterization
        self.mu, self.s0 = mu, s0
        self.calls: list[tuple[tuple[int, ...], torch.Tensor, dict]] = []

    def posterior(self, x, t):
        t = torch.as_tensor(t, dtype=F64)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        a = self.schedule.alpha(t).view(_bshape(x)).to(x.dtype)
        s = self.schedule.sigma(t).view(_bshape(x)).to(x.dtype)
        v = a**2 * self.s0**2 + s**2
        x0 = self.mu + a * self.s0**2 / v * (x - a * self.mu)
        eps = s * (x - a * self.mu) / v
        return x0, eps, a, s

    def __call__(self, x, t, **cond):
        self.calls.append((tuple(x.shape), t.clone(), cond))
        assert t.dtype == F64 and t.shape == (x.shape[0],)
        x0, eps, a, s = self.posterior(x, t)
        return self.parameterization.target(x0, eps, a, s)


def _gaussian(schedule, p=None, dim=3):
    mu = torch.tensor([0.5, -1.0, 2.0][:dim], dtype=F64)
    s0 = torch.tensor([0.7, 1.3, 0.2][:dim], dtype=F64)
    return GaussianModel(schedule, p or Noise(), mu, s0)


def _x(schedule, batch=4, dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(schedule.t_max, schedule.t_min, batch, dtype=F64)
    x = torch.randn(batch, dim, dtype=F64, generator=g) * (
        schedule.alpha(t) + schedule.sigma(t)).view(-1, 1)
    return x, t


@pytest.fixture
def core_registry():
    """The global registry with the core parts only (no installed plugins)."""
    reset_registry(Registry.load(eps=[], blocked=[]))
    yield solverlab.get_registry()
    reset_registry()


# -- conversions -------------------------------------------------------------------------------


@pytest.mark.parametrize("p", PARAMS, ids=lambda p: p.name)
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
def test_data_and_noise_are_the_exact_posterior_in_every_parameterization(p, schedule):
    model = _gaussian(schedule, p)
    d = Denoiser(model)
    x, t = _x(schedule)
    x0, eps, _, _ = model.posterior(x, t)
    torch.testing.assert_close(d.data(x, t), x0, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(d.noise(x, t), eps, rtol=1e-11, atol=1e-11)
    a, s = d.coefficients(x, t)
    torch.testing.assert_close(a.flatten(), schedule.alpha(t), rtol=0, atol=0)
    torch.testing.assert_close(s.flatten(), schedule.sigma(t), rtol=0, atol=0)
    assert d.schedule is schedule and d.parameterization is p


@pytest.mark.parametrize("p", PARAMS, ids=lambda p: p.name)
@pytest.mark.parametrize("thresholding", (False, True))
def test_float_coefficients_and_an_out_buffer_give_the_same_predictions(p, thresholding):
    """What solvers call: ``coefficients=(alpha, sigma)`` as floats, optionally with a buffer
    for the conversion; same values, one NFE each, and the buffer is used where the
    parameterization converts in place (never with thresholding, which allocates)."""
    schedule = VPLinear()
    d = Denoiser(_gaussian(schedule, p), thresholding=thresholding)
    x, _ = _x(schedule)
    t = torch.full((x.shape[0],), 0.4, dtype=F64)
    ab = (float(schedule.alpha(0.4)), float(schedule.sigma(0.4)))
    for kind in ("data", "noise"):
        want = getattr(d, kind)(x, t)
        buf = torch.full_like(x, float("nan"))
        nfe = d.nfe
        plain = getattr(d, kind)(x, t, coefficients=ab)
        into = getattr(d, kind)(x, t, coefficients=ab, out=buf)
        assert d.nfe == nfe + 2
        torch.testing.assert_close(plain, want, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(into, want, rtol=1e-13, atol=1e-13)
        converts = p.name in ("noise", "velocity") if kind == "data" else p.name in (
            "data", "velocity")
        assert (into is buf) == (converts and not thresholding)


def test_coefficients_are_in_the_dtype_of_x_and_broadcast():
    d = Denoiser(_gaussian(VPLinear()))
    x = torch.zeros(2, 3, 4, 5, dtype=torch.float32)
    a, s = d.coefficients(x, 0.5)
    assert a.dtype == s.dtype == torch.float32
    assert a.shape == s.shape == (2, 1, 1, 1)
    assert float(a[0]) == pytest.approx(float(VPLinear().alpha(0.5)), rel=1e-7)


# -- NFE --------------------------------------------------------------------------------------


def test_nfe_is_one_per_model_call_and_nothing_else():
    model = _gaussian(VPLinear())
    d = Denoiser(model)
    x, t = _x(model.schedule)
    assert d.nfe == 0
    d.coefficients(x, t)
    d.time(x, t)
    assert d.nfe == 0 and len(model.calls) == 0
    d(x, t)
    assert d.nfe == 1
    d.data(x, t)
    assert d.nfe == 2
    d.noise(x, 0.3)
    assert d.nfe == 3
    d.drift(x, t)
    assert d.nfe == 4
    assert len(model.calls) == 4
    assert "nfe=4" in repr(d)


def test_nfe_counts_a_guided_call_once_with_a_doubled_batch():
    model = _gaussian(VPLinear())
    y1, y0 = torch.ones(4, dtype=F64), torch.zeros(4, dtype=F64)
    d = Denoiser(model, cond={"y": y1}, uncond={"y": y0}, guidance_scale=3.0)
    x, t = _x(model.schedule)
    d.data(x, t)
    d.noise(x, t)
    assert d.nfe == 2
    assert len(model.calls) == 2
    shape, tt, cond = model.calls[0]
    assert shape == (8, 3)
    torch.testing.assert_close(tt, torch.cat([t, t]), rtol=0, atol=0)
    torch.testing.assert_close(cond["y"], torch.cat([y1, y0]), rtol=0, atol=0)


# -- classifier-free guidance --------------------------------------------------------------------


class CondGaussian(GaussianModel):
    """Output depends nonlinearly on a per-sample condition ``y``."""

    def __call__(self, x, t, y=None, **cond):
        out = super().__call__(x, t, y=y, **cond)
        return out * (1.0 + y.view(-1, 1)) + y.view(-1, 1) ** 2


@pytest.mark.parametrize("w", [0.0, 2.0, 7.5])
def test_classifier_free_guidance_is_uncond_plus_w_times_difference(w):
    s = VPLinear()
    model = CondGaussian(s, Noise(), torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64))
    x, t = _x(s)
    yc = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=F64)
    yu = torch.zeros(4, dtype=F64)
    out_c, out_u = model(x, t, y=yc), model(x, t, y=yu)
    model.calls.clear()
    d = Denoiser(model, cond={"y": yc}, uncond={"y": yu}, guidance_scale=w)
    got = d(x, t)
    torch.testing.assert_close(got, out_u + w * (out_c - out_u), rtol=1e-13, atol=1e-13)
    assert len(model.calls) == 1 and d.nfe == 1
    # guided data prediction is the same affine combination of the two data predictions
    a, sg = d.coefficients(x, t)
    want = Noise().to_data(out_u + w * (out_c - out_u), x, a, sg)
    torch.testing.assert_close(d.data(x, t), want, rtol=1e-12, atol=1e-12)


def test_guidance_scale_one_is_a_single_conditional_call():
    s = VPLinear()
    model = CondGaussian(s, Noise(), torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64))
    x, t = _x(s)
    yc = torch.full((4,), 2.0, dtype=F64)
    d = Denoiser(model, cond={"y": yc}, uncond={"y": torch.zeros(4, dtype=F64)})
    got = d(x, t)
    assert model.calls[-1][0] == (4, 3)  # not doubled
    torch.testing.assert_close(got, model(x, t, y=yc), rtol=0, atol=0)


def test_guidance_without_uncond_is_an_option_error():
    with pytest.raises(OptionError, match=r"guidance_scale=2\.0.*uncond"):
        Denoiser(_gaussian(VPLinear()), cond={"y": torch.ones(1)}, guidance_scale=2.0)


# -- dynamic thresholding --------------------------------------------------------------------------


class FixedData(Model):
    """Predicts a fixed ``x0`` (data parameterization)."""

    def __init__(self, x0, schedule=None):
        self.schedule = schedule or VPLinear()
        self.parameterization = Data()
        self.x0 = x0

    def __call__(self, x, t, **cond):
        return self.x0.to(x.dtype)


def _threshold_reference(x0: np.ndarray, ratio: float = 0.995, smin: float = 1.0) -> np.ndarray:
    flat = np.abs(x0.reshape(x0.shape[0], -1))
    s = np.maximum(np.quantile(flat, ratio, axis=1), smin).reshape((-1,) + (1,) * (x0.ndim - 1))
    return np.clip(x0, -s, s) / s


def _thresholding_data(dtype):
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(3, 4, 50, generator=g, dtype=F64)
    x0[0] *= 5.0  # quantile > 1: clamped and divided
    x0[1] *= 0.2  # quantile < 1: s = 1, nothing changes
    x0[2] *= 40.0
    return x0.to(dtype)


def test_dynamic_thresholding_clamps_to_the_per_sample_quantile_and_divides():
    x0 = _thresholding_data(F64)
    model = FixedData(x0)
    d = Denoiser(model, thresholding=True)
    x = torch.randn(3, 4, 50, dtype=F64)
    got = d.data(x, 0.4)
    want = torch.from_numpy(_threshold_reference(x0.numpy()))
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-15)
    assert float(got.abs().max()) <= 1.0
    torch.testing.assert_close(got[1], x0[1], rtol=0, atol=0)  # s = 1 leaves it alone
    s0 = float(np.quantile(np.abs(x0[0].numpy()), 0.995))
    assert s0 > 1.0
    assert float(got[0].abs().max()) == pytest.approx(1.0)
    # noise is derived from the thresholded x0
    a, s = d.coefficients(x, 0.4)
    torch.testing.assert_close(d.noise(x, 0.4), (x - a * got) / s, rtol=1e-13, atol=1e-13)
    assert d.nfe == 2
    # without thresholding the prediction is untouched
    assert torch.equal(Denoiser(model).data(x, 0.4), x0)


def test_dynamic_thresholding_options():
    x0 = _thresholding_data(F64)
    d = Denoiser(FixedData(x0), thresholding=True, threshold_ratio=0.9, threshold_max=2.0)
    got = d.data(torch.zeros_like(x0), 0.5)
    want = torch.from_numpy(_threshold_reference(x0.numpy(), 0.9, 2.0))
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-15)


def test_dynamic_thresholding_works_in_float16():
    x0 = _thresholding_data(torch.float16)
    d = Denoiser(FixedData(x0), thresholding=True)
    x = torch.randn(3, 4, 50).to(torch.float16)
    got = d.data(x, 0.4)
    assert got.dtype == torch.float16
    want = _threshold_reference(x0.to(F64).numpy())
    np.testing.assert_allclose(got.to(F64).numpy(), want, rtol=2e-3, atol=2e-3)
    eps = d.noise(x, 0.4)
    assert eps.dtype == torch.float16 and bool(torch.isfinite(eps).all())


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.1])
def test_bad_threshold_ratio_is_an_option_error(ratio):
    with pytest.raises(OptionError, match=f"threshold_ratio={ratio!r}"):
        Denoiser(_gaussian(VPLinear()), thresholding=True, threshold_ratio=ratio)


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"thresholding": True, "threshold_max": 0.0}, "threshold_max=0.0"),
        ({"thresholding": True, "threshold_max": -1.0}, "threshold_max=-1.0"),
        ({"thresholding": True, "threshold_max": math.nan}, "threshold_max=nan"),
        ({"uncond": {}, "guidance_scale": math.nan}, "guidance_scale=nan"),
        ({"uncond": {}, "guidance_scale": math.inf}, "guidance_scale=inf"),
    ],
)
def test_non_finite_or_non_positive_denoiser_options_are_option_errors(kwargs, option):
    # threshold_max <= 0 divides an all-zero prediction by s = 0; a NaN guidance scale makes
    # every output NaN. Both must fail at construction, naming the option.
    with pytest.raises(OptionError, match=option):
        Denoiser(FixedData(torch.zeros(2, 3, dtype=F64)), **kwargs)


# -- inputs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [nn.Identity(), "noise", None, lambda x, t: x])
def test_a_non_model_is_an_option_error(bad):
    with pytest.raises(OptionError, match=r"not a solverlab\.Model") as e:
        Denoiser(bad)
    assert "TorchModel" in str(e.value)  # the fix is in the message
    with pytest.raises(OptionError):
        as_denoiser(bad)


def test_as_denoiser_passes_a_denoiser_through_and_wraps_a_model():
    model = _gaussian(VPLinear())
    d = Denoiser(model)
    assert as_denoiser(d) is d
    d2 = as_denoiser(model)
    assert isinstance(d2, Denoiser) and d2.model is model and d2.nfe == 0


@pytest.mark.parametrize("shape", [(5,), (4, 1), (1, 4), (2, 2), (3,)])
def test_time_of_the_wrong_shape_is_an_input_error(shape):
    d = Denoiser(_gaussian(VPLinear()))
    x = torch.zeros(4, 3, dtype=F64)
    t = torch.full(shape, 0.5, dtype=F64)
    with pytest.raises(InputError, match=r"shape") as e:
        d.data(x, t)
    assert str(tuple(shape)) in str(e.value)
    assert d.nfe == 0  # rejected before the model ran


def test_scalar_and_per_sample_times():
    model = _gaussian(VPLinear())
    d = Denoiser(model)
    x, _ = _x(model.schedule)
    for t in (0.5, torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float32)):
        tt = d.time(x, t)
        assert tt.dtype == F64 and tt.shape == (4,)
        assert bool((tt == 0.5).all())
    t = torch.tensor([0.9, 0.5, 0.2, 0.01], dtype=F64)
    torch.testing.assert_close(d.data(x, t), model.posterior(x, t)[0], rtol=1e-12, atol=1e-12)


# -- TorchModel time inputs -------------------------------------------------------------------


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x, t, **cond):
        self.seen.append(t.clone())
        return torch.zeros_like(x)


def test_torchmodel_time_input_t():
    rec = Recorder()
    m = TorchModel(rec, VPLinear(), Noise(), time_input="t")
    x = torch.zeros(3, 2, dtype=F64)
    t = torch.tensor([1.0, 0.5, 0.001], dtype=F64)
    Denoiser(m)(x, t)
    torch.testing.assert_close(rec.seen[-1], t, rtol=0, atol=0)


def test_torchmodel_time_input_index_is_n_t_minus_one():
    rec = Recorder()
    s = VPDiscrete()
    m = TorchModel(rec, s, Noise(), time_input="index")
    x = torch.zeros(4, 2, dtype=F64)
    t = torch.tensor([1.0, 0.5, 0.0105, 0.001], dtype=F64)
    Denoiser(m)(x, t)
    torch.testing.assert_close(rec.seen[-1], torch.tensor([999.0, 499.0, 9.5, 0.0], dtype=F64),
                               rtol=0, atol=1e-12)
    s50 = VPDiscrete(betas=torch.linspace(1e-3, 0.2, 50, dtype=F64))
    rec50 = Recorder()
    Denoiser(TorchModel(rec50, s50, Noise(), time_input="index"))(x, t)
    torch.testing.assert_close(rec50.seen[-1], 50 * t - 1, rtol=0, atol=1e-12)


def test_torchmodel_time_input_sigma_is_sigma_over_alpha():
    rec = Recorder()
    s = VPLinear()
    m = TorchModel(rec, s, Noise(), time_input="sigma")
    x = torch.zeros(3, 2, dtype=F64)
    t = torch.tensor([1.0, 0.5, 0.001], dtype=F64)
    Denoiser(m)(x, t)
    torch.testing.assert_close(rec.seen[-1], s.sigma(t) / s.alpha(t), rtol=1e-13, atol=0)
    rec2 = Recorder()
    t = torch.tensor([80.0, 1.0, 0.002], dtype=F64)
    Denoiser(TorchModel(rec2, EDM(), Data(), time_input="sigma"))(x, t)
    torch.testing.assert_close(rec2.seen[-1], torch.tensor([80.0, 1.0, 0.002], dtype=F64),
                               rtol=1e-14, atol=0)


@pytest.mark.parametrize(
    ("dtype", "time_dtype"),
    [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
     (torch.float32, torch.float32), (torch.float64, torch.float64)],
)
def test_torchmodel_time_input_is_at_least_float32(dtype, time_dtype):
    # bfloat16 would round the index 999 up to 1000, outside the training range.
    rec = Recorder()
    m = TorchModel(rec, VPDiscrete(), Noise(), time_input="index")
    out = Denoiser(m)(torch.zeros(2, 3, dtype=dtype), 1.0)
    assert rec.seen[-1].dtype == time_dtype
    assert out.dtype == dtype
    assert float(rec.seen[-1][0]) == 999.0


def test_torchmodel_passes_conditioning_through():
    class Net(nn.Module):
        def forward(self, x, t, y):
            return x * y.view(-1, 1)

    m = TorchModel(Net(), VPLinear(), Data())
    x = torch.ones(2, 3, dtype=F64)
    d = Denoiser(m, cond={"y": torch.tensor([2.0, 3.0], dtype=F64)})
    torch.testing.assert_close(d.data(x, 0.5), torch.tensor([[2.0] * 3, [3.0] * 3], dtype=F64))


@pytest.mark.parametrize("bad", ["timestep", "T", "", None])
def test_torchmodel_bad_time_input_is_an_option_error(bad):
    with pytest.raises(OptionError) as e:
        TorchModel(Recorder(), VPLinear(), Noise(), time_input=bad)
    msg = str(e.value)
    assert f"time_input={bad!r}" in msg
    assert "'t'" in msg and "'index'" in msg and "'sigma'" in msg


def test_torchmodel_index_needs_a_discrete_schedule():
    with pytest.raises(OptionError, match="vp-discrete") as e:
        TorchModel(Recorder(), VPLinear(), Noise(), time_input="index")
    assert "'vp-linear'" in str(e.value)


def test_torchmodel_refuses_a_non_callable_module():
    with pytest.raises(OptionError, match="module="):
        TorchModel(42, VPLinear(), Noise())


def test_torchmodel_takes_registry_names(core_registry):
    m = TorchModel(Recorder(), "vp-discrete", "velocity", time_input="index")
    assert isinstance(m.schedule, VPDiscrete)
    assert isinstance(m.parameterization, Velocity)
    assert isinstance(m, Model)
    assert "vp-discrete" in repr(m) and "velocity" in repr(m) and "index" in repr(m)


# -- drift -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", PARAMS, ids=lambda p: p.name)
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
def test_drift_is_dlog_alpha_x_minus_sigma_dlambda_eps(p, schedule):
    model = _gaussian(schedule, p)
    d = Denoiser(model)
    x, t = _x(schedule)
    eps = model.posterior(x, t)[1]
    a = schedule.dlog_alpha_dt(t).view(-1, 1)
    b = (schedule.sigma(t) * schedule.dlambda_dt(t)).view(-1, 1)
    torch.testing.assert_close(d.drift(x, t), a * x - b * eps, rtol=1e-11, atol=1e-11)
    assert d.nfe == 1


def test_vp_linear_drift_is_the_song_et_al_probability_flow():
    # dx/dt = -beta/2 x - beta/2 score = -beta/2 x + beta/2 eps/sigma
    s = VPLinear()
    model = _gaussian(s)
    x, t = _x(s)
    beta = (0.1 + t * 19.9).view(-1, 1)
    eps = model.posterior(x, t)[1]
    want = -0.5 * beta * x + 0.5 * beta * eps / s.sigma(t).view(-1, 1)
    torch.testing.assert_close(Denoiser(model).drift(x, t), want, rtol=1e-12, atol=1e-12)


def test_edm_drift_is_the_noise_prediction():
    # sigma(t) = t, alpha = 1: dx/dt = eps (Karras et al. 2022, eq. 4 with sigma' = 1)
    s = EDM()
    model = _gaussian(s, Data())
    x, t = _x(s)
    torch.testing.assert_close(Denoiser(model).drift(x, t), model.posterior(x, t)[1],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("schedule", [VPLinear(), VPCosine(), VE(), EDM()], ids=lambda s: s.name)
def test_drift_is_the_velocity_of_the_exact_gaussian_flow(schedule):
    # For Gaussian data the flow is x_t = alpha mu + sqrt(alpha^2 s0^2 + sigma^2) z with z fixed.
    model = _gaussian(schedule)
    mu, s0 = model.mu, model.s0
    z = torch.tensor([[0.3, -1.2, 0.8]], dtype=F64)

    def flow(t: float) -> torch.Tensor:
        a, s = schedule.alpha(t), schedule.sigma(t)
        return a * mu + torch.sqrt(a**2 * s0**2 + s**2) * z

    for u in (0.1, 0.5, 0.9):
        t = schedule.t_min + u * (schedule.t_max - schedule.t_min)
        h = 1e-5 * t
        fd = (8 * (flow(t + h) - flow(t - h)) - (flow(t + 2 * h) - flow(t - 2 * h))) / (12 * h)
        torch.testing.assert_close(Denoiser(model).drift(flow(t), t), fd, rtol=1e-7, atol=1e-7)


def test_model_is_abstract():
    with pytest.raises(TypeError):
        Model()

    class Half(Model):
        schedule: ClassVar = VPLinear()

    with pytest.raises(TypeError):
        Half()
