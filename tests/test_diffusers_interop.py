"""diffusers interop (solverlab.integrations.diffusers): a diffusers loop driven by
``SolverlabScheduler`` gives what ``Solver.solve`` gives on ``model_from_diffusers`` of the same
network, for every registered fixed-grid solver; pipelines run; configs round-trip; bad input
raises solverlab errors.

The network is a tiny randomly initialised ``UNet2DModel`` (no download), in float64 for the
accuracy checks: both sides then compute the same method to round-off (float32 coarse steps
cancel update coefficients of 20-70, which would measure round-off, not the adapter).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import solverlab  # noqa: E402
from solverlab import Denoiser, InputError, OptionError, SolverlabError  # noqa: E402
from solverlab.errors import UnknownNameError  # noqa: E402
from solverlab.integrations.diffusers import (  # noqa: E402
    SolverlabScheduler,
    model_from_diffusers,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning",
    "ignore:__array_wrap__ must accept context:DeprecationWarning",
)

F64 = torch.float64
TOL = 1e-9  # float64 on both sides (the issue asks 1e-4)


def tiny_unet(out_channels: int = 1, seed: int = 0) -> diffusers.UNet2DModel:
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=out_channels, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()


@pytest.fixture(scope="module")
def unet() -> diffusers.UNet2DModel:
    return tiny_unet().double()


def start(dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)


def diffusers_loop(scheduler: SolverlabScheduler, unet, x: torch.Tensor, steps: int,
                   ) -> tuple[torch.Tensor, int]:
    """diffusers' own loop; returns the sample and the number of network calls."""
    scheduler.set_timesteps(steps)
    sample, calls = x.clone(), 0
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(scheduler.scale_model_input(sample, t), t).sample
            calls += 1
            sample = scheduler.step(out, t, sample).prev_sample
    return sample, calls


def own_solve(scheduler: SolverlabScheduler, unet, x: torch.Tensor) -> solverlab.Solution:
    model = model_from_diffusers(unet, scheduler.config)
    return scheduler.solver.solve(model, x, scheduler.grid, progress=False)


def test_importing_solverlab_does_not_import_diffusers() -> None:
    code = ("import sys, solverlab, solverlab.integrations; "
            "assert 'diffusers' not in sys.modules, 'diffusers imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", ["dpmpp-2m", "unipc", "heun"])
def test_loop_equals_solve(unet, name: str) -> None:
    scheduler = SolverlabScheduler(name)
    x = start()
    sample, calls = diffusers_loop(scheduler, unet, x, 5)
    sol = own_solve(scheduler, unet, x)
    assert sol.nfe == calls == len(scheduler.timesteps) == scheduler.nfe
    assert scheduler.order == (2 if name == "heun" else 1)
    assert float((sample - sol.x).abs().max()) < TOL
    assert float((sample - x).abs().max()) > 0.1  # it did move


def test_float32_loop_equals_solve() -> None:
    unet32 = tiny_unet()
    scheduler = SolverlabScheduler("dpmpp-2m")
    x = start(torch.float32)
    sample, _ = diffusers_loop(scheduler, unet32, x, 10)
    sol = own_solve(scheduler, unet32, x)
    assert sample.dtype == torch.float32
    # Relative: the untrained network's x0 predictions put the sample at |x| ~ 300, where
    # float32's spacing is 3e-5 (in-place vs out-of-place updates round differently).
    assert float((sample - sol.x).abs().max() / sol.x.abs().max()) < 1e-5


def test_timesteps_are_the_times_of_the_real_run(unet) -> None:
    """The dry run's times (zeros model) are the times a real solve asks the network at."""

    class Recording(Denoiser):
        def __call__(self, x, t):
            t = self.time(x, t)
            self.times.append(float(t[0]))
            return super().__call__(x, t)

    for name in ("pndm-prk", "dpm-solver-3", "pndm-plms"):
        scheduler = SolverlabScheduler(name)
        scheduler.set_timesteps(6)
        den = Recording(model_from_diffusers(unet, scheduler.config))
        den.times: list[float] = []
        scheduler.solver.solve(den, start(), scheduler.grid, progress=False)
        index = scheduler.schedule.index(torch.tensor(den.times, dtype=F64))
        assert torch.allclose(index.float(), scheduler.timesteps, rtol=0, atol=1e-4), name
    # heun: every grid time but the last is visited twice (end of one stage, start of next)
    scheduler = SolverlabScheduler("heun")
    scheduler.set_timesteps(3)
    grid_index = scheduler.schedule.index(scheduler.grid).float()
    assert torch.equal(scheduler.timesteps, grid_index[[0, 1, 1, 2, 2, 3]])


def _fixed_grid_solvers() -> list[str]:
    out = []
    for entry in solverlab.get_registry().entries("solver"):
        if issubclass(entry.cls, solverlab.AdaptiveSolver) or entry.name in MODEL_DEPENDENT:
            continue
        out.append(entry.name)
    return out


OPTIONS = {"dpmv3": {"degenerated": True}}
#: Their correctors iterate until they converge: the evaluation count depends on the model.
MODEL_DEPENDENT = ("torchdiffeq-implicit_adams", "torchdiffeq-fixed_adams")


@pytest.mark.parametrize("name", _fixed_grid_solvers())
def test_every_fixed_grid_solver(unet, name: str) -> None:
    scheduler = SolverlabScheduler(name, **OPTIONS.get(name, {}))
    x = start()
    sample, calls = diffusers_loop(scheduler, unet, x, 4)
    sol = own_solve(scheduler, unet, x)
    expected = scheduler.solver.expected_nfe(4)
    assert calls == sol.nfe
    if expected is not None:
        assert calls == expected
    assert float((sample - sol.x).abs().max()) < TOL


def test_a_whole_grid_solver_needs_the_returned_sample() -> None:
    """torchdiffeq solvers are replayed whole: the loop may not change the sample."""
    scheduler = SolverlabScheduler("torchdiffeq-rk4")
    scheduler.set_timesteps(3)
    assert scheduler.order == 4 and len(scheduler.timesteps) == 12
    x = start()
    out = scheduler.step(torch.zeros_like(x), scheduler.timesteps[0], x).prev_sample
    with pytest.raises(InputError, match="solves the whole grid in one call"):
        scheduler.step(torch.zeros_like(x), scheduler.timesteps[1], out + 1)


@pytest.mark.parametrize("name", ["torchdiffeq-rk4", "torchdiffeq-explicit_adams", "heun"])
def test_a_float32_loop_follows_its_own_dry_run(name: str) -> None:
    """torchdiffeq evaluates at times rounded to the state's dtype: a float32 sample (as in
    DDPMPipeline) is checked against a dry run in float32, and the loop equals the solve."""
    unet32 = tiny_unet()
    scheduler = SolverlabScheduler(name)
    x = start(torch.float32)
    sample, calls = diffusers_loop(scheduler, unet32, x, 4)
    sol = own_solve(scheduler, unet32, x)
    assert calls == sol.nfe == len(scheduler.timesteps)
    # float32 round-off relative to the state (the untrained network drives it to ~1e2)
    assert float((sample - sol.x).abs().max() / sol.x.abs().max()) < 1e-6


@pytest.mark.parametrize("name", MODEL_DEPENDENT)
def test_a_model_dependent_number_of_evaluations_is_refused(unet, name: str) -> None:
    """The implicit Adams methods iterate their corrector until it converges: with the
    network they take more evaluations than the dry run (zeros converge at once)."""
    scheduler = SolverlabScheduler(name)
    with pytest.raises(SolverlabError, match="depend"):
        diffusers_loop(scheduler, unet, start(), 4)


def test_dpmv3_with_computed_ems() -> None:
    # compute_ems differentiates the network forward (torch.func.jvp). torch 2.13 has no
    # forward-mode derivative for its CPU scaled_dot_product_attention kernel, and diffusers'
    # Attention applies group_norm to a transposed (non-contiguous) tensor, which forward-mode
    # group_norm refuses: the EMS network has no mid-block attention.
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
        add_attention=False).eval().double()
    probe = SolverlabScheduler("dpmv3", degenerated=True)
    model = model_from_diffusers(unet, probe.config)
    data = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=F64)
    ems = solverlab.compute_ems(model, data, grid_size=50, samples=32, progress=False)
    scheduler = SolverlabScheduler("dpmv3", ems=ems)
    x = start()
    sample, calls = diffusers_loop(scheduler, unet, x, 4)
    sol = own_solve(scheduler, unet, x)
    assert calls == sol.nfe == 4
    assert float((sample - sol.x).abs().max()) < TOL
    # The EMS really act: the degenerated method (no EMS) gives another sample.
    other, _ = diffusers_loop(SolverlabScheduler("dpmv3", degenerated=True), unet, x, 4)
    assert float((other - sample).abs().max()) > 1e-4
    # An EMS object is not a JSON value: saving refuses it and says what to do.
    with pytest.raises(OptionError, match="ems"):
        scheduler.save_pretrained("/nonexistent-never-written")


def test_ddpm_pipeline_runs() -> None:
    unet32 = tiny_unet()
    pipe = diffusers.DDPMPipeline(unet=unet32, scheduler=SolverlabScheduler("dpmpp-2m"))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=5, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 8, 8, 1)
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert images.std() > 0.01
    assert pipe.scheduler.nfe == 5


def test_config_round_trip(unet, tmp_path) -> None:
    scheduler = SolverlabScheduler("unipc", variant="bh1", grid="trailing",
                                   beta_schedule="scaled_linear", beta_start=0.00085,
                                   beta_end=0.012, prediction_type="v_prediction")
    scheduler.save_pretrained(tmp_path)
    loaded = SolverlabScheduler.from_pretrained(tmp_path)
    again = SolverlabScheduler.from_config(scheduler.config)
    for other in (loaded, again):
        assert type(other) is SolverlabScheduler
        assert dict(other.config) == dict(scheduler.config)
        assert other.solver == scheduler.solver
        assert other.schedule == scheduler.schedule
    x = start()
    a, _ = diffusers_loop(scheduler, unet, x, 4)
    b, _ = diffusers_loop(loaded, unet, x, 4)
    assert torch.equal(a, b)
    assert torch.equal(scheduler.timesteps, loaded.timesteps)
    # A diffusers scheduler's config gives its schedule (solver chosen by keyword).
    ddpm = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2",
                                   prediction_type="sample")
    from_ddpm = SolverlabScheduler.from_config(ddpm.config, solver_name="heun")
    assert from_ddpm.solver.name == "heun"
    assert from_ddpm.parameterization.name == "data"
    ac = from_ddpm.schedule.alpha(from_ddpm.schedule.t_of_index(torch.arange(1000.0))) ** 2
    assert torch.allclose(ac, ddpm.alphas_cumprod.to(F64), rtol=1e-6)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_other_prediction_types(unet, prediction_type: str) -> None:
    """The network's output read as v (``v = alpha eps - sigma x0``) or as x0: the model's
    data prediction equals the manual conversion, and the loop equals the solve."""
    config = diffusers.DDPMScheduler(prediction_type=prediction_type).config
    model = model_from_diffusers(unet, config)
    x, n = start(), 600.0
    t = model.schedule.t_of_index(torch.tensor([n, n], dtype=F64))
    with torch.no_grad():
        raw = unet(x, torch.tensor(n)).sample
        x0 = Denoiser(model).data(x, t)
    ac = diffusers.DDPMScheduler().alphas_cumprod[int(n)].double()
    a, s = ac.sqrt(), (1 - ac).sqrt()
    manual = a * x - s * raw if prediction_type == "v_prediction" else raw
    assert float((x0 - manual).abs().max()) < 1e-6
    scheduler = SolverlabScheduler.from_config(config, solver_name="dpmpp-2m")
    sample, _ = diffusers_loop(scheduler, unet, x, 5)
    assert float((sample - own_solve(scheduler, unet, x).x).abs().max()) < TOL


def test_learned_variance_channels() -> None:
    unet2 = tiny_unet(out_channels=2).double()
    scheduler = SolverlabScheduler("dpmpp-2m", variance_type="learned_range")
    model = model_from_diffusers(unet2, scheduler.config)
    x = start()
    with torch.no_grad():
        out = model(x, torch.full((2,), 0.5, dtype=F64))
        full = unet2(x, torch.tensor(499.0)).sample
    assert out.shape == x.shape and torch.equal(out, full[:, :1])
    sample, _ = diffusers_loop(scheduler, unet2, x, 4)
    assert float((sample - own_solve(scheduler, unet2, x).x).abs().max()) < TOL
    without = SolverlabScheduler("dpmpp-2m")
    without.set_timesteps(2)
    with pytest.raises(InputError, match="variance_type"):
        without.step(full, without.timesteps[0], x)


def test_sample_changed_between_intervals_becomes_the_state(unet) -> None:
    """Inpainting-style loops change the sample between steps: the next interval starts
    from the caller's sample (a one-step solve from it gives the same point)."""
    scheduler = SolverlabScheduler("ddim")
    scheduler.set_timesteps(3)
    x = start()
    with torch.no_grad():
        t0, t1 = scheduler.timesteps[:2]
        y = scheduler.step(unet(x, t0).sample, t0, x).prev_sample
        y = 0.5 * y
        z = scheduler.step(unet(y, t1).sample, t1, y).prev_sample
        model = model_from_diffusers(unet, scheduler.config)
        ref = scheduler.solver.solve(model, y, scheduler.grid[1:3], progress=False).x
    assert float((z - ref).abs().max()) < TOL


def test_bad_input_raises_solverlab_errors(unet) -> None:
    with pytest.raises(UnknownNameError, match="dpmpp-2m"):
        SolverlabScheduler("dpmpp-2n")
    with pytest.raises(OptionError, match="adaptive"):
        SolverlabScheduler("dpm-adaptive")
    with pytest.raises(OptionError, match="no option"):
        SolverlabScheduler("dpmpp-2m", colour="red")
    with pytest.raises(OptionError, match="prediction_type"):
        SolverlabScheduler("dpmpp-2m", prediction_type="score")
    with pytest.raises(OptionError, match="beta_schedule"):
        SolverlabScheduler("dpmpp-2m", beta_schedule="cosine")
    with pytest.raises(OptionError, match="num_inference_steps"):
        SolverlabScheduler("dpmpp-2m").set_timesteps(0)
    scheduler = SolverlabScheduler("heun")
    x = start()
    out = torch.zeros_like(x)
    with pytest.raises(InputError, match="set_timesteps"):
        scheduler.step(out, 999, x)
    with pytest.raises(InputError, match="set_timesteps"):
        scheduler.grid  # noqa: B018
    scheduler.set_timesteps(3)
    with pytest.raises(InputError, match=r"timesteps\[0\]"):
        scheduler.step(out, scheduler.timesteps[1], x)
    y = scheduler.step(out, scheduler.timesteps[0], x).prev_sample
    with pytest.raises(InputError, match="intermediate stage"):
        scheduler.step(out, scheduler.timesteps[1], y + 1.0)
    scheduler.step(out, scheduler.timesteps[1], y)
    with pytest.raises(InputError, match=r"timesteps\[2\]"):
        scheduler.step(out, scheduler.timesteps[4], y)
    for t in scheduler.timesteps[2:]:
        y = scheduler.step(out, t, y).prev_sample
    with pytest.raises(InputError, match="all 6 timesteps"):
        scheduler.step(out, 0, y)
    with pytest.raises(SolverlabError, match="scheduler config"):
        model_from_diffusers(unet, {"rescale_betas_zero_snr": True})


def test_add_noise_matches_diffusers() -> None:
    ddpm = diffusers.DDPMScheduler()
    scheduler = SolverlabScheduler.from_config(ddpm.config)
    x0, noise = start(), start().flip(0)
    t = torch.tensor([10, 700])
    ours = scheduler.add_noise(x0, noise, t)
    theirs = ddpm.add_noise(x0.float(), noise.float(), t)
    assert float((ours - theirs).abs().max()) < 1e-5
    assert len(scheduler) == 1000
