"""The peers' noise-level grids against the peers' own functions: diffusers'
``_convert_to_exponential``, ``_convert_to_lu`` and ``_convert_to_beta`` (called on the
scheduler, float64 inputs) and k-diffusion's ``get_sigmas_polyexponential`` and
``get_sigmas_vp`` (k-diffusion is not a dependency: their formulas are written out below from
``k_diffusion/sampling.py`` at commit 4601bf0, in float64). A grid's times are compared through
their noise levels ``sigma = sigma_t/alpha_t``; peers append a final ``sigma = 0`` that a
solverlab grid leaves to ``final_step``, and their ``n`` levels are ``steps = n - 1``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import solverlab
from solverlab.errors import GridError, OptionError
from solverlab.grid import (
    VP,
    Beta,
    Exponential,
    LogSNR,
    LuLambdas,
    PolyExponential,
    TimeUniform,
    beta_cdf,
    beta_quantile,
)
from solverlab.schedule import EDM, VE, VPCosine, VPDiscrete, VPLinear

F64 = torch.float64
pytestmark = pytest.mark.filterwarnings(
    # diffusers 0.42 under numpy 2: not ours to fix
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
N_LEVELS = (2, 3, 5, 10, 25, 100)


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=F64), torch.as_tensor(np.ascontiguousarray(b), dtype=F64)
    return float(((a - b).abs() / b.abs()).max())


def _levels(schedule, grid: torch.Tensor) -> torch.Tensor:
    return schedule.sigma_ve(grid)


# -- diffusers ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def diffusers_table():
    """diffusers' default scheduler, its ``alphas_cumprod`` as solverlab's ``vp-discrete``
    schedule (float64), and the float64 sigma table ``sqrt((1 - ac)/ac)`` its sigma
    conversions start from (flipped to decreasing, as ``set_timesteps`` passes it)."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DPMSolverMultistepScheduler()
    ac = sched.alphas_cumprod.to(F64)
    schedule = VPDiscrete(alphas_cumprod=ac)
    table = ((1 - ac) / ac).sqrt().numpy()
    return sched, schedule, table


@pytest.mark.parametrize("n", N_LEVELS)
def test_exponential_is_diffusers_convert_to_exponential(diffusers_table, n):
    sched, schedule, table = diffusers_table
    theirs = sched._convert_to_exponential(in_sigmas=np.flip(table).copy(), num_inference_steps=n)
    ours = _levels(schedule, Exponential()(schedule, n - 1))
    assert _rel(ours, theirs) < 1e-12


@pytest.mark.parametrize("n", N_LEVELS)
def test_lu_lambdas_is_diffusers_convert_to_lu(diffusers_table, n):
    """diffusers' "lambdas" are ``log sigma`` (its ``log_sigmas``, flipped): uniform in
    ``log sigma``, so the same levels as ``exponential`` and the same times as ``logsnr``."""
    sched, schedule, table = diffusers_table
    lambdas = sched._convert_to_lu(in_lambdas=np.flip(np.log(table)).copy(),
                                   num_inference_steps=n)
    ours = LuLambdas()(schedule, n - 1)
    assert _rel(_levels(schedule, ours), np.exp(lambdas)) < 1e-12
    assert torch.allclose(ours, LogSNR()(schedule, n - 1), rtol=1e-12, atol=0)
    assert torch.allclose(ours, Exponential()(schedule, n - 1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("n", N_LEVELS)
@pytest.mark.parametrize(("a", "b"), [(0.6, 0.6), (0.5, 2.0), (3.0, 1.5)])
def test_beta_is_diffusers_convert_to_beta(diffusers_table, n, a, b):
    pytest.importorskip("scipy")
    sched, schedule, table = diffusers_table
    theirs = sched._convert_to_beta(in_sigmas=np.flip(table).copy(), num_inference_steps=n,
                                    alpha=a, beta=b)
    ours = _levels(schedule, Beta(alpha=a, beta=b)(schedule, n - 1))
    assert _rel(ours, theirs) < 1e-12


@pytest.mark.parametrize("option", ("use_exponential_sigmas", "use_beta_sigmas",
                                    "use_lu_lambdas"))
def test_diffusers_set_timesteps_levels(diffusers_table, option):
    """Through diffusers' own ``set_timesteps`` (float32 ``sigmas``): its first ``n`` levels
    are the grid's to float32 round-off; its last level repeats ``sigma_min`` with
    ``final_sigmas_type="sigma_min"`` (a zero-length last step) or is 0."""
    diffusers = pytest.importorskip("diffusers")
    _, schedule, _ = diffusers_table
    name = {"use_exponential_sigmas": "exponential", "use_beta_sigmas": "beta",
            "use_lu_lambdas": "lu-lambdas"}[option]
    for final in ("zero", "sigma_min"):
        sched = diffusers.DPMSolverMultistepScheduler(**{option: True}, final_sigmas_type=final)
        sched.set_timesteps(12)
        ours = _levels(schedule, solverlab.get_grid(name)(schedule, 11))
        assert _rel(ours, sched.sigmas[:-1].double()) < 1e-6
        last = float(sched.sigmas[-1])
        assert last == 0.0 if final == "zero" else math.isclose(last, float(ours[-1]),
                                                                 rel_tol=1e-6)


# -- k-diffusion (formulas of k_diffusion/sampling.py, float64) ---------------------------------
def kdiff_polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0):
    """``get_sigmas_polyexponential`` without its appended zero."""
    ramp = torch.linspace(1, 0, n, dtype=F64) ** rho
    return torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))


def kdiff_vp(n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3):
    """``get_sigmas_vp`` without its appended zero."""
    t = torch.linspace(1, eps_s, n, dtype=F64)
    return torch.sqrt(torch.exp(beta_d * t**2 / 2 + beta_min * t) - 1)


@pytest.mark.parametrize("n", N_LEVELS)
@pytest.mark.parametrize("rho", (1.0, 0.5, 2.0, 7.0))
@pytest.mark.parametrize(("schedule", "sigma_min", "sigma_max"),
                         [(EDM(), 0.002, 80.0), (VPLinear(), 0.05, 100.0), (VE(), 0.01, 50.0)],
                         ids=("edm", "vp-linear", "ve"))
def test_polyexponential_is_k_diffusion(schedule, sigma_min, sigma_max, rho, n):
    grid = PolyExponential(rho=rho, sigma_min=sigma_min, sigma_max=sigma_max)(schedule, n - 1)
    assert _rel(_levels(schedule, grid), kdiff_polyexponential(n, sigma_min, sigma_max, rho)
                ) < 1e-12


@pytest.mark.parametrize("n", N_LEVELS)
def test_vp_on_the_default_vp_linear_schedule_is_k_diffusion_and_time_uniform(n):
    schedule = VPLinear()
    grid = VP()(schedule, n - 1)
    assert _rel(_levels(schedule, grid), kdiff_vp(n)) < 1e-12
    assert torch.allclose(grid, TimeUniform()(schedule, n - 1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("n", N_LEVELS)
@pytest.mark.parametrize("schedule", (EDM(), VPCosine()), ids=lambda s: s.name)
def test_vp_with_its_own_end_levels_is_k_diffusion(schedule, n):
    """k-diffusion's levels for other options: ``sigma_max = sigma(1)``, ``sigma_min =
    sigma(eps_s)``, on schedules whose range holds them."""
    kw = {"beta_d": 10.0, "beta_min": 0.5}
    vp = VP(**kw)
    grid = VP(**kw, sigma_max=float(vp.sigma_of(1.0)), sigma_min=float(vp.sigma_of(0.01)))
    ours = _levels(schedule, grid(schedule, n - 1))
    assert _rel(ours, kdiff_vp(n, eps_s=0.01, **kw)) < 1e-12
    tau = torch.tensor([1e-3, 0.3, 1.0], dtype=F64)
    assert torch.allclose(vp.tau_of(vp.sigma_of(tau)), tau, rtol=1e-13, atol=0)


# -- the beta quantile ------------------------------------------------------------------------
@pytest.mark.parametrize(("a", "b"), [(0.6, 0.6), (0.1, 0.1), (0.5, 2.0), (3.3, 7.1), (10, 10),
                                      (1.0, 1.0)])
def test_beta_quantile_is_scipy_beta_ppf(a, b):
    stats = pytest.importorskip("scipy.stats")
    special = pytest.importorskip("scipy.special")
    for q in np.linspace(0, 1, 201):
        x = beta_quantile(float(q), a, b)
        assert abs(x - stats.beta.ppf(q, a, b)) <= 1e-12 * max(1e-3, x)
        assert abs(beta_cdf(float(q), a, b) - special.betainc(a, b, q)) < 1e-13
    # a, b = 1: the uniform distribution
    assert beta_quantile(0.3, 1.0, 1.0) == pytest.approx(0.3, rel=1e-15)


# -- shapes, ends and errors -------------------------------------------------------------------
SIGMA_GRIDS = [Exponential(), LuLambdas(), Beta(), Beta(alpha=2.0, beta=0.5),
               PolyExponential(rho=3.0), VP()]


@pytest.mark.parametrize("steps", (1, 2, 9))
@pytest.mark.parametrize("schedule", (VPLinear(), VPCosine(), VPDiscrete(), VE(), EDM()),
                         ids=lambda s: s.name)
@pytest.mark.parametrize("grid", SIGMA_GRIDS, ids=lambda g: g.name)
def test_sigma_grids_are_decreasing_with_exact_ends(grid, schedule, steps):
    g = grid(schedule, steps)
    assert g.shape == (steps + 1,) and g.dtype == F64
    assert bool((g[1:] < g[:-1]).all())
    assert (float(g[0]), float(g[-1])) == (schedule.t_max, schedule.t_min)
    part = grid(schedule, steps, t_start=0.7 * schedule.t_max, t_end=0.2 * schedule.t_max)
    assert (float(part[0]), float(part[-1])) == (0.7 * schedule.t_max, 0.2 * schedule.t_max)


def test_sigma_options_set_the_ends():
    s = EDM()
    g = Exponential(sigma_max=40.0, sigma_min=0.01)(s, 4)
    ratio = (0.01 / 40.0) ** 0.25  # t = sigma on EDM: 40, 5.030, 0.6325, 0.07953, 0.01
    assert torch.allclose(g, 40.0 * ratio ** torch.arange(5, dtype=F64), rtol=1e-13, atol=0)
    assert float(g[-1]) < float(g[0]) < s.t_max


def test_sigma_grid_errors():
    s = VPLinear()
    smin, smax = math.exp(-s.lambda_max), math.exp(-s.lambda_min)
    with pytest.raises(GridError, match=r"grid 'beta': sigma_max=1000\.0 is outside the "
                                        r"noise levels of schedule 'vp-linear'.*"
                                        r"\[0\.010486, 152\.167\]"):
        Beta(sigma_max=1000.0)(s, 5)
    with pytest.raises(GridError, match=r"sigma_min=1e-05 is outside"):
        Exponential(sigma_min=1e-5)(s, 5)
    with pytest.raises(GridError, match=r"sigma_max=10\.0 and t_start=0\.5 both fix"):
        Exponential(sigma_max=10.0)(s, 5, t_start=0.5)
    with pytest.raises(OptionError, match=r"sigma_max=1\.0 must be greater than sigma_min=2\.0"):
        Exponential(sigma_max=1.0, sigma_min=2.0)
    with pytest.raises(OptionError, match=r"alpha=0"):
        Beta(alpha=0)
    with pytest.raises(OptionError, match=r"rho=-1"):
        PolyExponential(rho=-1)
    with pytest.raises(OptionError, match=r"beta_d=0 and beta_min=0"):
        VP(beta_d=0.0, beta_min=0.0)
    with pytest.raises(OptionError, match=r"sigma_min=-1"):
        solverlab.get_grid("vp", sigma_min=-1)
    # the range itself (to round-off) is accepted
    g = Exponential(sigma_max=smax * (1 + 1e-14), sigma_min=smin)(s, 3)
    assert (float(g[0]), float(g[-1])) == (s.t_max, s.t_min)
    # k-diffusion's default VP levels do not fit EDM's range
    vp = VP()
    with pytest.raises(GridError, match="sigma_max=15"):
        VP(sigma_max=float(vp.sigma_of(1.0)))(EDM(), 5)
