"""Parameterizations: the training target of (x0, eps) converts back to x0 and eps, for any
alpha, sigma (VP or not), in float64."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from solverlab.parameterization import Data, Noise, Parameterization, Score, Velocity

F64 = torch.float64
PARAMS = [Noise(), Data(), Velocity(), Score()]
IDS = [p.name for p in PARAMS]

alphas = st.floats(0.01, 1.0, exclude_min=True)
sigmas = st.floats(0.01, 100.0, exclude_min=True, exclude_max=True)


def _pair(seed: int, shape=(4, 3, 5)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, dtype=F64, generator=g), torch.randn(shape, dtype=F64, generator=g)


def _assert_rel(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """Normwise relative error ``max|got - want| / max|want| <= tol``."""
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= tol, f"relative error {err:.3e} > {tol:.1e}"


@pytest.mark.parametrize("p", PARAMS, ids=IDS)
@given(alpha=alphas, sigma=sigmas, seed=st.integers(0, 2**31 - 1))
def test_target_round_trips_to_data_and_noise(p, alpha, sigma, seed):
    x0, eps = _pair(seed)
    a, s = torch.tensor(alpha, dtype=F64), torch.tensor(sigma, dtype=F64)
    x = a * x0 + s * eps
    out = p.target(x0, eps, a, s)
    # Recovering x0 from (x, eps) divides a difference by alpha, recovering eps from (x, x0)
    # divides by sigma: the round trip loses ~ulp * (sigma/alpha or alpha/sigma), up to 1e4
    # here. 1e-12 relative plus that conditioning term.
    kappa = max(alpha / sigma, sigma / alpha)
    tol = 1e-12 + 4e-15 * kappa
    _assert_rel(p.to_data(out, x, a, s), x0, tol)
    _assert_rel(p.to_noise(out, x, a, s), eps, tol)


@pytest.mark.parametrize("p", PARAMS, ids=IDS)
@given(lam=st.floats(-6.0, 6.0), seed=st.integers(0, 2**31 - 1))
def test_round_trip_to_1e_12_on_vp_coefficients(p, lam, seed):
    # VP: alpha^2 = sigmoid(2 lam), sigma^2 = sigmoid(-2 lam); kappa <= e^6 ~ 400
    x0, eps = _pair(seed)
    a = torch.sigmoid(torch.tensor(2 * lam, dtype=F64)).sqrt()
    s = torch.sigmoid(torch.tensor(-2 * lam, dtype=F64)).sqrt()
    x = a * x0 + s * eps
    out = p.target(x0, eps, a, s)
    _assert_rel(p.to_data(out, x, a, s), x0, 1e-12)
    _assert_rel(p.to_noise(out, x, a, s), eps, 1e-12)


@pytest.mark.parametrize("p", PARAMS, ids=IDS)
@given(alpha=alphas, sigma=sigmas, seed=st.integers(0, 2**31 - 1))
def test_any_output_splits_x_into_data_and_noise(p, alpha, sigma, seed):
    # For any network output (not only exact ones): x = alpha * to_data + sigma * to_noise.
    out, x = _pair(seed)
    a, s = torch.tensor(alpha, dtype=F64), torch.tensor(sigma, dtype=F64)
    rebuilt = a * p.to_data(out, x, a, s) + s * p.to_noise(out, x, a, s)
    scale = float(x.abs().max() + (a * out).abs().max() + (s * out).abs().max() * (1 + s))
    assert float((rebuilt - x).abs().max()) <= 1e-13 * scale


def test_targets_are_the_documented_quantities():
    x0, eps = _pair(0)
    a, s = torch.tensor(0.6, dtype=F64), torch.tensor(0.8, dtype=F64)
    assert torch.equal(Noise().target(x0, eps, a, s), eps)
    assert torch.equal(Data().target(x0, eps, a, s), x0)
    torch.testing.assert_close(Velocity().target(x0, eps, a, s), a * eps - s * x0, rtol=0, atol=0)
    torch.testing.assert_close(Score().target(x0, eps, a, s), -eps / s, rtol=0, atol=0)


def test_velocity_inverse_on_vp_reduces_to_salimans_ho():
    # VP: x0 = alpha x - sigma v, eps = sigma x + alpha v (Salimans & Ho 2022, eq. in App. D)
    v, x = _pair(3)
    a = torch.tensor(math.cos(0.7), dtype=F64)
    s = torch.tensor(math.sin(0.7), dtype=F64)
    p = Velocity()
    torch.testing.assert_close(p.to_data(v, x, a, s), a * x - s * v, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(p.to_noise(v, x, a, s), s * x + a * v, rtol=1e-14, atol=1e-15)


def test_score_is_gradient_of_gaussian_log_density():
    # data = delta at mu: q_t = N(alpha mu, sigma^2 I), score = -(x - alpha mu)/sigma^2
    mu, x = _pair(4)
    a, s = torch.tensor(0.3, dtype=F64), torch.tensor(2.5, dtype=F64)
    score = -(x - a * mu) / s**2
    torch.testing.assert_close(Score().to_data(score, x, a, s), mu, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(Score().to_noise(score, x, a, s), (x - a * mu) / s,
                               rtol=1e-13, atol=1e-13)


def test_per_sample_coefficients_broadcast():
    x0, eps = _pair(5, shape=(3, 2, 2))
    a = torch.tensor([0.9, 0.5, 0.1], dtype=F64).view(-1, 1, 1)
    s = torch.tensor([0.2, 1.0, 30.0], dtype=F64).view(-1, 1, 1)
    x = a * x0 + s * eps
    for p in PARAMS:
        out = p.target(x0, eps, a, s)
        assert out.shape == x0.shape
        torch.testing.assert_close(p.to_data(out, x, a, s), x0, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(p.to_noise(out, x, a, s), eps, rtol=1e-10, atol=1e-10)


def test_names_and_abstract_base():
    assert [p.name for p in PARAMS] == ["noise", "data", "velocity", "score"]
    with pytest.raises(TypeError):
        Parameterization()  # abstract
    assert Noise() == Noise()  # value objects


@pytest.mark.parametrize("p", PARAMS, ids=IDS)
@pytest.mark.parametrize("to", ("data", "noise"))
def test_conversion_into_a_buffer_equals_the_plain_conversion(p, to):
    """``to_*_into`` (float coefficients, what solvers call with a preallocated buffer) gives
    the plain conversion's values; where it converts in place the result is the buffer, and the
    inputs are untouched."""
    x, out = _pair(7)
    x_copy, out_copy = x.clone(), out.clone()
    alpha, sigma = 0.3, 1.7
    buf = torch.full_like(x, float("nan"))
    got = getattr(p, f"to_{to}_into")(buf, out, x, alpha, sigma)
    want = getattr(p, f"to_{to}")(out, x, torch.tensor(alpha, dtype=F64),
                                  torch.tensor(sigma, dtype=F64))
    _assert_rel(got, want, 1e-15)
    assert torch.equal(x, x_copy) and torch.equal(out, out_copy)
    in_place = {("noise", "data"), ("data", "noise"), ("velocity", "data"), ("velocity", "noise")}
    assert (got is buf) == ((p.name, to) in in_place)
