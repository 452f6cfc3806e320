"""Reference solutions: the float64 torchdiffeq solve of the PF-ODE in lambda against the exact
Gaussian flow (Wang & Vastola 2024), and its invariances."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from solverlab import Denoiser, InputError, OptionError, TorchModel
from solverlab.analytic import GaussianMixtureModel, GaussianModel
from solverlab.reference import ADAPTIVE_METHODS, lambda_ode, reference_solution

F64 = torch.float64
SCHEDULES = ("vp-linear", "vp-cosine", "vp-discrete", "ve", "edm")


def max_err(a, b):
    return float((a - b).abs().max())


def as_mixture(gauss, **options):
    """The same Gaussian as a 1-component mixture (no exact_flow path of its own type)."""
    return GaussianMixtureModel(weights=[1.0], means=gauss.data.mean[None],
                                covs=gauss.data.cov[None], schedule=gauss.schedule,
                                parameterization=gauss.parameterization, **options)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_numerical_solve_matches_the_exact_gaussian_flow(schedule):
    """Acceptance: the torchdiffeq path over the whole time range is within 1e-9."""
    gauss = GaussianModel(dim=3, seed=1, schedule=schedule)
    s = gauss.schedule
    x = gauss.sample_prior(6, generator=torch.Generator().manual_seed(0))
    exact = gauss.exact_flow(x, s.t_max, s.t_min)
    numerical = reference_solution(as_mixture(gauss), x, s.t_max, s.t_min, use_exact=False)
    assert numerical.dtype == F64
    assert max_err(numerical, exact) <= 1e-9


def test_exact_flow_is_used_when_available():
    gauss = GaussianModel(dim=2, seed=3, parameterization="velocity")
    x = gauss.sample_prior(4, generator=torch.Generator().manual_seed(0))
    exact = gauss.exact_flow(x, 1.0, 0.01)
    assert torch.equal(reference_solution(gauss, x, 1.0, 0.01), exact)
    assert torch.equal(reference_solution(as_mixture(gauss), x, 1.0, 0.01), exact)


def test_lambda_ode_is_the_pf_ode():
    """d(x/alpha)/dlambda = -exp(-lambda) eps, i.e. the t-drift divided by dlambda/dt."""
    gauss = GaussianModel(dim=2, seed=2)
    s = gauss.schedule
    x = gauss.sample_prior(3, t=0.7, generator=torch.Generator().manual_seed(0))
    ts, te = torch.full((3,), 0.7, dtype=F64), torch.full((3,), 0.1, dtype=F64)
    rhs, y0 = lambda_ode(gauss, x, ts, te)
    assert torch.allclose(y0, x / s.alpha(0.7), rtol=1e-15, atol=0)
    drift_t = Denoiser(gauss).drift(x, ts)  # dx/dt
    # With x = alpha y: dy/dt = (dx/dt - dlog_alpha/dt x)/alpha, and dr/dt = dlambda/dt / h.
    h = s.lambda_(te) - s.lambda_(ts)
    dy_dt = (drift_t - s.dlog_alpha_dt(ts)[:, None] * x) / s.alpha(ts)[:, None]
    expected = dy_dt * (h / s.dlambda_dt(ts))[:, None]
    assert max_err(rhs(torch.tensor(0.0, dtype=F64), y0), expected) <= 1e-12


def test_every_parameterization_gives_the_same_reference():
    x = GaussianMixtureModel().sample_prior(4, generator=torch.Generator().manual_seed(1))
    base = reference_solution(GaussianMixtureModel(), x, 1.0, 1e-3)
    for param in ("data", "velocity", "score"):
        other = reference_solution(GaussianMixtureModel(parameterization=param), x, 1.0, 1e-3)
        assert max_err(other, base) <= 1e-8, param


def test_mixture_reference_composes():
    model = GaussianMixtureModel(dim=3, components=4, seed=5, schedule="edm")
    x = model.sample_prior(5, generator=torch.Generator().manual_seed(2))
    direct = reference_solution(model, x, 80.0, 0.01)
    halfway = reference_solution(model, x, 80.0, 1.0)
    assert max_err(reference_solution(model, halfway, 1.0, 0.01), direct) <= 1e-8
    # Noising back (the ODE run forward in t) recovers the halfway state.
    assert max_err(reference_solution(model, direct, 0.01, 1.0), halfway) <= 1e-7


@given(st.integers(0, 2**16), st.sampled_from(SCHEDULES),
       st.lists(st.floats(0.0, 1.0), min_size=6, max_size=6))
def test_per_sample_times(seed, schedule, fracs):
    gauss = GaussianModel(dim=2, seed=seed, schedule=schedule)
    s = gauss.schedule
    t = s.t_min + torch.tensor(fracs, dtype=F64) * (s.t_max - s.t_min)
    t_start, t_end = t[:3], t[3:]
    x = gauss.sample_prior(3, generator=torch.Generator().manual_seed(seed))
    batched = reference_solution(gauss, x, t_start, t_end)
    for i in range(3):
        single = reference_solution(gauss, x[i:i + 1], float(t_start[i]), float(t_end[i]))
        assert max_err(batched[i:i + 1], single) <= 1e-13 * max(1.0, float(single.abs().max()))


def test_per_sample_times_numerical():
    model = GaussianMixtureModel()
    x = model.sample_prior(3, generator=torch.Generator().manual_seed(4))
    t_start = torch.tensor([1.0, 0.8, 0.5], dtype=F64)
    t_end = torch.tensor([1e-3, 0.2, 0.5], dtype=F64)
    batched = reference_solution(model, x, t_start, t_end)
    assert torch.equal(batched[2], x[2])  # t_start == t_end: nothing moves
    for i in range(2):
        single = reference_solution(model, x[i:i + 1], float(t_start[i]), float(t_end[i]))
        assert max_err(batched[i:i + 1], single) <= 1e-8


class _Net(nn.Module):
    """A 'network' that happens to be exact: exercises the path a trained model takes."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t):
        return self.model(x, t.to(F64))


def test_generic_model_shape_dtype_and_no_nfe():
    gauss = GaussianModel(dim=4, seed=6)
    net = TorchModel(_Net(gauss), "vp-linear", "noise")
    x = gauss.sample_prior(3, generator=torch.Generator().manual_seed(0)).reshape(3, 1, 2, 2)
    den = Denoiser(net)
    out = reference_solution(den, x.float(), 1.0, 1e-3)
    assert out.shape == (3, 1, 2, 2) and out.dtype == F64
    assert den.nfe == 0
    exact = gauss.exact_flow(x.float(), 1.0, 1e-3)
    assert max_err(out, exact) <= 1e-9
    # A network called in float32 still gives a float64 result, at float32 accuracy.
    loose = reference_solution(net, x, 1.0, 1e-3, rtol=1e-6, atol=1e-6, method="dopri5",
                               dtype=torch.float32)
    assert loose.dtype == F64 and max_err(loose, exact) <= 1e-4


def test_default_problem_separates_solvers():
    """The embedded default of ``solverlab compare``: first-order (DDIM) error vs the reference
    is large at 5-20 NFE and falls with NFE, and the data is far from its Gaussian fit."""
    model = GaussianMixtureModel()
    s = model.schedule
    x = model.sample_prior(64, generator=torch.Generator().manual_seed(0))
    ref = reference_solution(model, x, s.t_max, s.t_min)
    errors = []
    for steps in (5, 10, 20):
        ts = s.t_of_lambda(torch.linspace(s.lambda_min, s.lambda_max, steps + 1, dtype=F64))
        ts[0], ts[-1] = s.t_max, s.t_min
        y = x
        for t0, t1 in itertools.pairwise(ts.tolist()):  # DPM-Solver++ 1 (Lu et al. 2022b)
            x0 = model.data.denoise(y, s.alpha(t0), s.sigma(t0))
            h = s.lambda_(t1) - s.lambda_(t0)
            y = s.sigma(t1) / s.sigma(t0) * y - s.alpha(t1) * torch.expm1(-h) * x0
        errors.append(float((y - ref).norm(dim=1).mean()))
    assert errors[0] > errors[1] > errors[2] > 0.05
    d = model.data
    mean = d.weights @ d.means
    centered = d.means - mean
    cov = (d.weights[:, None, None] * (d.covs + centered[:, :, None] * centered[:, None, :])).sum(0)
    fit = GaussianModel(mean=mean, cov=cov)
    assert float((fit.exact_flow(x, s.t_max, s.t_min) - ref).norm(dim=1).mean()) > 0.3


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"method": "rk4"}, OptionError, "dopri8"),
    ({"rtol": 0.0}, OptionError, "rtol"),
    ({"atol": float("nan")}, OptionError, "atol"),
    ({"t_start": torch.ones(5, dtype=F64)}, InputError, "t_start"),
    ({"t_end": 0.0}, InputError, "infinite log-SNR"),
])
def test_bad_arguments(kwargs, error, match):
    args = {"model": GaussianMixtureModel(), "x": torch.zeros(2, 2), "t_start": 1.0,
            "t_end": 0.5, **kwargs}
    with pytest.raises(error, match=match):
        reference_solution(**args)
    with pytest.raises(OptionError, match=r"not a solverlab\.Model"):
        reference_solution(object(), torch.zeros(2, 2), 1.0, 0.5)
    assert "dopri8" in ADAPTIVE_METHODS


def test_reference_work_is_bounded_and_never_returns_nan():
    import torch

    import solverlab
    from solverlab.errors import ModelOutputError, SolverDivergedError
    from solverlab.testing import TimeMLP

    net = solverlab.TorchModel(TimeMLP(2).double(), "vp-linear")
    x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(SolverDivergedError, match=r"more than max_nfe=50 model evaluations"):
        reference_solution(net, x, 1.0, 1e-3, max_nfe=50)

    class NaNNet(torch.nn.Module):
        def forward(self, x, t):
            return x * float("nan")

    with pytest.raises(SolverDivergedError, match="underflow in dt"):
        reference_solution(solverlab.TorchModel(NaNNet(), "vp-linear"), x, 1.0, 1e-3)

    class Broadcast(torch.nn.Module):
        def forward(self, x, t):
            return x[:, :1]

    with pytest.raises(ModelOutputError, match=r"shape \(3, 1\) for x of shape \(3, 2\)"):
        reference_solution(solverlab.TorchModel(Broadcast(), "vp-linear"), x, 1.0, 1e-3)
    with pytest.raises(solverlab.OptionError, match="max_nfe=0"):
        reference_solution(net, x, 1.0, 1e-3, max_nfe=0)
