"""Noise schedules: inverse map, derivatives, VP/VE identities, discrete DDPM table, options.

Everything in float64; numbers are checked against independent closed forms or finite
differences, never against the implementation's own formula.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import solverlab
from solverlab.errors import OptionError, SolverlabError
from solverlab.schedule import EDM, VE, VPCosine, VPDiscrete, VPLinear

F64 = torch.float64


def _scaled_linear_betas(n: int = 1000) -> torch.Tensor:
    # Stable Diffusion's "scaled_linear" betas, a second discrete table.
    return torch.linspace(0.00085**0.5, 0.012**0.5, n, dtype=F64) ** 2


SCHEDULES = {
    "vp-linear": VPLinear,
    "vp-linear-b0.5-5": lambda: VPLinear(beta_min=0.5, beta_max=5.0),
    "vp-linear-constant-beta": lambda: VPLinear(beta_min=4.0, beta_max=4.0),
    "vp-cosine": VPCosine,
    "vp-cosine-s0.02": lambda: VPCosine(s=0.02),
    "vp-discrete": VPDiscrete,
    "vp-discrete-sd": lambda: VPDiscrete(betas=_scaled_linear_betas()),
    "vp-discrete-N50": lambda: VPDiscrete(betas=torch.linspace(1e-3, 0.2, 50, dtype=F64)),
    "ve": VE,
    "ve-edm-range": lambda: VE(sigma_min=0.002, sigma_max=80.0),
    "edm": EDM,
    "edm-0.01-10": lambda: EDM(t_min=0.01, t_max=10.0),
}
CONTINUOUS = [k for k in SCHEDULES if not k.startswith("vp-discrete")]


def _time(s, u: float, geometric: bool) -> float:
    """A time in ``[t_min, t_max]``: linear or (when ``t_min > 0``) geometric in ``u``."""
    if geometric and s.t_min > 0:
        t = s.t_min ** (1.0 - u) * s.t_max**u
    else:
        t = s.t_min + u * (s.t_max - s.t_min)
    return min(max(t, s.t_min), s.t_max)


# -- inverse map --------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(SCHEDULES))
@given(u=st.floats(0.0, 1.0), geometric=st.booleans())
def test_t_of_lambda_inverts_lambda(key, u, geometric):
    s = SCHEDULES[key]()
    t = _time(s, u, geometric)
    back = float(s.t_of_lambda(s.lambda_(torch.tensor(t, dtype=F64))))
    assert abs(back - t) <= 1e-9 * abs(t) + 1e-15, (t, back)


@pytest.mark.parametrize("key", list(SCHEDULES))
def test_t_of_lambda_inverts_lambda_on_a_dense_grid_including_the_ends(key):
    s = SCHEDULES[key]()
    t = torch.linspace(s.t_min, s.t_max, 4001, dtype=F64)
    back = s.t_of_lambda(s.lambda_(t))
    assert back.dtype == F64
    torch.testing.assert_close(back, t, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("key", list(SCHEDULES))
def test_lambda_strictly_decreasing_and_range_properties(key):
    s = SCHEDULES[key]()
    t = torch.linspace(s.t_min, s.t_max, 20001, dtype=F64)
    lam = s.lambda_(t)
    assert bool(torch.isfinite(lam).all())
    assert bool((lam[1:] < lam[:-1]).all())
    assert s.lambda_max == pytest.approx(float(lam[0]), rel=1e-15)
    assert s.lambda_min == pytest.approx(float(lam[-1]), rel=1e-15)
    assert s.lambda_max > s.lambda_min


@pytest.mark.parametrize("key", list(SCHEDULES))
def test_float32_input_is_computed_in_float64(key):
    s = SCHEDULES[key]()
    t32 = torch.tensor([s.t_min, 0.5 * (s.t_min + s.t_max), s.t_max], dtype=torch.float32)
    for f in (s.alpha, s.sigma, s.lambda_, s.dlog_alpha_dt, s.dlambda_dt, s.sigma_ve):
        assert f(t32).dtype == F64
    assert s.t_of_lambda(torch.tensor([0.0], dtype=torch.float32)).dtype == F64
    assert s.alpha(0.5 * (s.t_min + s.t_max)).dtype == F64  # python float in


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("key", list(SCHEDULES))
def test_schedule_outputs_stay_on_the_device_of_the_input(key):
    s = SCHEDULES[key]()
    t = torch.linspace(s.t_min, s.t_max, 5, dtype=F64, device="cuda")
    for f in (s.alpha, s.sigma, s.lambda_, s.dlog_alpha_dt, s.dlambda_dt, s.sigma_ve):
        assert f(t).device == t.device, f
    back = s.t_of_lambda(s.lambda_(t))
    assert back.device == t.device
    torch.testing.assert_close(back.cpu(), t.cpu(), rtol=1e-9, atol=1e-15)


# -- derivatives ----------------------------------------------------------------------------


def _central(f, t: float, h: float) -> float:
    """Fourth-order central difference (vp-cosine has a pole at t = 1, just past t_max)."""
    v = f(torch.tensor([t - 2 * h, t - h, t + h, t + 2 * h], dtype=F64))
    return float((8 * (v[2] - v[1]) - (v[3] - v[0])) / (12 * h))


@pytest.mark.parametrize("key", CONTINUOUS)
@given(u=st.floats(0.0, 1.0), geometric=st.booleans())
def test_derivatives_match_central_finite_differences(key, u, geometric):
    s = SCHEDULES[key]()
    t = _time(s, u, geometric)
    h = 1e-5 * max(t, 1e-3)  # t +- h may leave [t_min, t_max] slightly; the formulas extend
    fd_a = _central(s.log_alpha, t, h)
    fd_l = _central(s.lambda_, t, h)
    da = float(s.dlog_alpha_dt(torch.tensor(t, dtype=F64)))
    dl = float(s.dlambda_dt(torch.tensor(t, dtype=F64)))
    assert da == pytest.approx(fd_a, rel=1e-6, abs=1e-9)
    assert dl == pytest.approx(fd_l, rel=1e-6)
    assert dl < 0


@pytest.mark.parametrize("key", [k for k in SCHEDULES if k.startswith("vp-discrete")])
@given(data=st.data(), u=st.floats(0.05, 0.95))
def test_vp_discrete_derivatives_match_finite_differences_between_knots(key, data, u):
    s = SCHEDULES[key]()
    n = s.num_train_timesteps
    k = data.draw(st.integers(0, n - 2))
    t = (k + 1 + u) / n  # strictly inside the segment [t_k, t_{k+1}]
    h = 1e-5 / n
    fd_a = _central(s.log_alpha, t, h)
    fd_l = _central(s.lambda_, t, h)
    da = float(s.dlog_alpha_dt(torch.tensor(t, dtype=F64)))
    dl = float(s.dlambda_dt(torch.tensor(t, dtype=F64)))
    # log alpha is linear on the segment: its slope is the table's difference quotient
    table = 0.5 * torch.log(_alphas_cumprod(s))
    assert da == pytest.approx(float(table[k + 1] - table[k]) * n, rel=1e-12)
    assert da == pytest.approx(fd_a, rel=1e-7)
    assert dl == pytest.approx(fd_l, rel=1e-6)


def test_vp_linear_drift_coefficient_is_minus_half_beta():
    # Song et al. 2021: d log alpha/dt = -beta(t)/2, beta(t) = b0 + t (b1 - b0)
    s = VPLinear(beta_min=0.3, beta_max=12.0)
    t = torch.linspace(s.t_min, s.t_max, 11, dtype=F64)
    torch.testing.assert_close(s.dlog_alpha_dt(t), -0.5 * (0.3 + t * 11.7), rtol=1e-14, atol=0)
    # alpha(1) = exp(-(b0 + b1)/4)
    assert float(s.alpha(1.0)) == pytest.approx(math.exp(-(0.3 + 12.0) / 4), rel=1e-14)


# -- VP / VE identities -----------------------------------------------------------------------


@pytest.mark.parametrize("key", [k for k in SCHEDULES if k.startswith("vp")])
def test_vp_alpha_squared_plus_sigma_squared_is_one(key):
    s = SCHEDULES[key]()
    assert s.kind == "vp"
    t = torch.linspace(s.t_min, s.t_max, 1001, dtype=F64)
    a, sg = s.alpha(t), s.sigma(t)
    torch.testing.assert_close(a**2 + sg**2, torch.ones_like(t), rtol=0, atol=1e-14)
    assert bool(((a > 0) & (a < 1) & (sg > 0) & (sg < 1)).all())
    torch.testing.assert_close(s.lambda_(t), torch.log(a / sg), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.sigma_ve(t), sg / a, rtol=1e-12, atol=0)


@pytest.mark.parametrize("key", [k for k in SCHEDULES if k.startswith(("ve", "edm"))])
def test_ve_alpha_is_one(key):
    s = SCHEDULES[key]()
    assert s.kind == "ve"
    t = torch.linspace(s.t_min, s.t_max, 101, dtype=F64)
    assert bool((s.alpha(t) == 1).all())
    assert bool((s.dlog_alpha_dt(t) == 0).all())
    torch.testing.assert_close(s.lambda_(t), -torch.log(s.sigma(t)), rtol=1e-14, atol=1e-15)


def test_ve_sigma_is_geometric_and_edm_sigma_is_t():
    ve = VE(sigma_min=0.02, sigma_max=100.0)
    t = torch.linspace(0.0, 1.0, 11, dtype=F64)
    torch.testing.assert_close(ve.sigma(t), 0.02 * (100.0 / 0.02) ** t, rtol=1e-13, atol=0)
    edm = EDM()
    t = torch.tensor([0.002, 0.5, 80.0], dtype=F64)
    torch.testing.assert_close(edm.sigma(t), t, rtol=1e-15, atol=0)
    torch.testing.assert_close(edm.sigma_ve(t), t, rtol=4e-15, atol=0)
    assert (edm.t_min, edm.t_max) == (0.002, 80.0)


# -- vp-cosine ----------------------------------------------------------------------------------


def test_vp_cosine_matches_closed_form_and_is_clipped_at_lambda_minus_5_1():
    s = VPCosine()
    for t in (0.001, 0.3, 0.9):
        f = math.cos((t + 0.008) / 1.008 * math.pi / 2) / math.cos(0.008 / 1.008 * math.pi / 2)
        assert float(s.alpha(t)) == pytest.approx(f, rel=1e-13)
    assert s.t_max < 1.0
    assert float(s.lambda_(s.t_max)) == pytest.approx(-5.1, rel=1e-9)
    assert s.lambda_min == pytest.approx(-5.1, rel=1e-9)
    # the clip is an option; an explicit t_max wins
    s2 = VPCosine(lambda_clip=-4.0)
    assert s2.t_max < s.t_max
    assert float(s2.lambda_(s2.t_max)) == pytest.approx(-4.0, rel=1e-9)
    assert VPCosine(t_max=0.9).t_max == 0.9


# -- vp-discrete -------------------------------------------------------------------------------


def _alphas_cumprod(s: VPDiscrete) -> torch.Tensor:
    n = s.num_train_timesteps
    return s.alpha(torch.arange(1, n + 1, dtype=F64) / n) ** 2


def test_vp_discrete_default_is_ddpm_linear_betas():
    s = VPDiscrete()
    assert s.num_train_timesteps == 1000
    assert (s.t_min, s.t_max) == (1e-3, 1.0)
    # diffusers' DDPMScheduler(beta_schedule="linear"), written in numpy
    ac = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    knots = torch.arange(1, 1001, dtype=F64) / 1000
    np.testing.assert_allclose(s.alpha(knots).numpy(), np.sqrt(ac), rtol=2e-15, atol=0)
    np.testing.assert_allclose(s.sigma(knots).numpy(), np.sqrt(1 - ac), rtol=1e-13, atol=0)


@pytest.mark.parametrize("betas", [None, _scaled_linear_betas(),
                                   torch.linspace(1e-3, 0.2, 50, dtype=F64)])
def test_vp_discrete_knots_reproduce_sqrt_alphas_cumprod(betas):
    s = VPDiscrete() if betas is None else VPDiscrete(betas=betas)
    b = torch.linspace(1e-4, 0.02, 1000, dtype=F64) if betas is None else betas
    ac = torch.cumprod(1.0 - b, 0)
    n = ac.numel()
    knots = (torch.arange(n, dtype=F64) + 1.0) / n  # t_n = (n+1)/N
    torch.testing.assert_close(s.alpha(knots), ac.sqrt(), rtol=2e-15, atol=0)
    torch.testing.assert_close(s.t_of_index(torch.arange(n)), knots, rtol=0, atol=0)
    # the time a knot maps back to is the knot itself
    torch.testing.assert_close(s.t_of_lambda(s.lambda_(knots)), knots, rtol=1e-13, atol=0)


def test_vp_discrete_from_betas_and_from_alphas_cumprod_are_identical():
    betas = _scaled_linear_betas()
    a = VPDiscrete(betas=betas)
    b = VPDiscrete(alphas_cumprod=torch.cumprod(1.0 - betas, 0))
    c = VPDiscrete(betas=betas.tolist())  # a list is fine
    t = torch.cat([torch.linspace(a.t_min, a.t_max, 777, dtype=F64),
                   torch.arange(1, 1001, dtype=F64) / 1000])
    for f in ("alpha", "sigma", "lambda_", "dlog_alpha_dt", "dlambda_dt"):
        assert torch.equal(getattr(a, f)(t), getattr(b, f)(t)), f
        assert torch.equal(getattr(a, f)(t), getattr(c, f)(t)), f
    lam = torch.linspace(a.lambda_min, a.lambda_max, 101, dtype=F64)
    assert torch.equal(a.t_of_lambda(lam), b.t_of_lambda(lam))
    # default == explicit default betas
    d = VPDiscrete()
    e = VPDiscrete(betas=torch.linspace(1e-4, 0.02, 1000, dtype=F64))
    assert torch.equal(d.alpha(t), e.alpha(t))


def test_vp_discrete_log_alpha_is_piecewise_linear_between_knots():
    s = VPDiscrete()
    n = 1000
    k = torch.arange(0, n - 1)
    w = torch.rand(k.numel(), dtype=F64, generator=torch.Generator().manual_seed(1))
    t = (k + 1 + w) / n
    la = 0.5 * torch.log(torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, n, dtype=F64), 0))
    expected = (1 - w) * la[k] + w * la[k + 1]
    torch.testing.assert_close(s.log_alpha(t), expected, rtol=1e-13, atol=1e-18)


@pytest.mark.parametrize("t", [1e-3, 0.0105, 0.5, 0.999, 1.0])
def test_vp_discrete_index_is_n_t_minus_one(t):
    s = VPDiscrete()
    assert float(s.index(t)) == pytest.approx(1000 * t - 1, abs=1e-12)
    # = 1000 (t - 1/N), official DPM-Solver's discrete model input
    assert float(s.index(t)) == pytest.approx(1000 * (t - 1 / 1000), abs=1e-12)
    s50 = VPDiscrete(betas=torch.linspace(1e-3, 0.2, 50, dtype=F64))
    assert float(s50.index(1.0)) == pytest.approx(49.0, abs=1e-12)
    assert float(s50.index(s50.t_min)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"betas": [0.1]}, ["betas holds 1 value", "at least 2 steps"]),
        ({"betas": [0.1, 0.0, 0.2]}, ["betas", "(0, 1)"]),
        ({"betas": [0.1, 1.0]}, ["betas[1] = 1.0", "(0, 1)"]),
        ({"betas": [0.1, -0.2, 0.3]}, ["betas[1] = -0.2"]),
        ({"betas": [0.1, float("nan")]}, ["betas[1] = nan"]),
        # zero terminal SNR: alphas_cumprod ends at 0, lambda = -inf
        ({"alphas_cumprod": [0.9, 0.5, 0.0]}, ["alphas_cumprod[2] = 0.0", "terminal SNR"]),
        ({"alphas_cumprod": [0.9, 0.95, 0.5]},
         ["alphas_cumprod[1] = 0.95 >= alphas_cumprod[0] = 0.9", "strictly decreasing"]),
        ({"alphas_cumprod": [1.0, 0.5]}, ["alphas_cumprod[0] = 1.0"]),
        ({"betas": "abc"}, ["betas is not a sequence of numbers"]),
        ({"betas": [0.1, 0.2], "alphas_cumprod": [0.9, 0.72]}, ["betas", "alphas_cumprod"]),
        ({"t_min": 1e-4}, ["t_min=0.0001", "[1/N, 1]"]),
        ({"t_max": 1.5}, ["t_max=1.5"]),
        ({"t_min": 0.5, "t_max": 0.2}, ["t_min=0.5", "t_max=0.2"]),
        ({"t_max": float("inf")}, ["t_max=inf"]),
    ],
)
def test_vp_discrete_bad_tables_raise_option_error(kwargs, words):
    with pytest.raises(OptionError) as e:
        VPDiscrete(**kwargs)
    for w in words:
        assert w in str(e.value)


def test_vp_discrete_zero_terminal_snr_betas_raise_option_error():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    betas[-1] = 1.0  # rescaled-to-zero-terminal-SNR tables end with beta = 1
    with pytest.raises(OptionError, match="betas"):
        VPDiscrete(betas=betas)


# -- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, kwargs, words",
    [
        (VPLinear, {"beta_min": -1.0}, ["beta_min=-1.0", "> 0"]),
        (VPLinear, {"beta_min": 0.0}, ["beta_min=0.0", "> 0"]),
        (VPLinear, {"beta_max": "20"}, ["beta_max='20'", "a finite number"]),
        (VPLinear, {"beta_min": True}, ["beta_min=True"]),
        (VPLinear, {"beta_min": 5.0, "beta_max": 1.0}, ["beta_max=1.0", "beta_min=5.0"]),
        (VPLinear, {"t_min": 0.0}, ["t_min=0.0", "0 < t_min"]),
        (VPLinear, {"t_min": float("nan")}, ["t_min=nan"]),
        (VPLinear, {"t_min": 0.5, "t_max": 0.5}, ["t_min=0.5", "t_max=0.5"]),
        (VPCosine, {"s": 0.0}, ["s=0.0", "> 0"]),
        (VPCosine, {"t_max": 1.5}, ["t_max=1.5", "<= 1.0"]),
        (VPCosine, {"lambda_clip": float("-inf")}, ["lambda_clip=-inf"]),
        (VE, {"sigma_min": 0.0}, ["sigma_min=0.0", "> 0"]),
        (VE, {"sigma_max": 0.001}, ["sigma_max=0.001", "sigma_min=0.01"]),
        (VE, {"t_min": -0.1}, ["t_min=-0.1", "0 <= t_min"]),
        (EDM, {"t_min": 0.0}, ["t_min=0.0", "> 0"]),
        (EDM, {"t_min": 100.0}, ["t_min=100.0", "t_max=80.0"]),
    ],
)
def test_bad_options_raise_option_error_naming_the_option(cls, kwargs, words):
    with pytest.raises(OptionError) as e:
        cls(**kwargs)
    assert isinstance(e.value, SolverlabError)
    msg = str(e.value)
    for w in words:
        assert w in msg, msg
    assert cls.name in msg  # the message says which schedule


def test_schedules_are_frozen_and_keyword_only():
    s = VPLinear()
    with pytest.raises(AttributeError):
        s.beta_max = 3.0
    with pytest.raises(TypeError):
        VPLinear(0.1, 20.0)


def test_names_and_kinds():
    assert {c.name: c.kind for c in (VPLinear, VPCosine, VPDiscrete, VE, EDM)} == {
        "vp-linear": "vp", "vp-cosine": "vp", "vp-discrete": "vp", "ve": "ve", "edm": "ve",
    }


@pytest.mark.parametrize(("name", "options", "option", "says"), [
    ("vp-linear", {"t_max": 1000}, "t_max=1000", "vp-discrete"),  # a timestep index, not t
    ("vp-linear", {"t_max": 10}, "t_max=10", "usable range of t is about [0.001, 2"),
    ("vp-cosine", {"t_max": 1.0}, "t_max=1.0", "lambda = -37.33"),
    ("edm", {"t_min": 1e-12}, "t_min=1e-12", "usable range of t is about [2.06115e-09, 80]"),
    ("ve", {"sigma_max": 1e12}, "t_max=1.0", "lambda = -27.63"),
])
def test_unsolvable_schedules_are_refused_with_the_usable_range(name, options, option, says):
    with pytest.raises(OptionError) as info:
        solverlab.get_schedule(name, **options)
    assert option in str(info.value) and says in str(info.value)


@pytest.mark.parametrize("name", ["vp-linear", "vp-cosine", "vp-discrete", "ve", "edm"])
def test_every_default_schedule_is_well_inside_the_lambda_bound(name):
    from solverlab.schedule import LAMBDA_BOUND

    s = solverlab.get_schedule(name)
    assert max(abs(s.lambda_min), abs(s.lambda_max)) < LAMBDA_BOUND / 2.5


def test_a_schedule_at_the_bound_is_accepted_and_just_past_it_refused():
    edge = math.exp(-20.0)  # EDM: lambda = -log t
    assert solverlab.get_schedule("edm", t_min=edge * 1.001).lambda_max < 20.0
    with pytest.raises(OptionError, match="t_min"):
        solverlab.get_schedule("edm", t_min=edge * 0.999)
