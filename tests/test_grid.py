"""Time grids: shape, monotonicity, end points, the spacing each rule promises, diffusers'
discrete spacings (written here in numpy), and the errors for bad grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from solverlab import get_grid
from solverlab.errors import GridError, OptionError
from solverlab.grid import (
    VP,
    Beta,
    Custom,
    Exponential,
    Karras,
    Leading,
    Linspace,
    LogSNR,
    LuLambdas,
    PolyExponential,
    TimeQuadratic,
    TimeUniform,
    Trailing,
    check_grid,
)
from solverlab.schedule import EDM, VE, VPCosine, VPDiscrete, VPLinear

F64 = torch.float64
SCHEDULES = [VPLinear(), VPCosine(), VPDiscrete(), VE(), EDM()]
CONTINUOUS_GRIDS = [TimeUniform(), TimeQuadratic(), LogSNR(), Karras(), Karras(rho=3.0),
                    Exponential(), LuLambdas(), Beta(), PolyExponential(rho=2.0), VP()]
DISCRETE_GRIDS = [Linspace(), Leading(), Leading(offset=1), Trailing()]
ALL_GRIDS = [*CONTINUOUS_GRIDS, *DISCRETE_GRIDS, Custom(times=[0.9, 0.5, 0.1])]


def _gid(g) -> str:
    if isinstance(g, (Karras, PolyExponential)) and g.rho != type(g)().rho:
        return f"{g.name}-rho{g.rho:g}"
    if isinstance(g, Leading) and g.offset:
        return f"{g.name}-offset{g.offset}"
    return g.name


def _assert_valid(g: torch.Tensor, steps: int, start: float, end: float) -> None:
    assert g.dtype == F64
    assert g.shape == (steps + 1,)
    assert bool((g[1:] < g[:-1]).all())
    assert float(g[0]) == start
    assert float(g[-1]) == end


# -- continuous grids ------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 7, 50])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
@pytest.mark.parametrize("grid", CONTINUOUS_GRIDS, ids=_gid)
def test_continuous_grids_run_from_t_max_to_t_min(grid, schedule, steps):
    g = grid(schedule, steps)
    _assert_valid(g, steps, schedule.t_max, schedule.t_min)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
@pytest.mark.parametrize("grid", CONTINUOUS_GRIDS, ids=_gid)
def test_continuous_grids_respect_t_start_and_t_end(grid, schedule):
    lo, hi = schedule.t_min, schedule.t_max
    t_start, t_end = lo + 0.8 * (hi - lo), lo + 0.1 * (hi - lo)
    g = grid(schedule, 9, t_start=t_start, t_end=t_end)
    _assert_valid(g, 9, t_start, t_end)
    g = grid(schedule, 4, t_end=t_end)
    _assert_valid(g, 4, hi, t_end)
    g = grid(schedule, 4, t_start=t_start)
    _assert_valid(g, 4, t_start, lo)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
def test_time_uniform_is_linspace(schedule):
    g = TimeUniform()(schedule, 10)
    want = np.linspace(schedule.t_max, schedule.t_min, 11)
    np.testing.assert_allclose(g.numpy(), want, rtol=1e-15, atol=1e-17)
    np.testing.assert_allclose(np.diff(g.numpy()), np.diff(want), rtol=1e-12)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
def test_time_quadratic_is_uniform_in_sqrt_t(schedule):
    g = TimeQuadratic()(schedule, 12)
    r = np.sqrt(g.numpy())
    np.testing.assert_allclose(np.diff(r), np.full(12, (r[-1] - r[0]) / 12), rtol=1e-10)
    # steps are finer near the data end
    assert float(g[-2] - g[-1]) < float(g[0] - g[1])


@pytest.mark.parametrize("steps", [1, 5, 20, 200])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
def test_logsnr_is_uniform_in_lambda(schedule, steps):
    g = LogSNR()(schedule, steps)
    lam = schedule.lambda_(g)
    want = torch.linspace(schedule.lambda_min, schedule.lambda_max, steps + 1, dtype=F64)
    scale = max(abs(schedule.lambda_min), abs(schedule.lambda_max))
    torch.testing.assert_close(lam, want, rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
@pytest.mark.parametrize("rho", [7.0, 3.0, 1.0])
def test_karras_is_uniform_in_sigma_to_the_one_over_rho(schedule, rho):
    grid = Karras() if rho == 7.0 else Karras(rho=rho)
    assert grid.rho == rho
    steps = 15
    g = grid(schedule, steps)
    r = schedule.sigma_ve(g) ** (1.0 / rho)
    want = torch.linspace(float(r[0]), float(r[-1]), steps + 1, dtype=F64)
    torch.testing.assert_close(r, want, rtol=1e-12, atol=0)


def test_karras_on_edm_is_eq_5_of_karras_et_al():
    smin, smax, rho, n = 0.002, 80.0, 7.0, 18
    i = np.arange(n + 1)
    want = (smax ** (1 / rho) + i / n * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    np.testing.assert_allclose(Karras()(EDM(), n).numpy(), want, rtol=1e-13)


def test_karras_rho_changes_the_grid():
    s = EDM()
    a, b = Karras()(s, 10), Karras(rho=3.0)(s, 10)
    assert not torch.allclose(a, b)
    assert torch.equal(a[[0, -1]], b[[0, -1]])


# -- diffusers' discrete spacings on vp-discrete ---------------------------------------------------


def _linspace_steps(n_train, steps):
    return np.linspace(0, n_train - 1, steps + 1).round()[::-1]


def _leading_steps(n_train, steps, offset=0):
    return np.array([k * (n_train // (steps + 1)) + offset for k in range(steps, 0, -1)] + [0])


def _trailing_steps(n_train, steps):
    n = np.arange(n_train, 0, -n_train / steps).round() - 1
    # np.arange with a fractional step can overshoot by one element that rounds to -1
    # (e.g. steps = 61, 103, 121 for N = 1000): keep the first `steps` entries.
    return np.concatenate([n[:steps], [0]])


DISCRETE = [
    (Linspace(), _linspace_steps),
    (Leading(), _leading_steps),
    (Leading(offset=1), lambda n, s: _leading_steps(n, s, 1)),
    (Trailing(), _trailing_steps),
]


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 10, 25, 50, 61, 103, 250])
@pytest.mark.parametrize("grid, formula", DISCRETE, ids=[_gid(g) for g, _ in DISCRETE])
def test_discrete_grids_match_the_diffusers_formulas(grid, formula, steps):
    s = VPDiscrete()
    g = grid(s, steps)
    n = formula(1000, steps)
    assert len(n) == steps + 1
    np.testing.assert_array_equal(g.numpy(), (n + 1) / 1000)  # t = (n+1)/N
    assert g.dtype == F64
    assert bool((g[1:] < g[:-1]).all())
    assert float(g[-1]) == s.t_min  # step 0
    # the network sees the integer steps
    np.testing.assert_allclose(s.index(g).numpy(), n, rtol=0, atol=1e-9)


@pytest.mark.parametrize("steps", [1, 4, 9])
def test_discrete_grids_on_a_small_table(steps):
    s = VPDiscrete(betas=torch.linspace(1e-3, 0.2, 50, dtype=F64))
    for grid, formula in DISCRETE:
        n = formula(50, steps)
        np.testing.assert_array_equal(grid(s, steps).numpy(), (n + 1) / 50)


def test_linspace_and_trailing_start_at_the_last_training_step():
    s = VPDiscrete()
    for grid in (Linspace(), Trailing()):
        g = grid(s, 10)
        assert float(g[0]) == 1.0 == s.t_max
        assert float(g[-1]) == s.t_min
    g = Leading()(s, 10)  # leading never reaches N - 1
    assert float(g[0]) == (10 * (1000 // 11) + 1) / 1000


@pytest.mark.parametrize("grid", DISCRETE_GRIDS, ids=_gid)
@pytest.mark.parametrize("schedule", [VPLinear(), VPCosine(), VE(), EDM()], ids=lambda s: s.name)
def test_discrete_grids_on_a_continuous_schedule_are_option_errors(grid, schedule):
    with pytest.raises(OptionError, match="vp-discrete") as e:
        grid(schedule, 10)
    assert repr(schedule.name) in str(e.value)


@pytest.mark.parametrize("grid", DISCRETE_GRIDS, ids=_gid)
def test_discrete_grids_take_no_partial_range(grid):
    with pytest.raises(OptionError, match="t_start/t_end"):
        grid(VPDiscrete(), 10, t_start=0.5)
    with pytest.raises(OptionError, match="t_start/t_end"):
        grid(VPDiscrete(), 10, t_end=0.01)


def test_discrete_grid_with_more_steps_than_the_table_is_a_grid_error():
    small = VPDiscrete(betas=torch.linspace(1e-3, 0.2, 50, dtype=F64))
    with pytest.raises(GridError, match=r"steps=60 .* N=50 .* at most 49 steps"):
        Linspace()(small, 60)
    # diffusers' trailing spacing repeats timestep 0 well before steps = N - 1.
    with pytest.raises(GridError, match=r"steps=40 .* N=50 .* at most 33 steps on N=50"):
        get_grid("trailing")(small, 40)
    assert get_grid("trailing")(small, 33).numel() == 34
    with pytest.raises(GridError, match=r"index 50, outside 0\.\.49"):
        Leading(offset=1)(small, 49)


@pytest.mark.parametrize("offset", [-1, 1.5, "1", True])
def test_leading_offset_must_be_a_non_negative_integer(offset):
    with pytest.raises(OptionError, match=f"offset={offset!r}"):
        Leading(offset=offset)


# -- custom ----------------------------------------------------------------------------------------


def test_custom_returns_the_given_times():
    s = VPLinear()
    times = [1.0, 0.7, 0.3, 0.05, 0.001]
    grid = Custom(times=times)
    g = grid(s)
    assert g.dtype == F64
    assert g.tolist() == times
    assert grid(s, 4).tolist() == times
    assert Custom(times=torch.tensor(times, dtype=torch.float32)).times_ == tuple(
        float(x) for x in torch.tensor(times, dtype=torch.float32)
    )
    assert Custom(times=np.array(times))(s).tolist() == times


def test_custom_with_the_wrong_number_of_steps_is_a_grid_error():
    with pytest.raises(GridError, match="steps=3"):
        Custom(times=[0.9, 0.5, 0.1])(VPLinear(), 3)


def test_custom_takes_no_partial_range():
    with pytest.raises(OptionError, match="t_start/t_end"):
        Custom(times=[0.9, 0.5, 0.1])(VPLinear(), t_start=0.8)


@pytest.mark.parametrize(
    "times, words",
    [
        ([0.1, 0.5, 0.9], ["strictly decreasing", "increasing"]),
        ([0.9, 0.5, 0.7, 0.1], ["strictly decreasing", "times 1 and 2"]),
        ([0.9, 0.5, 0.5, 0.1], ["duplicate", "0.5"]),
        ([0.9], ["at least 2"]),
        ([], ["at least 2"]),
        ([0.9, float("nan"), 0.1], ["nan", "finite"]),
        ([float("inf"), 0.1], ["inf", "finite"]),
        (["a", "b"], ["not a sequence of numbers"]),
        (None, ["not a sequence of numbers"]),
    ],
)
def test_bad_custom_times_are_grid_errors(times, words):
    with pytest.raises(GridError) as e:
        Custom(times=times)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("times", [[1.5, 0.5, 0.1], [0.9, 0.5, 0.0001], [0.9, 0.5, 0.0]])
def test_custom_times_out_of_the_schedule_range_are_grid_errors(times):
    grid = Custom(times=times)  # fine on its own
    with pytest.raises(GridError, match="leaves the range") as e:
        grid(VPLinear())
    assert "'vp-linear'" in str(e.value)
    assert "[0.001, 1.0]" in str(e.value)


# -- errors common to every grid -----------------------------------------------------------------


@pytest.mark.parametrize("steps", [0, -1, 1.5, True, False, "10", None, 2.0])
@pytest.mark.parametrize("grid", [*CONTINUOUS_GRIDS, *DISCRETE_GRIDS], ids=_gid)
def test_steps_must_be_an_integer_at_least_one(grid, steps):
    with pytest.raises(GridError) as e:
        grid(VPDiscrete(), steps)
    assert f"steps={steps!r}" in str(e.value)


def test_numpy_integer_steps_are_accepted():
    assert TimeUniform()(VPLinear(), np.int64(5)).shape == (6,)
    assert Trailing()(VPDiscrete(), np.int32(5)).shape == (6,)


@pytest.mark.parametrize("grid", CONTINUOUS_GRIDS, ids=_gid)
def test_bad_ranges_are_grid_errors(grid):
    s = VPLinear()
    with pytest.raises(GridError, match=r"t_start=0\.2 must be greater than t_end=0\.5"):
        grid(s, 5, t_start=0.2, t_end=0.5)
    with pytest.raises(GridError, match=r"t_start=0\.5 must be greater than t_end=0\.5"):
        grid(s, 5, t_start=0.5, t_end=0.5)
    with pytest.raises(GridError, match="leaves the range"):
        grid(s, 5, t_start=1.5)
    with pytest.raises(GridError, match="leaves the range"):
        grid(s, 5, t_end=1e-4)


def test_time_quadratic_refuses_negative_times():
    with pytest.raises(GridError, match="t_end >= 0"):
        TimeQuadratic()(VE(), 5, t_end=-0.5)


def test_karras_rho_must_be_positive():
    with pytest.raises(OptionError, match="rho=0"):
        Karras(rho=0)
    with pytest.raises(OptionError, match=r"rho=-7\.0"):
        Karras(rho=-7.0)


# -- check_grid ------------------------------------------------------------------------------------


def test_check_grid_accepts_lists_and_tensors_and_returns_float64():
    g = check_grid([0.9, 0.5, 0.1])
    assert g.dtype == F64 and g.tolist() == [0.9, 0.5, 0.1]
    g = check_grid(torch.tensor([0.9, 0.5], dtype=torch.float32), VPLinear())
    assert g.dtype == F64
    # the end points may be off by rounding (1e-12 relative), not more
    s = VPLinear()
    check_grid([1.0 + 1e-13, 0.5, 1e-3 - 1e-16], s)
    with pytest.raises(GridError):
        check_grid([1.0 + 1e-9, 0.5], s)


def test_check_grid_refuses_two_dimensional_grids():
    with pytest.raises(GridError, match=r"1-D.*\(2, 2\)"):
        check_grid(torch.tensor([[0.9, 0.5], [0.4, 0.1]]))


def test_grid_end_points_are_exact_after_an_inverse_map():
    # logsnr and karras go through t(lambda), which may round; the ends are pinned.
    for s in SCHEDULES:
        for grid in (LogSNR(), Karras()):
            g = grid(s, 3)
            assert float(g[0]) == s.t_max and float(g[-1]) == s.t_min
            assert math.isfinite(float(g.sum()))
