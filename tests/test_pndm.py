"""The PNDM family (plugins/solverlab_pndm; Liu et al. 2022, issue 4 items 1 and 5)."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

import solverlab
from solverlab import OptionError
from solverlab.analytic import GaussianMixtureModel
from solverlab.registry import declared_order
from solverlab.testing import CountingModel, make_problem, measure_convergence_order
from solverlab_expint.integrator import Nodes
from solverlab_pndm import PLMS, AdamsBashforth, transfer

F64 = torch.float64
NAMES = ("pndm-prk", "pndm-plms", "pndm-s", "pndm-f")
#: (name, options, NFE as a function of steps): the documented accounting.
ACCOUNTS = [
    ("pndm-prk", {}, lambda n: 4 * n),
    ("pndm-s", {}, lambda n: n + 1),
    ("pndm-f", {}, lambda n: 4 * n if n <= 3 else n + 9),
    ("pndm-plms", {}, lambda n: 4 * n if n <= 3 else n + 9),
    ("pndm-plms", {"warmup": "diffusers"}, lambda n: 1 if n == 1 else n + 1),
]


def _mixture(parameterization="noise", schedule="vp-linear", dim=3):
    return GaussianMixtureModel(dim=dim, components=3, seed=5, schedule=schedule,
                                parameterization=parameterization)


def _start(model, n=6, dtype=F64):
    return model.sample_prior(n, t=model.schedule.t_max,
                              generator=torch.Generator().manual_seed(0), dtype=dtype)


def _grid(model, steps, rule="logsnr"):
    return solverlab.get_grid(rule)(model.schedule, steps)


# -- the transfer part ----------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["vp-linear", "vp-cosine", "vp-discrete", "ve", "edm"])
def test_transfer_is_the_ddim_step(schedule):
    """phi equals the DDIM (eta = 0) step, here solverlab's ``ddim`` solver."""
    model = _mixture(schedule=schedule)
    x = _start(model)
    grid = _grid(model, 7)
    den = solverlab.Denoiser(model)
    n = Nodes.at(model.schedule, grid)
    A, B = transfer(n[:-1], n[1:])
    ddim = solverlab.get_solver("ddim")
    for i in range(7):
        eps = den.noise(x, grid[i])
        phi = float(A[i]) * x + float(B[i]) * eps
        ref = ddim.solve(model, x, grid[i:i + 2], progress=False).x
        assert float((phi - ref).abs().max() / ref.abs().max()) <= 1e-15
        x = ref


def test_transfer_is_the_papers_formula():
    """VP with alpha-bar = alpha^2: A, B equal eq. 11 of the paper (written as
    x + (a' - a)[x/(sqrt a (sqrt a + sqrt a')) - eps/(sqrt a (sqrt((1-a')a) + sqrt((1-a)a')))])
    on steps from 1e-1 down to 1e-9 long, where a' ~ a."""
    sched = solverlab.get_schedule("vp-linear")
    s = torch.tensor([0.5] * 5, dtype=F64)
    t = s - torch.tensor([1e-1, 1e-3, 1e-5, 1e-7, 1e-9], dtype=F64)
    A, B = transfer(Nodes.at(sched, s), Nodes.at(sched, t))
    a, a2 = sched.alpha(s) ** 2, sched.alpha(t) ** 2
    A_paper = 1 + (a2 - a) / (a.sqrt() * (a.sqrt() + a2.sqrt()))
    B_paper = -(a2 - a) / (a.sqrt() * (((1 - a2) * a).sqrt() + ((1 - a) * a2).sqrt()))
    assert torch.allclose(A, A_paper, rtol=1e-15, atol=0)
    # Both forms hinge on a difference of nearby schedule values (a' - a, or lambda_t -
    # lambda_s), rounded to ~1e-16 absolute: relative agreement ~1e-16 / step length.
    rel = ((B - B_paper) / B_paper).abs()
    assert bool((rel <= 2e-16 / (s - t)).all()), rel


# -- coefficients as data -------------------------------------------------------------------
def _lagrange_integrals(k: int) -> tuple[Fraction, ...]:
    """``int_0^1 l_j(u) du`` for the Lagrange basis on the nodes ``0, -1, .., -(k-1)``: the
    Adams-Bashforth weights by their definition, in exact arithmetic (the plugin states its
    rows as literals checked by moment conditions)."""
    out = []
    for j in range(k):
        poly = [Fraction(1)]  # coefficients of l_j, lowest degree first
        for m in range(k):
            if m != j:  # times (u + m) / (m - j)
                poly = [(a + b) / (m - j) for a, b in
                        zip([Fraction(0), *poly], [m * c for c in poly] + [Fraction(0)])]
        out.append(sum(c / (d + 1) for d, c in enumerate(poly)))
    return tuple(out)


def test_plms_rows_are_adams_bashforth():
    for k, row in PLMS.items():
        assert row.steps == k and row.w == _lagrange_integrals(k)
    # the paper's PLMS and S-PNDM rows
    assert PLMS[4].weights == (55 / 24, -59 / 24, 37 / 24, -9 / 24)
    assert PLMS[2].weights == (3 / 2, -1 / 2)


def test_bad_plms_row_is_refused():
    with pytest.raises(OptionError, match="degree"):
        AdamsBashforth((Fraction(55, 24), Fraction(-59, 24), Fraction(37, 24), Fraction(-8, 24)))


# -- the noise prediction, whatever the parameterization (diffusers#14816) ---------------------
@pytest.mark.parametrize(("name", "options"), [(n, {}) for n in NAMES]
                         + [("pndm-plms", {"warmup": "diffusers"}),
                            ("pndm-plms", {"weights": "variable"}),
                            ("pndm-prk", {"midpoint": "time"})])
@pytest.mark.parametrize("schedule", ["vp-linear", "edm"])
def test_parameterization_does_not_change_the_samples(name, options, schedule):
    solver = solverlab.get_solver(name, **options)
    xs = []
    for p in ("noise", "data", "velocity"):
        model = _mixture(p, schedule)
        xs.append(solver.solve(model, _start(model), _grid(model, 9), progress=False).x)
    scale = float(xs[0].abs().max())
    for x in xs[1:]:
        assert float((x - xs[0]).abs().max()) <= 1e-12 * scale


# -- exact NFE, short grids included --------------------------------------------------------
@pytest.mark.parametrize(("name", "options", "nfe"), ACCOUNTS,
                         ids=[f"{n}-{o}" for n, o, _ in ACCOUNTS])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 8, 10, 20])  # 10, 20: the issue's numbers
def test_nfe_is_exact(name, options, nfe, steps):
    solver = solverlab.get_solver(name, **options)
    model = CountingModel(_mixture())
    sol = solver.solve(model, _start(model.model), _grid(model, steps), progress=False)
    assert sol.nfe == model.calls == solver.expected_nfe(steps) == nfe(steps)
    assert sol.x.shape == (6, 3) and bool(torch.isfinite(sol.x).all())


def test_diffusers_warmup_on_two_steps_is_s_pndm():
    """diffusers' warm-up is S-PNDM's first step then AB2: the same method on 2 steps."""
    model = _mixture()
    x, grid = _start(model), _grid(model, 2)
    a = solverlab.get_solver("pndm-plms", warmup="diffusers").solve(model, x, grid).x
    b = solverlab.get_solver("pndm-s").solve(model, x, grid).x
    assert torch.equal(a, b)


def test_pndm_f_is_plms_with_prk_warmup():
    model = _mixture()
    x, grid = _start(model), _grid(model, 7)
    a = solverlab.get_solver("pndm-f").solve(model, x, grid).x
    b = solverlab.get_solver("pndm-plms", warmup="prk").solve(model, x, grid).x
    assert torch.equal(a, b)


# -- orders beyond the conformance kit's defaults -------------------------------------------
#: (name, options, order) for the options that change the order: declared (what reports of
#: the configured solver show) and measured (the plugin's module docstring has the table).
OPTION_ORDERS = [
    ("pndm-prk", {"midpoint": "time"}, 2),  # not the sigma/alpha mid-point on VP
    ("pndm-prk", {"midpoint": "lambda"}, 2),
    ("pndm-plms", {"weights": "variable"}, 4),
    ("pndm-plms", {"weights": "variable", "warmup": "diffusers"}, 4),
    ("pndm-plms", {"warmup": "diffusers"}, 2),
    ("pndm-f", {"weights": "variable"}, 4),
]


@pytest.mark.parametrize(("name", "options", "order"), OPTION_ORDERS,
                         ids=[f"{n}-{o}" for n, o, _ in OPTION_ORDERS])
def test_orders_that_depend_on_options_are_declared_and_measured(name, options, order):
    solver = solverlab.get_solver(name, **options)
    assert solver.convergence_order == declared_order(type(solver), **options) == order
    study = measure_convergence_order(solver, make_problem("vp-linear", dim=3, components=2,
                                                           seed=0))
    assert abs(study.order - order) <= 0.3, study.table()


def _sigma_uniform(schedule, steps):
    """Times at equally spaced ``sigma/alpha`` from ``t_max`` to ``t_min``."""
    ends = torch.tensor([schedule.t_max, schedule.t_min], dtype=F64)
    sig = torch.linspace(*schedule.sigma_ve(ends).tolist(), steps + 1, dtype=F64)
    return solverlab.get_grid("custom", times=schedule.t_of_lambda(-torch.log(sig)))(schedule)


@pytest.mark.parametrize("warmup", ["prk", "diffusers"])
def test_variable_weights_are_the_papers_on_equal_sigma_steps(warmup):
    """Equally spaced ``sigma/alpha``: the variable weights are the fixed ones."""
    model = _mixture()
    x, grid = _start(model), _sigma_uniform(model.schedule, 12)
    a = solverlab.get_solver("pndm-plms", warmup=warmup).solve(model, x, grid).x
    b = solverlab.get_solver("pndm-plms", warmup=warmup, weights="variable").solve(
        model, x, grid).x
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-12


# -- precision ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("name", "options"), [(n, {}) for n in NAMES]
                         + [("pndm-plms", {"warmup": "diffusers"})])
def test_low_precision(name, options, dtype):
    solver = solverlab.get_solver(name, **options)
    model = _mixture(schedule="vp-linear")
    x64, grid = _start(model), _grid(model, 10)
    ref = solver.solve(model, x64, grid, progress=False).x
    sol = solver.solve(model, x64.to(dtype), grid, progress=False)
    assert sol.x.dtype == dtype and bool(torch.isfinite(sol.x).all())
    # the rounding of x and of each step's state: measured at most 1.5 eps (bfloat16, pndm-prk)
    assert float((sol.x.to(F64) - ref).norm() / ref.norm()) <= 3 * torch.finfo(dtype).eps


# -- options ------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "options", "option"), [
    ("pndm-prk", {"midpoint": "middle"}, "midpoint"),
    ("pndm-plms", {"warmup": "ab"}, "warmup"),
    ("pndm-plms", {"warmup": None}, "warmup"),
    ("pndm-s", {"midpoint": 0.5}, "midpoint"),
    ("pndm-f", {"warmup": "diffusers"}, "warmup"),
    ("pndm-f", {"order": 3}, "order"),
    ("pndm-plms", {"weights": "adaptive"}, "weights"),
])
def test_bad_options_name_the_option(name, options, option):
    with pytest.raises(OptionError, match=option):
        solverlab.get_solver(name, **options)
