"""Solver.solve, the one sampling loop: Solution fields, callbacks, progress, NFE accounting,
finite-value checks and input validation, with an explicit Euler solver written here and an
exact model of Gaussian data (whose probability-flow ODE has a closed form)."""

from __future__ import annotations

import math

import attrs
import pytest
import torch

from solverlab.errors import GridError, InputError, SolverDivergedError, SolverlabError
from solverlab.grid import LogSNR, TimeUniform
from solverlab.model import Denoiser, Model
from solverlab.parameterization import Data, Noise
from solverlab.schedule import EDM, VPLinear
from solverlab.solver import AdaptiveSolver, Solution, Solver, SolverState, StepInfo

F64 = torch.float64


class Gaussian(Model):
    """Exact model of data ``x0 ~ N(mu, diag(s0^2))``; counts its own calls."""

    def __init__(self, schedule, parameterization=None, mu=(0.5, -1.0), s0=(0.7, 0.2)):
        self.schedule = schedule
        self.parameterization = parameterization or Noise()
        self.mu = torch.tensor(mu, dtype=F64)
        self.s0 = torch.tensor(s0, dtype=F64)
        self.calls = 0

    def __call__(self, x, t, **cond):
        self.calls += 1
        a = self.schedule.alpha(t).view(-1, 1).to(x.dtype)
        s = self.schedule.sigma(t).view(-1, 1).to(x.dtype)
        mu, s0 = self.mu.to(x.dtype), self.s0.to(x.dtype)
        v = a**2 * s0**2 + s**2
        x0 = mu + a * s0**2 / v * (x - a * mu)
        eps = s * (x - a * mu) / v
        return self.parameterization.target(x0, eps, a, s)

    def exact(self, x, t_from: float, t_to: float) -> torch.Tensor:
        """The probability-flow ODE solution: ``(x - alpha mu) / sqrt(alpha^2 s0^2 + sigma^2)``
        is constant along the flow."""
        s = self.schedule

        def std(t):
            return torch.sqrt(s.alpha(t) ** 2 * self.s0**2 + s.sigma(t) ** 2)

        z = (x - s.alpha(t_from) * self.mu) / std(t_from)
        return s.alpha(t_to) * self.mu + std(t_to) * z


@attrs.frozen(kw_only=True)
class Euler(Solver):
    """Explicit Euler on dx/dt = drift. Order 1, 1 NFE per step."""

    name = "test-euler"
    order = 1

    def step(self, state):
        h = (state.t_next - state.t).to(state.x.dtype)
        return state.advance(state.x + h * state.denoiser.drift(state.x, state.t))

    def expected_nfe(self, steps):
        return steps


@attrs.frozen(kw_only=True)
class InPlaceEuler(Euler):
    """Updates the state tensor in place (allowed: the loop owns its state)."""

    name = "test-euler-inplace"

    def step(self, state):
        h = (state.t_next - state.t).to(state.x.dtype)
        state.x.add_(h * state.denoiser.drift(state.x, state.t))
        return state.advance(state.x)


@attrs.frozen(kw_only=True)
class NaNAt(Solver):
    """Produces NaN at step ``bad`` (1-based); 0 NFE."""

    name = "test-nan"
    order = 1
    bad: int = 3
    value: float = math.nan

    def step(self, state):
        x = state.x * 0.5
        if state.index + 1 == self.bad:
            x = x.clone()
            x[0, 0] = self.value
        return state.advance(x)


def _problem(steps=10, schedule=None):
    s = schedule or VPLinear()
    model = Gaussian(s)
    grid = TimeUniform()(s, steps)
    x = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    return model, x, grid


# -- Solution -------------------------------------------------------------------------------------


def test_solution_fields():
    model, x, grid = _problem(steps=8)
    sol = Euler().solve(model, x, grid, progress=False)
    assert isinstance(sol, Solution)
    assert sol.x.shape == x.shape and sol.x.dtype == x.dtype
    assert sol.nfe == 8 == Euler().expected_nfe(8) == model.calls
    assert torch.equal(sol.times, grid) and sol.times.dtype == F64
    assert sol.trajectory is None
    assert isinstance(sol.wall_time, float) and sol.wall_time >= 0.0
    with pytest.raises(AttributeError):
        sol.nfe = 3  # frozen


def test_trajectory_has_every_visited_state():
    model, x, grid = _problem(steps=6)
    seen = []
    sol = Euler().solve(model, x, grid, trajectory=True, progress=False,
                        callback=lambda info: seen.append(info["x"].clone()))
    assert sol.trajectory.shape == (7, *x.shape)
    assert torch.equal(sol.trajectory[0], x)
    assert torch.equal(sol.trajectory[-1], sol.x)
    for i, xi in enumerate(seen):
        assert torch.equal(sol.trajectory[i + 1], xi)
    # the trajectory is the Euler recursion, step by step
    d = Denoiser(Gaussian(model.schedule))
    xi = x
    for i in range(6):
        xi = xi + (grid[i + 1] - grid[i]) * d.drift(xi, grid[i])
        torch.testing.assert_close(sol.trajectory[i + 1], xi, rtol=1e-14, atol=1e-14)


def test_euler_converges_to_the_exact_flow_at_first_order():
    # a number that a wrong drift, grid or loop would get wrong
    s = VPLinear()
    model = Gaussian(s)
    x = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    t0, t1 = s.t_max, 0.05
    want = model.exact(x, t0, t1)
    errs = []
    for steps in (40, 80, 160):
        grid = TimeUniform()(s, steps, t_end=t1)
        errs.append(float((Euler().solve(model, x, grid).x - want).abs().max()))
    rates = [math.log2(errs[0] / errs[1]), math.log2(errs[1] / errs[2])]
    assert all(0.85 < r < 1.15 for r in rates), (errs, rates)
    assert errs[-1] < 0.05


def test_solve_works_in_float32():
    model, x, grid = _problem(steps=5)
    sol = Euler().solve(model, x.float(), grid, progress=False)
    assert sol.x.dtype == torch.float32
    ref = Euler().solve(model, x, grid, progress=False).x
    torch.testing.assert_close(sol.x.double(), ref, rtol=1e-5, atol=1e-5)


# -- callback and progress -------------------------------------------------------------------------


def test_callback_is_called_once_per_step_with_the_step_data():
    model, x, grid = _problem(steps=5)
    calls = []
    sol = Euler().solve(model, x, grid, callback=calls.append, progress=False, trajectory=True)
    assert [c["i"] for c in calls] == [0, 1, 2, 3, 4]
    for c in calls:
        i = c["i"]
        assert torch.equal(c["t"], grid[i]) and c["t"].dtype == F64 and c["t"].ndim == 0
        assert torch.equal(c["t_next"], grid[i + 1])
        assert c["nfe"] == i + 1
        assert torch.equal(c["x"], sol.trajectory[i + 1])
        assert isinstance(c["state"], SolverState) and c["state"].index == i + 1
    assert set(calls[0]) >= {"i", "t", "t_next", "x", "nfe"}
    assert all(isinstance(c, StepInfo) for c in calls)


K_DIFFUSION_KEYS = {"x", "i", "sigma", "sigma_hat", "denoised"}


def test_step_info_is_a_typed_record_and_a_mapping():
    model, x, grid = _problem(steps=4)
    calls = []
    Euler().solve(model, x, grid, callback=calls.append, progress=False)
    info = calls[2]
    assert set(info) == K_DIFFUSION_KEYS | {"t", "t_next", "nfe", "state"} and len(info) == 9
    assert dict(info)["i"] == info["i"] == info.i == 2
    assert info["sigma"] is info.sigma and info["denoised"] is info.denoised
    # sigma: the noise level sigma/alpha of x/alpha at the step's start (k-diffusion's sigma)
    s = model.schedule
    assert float(info.sigma) == pytest.approx(float(s.sigma(grid[2]) / s.alpha(grid[2])),
                                              rel=1e-14)
    assert torch.equal(info.sigma_hat, info.sigma)
    with pytest.raises(KeyError):
        info["nope"]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        info.i = 3


@pytest.mark.parametrize("parameterization", [Noise(), Data()])
@pytest.mark.parametrize("solver", [Euler(), InPlaceEuler()], ids=["euler", "in-place"])
def test_denoised_is_the_data_prediction_of_the_last_evaluation(solver, parameterization):
    # Euler evaluates once per step, at the step's start: denoised of step i is x0(x_i, t_i).
    # The in-place solver updates x after evaluating: denoised must be taken at evaluation.
    s = VPLinear()
    model, x, grid = Gaussian(s, parameterization), *_problem(steps=5)[1:]
    calls = []
    sol = solver.solve(model, x, grid, callback=calls.append, trajectory=True, progress=False)
    check = Denoiser(Gaussian(s, parameterization))
    for info in calls:
        i = info.i
        a, sg = s.alpha(grid[i]), s.sigma(grid[i])
        v = a**2 * model.s0**2 + sg**2
        want = model.mu + a * model.s0**2 / v * (sol.trajectory[i] - a * model.mu)  # posterior mean
        torch.testing.assert_close(info.denoised, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(info.denoised, check.data(sol.trajectory[i], grid[i]),
                                   rtol=1e-12, atol=1e-12)
    assert len({c.denoised.data_ptr() for c in calls}) == len(calls)  # each its own tensor


def test_denoised_costs_nothing_without_a_callback():
    model, x, grid = _problem(steps=3)
    d = Denoiser(model)
    Euler().solve(d, x, grid)
    assert d.last_denoised is None and not d.track_denoised
    Euler().solve(d, x, grid, callback=lambda info: None)
    assert d.last_denoised is None and not d.track_denoised  # switched off again


def test_a_k_diffusion_style_callback_works():
    """A preview callback written for k-diffusion (``callback({'x', 'i', 'sigma', 'sigma_hat',
    'denoised'})``) runs unchanged."""
    previews = []

    def preview(d):
        previews.append((d["i"], float(d["sigma"]), float(d["sigma_hat"]),
                         d["denoised"].mean().item(), tuple(d["x"].shape)))

    model, x, grid = _problem(steps=4)
    Euler().solve(model, x, grid, callback=preview)
    s = model.schedule
    assert [p[0] for p in previews] == [0, 1, 2, 3]
    assert [p[1] for p in previews] == pytest.approx(s.sigma_ve(grid[:-1]).tolist(), rel=1e-14)
    assert all(p[1] == p[2] and p[4] == (5, 2) for p in previews)


@pytest.mark.parametrize("progress", [False, True, None])
def test_progress_options(progress, capsys):
    model, x, grid = _problem(steps=3)
    sol = Euler().solve(model, x, grid, progress=progress)
    assert sol.nfe == 3
    ref = Euler().solve(Gaussian(model.schedule), x, grid, progress=False)
    assert torch.equal(sol.x, ref.x)  # the bar changes nothing


def test_progress_false_writes_nothing(capsys):
    model, x, grid = _problem(steps=3)
    Euler().solve(model, x, grid, progress=False)
    out, err = capsys.readouterr()
    assert out == "" and err == ""


# -- NFE accounting --------------------------------------------------------------------------------


def test_solve_accepts_a_model_or_a_denoiser():
    model, x, grid = _problem(steps=4)
    a = Euler().solve(model, x, grid)
    d = Denoiser(Gaussian(model.schedule))
    d.data(x, 0.5)  # an earlier evaluation on the same denoiser
    b = Euler().solve(d, x, grid)
    assert torch.equal(a.x, b.x)
    assert b.nfe == 4  # this solve only
    assert d.nfe == 5  # cumulative on the denoiser
    c = Euler().solve(d, x, grid)
    assert c.nfe == 4 and d.nfe == 9


def test_guided_denoiser_counts_one_nfe_per_step():
    class Cond(Gaussian):
        def __call__(self, x, t, y=None):
            return super().__call__(x, t) + y.view(-1, 1)

    s = VPLinear()
    model = Cond(s)
    d = Denoiser(model, cond={"y": torch.ones(5, dtype=F64)},
                 uncond={"y": torch.zeros(5, dtype=F64)}, guidance_scale=4.0)
    x = torch.randn(5, 2, dtype=F64)
    sol = Euler().solve(d, x, TimeUniform()(s, 7))
    assert sol.nfe == 7 == model.calls


def test_the_loop_owns_its_state_and_leaves_the_callers_tensor_alone():
    model, x, grid = _problem(steps=4)
    x_before = x.clone()
    sol = InPlaceEuler().solve(model, x, grid, trajectory=True)
    assert torch.equal(x, x_before)
    ref = Euler().solve(model, x, grid, trajectory=True)
    torch.testing.assert_close(sol.trajectory, ref.trajectory, rtol=0, atol=0)
    assert len({t.data_ptr() for t in sol.trajectory.unbind(0)}) == 5


# -- divergence and inputs -------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_state_mid_solve_names_the_step_and_time(value):
    model, x, grid = _problem(steps=6)
    calls = []
    with pytest.raises(SolverDivergedError) as e:
        NaNAt(bad=3, value=value).solve(model, x, grid, callback=calls.append)
    msg = str(e.value)
    assert "'test-nan'" in msg
    assert "step 3 of 6" in msg
    assert f"{float(grid[2]):.6g}" in msg and f"{float(grid[3]):.6g}" in msg
    assert len(calls) == 2  # stopped at once
    assert isinstance(e.value, SolverlabError) and isinstance(e.value, FloatingPointError)


def test_check_finite_false_returns_the_non_finite_state():
    model, x, grid = _problem(steps=6)
    sol = NaNAt(bad=2).solve(model, x, grid, check_finite=False)
    assert math.isnan(float(sol.x[0, 0]))
    assert bool(torch.isfinite(sol.x[1:]).all())


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_input_is_an_input_error(value):
    model, x, grid = _problem()
    x = x.clone()
    x[1, 1] = value
    with pytest.raises(InputError, match="1 NaN or infinite"):
        Euler().solve(model, x, grid)
    assert model.calls == 0


@pytest.mark.parametrize(
    "bad",
    [[[0.1, 0.2]], None, 3.0, "x", torch.ones(3, 2, dtype=torch.int64), torch.tensor(1.0),
     torch.ones(2, 2, dtype=torch.bool)],
    ids=["list", "None", "float", "str", "int-tensor", "0-d", "bool-tensor"],
)
def test_unusable_x_is_an_input_error(bad):
    model, _, grid = _problem()
    with pytest.raises(InputError, match="floating-point tensor"):
        Euler().solve(model, bad, grid)
    assert model.calls == 0


def test_numpy_x_is_an_input_error():
    np = pytest.importorskip("numpy")
    model, _, grid = _problem()
    with pytest.raises(InputError, match="ndarray"):
        Euler().solve(model, np.ones((2, 2)), grid)


@pytest.mark.parametrize(
    "grid, match",
    [
        ([0.1, 0.5, 0.9], "strictly decreasing"),
        ([0.9, 0.5, 0.5], "duplicate"),
        ([1.5, 0.5], "leaves the range"),
        ([0.9, 0.5, 0.0], "leaves the range"),
        ([0.5], "at least 2"),
        ([0.9, math.nan], "finite"),
    ],
)
def test_the_grid_is_validated(grid, match):
    model, x, _ = _problem()
    with pytest.raises(GridError, match=match):
        Euler().solve(model, x, grid)
    assert model.calls == 0


def test_a_list_grid_is_accepted_and_returned_as_float64():
    model, x, _ = _problem()
    sol = Euler().solve(model, x, [1.0, 0.5, 0.1])
    assert sol.times.dtype == F64 and sol.times.tolist() == [1.0, 0.5, 0.1]
    assert sol.nfe == 2


def test_a_non_model_is_an_option_error():
    from solverlab.errors import OptionError

    _, x, grid = _problem()
    with pytest.raises(OptionError, match=r"not a solverlab\.Model"):
        Euler().solve(lambda x, t: x, x, grid)


# -- the contract ---------------------------------------------------------------------------------


def test_solver_state():
    model, x, grid = _problem(steps=3)
    st = Euler().init(Denoiser(model), x, grid)
    assert st.index == 0 and st.steps == 3 and st.history == () and st.cache is None
    assert torch.equal(st.t, grid[0]) and torch.equal(st.t_next, grid[1])
    nxt = st.advance(x + 1, history=(1,))
    assert nxt.index == 1 and nxt.history == (1,) and torch.equal(nxt.t, grid[1])
    assert st.index == 0  # frozen: advance returns a new state


def test_solver_is_abstract_and_frozen():
    with pytest.raises(TypeError):
        Solver()
    assert Euler().expected_nfe(3) == 3
    assert Euler().convergence_order == Euler.order == 1  # the declared order by default
    with pytest.raises(AttributeError):
        NaNAt().bad = 4

    @attrs.frozen(kw_only=True)
    class NoExpectation(Solver):
        name = "x"
        order = 1

        def step(self, state):
            return state.advance(state.x)

    assert NoExpectation().expected_nfe(5) is None


def test_adaptive_solver_step_says_to_call_solve():
    @attrs.frozen(kw_only=True)
    class Adaptive(AdaptiveSolver):
        name = "test-adaptive"
        order = 5

    model, x, grid = _problem()
    st = Adaptive().init(Denoiser(model), x, grid)
    with pytest.raises(NotImplementedError, match="solve"):
        Adaptive().step(st)


def test_solve_on_a_logsnr_grid_with_a_data_model_on_edm():
    # another schedule/parameterization/grid through the same loop
    s = EDM()
    model = Gaussian(s, Data())
    x = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(2)) * 80.0
    grid = LogSNR()(s, 400, t_end=1.0)
    sol = Euler().solve(model, x, grid)
    want = model.exact(x, 80.0, 1.0)
    assert float((sol.x - want).abs().max()) < 5e-2
    assert sol.nfe == 400
