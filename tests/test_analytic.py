"""Analytic models: closed forms (docs/mathematics.md#gaussian-data) vs independent computations
(dense linear algebra, torch.distributions + autograd, finite differences, RK4)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from solverlab import (
    Denoiser,
    InputError,
    OptionError,
    get_model,
    get_parameterization,
    get_schedule,
)
from solverlab.analytic import (
    REGISTERED_MODELS,
    AnalyticModel,
    GaussianData,
    GaussianMixtureData,
    GaussianMixtureModel,
    GaussianModel,
)

F64 = torch.float64
SCHEDULES = ("vp-linear", "vp-cosine", "vp-discrete", "ve", "edm")
PARAMETERIZATIONS = ("noise", "data", "velocity", "score")


def assert_close(actual, expected, tol):
    """Max abs error <= tol relative to the scale of ``expected`` (at least 1)."""
    err = float((actual - expected).abs().max())
    scale = max(1.0, float(expected.abs().max()))
    assert err <= tol * scale, f"max error {err:.3e} > {tol:.1e} * {scale:.3g}"


def coefficients(schedule_name, n, seed):
    """alpha, sigma at n random times of the schedule (float64, (n,))."""
    s = get_schedule(schedule_name)
    g = torch.Generator().manual_seed(seed)
    t = s.t_min + (s.t_max - s.t_min) * torch.rand(n, generator=g, dtype=F64)
    return s.alpha(t), s.sigma(t)


def states(data, alpha, sigma, seed):
    """x_t drawn from the marginal, plus a few far-out points."""
    g = torch.Generator().manual_seed(seed)
    x0 = data.sample(alpha.shape[0], generator=g)
    x = alpha[:, None] * x0 + sigma[:, None] * torch.randn(x0.shape, generator=g, dtype=F64)
    return x


def full(cov, diagonal):
    return torch.diag_embed(cov) if diagonal else cov


problems = st.fixed_dictionaries({
    "dim": st.integers(1, 5),
    "seed": st.integers(0, 2**16),
    "diagonal": st.booleans(),
    "schedule": st.sampled_from(SCHEDULES),
})


# --- denoiser, noise prediction, score --------------------------------------------------------

@given(problems)
def test_gaussian_denoiser_matches_dense_closed_form(p):
    data = GaussianModel(dim=p["dim"], seed=p["seed"], diagonal=p["diagonal"]).data
    alpha, sigma = coefficients(p["schedule"], 6, p["seed"])
    x = states(data, alpha, sigma, p["seed"] + 1)
    mu, cov = data.mean, full(data.cov, p["diagonal"])
    a, s = alpha[:, None, None], sigma[:, None, None]
    big = a**2 * cov + s**2 * torch.eye(p["dim"], dtype=F64)  # (b, d, d)
    r = torch.linalg.solve(big, (x - alpha[:, None] * mu).unsqueeze(-1))
    x0 = mu + (a * cov @ r).squeeze(-1)
    eps = (s * r).squeeze(-1)
    assert_close(data.denoise(x, alpha, sigma), x0, 1e-12)
    assert_close(data.noise(x, alpha, sigma), eps, 1e-12)
    assert_close(data.score(x, alpha, sigma), -r.squeeze(-1), 1e-12)
    # x = alpha x0_hat + sigma eps_hat holds for the posterior means as well.
    assert_close(alpha[:, None] * data.denoise(x, alpha, sigma)
                 + sigma[:, None] * data.noise(x, alpha, sigma), x, 1e-12)


def test_diagonal_and_full_covariances_agree():
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(4, generator=g, dtype=F64)
    var = 0.1 + torch.rand(4, generator=g, dtype=F64)
    diag, dense = GaussianData(mean=mean, cov=var), GaussianData(mean=mean, cov=torch.diag(var))
    assert diag.dim == dense.dim == 4
    x = torch.randn(5, 4, generator=g, dtype=F64)
    alpha, sigma = torch.rand(5, generator=g, dtype=F64), torch.rand(5, generator=g, dtype=F64)
    for f in ("denoise", "noise", "score", "log_prob"):
        assert_close(getattr(diag, f)(x, alpha, sigma), getattr(dense, f)(x, alpha, sigma), 1e-13)
    assert_close(diag.flow(x, 0.3, 0.9, 0.8, 0.2), dense.flow(x, 0.3, 0.9, 0.8, 0.2), 1e-13)
    mdiag = GaussianMixtureData.random(4, 3, seed=1, diagonal=True)
    mfull = GaussianMixtureData(weights=mdiag.weights, means=mdiag.means,
                                covs=torch.diag_embed(mdiag.covs))
    for f in ("denoise", "noise", "score", "log_prob", "responsibilities"):
        assert_close(getattr(mdiag, f)(x, alpha, sigma), getattr(mfull, f)(x, alpha, sigma), 1e-12)


@given(problems)
def test_one_component_mixture_equals_gaussian(p):
    gauss = GaussianModel(dim=p["dim"], seed=p["seed"], diagonal=p["diagonal"],
                          schedule=p["schedule"])
    mix = GaussianMixtureModel(weights=[2.5], means=gauss.data.mean[None],
                               covs=gauss.data.cov[None], schedule=p["schedule"])
    assert mix.components == 1 and mix.dim == p["dim"]
    alpha, sigma = coefficients(p["schedule"], 5, p["seed"])
    x = states(gauss.data, alpha, sigma, p["seed"])
    for f in ("denoise", "noise", "score", "log_prob"):
        assert_close(getattr(mix.data, f)(x, alpha, sigma),
                     getattr(gauss.data, f)(x, alpha, sigma), 1e-12)
    assert torch.equal(mix.data.responsibilities(x, alpha, sigma), torch.ones(5, 1, dtype=F64))
    s = gauss.schedule
    assert_close(mix.exact_flow(x, s.t_max, s.t_min), gauss.exact_flow(x, s.t_max, s.t_min), 1e-12)


def log_density(data, x, alpha, sigma):
    """log p_t(x) from torch.distributions, independent of the eigenbasis code."""
    d = data.dim
    covs = full(data.covs, data.covs.ndim == 2)
    terms = []
    for i in range(data.components):
        cov = alpha**2 * covs[i] + sigma**2 * torch.eye(d, dtype=F64)
        dist = torch.distributions.MultivariateNormal(alpha * data.means[i], covariance_matrix=cov)
        terms.append(torch.log(data.weights[i]) + dist.log_prob(x))
    return torch.logsumexp(torch.stack(terms, -1), -1)


@given(problems, st.integers(1, 4))
def test_mixture_score_is_the_gradient_of_the_log_marginal(p, k):
    data = GaussianMixtureData.random(p["dim"], k, seed=p["seed"], diagonal=p["diagonal"])
    alpha, sigma = coefficients(p["schedule"], 1, p["seed"])
    alpha, sigma = float(alpha), float(sigma)
    x = states(data, torch.full((4,), alpha, dtype=F64), torch.full((4,), sigma, dtype=F64),
               p["seed"]).requires_grad_(True)
    logp = log_density(data, x, alpha, sigma)
    (grad,) = torch.autograd.grad(logp.sum(), x)
    x = x.detach()
    assert_close(data.log_prob(x, alpha, sigma), logp.detach(), 1e-12)
    assert_close(data.score(x, alpha, sigma), grad, 1e-9)
    assert_close(-data.noise(x, alpha, sigma) / sigma, grad, 1e-9)
    # Tweedie: alpha E[x0 | x] = x + sigma^2 grad log p_t(x).
    assert_close(alpha * data.denoise(x, alpha, sigma), x + sigma**2 * grad, 1e-9)
    # Responsibilities are the normalized component densities.
    w = data.responsibilities(x, alpha, sigma)
    assert w.shape == (4, k)
    assert_close(w.sum(-1), torch.ones(4, dtype=F64), 1e-14)


def test_mixture_is_finite_far_away_and_at_tiny_and_huge_noise():
    data = GaussianMixtureData.random(3, 4, seed=0)
    g = torch.Generator().manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(6, 3, generator=g, dtype=F64), dim=-1)
    for radius in (1e2, 1e6):
        for alpha, sigma in ((1.0, 1e-8), (1.0, 1e-3), (1e-3, 1.0), (1.0, 1e4)):
            x = radius * direction
            out = [data.denoise(x, alpha, sigma), data.noise(x, alpha, sigma),
                   data.score(x, alpha, sigma), data.responsibilities(x, alpha, sigma),
                   data.log_prob(x, alpha, sigma)]
            assert all(bool(torch.isfinite(o).all()) for o in out), (radius, alpha, sigma)
    x = 1e6 * direction
    # At vanishing noise the posterior mean is the point itself, whichever component wins.
    assert_close(data.denoise(x, 1.0, 1e-8), x, 1e-14)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("param", PARAMETERIZATIONS)
def test_every_parameterization_gives_the_same_data_prediction(schedule, param):
    model = GaussianMixtureModel(dim=3, components=3, seed=2, schedule=schedule,
                                 parameterization=param)
    s = model.schedule
    t = torch.linspace(s.t_max, s.t_min, 7, dtype=F64)
    x = model.sample_prior(7, generator=torch.Generator().manual_seed(1))
    x = s.alpha(t)[:, None] / s.alpha(s.t_max) * x  # a spread of magnitudes
    alpha, sigma = s.alpha(t)[:, None], s.sigma(t)[:, None]
    out = model(x, t)
    p = get_parameterization(param)
    assert_close(p.to_data(out, x, alpha, sigma), model.data.denoise(x, s.alpha(t), s.sigma(t)),
                 1e-10)
    assert_close(p.to_noise(out, x, alpha, sigma), model.data.noise(x, s.alpha(t), s.sigma(t)),
                 1e-10)
    den = Denoiser(model)
    assert_close(den.data(x, t), model.data.denoise(x, s.alpha(t), s.sigma(t)), 1e-10)
    assert den.nfe == 1


def test_model_accepts_image_shapes_and_keeps_dtype():
    model = GaussianMixtureModel(dim=4, seed=1)
    x = model.sample_prior(3, t=0.5, dtype=torch.float32).reshape(3, 1, 2, 2)
    t = torch.full((3,), 0.5, dtype=F64)
    out = model(x, t)
    assert out.shape == x.shape and out.dtype == torch.float32
    ref = model(x.reshape(3, 4).double(), t)
    assert_close(out.double().reshape(3, 4), ref, 1e-6)
    assert torch.equal(model(x, torch.tensor(0.5, dtype=F64)), out)  # scalar t broadcasts
    with pytest.raises(InputError, match="dimension 4"):
        model(torch.zeros(3, 5), t)
    with pytest.raises(InputError, match="shape"):
        model(x, torch.zeros(2, dtype=F64))


# --- exact probability-flow solution ----------------------------------------------------------

def interior_times(s):
    frac = torch.tensor([0.0125, 0.2505, 0.5005, 0.9005], dtype=F64)
    if s.name == "vp-discrete":  # log alpha is piecewise linear: stay inside one segment
        n = s.num_train_timesteps
        return (torch.floor(frac * n) + 0.5) / n
    return s.t_min + frac * (s.t_max - s.t_min)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_exact_flow_satisfies_the_pf_ode(schedule):
    model = GaussianModel(dim=3, seed=4, schedule=schedule)
    s, den = model.schedule, Denoiser(model)
    x_T = model.sample_prior(4, generator=torch.Generator().manual_seed(0))
    for t in interior_times(s).tolist():
        h = 1e-5 * t
        x = model.exact_flow(x_T, s.t_max, t)
        ahead, behind = model.exact_flow(x_T, s.t_max, t + h), model.exact_flow(x_T, s.t_max, t - h)
        fd = (ahead - behind) / (2 * h)
        assert_close(fd, den.drift(x, t), 1e-7)


@given(problems, st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3))
def test_exact_flow_composes_and_inverts(p, fracs):
    model = GaussianModel(dim=p["dim"], seed=p["seed"], diagonal=p["diagonal"],
                          schedule=p["schedule"])
    s = model.schedule
    t_s, t_u, t_t = (s.t_min + f * (s.t_max - s.t_min) for f in sorted(fracs, reverse=True))
    x = model.sample_prior(5, t=t_s, generator=torch.Generator().manual_seed(p["seed"]))
    direct = model.exact_flow(x, t_s, t_t)
    assert_close(model.exact_flow(model.exact_flow(x, t_s, t_u), t_u, t_t), direct, 1e-12)
    assert_close(model.exact_flow(direct, t_t, t_s), x, 1e-12)
    # a zero-length flow is the identity up to the eigenbasis round trip (a few ulp)
    assert_close(model.exact_flow(x, t_s, t_s), x, 1e-14)


def test_exact_flow_matches_rk4():
    """The closed form against RK4 on dx/dsigma = (x - D(x, sigma))/sigma from
    sigma = 80 to 0.5 (here 2000 steps uniform in log sigma instead of 20k uniform in sigma)."""
    data = GaussianModel(dim=3, seed=5).data
    x = 80.0 * torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=F64)

    def f(u, y):  # d y / d log sigma
        return y - data.denoise(y, 1.0, math.exp(u))

    us = torch.linspace(math.log(80.0), math.log(0.5), 2001, dtype=F64).tolist()
    y = x
    for u0, u1 in itertools.pairwise(us):
        h = u1 - u0
        k1 = f(u0, y)
        k2 = f(u0 + h / 2, y + h / 2 * k1)
        k3 = f(u0 + h / 2, y + h / 2 * k2)
        k4 = f(u1, y + h * k3)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    assert_close(y, data.flow(x, 1.0, 80.0, 1.0, 0.5), 1e-10)


def test_exact_flow_only_for_gaussian_data():
    assert GaussianMixtureModel().exact_flow(torch.zeros(2, 2), 1.0, 0.5) is None
    assert GaussianMixtureModel(components=1).exact_flow(torch.zeros(2, 2), 1.0, 0.5) is not None
    x = torch.zeros(2, 1, 2)
    assert GaussianModel().exact_flow(x, 1.0, 0.5).shape == (2, 1, 2)


# --- sampling ---------------------------------------------------------------------------------

def test_samples_have_the_exact_moments():
    n = 40_000
    gauss = GaussianModel(dim=3, seed=1).data
    mix = GaussianMixtureData.random(2, 3, seed=2)
    mix_mean = mix.weights @ mix.means
    mix_cov = (mix.weights[:, None, None] * (mix.covs + mix.means[:, :, None]
                                             * mix.means[:, None, :])).sum(0)
    mix_cov = mix_cov - torch.outer(mix_mean, mix_mean)
    cases = [(gauss, gauss.mean, gauss.cov), (mix, mix_mean, mix_cov)]
    for data, mean, cov in cases:
        for alpha, sigma in ((1.0, 0.0), (0.6, 0.8)):
            x = data.sample_marginal(n, alpha, sigma, generator=torch.Generator().manual_seed(0))
            target = alpha**2 * cov + sigma**2 * torch.eye(data.dim, dtype=F64)
            assert x.shape == (n, data.dim) and x.dtype == F64
            assert_close(x.mean(0), alpha * mean, 5 * math.sqrt(float(target.diag().max()) / n))
            assert_close(torch.cov(x.T), target, 0.05)
    one = gauss.sample(7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(one, gauss.sample(7, generator=torch.Generator().manual_seed(3)))


def test_sample_prior_uses_the_schedule():
    model = GaussianMixtureModel(schedule="edm")
    x = model.sample_prior(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    assert x.shape == (4000, 2) and x.dtype == torch.float32
    assert abs(float(x.std()) - 80.0) < 3.0  # sigma(t_max) = 80 dominates the data spread


# --- construction and options -----------------------------------------------------------------

def test_random_mixture_is_reproducible_and_bounded():
    a = GaussianMixtureData.random(3, 4, seed=7, var_min=0.2, var_max=0.5)
    b = GaussianMixtureData.random(3, 4, seed=7, var_min=0.2, var_max=0.5)
    c = GaussianMixtureData.random(3, 4, seed=8, var_min=0.2, var_max=0.5)
    assert torch.equal(a.covs, b.covs) and torch.equal(a.means, b.means)
    assert not torch.equal(a.means, c.means)
    ev = torch.linalg.eigvalsh(a.covs)
    assert bool((ev >= 0.2 - 1e-12).all()) and bool((ev <= 0.5 + 1e-12).all())
    assert abs(float(a.weights.sum()) - 1.0) < 1e-15
    d = GaussianMixtureData.random(3, 4, diagonal=True)
    assert d.covs.shape == (4, 3) and d.components == 4 and d.dim == 3


def test_registered_models_build_from_options_alone():
    assert {cls.name for cls in REGISTERED_MODELS} == {"gaussian", "gaussian-mixture"}
    g = get_model("gaussian")
    assert isinstance(g, GaussianModel) and g.dim == 2 and g.schedule.name == "vp-linear"
    assert g.parameterization.name == "noise"
    ev = torch.linalg.eigvalsh(g.data.cov)
    assert bool((ev >= 0.1 - 1e-12).all()) and bool((ev <= 1.0 + 1e-12).all())
    m = get_model("gaussian-mixture")
    assert isinstance(m, GaussianMixtureModel) and (m.dim, m.components) == (2, 3)
    assert float(torch.linalg.eigvalsh(m.data.covs).min()) >= 0.05
    m4 = get_model("gaussian-mixture", dim=4, components=5, schedule="edm",
                   parameterization="velocity", diagonal=True)
    assert m4.data.covs.shape == (5, 4) and m4.schedule.name == "edm"
    assert GaussianModel(mean=torch.zeros(5)).dim == 5
    assert GaussianMixtureModel(means=torch.zeros(4, 3)).components == 4
    sched = get_schedule("ve", sigma_max=10.0)
    assert AnalyticModel(data=g.data, schedule=sched).schedule is sched


@pytest.mark.parametrize(("build", "match"), [
    (lambda: GaussianData(mean=[0.0, 0.0], cov=[[1.0, 2.0], [2.0, 1.0]]), "positive definite"),
    (lambda: GaussianData(mean=[0.0, 0.0], cov=[[1.0, 0.5], [0.0, 1.0]]), "symmetric"),
    (lambda: GaussianData(mean=[0.0, 0.0], cov=[1.0, 0.0]), "positive definite"),
    (lambda: GaussianData(mean=[0.0, 0.0], cov=torch.eye(3)), r"option cov.*\(2, 2\)"),
    (lambda: GaussianData(mean=[0.0, float("nan")], cov=[1.0, 1.0]), "finite"),
    (lambda: GaussianData(mean="abc", cov=[1.0]), "option mean"),
    (lambda: GaussianMixtureData(weights=[1.0, -1.0], means=torch.zeros(2, 2),
                                 covs=torch.ones(2, 2)), "weight"),
    (lambda: GaussianMixtureData(weights=[1.0], means=torch.zeros(2, 2),
                                 covs=torch.ones(2, 2)), "option weights"),
    (lambda: GaussianMixtureData(weights=[1.0, 1.0], means=torch.zeros(2, 2),
                                 covs=torch.ones(2, 3)), "option covs"),
    (lambda: GaussianMixtureData.random(2, 2, var_min=0.0), "var_min"),
    (lambda: GaussianMixtureData.random(0, 2), "dim=0"),
    (lambda: GaussianModel(dim=3, mean=torch.zeros(2)), "dim"),
    (lambda: GaussianModel(diagonal=True, cov=torch.eye(2)), "diagonal=True"),
    (lambda: GaussianModel(dim=0), "dim=0"),
    (lambda: GaussianModel(seed=-1), "seed"),
    (lambda: GaussianModel(diagonal=1), "diagonal"),
    (lambda: GaussianMixtureModel(components=2, weights=[1.0, 1.0, 1.0]), "components"),
    (lambda: GaussianMixtureModel(means=torch.zeros(3, 2), covs=torch.ones(3, 4)), "dim"),
    (lambda: get_model("gaussian", dims=3), "dims"),
    (lambda: AnalyticModel(data=torch.zeros(2)), "data"),
])
def test_bad_options_raise_option_error(build, match):
    with pytest.raises(OptionError, match=match):
        build()


def test_unknown_schedule_name_is_reported():
    with pytest.raises(OptionError, match="did you mean 'vp-linear'"):
        GaussianModel(schedule="vp-linaer")
