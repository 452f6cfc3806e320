"""The training objectives ``simple``, ``etsdm`` (Yang et al. 2024) and ``sa`` (Nguyen et al.
2024): first-party plugins found through entry points, checked on real networks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import solverlab
from solverlab.cli import cli
from solverlab.objective import sample_times
from solverlab.testing import TimeMLP

F64 = torch.float64
PLUGINS = {"simple": "solverlab_simple", "etsdm": "solverlab_etsdm", "sa": "solverlab_sa"}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Spy(nn.Module):
    """A real network (``TimeMLP``) that records the time input it is fed and, if asked, keeps
    its output's gradient."""

    def __init__(self, dim: int = 2, seed: int = 0, keep_grad: bool = False) -> None:
        super().__init__()
        self.net = TimeMLP(dim, hidden=16, seed=seed).double()
        self.seen: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.keep_grad = keep_grad

    def forward(self, x, s):
        self.seen.append(s.detach().clone())
        out = self.net(x, s)
        if self.keep_grad:
            out.retain_grad()
            self.outputs.append(out)
        return out


class SharedInside(nn.Module):
    """The same network with the time sharing done inside it: a plain ``TorchModel`` of this
    feeds the true time to the wrapper (alpha, sigma) and the shared one to the network."""

    def __init__(self, spy: Spy, time_map: solverlab.TimeMap) -> None:
        super().__init__()
        self.spy, self.time_map = spy, time_map

    def forward(self, x, s):
        return self.spy(x, self.time_map(s))


def discrete_model(module, objective=None, **kw):
    sched = solverlab.get_schedule("vp-discrete")
    model = solverlab.TorchModel(module, sched, "noise", time_input="index", **kw)
    if objective is not None:
        model = solverlab.TorchModel(module, sched, "noise", time_input="index",
                                     time_map=objective.time_map(model))
    return model


# -- registry ------------------------------------------------------------------------------
def test_the_three_objectives_are_first_party_plugins_found_through_entry_points():
    reg = solverlab.get_registry()
    for name, plugin in PLUGINS.items():
        entry = reg.entry("objective", name)
        assert (entry.plugin, entry.distribution) == (plugin, "solverlab")
        assert entry.cls.__module__ == plugin
        assert isinstance(solverlab.get_objective(name), solverlab.Objective)
    assert solverlab.get_objective("etsdm", n=4).n == 4
    with pytest.raises(solverlab.OptionError, match=r"no option 'tilde'.*t_tilde, n"):
        solverlab.get_objective("etsdm", tilde=3)
    result = CliRunner().invoke(cli, ["list", "--json"], catch_exceptions=False)
    assert result.exit_code == 0
    listed = {e["name"]: e for e in json.loads(result.output)["objectives"]}
    for name, plugin in PLUGINS.items():
        assert (listed[name]["plugin"], listed[name]["distribution"]) == (plugin, "solverlab")
    assert not [b for b in json.loads(result.output)["broken"] if b["plugin"] in PLUGINS.values()]


# -- simple --------------------------------------------------------------------------------
class GaussianMMSE(nn.Module):
    """The exact MMSE prediction for data ``N(0, s^2 I)``: noise ``sigma x/(alpha^2 s^2 +
    sigma^2)`` or data ``alpha s^2 x/(alpha^2 s^2 + sigma^2)``."""

    def __init__(self, schedule, s: float, parameterization: str) -> None:
        super().__init__()
        self.schedule, self.s, self.p = schedule, s, parameterization

    def forward(self, x, t):
        a = self.schedule.alpha(t).to(x.dtype)[:, None]
        sg = self.schedule.sigma(t).to(x.dtype)[:, None]
        c = (sg if self.p == "noise" else a * self.s**2) / (a**2 * self.s**2 + sg**2)
        return c * x


@pytest.mark.parametrize("parameterization", ["noise", "data"])
@pytest.mark.parametrize("t", [0.05, 0.4, 0.9])
def test_simple_loss_of_the_exact_predictor_is_the_mmse(parameterization, t):
    # x0 ~ N(0, s^2 I_d): E||eps - E[eps|x]||^2 = d a^2 s^2/(a^2 s^2 + sg^2) and
    # E||x0 - E[x0|x]||^2 = d s^2 sg^2/(a^2 s^2 + sg^2). Each example's loss is v chi^2_d
    # (v the per-value MMSE), so the batch mean has standard error v sqrt(2 d / B).
    sched = solverlab.get_schedule("vp-linear")
    d, s, batch = 4, 1.7, 20000
    model = solverlab.TorchModel(GaussianMMSE(sched, s, parameterization), sched,
                                 parameterization)
    x0 = s * torch.randn(batch, d, dtype=F64, generator=gen(1))
    loss = float(solverlab.get_objective("simple").loss(model, x0, generator=gen(2), t=t))
    a2, s2 = float(sched.alpha(t)) ** 2, float(sched.sigma(t)) ** 2
    v = (a2 * s**2 if parameterization == "noise" else s**2 * s2) / (a2 * s**2 + s2)
    assert abs(loss - d * v) < 5 * v * math.sqrt(2 * d / batch)


def test_a_few_adam_steps_on_a_real_network_reduce_the_simple_loss():
    torch.manual_seed(0)
    net = TimeMLP(2, hidden=32, seed=4).double()
    model = solverlab.TorchModel(net, "vp-linear", "noise")
    objective = solverlab.get_objective("simple", antithetic=True)
    data = torch.tensor([[1.5, 0.5]], dtype=F64) + 0.1 * torch.randn(4096, 2, dtype=F64,
                                                                     generator=gen(3))

    def held_out() -> float:
        with torch.no_grad():
            return float(objective.loss(model, data, generator=gen(99)))

    before = held_out()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = gen(5)
    for step in range(40):
        opt.zero_grad()
        loss = objective.loss(model, data[step * 64:(step + 1) * 64], generator=g)
        loss.backward()
        opt.step()
    assert held_out() < 0.7 * before


def test_objectives_refuse_bad_data_times_and_diverged_outputs():
    model = solverlab.TorchModel(TimeMLP(2, seed=0).double(), "vp-linear")
    simple = solverlab.get_objective("simple")
    x0 = torch.randn(4, 2, dtype=F64, generator=gen(0))
    with pytest.raises(solverlab.InputError, match=r"x0 holds NaN.*1 of 4"):
        simple.loss(model, torch.cat([x0[:3], torch.full((1, 2), math.nan, dtype=F64)]))
    with pytest.raises(solverlab.InputError, match=r"x0 has shape \(4,\)"):
        simple.loss(model, x0[:, 0])
    with pytest.raises(solverlab.InputError, match=r"dtype torch\.int64"):
        simple.loss(model, torch.ones(4, 2, dtype=torch.int64))
    with pytest.raises(solverlab.InputError, match=r"outside the schedule's \[t_min, t_max\]"):
        simple.loss(model, x0, t=1.5)
    discrete = discrete_model(TimeMLP(2, seed=0).double())
    with pytest.raises(solverlab.InputError, match="not on the steps"):
        solverlab.get_objective("sa").loss(discrete, x0, t=0.0105)
    nan_net = solverlab.TorchModel(lambda x, s: x * math.nan, "vp-linear")
    for name in PLUGINS:
        if name != "etsdm":
            with pytest.raises(solverlab.ModelOutputError, match="NaN or infinite"):
                solverlab.get_objective(name).loss(nan_net, x0)
    with pytest.raises(solverlab.OptionError, match="antithetic='yes'"):
        solverlab.get_objective("simple", antithetic="yes")


# -- etsdm ---------------------------------------------------------------------------------
def test_etsdm_feeds_the_left_ends_on_the_index_scale():
    objective = solverlab.get_objective("etsdm")
    spy = Spy()
    model = discrete_model(spy, objective)
    assert model.time_map == solverlab.TimeMap(threshold=100.0, n=5)
    steps = torch.arange(1000, dtype=F64)
    x0 = torch.randn(1000, 2, dtype=F64, generator=gen(0))
    objective.loss(model, x0, generator=gen(1), t=(steps + 1) / 1000)
    fed = spy.seen[-1]
    want = torch.where(steps < 100, torch.floor(steps / 20) * 20, steps)
    assert torch.equal(fed, want)
    assert set(fed[steps < 100].tolist()) == {0.0, 20.0, 40.0, 60.0, 80.0}
    # drawn times too
    objective.loss(model, x0[:256], generator=gen(2))
    fed = spy.seen[-1]
    assert bool((fed[fed < 100] % 20 == 0).all()) and bool((fed >= 100).any())


def test_etsdm_automatic_threshold_scales_with_the_time_range():
    objective = solverlab.get_objective("etsdm")
    sched = solverlab.get_schedule("vp-discrete", betas=torch.linspace(1e-4, 0.05, 200))
    small = solverlab.TorchModel(Spy(), sched, time_input="index")
    assert objective.time_map(small) == solverlab.TimeMap(threshold=20.0, n=5)
    continuous = solverlab.TorchModel(Spy(), "vp-linear", time_input="t")
    assert objective.time_map(continuous).threshold == pytest.approx(0.1, abs=1e-15)
    spy = Spy()
    model = solverlab.TorchModel(spy, "vp-linear", time_input="t",
                                 time_map=objective.time_map(continuous))
    t = torch.tensor([0.001, 0.019, 0.0205, 0.05, 0.0999, 0.1, 0.5], dtype=F64)
    objective.loss(model, torch.randn(7, 2, dtype=F64, generator=gen(0)), t=t)
    want = torch.tensor([0.0, 0.0, 0.02, 0.04, 0.08, 0.1, 0.5], dtype=F64)
    torch.testing.assert_close(spy.seen[-1], want, rtol=0, atol=1e-15)


def test_etsdm_noises_and_targets_at_the_true_time():
    objective = solverlab.get_objective("etsdm")
    spy = Spy(seed=7)
    model = discrete_model(spy, objective)
    sched, tm = model.schedule, model.time_map
    x0 = torch.randn(64, 2, dtype=F64, generator=gen(0))

    def by_hand(t, eps, t_coef):
        a, s = sched.alpha(t_coef)[:, None], sched.sigma(t_coef)[:, None]
        out = spy.net(a * x0 + s * eps, tm(sched.index(t)))
        return (eps - out).square().sum(1).mean().item()

    # drawn times: the same draws as by hand (times, then noise)
    loss = objective.loss(model, x0, generator=gen(1)).item()
    g = gen(1)
    t = sample_times(sched, 64, generator=g)
    eps = torch.randn(64, 2, dtype=F64, generator=g)
    assert loss == pytest.approx(by_hand(t, eps, t), rel=1e-13)
    # inside the shared region: coefficients at the shared time would be a different loss
    t = sched.t_of_index(torch.tensor([19.0, 39.0, 59.0, 79.0, 99.0] * 13)[:64])
    loss = objective.loss(model, x0, generator=gen(2), t=t).item()
    eps = torch.randn(64, 2, dtype=F64, generator=gen(2))
    assert loss == pytest.approx(by_hand(t, eps, t), rel=1e-13)
    shared_t = sched.t_of_index(tm(sched.index(t)))
    assert loss != pytest.approx(by_hand(t, eps, shared_t), rel=1e-6)  # (2e-4 apart)


def test_etsdm_refuses_a_model_without_its_time_map():
    objective = solverlab.get_objective("etsdm")
    x0 = torch.randn(8, 2, dtype=F64, generator=gen(0))
    plain = discrete_model(Spy())
    with pytest.raises(solverlab.OptionError,
                       match=r"time_map is None.*time_map=objective\.time_map\(model\)"):
        objective.loss(plain, x0)
    other = discrete_model(Spy(), time_map=solverlab.TimeMap(threshold=100, n=4))
    with pytest.raises(solverlab.OptionError, match=r"threshold=100\.0, n=4"):
        objective.loss(other, x0)
    assert solverlab.get_objective("etsdm", n=4).loss(other, x0, generator=gen(1)).item() > 0


@pytest.mark.parametrize(("options", "needle"), [
    ({"t_tilde": 0}, "t_tilde=0 "), ({"t_tilde": -5.0}, "t_tilde=-5.0"),
    ({"t_tilde": math.nan}, "t_tilde=nan"), ({"t_tilde": math.inf}, "t_tilde=inf"),
    ({"t_tilde": True}, "t_tilde=True"), ({"t_tilde": "100"}, "t_tilde='100'"),
    ({"n": 0}, "n=0"), ({"n": 2.5}, "n=2.5"), ({"n": True}, "n=True"),
])
def test_etsdm_bad_options(options, needle):
    with pytest.raises(solverlab.OptionError, match=r"etsdm.*option " + needle.replace(
            ".", r"\.")):
        solverlab.get_objective("etsdm", **options)


def test_etsdm_threshold_must_lie_in_the_network_time_range():
    index_model = discrete_model(Spy())
    with pytest.raises(solverlab.OptionError, match=r"t_tilde=2000 .*\[0, 999\]"):
        solverlab.get_objective("etsdm", t_tilde=2000).time_map(index_model)
    assert solverlab.get_objective("etsdm", t_tilde=999).time_map(index_model).threshold == 999
    sigma_model = solverlab.TorchModel(Spy(), "edm", time_input="sigma")
    with pytest.raises(solverlab.OptionError, match=r"t_tilde=None.*time_input='sigma'"):
        solverlab.get_objective("etsdm").time_map(sigma_model)
    assert solverlab.get_objective("etsdm", t_tilde=0.5).time_map(sigma_model).threshold == 0.5
    late = solverlab.get_schedule("vp-discrete", t_min=0.5)
    with pytest.raises(solverlab.OptionError, match=r"automatic: 100 = 0\.1 N.*\[499, 999\]"):
        solverlab.get_objective("etsdm").time_map(
            solverlab.TorchModel(Spy(), late, time_input="index"))
    with pytest.raises(solverlab.OptionError, match="no network time input"):
        solverlab.get_objective("etsdm").time_map(solverlab.get_model("gaussian-mixture"))


@pytest.mark.parametrize("solver", ["ddim", "dpmpp-2m", "unipc", "heun"])
def test_sampling_an_etsdm_model_shares_only_the_network_time(solver):
    # The model carries the map: every solver feeds the network the left ends while its
    # alpha, sigma and lambda stay at the true time -- exactly what a plain model whose
    # network shares the time internally gives.
    objective = solverlab.get_objective("etsdm")
    mapped_spy, inside_spy = Spy(seed=3), Spy(seed=3)
    mapped = discrete_model(mapped_spy, objective)
    inside = discrete_model(SharedInside(inside_spy, mapped.time_map))
    grid = solverlab.get_grid("time-uniform")(mapped.schedule, 16)
    x = torch.randn(5, 2, dtype=F64, generator=gen(0))
    a = solverlab.get_solver(solver).solve(mapped, x, grid).x
    b = solverlab.get_solver(solver).solve(inside, x, grid).x
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    fed = torch.cat(mapped_spy.seen)
    assert torch.equal(fed, torch.cat(inside_spy.seen))
    assert bool((fed[fed < 100] % 20 == 0).all()) and bool((fed < 100).any())
    raw = torch.cat([mapped.schedule.index(t) for t in _times_of(solver, mapped, x, grid)])
    assert bool(((raw < 100) & (raw % 20 != 0)).any())  # sharing changed some inputs
    assert torch.equal(fed[raw >= 100], raw[raw >= 100])
    plain = discrete_model(Spy(seed=3))
    assert not torch.allclose(solverlab.get_solver(solver).solve(plain, x, grid).x, a)


def _times_of(solver, model, x, grid):
    """The physical times at which ``solver`` evaluates ``model``."""
    seen = []

    class Recorder(solverlab.Model):
        schedule, parameterization = model.schedule, model.parameterization

        def __call__(self, x, t):
            seen.append(t.clone())
            return model(x, t)

    solverlab.get_solver(solver).solve(Recorder(), x, grid)
    return seen


# -- sa ------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["vp-discrete", "vp-linear"])
def test_sa_with_one_step_is_one_plus_lambda_times_simple(schedule):
    model = solverlab.TorchModel(Spy(seed=2), schedule)
    x0 = torch.randn(32, 2, dtype=F64, generator=gen(0))
    simple = solverlab.get_objective("simple", antithetic=True).loss(model, x0, generator=gen(1))
    for normalization in ("squared", "linear"):
        sa = solverlab.get_objective("sa", k=1, lam=0.7, normalization=normalization)
        got = sa.loss(model, x0, generator=gen(1))
        assert got.item() == pytest.approx(1.7 * simple.item(), rel=1e-14)


def test_sa_linear_normalisation_is_k_times_the_squared_one():
    model = solverlab.TorchModel(Spy(seed=2), "vp-linear")
    x0 = torch.randn(32, 2, dtype=F64, generator=gen(0))
    sq = solverlab.get_objective("sa", k=3).terms(model, x0, generator=gen(1))
    lin = solverlab.get_objective("sa", k=3, normalization="linear").terms(model, x0,
                                                                            generator=gen(1))
    assert lin[0].item() == sq[0].item()
    assert lin[1].item() == pytest.approx(3 * sq[1].item(), rel=1e-14)
    lam = solverlab.get_objective("sa", k=3, lam=0.25)
    assert lam.loss(model, x0, generator=gen(1)).item() == pytest.approx(
        (sq[0] + 0.25 * sq[1]).item(), rel=1e-14)


@pytest.mark.parametrize("schedule", ["vp-discrete", "vp-linear"])
def test_sa_masks_steps_before_t_min(schedule):
    spy = Spy(seed=2)
    model = solverlab.TorchModel(spy, schedule)
    sched = model.schedule
    x0 = torch.randn(16, 2, dtype=F64, generator=gen(0))
    sa = solverlab.get_objective("sa", k=2)
    simple, sequence = sa.terms(model, x0, generator=gen(1), t=sched.t_min)
    assert sequence.item() == pytest.approx(simple.item() / 4, rel=1e-14)  # e_1 masked, / K^2
    fed = spy.seen[-1]
    assert torch.equal(fed, torch.full((32,), sched.t_min, dtype=F64))  # evaluated at t_min
    h = 1e-3 if schedule == "vp-discrete" else (sched.t_max - sched.t_min) / 1000
    simple, sequence = sa.terms(model, x0, generator=gen(1), t=sched.t_min + h)
    assert sequence.item() != pytest.approx(simple.item() / 4, rel=1e-3)  # both terms count
    torch.testing.assert_close(spy.seen[-1][16:], torch.full((16,), sched.t_min, dtype=F64),
                               rtol=0, atol=1e-15)


def test_sa_antithetic_times_pair_n_with_n_minus_one_minus_n():
    spy = Spy()
    model = discrete_model(spy)
    x0 = torch.randn(64, 2, dtype=F64, generator=gen(0))
    solverlab.get_objective("sa", k=3).loss(model, x0, generator=gen(1))
    fed = spy.seen[-1].reshape(3, 64)  # the K calls in one forward pass
    assert torch.equal(fed[0, :32] + fed[0, 32:], torch.full((32,), 999.0, dtype=F64))
    assert torch.equal(fed[1], (fed[0] - 1).clamp(min=0))
    assert torch.equal(fed[2], (fed[0] - 2).clamp(min=0))
    solverlab.get_objective("sa", k=3, antithetic=False).loss(model, x0, generator=gen(1))
    fed = spy.seen[-1][:64]
    assert not torch.equal(fed[:32] + fed[32:], torch.full((32,), 999.0, dtype=F64))


@pytest.mark.parametrize("parameterization", ["noise", "velocity"])
def test_sa_loss_and_gradients_match_k_separate_calls(parameterization):
    # The reference: K separate network calls, written out from the definition; the plugin's
    # one batched forward pass must give the same loss and the same parameter gradients.
    k, lam, batch = 3, 0.5, 12
    sched = solverlab.get_schedule("vp-linear")
    h = (sched.t_max - sched.t_min) / 1000
    spy = Spy(seed=5, keep_grad=True)
    model = solverlab.TorchModel(spy, sched, parameterization)
    x0 = torch.randn(batch, 2, dtype=F64, generator=gen(0))
    t = torch.linspace(sched.t_min, sched.t_max, batch, dtype=F64)
    t[1] = sched.t_min + 1.5 * h  # its k = 2 term is masked
    sa = solverlab.get_objective("sa", k=k, lam=lam)
    loss = sa.loss(model, x0, generator=gen(1), t=t)
    loss.backward()
    grads = [p.grad.clone() for p in spy.parameters()]
    out_grad = spy.outputs[-1].grad.reshape(k, batch, 2)
    spy.zero_grad()

    g = gen(1)
    errors = []
    for j in range(k):
        eps = torch.randn(batch, 2, dtype=F64, generator=g)
        tj = (t - j * h).clamp(min=sched.t_min)
        a, s = sched.alpha(tj)[:, None], sched.sigma(tj)[:, None]
        out = spy.net(a * x0 + s * eps, tj)
        target = eps if parameterization == "noise" else a * eps - s * x0
        errors.append((target - out) * (t - j * h >= sched.t_min)[:, None])
    want = errors[0].square().sum(1).mean() + lam * sum(errors).square().sum(1).mean() / k**2
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-13)
    for got, ref in zip(grads, (p.grad for p in spy.parameters())):
        torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-13)
    # every call gets the gradient of its own term: -2 lam/(K^2 B) sum_j e_j (+ the simple
    # term's -2 e_0/B for the first), zero where masked
    total = sum(errors).detach()
    for j in range(k):
        expect = -2 * lam / (k**2 * batch) * total * (errors[j] != 0).any(1, keepdim=True)
        if j == 0:
            expect = expect - 2 / batch * errors[0].detach()
        torch.testing.assert_close(out_grad[j], expect, rtol=1e-10, atol=1e-14)
    assert bool((out_grad[1:, 0] == 0).all()) and bool((out_grad[2, 1] == 0).all())  # masked
    assert bool((out_grad[:, 2:] != 0).all())  # each of the K calls gets its gradient


@pytest.mark.parametrize(("options", "needle"), [
    ({"k": 0}, "k=0"), ({"k": 1.5}, "k=1.5"), ({"k": True}, "k=True"),
    ({"lam": -0.1}, "lam=-0.1"), ({"lam": math.nan}, "lam=nan"),
    ({"normalization": "cubic"}, "normalization='cubic'"),
    ({"antithetic": 1}, "antithetic=1"),
    ({"spacing": 0.0}, "spacing=0.0"), ({"spacing": -1e-3}, "spacing=-0.001"),
    ({"spacing": math.inf}, "spacing=inf"),
])
def test_sa_bad_options(options, needle):
    with pytest.raises(solverlab.OptionError, match=r"'sa'.*option " + needle.replace(
            ".", r"\.")):
        solverlab.get_objective("sa", **options)


def test_sa_spacing_is_fixed_on_discrete_schedules_and_bounded_on_continuous_ones():
    x0 = torch.randn(4, 2, dtype=F64, generator=gen(0))
    with pytest.raises(solverlab.OptionError, match=r"spacing=0\.001 .*one index apart"):
        solverlab.get_objective("sa", spacing=1e-3).loss(discrete_model(Spy()), x0)
    continuous = solverlab.TorchModel(Spy(), "vp-linear")
    with pytest.raises(solverlab.OptionError, match=r"spacing=2\.0 .*smaller than t_max"):
        solverlab.get_objective("sa", spacing=2.0).loss(continuous, x0)
    spy = Spy()
    solverlab.get_objective("sa", spacing=0.05).loss(solverlab.TorchModel(spy, "vp-linear"),
                                                     x0, t=0.5)
    torch.testing.assert_close(spy.seen[-1], torch.tensor([0.5] * 4 + [0.45] * 4, dtype=F64),
                               rtol=0, atol=1e-15)


@pytest.mark.parametrize("threshold", [0, -1.0, math.nan, math.inf, True, "5", None])
def test_a_time_map_refuses_a_bad_threshold(threshold):
    """Checked before it becomes a float (a converter ran first: True and "5" got through)."""
    with pytest.raises(solverlab.OptionError, match=f"threshold={threshold!r} is not allowed"):
        solverlab.TimeMap(threshold=threshold, n=5)
    assert solverlab.TimeMap(threshold=100, n=5).threshold == 100.0
